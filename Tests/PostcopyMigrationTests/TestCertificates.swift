import Foundation
import PostcopyOS

/// The test certificates, made once per test process by
/// scripts/make-test-certs.sh (with openssl) — the same script the docs
/// and the demo use. Besides the CA, postcopyd's and the agent's
/// certificates, it makes the ones postcopyd must refuse.
enum TestCertificates {
    /// The identity postcopyd's tests accept, as the agent's certificate names it.
    static let clientName = "postcopy-agent"

    static let directory: String = {
        let directory = NSTemporaryDirectory() + "postcopy-test-certs.\(getpid())"
        let script = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/make-test-certs.sh").path
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [script, directory, "--refused"]
        process.standardOutput = FileHandle.nullDevice
        do {
            try process.run()
        } catch {
            fatalError("cannot run \(script): \(error)")
        }
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { fatalError("\(script) failed (is openssl installed?)") }
        return directory
    }()

    static func path(_ file: String) -> String { "\(directory)/\(file)" }

    /// postcopyd's side: its certificate, accepting `clientName` from the CA.
    static let daemon = transport(.server, certificate: "daemon", peerName: clientName)

    /// The agent's side: `certificate` (agent.pem by default), expecting
    /// postcopyd at 127.0.0.1 and trusting `ca`.
    static func agent(_ certificate: String = "agent", ca: String = "ca") -> TransportSecurity {
        transport(.client, certificate: certificate, ca: ca, peerName: "127.0.0.1")
    }

    static func transport(_ side: TLSContext.Side, certificate: String, ca: String = "ca",
                          peerName: String) -> TransportSecurity {
        do {
            return .tls(try TLSContext(side, configuration(certificate: certificate, ca: ca, peerName: peerName)))
        } catch {
            fatalError("test certificate \(certificate): \(error)")
        }
    }

    static func configuration(certificate: String, ca: String = "ca", peerName: String) -> TLSConfiguration {
        TLSConfiguration(caFile: path("\(ca).pem"), certificateFile: path("\(certificate).pem"),
                         privateKeyFile: path("\(certificate).key"), peerName: peerName)
    }

    /// `postcopyd serve`'s TLS options.
    static var daemonFlags: [String] {
        ["--tls-ca", path("ca.pem"), "--tls-cert", path("daemon.pem"), "--tls-key", path("daemon.key"),
         "--tls-client-name", clientName]
    }

    /// `postcopy-push`'s TLS options.
    static var agentFlags: [String] {
        ["--tls-ca", path("ca.pem"), "--tls-cert", path("agent.pem"), "--tls-key", path("agent.key")]
    }
}
