import Foundation
import Glibc
import PostcopyCore

/// One whole migration over loopback, each program a process as an operator
/// runs them: the source workload, postcopyd, the reference guest, and
/// postcopy-push.
public struct MigrationScenario: Sendable {
    public enum Source: Sendable {
        /// The source keeps rewriting this share of its pages (a hot set)
        /// until paused, pausing `passPauseMicroseconds` between passes
        /// (nil: postcopy-guest's default, 20 ms): stale pages are what
        /// precopy could not keep up with.
        case workload(dirty: Double, passPauseMicroseconds: UInt32? = nil)
        /// A still image; at switchover exactly `stalePages` seeded random
        /// pages are declared dirty (postcopy-push --dirty-bitmap).
        case image(stalePages: UInt64)
    }

    public var name: String
    public var size: UInt64
    public var memory: MemoryKind = .shmem
    public var source: Source
    /// Share of the source's pages that are zero.
    public var zeroShare = 0.125
    public var guestThreads = 4
    /// Share of pages the guest reads after resume.
    public var touch = 1.0
    public var touchLog = false
    public var trace = false
    /// push --postcopy-bandwidth (MiB/s); nil: unlimited.
    public var postcopyMiBps: Double?
    public var maxRounds = 5
    public var seed: UInt64 = 1
    /// --background-scheduling for postcopyd and postcopy-push (nil: their
    /// default); `agentScheduling`, when set, for postcopy-push alone.
    public var backgroundScheduling: String?
    public var agentScheduling: String?
    /// postcopy-push --dirty-log: "uffd-wp" (the source workload registers
    /// its RAM and offers the log), "hash", or "auto" (uffd-wp when the
    /// kernel has it, else hash).
    public var dirtyLog = "uffd-wp"
    /// postcopy-push --streams (nil: its default, the CPUs online).
    public var streams: Int?
    /// Mutual TLS 1.3 between postcopy-push and postcopyd, with the test
    /// certificates of this bench run (`TestCertificates`); false: both run
    /// with --insecure-plaintext, as every benchmark but precopy's does.
    public var tls = false
    /// postcopy-push --migration-secret-file, a fresh secret in the
    /// migration's directory (the demo shows it); false: a secret the agent
    /// keeps in memory.
    public var migrationSecretFile = false
    /// Options for the reference guest (postcopy-guest vmm) after the
    /// scenario's own, e.g. --measure-tlb 10 or --no-collapse.
    public var guestOptions: [String] = []
    /// The guest writes a marker into each page it read (postcopy-guest's
    /// default); the benchmarks turn it off.
    public var scribble = false
    /// `postcopyctl watch` follows the migration, as an operator would;
    /// what it showed is in `MigrationFiles.watch`.
    public var watch = false
    /// Where the programs log: files in the migration's directory, or this
    /// process's stderr (with postcopy-push's progress display), as an
    /// operator running them by hand sees them.
    public var logsToStandardError = false
    /// How long postcopy-push may take.
    public var pushSeconds: Double = 900
    /// Runs once the source is filled, postcopyd listens and the guest is
    /// started, just before postcopy-push: `postcopy-bench load` makes its
    /// N migrations start together here. A throw ends this migration.
    public var beforePush: (@Sendable () throws -> Void)?
    /// Told as each step begins (`postcopy-bench demo` says them).
    public var onStep: (@Sendable (MigrationStep) -> Void)?

    public init(name: String, size: UInt64, source: Source) {
        self.name = name
        self.size = size
        self.source = source
    }
}

/// The steps of a `MigrationScenario`, in order.
public enum MigrationStep: Sendable {
    /// Starting the source workload and filling its RAM.
    case source
    /// Choosing the transport: making the test certificates, with `tls`.
    case transport
    /// Starting postcopyd, postcopyctl watch and the reference guest.
    case destination
    /// Starting postcopy-push.
    case migrate
}

/// Where one migration keeps its files: a directory of its own in the
/// bench's work directory, and the source's guest RAM in /dev/shm. They are
/// there after `MigrationScenario.run` returns or throws, but for the
/// source RAM, which it removes either way.
public struct MigrationFiles: Sendable {
    public let directory: String
    public let sourceRAM: String

    /// The programs whose summary (one JSON line on stdout) `summary` holds.
    public static let summarizing = ["push", "daemon", "guest"]

    /// What `postcopyctl watch` showed (with `MigrationScenario.watch`).
    public var watch: String { "\(directory)/watch.txt" }
    /// One of `summarizing`'s summary.
    public func summary(_ program: String) -> String { "\(directory)/\(program).json" }
    /// A program's log, unless the scenario logs to this process's stderr.
    func log(_ program: String, of scenario: MigrationScenario) -> String? {
        scenario.logsToStandardError ? nil : "\(directory)/\(program).log"
    }
}

/// One guest first touch from the guest's touch log.
public struct Touch: Sendable {
    public let thread: Int
    public let atMicros: Double
    public let page: UInt64
    public let stallMicros: Double
}

public struct MigrationResult: Sendable {
    public let daemon: DestinationSummary
    public let agent: AgentSummary
    public let guest: GuestSummary
    public let trace: PostcopyTrace?
    public let touches: [Touch]
    /// From the start (filling the source) to the end; from starting
    /// postcopy-push to the end (all three programs exited 0).
    public let wallSeconds: Double
    public let migrationWallSeconds: Double

    /// The guest's first-touch stalls split by what the daemon saw: touches
    /// of pages whose fault waited for a fetch (stale), and the others
    /// (clean). Needs the trace and the touch log.
    public func guestStalls(pagesPerFault: UInt64) -> (stale: [Double], clean: [Double]) {
        guard let trace else { return ([], []) }
        var staleFaultPages = Set<UInt64>()
        for event in trace.events where event.kind == .staleFault { staleFaultPages.insert(event.page / pagesPerFault) }
        // On 2 MiB pages only the first touch of a huge page faults.
        var seen = Set<UInt64>()
        var stale: [Double] = []
        var clean: [Double] = []
        for touch in touches {
            let page = touch.page / pagesPerFault
            guard seen.insert(page).inserted else { continue }
            if staleFaultPages.contains(page) { stale.append(touch.stallMicros) } else { clean.append(touch.stallMicros) }
        }
        return (stale, clean)
    }
}

extension MigrationScenario {
    /// Where this scenario's run in `environment` keeps its files.
    public func files(in environment: BenchEnvironment) -> MigrationFiles {
        MigrationFiles(directory: "\(environment.workDirectory)/\(name)",
                       sourceRAM: "/dev/shm/postcopy-bench-\(getpid())-\(name)")
    }

    /// Runs the migration; throws with the failing program's log on error.
    /// Kills every program it started and removes the source RAM, whatever
    /// the outcome.
    public func run(in environment: BenchEnvironment) throws -> MigrationResult {
        let files = files(in: environment)
        let directory = files.directory
        try? FileManager.default.removeItem(atPath: directory)
        try makeDirectory(directory)
        var children: [Child] = []
        defer {
            for child in children { child.kill() }
            unlink(files.sourceRAM)
        }
        let started = Date()

        onStep?(.source)
        let dirtyShare: Double
        var passPause: [String] = []
        switch source {
        case let .workload(dirty, pause):
            dirtyShare = dirty
            if let pause { passPause = ["--pass-pause", "\(pause)"] }
        case .image: dirtyShare = 0
        }
        let dirtyLogSocket = "\(directory)/dirty-log.sock"
        let workload = try Child("source", environment.program("postcopy-guest"), [
            "source", "--ram", files.sourceRAM, "--size", "\(size)", "--dirty", "\(dirtyShare)", "--zero", "\(zeroShare)",
            "--seed", "\(seed)", "--ready-file", "\(directory)/source.ready",
        ] + passPause + (dirtyLog == "hash" ? [] : ["--dirty-log-socket", dirtyLogSocket]), stdout: "\(directory)/source.out",
            stderr: files.log("source", of: self))
        children.append(workload)
        try waitForFile("\(directory)/source.ready", seconds: 300, "the source RAM to be filled", while: workload)

        // Plaintext, explicitly, unless `tls`: these figures are postcopyd's
        // own, comparable with the raw-TCP baselines and across runs; the
        // precopy benchmark measures TLS against a TLS baseline.
        onStep?(.transport)
        let transport: (daemon: [String], agent: [String])
        if tls {
            let certificates = try TestCertificates.existing(in: environment)
            transport = (certificates.daemonArguments, certificates.agentArguments)
        } else {
            transport = (["--insecure-plaintext"], ["--insecure-plaintext"])
        }
        let pushArguments = try pushArguments(files, pausing: workload.pid, dirtyLogSocket: dirtyLogSocket)
            + transport.agent

        onStep?(.destination)
        let logToStderr = ["POSTCOPY_LOG": "stderr"]
        let daemon = try Child("postcopyd", environment.program("postcopyd"), daemonArguments(files) + transport.daemon,
                               stdout: files.summary("daemon"), stderr: files.log("daemon", of: self),
                               environment: logToStderr)
        children.append(daemon)
        try waitForFile("\(directory)/daemon.ready", seconds: 120, "postcopyd to listen", while: daemon)
        var watcher: Child?
        if watch {
            watcher = try Child("postcopyctl watch", environment.program("postcopyctl"),
                                ["watch", "--socket", "\(directory)/control.sock"],
                                stdout: files.watch, stderr: files.log("watch", of: self))
            children.append(watcher!)
        }
        let guest = try Child("postcopy-guest", environment.program("postcopy-guest"), guestArguments(files),
                              stdout: files.summary("guest"), stderr: files.log("guest", of: self),
                              environment: logToStderr)
        children.append(guest)

        let endpoint = try String(contentsOfFile: "\(directory)/daemon.ready", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        try beforePush?()
        onStep?(.migrate)
        let pushStarted = Date()
        let push = try Child("postcopy-push", environment.program("postcopy-push"), pushArguments + ["--to", endpoint],
                             stdout: files.summary("push"), stderr: files.log("push", of: self),
                             environment: logToStderr)
        children.append(push)
        try push.succeed(seconds: pushSeconds, watching: children)
        try daemon.succeed(seconds: 120, watching: children)
        try guest.succeed(seconds: 300, watching: children)
        try watcher?.succeed(seconds: 30, watching: children)
        let wall = Date().timeIntervalSince(started)
        let migrationWall = Date().timeIntervalSince(pushStarted)

        let decoder = JSONDecoder()
        func decode<T: Decodable>(_ type: T.Type, _ child: Child) throws -> T {
            guard let line = child.output.split(separator: "\n").last else {
                throw BenchmarkError("\(child.name) printed no summary (\(child.stdoutPath))")
            }
            return try decoder.decode(type, from: Data(line.utf8))
        }
        let guestSummary = try decode(GuestSummary.self, guest)
        guard guestSummary.verified else {
            throw BenchmarkError("\(name): the guest's image does not match the source's digest")
        }
        var traceResult: PostcopyTrace?
        if trace {
            let text = try String(contentsOfFile: "\(directory)/trace.csv", encoding: .utf8)
            guard let parsed = PostcopyTrace(csv: text) else { throw BenchmarkError("unreadable trace \(directory)/trace.csv") }
            traceResult = parsed
        }
        let touches = touchLog ? try readTouches("\(directory)/touches.csv") : []
        return MigrationResult(daemon: try decode(DestinationSummary.self, daemon), agent: try decode(AgentSummary.self, push),
                               guest: guestSummary, trace: traceResult, touches: touches, wallSeconds: wall,
                               migrationWallSeconds: migrationWall)
    }

    /// postcopyd serve's options, but for the transport's.
    private func daemonArguments(_ files: MigrationFiles) -> [String] {
        let directory = files.directory
        var arguments = ["serve", "--instance", name, "--listen", "127.0.0.1:0",
                         "--vmm-socket", "\(directory)/vmm.sock", "--control-socket", "\(directory)/control.sock",
                         "--memory", memory.rawValue, "--size", "\(size)",
                         "--ready-file", "\(directory)/daemon.ready", "--json"]
        if trace { arguments += ["--trace", "\(directory)/trace.csv"] }
        if let backgroundScheduling { arguments += ["--background-scheduling", backgroundScheduling] }
        return arguments
    }

    /// postcopy-guest vmm's options.
    private func guestArguments(_ files: MigrationFiles) -> [String] {
        var arguments = ["vmm", "--socket", "\(files.directory)/vmm.sock", "--threads", "\(guestThreads)",
                         "--touch", "\(touch)", "--json"]
        if !scribble { arguments.append("--no-scribble") }
        if touchLog { arguments += ["--touch-log", "\(files.directory)/touches.csv"] }
        return arguments + guestOptions
    }

    /// postcopy-push's options, but for the transport's and --to; writes
    /// the dirty bitmap of an `.image` source.
    private func pushArguments(_ files: MigrationFiles, pausing sourcePID: Int32, dirtyLogSocket: String) throws -> [String] {
        var arguments = ["--ram", files.sourceRAM, "--pause-pid", "\(sourcePID)", "--max-rounds", "\(maxRounds)",
                         "--json", "--dirty-log", dirtyLog]
        if !logsToStandardError { arguments.append("--quiet") }
        if dirtyLog != "hash" { arguments += ["--dirty-log-socket", dirtyLogSocket] }
        if case let .image(stalePages) = source {
            let bitmap = "\(files.directory)/dirty.bitmap"
            try writeDirtyBitmap(bitmap, pages: size / 4096, stale: stalePages)
            arguments += ["--dirty-bitmap", bitmap]
        }
        if let postcopyMiBps { arguments += ["--postcopy-bandwidth", "\(postcopyMiBps)"] }
        if let streams { arguments += ["--streams", "\(streams)"] }
        if let scheduling = agentScheduling ?? backgroundScheduling {
            arguments += ["--background-scheduling", scheduling]
        }
        if migrationSecretFile { arguments += ["--migration-secret-file", "\(files.directory)/migration.secret"] }
        return arguments
    }

    /// `stale` of `pages` pages, chosen by a generator seeded with `seed`,
    /// as postcopy-push reads a dirty log: one bit per page, 64-bit
    /// little-endian words.
    private func writeDirtyBitmap(_ path: String, pages: UInt64, stale: UInt64) throws {
        var bitmap = PageBitmap(count: pages)
        var generator = SplitMix64(seed: seed &+ 0xB17)
        let chosen = Array(0..<pages).shuffled(using: &generator).prefix(Int(min(stale, pages)))
        for page in chosen { _ = bitmap.insert(page) }
        try Data(bitmap.littleEndianBytes).write(to: URL(fileURLWithPath: path))
    }

    private func readTouches(_ path: String) throws -> [Touch] {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        var touches: [Touch] = []
        for line in text.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: ",")
            guard fields.count == 4, let thread = Int(fields[0]), let at = Double(fields[1]), let page = UInt64(fields[2]),
                  let stall = Double(fields[3]) else { throw BenchmarkError("unreadable touch log line '\(line)' in \(path)") }
            touches.append(Touch(thread: thread, atMicros: at, page: page, stallMicros: stall))
        }
        return touches
    }
}
