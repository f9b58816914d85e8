/// Precopy's rounds over a migration's bulk streams, as the daemon's session
/// counts them. Each bulk stream ends each round of its share with a
/// ROUND_END of its own, numbered 1, 2, … in order; the migration's round
/// ends once every stream has ended it. The daemon receives each stream on
/// a thread of its own, so it may see one stream rounds ahead of another.
///
/// **The drain rule.** The dirty bitmap may be applied only once every page
/// precopy sent is written. A page still on its way on another stream
/// would otherwise land after the bitmap: written over a page that is stale
/// (postcopy would then take the old copy for the fresh one), or dropped as
/// not stale (the destination would keep a copy older still). So the agent
/// sends the bitmap on bulk stream 0 only after its last round's ROUND_END
/// on every stream, and the daemon applies it only once it has received
/// every stream's ROUND_END of that round, R, the last stream 0 ended:
///
/// - a stream that has not ended round R yet is `behind`: its pages are
///   still arriving, and the bitmap waits for them (`checkDrained` refuses
///   it until then);
/// - a stream that ended a round past R, or sent pages after ending R,
///   sent pages the agent never counted in a round: the bitmap is refused.
///
/// Each stream is received in order, so once its ROUND_END of round R is
/// handled every page it sent before is written.
public struct PrecopyRounds: Equatable, Sendable {
    /// The migration's bulk streams.
    public let streams: Int
    /// The last round each stream ended (0: none yet).
    public private(set) var ended: [UInt32]
    /// Whether each stream sent pages since its last ROUND_END.
    private var sending: [Bool]
    /// The figures of the rounds some streams ended and others not yet.
    private var open: [UInt32: Totals] = [:]

    /// What the streams' ROUND_ENDs of one round add up to.
    public struct Totals: Equatable, Sendable {
        public var round: UInt32
        /// Streams that ended it so far.
        public var streams = 0
        public var pagesSent: UInt64 = 0
        public var dirtyPages: UInt64 = 0
    }

    public init(streams: Int) {
        precondition(streams >= 1 && streams <= AgentStream.maxBulkStreams, "\(streams) bulk streams")
        self.streams = streams
        ended = Array(repeating: 0, count: streams)
        sending = Array(repeating: false, count: streams)
    }

    /// Whether bulk stream `stream` sent pages since its last ROUND_END.
    public func isSending(_ stream: Int) -> Bool { sending[stream] }

    /// Precopy pages arrived on bulk stream `stream`.
    public mutating func pages(on stream: Int) {
        if !sending[stream] { sending[stream] = true }
    }

    /// Bulk stream `stream` ended `round`, which must be the round after
    /// the last it ended. Returns the round's totals when it was the last
    /// stream to end it: the migration's round ends.
    public mutating func roundEnd(_ round: UInt32, pagesSent: UInt64, dirtyPages: UInt64,
                                  on stream: Int) throws(SessionError) -> Totals? {
        let expected = ended[stream] &+ 1
        guard round == expected else {
            throw .roundOutOfOrder(stream: .bulk(stream), round: round, expected: expected)
        }
        ended[stream] = round
        sending[stream] = false
        var totals = open[round] ?? Totals(round: round)
        totals.streams += 1
        totals.pagesSent &+= pagesSent
        totals.dirtyPages &+= dirtyPages
        guard totals.streams == streams else {
            open[round] = totals
            return nil
        }
        open[round] = nil
        return totals
    }

    /// The last round bulk stream 0 ended: the one the bitmap follows.
    public var lastRound: UInt32 { ended[0] }

    /// The streams that have not ended `lastRound` yet, in order.
    public var behind: [Int] { (1..<streams).filter { ended[$0] < lastRound } }

    /// Whether the dirty bitmap may be applied now (see the drain rule):
    /// throws while a stream is `behind`, or when a stream sent pages past
    /// the last round.
    public func checkDrained() throws(SessionError) {
        for stream in 1..<streams where ended[stream] > lastRound || (ended[stream] == lastRound && sending[stream]) {
            throw .pagesAfterLastRound(stream: .bulk(stream), round: lastRound)
        }
        let behind = self.behind
        guard behind.isEmpty else { throw .bitmapBeforeStreamsDrained(behind: behind, round: lastRound) }
    }
}
