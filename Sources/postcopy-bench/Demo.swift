import ArgumentParser
import Foundation
import PostcopyBench
import PostcopyCLI
import PostcopyCore
import PostcopyOS

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "One whole migration over loopback, told as it goes (what 'make demo' runs).",
        discussion: """
            Runs the real programs as separate processes: the source workload (postcopy-guest source) \
            dirtying a share of its RAM, postcopyd, the reference guest as its VMM (postcopy-guest vmm), \
            postcopyctl watch following the migration, and postcopy-push, over mutual TLS 1.3 with \
            certificates made for the run and a migration secret. Their logs go to stderr as they run; \
            then it prints what postcopyctl watch showed, each program's summary (JSON), and 'demo: PASS' \
            when the destination's image matches the source's digest. Options after -- go to the reference \
            guest, e.g. '-- --measure-tlb 10' or '-- --no-collapse'. Fails, saying why, when any program \
            fails. Kills every program it started and removes every file it made, also when interrupted \
            (SIGINT, SIGTERM, SIGHUP). Needs root.
            """)

    @Option(help: ArgumentHelp("Guest RAM (a multiple of 2 MiB).", valueName: "size"))
    var size = "1G"

    @Option(help: ArgumentHelp("The destination's guest memory: shmem (4 KiB pages) or hugetlbfs (2 MiB pages, from the hugepages reserved).", valueName: "shmem|hugetlbfs"))
    var memory = MemoryKind.shmem

    @Option(help: "Share of pages the source keeps rewriting.")
    var dirty = 0.10

    @Option(help: ArgumentHelp("Seconds postcopy-push may take.", valueName: "seconds"))
    var timeout: Double = 300

    @Flag(help: "--insecure-plaintext on both ends instead of TLS: guest RAM crosses loopback unencrypted (to compare).")
    var insecurePlaintext = false

    @Option(help: ArgumentHelp("The programs (default: the directory of this one).", valueName: "dir"))
    var bin: String?

    @Option(help: ArgumentHelp("The repository's scripts (make-test-certs.sh).", valueName: "dir"))
    var scripts = "scripts"

    @Argument(parsing: .postTerminator, help: ArgumentHelp("Options for the reference guest (postcopy-guest vmm).", valueName: "guest-option"))
    var guestOptions: [String] = []

    func validate() throws {
        let bytes = try parseSize(size)
        guard bytes > 0, bytes % (2 << 20) == 0 else { throw ValidationError("--size must be a positive multiple of 2 MiB, not \(size)") }
        guard dirty >= 0 && dirty <= 1 else { throw ValidationError("--dirty must be a share between 0 and 1, not \(dirty)") }
        guard timeout > 0 else { throw ValidationError("--timeout must be positive") }
        guard getuid() == 0 else { throw ValidationError("needs root: \(rootReason)") }
        try requirePrograms(["postcopyd", "postcopy-push", "postcopy-guest", "postcopyctl"], in: programs)
        guard insecurePlaintext || FileManager.default.isReadableFile(atPath: "\(scripts)/make-test-certs.sh") else {
            throw ValidationError("no \(scripts)/make-test-certs.sh to make the run's TLS certificates: run from the repository, give its scripts directory with --scripts, or --insecure-plaintext")
        }
    }

    /// --bin, or else the directory this program was started from.
    var programs: String {
        if let bin { return bin }
        let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: executable).deletingLastPathComponent().path
    }

    func run() throws {
        // First, before any thread: the termination signals then reach the
        // watcher alone, which kills every program started; the run then
        // fails and cleans up as after any failure. (Each program is in a
        // process group of its own, so a terminal's ^C reaches this one
        // only. They inherit the blocked signals, and need none of them
        // here: the demo ends each with SIGKILL.)
        let signals = try SignalWatcher()
        let interrupted = Locked<String?>(nil)
        try signals.start { name in
            interrupted.withLock { $0 = $0 ?? name }
            RunningChildren.killAll()
        }

        var demo = DemoRun(size: try parseSize(size))
        demo.memory = memory
        demo.dirty = dirty
        demo.tls = !insecurePlaintext
        demo.timeoutSeconds = timeout
        demo.guestOptions = guestOptions
        do {
            try demo.run(binDirectory: programs, scriptsDirectory: scripts) { line in
                print(line)
                fflush(nil)  // before the next program writes to stderr
            }
        } catch {
            if let signal = interrupted.withLock({ $0 }) {
                writeStandardError("demo: interrupted by \(signal): every program it started killed, its files removed\n")
            } else {
                writeStandardError("demo: FAILED: \(error)\n")
            }
            throw ExitCode.failure
        }
    }
}
