import Foundation
import Glibc
import PostcopyCore

/// One whole migration over loopback, each program a process as an operator
/// runs them: the source workload, postcopyd, the reference guest, and
/// postcopy-push.
public struct MigrationScenario: Sendable {
    public enum Source: Sendable {
        /// The source keeps rewriting this share of its pages (a hot set)
        /// until paused: stale pages are what precopy could not keep up with.
        case workload(dirty: Double)
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
    /// its RAM and offers the log) or "hash".
    public var dirtyLog = "uffd-wp"
    /// postcopy-push --streams (nil: its default, the CPUs online).
    public var streams: Int?
    /// Mutual TLS 1.3 between postcopy-push and postcopyd, with the test
    /// certificates of this bench run (`TestCertificates`); false: both run
    /// with --insecure-plaintext, as every benchmark but precopy's does.
    public var tls = false
    /// Runs once the source is filled, postcopyd listens and the guest is
    /// started, just before postcopy-push: `postcopy-bench load` makes its
    /// N migrations start together here. A throw ends this migration.
    public var beforePush: (@Sendable () throws -> Void)?

    public init(name: String, size: UInt64, source: Source) {
        self.name = name
        self.size = size
        self.source = source
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
    /// Runs the migration; throws with the failing program's log on error.
    public func run(in environment: BenchEnvironment) throws -> MigrationResult {
        let directory = "\(environment.workDirectory)/\(name)"
        try? FileManager.default.removeItem(atPath: directory)
        try makeDirectory(directory)
        let sourceRAM = "/dev/shm/postcopy-bench-\(getpid())-\(name)"
        var children: [Child] = []
        defer {
            for child in children { child.kill() }
            unlink(sourceRAM)
        }
        let started = Date()

        let dirtyShare: Double
        switch source {
        case let .workload(dirty): dirtyShare = dirty
        case .image: dirtyShare = 0
        }
        let dirtyLogSocket = "\(directory)/dirty-log.sock"
        let workload = try Child("source", environment.program("postcopy-guest"), [
            "source", "--ram", sourceRAM, "--size", "\(size)", "--dirty", "\(dirtyShare)", "--zero", "\(zeroShare)",
            "--seed", "\(seed)", "--ready-file", "\(directory)/source.ready",
        ] + (dirtyLog == "hash" ? [] : ["--dirty-log-socket", dirtyLogSocket]), stdout: "\(directory)/source.out", stderr: "\(directory)/source.log")
        children.append(workload)
        try waitForFile("\(directory)/source.ready", seconds: 300, "the source RAM to be filled", while: workload)

        // Plaintext, explicitly, unless `tls`: these figures are postcopyd's
        // own, comparable with the raw-TCP baselines and across runs; the
        // precopy benchmark measures TLS against a TLS baseline.
        let transport: (daemon: [String], agent: [String])
        if tls {
            let certificates = try TestCertificates.existing(in: environment)
            transport = (certificates.daemonArguments, certificates.agentArguments)
        } else {
            transport = (["--insecure-plaintext"], ["--insecure-plaintext"])
        }
        var pushArguments = ["--ram", sourceRAM, "--pause-pid", "\(workload.pid)", "--max-rounds", "\(maxRounds)",
                             "--quiet", "--json", "--dirty-log", dirtyLog] + transport.agent
        if dirtyLog != "hash" { pushArguments += ["--dirty-log-socket", dirtyLogSocket] }
        if case let .image(stalePages) = source {
            let bitmap = "\(directory)/dirty.bitmap"
            try writeDirtyBitmap(bitmap, pages: size / 4096, stale: stalePages)
            pushArguments += ["--dirty-bitmap", bitmap]
        }
        if let postcopyMiBps { pushArguments += ["--postcopy-bandwidth", "\(postcopyMiBps)"] }
        if let streams { pushArguments += ["--streams", "\(streams)"] }
        if let scheduling = agentScheduling ?? backgroundScheduling {
            pushArguments += ["--background-scheduling", scheduling]
        }

        var daemonArguments = ["serve", "--instance", name, "--listen", "127.0.0.1:0",
                               "--vmm-socket", "\(directory)/vmm.sock", "--control-socket", "\(directory)/control.sock",
                               "--memory", memory.rawValue, "--size", "\(size)",
                               "--ready-file", "\(directory)/daemon.ready", "--json"] + transport.daemon
        if trace { daemonArguments += ["--trace", "\(directory)/trace.csv"] }
        if let backgroundScheduling { daemonArguments += ["--background-scheduling", backgroundScheduling] }
        let logToStderr = ["POSTCOPY_LOG": "stderr"]
        let daemon = try Child("postcopyd", environment.program("postcopyd"), daemonArguments,
                               stdout: "\(directory)/daemon.json", stderr: "\(directory)/daemon.log",
                               environment: logToStderr)
        children.append(daemon)
        try waitForFile("\(directory)/daemon.ready", seconds: 120, "postcopyd to listen", while: daemon)

        var guestArguments = ["vmm", "--socket", "\(directory)/vmm.sock", "--threads", "\(guestThreads)",
                              "--touch", "\(touch)", "--no-scribble", "--json"]
        if touchLog { guestArguments += ["--touch-log", "\(directory)/touches.csv"] }
        let guest = try Child("postcopy-guest", environment.program("postcopy-guest"), guestArguments,
                              stdout: "\(directory)/guest.json", stderr: "\(directory)/guest.log",
                              environment: logToStderr)
        children.append(guest)

        let endpoint = try String(contentsOfFile: "\(directory)/daemon.ready", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        try beforePush?()
        let pushStarted = Date()
        let push = try Child("postcopy-push", environment.program("postcopy-push"), pushArguments + ["--to", endpoint],
                             stdout: "\(directory)/push.json", stderr: "\(directory)/push.log",
                             environment: logToStderr)
        children.append(push)
        try push.succeed(seconds: 900)
        try daemon.succeed(seconds: 120)
        try guest.succeed(seconds: 300)
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
