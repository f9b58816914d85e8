/// What the daemon's side of one migration accepts, in which order: the
/// handshake on every TCP connection (the bulk streams and the urgent
/// connection), precopy, the dirty bitmap, switchover, postcopy — and, when
/// the agent's connections are lost during postcopy, paused until the agent
/// rejoins with a resuming HELLO on each.
///
/// **Bulk streams.** The first admitted HELLO says how many bulk streams
/// the migration has; every later HELLO, rejoins included, must say the
/// same and name a stream not yet connected in its generation. Precopy
/// pages come on any bulk stream, each stream ends each round on its own
/// (`PrecopyRounds`, which also holds the rule that drains them before the
/// dirty bitmap), and every control message travels on bulk stream 0.
/// A value-type state machine: it checks each message against the phase and
/// the region and returns what to do with it; the daemon performs the
/// action. It never touches memory or sockets.
///
/// **The point of no return.** Until the guest may run on the destination,
/// a failure resumes the source and the destination discards its copy;
/// after it, the guest runs here and a failure pauses it in place (its
/// faults wait for a restarted postcopyd). A SWITCHOVER without `handOver`
/// passes the point when the VMM acknowledges VMM_RESUME (the daemon then
/// sends RESUMED). With `handOver` the guest starts only once the agent's
/// hand-over has moved the VMM's device state: the session waits in
/// `handover` for HANDED_OVER (the point passed) or DISCARD (the source
/// runs the guest again: `discarded`).
///
/// **Completion** needs three things, which arrive in any order: every
/// page in place (`pagesComplete()`, from the tracker), the source's image
/// digest (IMAGE_DIGEST, which the agent sends on the bulk connection once
/// the guest has resumed, and again after every rejoin), and the point of
/// no return passed. Whichever comes last says that the migration
/// completes now; the daemon then calls `complete()`, and passes the digest
/// on in VMM_COMPLETE.
public struct DestinationSession: Sendable {
    public enum Phase: String, Sendable, CustomStringConvertible {
        /// Waiting for the agent's connections.
        case handshake
        case precopy
        /// DIRTY_BITMAP frames are arriving; the source is paused.
        case switchingOver = "switchover"
        /// The guest's memory is resumed here, but the guest starts only
        /// once the agent's hand-over is done: the source is paused and may
        /// still resume. Postcopy serves pages as in `postcopy`.
        case handover
        /// The guest runs here: past the point of no return.
        case postcopy
        /// Postcopy (or a hand-over) whose agent connections were lost:
        /// clean faults are still served, stale ones wait for the agent to
        /// rejoin.
        case paused
        case complete
        /// The hand-over failed and the source runs the guest again
        /// (DISCARD): this copy must never run.
        case discarded

        /// Postcopy serves the guest's faults: `handover`, `postcopy`, `paused`.
        public var servesPostcopy: Bool { self == .handover || self == .postcopy || self == .paused }
        public var description: String { rawValue }
    }

    /// What the daemon does with a message the session accepted.
    public enum Action: Equatable, Sendable {
        /// Precopy pages: write them through the alias (nothing runs yet).
        case writePrecopy(PageRun, ArraySlice<UInt8>)
        /// Precopy pages that became zero: zero them through the alias.
        case zeroPrecopy(PageRun)
        /// Postcopy pages (background when `requestID` is 0): claim, write, commit.
        case writePostcopy(PageRun, ArraySlice<UInt8>, requestID: UInt32)
        /// Postcopy pages that are zero on the source: claim, zero, commit.
        case zeroPostcopy(PageRun)
        /// Every bulk stream ended `round`: its figures, added up.
        case roundEnded(round: UInt32, pagesSent: UInt64, dirtyPages: UInt64)
        /// The source is paused and every stale page is known: resume the
        /// guest's memory; `handOver`: the guest starts only after the
        /// agent's hand-over (HANDED_OVER).
        case switchover(stale: PageBitmap, sourcePausedAtNanos: UInt64, handOver: Bool)
        /// The source's image digest, the first time it arrives. `completes`:
        /// the migration completes now (every page in place, the point of no
        /// return passed).
        case imageDigest(ImageDigest, completes: Bool)
        /// HANDED_OVER, the first time: the point of no return has passed.
        /// `completes` as for `imageDigest`.
        case handedOver(completes: Bool)
        /// DISCARD: the source runs the guest again; this copy must never
        /// run, and the migration ends discarded.
        case discard(reason: String)
        /// The peer sent ERROR: it is closing the connection.
        case peerFailed(code: ErrorCode, message: String)
        /// Nothing to do (HEARTBEAT).
        case none
    }

    public let geometry: PageGeometry
    /// The migration this daemon serves; nil to accept the first HELLO's.
    public private(set) var migrationID: MigrationID?
    /// Where the session is, with what means something there; `phase` and
    /// the properties about the pause, the digest and the hand-over read it
    /// (DestinationSession+State.swift).
    private(set) var state: State = .handshake(connected: [])
    /// The generation of the agent's connections: bumped each time they are
    /// lost during postcopy, so that news from an older generation (a
    /// receiver still winding down) is recognised as stale.
    public private(set) var epoch: UInt64 = 0
    /// Times postcopy was paused by a lost connection.
    public private(set) var pauses: UInt64 = 0
    /// Time paused in the pauses that ended, and in the last of them.
    public private(set) var pausedNanos: UInt64 = 0
    public private(set) var lastPauseNanos: UInt64 = 0

    /// The digest of the secret every HELLO must carry: the configured one,
    /// else the first admitted HELLO's.
    public private(set) var secretDigest: SecretDigest?

    /// How many bulk streams the migration has: what the first admitted
    /// HELLO said (a daemon that took a migration over learns it from the
    /// first rejoining one). Every later HELLO must say the same.
    public private(set) var bulkStreams: Int?

    /// `migrationID` and `secret`, when given, are the only ones admitted;
    /// otherwise the first HELLO's bind the migration.
    public init(geometry: PageGeometry, migrationID: MigrationID? = nil, secret: MigrationSecret? = nil) {
        self.geometry = geometry
        self.migrationID = migrationID
        secretDigest = secret?.digest
    }

    /// A restarted daemon taking over `migrationID`, whose daemon died
    /// during postcopy: paused, until the agent rejoins with a resuming
    /// HELLO on every connection, carrying the secret whose digest the
    /// page-state record kept. `milestones`, from the record, say whether a
    /// hand-over was still to be done (the agent says HANDED_OVER again
    /// when it rejoins, if it was). The pause starts at `now`.
    public init(takingOver migrationID: MigrationID, geometry: PageGeometry, secretDigest: SecretDigest,
                milestones: PageStateMilestones = [.vmmResumed], pausedAt now: UInt64 = 0) {
        self.geometry = geometry
        self.migrationID = migrationID
        self.secretDigest = secretDigest
        let handOver: State.HandOver = !milestones.contains(.handOverPending) ? .notAsked
            : milestones.contains(.handedOver) ? .handedOver : .pending
        state = .postcopy(State.Postcopy(handOver: handOver), .paused(since: now, rejoined: []))
        epoch = 1
    }

    public var limits: RegionLimits { RegionLimits(geometry) }

    /// The first frame of a TCP connection; returns the WELCOME to answer.
    ///
    /// A resuming HELLO is admitted only during postcopy: while paused, or
    /// while the old connections still look alive here (the agent found them
    /// dead first), in which case they are given up — the phase turns to
    /// paused and `epoch` moves on. Once every connection has rejoined,
    /// postcopy goes on (the pause ends at `now`) and the daemon sends the
    /// resync.
    public mutating func hello(_ message: Message,
                               at now: UInt64 = 0) throws(SessionError) -> (stream: AgentStream, welcome: Message) {
        guard case let .hello(id, role, _, regionSize, secret, resume, streams, index) = message else {
            throw .unexpected(message.type, phase: phase, stream: nil)
        }
        // Who first: a HELLO for another migration, or without this one's
        // secret, is refused as such whatever the phase.
        if let migrationID, migrationID != id { throw .wrongMigration(expected: migrationID, got: id) }
        let digest = secret.digest
        if let secretDigest, !secretDigest.matches(digest) { throw .wrongSecret(id) }
        // The codec admits only these; a message made in code may not be.
        guard streams >= 1, streams <= AgentStream.maxBulkStreams, index < streams,
              let stream = AgentStream(role: role, index: index) else {
            throw .streamOutOfRange(role: role, index: index, bulkStreams: streams)
        }
        if case .discarded = state { throw .discarded }
        if let bulkStreams, bulkStreams != streams {
            throw .streamCountMismatch(migration: bulkStreams, hello: streams)
        }
        switch (state, resume) {
        case (.discarded, _):
            throw .discarded
        case (var .handshake(connected), false):
            try checkRegionSize(regionSize)
            guard connected.insert(stream).inserted else { throw .duplicateConnection(stream) }
            state = connected.count == streams + 1
                ? .precopy(PrecopyRounds(streams: streams)) : .handshake(connected: connected)
        case let (.postcopy(postcopy, .connected), true):
            try checkRegionSize(regionSize)
            pause(postcopy, at: now)
            rejoin(stream, of: streams, postcopy, pausedSince: now, rejoined: [], at: now)
        case let (.postcopy(postcopy, .paused(since, rejoined)), true):
            try checkRegionSize(regionSize)
            rejoin(stream, of: streams, postcopy, pausedSince: since, rejoined: rejoined, at: now)
        case (.postcopy, false):
            throw .postcopyInProgress
        case (_, true):
            throw .nothingToResume(phase: phase)
        case (_, false):
            throw .unexpected(.hello, phase: phase, stream: stream)
        }
        migrationID = id
        secretDigest = digest
        bulkStreams = streams
        return (stream, .welcome(regionSize: geometry.regionSize, destinationPageSize: geometry.pageSize))
    }

    private func checkRegionSize(_ regionSize: UInt64) throws(SessionError) {
        guard regionSize == geometry.regionSize else {
            throw .regionSizeMismatch(source: regionSize, destination: geometry.regionSize)
        }
    }

    /// A resuming HELLO for `stream`, of a migration with `bulkStreams`
    /// bulk streams, during the pause that began at `since`. A stream may
    /// come again (an agent that died half-way through rejoining): the
    /// newer connection replaces the older. Once every connection has
    /// rejoined, the pause ends at `now`.
    private mutating func rejoin(_ stream: AgentStream, of bulkStreams: Int, _ postcopy: State.Postcopy,
                                 pausedSince since: UInt64, rejoined: Set<AgentStream>, at now: UInt64) {
        let rejoined = rejoined.union([stream])
        guard rejoined.count == bulkStreams + 1 else {
            state = .postcopy(postcopy, .paused(since: since, rejoined: rejoined))
            return
        }
        lastPauseNanos = now >= since ? now - since : 0
        pausedNanos += lastPauseNanos
        state = .postcopy(postcopy, .connected)
    }

    /// The agent's connections of generation `epoch` failed, at `now`.
    /// During postcopy this pauses the migration (true, the first time for
    /// that generation); in any other phase, or for an older generation,
    /// nothing changes (false) — before switchover a lost connection fails
    /// the migration. So news of a generation already given up, however
    /// late, never pauses its successor.
    public mutating func connectionLost(epoch lost: UInt64, at now: UInt64 = 0) -> Bool {
        guard lost == epoch, case let .postcopy(postcopy, .connected) = state else { return false }
        pause(postcopy, at: now)
        return true
    }

    /// The agent's connections are given up at `now`: their generation ends.
    private mutating func pause(_ postcopy: State.Postcopy, at now: UInt64) {
        state = .postcopy(postcopy, .paused(since: now, rejoined: []))
        epoch += 1
        pauses += 1
    }

    /// A message after HELLO on the connection `stream`.
    public mutating func receive(_ message: Message, on stream: AgentStream) throws(SessionError) -> Action {
        do throws(ProtocolError) {
            try message.validate(against: limits)
        } catch {
            throw .malformed(error)
        }
        switch (message, state) {
        case (.heartbeat, _):
            return .none
        case let (.error(code, text), _):
            return .peerFailed(code: code, message: text)
        case (.pages, .postcopy), (.zeroPages, .postcopy):
            return try Self.postcopyPages(message, on: stream, phase: phase)
        case (.pages, .precopy), (.zeroPages, .precopy), (.roundEnd, .precopy):
            guard stream.role == .bulk else { break }
            return try receivePrecopy(message, on: stream.index)
        default:
            break
        }
        // The rest are control messages: bulk stream 0's alone.
        guard stream.isControl else { throw .unexpected(message.type, phase: phase, stream: stream) }
        switch (message, state) {
        case let (.dirtyBitmap(_, firstWord, words), .precopy(rounds)):
            // Every stream's pages of the last round must be in first.
            try rounds.checkDrained()
            return try addBitmapWords(firstWord: firstWord, words: words)
        case let (.dirtyBitmap(_, firstWord, words), .switchingOver):
            return try addBitmapWords(firstWord: firstWord, words: words)
        case let (.switchover(stalePages, pausedAt, handOver), .switchingOver(assembler)):
            // Validation kept bits past the region out of the assembler.
            guard let stale = assembler.bitmap else {
                throw .bitmapIncomplete(words: assembler.wordsReceived, expected: assembler.wordCount)
            }
            guard stale.popCount == stalePages else {
                throw .staleCountMismatch(announced: stalePages, bitmap: stale.popCount)
            }
            state = .postcopy(State.Postcopy(handOver: handOver ? .pending : .notAsked), .connected)
            return .switchover(stale: stale, sourcePausedAtNanos: pausedAt, handOver: handOver)
        // Sent once the guest resumed, and again after every rejoin (also
        // by a restarted agent): any generation's, and even once complete,
        // as long as it is the same.
        case let (.imageDigest(digest), .postcopy(postcopy, connections)):
            return try receiveDigest(digest, postcopy, connections)
        case let (.imageDigest(digest), .complete(known, _)):
            return try Self.sameDigest(digest, known: known)
        // Sent again after every rejoin: any generation's, as long as the
        // switchover asked for a hand-over.
        case let (.handedOver, .postcopy(postcopy, connections)):
            return try handedOver(postcopy, connections)
        case (.handedOver, .complete(_, handedOver: true)):
            return .none
        case let (.discard(reason), .postcopy(postcopy, _)):
            guard postcopy.handOver == .pending else { throw .discardPastPointOfNoReturn }
            state = .discarded(imageDigest: postcopy.imageDigest, pagesInPlace: postcopy.pagesInPlace)
            return .discard(reason: reason)
        default:
            throw .unexpected(message.type, phase: phase, stream: stream)
        }
    }

    /// PAGES, ZERO_PAGES and ROUND_END on bulk stream `stream` during
    /// precopy, counted in `PrecopyRounds`.
    private mutating func receivePrecopy(_ message: Message, on stream: Int) throws(SessionError) -> Action {
        guard case var .precopy(rounds) = state else { preconditionFailure("precopy pages in phase \(phase)") }
        /// Pages must travel their own stream (`StreamPartition`): then no
        /// page can overtake its older copy.
        func note(_ run: PageRun) throws(SessionError) {
            let partition = StreamPartition(streams: rounds.streams)
            guard partition.stream(carrying: run) == stream else {
                throw .pagesOffTheirStream(message.type, run, stream: .bulk(stream), bulkStreams: rounds.streams)
            }
            if !rounds.isSending(stream) {
                rounds.pages(on: stream)
                state = .precopy(rounds)
            }
        }
        switch message {
        case let .pages(0, first, data):
            let run = PageRun(first: first, count: UInt64(data.count / Message.pageBytes))
            try note(run)
            return .writePrecopy(run, data)
        case let .zeroPages(first, count):
            let run = PageRun(first: first, count: UInt64(count))
            try note(run)
            return .zeroPrecopy(run)
        case let .roundEnd(round, sent, dirty):
            let totals = try rounds.roundEnd(round, pagesSent: sent, dirtyPages: dirty, on: stream)
            state = .precopy(rounds)
            guard let totals else { return .none }
            return .roundEnded(round: totals.round, pagesSent: totals.pagesSent, dirtyPages: totals.dirtyPages)
        default:
            throw .unexpected(message.type, phase: phase, stream: .bulk(stream))
        }
    }

    /// The bulk streams that have not yet ended the round bulk stream 0
    /// ended last (`PrecopyRounds.behind`): before DIRTY_BITMAP the daemon
    /// waits until there are none. Empty outside precopy.
    public var streamsBehind: [Int] {
        guard case let .precopy(rounds) = state else { return [] }
        return rounds.behind
    }

    /// The last precopy round bulk stream 0 ended; 0 outside precopy.
    public var precopyRound: UInt32 {
        guard case let .precopy(rounds) = state else { return 0 }
        return rounds.lastRound
    }
    /// What `receive` answers for PAGES and ZERO_PAGES while postcopy
    /// serves pages (`handover`, `postcopy`, `paused`), for a `message`
    /// already validated against the region. It depends on no state of the
    /// session, so the daemon's receiving threads decide it, once postcopy
    /// has begun, without the lock they would otherwise share (the
    /// back-fill ones may run at `SCHED_IDLE`).
    ///
    /// Background pages come on the bulk connection with request id 0,
    /// answers to PAGE_REQUEST on the urgent one with the request's id;
    /// zero pages on either. Pages still arriving on a connection that is
    /// being given up are as good as any: the tracker writes only what is
    /// still stale.
    /// `phase` only names the phase in the error.
    public static func postcopyPages(_ message: Message, on stream: AgentStream,
                                     phase: Phase = .postcopy) throws(SessionError) -> Action {
        switch (message, stream.role) {
        case let (.pages(0, first, data), .bulk):
            return .writePostcopy(PageRun(first: first, count: UInt64(data.count / Message.pageBytes)), data,
                                  requestID: 0)
        case let (.pages(requestID, first, data), .urgent) where requestID != 0:
            return .writePostcopy(PageRun(first: first, count: UInt64(data.count / Message.pageBytes)), data,
                                  requestID: requestID)
        case let (.zeroPages(first, count), _):
            return .zeroPostcopy(PageRun(first: first, count: UInt64(count)))
        default:
            throw .unexpected(message.type, phase: phase, stream: stream)
        }
    }

    /// `postcopyPages` for a message not yet validated: validates it
    /// against `limits` first. Nil for any other type of message.
    public static func postcopyPages(_ message: Message, on stream: AgentStream,
                                     limits: RegionLimits) throws(SessionError) -> Action? {
        guard message.type == .pages || message.type == .zeroPages else { return nil }
        do throws(ProtocolError) {
            try message.validate(against: limits)
        } catch {
            throw .malformed(error)
        }
        return try postcopyPages(message, on: stream)
    }

    /// Every page is in place (the tracker says so). Returns whether the
    /// migration completes now: true once the source's digest is known and
    /// the point of no return passed; false until IMAGE_DIGEST or
    /// HANDED_OVER brings what is missing, whose action then says so. A
    /// discarded migration never completes.
    public mutating func pagesComplete() -> Bool {
        switch state {
        case .postcopy(var postcopy, let connections):
            postcopy.pagesInPlace = true
            state = .postcopy(postcopy, connections)
            return postcopy.completes
        case let .discarded(imageDigest, _):
            state = .discarded(imageDigest: imageDigest, pagesInPlace: true)
            return false
        case .handshake, .precopy, .switchingOver, .complete:
            preconditionFailure("pages complete in phase \(phase)")
        }
    }

    /// The migration is complete: every page is in place, the source's
    /// digest is known, and the guest runs here.
    public mutating func complete() {
        guard case let .postcopy(postcopy, _) = state, postcopy.completes, let digest = postcopy.imageDigest else {
            preconditionFailure("complete in phase \(phase) with every page \(pagesInPlace), the digest \(imageDigest != nil), a hand-over pending \(handOverPending)")
        }
        state = .complete(imageDigest: digest, handedOver: postcopy.handOver == .handedOver)
    }

    private mutating func receiveDigest(_ digest: ImageDigest, _ postcopy: State.Postcopy,
                                        _ connections: State.Connections) throws(SessionError) -> Action {
        guard let known = postcopy.imageDigest else {
            var postcopy = postcopy
            postcopy.imageDigest = digest
            state = .postcopy(postcopy, connections)
            return .imageDigest(digest, completes: postcopy.completes)
        }
        return try Self.sameDigest(digest, known: known)
    }

    /// IMAGE_DIGEST once the digest is known: harmless if the same.
    private static func sameDigest(_ digest: ImageDigest, known: ImageDigest) throws(SessionError) -> Action {
        guard known == digest else { throw .imageDigestChanged(known: known, got: digest) }
        return .none
    }

    private mutating func handedOver(_ postcopy: State.Postcopy,
                                     _ connections: State.Connections) throws(SessionError) -> Action {
        switch postcopy.handOver {
        case .pending:
            var postcopy = postcopy
            postcopy.handOver = .handedOver
            // From handover to postcopy, or still paused.
            state = .postcopy(postcopy, connections)
            return .handedOver(completes: postcopy.completes)
        // Again after a rejoin, or after a takeover that found it recorded:
        // nothing changes.
        case .handedOver:
            return .none
        case .notAsked:
            throw .unexpected(.handedOver, phase: phase, stream: .bulk)
        }
    }

    private mutating func addBitmapWords(firstWord: UInt64, words: [UInt64]) throws(SessionError) -> Action {
        // Made by the first frame, on entering switchingOver; taken out
        // while it grows, so that its words are never copied: an empty
        // handshake stands in (no allocation) until the defer puts it back,
        // the frame refused or not.
        var assembler: BitmapAssembler
        if case let .switchingOver(growing) = state {
            assembler = growing
            state = .handshake(connected: [])
        } else {
            assembler = BitmapAssembler(count: geometry.smallPageCount)
        }
        defer { state = .switchingOver(assembler) }
        guard assembler.add(firstWord: firstWord, words: words) else {
            throw .bitmapOutOfOrder(expectedWord: assembler.wordsReceived, got: firstWord)
        }
        return .none
    }
}
