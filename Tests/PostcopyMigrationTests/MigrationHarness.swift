import Glibc
import Logging
import PostcopyCore
import PostcopyHarness
import PostcopyMigration
import PostcopyOS
import Synchronization
import Testing

/// Runs something on a thread of its own and keeps its result, so that a
/// test can wait for it with a deadline instead of hanging.
final class Background<T: Sendable>: Sendable {
    private final class Slot: Sendable {
        let result = Locked<Result<T, any Error>?>(nil)
        let done = Latch()
    }

    private let slot = Slot()
    private let thread: OSThread

    init(_ name: String, _ body: @escaping @Sendable () throws -> T) throws {
        let slot = self.slot
        thread = try OSThread.start(name: name) {
            let outcome = Result { try body() }
            slot.result.withLock { $0 = outcome }
            slot.done.open()
        }
    }

    /// The result, waiting up to `seconds`; a run that does not end in time
    /// means a hang, which stops the whole test process with a message
    /// rather than stalling CI.
    func wait(seconds: UInt64 = 180, _ what: String) -> Result<T, any Error> {
        guard slot.done.wait(timeoutNanos: seconds * TestTiming.scale * 1_000_000_000) else {
            writeStandardError("FATAL: \(what) did not finish within \(seconds) s\n")
            abort()
        }
        thread.join()
        return slot.result.withLock { $0! }
    }
}

extension Background {
    /// Why `what` failed, waiting for it; records an issue if it did not.
    func failure(_ what: String) -> String {
        switch wait(what) {
        case .success: Issue.record("\(what) succeeded"); return ""
        case let .failure(error): return "\(error)"
        }
    }
}

/// How much longer the timing-sensitive tests allow: POSTCOPY_TEST_TIME_SCALE
/// (default 1), which `make test-sanitizers` sets, as code under a sanitizer
/// runs several times slower. It stretches dead-peer timeouts and the waits
/// that depend on them, never a check of what the code does.
enum TestTiming {
    static let scale: UInt64 = {
        guard let text = getenv("POSTCOPY_TEST_TIME_SCALE").map({ String(cString: $0) }),
              let value = UInt64(text), value >= 1 else { return 1 }
        return value
    }()

    /// `seconds` stretched, as a command-line argument.
    static func seconds(_ seconds: Double) -> String { "\(seconds * Double(scale))" }
}

/// How much smaller the big whole migrations run: POSTCOPY_TEST_SIZE_SCALE
/// (default 1, a power of two up to 64), which `make test-sanitizers` sets
/// for ThreadSanitizer, under which 256 MiB migrations take many minutes. It
/// divides guest RAM, and the background pacing with it so that postcopy
/// lasts as long; every check stays as it is.
enum TestSize {
    static let divisor: UInt64 = {
        guard let text = getenv("POSTCOPY_TEST_SIZE_SCALE").map({ String(cString: $0) }),
              let value = UInt64(text), value >= 1, value <= 64, value & (value - 1) == 0 else { return 1 }
        return value
    }()

    /// `bytes` (a multiple of 128 MiB, or of 2 MiB × the divisor) divided.
    static func scaled(_ bytes: UInt64) -> UInt64 {
        precondition(bytes % (divisor * (2 << 20)) == 0, "\(bytes) bytes cannot be divided by \(divisor) into 2 MiB pages")
        return bytes / divisor
    }
}

func testLogger(_ label: String) -> Logger {
    var logger = Logger(label: label) { StreamLogHandler.standardError(label: $0) }
    logger.logLevel = .warning
    return logger
}

/// One whole migration in this process, over loopback: postcopyd, the
/// reference guest as its VMM, and the agent reading `source`. `pause` runs
/// at switchover in place of stopping a source process: a test writes the
/// pages it wants stale there.
struct Migration {
    var memory: MemoryKind = .shmem
    var transport = Transport.tls
    var rounds = 1
    /// The agent's bulk streams (`--streams`).
    var streams = 1
    var guestThreads = 4
    var scribble = false
    /// Share of the pages the guest reads after resume.
    var touchShare = 1.0
    /// Record the daemon's trace and the guest's touch log.
    var traced = false
    var postcopyBytesPerSecond: UInt64?
    /// The agent's precopy limit (`--max-bandwidth`).
    var precopyBytesPerSecond: UInt64?
    /// `--max-precopy-seconds`, when set.
    var precopySeconds: Double?
    /// Both sides' dead-peer timeout (nil: the default), stretched by
    /// POSTCOPY_TEST_TIME_SCALE.
    var deadPeerTimeoutNanos: UInt64?
    /// Where the agent connects, given the daemon's endpoint: a test puts a
    /// fault-injecting proxy between them.
    var route: (@Sendable (SocketEndpoint) throws -> SocketEndpoint)?
    /// Runs on a thread of its own once postcopy has begun.
    var duringPostcopy: (@Sendable (DestinationDaemon) -> Void)?
    /// Where the daemon logs (default: standard error, warnings and up).
    var daemonLogger: Logger?
    /// The agent's hand-over (`--resumed-cmd`), given the daemon.
    var handOver: (@Sendable (DestinationDaemon) throws -> Void)?
    /// Report the agent's failure in the outcome instead of throwing it.
    var agentMayFail = false
    /// The agent's dirty log. Unless it is `.hash`, this process registers
    /// its mapping of the source for uffd-wp, as a source VMM does, and
    /// offers it on a dirty-log socket (`offer` replaces what it says).
    var dirtyLog = DirtyLogChoice.uffdWP
    /// Features the source's registration acts as if the kernel lacked.
    var pretendAbsent: UffdFeatures = []
    /// What the source VMM tells the agent, when not the truth.
    var offer: SourceTrackingOffer?
    /// Check the uffd-wp log against a hash of every page at every scan.
    var verifyDirtyLog = true
    /// Give the agent no dirty-log socket at all.
    var skipDirtyLogSocket = false

    /// How the agent's two connections cross loopback.
    enum Transport: CaseIterable, Sendable {
        /// Mutual TLS 1.3 with the test certificates, as in production.
        case tls
        /// `--insecure-plaintext` on both ends.
        case plaintext

        var daemon: TransportSecurity { self == .tls ? TestCertificates.daemon : .plaintext }
        var agent: TransportSecurity { self == .tls ? TestCertificates.agent() : .plaintext }
    }

    struct Outcome {
        let daemon: DestinationSummary
        let agent: AgentSummary
        /// Why the agent failed, when `agentMayFail` (its summary is then empty).
        var agentFailure: (any Error)?
        let guest: GuestSummary
        /// Whether the destination's RAM equals the source's, byte for byte;
        /// with `scribble`, but for each page's last word, where the guest
        /// wrote its marker (its digest, taken before, and its scribble
        /// check cover that word).
        let identical: Bool
        /// 4 KiB pages of the source's file that exist, once the migration
        /// is over and before the comparison reads every one of them.
        let sourcePagesAllocated: UInt64
        /// The daemon's trace file and the guest's touch log, when traced.
        var trace: String?
        var touchLog: String?
    }

    func run(_ source: SourceFile, pause: @escaping @Sendable () -> Void = {}) throws -> Outcome {
        let directory = try TemporaryDirectory()
        var config = DestinationConfig(listen: SocketEndpoint(host: "127.0.0.1", port: 0),
                                       transport: transport.daemon,
                                       vmmSocketPath: directory.path + "/vmm.sock", memory: memory,
                                       regionSize: source.size, vmmUID: geteuid())
        if traced { config.tracePath = directory.path + "/trace.csv" }
        config.deadPeerTimeoutNanos = (deadPeerTimeoutNanos ?? config.deadPeerTimeoutNanos) * TestTiming.scale
        let daemon = try DestinationDaemon(config: config, logger: daemonLogger ?? testLogger("postcopyd"))
        let daemonRun = try Background("test-daemon") { try daemon.run() }
        let watcher = try duringPostcopy.map { hook in
            try Background("test-postcopy-hook") {
                guard daemon.waitForPhase(["postcopy", "paused", "complete", "failed"]) else { return }
                hook(daemon)
            }
        }
        var guestConfig = GuestConfig(socketPath: config.vmmSocketPath)
        guestConfig.threads = guestThreads
        guestConfig.scribble = scribble
        guestConfig.touchShare = touchShare
        if traced { guestConfig.touchLogPath = directory.path + "/touches.csv" }
        let guest = GuestVMM(config: guestConfig, logger: testLogger("guest"))
        let guestRun = try Background("test-guest") { try guest.run() }
        var agentConfig = AgentConfig(ramPath: source.path, daemon: try route?(daemon.endpoint) ?? daemon.endpoint,
                                      transport: transport.agent, migrationID: MigrationID(high: 1, low: UInt64(getpid())),
                                      control: SourceControl("test", pause: pause, resume: {},
                                                             handOver: handOver.map { hook in
                                                                 (description: "test", run: { try hook(daemon) })
                                                             }))
        agentConfig.policy = PrecopyPolicy(maxRounds: rounds)
        if let precopySeconds { agentConfig.policy.maxDurationNanos = UInt64(precopySeconds * 1e9) }
        agentConfig.streams = streams
        agentConfig.dirtyLog = dirtyLog
        agentConfig.verifyDirtyLog = verifyDirtyLog
        var tracking: (WriteTracking?, SourceTrackingServer)?
        if dirtyLog != .hash {
            let (registration, truth) = source.trackWrites(pretendingAbsent: pretendAbsent)
            let socket = directory.path + "/dirty-log.sock"
            tracking = (registration, try SourceTrackingServer(path: socket, offer: offer ?? truth, logger: testLogger("source")))
            if !skipDirtyLogSocket { agentConfig.dirtyLogSocket = socket }
        }
        defer { withExtendedLifetime(tracking) {} }
        agentConfig.postcopyBytesPerSecond = postcopyBytesPerSecond
        agentConfig.precopyBytesPerSecond = precopyBytesPerSecond
        agentConfig.deadPeerTimeoutNanos = (deadPeerTimeoutNanos ?? agentConfig.deadPeerTimeoutNanos) * TestTiming.scale
        agentConfig.reconnectInitialDelayNanos = 20_000_000
        agentConfig.reconnectMaxDelayNanos = 200_000_000
        agentConfig.reconnectTimeoutNanos = 60_000_000_000 * TestTiming.scale
        let agent = try SourceAgent(config: agentConfig, logger: testLogger("agent"),
                                    progress: ProgressReporter(enabled: false))
        let agentResult = try Background("test-agent") { try agent.run() }.wait("the agent")
        if case let .failure(error) = agentResult, !agentMayFail {
            // An agent that failed before switchover leaves postcopyd waiting
            // for another: end it, and say why the agent failed rather than
            // stop the test process on a hang.
            _ = try? daemon.cancelBeforeSwitchover()
            _ = daemonRun.wait("postcopyd")
            _ = guestRun.wait("the guest")
            _ = watcher?.wait("the postcopy hook")
            throw error
        }
        let daemonSummary = try daemonRun.wait("postcopyd").get()
        let guestSummary = try guestRun.wait("the guest").get()
        _ = watcher?.wait("the postcopy hook")
        var agentSummary = AgentSummary()
        var agentFailure: (any Error)?
        switch agentResult {
        case let .success(summary): agentSummary = summary
        case let .failure(error): agentFailure = error
        }
        let sourcePagesAllocated = source.allocatedPages
        // A scribbling guest wrote its marker into the last word of each page.
        let compared = scribble ? 4096 - 8 : 4096
        let identical = (0..<source.pageCount).allSatisfy { page in
            memcmp(source.base + Int(page * 4096), daemon.memory.alias.pointer(toSmallPage: page), compared) == 0
        }
        var outcome = Outcome(daemon: daemonSummary, agent: agentSummary, agentFailure: agentFailure,
                              guest: guestSummary, identical: identical, sourcePagesAllocated: sourcePagesAllocated)
        if traced {
            outcome.trace = readTextFile(directory.path + "/trace.csv")
            outcome.touchLog = readTextFile(directory.path + "/touches.csv")
        }
        return outcome
    }
}

extension DestinationDaemon {
    /// Waits (up to `seconds`, stretched by POSTCOPY_TEST_TIME_SCALE) until
    /// the daemon's phase is one of `phases`.
    func waitForPhase(_ phases: Set<String>, seconds: UInt64 = 120) -> Bool {
        let deadline = monotonicNanoseconds() + seconds * TestTiming.scale * 1_000_000_000
        while monotonicNanoseconds() < deadline {
            if phases.contains(status().phase) { return true }
            usleep(1_000)
        }
        return false
    }
}

/// A directory under /tmp, removed with what is in it.
final class TemporaryDirectory {
    let path: String

    init() throws {
        var template = Array("/tmp/postcopy-test.XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw TestFailure("mkdtemp: errno \(errno)")
        }
        path = String(cString: made)
    }

    deinit {
        if let directory = opendir(path) {
            while let entry = readdir(directory) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name != "." && name != ".." { unlink(path + "/" + name) }
            }
            closedir(directory)
        }
        rmdir(path)
    }
}
