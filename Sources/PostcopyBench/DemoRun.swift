import Foundation
import Glibc
import PostcopyCore
import PostcopyOS

/// `postcopy-bench demo` (`make demo`): one whole migration on this machine
/// over loopback, told as it goes. The real programs run as separate
/// processes, as an operator runs them: the source workload dirtying a
/// share of its RAM, postcopyd, the reference guest as its VMM,
/// `postcopyctl watch` following the migration, and postcopy-push, over
/// mutual TLS 1.3 with certificates made for the run and a migration secret
/// (or in plaintext, to compare). Their logs go to stderr as they run; at
/// the end come what postcopyctl watch showed, each program's summary, and
/// the verification result.
///
/// It is a `MigrationScenario` run in a fresh directory under /tmp, which
/// is removed, like the source RAM and every program started, whatever
/// the outcome.
public struct DemoRun: Sendable {
    public var size: UInt64
    /// The destination's guest memory.
    public var memory: MemoryKind = .shmem
    /// Share of pages the source keeps rewriting.
    public var dirty = 0.10
    /// The source's pause between passes over its hot set: 5 ms, so that
    /// it rewrites the hot set between precopy's last round (a few ms on
    /// loopback) and the pause, and the demo has a postcopy to show. At
    /// postcopy-guest's default, 20 ms, a short last round often fell
    /// between two passes, and no page was stale.
    public var passPauseMicroseconds: UInt32 = 5_000
    /// Mutual TLS with certificates made for the run; false: plaintext.
    public var tls = true
    /// How long postcopy-push may take.
    public var timeoutSeconds: Double = 300
    /// Options for the reference guest (postcopy-guest vmm).
    public var guestOptions: [String] = []

    public init(size: UInt64) { self.size = size }

    /// The migration: the programs' own defaults where the benchmarks set
    /// theirs (dirty-log choice, the guest's scribbling), logs on stderr.
    var scenario: MigrationScenario {
        var scenario = MigrationScenario(name: "demo", size: size,
                                         source: .workload(dirty: dirty, passPauseMicroseconds: passPauseMicroseconds))
        scenario.memory = memory
        scenario.tls = tls
        scenario.migrationSecretFile = true
        scenario.dirtyLog = "auto"
        scenario.scribble = true
        scenario.guestOptions = guestOptions
        scenario.watch = true
        scenario.logsToStandardError = true
        scenario.pushSeconds = timeoutSeconds
        return scenario
    }

    /// Runs the demo with the programs in `binDirectory`, telling each step
    /// and then what the programs printed (also after a failure) through
    /// `say`; throws what failed.
    public func run(binDirectory: String, scriptsDirectory: String, say: @escaping @Sendable (String) -> Void) throws {
        var template = Array("/tmp/postcopy-demo.XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw BenchmarkError("make a directory in /tmp: \(Errno.current)") }
        let work = String(cString: made)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let environment = BenchEnvironment(binDirectory: binDirectory, baselineDirectory: "",
                                           scriptsDirectory: scriptsDirectory, workDirectory: work, say: say)
        var scenario = scenario
        let files = scenario.files(in: environment)
        scenario.onStep = { step in say(header(step, files)) }
        let outcome = Result { try scenario.run(in: environment) }

        if let watched = try? String(contentsOfFile: files.watch, encoding: .utf8) {
            say("== postcopyctl watch")
            say(watched.trimmingCharacters(in: .newlines))
        }
        say("== summaries (JSON)")
        for program in MigrationFiles.summarizing {
            let summary = (try? String(contentsOfFile: files.summary(program), encoding: .utf8)) ?? ""
            say("\(program): \(summary.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        _ = try outcome.get()
        say("demo: PASS — the destination image matches the source's digest")
    }

    /// The line that begins a step.
    private func header(_ step: MigrationStep, _ files: MigrationFiles) -> String {
        switch step {
        case .source:
            "== source: \(ByteSize.format(size)) of guest RAM in \(files.sourceRAM), \(dirty) of pages kept dirty (rewritten every \(passPauseMicroseconds / 1000) ms)"
        case .transport where tls:
            "== TLS 1.3: a test CA and certificates for both ends (make-test-certs.sh), and a migration secret"
        case .transport:
            "== plaintext (--insecure-plaintext): guest RAM crosses loopback unencrypted"
        case .destination:
            "== destination: postcopyd on \(memory), the reference guest as its VMM"
        case .migrate:
            "== migrate"
        }
    }
}
