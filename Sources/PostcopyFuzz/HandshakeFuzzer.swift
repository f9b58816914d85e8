import PostcopyCore

/// The `handshake` target: the daemon's protocol state machine
/// (`DestinationSession`) fed the messages decoded from agent connections
/// that open, send and close in an order the input chooses, the way
/// `DestinationDaemon` drives it: the first message of a connection goes to
/// `hello`, the rest to `receive` on the stream it was admitted as; a decoding
/// error, a refused message, an ERROR from the agent or a close loses the
/// connection (`connectionLost`); `pagesComplete` is called only in
/// postcopy, and `complete` once the session says the migration completes
/// (pages and the image digest both in, in either order).
///
/// Input:
///
///     byte 0     region: bit 0 picks 2 MiB pages; bits 1-7 give n, and the
///                region is n+1 4 KiB pages, or (n mod 4)+1 2 MiB pages
///     byte 1     options: bit 0 a session taking a migration over (paused),
///                bit 1 a daemon configured with `migrationID` and the seeds'
///                secret, bit 2 repairs the checksum of every whole frame sent
///     then events, one byte each plus operands: kind (bits 0-1) and
///     connection slot (bits 2-3) of four
///       0 connect   a new connection in the slot (the one there is closed)
///       1 send      a 2-byte length, then that many bytes, on the slot
///       2 close     the agent closes the slot's connection
///       3 complete  every page is in (ignored outside postcopy); the
///                   session completes if it has the image digest
///
/// Errors are expected; what must hold besides "no trap": the phase moves
/// only along the protocol's transitions; the epoch counts the pauses; the
/// migration and its secret, once known, never change, and an admitted
/// HELLO carries both; a refused HELLO changes nothing; WELCOME carries this
/// region; every action names pages inside the region and comes in a phase
/// that allows it; a switchover's bitmap covers the region and holds the
/// announced count; `connectionLost` pauses exactly when it should; the
/// image digest, once known, never changes, and the session completes only
/// with it and every page in.
enum HandshakeFuzzer {
    /// The migration the seeds' HELLOs name, and a configured daemon serves.
    static let migrationID = MigrationID(high: 0x0011_2233_4455_6677, low: 0x8899_AABB_CCDD_EEFF)

    /// Option bit: the session takes `migrationID` over (paused, epoch 1).
    static let takeOver: UInt8 = 1
    /// Option bit: the daemon is configured with `migrationID` and the secret.
    static let configuredMigration: UInt8 = 2
    /// Option bit: repair the checksum of every whole frame sent.
    static let repairChecksums: UInt8 = 4

    static func run(_ input: inout FuzzInput) {
        _ = session(after: &input)
    }

    /// The session once every event of `input` has happened.
    static func session(after input: inout FuzzInput) -> DestinationSession {
        let geometry = regionGeometry(input.byte())
        let options = input.byte()
        var harness = SessionHarness(geometry: geometry, options: options)
        while !input.isEmpty {
            let event = input.byte()
            let slot = Int(event >> 2 & 3)
            switch event & 3 {
            case 0: harness.connect(slot)
            case 1:
                var bytes = Array(input.bytes(upTo: Int(input.integer(UInt16.self))))
                if options & repairChecksums != 0 { repairFrameChecksums(&bytes) }
                harness.send(bytes, on: slot)
            case 2: harness.close(slot)
            default: harness.completeIfServing()
            }
        }
        return harness.session
    }

    /// The region byte's geometry: small regions, so bitmaps stay small.
    static func regionGeometry(_ byte: UInt8) -> PageGeometry {
        let n = UInt64(byte >> 1)
        let huge = byte & 1 != 0
        // Cannot throw: the sizes are nonzero multiples of their page size.
        return try! PageGeometry(regionSize: huge ? (n % 4 + 1) << 21 : (n + 1) << 12,
                                 pageSize: huge ? .huge2M : .small)
    }

    /// The region byte for `pages` pages of 4 KiB, or of 2 MiB when `huge`:
    /// the inverse of `regionGeometry`.
    static func regionByte(pages: UInt64, huge: Bool) -> UInt8 {
        precondition(pages >= 1 && pages <= (huge ? 4 : 128), "no region byte for \(pages) pages")
        return UInt8((pages - 1) << 1) | (huge ? 1 : 0)
    }
}

/// One session and the agent connections talking to it.
private struct SessionHarness {
    /// An agent connection as the daemon sees it.
    struct Connection {
        var decoder = FrameDecoder()
        /// The stream its HELLO was admitted as; nil before.
        var stream: AgentStream?
        /// The session's epoch when it was admitted.
        var epoch: UInt64 = 0
        var open = true
    }

    var session: DestinationSession
    let takenOver: Bool
    let configuredID: MigrationID?
    var connections: [Connection?] = Array(repeating: nil, count: 4)

    init(geometry: PageGeometry, options: UInt8) {
        takenOver = options & HandshakeFuzzer.takeOver != 0
        configuredID = options & HandshakeFuzzer.configuredMigration != 0 ? HandshakeFuzzer.migrationID : nil
        session = takenOver
            ? DestinationSession(takingOver: HandshakeFuzzer.migrationID, geometry: geometry,
                                 secretDigest: SeedValues.secret.digest)
            : DestinationSession(geometry: geometry, migrationID: configuredID,
                                 secret: configuredID == nil ? nil : SeedValues.secret)
    }

    mutating func connect(_ slot: Int) {
        close(slot)
        connections[slot] = Connection()
    }

    mutating func close(_ slot: Int) {
        if let connection = connections[slot], connection.open { lose(slot) }
        connections[slot] = nil
    }

    /// The agent's bytes arrive on the slot's connection; each whole message
    /// goes to the session until one is refused.
    mutating func send(_ bytes: [UInt8], on slot: Int) {
        guard connections[slot]?.open == true else { return }
        connections[slot]!.decoder.append(bytes)
        while connections[slot]?.open == true {
            let message: Message?
            do throws(ProtocolError) {
                message = try connections[slot]!.decoder.next()
            } catch {
                use(error.description)
                lose(slot)
                return
            }
            guard let message else { return }
            if let stream = connections[slot]!.stream {
                receive(message, on: stream, slot: slot)
            } else {
                hello(message, slot: slot)
            }
        }
    }

    mutating func completeIfServing() {
        guard session.phase.servesPostcopy else { return }
        let before = snapshot
        let completes = session.pagesComplete()
        require(completes == (session.imageDigest != nil && !session.handOverPending),
                "pagesComplete() says \(completes) with digest \(String(describing: session.imageDigest)), a hand-over pending \(session.handOverPending)")
        if completes { session.complete() }
        checkInvariants(since: before)
    }

    private mutating func hello(_ message: Message, slot: Int) {
        let before = snapshot
        do throws(SessionError) {
            let (stream, welcome) = try session.hello(message)
            require(welcome == .welcome(regionSize: session.geometry.regionSize,
                                        destinationPageSize: session.geometry.pageSize),
                    "WELCOME \(welcome) for a region of \(session.geometry)")
            guard case let .hello(id, role, _, _, secret, _, streams, index) = message,
                  role == stream.role, index == stream.index, session.bulkStreams == streams, session.migrationID == id,
                  session.secretDigest?.matches(secret.digest) == true else {
                fatalError("fuzz property broken: \(message) admitted as \(stream) for \(String(describing: session.migrationID))")
            }
            connections[slot]!.stream = stream
            connections[slot]!.epoch = session.epoch
        } catch {
            // Refused: the daemon sends ERROR and closes; nothing was admitted.
            use(error.description)
            require(session.phase == before.phase && session.epoch == before.epoch
                        && session.migrationID == before.migrationID && session.bulkStreams == before.bulkStreams
                        && (session.secretDigest == nil) == (before.secretDigest == nil),
                    "a refused HELLO changed the session (\(before.phase) to \(session.phase))")
            connections[slot]!.open = false
        }
        checkInvariants(since: before)
    }

    private mutating func receive(_ message: Message, on stream: AgentStream, slot: Int) {
        let before = snapshot
        do throws(SessionError) {
            let action = try session.receive(message, on: stream)
            check(action, for: message, before: before)
            if case .peerFailed = action { lose(slot) }
            // The daemon's finish(): the digest, or the hand-over, was the
            // last thing missing.
            if case .imageDigest(_, completes: true) = action { session.complete() }
            if case .handedOver(completes: true) = action { session.complete() }
        } catch {
            use(error.description)
            lose(slot)
        }
        checkInvariants(since: before)
    }

    /// The connection in `slot` failed or ended: the daemon's `lost`.
    private mutating func lose(_ slot: Int) {
        guard let connection = connections[slot], connection.open else { return }
        connections[slot]!.open = false
        guard connection.stream != nil else { return }
        let before = snapshot
        let paused = session.connectionLost(epoch: connection.epoch)
        require(paused == ((before.phase == .postcopy || before.phase == .handover) && connection.epoch == before.epoch),
                "connectionLost(epoch: \(connection.epoch)) returned \(paused) in \(before.phase), epoch \(before.epoch)")
        checkInvariants(since: before)
    }

    private func check(_ action: DestinationSession.Action, for message: Message, before: Snapshot) {
        let pages = session.geometry.smallPageCount
        switch action {
        case let .writePrecopy(run, data), let .writePostcopy(run, data, _):
            require(data.count == Int(run.count) * Message.pageBytes, "\(action) carries \(data.count) bytes")
            require(run.first < pages && run.count <= pages - run.first, "\(run) outside \(pages) pages")
        case let .zeroPrecopy(run), let .zeroPostcopy(run):
            require(run.first < pages && run.count <= pages - run.first, "\(run) outside \(pages) pages")
        case let .switchover(stale, _, handOver):
            guard case let .switchover(announced, _, announcedHandOver) = message, handOver == announcedHandOver else {
                fatalError("fuzz property broken: switchover from \(message)")
            }
            require(stale.count == pages && stale.popCount == announced,
                    "switchover bitmap of \(stale.count) bits, \(stale.popCount) set, announced \(announced)")
            require(before.phase == .switchingOver && session.phase == (handOver ? .handover : .postcopy),
                    "switchover from \(before.phase) to \(session.phase)")
        case let .imageDigest(digest, completes):
            require(message == .imageDigest(digest) && before.imageDigest == nil && session.imageDigest == digest,
                    "\(action) from \(message), the digest known before: \(String(describing: before.imageDigest))")
            require(completes == (session.pagesInPlace && !session.handOverPending),
                    "\(action) with every page in: \(session.pagesInPlace), a hand-over pending \(session.handOverPending)")
            require(before.phase.servesPostcopy, "\(action) during \(before.phase)")
        case let .handedOver(completes):
            require(message == .handedOver && !session.handOverPending && session.switchoverHadHandOver,
                    "\(action) from \(message)")
            require(completes == (session.pagesInPlace && session.imageDigest != nil),
                    "\(action) with every page in: \(session.pagesInPlace), the digest \(session.imageDigest != nil)")
        case .discard:
            require(before.phase.servesPostcopy && session.phase == .discarded && !session.pointOfNoReturnPassed,
                    "\(action) from \(before.phase) to \(session.phase)")
        default:
            break
        }
        switch action {
        case .writePrecopy, .zeroPrecopy:
            require(before.phase == .precopy, "\(action) during \(before.phase)")
        case .writePostcopy, .zeroPostcopy:
            require(before.phase.servesPostcopy, "\(action) during \(before.phase)")
        default:
            break
        }
    }

    /// What the invariants compare across one call into the session.
    struct Snapshot {
        let phase: DestinationSession.Phase
        let epoch: UInt64
        let migrationID: MigrationID?
        let secretDigest: SecretDigest?
        let imageDigest: ImageDigest?
        let bulkStreams: Int?
    }

    var snapshot: Snapshot {
        Snapshot(phase: session.phase, epoch: session.epoch, migrationID: session.migrationID,
                 secretDigest: session.secretDigest, imageDigest: session.imageDigest, bulkStreams: session.bulkStreams)
    }

    private func checkInvariants(since before: Snapshot) {
        require(Self.allowed(from: before.phase, to: session.phase), "phase \(before.phase) → \(session.phase)")
        require(session.epoch >= before.epoch, "epoch went back from \(before.epoch) to \(session.epoch)")
        require(session.epoch == session.pauses + (takenOver ? 1 : 0),
                "epoch \(session.epoch) after \(session.pauses) pauses")
        if let id = before.migrationID {
            require(session.migrationID == id, "migration \(id) became \(String(describing: session.migrationID))")
        }
        if let digest = before.secretDigest {
            require(session.secretDigest?.matches(digest) == true, "the migration's secret changed")
        }
        if let streams = before.bulkStreams {
            require(session.bulkStreams == streams, "\(streams) bulk streams became \(String(describing: session.bulkStreams))")
        }
        if let configuredID {
            require(session.migrationID == configuredID, "a daemon for \(configuredID) serves \(String(describing: session.migrationID))")
        }
        if let digest = before.imageDigest {
            require(session.imageDigest == digest, "the image digest \(digest) became \(String(describing: session.imageDigest))")
        }
        if session.phase == .complete {
            require(session.pagesInPlace && session.imageDigest != nil && !session.handOverPending,
                    "complete without every page, the digest, or the hand-over")
        }
    }

    /// The phase transitions `DestinationSession.Phase` describes.
    static func allowed(from: DestinationSession.Phase, to: DestinationSession.Phase) -> Bool {
        switch (from, to) {
        case (.handshake, .precopy), (.precopy, .switchingOver), (.switchingOver, .postcopy),
             (.switchingOver, .handover), (.handover, .postcopy), (.handover, .paused), (.paused, .handover),
             (.handover, .discarded), (.paused, .discarded),
             (.postcopy, .paused), (.paused, .postcopy), (.postcopy, .complete), (.paused, .complete):
            return true
        default:
            return from == to
        }
    }
}
