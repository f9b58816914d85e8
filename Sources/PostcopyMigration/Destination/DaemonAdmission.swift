import Logging
import PostcopyCore
import PostcopyOS
import Synchronization

// The agent's connections: accepted for the whole migration, each admitted
// (TLS, then HELLO and WELCOME) or refused on its own, and kept alive with
// HEARTBEAT.
extension DestinationDaemon {
    // MARK: agent connections

    /// HEARTBEAT on each agent connection, so that the agent can tell a
    /// silent daemon from a dead one. A send that fails is left to the
    /// connection's receiving thread to report.
    func sendHeartbeats() {
        for stream in agent.withLock({ Array($0.streams.values) }) {
            do { try stream.send(.heartbeat) } catch { stream.shutdown() }
        }
    }

    /// Accepts agent connections for the whole migration: the first ones
    /// (each bulk stream and the urgent connection), then, during postcopy,
    /// those an agent rejoins with. A connection
    /// that sends anything but an admissible HELLO, or nothing within
    /// `handshakeTimeoutNanos`, is refused on its own: a stray or hostile
    /// peer does not end the migration. Fails the migration when a pause
    /// outlasts `reconnectTimeoutNanos`.
    func acceptAgents() {
        while !finished.load(ordering: .sequentiallyConsistent), failures.error == nil {
            if let since = session.withLock({ $0.pausedSince }),
               monotonicNanoseconds() &- since > config.reconnectTimeoutNanos {
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
                failures.fail(.internalFailure, "accepting agent connections on \(endpoint)", cause: error)
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
    /// every connection of a generation is there.
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
            let (agentStream, welcome, epoch, superseded, ready, connections) = try session.withLock { session in
                let (before, phase) = (session.epoch, session.phase)
                let (stream, welcome) = try session.hello(hello, at: monotonicNanoseconds())
                // Every connection is in: precopy starts, or postcopy
                // (or the hand-over) goes on after a rejoin.
                let ready = phase != session.phase
                    && [.precopy, .handover, .postcopy].contains(session.phase)
                if session.epoch != before { entered(.paused) }
                // Admitted, the HELLO set the count if it was not known.
                return (stream, welcome, session.epoch, session.epoch != before, ready, (session.bulkStreams ?? 1) + 1)
            }
            admitted()
            timeline.withLock { $0.begin(at: monotonicNanoseconds()) }
            if superseded {
                paused(epoch: epoch - 1, because: "the agent rejoined: it found the connections dead first", stream: agentStream)
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
                let replaced = agent.streams.updateValue(stream, forKey: agentStream)
                if ready { agent.readyEpoch = epoch }
                let start = agent.readyEpoch == epoch && agent.startedEpoch != epoch
                    && agent.streams.count == connections
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
            var fields: Logger.Metadata = ["role": "\(agentStream)", "agent_address": "\(address)",
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
                lost(agentStream, epoch: epoch, error as? MigrationError
                    ?? MigrationError(.peerLost, "the agent's connections failed as they started", cause: error))
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
        let (id, streams) = session.withLock { ($0.migrationID?.description ?? "", $0.bulkStreams ?? 1) }
        summary.withLock {
            $0.migrationID = id
            $0.streams = streams
        }
        entered(.precopy)
        logger.event(.migrationAccepted, .info, "migration \(id) accepted from \(address), \(streams) bulk stream\(streams == 1 ? "" : "s")", [
            "agent_address": "\(address)", "bulk_streams": "\(streams)",
        ])
    }
}
