import Glibc
import Logging
import PostcopyCore
import PostcopyOS
import Synchronization

// The agent's admitted connections: a receiving thread on each, the
// session's actions performed, and a pause and a rejoin when the
// connections are lost during postcopy.
extension DestinationDaemon {
    // MARK: pause and rejoin

    // A pause: the agent's connections of generation `epoch` are given up
    // during postcopy. The session moves first (to paused, its clock
    // started, the log context's phase set under its lock); then `paused`
    // holds page requests, shuts the connections down and tells the
    // journal. No lock spans the two: the engine's request gate takes news
    // by generation, so a pause reported after the rejoin that followed it
    // changes nothing (`GenerationGate`).

    /// The session paused on losing generation `epoch`'s connections: page
    /// requests are held until a newer generation rejoins, the connections
    /// are shut down, and the journal says so.
    func paused(epoch: UInt64, because reason: String, stream: AgentStream) {
        engine.withLock { $0 }?.pause(lost: epoch)
        let streams = agent.withLock { $0.epoch == epoch ? Array($0.streams.values) : [] }
        for stream in streams { stream.shutdown() }
        let stale = engine.withLock { $0 }?.stalePages ?? 0
        logger.event(.postcopyPaused, .warning, "postcopy paused: lost the agent's \(stream) connection: \(reason); \(stale) pages still stale, waiting for the agent to rejoin", [
            "peer": "agent", "connection": "\(stream)", "reason": "\(reason)", "pages_stale": "\(stale)",
            "reconnect_timeout_s": "\(config.reconnectTimeoutNanos / 1_000_000_000)",
        ])
    }

    /// Every connection of a new generation said a resuming HELLO: tell the
    /// agent (on bulk stream 0) which pages are still stale, then ask again for those guest
    /// threads wait on — before the receiving threads start, so nothing
    /// else goes first.
    func rejoined(epoch: UInt64, from address: String) throws {
        // Lost during switchover, the connections may come back before the
        // VMM has attached and postcopy has its engine.
        engineReady.wait(timeoutNanos: config.vmmAttachTimeoutNanos)
        let engine = self.engine.withLock { $0 }
        let streams = agent.withLock { $0.epoch == epoch ? $0.streams : [:] }
        guard let postcopy = engine, let bulk = streams[.bulk], let urgent = streams[.urgent] else {
            throw MigrationError(.internalFailure, "the agent rejoined, but postcopy never started")
        }
        let stale = postcopy.staleSnapshot()
        for frame in stale.dirtyBitmapMessages() { try bulk.send(frame) }
        try bulk.send(.resync(stalePages: stale.popCount))
        let asked = postcopy.rejoin(urgent: urgent, generation: epoch, at: monotonicNanoseconds())
        let (pausedFor, bulkStreams) = session.withLock { session in
            entered(session.phase)
            return (session.lastPauseNanos, session.bulkStreams ?? 1)
        }
        // A daemon that took the migration over learns the count here.
        summary.withLock { $0.streams = bulkStreams }
        logger.event(.postcopyResumed, .notice, "postcopy resumed: the agent rejoined from \(address) after \(fixed(Double(pausedFor) / 1e6, 0)) ms; \(stale.popCount) pages still stale, \(asked) asked for again", [
            "agent_address": "\(address)", "paused_ms": "\(fixed(Double(pausedFor) / 1e6, 1))",
            "pages_stale": "\(stale.popCount)", "pages_rerequested": "\(asked)",
        ])
    }

    // MARK: receiving

    /// Starts a receiving thread on each connection of generation `epoch`:
    /// `postcopy-urgent`, `postcopy-bulk` (bulk stream 0), `postcopy-bulk-1`, …
    func startReceiving(epoch: UInt64) throws {
        let streams = agent.withLock { $0.epoch == epoch ? $0.streams : [:] }
        guard let control = streams[.bulk], streams[.urgent] != nil else { return }
        let order = streams.keys.sorted { ($0.role == .urgent ? -1 : $0.index) < ($1.role == .urgent ? -1 : $1.index) }
        let rejoining = session.withLock { $0.phase == .postcopy || $0.phase == .handover }
        for agentStream in order {
            guard let stream = streams[agentStream] else { continue }
            let ended = Latch()
            receivers.withLock { $0.append(ended) }
            let name = agentStream.role == .urgent ? "postcopy-urgent"
                : agentStream.isControl ? "postcopy-bulk" : "postcopy-bulk-\(agentStream.index)"
            let thread = try OSThread.start(name: name) { [self] in
                defer { ended.open() }
                // A rejoined bulk connection carries the background stream
                // from its first frame (the first ones do from switchover).
                receive(on: stream, agentStream, epoch: epoch, background: rejoining) { action in
                    try handle(action, on: agentStream, control: control)
                }
            }
            agent.withLock { $0.threads.append(thread) }
        }
    }

    /// Receives on `stream` until the agent closes it, handing each admitted
    /// message's action to `handle`. The end of the stream is normal only
    /// once the migration is complete; before, it is a lost connection.
    ///
    /// A bulk stream's receiver moves itself to `backgroundScheduling` once
    /// postcopy has its engine (at once when `background`: a rejoin): from
    /// then on it carries the background stream.
    private func receive(on stream: MessageStream, _ agentStream: AgentStream, epoch: UInt64, background: Bool,
                         _ handle: (DestinationSession.Action) throws -> Void) {
        let limits = RegionLimits(memory.geometry)
        // Postcopy's engine, once there is one: from then on pages are
        // admitted and written with no lock the other receivers take.
        var postcopy: PostcopyEngine?
        var yielded = false
        func yieldOnceInPostcopy() {
            guard agentStream.role == .bulk, !yielded, background || postcopy != nil else { return }
            yielded = true
            yieldToUrgentWork("the \(agentStream) receiver")
        }
        do {
            yieldOnceInPostcopy()
            while let message = try stream.receive() {
                if postcopy == nil {
                    postcopy = engine.withLock { $0 }
                    yieldOnceInPostcopy()
                }
                if let postcopy, try fillWithoutLocks(message, on: agentStream, limits: limits, postcopy) { continue }
                // The dirty bitmap waits for every stream's last round.
                if agentStream.isControl, case .dirtyBitmap = message { try awaitStreamsDrained() }
                let action = try admit(message, on: agentStream, stream)
                if case .roundEnd = message { roundEnded() }
                if case let .peerFailed(code, text) = action {
                    throw MigrationError(.peerLost, "the agent reported \(code): \(text)")
                }
                // What fails here is this host's (the VMM, guest memory), not
                // the connection's: it ends the migration in any phase.
                do {
                    try handle(action)
                } catch {
                    failures.fail(error as? MigrationError ?? MigrationError(.internalFailure, cause: error))
                    return
                }
            }
            lost(agentStream, epoch: epoch, MigrationError(.peerLost, "the agent closed the \(agentStream) connection"))
        } catch let error as MigrationError {
            lost(agentStream, epoch: epoch, error)
        } catch let error as StreamError {
            lost(agentStream, epoch: epoch, MigrationError(error.code, "the agent's \(agentStream) connection", cause: error))
        } catch let error as SystemCallError where error.errno == .again {
            lost(agentStream, epoch: epoch, MigrationError(.peerLost, "nothing from the agent on the \(agentStream) connection for \(fixed(Double(config.deadPeerTimeoutNanos) / 1e9, 1)) s, not even HEARTBEAT"))
        } catch {
            lost(agentStream, epoch: epoch, MigrationError(.peerLost, "the agent's \(agentStream) connection failed", cause: error))
        }
    }

    /// The agent's `stream` connection of generation `epoch` ended: a pause
    /// during postcopy, nothing once complete or for an older generation,
    /// and the end of the migration before switchover.
    func lost(_ stream: AgentStream, epoch: UInt64, _ error: MigrationError) {
        guard failures.error == nil, !finished.load(ordering: .sequentiallyConsistent) else { return }
        let (pause, phase, current) = session.withLock { session in
            let pause = session.connectionLost(epoch: epoch, at: monotonicNanoseconds())
            if pause { entered(session.phase) }
            return (pause, session.phase, session.epoch)
        }
        if pause {
            paused(epoch: epoch, because: error.reason, stream: stream)
            return
        }
        // Already paused, complete, or news of connections given up.
        guard phase != .paused, phase != .complete, phase != .discarded, epoch == current else { return }
        let failure = MigrationError(error.code, cause: error) { cause in
            cause.map { "\($0) during \(phase)" } ?? "lost the agent's \(stream) connection during \(phase)"
        }
        guard failures.fail(failure) else { return }
        logger.event(.connectionLost, .error, "lost the agent's \(stream) connection: \(failure.reason)", [
            "peer": "agent", "connection": "\(stream)", "reason": "\(failure.reason)",
        ])
    }

    /// Performs an action the session admitted on the connection `stream`
    /// (the session admits precopy actions on bulk streams only, and
    /// switchover on bulk stream 0, `control`, alone).
    private func handle(_ action: DestinationSession.Action, on stream: AgentStream, control: MessageStream) throws {
        switch action {
        case let .writePrecopy(run, data):
            // The session validated run against the region.
            try data.withUnsafeBytes { try memory.write($0, to: run) }
            summary.withLock { $0.precopyPages += run.count }
        case let .zeroPrecopy(run):
            try memory.write(nil, to: run)
            summary.withLock { $0.precopyZeroPages += run.count }
        case let .roundEnded(round, sent, dirty):
            summary.withLock { $0.precopyRounds = round }
            logger.info("precopy round \(round) done: \(sent) pages sent, \(dirty) found changed")
        case let .switchover(stale, sourcePausedAt, handOver):
            // From here the bulk receivers carry the background stream: each
            // gives way (`receive`) to the fault and urgent threads a blocked
            // guest waits on.
            try switchover(stale: stale, sourcePausedAt: sourcePausedAt, handOver: handOver, control: control)
        case let .writePostcopy(run, data, _):
            try currentEngine().fill(run, data: data, urgent: stream.role == .urgent)
        case let .zeroPostcopy(run):
            try currentEngine().fill(run, data: nil, urgent: stream.role == .urgent)
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


    /// PAGES and ZERO_PAGES once postcopy has its engine: admitted by the
    /// session's rules for them, which need none of its state, and written
    /// at once; true when `message` was one. A refusal is reported as
    /// `admit` reports it.
    private func fillWithoutLocks(_ message: Message, on stream: AgentStream, limits: RegionLimits,
                                  _ postcopy: PostcopyEngine) throws -> Bool {
        let action: DestinationSession.Action?
        do {
            action = try DestinationSession.postcopyPages(message, on: stream, limits: limits)
            try refuseUnasked(action, on: stream, lastSent: postcopy.lastRequestID)
        } catch {
            // Both throw SessionError only.
            throw refused(error, on: stream)
        }
        switch action {
        case let .writePostcopy(run, data, _)?:
            try postcopy.fill(run, data: data, urgent: stream.role == .urgent)
        case let .zeroPostcopy(run)?:
            try postcopy.fill(run, data: nil, urgent: stream.role == .urgent)
        default:
            return false
        }
        return true
    }

    /// Checks `message` against the session; a refusal is reported to the
    /// peer and fails the migration.
    private func admit(_ message: Message, on agentStream: AgentStream, _ stream: MessageStream) throws -> DestinationSession.Action {
        do {
            let (action, newPhase) = try session.withLock { session in
                let before = session.phase
                let action = try session.receive(message, on: agentStream)
                return (action, session.phase != before ? session.phase : nil)
            }
            // Only a few messages move the phase: keep the log context off the per-frame path.
            if let newPhase { entered(newPhase) }
            try refuseUnasked(action, on: agentStream, lastSent: engine.withLock { $0 }?.lastRequestID ?? 0)
            return action
        } catch let error as SessionError {
            throw refused(error, on: agentStream)
        }
    }

    // MARK: the streams' last round

    /// Waits until every bulk stream has ended the round bulk stream 0
    /// ended last, so that the dirty bitmap, which follows that round on
    /// bulk stream 0, is applied only once the other streams' pages of it
    /// are written (`PrecopyRounds`, the drain rule). The agent sends the
    /// bitmap after every stream's ROUND_END, so this waits only for pages
    /// already on their way; a stream that ends nothing for the dead-peer
    /// timeout fails the migration.
    private func awaitStreamsDrained() throws {
        var behind: [Int] = []
        var progressAt = monotonicNanoseconds()
        while true {
            let (now, round, waitOn) = session.withLock { session in
                // Taken under the session's lock: a ROUND_END handled after
                // this check opens this latch (`roundEnded`).
                (session.streamsBehind, session.precopyRound, roundEnds.withLock { $0 })
            }
            guard !now.isEmpty else { return }
            try failures.check()
            if now != behind {
                behind = now
                progressAt = monotonicNanoseconds()
            } else if monotonicNanoseconds() - progressAt > config.deadPeerTimeoutNanos {
                throw MigrationError(.protocolViolation, "the dirty bitmap came after round \(round), but bulk stream\(now.count == 1 ? "" : "s") \(now.map(String.init).joined(separator: ", ")) ended no round for \(fixed(Double(config.deadPeerTimeoutNanos) / 1e9, 1)) s")
            }
            waitOn.wait(timeoutNanos: 100_000_000)
        }
    }

    /// A bulk stream's ROUND_END was handled: wakes `awaitStreamsDrained`.
    private func roundEnded() {
        let old = roundEnds.withLock { latch in
            defer { latch = Latch() }
            return latch
        }
        old.open()
    }

    /// Requested pages must answer a PAGE_REQUEST this daemon sent (the
    /// session knows ids only as nonzero; the request sender knows which).
    private func refuseUnasked(_ action: DestinationSession.Action?, on stream: AgentStream,
                               lastSent: UInt32) throws(SessionError) {
        if case let .writePostcopy(_, _, requestID)? = action, requestID > lastSent {
            throw .unexpected(.pages, phase: .postcopy, stream: stream)
        }
    }

    /// A frame the session refused, as the migration's error.
    private func refused(_ error: SessionError, on stream: AgentStream) -> MigrationError {
        MigrationError(error.code, "refused a frame on the agent's \(stream) connection", cause: error)
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


    func currentEngine() throws -> PostcopyEngine {
        guard let current = engine.withLock({ $0 }) else {
            throw MigrationError(.internalFailure, "postcopy pages before switchover")
        }
        return current
    }
}
