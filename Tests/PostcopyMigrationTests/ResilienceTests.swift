import Foundation
import Glibc
import PostcopyCore
import PostcopyHarness
import PostcopyMigration
import PostcopyOS
import Synchronization
import Testing

/// Postcopy survives what networks and operators do to it: connections
/// reset, closed, or gone silent through a fault-injecting proxy, at random
/// points (at chosen ones, one failure a case, in MatrixTests); the agent
/// killed and restarted. Every run ends with the guest's own verification
/// (its digest of every page against the source's) and its scribble check
/// (no page arrived after the guest wrote it). Each test prints its figures
/// for the closing note.
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct ResilienceTests {
    static let size: UInt64 = 48 << 20

    /// A source whose every non-zero page is rewritten at switchover: all
    /// of RAM is stale, so postcopy is long enough to be broken often.
    static func allStale(seed: UInt64) throws -> (SourceFile, @Sendable () -> Void) {
        let source = try SourceFile(size: size, seed: seed) { $0 % 16 == 5 }
        return (source, { [source] in
            for page in 0..<source.pageCount where page % 16 != 5 { source.write(page, generation: 1) }
        })
    }

    /// A migration through a fault proxy, over `streams` bulk streams, the
    /// background paced so that postcopy lasts a few seconds, and dead peers
    /// found in a second (half a second, with every suite migrating at once
    /// on 2 cores, was too short for a handshake now and then).
    static func throughProxy(_ proxy: ProxySlot, streams: Int = 1) -> Migration {
        var migration = Migration()
        migration.streams = streams
        migration.scribble = true
        migration.deadPeerTimeoutNanos = 1_000_000_000
        migration.postcopyBytesPerSecond = 24 << 20
        migration.route = { endpoint in
            let made = try FaultProxy(to: endpoint)
            proxy.set(made)
            return made.endpoint
        }
        return migration
    }

    static func expectVerified(_ outcome: Migration.Outcome) {
        #expect(outcome.guest.verified, "guest digest \(outcome.guest.actualDigest) vs \(outcome.guest.expectedDigest)")
        #expect(outcome.guest.scribblesLost == 0, "a page arriving late overwrote what the guest wrote")
        #expect(outcome.guest.scribbledPages == size / 4096)
        #expect(outcome.daemon.stalePagesAtSwitchover == outcome.agent.stalePages)
    }

    static func report(_ name: String, _ outcome: Migration.Outcome, injected: [FaultProxy.Fault]) {
        let rejoin = outcome.daemon.rejoinToFirstFaultMs.map { fixed($0, 1) }.joined(separator: " ")
        print("resilience \(name): injected \(injected.count) (\(injected.map(\.rawValue).joined(separator: ","))); "
            + "paused \(outcome.daemon.pauses) times, \(fixed(outcome.daemon.pausedSeconds, 2)) s; agent rejoined \(outcome.agent.rejoins); "
            + "rejoin → first stale fault served (ms): [\(rejoin)]; postcopy \(fixed(outcome.daemon.postcopySeconds, 2)) s; "
            + "duplicates \(outcome.daemon.duplicatePages)")
    }

    /// Resets, clean closes and stalls at random points of postcopy
    /// (after a random number of bytes through the proxy), with one bulk
    /// stream and with three (every rejoin then brings back four
    /// connections).
    @Test(arguments: zip([11, 23, 37, 41] as [UInt64], [1, 1, 1, 3]))
    func randomFailuresDuringPostcopy(seed: UInt64, streams: Int) throws {
        let (source, rewrite) = try Self.allStale(seed: seed)
        let proxy = ProxySlot()
        var migration = Self.throughProxy(proxy, streams: streams)
        migration.duringPostcopy = { _ in
            proxy.current?.startRandomFaults(seed: seed, bytesRange: (256 << 10)...(3 << 20), maxFaults: 8)
        }
        let outcome = try migration.run(source, pause: rewrite)
        let injected = proxy.current?.injectedFaults ?? []
        proxy.current?.stop()
        Self.report("random seed \(seed), \(streams) bulk streams", outcome, injected: injected)
        Self.expectVerified(outcome)
        #expect(injected.count == 8)
        #expect(outcome.daemon.pauses >= 1 && outcome.agent.rejoins >= 1)
    }

    /// `postcopyctl cancel` before switchover ends the migration, and the
    /// agent lets the source run again; during postcopy it is refused.
    @Test func cancelBeforeSwitchoverOnly() throws {
        let directory = try TemporaryDirectory()
        var config = DestinationConfig(listen: SocketEndpoint(host: "127.0.0.1", port: 0),
                                       transport: TestCertificates.daemon,
                                       vmmSocketPath: directory.path + "/vmm.sock", memory: .shmem,
                                       regionSize: 16 << 20, vmmUID: geteuid())
        config.deadPeerTimeoutNanos *= TestTiming.scale
        let daemon = try DestinationDaemon(config: config, logger: testLogger("postcopyd"))
        let daemonRun = try Background("test-daemon") { try daemon.run() }
        let source = try SourceFile(size: 16 << 20, seed: 4) { _ in false }
        let paused = Atomic<Int>(0)
        let resumed = Atomic<Int>(0)
        var agentConfig = AgentConfig(ramPath: source.path, daemon: daemon.endpoint,
                                      transport: TestCertificates.agent(), migrationID: MigrationID(high: 4, low: 4),
                                      control: SourceControl("test", pause: {
                                          paused.add(1, ordering: .relaxed)
                                      }, resume: { resumed.add(1, ordering: .relaxed) }))
        // Precopy goes on until the operator has cancelled.
        agentConfig.policy = PrecopyPolicy(maxRounds: 1000, maxDurationNanos: 60_000_000_000, switchoverPages: 0)
        agentConfig.deadPeerTimeoutNanos *= TestTiming.scale
        let agent = try SourceAgent(config: agentConfig, logger: testLogger("agent"),
                                    progress: ProgressReporter(enabled: false))
        let agentRun = try Background("test-agent") { try agent.run() }
        #expect(daemon.waitForPhase(["precopy"], seconds: 30))
        let answer = try daemon.cancelBeforeSwitchover()
        #expect(answer.contains("the source keeps running the guest"), "\(answer)")
        guard case let .failure(error) = daemonRun.wait("postcopyd") else {
            Issue.record("postcopyd succeeded after a cancel")
            return
        }
        #expect("\(error)".contains("cancelled by an operator"))
        guard case let .failure(agentError) = agentRun.wait("the agent") else {
            Issue.record("the agent succeeded after a cancel")
            return
        }
        #expect("\(agentError)".contains("cancelled"), "\(agentError)")
        #expect(resumed.load(ordering: .relaxed) == paused.load(ordering: .relaxed))
    }
}

/// The proxy a migration's route made, for the hooks that break it.
final class ProxySlot: Sendable {
    private let proxy = Locked<FaultProxy?>(nil)
    func set(_ made: FaultProxy) { proxy.withLock { $0 = made } }
    var current: FaultProxy? { proxy.withLock { $0 } }
}

extension ResilienceTests {
    /// Killed with SIGKILL mid-postcopy, the agent leaves nothing behind
    /// but the paused source; a new `postcopy-push --resume` for the same
    /// migration and RAM file finishes it; with one bulk stream and with
    /// three.
    @Test(arguments: [1, 3])
    func theAgentKilledAndRestarted(streams: Int) throws {
        let source = try SourceFile(size: Self.size, seed: 13) { _ in false }
        let directory = try TemporaryDirectory()
        var config = DestinationConfig(listen: SocketEndpoint(host: "127.0.0.1", port: 0),
                                       transport: TestCertificates.daemon,
                                       vmmSocketPath: directory.path + "/vmm.sock", memory: .shmem,
                                       regionSize: Self.size, vmmUID: geteuid())
        config.deadPeerTimeoutNanos = 1_000_000_000 * TestTiming.scale
        let daemon = try DestinationDaemon(config: config, logger: testLogger("postcopyd"))
        let daemonRun = try Background("test-daemon") { try daemon.run() }
        var guestConfig = GuestConfig(socketPath: config.vmmSocketPath)
        guestConfig.scribble = true
        // Most pages come in the background, paced: postcopy lasts seconds.
        guestConfig.touchShare = 0.05
        let guest = GuestVMM(config: guestConfig, logger: testLogger("guest"))
        let guestRun = try Background("test-guest") { try guest.run() }
        let id = "00000000000000130000000000000013"
        let common = ["--ram", source.path, "--to", "\(daemon.endpoint)", "--migration-id", id, "--quiet",
                      "--postcopy-bandwidth", "8", "--dead-peer-timeout", TestTiming.seconds(1), "--reconnect-timeout", "30"]
            + TestCertificates.agentFlags + ["--migration-secret-file", directory.path + "/secret", "--streams", "\(streams)"]
        // The first agent's "pause" rewrites 40 MiB of the source, as a
        // guest would have since precopy sent it: those pages are stale.
        let rewrite = "dd if=/dev/urandom of=\(source.path) bs=1M count=40 conv=notrunc status=none"
        let first = try Program.spawn("postcopy-push", common + ["--pause-cmd", rewrite, "--max-rounds", "1"],
                                      stderr: directory.path + "/push1.err")
        defer { if first.isRunning { kill(first.processIdentifier, SIGKILL) } }
        try #require(daemon.waitForPhase(["postcopy", "failed"], seconds: 60))
        // Let it serve a while, then kill it where it stands.
        usleep(300_000)
        let leftBefore = daemon.status().stalePagesLeft
        kill(first.processIdentifier, SIGKILL)
        first.waitUntilExit()
        try #require(daemon.waitForPhase(["paused", "failed"], seconds: 10), "postcopy ended before the kill")
        let killedAt = monotonicNanoseconds()
        let second = try Program.spawn("postcopy-push", common + ["--resume"], stderr: directory.path + "/push2.err")
        defer { if second.isRunning { kill(second.processIdentifier, SIGKILL) } }
        let summary = daemonRun.wait("postcopyd")
        second.waitUntilExit()
        let guestResult = guestRun.wait("the guest")
        let log = readTextFile(directory.path + "/push2.err") ?? ""
        let outcome = try summary.get()
        #expect(second.terminationStatus == 0, "the restarted agent failed:\n\(log)")
        print("resilience agent kill -9 (\(streams) bulk streams): \(leftBefore) of \(outcome.stalePagesAtSwitchover) pages stale when killed; "
            + "complete \(fixed(Double(monotonicNanoseconds() - killedAt) / 1e9, 2)) s after; paused \(outcome.pauses) times; "
            + "rejoin → first stale fault served (ms): \(outcome.rejoinToFirstFaultMs.map { fixed($0, 1) })")
        #expect(leftBefore > 0 && leftBefore < outcome.stalePagesAtSwitchover, "killed outside postcopy's middle")
        #expect(outcome.pauses >= 1)
        let guestSummary = try guestResult.get()
        #expect(guestSummary.verified, "guest digest \(guestSummary.actualDigest) vs \(guestSummary.expectedDigest)")
        #expect(guestSummary.scribblesLost == 0)
    }
}

/// The package's programs, as built beside the test bundle.
enum Program {
    static func path(_ name: String) -> String {
        var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        while directory.lastPathComponent.hasSuffix(".xctest") || directory.lastPathComponent == "Contents" {
            directory.deleteLastPathComponent()
        }
        return directory.appendingPathComponent(name).path
    }

    static func spawn(_ name: String, _ arguments: [String], stderr: String) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path(name))
        process.arguments = arguments
        _ = FileManager.default.createFile(atPath: stderr, contents: nil)
        process.standardError = FileHandle(forWritingAtPath: stderr)
        try process.run()
        return process
    }
}
