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
/// generation of the agent's two connections has a receiving thread per
/// connection; one sends HEARTBEATs; one serves the VMM socket and one the
/// fault loop. The caller's thread waits for completion and finishes the
/// migration.
///
/// Failures: before switchover any failure fails the migration — every
/// peer gets ERROR with the reason, every socket is shut down, and `run`
/// throws it; the source still runs the guest. During postcopy a lost,
/// silent or misbehaving agent connection pauses the migration instead: the
/// guest keeps running on the pages it has, the agent rejoins (a resuming
/// HELLO on both connections), is told which pages are still stale, and the
/// pages guest threads wait for are asked for again first. Only a lost VMM,
/// an operator, or no agent within `reconnectTimeoutNanos` fails postcopy.
public final class DestinationDaemon: @unchecked Sendable {
    // SAFETY (@unchecked): every mutable field is behind a Mutex or Atomic.
    public let config: DestinationConfig
    public let memory: GuestMemory
    public let tcp: TCPListener
    private let logger: Logger
    private let failures: FailureLatch
    private let vmm: VMMLink
    private let session: Locked<DestinationSession>
    /// The agent's connections of the current generation, and every
    /// receiving thread ever started (joined at the end).
    private let agent = Locked(AgentConnections())
    private let engine = Locked<PostcopyEngine?>(nil)
    /// Orders a pause after the generation change that causes it: held
    /// across the session's move to `paused` and the engine's pause, and
    /// across a rejoin's resumption of the engine. Without it a rejoin that
    /// completed between the two would be undone by the late pause, and no
    /// PAGE_REQUEST would go out for the rest of that generation.
    private let transitions = Lock()
    private let faultLoop = Locked<FaultLoop?>(nil)
    /// From just before VMM_RESUME goes out (or from the start, for a
    /// daemon that took a migration over) until the VMM acknowledges
    /// VMM_COMPLETE: the guest runs here and waits on this daemon for its
    /// stale pages. A failure then must not release it (issue 18).
    private let guestDepends = Atomic<Bool>(false)
    /// The failure came while the guest depended on this daemon: the VMM
    /// was not sent ERROR, and guest RAM, the record and the fd store are
    /// left for a restarted postcopyd.
    private let failedHoldingGuest = Atomic<Bool>(false)
    /// The postcopy tracker's empty bitmaps and the page-state record's
    /// file, made when the daemon starts: made at switchover, zeroing their
    /// fresh memory was 3.3 ms of the guest's downtime at 8 GiB of RAM.
    private let prepared = Locked<(scratch: PostcopyTracker.Scratch?, record: PageStateFile.Prepared?)>((nil, nil))
    private let completion = Latch()
    private let finished = Atomic<Bool>(false)
    private let summary = Locked(DestinationSummary())
    /// Fields of every log record (MIGRATION_ID, PHASE, POSTCOPYD_INSTANCE).
    public let context: LogContext
    private let startedAt = monotonicNanoseconds()
    private let agentAddresses = Locked<[String]>([])
    private let receiveRate = Locked(RateMeter())
    /// When the current pause began (monotonic; 0: not paused), and the
    /// paused time of earlier pauses.
    private let pausedAt = Atomic<UInt64>(0)
    private let pausedNanos = Atomic<UInt64>(0)
    /// Receiving threads still running.
    private let receivers = Atomic<Int>(0)
    /// Agent connections in their TLS handshake or HELLO, each on a thread
    /// of its own (at most `config.maxPendingConnections`).
    private let admissions = Locked<[Admission]>([])
    /// Connections given up at the limit: a log line a second at most.
    private let givenUpLog = Locked(ReportLimiter())

    private final class Admission: Sendable {
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
    private let descriptorStore: (any DescriptorStore)?

    private struct AgentConnections {
        var epoch: UInt64 = 0
        var streams: [StreamRole: MessageStream] = [:]
        /// The generation whose two HELLOs the session admitted, and the one
        /// whose receivers started: the second of a pair's connections to
        /// be registered starts them, whichever finished its HELLO first.
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
    public init(config: DestinationConfig, logger: Logger, context: LogContext = LogContext(),
                takeover: TakeoverSource? = nil, descriptorStore: (any DescriptorStore)? = nil) throws {
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
                                   handshakeTimeoutNanos: config.vmmHandshakeTimeoutNanos, logger: logger)
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
                                                  milestones: taken.pageState.milestones))
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
        tcp = try inStep("listen for the agent on \(config.listen)") { try TCPListener(endpoint: config.listen) }
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
    }

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
            _ = Glibc.shutdown(tcp.fd, Int32(SHUT_RDWR))
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
        do {
            if let recovered { try resumeTakenOver(recovered) }
            let acceptor = try OSThread.start(name: "postcopy-accept") { [self] in acceptAgents() }
            agent.withLock { $0.threads.append(acceptor) }
            try heartbeat.start(name: "postcopy-beat") { [self] in
                let interval = max(config.deadPeerTimeoutNanos / 4, 10_000_000)
                while !heartbeat.waitForStop(timeoutNanos: interval) { sendHeartbeats() }
            }
            try finish()
        } catch {
            failures.fail(error as? MigrationError ?? MigrationError(.internalFailure, "\(error)"))
        }
        if let error = failures.error {
            if error.code == .discarded {
                let id = session.withLock { $0.migrationID?.description } ?? ""
                logger.event(.migrationDiscarded, .error, "migration discarded: \(error.reason)", [
                    "error_code": "\(error.code)", "reason": "\(error.reason)", "migration_id": "\(id)",
                ])
                context.set("PHASE", DestinationSession.Phase.discarded.rawValue)
                throw error
            }
            logger.event(.migrationFailed, .error, "migration failed: \(error.reason)", [
                "error_code": "\(error.code)", "reason": "\(error.reason)",
            ])
            context.set("PHASE", "failed")
            if failedHoldingGuest.load(ordering: .sequentiallyConsistent) { reportGuestLeftWaiting(error) }
            throw error
        }
        let result = summary.withLock {
            $0.totalSeconds = Double(monotonicNanoseconds() - started) / 1e9
            $0.cpuSeconds = ProcessUsage.cpuSeconds()
            $0.memoryUse = ProcessUsage.memory()
            return $0
        }
        context.set("PHASE", DestinationSession.Phase.complete.rawValue)
        logger.event(.postcopyComplete, .info, "postcopy complete: \(result.stalePagesAtSwitchover) stale pages in \(fixed(result.postcopySeconds, 2)) s, downtime \(fixed(result.downtimeMs, 1)) ms", [
            "pages_stale": "\(result.stalePagesAtSwitchover)",
            "pages_urgent": "\(result.postcopyPagesUrgent)",
            "pages_background": "\(result.postcopyPagesBackground)",
            "pages_duplicate": "\(result.duplicatePages)",
            "faults_clean": "\(result.faultsClean)",
            "faults_stale": "\(result.faultsStale)",
            "fault_p50_us": "\(fixed(result.staleFaultLatency?.p50Us ?? 0, 1))",
            "fault_p99_us": "\(fixed(result.staleFaultLatency?.p99Us ?? 0, 1))",
            "fault_max_us": "\(fixed(result.staleFaultLatency?.maxUs ?? 0, 1))",
            "bytes_received": "\(result.bytesReceived)",
            "downtime_ms": "\(fixed(result.downtimeMs, 1))",
            "postcopy_seconds": "\(fixed(result.postcopySeconds, 3))",
            "total_seconds": "\(fixed(result.totalSeconds, 3))",
            "pauses": "\(result.pauses)",
        ])
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

    /// Where the migration is now, for `postcopyctl status` and sd_notify.
    public func status() -> DaemonStatus {
        var status = DaemonStatus()
        status.instance = config.instance
        status.pid = getpid()
        status.uptimeSeconds = Double(monotonicNanoseconds() - startedAt) / 1e9
        let (phase, id, pauses) = session.withLock { ($0.phase, $0.migrationID, $0.pauses) }
        status.migrationID = id?.description ?? ""
        let failure = failures.error
        status.failure = failure?.reason
        status.phase = switch failure?.code {
        case nil: phase.rawValue
        case .discarded?: DestinationSession.Phase.discarded.rawValue
        default: "failed"
        }
        status.pauses = pauses
        let pausedSince = pausedAt.load(ordering: .relaxed)
        if phase == .paused, pausedSince > 0 {
            status.pausedSeconds = Double(monotonicNanoseconds() &- pausedSince) / 1e9
        }
        status.listen = "\(endpoint)"
        status.agentAddresses = agentAddresses.withLock { $0 }
        status.vmmSocket = config.vmmSocketPath
        status.vmm = vmm.current.map { "\($0.credentials)" } ?? ""
        let summary = summary.withLock { $0 }
        status.memory = summary.memory
        status.regionBytes = summary.regionBytes
        status.precopyRounds = summary.precopyRounds
        status.precopyPages = summary.precopyPages
        status.stalePagesAtSwitchover = summary.stalePagesAtSwitchover
        if phase.servesPostcopy || phase == .complete { status.downtimeMs = summary.downtimeMs }
        if let postcopy = engine.withLock({ $0 }) {
            let state = postcopy.counters
            status.stalePagesLeft = state.stalePages
            status.faultsClean = state.cleanFaults
            status.faultsStale = state.staleFaults
            status.pagesRequested = state.requestedPages
            status.duplicatePages = state.duplicatePages
            status.staleFaultLatency = LatencyFigures(nanoseconds: postcopy.staleFaultLatencies)
        }
        status.bytesReceived = agent.withLock { $0.bytesReceived }
        status.receiveMiBPerSecond = receiveRate.withLock {
            $0.record(status.bytesReceived, at: monotonicNanoseconds())
        } / 1_048_576
        return status
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
        _ = Glibc.shutdown(tcp.fd, Int32(SHUT_RDWR))
        completion.open()
    }

    /// The userfaultfd the fault loop serves (tests break it to kill the loop).
    var attachedUffdForTesting: Int32? { vmm.current?.uffd.fd }

    /// Whether the guest runs here and waits on this daemon for stale pages
    /// (VMM_RESUME sent, VMM_COMPLETE not yet acknowledged): a stop now
    /// leaves it waiting for a restarted postcopyd.
    public var guestDependsOnDaemon: Bool { guestDepends.load(ordering: .sequentiallyConsistent) }

    /// The loud line and the journal record (POSTCOPYD_GUEST_LEFT_WAITING)
    /// of a failure during postcopy: the guest was not released.
    private func reportGuestLeftWaiting(_ error: MigrationError) {
        let stale = engine.withLock { $0 }?.stalePages
        let pages = stale.map { "\($0) pages still stale" } ?? "its stale pages unknown"
        let id = session.withLock { $0.migrationID?.description } ?? ""
        let kept = descriptorStore == nil ? "" : "; guest RAM, the page-state record and the userfaultfd stay in systemd's fd store"
        logger.event(.guestLeftWaiting, .critical, "postcopyd stopped during postcopy without releasing the guest (\(error.reason)): the guest waits on incomplete memory (\(pages)) and its threads block on stale pages; the VMM was not sent ERROR\(kept). Restart postcopyd to take the migration over, or stop the VM.", [
            "error_code": "\(error.code)", "reason": "\(error.reason)", "pages_stale": "\(stale.map { "\($0)" } ?? "")",
            "migration_id": "\(id)",
        ])
    }

    /// HEARTBEAT on each agent connection, so that the agent can tell a
    /// silent daemon from a dead one. A send that fails is left to the
    /// connection's receiving thread to report.
    private func sendHeartbeats() {
        for stream in agent.withLock({ Array($0.streams.values) }) {
            do { try stream.send(.heartbeat) } catch { stream.shutdown() }
        }
    }

    // MARK: agent connections

    /// Accepts agent connections for the whole migration: the first two,
    /// then, during postcopy, the two an agent rejoins with. A connection
    /// that sends anything but an admissible HELLO, or nothing within
    /// `handshakeTimeoutNanos`, is refused on its own: a stray or hostile
    /// peer does not end the migration. Fails the migration when a pause
    /// outlasts `reconnectTimeoutNanos`.
    private func acceptAgents() {
        while !finished.load(ordering: .sequentiallyConsistent), failures.error == nil {
            let since = pausedAt.load(ordering: .relaxed)
            if since > 0, monotonicNanoseconds() &- since > config.reconnectTimeoutNanos {
                failures.fail(.peerLost, "the agent did not rejoin within \(config.reconnectTimeoutNanos / 1_000_000_000) s of losing its connections during postcopy")
                return
            }
            reapAdmissions()
            do {
                guard let connection = try tcp.accept(keepAlive: config.keepAlive, timeoutNanos: 250_000_000) else {
                    continue
                }
                try startAdmission(connection)
            } catch {
                if finished.load(ordering: .sequentiallyConsistent) || failures.error != nil { return }
                failures.fail(.internalFailure, "accepting agent connections on \(endpoint): \(error)")
                return
            }
        }
    }

    /// Admits `connection` on a thread of its own, so that a peer slow to
    /// shake hands holds up no other. At most `maxPendingConnections` shake
    /// hands at once: past that, the oldest is given up for the newest, so
    /// that connections left half-dead by a network fault cannot keep the
    /// agent's rejoin out (a flood costs a log line a second).
    private func startAdmission(_ connection: TCPConnection) throws {
        let admission = Admission(connection)
        let evicted = admissions.withLock { list -> Admission? in
            let waiting = list.filter { !$0.settled.load(ordering: .acquiring) }
            list.append(admission)
            guard waiting.count >= config.maxPendingConnections, let oldest = waiting.first else { return nil }
            oldest.settled.store(true, ordering: .releasing)
            return oldest
        }
        if let evicted {
            let now = monotonicNanoseconds()
            if let unreported = givenUpLog.withLock({ $0.record(at: now) }) {
                let address = evicted.connection.peerEndpoint.map { "\($0)" } ?? "unknown"
                refused(address, identity: nil, "\(config.maxPendingConnections) connections were already in their handshake (the limit): gave up the oldest for a newer one (\(unreported + 1) since the last such report)")
            }
            evicted.connection.shutdown()
        }
        do {
            let thread = try OSThread.start(name: "postcopy-admit") { [self] in
                admit(connection) { admission.settled.store(true, ordering: .releasing) }
                admission.settled.store(true, ordering: .releasing)
                admission.done.store(true, ordering: .releasing)
            }
            admission.thread.withLock { $0 = thread }
        } catch {
            admissions.withLock { $0.removeAll { $0 === admission } }
            throw error
        }
    }

    /// Joins the admission threads that have finished.
    private func reapAdmissions() {
        let finished = admissions.withLock { list -> [Admission] in
            let done = list.filter { $0.done.load(ordering: .acquiring) }
            list.removeAll { admission in done.contains { $0 === admission } }
            return done
        }
        for admission in finished { admission.thread.withLock { $0 }?.join() }
    }

    /// Reads one connection's HELLO and answers it; starts receiving once
    /// both connections of a generation are there.
    ///
    /// `admitted` runs once the session took the HELLO: from then on the
    /// connection is the migration's, never one to give up for a newer one.
    private func admit(_ tcp: TCPConnection, admitted: () -> Void) {
        let address = tcp.peerEndpoint.map { "\($0)" } ?? "unknown"
        let connection: any ByteStream
        do {
            connection = try config.transport.secure(tcp, timeoutNanos: config.handshakeTimeoutNanos)
        } catch {
            refused(address, identity: nil, "\(error)")
            return
        }
        let stream = MessageStream(connection, peer: "agent")
        do {
            try connection.setReceiveTimeout(config.handshakeTimeoutNanos)
            guard let hello = try stream.receive() else { return }
            let (role, welcome, epoch, superseded, ready) = try transitions.withLock {
                let admitted = try session.withLock { session in
                    let (before, phase) = (session.epoch, session.phase)
                    let (role, welcome) = try session.hello(hello)
                    // Both connections are in: precopy starts, or postcopy
                    // (or the hand-over) goes on after a rejoin.
                    let ready = phase != session.phase
                        && [.precopy, .handover, .postcopy].contains(session.phase)
                    return (role, welcome, session.epoch, session.epoch != before, ready)
                }
                if admitted.3 { pauseEngine() }
                return admitted
            }
            admitted()
            if superseded {
                paused(epoch: epoch - 1, because: "the agent rejoined: it found the connections dead first", role: role)
            }
            // From here a connection that carries nothing, not even
            // HEARTBEAT, for this long is dead.
            try connection.setReceiveTimeout(config.deadPeerTimeoutNanos)
            try connection.setSendTimeout(config.deadPeerTimeoutNanos)
            try stream.send(welcome)
            let registered = agent.withLock { agent -> (replaced: MessageStream?, start: Bool)? in
                // A generation newer than this connection's began while it
                // shook hands (admissions run side by side): it is dead.
                guard epoch >= agent.epoch else { return nil }
                if agent.epoch != epoch {
                    agent.epoch = epoch
                    agent.retiredBytes = agent.bytesReceived
                    agent.streams = [:]
                }
                let replaced = agent.streams.updateValue(stream, forKey: role)
                if ready { agent.readyEpoch = epoch }
                let start = agent.readyEpoch == epoch && agent.startedEpoch != epoch
                    && agent.streams.count == StreamRole.allCases.count
                if start { agent.startedEpoch = epoch }
                return (replaced, start)
            }
            guard let (replaced, start) = registered else {
                stream.shutdown()
                return
            }
            replaced?.shutdown()
            agentAddresses.withLock { $0.append(address) }
            let id = session.withLock { $0.migrationID?.description ?? "" }
            context.set("MIGRATION_ID", id)
            var fields: Logger.Metadata = ["role": "\(role)", "agent_address": "\(address)",
                                           "resume": "\(hello.isResumingHello)"]
            if let identity = connection.peerIdentity { fields["tls_identity"] = "\(identity)" }
            logger.info("agent connected", metadata: fields)
            guard start else { return }
            do {
                if hello.isResumingHello {
                    try rejoined(epoch: epoch, from: address)
                } else {
                    accepted(from: address)
                }
                try startReceiving(epoch: epoch)
            } catch {
                // The generation broke before its receivers ran: it is lost
                // like any other (a pause in postcopy, the end before).
                lost(role, epoch: epoch, error as? MigrationError
                    ?? MigrationError(.peerLost, "the agent's connections failed as they started: \(error)"))
            }
        } catch let error as SessionError {
            refused(address, identity: connection.peerIdentity, error.description)
            stream.fail(error.code, error.description)
        } catch {
            let reason = "no valid HELLO: \(error)\(Self.tlsHint(error, config.transport))"
            refused(address, identity: connection.peerIdentity, reason)
            stream.fail((error as? StreamError)?.code ?? .protocolViolation, reason)
        }
    }

    /// Logs a refused agent connection (POSTCOPYD_AGENT_REFUSED); the
    /// migration goes on.
    private func refused(_ address: String, identity: String?, _ reason: String) {
        var fields: Logger.Metadata = ["agent_address": "\(address)", "reason": "\(reason)"]
        if let identity { fields["tls_identity"] = "\(identity)" }
        logger.event(.agentRefused, .warning, "refused an agent connection from \(address): \(reason)", fields)
    }

    /// What a plaintext daemon adds when a TLS client said hello: its
    /// record header (0x16 0x03) reads as a bad frame magic.
    private static func tlsHint(_ error: any Error, _ transport: TransportSecurity) -> String {
        guard transport.isPlaintext, case let .malformed(_, .badMagic(magic))? = error as? StreamError,
              magic & 0xFFFF == 0x0316 else { return "" }
        return " (the peer speaks TLS, but this postcopyd runs with --insecure-plaintext)"
    }

    private func accepted(from address: String) {
        let id = session.withLock { $0.migrationID?.description ?? "" }
        summary.withLock { $0.migrationID = id }
        context.set("PHASE", DestinationSession.Phase.precopy.rawValue)
        logger.event(.migrationAccepted, .info, "migration \(id) accepted from \(address)", [
            "agent_address": "\(address)",
        ])
    }

    /// Starts a receiving thread on each connection of generation `epoch`.
    private func startReceiving(epoch: UInt64) throws {
        let streams = agent.withLock { $0.epoch == epoch ? $0.streams : [:] }
        guard let bulk = streams[.bulk], let urgent = streams[.urgent] else { return }
        for (role, stream) in [(StreamRole.urgent, urgent), (.bulk, bulk)] {
            receivers.add(1, ordering: .relaxed)
            let rejoining = session.withLock { $0.phase == .postcopy || $0.phase == .handover }
            let thread = try OSThread.start(name: "postcopy-\(role)") { [self] in
                defer { receivers.subtract(1, ordering: .relaxed) }
                // A rejoined bulk connection carries the background stream
                // from its first frame (the first one does from switchover).
                if rejoining && role == .bulk { yieldToUrgentWork("the bulk receiver") }
                receive(on: stream, role, epoch: epoch) { action in
                    try handle(action, on: role, bulk: bulk)
                }
            }
            agent.withLock { $0.threads.append(thread) }
        }
    }

    // MARK: pause and rejoin

    /// The agent's connections of generation `epoch` are given up during
    /// postcopy (the session has already moved on): shut them down, hold
    /// page requests, and say so.
    /// The engine's half of a pause, under `transitions` together with the
    /// session's move that caused it: no PAGE_REQUEST goes out, and the
    /// pause's clock starts.
    private func pauseEngine() {
        engine.withLock { $0 }?.pause()
        pausedAt.store(monotonicNanoseconds(), ordering: .relaxed)
        context.set("PHASE", DestinationSession.Phase.paused.rawValue)
    }

    /// The rest of a pause, after `pauseEngine`: the lost generation's
    /// connections are shut down, and the journal says so.
    private func paused(epoch: UInt64, because reason: String, role: StreamRole) {
        let streams = agent.withLock { $0.epoch == epoch ? Array($0.streams.values) : [] }
        for stream in streams { stream.shutdown() }
        let stale = engine.withLock { $0 }?.stalePages ?? 0
        logger.event(.postcopyPaused, .warning, "postcopy paused: lost the agent's \(role) connection: \(reason); \(stale) pages still stale, waiting for the agent to rejoin", [
            "peer": "agent", "connection": "\(role)", "reason": "\(reason)", "pages_stale": "\(stale)",
            "reconnect_timeout_s": "\(config.reconnectTimeoutNanos / 1_000_000_000)",
        ])
    }

    /// Both connections of a new generation said a resuming HELLO: tell the
    /// agent which pages are still stale, then ask again for those guest
    /// threads wait on — before the receiving threads start, so nothing
    /// else goes first.
    private func rejoined(epoch: UInt64, from address: String) throws {
        // Lost during switchover, the connections may come back before the
        // VMM has attached and postcopy has its engine.
        let deadline = monotonicNanoseconds() + config.vmmAttachTimeoutNanos
        var engine = self.engine.withLock { $0 }
        while engine == nil, failures.error == nil, monotonicNanoseconds() < deadline {
            sleepNanoseconds(10_000_000)
            engine = self.engine.withLock { $0 }
        }
        let streams = agent.withLock { $0.epoch == epoch ? $0.streams : [:] }
        guard let postcopy = engine, let bulk = streams[.bulk], let urgent = streams[.urgent] else {
            throw MigrationError(.internalFailure, "the agent rejoined, but postcopy never started")
        }
        let stale = postcopy.staleSnapshot()
        for frame in stale.dirtyBitmapMessages() { try bulk.send(frame) }
        try bulk.send(.resync(stalePages: stale.popCount))
        let (asked, pausedFor) = transitions.withLock {
            let now = monotonicNanoseconds()
            let asked = postcopy.rejoin(urgent: urgent, at: now)
            let since = pausedAt.exchange(0, ordering: .relaxed)
            let pausedFor = since > 0 ? now &- since : 0
            pausedNanos.add(pausedFor, ordering: .relaxed)
            context.set("PHASE", session.withLock { $0.phase }.rawValue)
            return (asked, pausedFor)
        }
        logger.event(.postcopyResumed, .notice, "postcopy resumed: the agent rejoined from \(address) after \(fixed(Double(pausedFor) / 1e6, 0)) ms; \(stale.popCount) pages still stale, \(asked) asked for again", [
            "agent_address": "\(address)", "paused_ms": "\(fixed(Double(pausedFor) / 1e6, 1))",
            "pages_stale": "\(stale.popCount)", "pages_rerequested": "\(asked)",
        ])
    }

    // MARK: receiving

    /// Receives on `stream` until the agent closes it, handing each admitted
    /// message's action to `handle`. The end of the stream is normal only
    /// once the migration is complete; before, it is a lost connection.
    private func receive(on stream: MessageStream, _ role: StreamRole, epoch: UInt64,
                         _ handle: (DestinationSession.Action) throws -> Void) {
        do {
            while let message = try stream.receive() {
                let action = try admit(message, on: role, stream)
                if case let .peerFailed(code, text) = action {
                    throw MigrationError(.peerLost, "the agent reported \(code): \(text)")
                }
                // What fails here is this host's (the VMM, guest memory), not
                // the connection's: it ends the migration in any phase.
                do {
                    try handle(action)
                } catch {
                    failures.fail(error as? MigrationError ?? MigrationError(.internalFailure, "\(error)"))
                    return
                }
            }
            lost(role, epoch: epoch, MigrationError(.peerLost, "the agent closed the \(role) connection"))
        } catch let error as MigrationError {
            lost(role, epoch: epoch, error)
        } catch let error as StreamError {
            lost(role, epoch: epoch, MigrationError(error.code, "the agent's \(role) connection: \(error)"))
        } catch let error as SystemCallError where error.errno == .again {
            lost(role, epoch: epoch, MigrationError(.peerLost, "nothing from the agent on the \(role) connection for \(fixed(Double(config.deadPeerTimeoutNanos) / 1e9, 1)) s, not even HEARTBEAT"))
        } catch {
            lost(role, epoch: epoch, MigrationError(.peerLost, "the agent's \(role) connection failed: \(error)"))
        }
    }

    /// The agent's `role` connection of generation `epoch` ended: a pause
    /// during postcopy, nothing once complete or for an older generation,
    /// and the end of the migration before switchover.
    private func lost(_ role: StreamRole, epoch: UInt64, _ error: MigrationError) {
        guard failures.error == nil, !finished.load(ordering: .sequentiallyConsistent) else { return }
        let (pause, phase, current) = transitions.withLock {
            let outcome = session.withLock { ($0.connectionLost(epoch: epoch), $0.phase, $0.epoch) }
            if outcome.0 { pauseEngine() }
            return outcome
        }
        if pause {
            paused(epoch: epoch, because: error.reason, role: role)
            return
        }
        // Already paused, complete, or news of connections given up.
        guard phase != .paused, phase != .complete, phase != .discarded, epoch == current else { return }
        let reason = "\(error.reason) during \(phase)"
        guard failures.fail(MigrationError(error.code, reason)) else { return }
        logger.event(.connectionLost, .error, "lost the agent's \(role) connection: \(reason)", [
            "peer": "agent", "connection": "\(role)", "reason": "\(reason)",
        ])
    }

    /// Performs an action the session admitted on the connection of `role`
    /// (the session admits precopy and switchover actions on bulk only).
    private func handle(_ action: DestinationSession.Action, on role: StreamRole, bulk: MessageStream) throws {
        switch action {
        case let .writePrecopy(run, data):
            data.withUnsafeBytes { bytes in
                // SAFETY: the session validated run against the region.
                (memory.alias.base + Int(run.first * 4096)).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
            }
            summary.withLock { $0.precopyPages += run.count }
        case let .zeroPrecopy(run):
            // SAFETY: the session validated run against the region.
            memset(memory.alias.base + Int(run.first * 4096), 0, Int(run.count * 4096))
            summary.withLock { $0.precopyZeroPages += run.count }
        case let .roundEnded(round, sent, dirty):
            summary.withLock { $0.precopyRounds = round }
            logger.info("precopy round \(round) done: \(sent) pages sent, \(dirty) found changed")
        case let .switchover(stale, sourcePausedAt, handOver):
            try switchover(stale: stale, sourcePausedAt: sourcePausedAt, handOver: handOver, bulk: bulk)
            // From here this thread carries the background stream: it gives
            // way to the fault and urgent threads a blocked guest waits on.
            if role == .bulk { yieldToUrgentWork("the bulk receiver") }
        case let .writePostcopy(run, data, _):
            try currentEngine().fill(run, data: data, urgent: role == .urgent)
        case let .zeroPostcopy(run):
            try currentEngine().fill(run, data: nil, urgent: role == .urgent)
        case let .imageDigest(digest, completes):
            summary.withLock { $0.imageDigest = digest.description }
            logger.info("the source's image digest: \(digest)\(completes ? "; every page is in place" : "")",
                        metadata: ["digest": "\(digest)"])
            if completes { completion.open() }
        case let .handedOver(completes):
            let postcopy = try currentEngine()
            postcopy.pageState?.record(.handedOver)
            let id = session.withLock { $0.migrationID?.description } ?? ""
            logger.event(.pointOfNoReturn, .notice, "hand-over done: the guest runs here, past the point of no return (\(postcopy.stalePages) pages still stale); the source no longer resumes it", [
                "pages_stale": "\(postcopy.stalePages)", "migration_id": "\(id)",
            ])
            if completes { completion.open() }
        case let .discard(reason):
            discard(reason)
        case let .peerFailed(code, text):
            throw MigrationError(.peerLost, "the agent failed (\(code)): \(text)")
        case .none:
            break
        }
    }


    /// Checks `message` against the session; a refusal is reported to the
    /// peer and fails the migration.
    private func admit(_ message: Message, on role: StreamRole, _ stream: MessageStream) throws -> DestinationSession.Action {
        do {
            let (action, newPhase) = try session.withLock { session in
                let before = session.phase
                let action = try session.receive(message, on: role)
                return (action, session.phase != before ? session.phase : nil)
            }
            // Only a few messages move the phase: keep the log context off the per-frame path.
            if let newPhase { context.set("PHASE", newPhase.rawValue) }
            if case let .writePostcopy(_, _, requestID) = action, requestID > 0,
               requestID > (engine.withLock { $0 }?.lastRequestID ?? 0) {
                throw SessionError.unexpected(.pages, phase: .postcopy, role: role)
            }
            return action
        } catch let error as SessionError {
            throw MigrationError(error.code, "refused a frame on the agent's \(role) connection: \(error)")
        }
    }

    /// Moves the calling thread to `config.backgroundScheduling`; a failure
    /// costs latency, not correctness, so it is logged and ignored.
    private func yieldToUrgentWork(_ thread: String) {
        do {
            try OSThread.setCurrentScheduling(config.backgroundScheduling)
        } catch {
            logger.warning("\(thread) keeps its scheduling: \(error)")
        }
    }

    /// DISCARD: the hand-over failed and the source runs the guest again.
    /// This copy must never run: the guest no longer depends on this daemon
    /// (nothing is kept for a takeover), no page is written any more, and
    /// the VMM is told (ERROR discarded) — it keeps the range registered,
    /// so a guest it started anyway blocks on its first stale page.
    private func discard(_ reason: String) {
        guestDepends.store(false, ordering: .sequentiallyConsistent)
        failures.fail(.discarded, "the source's hand-over failed and the source runs the guest again (\(reason)): this copy is discarded and must never run; stop the destination VMM")
    }

    /// A VMM that goes away while the hand-over that starts its guest is
    /// still pending never ran the guest, and no other VMM can take its
    /// place: the copy here is discarded (the source's hand-over fails too,
    /// and its QEMU runs the guest again). The agent is told (ERROR
    /// discarded). Returns false outside a pending hand-over.
    private func vmmGoneBeforeHandOver(_ reason: String) -> Bool {
        let pending = session.withLock { $0.handOverPending && $0.phase.servesPostcopy }
        guard pending else { return false }
        guestDepends.store(false, ordering: .sequentiallyConsistent)
        failures.fail(.discarded, "\(reason), before the hand-over started the guest: the guest never ran here, so this copy is discarded (the source keeps the guest)")
        return true
    }

    private func currentEngine() throws -> PostcopyEngine {
        guard let current = engine.withLock({ $0 }) else {
            throw MigrationError(.internalFailure, "postcopy pages before switchover")
        }
        return current
    }

    // MARK: switchover

    private func switchover(stale: PageBitmap, sourcePausedAt pausedAt: UInt64, handOver: Bool,
                            bulk: MessageStream) throws {
        guard let urgent = agent.withLock({ $0.streams[.urgent] }) else {
            throw MigrationError(.internalFailure, "switchover without the agent's urgent connection")
        }
        summary.withLock { $0.stalePagesAtSwitchover = stale.popCount }
        logger.info("switchover: \(stale.popCount) stale pages")
        guard vmm.attached.wait(timeoutNanos: config.vmmAttachTimeoutNanos), let attachment = vmm.current else {
            try failures.check()
            let refused = vmm.lastRefusal.map { " (last VMM connection refused: \($0))" } ?? ""
            throw MigrationError(.peerLost, "no VMM attached to \(config.vmmSocketPath) within \(config.vmmAttachTimeoutNanos / 1_000_000_000) s of switchover\(refused)")
        }
        let installer = PageInstaller(uffd: attachment.uffd, file: memory.file, guestBase: attachment.guestBase)
        // The record a restarted daemon would take over from: written whole
        // before the guest runs, kept by the VMM (VMM_RESUME passes it) and
        // by systemd's fd store.
        let (id, secretDigest) = try session.withLock { session in
            guard let id = session.migrationID, let secretDigest = session.secretDigest else {
                throw MigrationError(.internalFailure, "switchover before HELLO")
            }
            return (id, secretDigest)
        }
        let recordedAt = realtimeNanoseconds()
        let downtimeSoFar = recordedAt >= pausedAt ? (recordedAt - pausedAt) / 1000 : 0
        let record = prepared.withLock { prepared in
            defer { prepared.record = nil }
            return prepared.record
        }
        let pageState = try inStep("write the page-state record") {
            try PageStateFile(prepared: record, header: PageStateHeader(
                migrationID: id, geometry: memory.geometry, guestBase: attachment.guestBase,
                features: attachment.uffd.features, registerMode: attachment.registerMode,
                stalePagesAtSwitchover: stale.popCount, sourcePausedAtNanos: pausedAt, downtimeMicros: downtimeSoFar,
                secretDigest: secretDigest),
                stale: stale)
        }
        if handOver { pageState.record(.handOverPending) }
        storeDescriptors(pageState: pageState, uffd: attachment.uffd)
        let postcopy = makeEngine(installer: installer, stale: stale, urgent: urgent, pageState: pageState)
        engine.withLock { $0 = postcopy }
        let loop = try makeFaultLoop(installer: installer, resolver: postcopy)
        try loop.start()
        faultLoop.withLock { $0 = loop }
        // From the moment VMM_RESUME may reach the VMM, the guest depends on
        // this daemon: a failure no longer releases it.
        guestDepends.store(true, ordering: .sequentiallyConsistent)
        try vmm.resume(pageState: pageState)
        try awaitResumeAcknowledged()
        let resumedAt = realtimeNanoseconds()
        postcopy.postcopyStartedAt.store(monotonicNanoseconds(), ordering: .relaxed)
        postcopy.cpuMicrosAtResume.store(UInt64(ProcessUsage.cpuSeconds() * 1e6), ordering: .relaxed)
        let downtimeMs = resumedAt >= pausedAt ? Double(resumedAt - pausedAt) / 1e6 : 0
        summary.withLock { $0.downtimeMs = downtimeMs }
        // The guest runs here now, or will once the hand-over is done. An
        // agent that misses RESUMED (its connection lost) finds the
        // migration in postcopy (or hand-over) when it rejoins.
        do {
            try bulk.send(.resumed(destinationResumedAtNanos: resumedAt))
        } catch {
            bulk.shutdown()
        }
        let phase = session.withLock { $0.phase }
        if phase == .postcopy || phase == .handover { context.set("PHASE", phase.rawValue) }
        let starts = handOver ? "guest memory resumed here; the guest starts once the source's hand-over is done (the source may still resume it until then)" : "guest resumed here"
        logger.event(.switchover, .notice, "switchover: \(starts) after \(fixed(downtimeMs, 1)) ms, \(stale.popCount) pages stale", [
            "pages_stale": "\(stale.popCount)", "downtime_ms": "\(fixed(downtimeMs, 1))",
            "hand_over": handOver ? "1" : "0",
        ])
        postcopy.signalCompleteIfDone()
    }

    /// Waits for the VMM's VMM_RESUMED, which the record now says too. The
    /// VMM may run the guest from VMM_RESUME on, so this never gives up: a
    /// VMM that goes away fails the migration (which wakes this), one that
    /// stays silent is reported every `vmmHandshakeTimeoutNanos` while the
    /// source stays paused.
    private func awaitResumeAcknowledged() throws {
        var waited: UInt64 = 0
        while !vmm.resumed.wait(timeoutNanos: config.vmmHandshakeTimeoutNanos) {
            try failures.check()
            waited += config.vmmHandshakeTimeoutNanos
            logger.warning("the VMM has not acknowledged VMM_RESUME (VMM_RESUMED) in \(waited / 1_000_000_000) s; still waiting, and the source stays paused")
        }
        try failures.check()
    }

    /// The engine of postcopy, fed `stale`; with no `urgent` stream it
    /// starts paused.
    private func makeEngine(installer: PageInstaller, stale: PageBitmap, urgent: MessageStream?,
                            pageState: PageStateFile) -> PostcopyEngine {
        let (completion, logger, session) = (self.completion, self.logger, self.session)
        let scratch = prepared.withLock { prepared in
            defer { prepared.scratch = nil }
            return prepared.scratch
        }
        return PostcopyEngine(
            memory: memory, installer: installer, stale: stale, urgent: urgent, pageState: pageState,
            failures: failures, stalls: StallLimiter(thresholdNanos: config.stallWarningNanos),
            tracing: config.tracePath != nil, scratch: scratch,
            onStall: { stall in
                let ms = fixed(Double(stall.stallNanos) / 1e6, 1)
                let more = stall.suppressed > 0 ? " (\(stall.suppressed) more stalls since the last report)" : ""
                logger.event(.faultStalled, .warning, "a guest thread waited \(ms) ms for page \(stall.page)\(more)", [
                    "page": "\(stall.page)", "stall_ms": "\(ms)", "stalls_suppressed": "\(stall.suppressed)",
                ])
            },
            onComplete: {
                // Complete once the source's digest is known too; until
                // IMAGE_DIGEST comes, the daemon waits as it waits for pages.
                if session.withLock({ $0.pagesComplete() }) {
                    completion.open()
                } else {
                    logger.info("every page is in place; waiting for the source's image digest (IMAGE_DIGEST) to complete")
                }
            })
    }

    /// The fault loop, which fails the migration the moment it dies (its
    /// userfaultfd erred or hung up): no fault would be served after that.
    private func makeFaultLoop(installer: PageInstaller, resolver: PostcopyEngine) throws -> FaultLoop {
        let (failures, logger) = (self.failures, self.logger)
        let region = "0x\(String(installer.guestBase, radix: 16))+\(ByteSize.format(memory.geometry.regionSize))"
        let strays = Locked(ReportLimiter())
        return try FaultLoop(installer: installer, resolver: resolver, onFailure: { reason in
            failures.fail(.internalFailure, "the fault loop stopped: \(reason); no guest fault is served any more")
        }, onStray: { address in
            guard let unreported = strays.withLock({ $0.record(at: monotonicNanoseconds()) }) else { return }
            let more = unreported > 0 ? " (\(unreported) more since the last report)" : ""
            logger.warning("a guest thread faulted at 0x\(String(address, radix: 16)), outside guest RAM (\(region)), on the VMM's userfaultfd: woken, not resolved\(more); the VMM registered more than guest RAM with it")
        })
    }

    /// Hands the RAM file, the page-state record and the userfaultfd to
    /// systemd's fd store, when there is one.
    private func storeDescriptors(pageState: PageStateFile, uffd: Userfaultfd) {
        guard let descriptorStore else { return }
        let kept = [(StoredDescriptor.ram, memory.file.fd), (StoredDescriptor.pageState, pageState.fd),
                    (StoredDescriptor.uffd, uffd.fd)].filter { descriptorStore.store($0.1, name: $0.0) }
        if kept.count < 3 {
            logger.warning("systemd's fd store did not take all of guest RAM, the page-state record and the userfaultfd (FileDescriptorStoreMax=?): a restarted postcopyd can take this migration over only if the VMM reattaches")
        }
    }

    // MARK: taking over

    /// Serves the migration taken over: postcopy from the record's stale
    /// pages, paused until the agent rejoins. Guest threads the dead daemon
    /// read faults from (and never answered) are woken, so they fault again.
    private func resumeTakenOver(_ taken: Recovered) throws {
        let header = taken.header
        try confirmVMMHoldsGuest(taken)
        let stale = try inStep("read the page-state record") { try taken.pageState.stalePages() }
        summary.withLock {
            $0.migrationID = header.migrationID.description
            $0.stalePagesAtSwitchover = header.stalePagesAtSwitchover
            $0.downtimeMs = Double(header.downtimeMicros) / 1e3
            $0.tookOver = true
        }
        let installer = PageInstaller(uffd: taken.uffd, file: memory.file, guestBase: header.guestBase)
        let postcopy = makeEngine(installer: installer, stale: stale, urgent: nil, pageState: taken.pageState)
        engine.withLock { $0 = postcopy }
        let now = monotonicNanoseconds()
        pausedAt.store(now, ordering: .relaxed)
        postcopy.postcopyStartedAt.store(now, ordering: .relaxed)
        postcopy.cpuMicrosAtResume.store(UInt64(ProcessUsage.cpuSeconds() * 1e6), ordering: .relaxed)
        let loop = try makeFaultLoop(installer: installer, resolver: postcopy)
        try loop.start()
        faultLoop.withLock { $0 = loop }
        try inStep("wake the guest threads the dead daemon left waiting") {
            try taken.uffd.wake(start: header.guestBase, length: header.geometry.regionSize)
        }
        // A VMM that handed the migration back is told to go on (or to start
        // the guest, if the dead daemon never told it to).
        if taken.vmm != nil {
            try vmm.resume(pageState: taken.pageState)
            // Taken from the VMM: keep them for a daemon restarted after this
            // one too (taken from the store, they are there already).
            storeDescriptors(pageState: taken.pageState, uffd: taken.uffd)
        }
        let source = taken.vmm != nil ? "the VMM's reattachment" : "systemd's file-descriptor store"
        logger.event(.migrationTakenOver, .notice, "took migration \(header.migrationID) over from \(source): \(stale.popCount) of \(header.stalePagesAtSwitchover) pages still stale; paused until the agent rejoins", [
            "takeover_source": "\(source)", "pages_stale": "\(stale.popCount)",
            "pages_stale_at_switchover": "\(header.stalePagesAtSwitchover)",
            "reconnect_timeout_s": "\(config.reconnectTimeoutNanos / 1_000_000_000)",
        ])
        postcopy.signalCompleteIfDone()
    }

    /// A takeover goes on only if the VMM holds the range: it handed the
    /// migration back, or the record says it acknowledged VMM_RESUME, or it
    /// reattaches within `vmmAttachTimeoutNanos`. Otherwise the dead daemon
    /// died before VMM_RESUME reached the VMM: the guest never ran here,
    /// and the migration is discarded rather than served to nobody.
    private func confirmVMMHoldsGuest(_ taken: Recovered) throws {
        let milestones = taken.pageState.milestones
        guard taken.vmm == nil, !milestones.contains(.vmmResumed) else { return }
        let seconds = config.vmmAttachTimeoutNanos / 1_000_000_000
        logger.notice("the page-state record does not show that the VMM acknowledged VMM_RESUME: waiting up to \(seconds) s for the VMM to reattach, which would show that it holds the guest")
        if vmm.attached.wait(timeoutNanos: config.vmmAttachTimeoutNanos), vmm.current != nil { return }
        try failures.check()
        guestDepends.store(false, ordering: .sequentiallyConsistent)
        throw MigrationError(.discarded, "the page-state record shows that the VMM never acknowledged VMM_RESUME, and no VMM reattached within \(seconds) s: the guest never ran here, so there is nothing to take over. The source still holds the guest (paused) and may resume it")
    }

    // MARK: completion

    /// Waits for the last stale page and the source's digest; then tells
    /// the agent and the VMM, and stops serving faults and waits for the VMM
    /// to let go of the range.
    private func finish() throws {
        completion.wait()
        try failures.check()
        // Reached only through switchover, which set both.
        let postcopy = try currentEngine()
        // The latch opens without a failure only once the session has both.
        let digest = try session.withLock { session throws -> ImageDigest in
            guard let digest = session.imageDigest, session.pagesInPlace else {
                throw MigrationError(.internalFailure, "completing without every page or the source's digest")
            }
            session.complete()
            return digest
        }
        let state = postcopy.counters
        let now = monotonicNanoseconds()
        let started = postcopy.postcopyStartedAt.load(ordering: .relaxed)
        let seconds = max(Double(now - started) / 1e9, 1e-9)
        let postcopyCPU = ProcessUsage.cpuSeconds() - Double(postcopy.cpuMicrosAtResume.load(ordering: .relaxed)) / 1e6
        let background = postcopy.backgroundPages.load(ordering: .relaxed)
        let (received, bulk) = agent.withLock { ($0.bytesReceived, $0.streams[.bulk]) }
        let latency = LatencyFigures(nanoseconds: postcopy.staleFaultLatencies)
        let pauses = session.withLock { $0.pauses }
        summary.withLock {
            $0.postcopySeconds = seconds
            $0.postcopyCPUSeconds = max(postcopyCPU, 0)
            $0.faultsClean = state.cleanFaults
            $0.faultsStale = state.staleFaults
            $0.pagesRequested = state.requestedPages
            $0.pageRequests = UInt64(postcopy.lastRequestID)
            $0.duplicatePages = state.duplicatePages
            $0.postcopyPagesUrgent = postcopy.urgentPages.load(ordering: .relaxed)
            $0.postcopyPagesBackground = background
            $0.staleFaultLatency = latency
            $0.backgroundMiBPerSecond = Double(background * 4096) / seconds / 1_048_576
            $0.bytesReceived = received
            $0.pauses = pauses
            $0.pausedSeconds = Double(pausedNanos.load(ordering: .relaxed)) / 1e9
            $0.rejoinToFirstFaultMs = postcopy.rejoinToFirstFaultNanos.map { Double($0) / 1e6 }
        }
        // Every page is here: the agent missing this (its connection lost)
        // changes nothing for the guest. The agent closes its connections
        // once it has COMPLETE; a dead one is found by its silence.
        do {
            guard let bulk else { throw MigrationError(.peerLost, "no agent connection") }
            try bulk.send(.complete(pagesReceived: state.filledPages, faultsClean: state.cleanFaults,
                                    faultsStale: state.staleFaults))
        } catch {
            logger.warning("every page is in place, but the agent could not be told: \(error); its source stays paused until an operator stops it")
        }
        // Stop serving faults before the VMM unregisters the range: a CONTINUE
        // racing the unregister would fail. A guest thread that faults in
        // between waits until the unregister wakes it, then faults normally.
        let loop = faultLoop.withLock { $0 }
        loop?.stop()
        if let reason = loop?.failureReason { throw MigrationError(.internalFailure, "the fault loop stopped: \(reason)") }
        // A daemon that took over from systemd's fd store may finish before
        // the VMM has reattached: it must, to release the range.
        guard vmm.attached.wait(timeoutNanos: config.vmmAttachTimeoutNanos) else {
            try failures.check()
            throw MigrationError(.peerLost, "every page is in place, but the VMM did not reattach within \(config.vmmAttachTimeoutNanos / 1_000_000_000) s to release the range")
        }
        try vmm.complete(imageDigest: digest)
        guard vmm.completed.wait(timeoutNanos: config.vmmCompleteTimeoutNanos) else {
            try failures.check()
            throw MigrationError(.peerLost, "the VMM did not acknowledge VMM_COMPLETE within \(config.vmmCompleteTimeoutNanos / 1_000_000_000) s")
        }
        // The VMM unregistered the range: the guest no longer depends on
        // this daemon, and nothing is written through the alias any more.
        guestDepends.store(false, ordering: .sequentiallyConsistent)
        postcopy.halt()
        try failures.check()
        // The VMM unregistered the range. Wake it once more in case a fault
        // raced the unregister (see Userfaultfd.release), so that no guest
        // thread depends on this daemon after it exits.
        if let attachment = vmm.current {
            try? attachment.uffd.wake(start: attachment.guestBase, length: memory.geometry.regionSize)
        }
        logger.debug("VMM released guest RAM", metadata: ["pages": "\(state.filledPages)"])
        if let path = config.tracePath, let trace = postcopy.traceSnapshot {
            do {
                try writeTextFile(path, trace.csv)
            } catch {
                logger.warning("could not write the postcopy trace to \(path): \(error)")
            }
        }
        // Let the agent close first, so that COMPLETE is read before the
        // sockets go; one that never does is dead and not waited for.
        let deadline = monotonicNanoseconds() + config.deadPeerTimeoutNanos
        while receivers.load(ordering: .relaxed) > 0, monotonicNanoseconds() < deadline {
            sleepNanoseconds(5_000_000)
        }
    }
}
