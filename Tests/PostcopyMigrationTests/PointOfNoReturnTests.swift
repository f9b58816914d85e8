import Glibc
import Logging
import PostcopyCore
@testable import PostcopyMigration
import PostcopyOS
import Synchronization
import Testing

/// Issue 18, items 3 and 4: the VMM acknowledges VMM_RESUME before the
/// source hears RESUMED, a takeover goes on only if the VMM holds the
/// guest, and a hand-over that starts the guest keeps the source resumable
/// until HANDED_OVER — DISCARD before it ends the migration discarded.
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct PointOfNoReturnTests {
    typealias Daemon = FailSafeDaemonTests.Daemon
    typealias HandVMM = FailSafeDaemonTests.HandVMM
    static let pages = FailSafeDaemonTests.size / 4096
    static let digest = ImageDigest(bytes: (0..<32).map { UInt8($0 * 3 + 1) })!

    /// Switches over with `stale` pages stale, asking for a hand-over or
    /// not; returns the agent's streams once the VMM has VMM_RESUME (not yet
    /// acknowledged).
    static func switchOver(_ daemon: Daemon, _ vmm: HandVMM, stale: PageBitmap,
                           handOver: Bool) throws -> (MessageStream, MessageStream) {
        let (bulk, urgent) = try FailureTests.connectAgent(to: daemon.daemon, pages: pages)
        try bulk.send(.dirtyBitmap(totalBits: stale.count, firstWord: 0, words: stale.words))
        try bulk.send(.switchover(stalePages: stale.popCount, sourcePausedAtNanos: realtimeNanoseconds(),
                                  handOver: handOver))
        guard case .resume? = try vmm.next() else { throw TestFailure("no VMM_RESUME") }
        return (bulk, urgent)
    }

    static func stale(_ indices: [UInt64]) -> PageBitmap {
        var bitmap = PageBitmap(count: pages)
        for index in indices { _ = bitmap.insert(index) }
        return bitmap
    }

    /// RESUMED goes to the source only once the VMM said VMM_RESUMED:
    /// before, the guest may not be running anywhere yet.
    @Test func resumedWaitsForTheVMMsAcknowledgement() throws {
        let daemon = try Daemon()
        let vmm = try HandVMM(daemon)
        let (bulk, urgent) = try Self.switchOver(daemon, vmm, stale: Self.stale([1]), handOver: false)
        try bulk.connection.setReceiveTimeout(500_000_000)
        #expect(throws: (any Error).self, "RESUMED before VMM_RESUMED") { _ = try FailureTests.next(bulk) }
        try vmm.channel.send(.resumed)
        try bulk.connection.setReceiveTimeout(10_000_000_000)
        guard case .resumed? = try FailureTests.next(bulk) else { throw TestFailure("no RESUMED after VMM_RESUMED") }
        #expect(daemon.daemon.status().phase == "postcopy")
        daemon.daemon.cancel("test over")
        withExtendedLifetime(urgent) {}
        _ = daemon.failure()
    }

    /// With a hand-over, every page and the digest are not enough: the
    /// daemon completes only once HANDED_OVER says the guest runs here.
    @Test func completionWaitsForHandedOver() throws {
        let daemon = try Daemon()
        let vmm = try HandVMM(daemon)
        let (bulk, urgent) = try Self.switchOver(daemon, vmm, stale: Self.stale([3, 4]), handOver: true)
        try vmm.channel.send(.resumed)
        guard case .resumed? = try FailureTests.next(bulk) else { throw TestFailure("no RESUMED") }
        #expect(daemon.daemon.status().phase == "handover")
        try bulk.send(.zeroPages(firstPage: 3, count: 2))
        try bulk.send(.imageDigest(Self.digest))
        #expect(FailSafeDaemonTests.waitUntil { daemon.daemon.status().stalePagesLeft == 0 })
        // Nothing completes while the hand-over is pending.
        try vmm.channel.connection.setReceiveTimeout(500_000_000)
        #expect(throws: (any Error).self, "VMM_COMPLETE before HANDED_OVER") { _ = try vmm.next() }
        #expect(daemon.daemon.status().phase == "handover")
        try bulk.send(.handedOver)
        try vmm.channel.connection.setReceiveTimeout(10_000_000_000)
        guard case .complete(Self.digest)? = try vmm.next() else { throw TestFailure("no VMM_COMPLETE after HANDED_OVER") }
        try vmm.channel.send(.complete(imageDigest: nil))
        guard case .complete? = try FailureTests.next(bulk) else { throw TestFailure("no COMPLETE") }
        bulk.shutdown()
        urgent.shutdown()
        guard case .success = daemon.run.wait("postcopyd") else {
            Issue.record("the migration did not complete: \(daemon.failure())")
            return
        }
        let passed = daemon.log.messages(.pointOfNoReturn)
        #expect(passed.count == 1 && passed.first?.contains("the guest runs here") == true, "\(passed)")
    }

    /// DISCARD before HANDED_OVER: the VMM is told (ERROR discarded) and
    /// keeps the range, the agent too; nothing stays in the fd store for a
    /// takeover; the journal says discarded, not "guest left waiting".
    @Test func discardBeforeTheHandOverEndsTheMigrationDiscarded() throws {
        let daemon = try Daemon()
        let vmm = try HandVMM(daemon)
        let (bulk, urgent) = try Self.switchOver(daemon, vmm, stale: Self.stale([5, 6, 7]), handOver: true)
        try vmm.channel.send(.resumed)
        guard case .resumed? = try FailureTests.next(bulk) else { throw TestFailure("no RESUMED") }
        #expect(daemon.store.kept.withLock { $0 } == Set(StoredDescriptor.all))
        try bulk.send(.discard(reason: "QMP: the source QEMU's migration is 'failed'"))
        guard case let .error(code, text)? = try vmm.next() else { throw TestFailure("no ERROR to the VMM") }
        #expect(code == .discarded && text.contains("this copy is discarded"), "\(code): \(text)")
        var toAgent: [Message] = []
        while let message = try? FailureTests.next(bulk) { toAgent.append(message) }
        #expect(toAgent.contains { if case .error(.discarded, _) = $0 { true } else { false } }, "\(toAgent)")
        withExtendedLifetime(urgent) {}
        #expect(daemon.failure().contains("the source runs the guest again"))
        #expect(daemon.store.kept.withLock { $0 }.isEmpty, "the fd store kept a discarded migration")
        #expect(daemon.log.messages(.migrationDiscarded).count == 1)
        #expect(daemon.log.messages(.guestLeftWaiting).isEmpty)
        #expect(daemon.daemon.status().phase == "discarded")
        #expect(daemon.daemon.status().statusLine.hasPrefix("discarded: the guest never ran here"))
    }

    /// An agent that loses its connections during the hand-over rejoins
    /// into it: the resync comes, the phase is `handover` again, and
    /// HANDED_OVER on the new connection completes the migration.
    @Test func anAgentRejoinsDuringTheHandOver() throws {
        let daemon = try Daemon()
        let vmm = try HandVMM(daemon)
        let (bulk, urgent) = try Self.switchOver(daemon, vmm, stale: Self.stale([12]), handOver: true)
        try vmm.channel.send(.resumed)
        guard case .resumed? = try FailureTests.next(bulk) else { throw TestFailure("no RESUMED") }
        bulk.shutdown()
        urgent.shutdown()
        #expect(FailSafeDaemonTests.waitUntil { daemon.daemon.status().phase == "paused" })
        func open(_ role: StreamRole) throws -> MessageStream {
            let stream = try FailureTests.dial(daemon.daemon)
            try stream.send(.hello(migrationID: MigrationID(high: 7, low: 7), role: role, sourcePageSize: .small,
                                   regionSize: FailSafeDaemonTests.size, secret: .test, resume: true))
            guard case .welcome? = try FailureTests.next(stream) else { throw TestFailure("no WELCOME on \(role)") }
            return stream
        }
        let newBulk = try open(.bulk)
        let newUrgent = try open(.urgent)
        // A daemon that never resyncs fails the test instead of hanging it.
        try newBulk.connection.setReceiveTimeout(10_000_000_000)
        var resync: [Message] = []
        while let message = try FailureTests.next(newBulk) {
            resync.append(message)
            if case .resync = message { break }
        }
        #expect(resync.last == .resync(stalePages: 1), "\(resync)")
        #expect(daemon.daemon.status().phase == "handover")
        try newBulk.send(.zeroPages(firstPage: 12, count: 1))
        try newBulk.send(.imageDigest(Self.digest))
        try newBulk.send(.handedOver)
        guard case .complete? = try vmm.next() else { throw TestFailure("no VMM_COMPLETE") }
        try vmm.channel.send(.complete(imageDigest: nil))
        guard case .complete? = try FailureTests.next(newBulk) else { throw TestFailure("no COMPLETE") }
        newBulk.shutdown()
        newUrgent.shutdown()
        guard case .success = daemon.run.wait("postcopyd") else {
            Issue.record("the migration did not complete: \(daemon.failure())")
            return
        }
    }

    /// A VMM that goes away while its hand-over is pending never ran the
    /// guest (QEMU exits when it cannot load the device state): the copy
    /// here is discarded at once, and the agent told, rather than kept
    /// waiting for a VMM that cannot come back.
    @Test func theVMMLeavingBeforeTheHandOverDiscards() throws {
        let daemon = try Daemon()
        let vmm = try HandVMM(daemon)
        let (bulk, urgent) = try Self.switchOver(daemon, vmm, stale: Self.stale([11]), handOver: true)
        try vmm.channel.send(.resumed)
        guard case .resumed? = try FailureTests.next(bulk) else { throw TestFailure("no RESUMED") }
        vmm.channel.shutdown()
        var toAgent: [Message] = []
        while let message = try? FailureTests.next(bulk) { toAgent.append(message) }
        #expect(toAgent.contains { if case .error(.discarded, _) = $0 { true } else { false } }, "\(toAgent)")
        withExtendedLifetime(urgent) {}
        #expect(daemon.failure().contains("before the hand-over started the guest"))
        #expect(daemon.store.kept.withLock { $0 }.isEmpty)
        #expect(daemon.log.messages(.migrationDiscarded).count == 1)
        #expect(daemon.log.messages(.guestLeftWaiting).isEmpty)
    }

    /// Past the point of no return a DISCARD is refused: the guest may run
    /// here, so only the connection that sent it is given up.
    @Test func discardAfterThePointOfNoReturnIsRefused() throws {
        let daemon = try Daemon()
        let vmm = try HandVMM(daemon)
        let (bulk, urgent) = try Self.switchOver(daemon, vmm, stale: Self.stale([8]), handOver: false)
        try vmm.channel.send(.resumed)
        guard case .resumed? = try FailureTests.next(bulk) else { throw TestFailure("no RESUMED") }
        try bulk.send(.discard(reason: "too late"))
        #expect(FailSafeDaemonTests.waitUntil { daemon.daemon.status().phase == "paused" })
        #expect(daemon.daemon.status().failure == nil)
        #expect(daemon.log.messages(.migrationDiscarded).isEmpty)
        daemon.daemon.cancel("test over")
        withExtendedLifetime((bulk, urgent)) {}
        _ = daemon.failure()
    }

    // MARK: window 3: a takeover needs a VMM that holds the guest

    /// An fd store that keeps a copy of each descriptor, as systemd's does.
    final class KeepingStore: DescriptorStore {
        let kept = Locked<[String: Int32]>([:])
        func store(_ descriptor: Int32, name: String) -> Bool {
            let copy = dup(descriptor)
            guard copy >= 0 else { return false }
            kept.withLock { if let old = $0.updateValue(copy, forKey: name) { close(old) } }
            return true
        }
        func remove(name: String) { kept.withLock { if let fd = $0.removeValue(forKey: name) { close(fd) } } }
        /// What a restarted daemon is handed (then its to close).
        func handOver() -> [String: Int32] { kept.withLock { $0.mapValues { dup($0) } } }
        deinit { kept.withLock { $0.values.forEach { close($0) } } }
    }

    /// A first daemon that switched over and was stopped with the guest
    /// depending on it; `acknowledge`: the VMM said VMM_RESUMED first.
    /// Returns what its fd store kept, and the VMM (still connected).
    static func stoppedAfterResume(acknowledge: Bool) throws -> (store: KeepingStore, vmm: HandVMM, daemon: Daemon) {
        let store = KeepingStore()
        let daemon = try Daemon(store: store)
        let vmm = try HandVMM(daemon)
        let (bulk, urgent) = try switchOver(daemon, vmm, stale: stale([9, 10]), handOver: false)
        if acknowledge {
            try vmm.channel.send(.resumed)
            guard case .resumed? = try FailureTests.next(bulk) else { throw TestFailure("no RESUMED") }
        }
        // The daemon dies here (a stop behaves as a crash toward the VMM).
        daemon.daemon.cancel("stopped by SIGTERM after VMM_RESUME")
        _ = daemon.failure()
        withExtendedLifetime((bulk, urgent)) {}
        #expect(Set(store.kept.withLock { $0.keys }) == Set(StoredDescriptor.all))
        return (store, vmm, daemon)
    }

    static func takeoverConfig(_ directory: TemporaryDirectory) -> DestinationConfig {
        var config = DestinationConfig(listen: SocketEndpoint(host: "127.0.0.1", port: 0),
                                       transport: TestCertificates.daemon,
                                       vmmSocketPath: directory.path + "/vmm.sock", memory: .shmem,
                                       regionSize: 0, vmmUID: geteuid())
        config.vmmAttachTimeoutNanos = 1_500_000_000
        return config
    }

    /// The record does not show VMM_RESUMED and no VMM reattaches: the
    /// guest never ran here, and the takeover discards the migration
    /// instead of serving it, leaving nothing in the store.
    @Test func aTakeoverWithoutTheVMMsAcknowledgementIsDiscarded() throws {
        let (store, vmm, _) = try Self.stoppedAfterResume(acknowledge: false)
        withExtendedLifetime(vmm) {}
        let directory = try TemporaryDirectory()
        let log = LogCapture()
        let second = try DestinationDaemon(config: Self.takeoverConfig(directory), logger: log.logger,
                                           takeover: .stored(store.handOver()), descriptorStore: store)
        let started = monotonicNanoseconds()
        #expect {
            _ = try second.run()
        } throws: { error in
            let failure = error as? MigrationError
            return failure?.code == .discarded
                && failure?.reason.contains("never acknowledged VMM_RESUME") == true
                && failure?.reason.contains("the guest never ran here") == true
        }
        #expect(monotonicNanoseconds() - started >= 1_400_000_000, "did not wait for the VMM to reattach")
        #expect(store.kept.withLock { $0 }.isEmpty, "a discarded migration stayed in the fd store")
        #expect(log.messages(.migrationDiscarded).count == 1)
        #expect(log.messages(.migrationTakenOver).isEmpty)
    }

    /// With VMM_RESUMED in the record the takeover goes on at once: paused,
    /// waiting for the agent.
    @Test func aTakeoverWithTheVMMsAcknowledgementGoesOn() throws {
        let (store, vmm, _) = try Self.stoppedAfterResume(acknowledge: true)
        withExtendedLifetime(vmm) {}
        let directory = try TemporaryDirectory()
        let log = LogCapture()
        let second = try DestinationDaemon(config: Self.takeoverConfig(directory), logger: log.logger,
                                           takeover: .stored(store.handOver()), descriptorStore: store)
        let run = try Background("test-takeover") { try second.run() }
        #expect(FailSafeDaemonTests.waitUntil { !log.messages(.migrationTakenOver).isEmpty })
        #expect(second.status().phase == "paused")
        #expect(log.messages(.migrationDiscarded).isEmpty)
        second.cancel("test over")
        _ = run.failure("postcopyd")
    }
}
