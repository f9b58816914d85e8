import Foundation

/// The test CA and the two certificates `scripts/make-test-certs.sh` makes
/// for a migration over TLS: postcopyd's server certificate (naming
/// 127.0.0.1) and the agent's client certificate (named postcopy-agent),
/// both signed by the CA. One set per bench run, in its work directory.
struct TestCertificates: Sendable {
    let directory: String

    private init(directory: String) { self.directory = directory }

    /// Where `environment`'s run keeps its set.
    private static func directory(in environment: BenchEnvironment) -> String { environment.workDirectory + "/tls" }

    /// A fresh set, replacing whatever a former run left in the work directory.
    @discardableResult
    static func make(in environment: BenchEnvironment) throws -> TestCertificates {
        let directory = directory(in: environment)
        let script = environment.script("make-test-certs.sh")
        guard FileManager.default.isReadableFile(atPath: script) else {
            throw BenchmarkError("make test certificates: no \(script) (give the repository's scripts directory with --scripts)")
        }
        try? FileManager.default.removeItem(atPath: directory)
        _ = try runToEnd("make-test-certs", "/bin/bash", [script, directory], in: environment.workDirectory, seconds: 60)
        let certificates = TestCertificates(directory: directory)
        for file in certificates.files where !FileManager.default.isReadableFile(atPath: file) {
            throw BenchmarkError("make test certificates: \(script) made no \(file)")
        }
        return certificates
    }

    /// The set this run made already, or a fresh one when there is none.
    static func existing(in environment: BenchEnvironment) throws -> TestCertificates {
        let certificates = TestCertificates(directory: directory(in: environment))
        if certificates.files.allSatisfy(FileManager.default.isReadableFile(atPath:)) { return certificates }
        return try make(in: environment)
    }

    private var files: [String] { ["ca.pem", "daemon.pem", "daemon.key", "agent.pem", "agent.key"].map { "\(directory)/\($0)" } }

    /// postcopyd serve's options: its certificate, and the one client it accepts.
    var daemonArguments: [String] {
        ["--tls-ca", "\(directory)/ca.pem", "--tls-cert", "\(directory)/daemon.pem", "--tls-key", "\(directory)/daemon.key",
         "--tls-client-name", "postcopy-agent"]
    }

    /// postcopy-push's options (no migration secret: the baseline has none either).
    var agentArguments: [String] {
        ["--tls-ca", "\(directory)/ca.pem", "--tls-cert", "\(directory)/agent.pem", "--tls-key", "\(directory)/agent.key"]
    }
}
