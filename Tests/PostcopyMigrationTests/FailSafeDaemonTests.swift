import Glibc
import Logging
import PostcopyCore
@testable import PostcopyMigration
import PostcopyOS
import Synchronization
import Testing

/// Issue 18: from VMM_RESUME until the last page is in place, postcopyd
/// never releases the guest, never writes a page after the migration failed,
/// and no single VMM connection can hold the VMM slot or fail the migration.
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct FailSafeDaemonTests {
    static let size: UInt64 = 16 << 20

    /// systemd's fd store, as the daemon sees it: what is kept, by name.
    final class FakeStore: DescriptorStore {
        let kept = Locked<Set<String>>([])
        let removed = Locked<[String]>([])
        func store(_ descriptor: Int32, name: String) -> Bool {
            kept.withLock { _ = $0.insert(name) }
            return true
        }
        func remove(name: String) {
            kept.withLock { _ = $0.remove(name) }
            removed.withLock { $0.append(name) }
        }
    }

    struct Daemon {
        let directory: TemporaryDirectory
        let daemon: DestinationDaemon
        let run: Background<DestinationSummary>
        let store = FakeStore()
        let log = LogCapture()

        /// `store`: an fd store of the test's instead of `self.store`.
        init(vmmHandshakeTimeoutNanos: UInt64 = 10_000_000_000, store other: (any DescriptorStore)? = nil) throws {
            directory = try TemporaryDirectory()
            var config = DestinationConfig(listen: SocketEndpoint(host: "127.0.0.1", port: 0),
                                           transport: TestCertificates.daemon,
                                           vmmSocketPath: directory.path + "/vmm.sock", memory: .shmem,
                                           regionSize: FailSafeDaemonTests.size, vmmUID: geteuid())
            config.vmmHandshakeTimeoutNanos = vmmHandshakeTimeoutNanos
            let daemon = try DestinationDaemon(config: config, logger: log.logger, descriptorStore: other ?? store)
            self.daemon = daemon
            run = try Background("test-daemon") { try daemon.run() }
        }

        var socketPath: String { directory.path + "/vmm.sock" }

        /// The reason the daemon failed; records an issue if it did not.
        func failure() -> String { run.failure("postcopyd") }
    }

    /// A VMM spoken by hand: maps the daemon's RAM file (same process),
    /// registers it MINOR | MISSING with a userfaultfd of its own, and
    /// hands that over in VMM_ATTACH.
    final class HandVMM {
        let channel: VMMChannel
        let guest: Mapping
        let uffd: Userfaultfd

        init(_ daemon: Daemon, blocking: Bool = false) throws {
            channel = VMMChannel(try UnixConnection.connect(path: daemon.socketPath), side: .vmm, opening: .attach)
            guard let (offer, descriptor) = try channel.receive(), case .offer = offer, let descriptor else {
                throw TestFailure("no VMM_OFFER")
            }
            close(descriptor)
            guest = try daemon.daemon.memory.mapGuestView()
            uffd = try Userfaultfd.open(enabling: MemoryKind.shmem.requiredFeatures)
            try uffd.register(start: guest.address, length: guest.length, mode: [.minor, .missing])
            if blocking {
                let flags = fcntl(uffd.fd, F_GETFL)
                #expect(fcntl(uffd.fd, F_SETFL, flags & ~O_NONBLOCK) == 0)
                #expect(!uffd.isNonBlocking)
            }
            try channel.send(.attach(guestBase: guest.address, features: uffd.features,
                                        registerMode: RegisterMode([.minor, .missing]).rawValue), passing: uffd.fd)
        }

        /// The next message other than HEARTBEAT; nil at the end of the socket.
        func next() throws -> VMMMessage? {
            while true {
                guard let (message, descriptor) = try channel.receive() else { return nil }
                if let descriptor { close(descriptor) }
                if case .heartbeat = message { continue }
                return message
            }
        }

        deinit { try? uffd.release(start: guest.address, length: guest.length) }
    }

    static func waitUntil(seconds: Double = 10, _ condition: () -> Bool) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while monotonicNanoseconds() < deadline {
            if condition() { return true }
            usleep(5_000)
        }
        return condition()
    }

    /// Switches over with every page stale: returns the agent's streams
    /// once the VMM has VMM_RESUME and the agent RESUMED.
    static func switchOver(_ daemon: Daemon, _ vmm: HandVMM) throws -> (MessageStream, MessageStream) {
        let (bulk, urgent) = try FailureTests.connectAgent(to: daemon.daemon, pages: size / 4096)
        let stale = PageBitmap.full(count: size / 4096)
        try bulk.send(.dirtyBitmap(totalBits: stale.count, firstWord: 0, words: stale.words))
        try bulk.send(.switchover(stalePages: stale.popCount, sourcePausedAtNanos: realtimeNanoseconds()))
        guard case .resume? = try vmm.next() else { throw TestFailure("no VMM_RESUME") }
        try vmm.channel.send(.resumed)
        guard case .resumed? = try FailureTests.next(bulk) else { throw TestFailure("no RESUMED") }
        return (bulk, urgent)
    }

    // MARK: item 1: no ERROR to the VMM during postcopy

    /// A stop (what SIGTERM does) during postcopy: the VMM's socket ends
    /// with no ERROR, as if postcopyd had crashed; the agent's too; the fd
    /// store keeps guest RAM, the record and the userfaultfd; the journal
    /// says the guest waits; `run` still fails (exit status 1).
    @Test func aStopDuringPostcopyLeavesTheGuestWaiting() throws {
        let daemon = try Daemon()
        let vmm = try HandVMM(daemon)
        let (bulk, urgent) = try Self.switchOver(daemon, vmm)
        #expect(daemon.daemon.guestDependsOnDaemon)
        #expect(daemon.store.kept.withLock { $0 } == Set(StoredDescriptor.all))
        daemon.daemon.cancel("stopped by SIGTERM during postcopy")
        let toVMM = try? vmm.next()
        #expect(toVMM == nil, "the VMM was sent \(String(describing: toVMM)) instead of a bare close")
        var toAgent: [Message] = []
        while let message = try? FailureTests.next(bulk) { toAgent.append(message) }
        #expect(!toAgent.contains { $0.type == .error }, "the agent was sent ERROR: \(toAgent)")
        withExtendedLifetime(urgent) {}
        #expect(daemon.failure().contains("stopped by SIGTERM during postcopy"))
        #expect(daemon.store.removed.withLock { $0 }.isEmpty, "the fd store was emptied")
        #expect(daemon.store.kept.withLock { $0 } == Set(StoredDescriptor.all))
        let waiting = daemon.log.messages(.guestLeftWaiting)
        #expect(waiting.count == 1)
        #expect(waiting.first?.contains("the guest waits on incomplete memory (4096 pages still stale)") == true, "\(waiting)")
        #expect(waiting.first?.contains("Restart postcopyd to take the migration over, or stop the VM") == true)
        #expect(daemon.log.messages(.migrationFailed).count == 1)
    }

    /// Before VMM_RESUME a stop is what it always was: ERROR to the VMM and
    /// an empty fd store.
    @Test func aStopBeforeResumeStillTellsTheVMM() throws {
        let daemon = try Daemon()
        let vmm = try HandVMM(daemon)
        #expect(Self.waitUntil { !daemon.daemon.status().vmm.isEmpty })
        #expect(!daemon.daemon.guestDependsOnDaemon)
        daemon.daemon.cancel("stopped by SIGTERM during handshake")
        guard case let .error(code, text)? = try vmm.next() else {
            Issue.record("no ERROR to the VMM before resume")
            return
        }
        #expect(code == .cancelled)
        #expect(text.contains("stopped by SIGTERM"))
        _ = daemon.failure()
        #expect(daemon.log.messages(.guestLeftWaiting).isEmpty)
    }

    // MARK: item 2: no write after failure

    /// An engine on a registered region, every page stale.
    struct Engine {
        let memory: GuestMemory
        let guest: Mapping
        let uffd: Userfaultfd
        let failures = FailureLatch()
        let engine: PostcopyEngine

        init() throws {
            memory = try GuestMemory(backing: .memfd, size: 1 << 20)
            guest = try memory.mapGuestView()
            uffd = try Userfaultfd.open(enabling: MemoryKind.shmem.requiredFeatures)
            try uffd.register(start: guest.address, length: guest.length, mode: [.minor, .missing])
            let installer = PageInstaller(uffd: uffd, file: memory.file, guestBase: guest.address)
            engine = try PostcopyEngine(memory: memory, installer: installer, stale: .full(count: 256), urgent: nil,
                                    pageState: nil, failures: failures, stalls: StallLimiter(thresholdNanos: 1 << 40),
                                    onComplete: {})
        }

        func alias(_ page: UInt64) -> [UInt8] {
            Array(UnsafeRawBufferPointer(start: memory.alias.pointer(toSmallPage: page), count: 4096))
        }

        /// A decoded PAGES frame's payload, as the receiving thread holds it.
        static func pages(_ count: Int, _ byte: UInt8) -> ArraySlice<UInt8> {
            ArraySlice([UInt8](repeating: byte, count: count * 4096))
        }
    }

    @Test func aFrameBufferedWhenTheMigrationFailsIsNeverWritten() throws {
        let region = try Engine()
        try region.engine.fill(PageRun(first: 0, count: 2), data: Engine.pages(2, 0xAB), urgent: true)
        #expect(region.alias(1).allSatisfy { $0 == 0xAB }, "a page before the failure was not written")
        #expect(region.engine.stalePages == 254)
        // Decoded and buffered; the failure comes before the thread fills it.
        let buffered = Engine.pages(4, 0xCD)
        region.failures.fail(.cancelled, "stopped by SIGTERM during postcopy")
        try region.engine.fill(PageRun(first: 10, count: 4), data: buffered, urgent: true)
        try region.engine.fill(PageRun(first: 20, count: 1), data: nil, urgent: false)
        for page: UInt64 in [10, 11, 12, 13] {
            #expect(region.alias(page).allSatisfy { $0 == 0 }, "page \(page) was written after the failure")
        }
        #expect(region.engine.stalePages == 254, "pages were claimed after the failure")
        #expect(region.engine.counters.filledPages == 2)
    }

    /// The urgent receiver stores through the alias, a bulk receiver writes
    /// into the file (pwrite on shmem): the guest's view sees both.
    @Test func bothReceiversWritesAreSeenThroughTheMapping() throws {
        let region = try Engine()
        try region.engine.fill(PageRun(first: 40, count: 2), data: Engine.pages(2, 0x5A), urgent: false)
        try region.engine.fill(PageRun(first: 42, count: 1), data: Engine.pages(1, 0xA5), urgent: true)
        #expect(region.alias(40).allSatisfy { $0 == 0x5A } && region.alias(41).allSatisfy { $0 == 0x5A })
        #expect(region.alias(42).allSatisfy { $0 == 0xA5 })
        // A copy that comes second (the urgent one of a resent page) is dropped.
        try region.engine.fill(PageRun(first: 41, count: 1), data: Engine.pages(1, 0xFF), urgent: true)
        #expect(region.alias(41).allSatisfy { $0 == 0x5A })
        #expect(region.engine.stalePages == 253)
        #expect(region.engine.counters.duplicatePages == 1)
    }

    @Test func noPageIsWrittenOnceTheVMMLetGo() throws {
        let region = try Engine()
        // Page 30 holds the guest's own bytes (as after a release).
        region.memory.withAliasPage(PageIndex(30)) { $0.storeBytes(of: 0x1234, as: UInt64.self) }
        region.engine.halt()
        try region.engine.fill(PageRun(first: 30, count: 1), data: Engine.pages(1, 0xEE), urgent: true)
        try region.engine.fill(PageRun(first: 30, count: 1), data: nil, urgent: false)
        #expect(region.memory.withAliasPage(PageIndex(30)) { $0.load(as: UInt64.self) } == 0x1234)
        #expect(region.engine.stalePages == 256)
    }

    // MARK: item 3: a silent VMM does not hold the slot

    /// A VMM connection that takes VMM_OFFER and then sends nothing is
    /// refused (ERROR with the reason) and closed after the handshake
    /// timeout; the migration goes on and the next VMM is served.
    @Test func aSilentVMMIsRefusedAndTheDaemonWaitsForTheRightOne() throws {
        let daemon = try Daemon(vmmHandshakeTimeoutNanos: 1_000_000_000)
        let silent = VMMChannel(try UnixConnection.connect(path: daemon.socketPath), side: .vmm, opening: .attach)
        let started = monotonicNanoseconds()
        guard let (offer, descriptor) = try silent.receive(), case .offer = offer, let descriptor else {
            throw TestFailure("no VMM_OFFER")
        }
        close(descriptor)
        guard let (refusal, _) = try silent.receive(), case let .error(code, text) = refusal else {
            throw TestFailure("no ERROR for the silent VMM")
        }
        let waited = Double(monotonicNanoseconds() - started) / 1e9
        #expect(waited >= 0.9 && waited < 5, "refused after \(waited) s")
        #expect(code == .peerLost)
        #expect(text == "the VMM sent no VMM_ATTACH (or VMM_REATTACH) within 1.0 s of connecting")
        #expect(try silent.receive() == nil, "the refused connection stays open")
        #expect(daemon.daemon.status().failure == nil)
        // A connection that sends nothing at all, not even reading the offer.
        let mute = try UnixConnection.connect(path: daemon.socketPath)
        usleep(1_500_000)
        #expect(daemon.daemon.status().failure == nil)
        withExtendedLifetime(mute) {}
        // The right VMM is served.
        let vmm = try HandVMM(daemon)
        #expect(Self.waitUntil { !daemon.daemon.status().vmm.isEmpty })
        #expect(daemon.daemon.status().failure == nil)
        daemon.daemon.cancel("test over")
        withExtendedLifetime(vmm) {}
        #expect(daemon.failure().contains("test over"))
    }

    /// A VMM that closes before VMM_ATTACH is refused alone; a switchover
    /// with no VMM says why the last one was refused.
    @Test func aVMMThatLeavesBeforeAttachingDoesNotFailTheMigration() throws {
        let daemon = try Daemon()
        let leaving = VMMChannel(try UnixConnection.connect(path: daemon.socketPath), side: .vmm, opening: .attach)
        guard let (offer, descriptor) = try leaving.receive(), case .offer = offer, let descriptor else {
            throw TestFailure("no VMM_OFFER")
        }
        close(descriptor)
        leaving.shutdown()
        usleep(300_000)
        #expect(daemon.daemon.status().failure == nil)
        let vmm = try HandVMM(daemon)
        #expect(Self.waitUntil { !daemon.daemon.status().vmm.isEmpty })
        daemon.daemon.cancel("test over")
        withExtendedLifetime(vmm) {}
        _ = daemon.failure()
    }

    /// A takeover waiting for the VMM to reattach refuses a silent
    /// connection and goes on waiting, up to its own timeout.
    @Test func aSilentVMMDoesNotEndATakeover() throws {
        let directory = try TemporaryDirectory()
        var config = DestinationConfig(listen: SocketEndpoint(host: "127.0.0.1", port: 0),
                                       transport: TestCertificates.daemon,
                                       vmmSocketPath: directory.path + "/vmm.sock", memory: .shmem,
                                       regionSize: 0, vmmUID: geteuid())
        config.vmmAttachTimeoutNanos = 3_000_000_000
        config.vmmHandshakeTimeoutNanos = 500_000_000
        let started = monotonicNanoseconds()
        let settings = config
        let construct = try Background("test-takeover") { () -> Bool in
            _ = try DestinationDaemon(config: settings, logger: testLogger("postcopyd"), takeover: .vmm)
            return true
        }
        var silent: UnixConnection?
        #expect(Self.waitUntil {
            silent = try? UnixConnection.connect(path: config.vmmSocketPath)
            return silent != nil
        })
        let channel = VMMChannel(silent!, side: .vmm, opening: .reattach)
        guard let (refusal, _) = try channel.receive(), case let .error(_, text) = refusal else {
            throw TestFailure("no ERROR for the silent VMM")
        }
        #expect(text.contains("sent no VMM_ATTACH (or VMM_REATTACH) within 0.5 s"), "\(text)")
        guard case let .failure(error) = construct.wait("the takeover") else {
            Issue.record("took over from nothing")
            return
        }
        let waited = Double(monotonicNanoseconds() - started) / 1e9
        #expect(waited >= 2.5, "the takeover ended \(waited) s in, at the refusal")
        #expect("\(error)".contains("no VMM reattached"), "\(error)")
        #expect("\(error)".contains("last refused"), "\(error)")
    }

    // MARK: item 4: the userfaultfd and the fault loop

    /// A userfaultfd handed over without O_NONBLOCK is made non-blocking
    /// (O_NONBLOCK belongs to the open file: the VMM's copy shows it).
    @Test func aBlockingUserfaultfdIsMadeNonBlocking() throws {
        let daemon = try Daemon()
        let vmm = try HandVMM(daemon, blocking: true)
        #expect(Self.waitUntil { !daemon.daemon.status().vmm.isEmpty })
        #expect(vmm.uffd.isNonBlocking, "postcopyd left the userfaultfd blocking")
        #expect(daemon.daemon.status().failure == nil)
        daemon.daemon.cancel("test over")
        _ = daemon.failure()
    }

    /// The fault loop's death reaches the daemon at once, during postcopy,
    /// and fails it the safe way. Here: a stop that shuts its userfaultfd
    /// down is simulated by the FaultLoop's own failure callback (see
    /// FaultLoopFailureTests for the loop's side).
    @Test func theFaultLoopsFailureIsReportedAtOnceAndLeavesTheGuestWaiting() throws {
        let daemon = try Daemon()
        let vmm = try HandVMM(daemon)
        let (bulk, urgent) = try Self.switchOver(daemon, vmm)
        defer { withExtendedLifetime((bulk, urgent)) {} }
        // Hang up the fault loop's userfaultfd from under it: dup2 a pipe's
        // read end (whose writer is closed: POLLHUP) over the descriptor the
        // daemon's loop polls.
        guard let attached = daemon.daemon.attachedUffdForTesting else { throw TestFailure("no VMM attached") }
        var pipeFDs: [Int32] = [0, 0]
        #expect(pipe(&pipeFDs) == 0)
        close(pipeFDs[1])
        #expect(dup2(pipeFDs[0], attached) == attached)
        close(pipeFDs[0])
        #expect(Self.waitUntil(seconds: 5) { daemon.daemon.status().failure != nil },
                "the daemon did not learn of the fault loop's death")
        let reason = daemon.failure()
        #expect(reason.contains("the fault loop stopped"), "\(reason)")
        #expect(try vmm.next() == nil, "the VMM was sent something on the fault loop's death")
        #expect(daemon.log.messages(.guestLeftWaiting).count == 1)
        #expect(daemon.store.removed.withLock { $0 }.isEmpty)
    }
}
