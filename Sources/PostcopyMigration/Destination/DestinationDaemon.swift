import Glibc
import Logging
import PostcopyCore
import PostcopyOS
import Synchronization

/// One incoming migration, start to finish: owns guest RAM, listens for the
/// agent (TCP) and the VMM (unix socket), takes precopy pages, switches
/// over, serves faults during postcopy and reports a summary.
///
/// Threads: one accepts agent connections for the whole migration; each
/// generation of the agent's connections (its bulk streams and the urgent
/// one) has a receiving thread per connection; one sends HEARTBEATs; one serves the VMM socket and one the
/// fault loop. The caller's thread waits for completion and finishes the
/// migration.
///
/// Failures: before switchover any failure fails the migration — every
/// peer gets ERROR with the reason, every socket is shut down, and `run`
/// throws it; the source still runs the guest. During postcopy a lost,
/// silent or misbehaving agent connection pauses the migration instead: the
/// guest keeps running on the pages it has, the agent rejoins (a resuming
/// HELLO on every connection), is told which pages are still stale, and the
/// pages guest threads wait for are asked for again first. Only a lost VMM,
/// an operator, or no agent within `reconnectTimeoutNanos` fails postcopy.
public final class DestinationDaemon: @unchecked Sendable {
    // SAFETY (@unchecked): every mutable field is behind a Mutex or Atomic.
    public let config: DestinationConfig
    public let memory: GuestMemory
    public let tcp: TCPListener
    let logger: Logger
    let failures: FailureLatch
    let vmm: VMMLink
    let session: Locked<DestinationSession>
    /// The agent's connections of the current generation, and every
    /// receiving thread ever started (joined at the end).
    let agent = Locked(AgentConnections())
    let engine = Locked<PostcopyEngine?>(nil)
    /// Opens once postcopy has its engine (`startPostcopy`), or once the
    /// migration failed: what a rejoin during switchover waits for.
    let engineReady = Latch()
    let faultLoop = Locked<FaultLoop?>(nil)
    /// From just before VMM_RESUME goes out (or from the start, for a
    /// daemon that took a migration over) until the VMM acknowledges
    /// VMM_COMPLETE: the guest runs here and waits on this daemon for its
    /// stale pages. A failure then must not release it (issue 18).
    let guestDepends = Atomic<Bool>(false)
    /// The failure came while the guest depended on this daemon: the VMM
    /// was not sent ERROR, and guest RAM, the record and the fd store are
    /// left for a restarted postcopyd.
    private let failedHoldingGuest = Atomic<Bool>(false)
    /// The postcopy tracker's empty bitmaps and the page-state record's
    /// file, made when the daemon starts: made at switchover, zeroing their
    /// fresh memory was 3.3 ms of the guest's downtime at 8 GiB of RAM.
    let prepared = Locked<(scratch: PostcopyTracker.Scratch?, record: PageStateFile.Prepared?)>((nil, nil))
    let completion = Latch()
    let finished = Atomic<Bool>(false)
    let summary = Locked(DestinationSummary())
    /// Fields of every log record (MIGRATION_ID, PHASE, POSTCOPYD_INSTANCE).
    public let context: LogContext
    let startedAt = monotonicNanoseconds()
    /// How long the migration has spent in each phase (`entered`).
    let timeline = Locked(PhaseTimeline())
    let agentAddresses = Locked<[String]>([])
    let receiveRate = Locked(RateMeter())
    /// A latch per receiving thread ever started, open once it has ended.
    let receivers = Locked<[Latch]>([])
    /// Agent connections in their TLS handshake or HELLO, each on a thread
    /// of its own (at most `config.maxPendingConnections`).
    let admissions = Locked<[Admission]>([])
    /// Opened, and replaced by a fresh one, each time a bulk stream's
    /// ROUND_END has been handled: what the control stream's receiver waits
    /// on when the dirty bitmap comes before every stream ended the last
    /// round (`awaitStreamsDrained`).
    let roundEnds = Locked(Latch())
    /// Connections given up at the limit: a log line a second at most.
    let givenUpLog = Locked(ReportLimiter())

    final class Admission: Sendable {
        let connection: TCPConnection
        /// Past its HELLO (a connection of the migration now), or given up:
        /// no longer one to give up for a newer connection.
        let settled = Atomic<Bool>(false)
        /// Its thread has finished: join it.
        let done = Atomic<Bool>(false)
        let thread = Locked<OSThread?>(nil)
        init(_ connection: TCPConnection) { self.connection = connection }
    }
    /// What this daemon took over, when it was started to take a migration over.
    private let recovered: Recovered?
    /// Where the RAM file, the page-state record and the userfaultfd are
    /// kept for a daemon restarted after this one dies (systemd's fd store).
    let descriptorStore: (any DescriptorStore)?

    struct AgentConnections {
        var epoch: UInt64 = 0
        var streams: [AgentStream: MessageStream] = [:]
        /// The generation whose HELLOs the session admitted, all of them,
        /// and the one whose receivers started: the last of a generation's
        /// connections to be registered starts them, whichever finished its
        /// HELLO last.
        var readyEpoch: UInt64?
        var startedEpoch: UInt64?
        var threads: [OSThread] = []
        /// Bytes received on connections given up.
        var retiredBytes: UInt64 = 0
        var bytesReceived: UInt64 {
            streams.values.reduce(retiredBytes) { $0 + $1.bytesReceived.load(ordering: .relaxed) }
        }
    }

    /// Allocates guest RAM and starts listening on both sockets. `context`
    /// is kept current with the migration's id and phase for the log handler.
    ///
    /// With `takeover`, allocates nothing: takes back the RAM file, the
    /// userfaultfd and the page-state record of a migration whose daemon
    /// died during postcopy (waiting for the VMM to reattach, for `.vmm`),
    /// and serves it on from the paused phase. `descriptorStore` (systemd's
    /// fd store) keeps those three for a daemon restarted after this one.
    ///
    /// `agentListener`, the agent's socket systemd passed (socket
    /// activation), is used instead of binding `config.listen`.
    public init(config: DestinationConfig, logger: Logger, context: LogContext = LogContext(),
                takeover: TakeoverSource? = nil, descriptorStore: (any DescriptorStore)? = nil,
                agentListener: TCPListener? = nil) throws {
        self.config = config
        self.logger = logger
        self.context = context
        self.descriptorStore = descriptorStore
        context.set("POSTCOPYD_INSTANCE", config.instance)
        context.set("PHASE", DestinationSession.Phase.handshake.rawValue)
        if let id = config.migrationID { context.set("MIGRATION_ID", id.description) }
        let unix = try inStep("listen for the VMM on \(config.vmmSocketPath)") {
            try UnixListener(path: config.vmmSocketPath, owner: config.vmmUID)
        }
        failures = FailureLatch()
        if let takeover {
            if case .vmm = takeover {
                logger.info("taking a migration over: waiting for the VMM to reattach to \(config.vmmSocketPath)")
            }
            let taken = try inStep("take the migration over from \(takeover)") {
                try Recovered.take(from: takeover, listener: unix, allowedUID: config.vmmUID,
                                   timeoutNanos: config.vmmAttachTimeoutNanos,
                                   handshakeTimeoutNanos: config.vmmHandshakeTimeoutNanos,
                                   ramFile: config.ramFile, logger: logger)
            }
            let header = taken.header
            if let wanted = config.migrationID, wanted != header.migrationID {
                throw MigrationError(.incompatible, "asked to serve migration \(wanted), but the one to take over is \(header.migrationID)")
            }
            if config.regionSize != 0, config.regionSize != header.geometry.regionSize {
                throw MigrationError(.incompatible, "asked for \(ByteSize.format(config.regionSize)) of guest RAM, but the migration to take over has \(ByteSize.format(header.geometry.regionSize))")
            }
            context.set("MIGRATION_ID", header.migrationID.description)
            context.set("PHASE", DestinationSession.Phase.paused.rawValue)
            memory = taken.memory
            recovered = taken
            session = Locked(DestinationSession(takingOver: header.migrationID, geometry: header.geometry,
                                                  secretDigest: header.secretDigest,
                                                  milestones: taken.pageState.milestones,
                                                  pausedAt: monotonicNanoseconds()))
            vmm = VMMLink(listener: unix, memory: memory, allowedUID: config.vmmUID, failures: failures, logger: logger,
                          takeover: VMMTakeover(pageState: taken.pageState, attached: taken.vmm),
                          handshakeTimeoutNanos: config.vmmHandshakeTimeoutNanos)
            // The dead daemon's guest resumed: it depends on this one now.
            guestDepends.store(true, ordering: .sequentiallyConsistent)
        } else {
            let backing = config.ramFile.map { Backing.namedFile(path: $0, kind: config.memory) }
                ?? Backing.choose(config.memory, hugetlbfsDirectory: config.hugetlbfsDirectory)
            memory = try inStep("create guest RAM (\(ByteSize.format(config.regionSize)), \(backing))") {
                let memory = try GuestMemory(backing: backing, size: config.regionSize)
                try memory.file.giveOwnership(to: config.vmmUID)
                return memory
            }
            recovered = nil
            session = Locked(DestinationSession(geometry: memory.geometry, migrationID: config.migrationID,
                                                  secret: config.migrationSecret))
            vmm = VMMLink(listener: unix, memory: memory, allowedUID: config.vmmUID, failures: failures, logger: logger,
                          handshakeTimeoutNanos: config.vmmHandshakeTimeoutNanos)
        }
        tcp = try agentListener ?? inStep("listen for the agent on \(config.listen)") { try TCPListener(endpoint: config.listen) }
        if recovered == nil {
            let geometry = memory.geometry
            let record = try inStep("prepare the page-state record") { try PageStateFile.Prepared(geometry: geometry) }
            prepared.withLock { $0 = (PostcopyTracker.Scratch(geometry: geometry), record) }
        }
        failures.whenFailed { [weak self] error in self?.shutDown(reporting: error) }
        vmm.whenGone { [weak self] reason in self?.vmmGoneBeforeHandOver(reason) ?? false }
        summary.withLock {
            $0.memory = memory.file.backing.description
            $0.regionBytes = memory.geometry.regionSize
            $0.pageBytes = memory.geometry.pageSize.bytes
        }
        let now = monotonicNanoseconds()
        timeline.withLock {
            $0.enter(recovered == nil ? DestinationSession.Phase.handshake.rawValue : DestinationSession.Phase.paused.rawValue, at: now)
            // A migration taken over begins here: the dead daemon's times went with it.
            if recovered != nil { $0.begin(at: now) }
        }
    }

    /// The migration is in `phase` from now on: the log records' PHASE
    /// field, and the timeline `postcopyctl status` reads.
    func entered(_ phase: String) {
        context.set("PHASE", phase)
        timeline.withLock { $0.enter(phase, at: monotonicNanoseconds()) }
    }

    func entered(_ phase: DestinationSession.Phase) { entered(phase.rawValue) }

    /// Where the agent connects (with the real port when 0 was asked for).
    public var endpoint: SocketEndpoint { tcp.endpoint }

    /// Serves the migration; returns its summary once every page is in place
    /// and the VMM has let go of the userfaultfd, or throws why it failed.
    public func run() throws -> DestinationSummary {
        let started = monotonicNanoseconds()
        try vmm.start()
        let heartbeat = try StoppableThread()
        defer {
            // Ended, well or before the guest resumed here, this migration
            // leaves nothing to take over. Failed while the guest depends on
            // it, it leaves guest RAM, the record and the userfaultfd in the
            // store for a restarted postcopyd.
            if let descriptorStore, !failedHoldingGuest.load(ordering: .sequentiallyConsistent) {
                StoredDescriptor.all.forEach { descriptorStore.remove(name: $0) }
            }
            finished.store(true, ordering: .sequentiallyConsistent)
            heartbeat.stop()
            faultLoop.withLock { $0 }?.stop()
            tcp.stopAccepting()
            for admission in admissions.withLock({ $0 }) {
                admission.connection.shutdown()
                admission.thread.withLock { $0 }?.join()
            }
            let threads = agent.withLock { agent in
                for stream in agent.streams.values { stream.shutdown() }
                return agent.threads
            }
            for thread in threads { thread.join() }
            vmm.join()
        }
        // What `finish` wrote into the summary, for the postcopyComplete event.
        var completed = DaemonFigures()
        do {
            if let recovered { try resumeTakenOver(recovered) }
            let acceptor = try OSThread.start(name: "postcopy-accept") { [self] in acceptAgents() }
            agent.withLock { $0.threads.append(acceptor) }
            try heartbeat.start(name: "postcopy-beat") { [self] in
                let interval = max(config.deadPeerTimeoutNanos / 4, 10_000_000)
                while !heartbeat.waitForStop(timeoutNanos: interval) {
                    sendHeartbeats()
                    // The fault thread does not log: its stall reports are logged from here.
                    engine.withLock { $0 }?.reportStalls()
                }
            }
            completed = try finish()
        } catch {
            failures.fail(error as? MigrationError ?? MigrationError(.internalFailure, cause: error))
        }
        if let error = failures.error {
            if error.code == .discarded {
                let id = session.withLock { $0.migrationID?.description } ?? ""
                logger.event(.migrationDiscarded, .error, "migration discarded: \(error.reason)", [
                    "error_code": "\(error.code)", "reason": "\(error.reason)", "migration_id": "\(id)",
                ])
                entered(.discarded)
                throw error
            }
            logger.event(.migrationFailed, .error, "migration failed: \(error.reason)", [
                "error_code": "\(error.code)", "reason": "\(error.reason)",
            ])
            entered("failed")
            if failedHoldingGuest.load(ordering: .sequentiallyConsistent) { reportGuestLeftWaiting(error) }
            throw error
        }
        let result = summary.withLock {
            $0.totalSeconds = Double(monotonicNanoseconds() - started) / 1e9
            $0.cpuSeconds = ProcessUsage.cpuSeconds()
            $0.memoryUse = ProcessUsage.memory()
            return $0
        }
        entered(.complete)
        let (message, fields) = completed.completeEvent(totalSeconds: result.totalSeconds)
        logger.event(.postcopyComplete, .info, "\(message)", fields)
        return result
    }

    /// Ends the migration with `reason` (an operator's stop or cancel):
    /// every peer is told, every thread wakes, and `run` throws.
    public func cancel(_ reason: String) {
        failures.fail(.cancelled, reason)
    }

    /// `postcopyctl cancel`: ends the migration if switchover has not begun
    /// (the source then goes on running the guest) and says so; refuses
    /// afterwards, when the guest depends on pages only the source holds.
    public func cancelBeforeSwitchover() throws(CancelRefusal) -> String {
        let phase = session.withLock { $0.phase }
        if let failed = failures.error { throw CancelRefusal(phase: phase, failure: failed.reason) }
        switch phase {
        case .handshake, .precopy:
            let id = session.withLock { $0.migrationID?.description } ?? "(no agent yet)"
            logger.warning("cancelled by an operator during \(phase)")
            cancel("cancelled by an operator (postcopyctl cancel) during \(phase)")
            return "cancelled migration \(id) during \(phase); the source keeps running the guest"
        case .switchingOver, .handover, .postcopy, .paused, .complete, .discarded:
            throw CancelRefusal(phase: phase)
        }
    }

    /// Why `postcopyctl cancel` was refused.
    public struct CancelRefusal: Error, CustomStringConvertible {
        public let phase: DestinationSession.Phase
        public var failure: String?
        public var description: String {
            if let failure { return "the migration has already ended: \(failure)" }
            switch phase {
            case .complete: return "the migration is complete; there is nothing to cancel"
            case .discarded: return "the migration was discarded already"
            case .switchingOver, .handover:
                return "the migration is in \(phase): only the agent knows whether the guest may run here yet (its hand-over), so only the agent can give it up (its DISCARD)"
            default:
                return "the migration is in \(phase): the guest runs here now and the source holds pages it lacks, so it cannot be cancelled (stop the service to give it up)"
            }
        }
    }

    /// Turns of the fault loop, while it runs: the watchdog pings only
    /// while this moves.
    public var faultLoopHeartbeat: UInt64? {
        faultLoop.withLock { $0 }?.counters.heartbeats.load(ordering: .relaxed)
    }

    /// Reports `error` to every peer and shuts every connection down, which
    /// wakes every thread of the migration.
    ///
    /// While the guest depends on this daemon (from VMM_RESUME until the VMM
    /// acknowledges VMM_COMPLETE), no peer is sent ERROR: the VMM's and the
    /// agent's connections are closed as a crash would close them, so that
    /// the VMM keeps guest RAM registered (faults on stale pages wait) and
    /// reattaches, and the agent rejoins, a restarted postcopyd. No page is
    /// written from here on either way.
    private func shutDown(reporting error: MigrationError) {
        engine.withLock { $0 }?.halt()
        let holding = guestDepends.load(ordering: .sequentiallyConsistent)
        failedHoldingGuest.store(holding, ordering: .sequentiallyConsistent)
        for stream in agent.withLock({ Array($0.streams.values) }) {
            if holding { stream.shutdown() } else { stream.fail(error.code, error.reason) }
        }
        vmm.shutdown(reporting: holding ? nil : error)
        tcp.stopAccepting()
        engineReady.open()
        completion.open()
    }

    /// The userfaultfd the fault loop serves (tests break it to kill the loop).
    var attachedUffdForTesting: Int32? { vmm.current?.uffd.fd }

    /// Whether the guest runs here and waits on this daemon for stale pages
    /// (VMM_RESUME sent, VMM_COMPLETE not yet acknowledged): a stop now
    /// leaves it waiting for a restarted postcopyd.
    public var guestDependsOnDaemon: Bool { guestDepends.load(ordering: .sequentiallyConsistent) }
}
