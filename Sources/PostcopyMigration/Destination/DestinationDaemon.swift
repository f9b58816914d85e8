import Glibc
import Logging
import PostcopyCore
import PostcopyOS
import Synchronization

/// One incoming migration, start to finish: owns guest RAM, listens for the
/// agent (TCP) and the VMM (unix socket), takes precopy pages, switches
/// over, serves faults during postcopy and reports a summary.
///
/// Threads: one each for the bulk connection, the urgent connection, the
/// VMM socket and the fault loop; the caller's thread accepts the agent and
/// then waits for completion and finishes the migration. Any failure on any
/// of them fails the migration: every peer gets ERROR with the reason, every
/// socket is shut down, and `run` throws that reason.
public final class DestinationDaemon: @unchecked Sendable {
    // SAFETY (@unchecked): `summary`, `session` state and the streams are set
    // up by the bulk thread before the threads that read them start, or are
    // behind a Mutex/Atomic.
    public let config: DestinationConfig
    public let memory: GuestMemory
    public let tcp: TCPListener
    private let logger: Logger
    private let failures: FailureLatch
    private let vmm: VMMLink
    private let session: Mutex<DestinationSession>
    private let streams = Mutex<[MessageStream]>([])
    private let engine = Mutex<PostcopyEngine?>(nil)
    private let faultLoop = Mutex<FaultLoop?>(nil)
    private let completion = Latch()
    private let summary = Mutex(DestinationSummary())
    /// Fields of every log record (MIGRATION_ID, PHASE, POSTCOPYD_INSTANCE).
    public let context: LogContext
    private let startedAt = monotonicNanoseconds()
    private let agentAddresses = Mutex<[String]>([])
    private let receiveRate = Mutex(RateMeter())

    /// Allocates guest RAM and starts listening on both sockets. `context`
    /// is kept current with the migration's id and phase for the log handler.
    public init(config: DestinationConfig, logger: Logger, context: LogContext = LogContext()) throws {
        self.config = config
        self.logger = logger
        self.context = context
        context.set("POSTCOPYD_INSTANCE", config.instance)
        context.set("PHASE", DestinationSession.Phase.handshake.rawValue)
        if let id = config.migrationID { context.set("MIGRATION_ID", id.description) }
        let backing = Backing.choose(config.memory, hugetlbfsDirectory: config.hugetlbfsDirectory)
        memory = try inStep("create guest RAM (\(ByteSize.format(config.regionSize)), \(backing))") {
            try GuestMemory(backing: backing, size: config.regionSize)
        }
        tcp = try inStep("listen for the agent on \(config.listen)") { try TCPListener(endpoint: config.listen) }
        let unix = try inStep("listen for the VMM on \(config.vmmSocketPath)") {
            try UnixListener(path: config.vmmSocketPath, owner: config.vmmUID)
        }
        session = Mutex(DestinationSession(geometry: memory.geometry, migrationID: config.migrationID))
        failures = FailureLatch()
        vmm = VMMLink(listener: unix, memory: memory, allowedUID: config.vmmUID, failures: failures, logger: logger)
        failures.whenFailed { [weak self] error in self?.shutDown(reporting: error) }
        summary.withLock {
            $0.memory = backing.description
            $0.regionBytes = config.regionSize
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
        var threads: [OSThread] = []
        defer {
            faultLoop.withLock { $0 }?.stop()
            for stream in streams.withLock({ $0 }) { stream.shutdown() }
            for thread in threads { thread.join() }
            vmm.join()
        }
        do {
            let (bulk, urgent) = try acceptAgent()
            threads.append(try OSThread.start(name: "postcopy-urgent") { [self] in
                receive(on: urgent, .urgent) { action in try handle(action, on: .urgent, bulk: bulk, urgent: urgent) }
            })
            threads.append(try OSThread.start(name: "postcopy-bulk") { [self] in
                receive(on: bulk, .bulk) { action in try handle(action, on: .bulk, bulk: bulk, urgent: urgent) }
            })
            try finish(bulk: bulk)
            // The agent closes its connections once it has COMPLETE.
            for thread in threads { thread.join() }
        } catch {
            failures.fail(error as? MigrationError ?? MigrationError(.internalFailure, "\(error)"))
        }
        if let error = failures.error {
            logger.event(.migrationFailed, .error, "migration failed: \(error.reason)", [
                "error_code": "\(error.code)", "reason": "\(error.reason)",
            ])
            context.set("PHASE", "failed")
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
        ])
        return result
    }

    /// Ends the migration with `reason` (an operator's stop or cancel):
    /// every peer is told, every thread wakes, and `run` throws.
    public func cancel(_ reason: String) {
        failures.fail(.cancelled, reason)
    }

    /// Where the migration is now, for `postcopyctl status` and sd_notify.
    public func status() -> DaemonStatus {
        var status = DaemonStatus()
        status.instance = config.instance
        status.pid = getpid()
        status.uptimeSeconds = Double(monotonicNanoseconds() - startedAt) / 1e9
        let (phase, id) = session.withLock { ($0.phase, $0.migrationID) }
        status.migrationID = id?.description ?? ""
        status.failure = failures.error?.reason
        status.phase = status.failure == nil ? phase.rawValue : "failed"
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
        if phase == .postcopy || phase == .complete { status.downtimeMs = summary.downtimeMs }
        if let postcopy = engine.withLock({ $0 }) {
            let state = postcopy.counters
            status.stalePagesLeft = state.stalePages
            status.faultsClean = state.cleanFaults
            status.faultsStale = state.staleFaults
            status.pagesRequested = state.requestedPages
            status.duplicatePages = state.duplicatePages
            status.staleFaultLatency = LatencyFigures(nanoseconds: postcopy.staleFaultLatencies)
        }
        status.bytesReceived = streams.withLock { $0.reduce(0) { $0 + $1.bytesReceived.load(ordering: .relaxed) } }
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
    private func shutDown(reporting error: MigrationError) {
        for stream in streams.withLock({ $0 }) { stream.fail(error.code, error.reason) }
        vmm.shutdown(reporting: error)
        _ = Glibc.shutdown(tcp.fd, Int32(SHUT_RDWR))
        completion.open()
    }

    // MARK: handshake

    /// Accepts connections until the agent's bulk and urgent ones said HELLO.
    /// A connection that sends anything else, or nothing within
    /// `handshakeTimeoutNanos`, is refused on its own: a stray or hostile
    /// peer does not end the migration.
    private func acceptAgent() throws -> (bulk: MessageStream, urgent: MessageStream) {
        var bulk: MessageStream?
        var urgent: MessageStream?
        while bulk == nil || urgent == nil {
            let connection = try tcp.accept(keepAlive: config.keepAlive)
            let stream = MessageStream(connection, peer: "agent")
            do {
                try connection.setReceiveTimeout(config.handshakeTimeoutNanos)
                guard let hello = try stream.receive() else { continue }
                let (role, welcome) = try session.withLock { try $0.hello(hello) }
                try connection.setReceiveTimeout(nil)
                try stream.send(welcome)
                streams.withLock { $0.append(stream) }
                if role == .bulk { bulk = stream } else { urgent = stream }
                let id = session.withLock { $0.migrationID?.description ?? "" }
                let address = connection.peerEndpoint.map { "\($0)" } ?? "unknown"
                agentAddresses.withLock { $0.append(address) }
                context.set("MIGRATION_ID", id)
                logger.info("agent connected", metadata: ["role": "\(role)", "agent_address": "\(address)"])
            } catch let error as SessionError {
                logger.warning("refused an agent connection: \(error)")
                stream.fail(error.code, error.description)
            } catch {
                logger.warning("refused an agent connection: no valid HELLO: \(error)")
                stream.fail((error as? StreamError)?.code ?? .protocolViolation, "no valid HELLO: \(error)")
            }
            try failures.check()
        }
        let id = session.withLock { $0.migrationID?.description ?? "" }
        summary.withLock { $0.migrationID = id }
        context.set("PHASE", session.withLock { $0.phase.rawValue })
        let addresses = agentAddresses.withLock { $0 }
        logger.event(.migrationAccepted, .info, "migration \(id) accepted from \(addresses.last ?? "unknown")", [
            "agent_address": "\(addresses.last ?? "unknown")",
        ])
        return (bulk!, urgent!)
    }

    // MARK: receiving

    /// Receives on `stream` until the agent closes it, handing each admitted
    /// message's action to `handle`. The end of the stream is normal only
    /// once the migration is complete; any error fails the migration.
    private func receive(on stream: MessageStream, _ role: StreamRole,
                         _ handle: (DestinationSession.Action) throws -> Void) {
        do {
            while let message = try stream.receive() {
                try handle(try admit(message, on: role, stream))
            }
            let phase = session.withLock { $0.phase }
            if phase != .complete, failures.error == nil {
                lost(role, MigrationError(.peerLost, "the agent closed the \(role) connection during \(phase)"))
            }
        } catch {
            guard failures.error == nil else { return }
            let phase = session.withLock { $0.phase }
            switch error {
            case let error as MigrationError: failures.fail(error)
            case let error as StreamError:
                lost(role, MigrationError(error.code, "the agent's \(role) connection during \(phase): \(error)"))
            default:
                lost(role, MigrationError(.peerLost, "the agent's \(role) connection failed during \(phase): \(error)"))
            }
        }
    }

    /// The agent's `role` connection ended before the migration did.
    private func lost(_ role: StreamRole, _ error: MigrationError) {
        guard failures.fail(error) else { return }
        logger.event(.connectionLost, .error, "lost the agent's \(role) connection: \(error.reason)", [
            "peer": "agent", "connection": "\(role)", "reason": "\(error.reason)",
        ])
    }

    /// Performs an action the session admitted on the connection of `role`
    /// (the session admits precopy and switchover actions on bulk only).
    private func handle(_ action: DestinationSession.Action, on role: StreamRole, bulk: MessageStream,
                        urgent: MessageStream) throws {
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
        case let .switchover(stale, pausedAt, digest):
            try switchover(stale: stale, pausedAt: pausedAt, digest: digest, bulk: bulk, urgent: urgent)
            // From here this thread carries the background stream: it gives
            // way to the fault and urgent threads a blocked guest waits on.
            if role == .bulk { yieldToUrgentWork("the bulk receiver") }
        case let .writePostcopy(run, data, _):
            try currentEngine().fill(run, data: data, urgent: role == .urgent)
        case let .zeroPostcopy(run):
            try currentEngine().fill(run, data: nil, urgent: role == .urgent)
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

    private func currentEngine() throws -> PostcopyEngine {
        guard let current = engine.withLock({ $0 }) else {
            throw MigrationError(.internalFailure, "postcopy pages before switchover")
        }
        return current
    }

    // MARK: switchover

    private func switchover(stale: PageBitmap, pausedAt: UInt64, digest: ImageDigest, bulk: MessageStream,
                            urgent: MessageStream) throws {
        summary.withLock {
            $0.stalePagesAtSwitchover = stale.popCount
            $0.imageDigest = digest.description
        }
        logger.info("switchover: \(stale.popCount) stale pages", metadata: ["digest": "\(digest)"])
        guard vmm.attached.wait(timeoutNanos: config.vmmAttachTimeoutNanos), let attachment = vmm.current else {
            try failures.check()
            throw MigrationError(.peerLost, "no VMM attached to \(config.vmmSocketPath) within \(config.vmmAttachTimeoutNanos / 1_000_000_000) s of switchover")
        }
        let installer = PageInstaller(uffd: attachment.uffd, file: memory.file, guestBase: attachment.guestBase)
        let completion = self.completion
        let logger = self.logger
        let postcopy = PostcopyEngine(
            memory: memory, installer: installer, stale: stale, urgent: urgent, failures: failures,
            stalls: StallLimiter(thresholdNanos: config.stallWarningNanos), tracing: config.tracePath != nil,
            onStall: { stall in
                let ms = fixed(Double(stall.stallNanos) / 1e6, 1)
                let more = stall.suppressed > 0 ? " (\(stall.suppressed) more stalls since the last report)" : ""
                logger.event(.faultStalled, .warning, "a guest thread waited \(ms) ms for page \(stall.page)\(more)", [
                        "page": "\(stall.page)", "stall_ms": "\(ms)", "stalls_suppressed": "\(stall.suppressed)",
                    ])
            },
            onComplete: { completion.open() })
        engine.withLock { $0 = postcopy }
        let loop = try FaultLoop(installer: installer, resolver: postcopy)
        try loop.start()
        faultLoop.withLock { $0 = loop }
        try vmm.resume(imageDigest: digest)
        let resumedAt = realtimeNanoseconds()
        postcopy.postcopyStartedAt.store(monotonicNanoseconds(), ordering: .relaxed)
        postcopy.cpuMicrosAtResume.store(UInt64(ProcessUsage.cpuSeconds() * 1e6), ordering: .relaxed)
        let downtimeMs = resumedAt >= pausedAt ? Double(resumedAt - pausedAt) / 1e6 : 0
        summary.withLock { $0.downtimeMs = downtimeMs }
        try bulk.send(.resumed(destinationResumedAtNanos: resumedAt))
        context.set("PHASE", DestinationSession.Phase.postcopy.rawValue)
        logger.event(.switchover, .notice, "switchover: guest resumed here after \(fixed(downtimeMs, 1)) ms, \(stale.popCount) pages stale", [
            "pages_stale": "\(stale.popCount)", "downtime_ms": "\(fixed(downtimeMs, 1))",
        ])
        postcopy.signalCompleteIfDone()
    }

    // MARK: completion

    /// Waits for the last stale page; then tells the agent and the VMM, and
    /// stops serving faults and waits for the VMM to let go of the range.
    private func finish(bulk: MessageStream) throws {
        completion.wait()
        try failures.check()
        // Reached only through switchover, which set both.
        let postcopy = try currentEngine()
        session.withLock { $0.complete() }
        let state = postcopy.counters
        let now = monotonicNanoseconds()
        let started = postcopy.postcopyStartedAt.load(ordering: .relaxed)
        let seconds = max(Double(now - started) / 1e9, 1e-9)
        let postcopyCPU = ProcessUsage.cpuSeconds() - Double(postcopy.cpuMicrosAtResume.load(ordering: .relaxed)) / 1e6
        let background = postcopy.backgroundPages.load(ordering: .relaxed)
        let received = streams.withLock { $0.reduce(0) { $0 + $1.bytesReceived.load(ordering: .relaxed) } }
        let latency = LatencyFigures(nanoseconds: postcopy.staleFaultLatencies)
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
        }
        try bulk.send(.complete(pagesReceived: state.filledPages, faultsClean: state.cleanFaults,
                                faultsStale: state.staleFaults))
        // Stop serving faults before the VMM unregisters the range: a CONTINUE
        // racing the unregister would fail. A guest thread that faults in
        // between waits until the unregister wakes it, then faults normally.
        let loop = faultLoop.withLock { $0 }
        loop?.stop()
        if let reason = loop?.failureReason { throw MigrationError(.internalFailure, "fault loop: \(reason)") }
        try vmm.complete()
        guard vmm.completed.wait(timeoutNanos: config.vmmCompleteTimeoutNanos) else {
            try failures.check()
            throw MigrationError(.peerLost, "the VMM did not acknowledge VMM_COMPLETE within \(config.vmmCompleteTimeoutNanos / 1_000_000_000) s")
        }
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
    }
}
