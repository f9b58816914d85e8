import Glibc
import PostcopyCore
import PostcopyOS
import Synchronization

extension AgentConfig {
    /// `postcopy-push --streams` unless told: one bulk stream per CPU online,
    /// at most `AgentStream.maxBulkStreams`.
    public static let defaultStreams = max(1, min(AgentStream.maxBulkStreams, sysconf(Int32(_SC_NPROCESSORS_ONLN))))
}

/// One generation of the agent's connections to postcopyd: its bulk streams
/// (`AgentConfig.streams` of them; bulk stream 0 also carries every control
/// message) and the urgent connection.
struct AgentConnections: Sendable {
    let bulk: [MessageStream]
    let urgent: MessageStream

    /// Bulk stream 0: the dirty bitmap, SWITCHOVER, RESUMED, the resync,
    /// IMAGE_DIGEST, HANDED_OVER, DISCARD and COMPLETE travel on it.
    var control: MessageStream { bulk[0] }

    /// Shuts every connection down: each thread blocked on one wakes. With
    /// `keepingReadable`, bulk stream 0 and the urgent connection stop
    /// sending only, so that an ERROR postcopyd sent on them before it
    /// closed (why it ended the migration) can still be read
    /// (`SourceAgent.reasonGiven`, the urgent thread).
    func shutdown(keepingReadable: Bool = false) {
        for (index, stream) in bulk.enumerated() {
            if keepingReadable && index == 0 { stream.shutdownSending() } else { stream.shutdown() }
        }
        if keepingReadable { urgent.shutdownSending() } else { urgent.shutdown() }
    }
}

// Precopy's rounds and the postcopy back-fill, each spread over the bulk
// streams: one thread per stream, each over its share of the pages
// (`StreamPartition`).
extension SourceAgent {
    /// One precopy round over every bulk stream in `streams`: each lane's
    /// share of the pages on its own stream, bulk stream 0's on this
    /// thread and the others' on a `push-bulk-N` thread each, every stream
    /// ending with its own ROUND_END. Returns the round's figures, added
    /// up. A lane that fails shuts every stream down, so that the others
    /// stop too, and its error (the first) is thrown once all have stopped.
    /// Past `deadline` each lane ends its share early, and the pages the
    /// lanes left are the result's `leftOver`.
    func sendRound(_ round: UInt32, among candidates: PageBitmap?, _ scanner: PageScanner,
                   lanes: [PageScanner.Lane], on streams: [MessageStream], until deadline: UInt64? = nil,
                   report: @escaping @Sendable (_ looked: UInt64, _ sent: PageScanner.RoundResult) -> Void) throws
        -> PageScanner.RoundResult {
        let results = Locked([PageScanner.RoundResult?](repeating: nil, count: lanes.count))
        let failure = Locked<(any Error)?>(nil)
        let sendShare: @Sendable (Int) -> Void = { index in
            do {
                let result = try scanner.sendChangedPages(among: candidates, lane: lanes[index], to: streams[index],
                                                          until: deadline,
                                                          progress: report)
                try streams[index].send(.roundEnd(round: round, pagesSent: result.pagesSent,
                                                  dirtyPages: result.pagesSent + result.zeroPagesSent))
                results.withLock { $0[index] = result }
            } catch {
                failure.withLock { $0 = $0 ?? error }
                for stream in streams { stream.shutdown() }
            }
        }
        var threads: [OSThread] = []
        defer { for thread in threads { thread.join() } }
        do {
            for index in lanes.indices.dropFirst() {
                threads.append(try OSThread.start(name: "push-bulk-\(index)") { sendShare(index) })
            }
        } catch {
            failure.withLock { $0 = $0 ?? error }
            for stream in streams { stream.shutdown() }
        }
        sendShare(0)
        for thread in threads { thread.join() }
        threads = []
        if let first = failure.withLock({ $0 }) { throw first }
        return results.withLock { $0 }.reduce(into: PageScanner.RoundResult()) { total, lane in
            total.pagesSent += lane?.pagesSent ?? 0
            total.zeroPagesSent += lane?.zeroPagesSent ?? 0
            total.bytesSent += lane?.bytesSent ?? 0
            if let left = lane?.leftOver {
                if total.leftOver == nil { total.leftOver = left } else { total.leftOver?.formUnion(left) }
            }
        }
    }

    /// The lanes of precopy, one per bulk stream: `precopyBytesPerSecond`
    /// shared evenly among them.
    func precopyLanes(batchPages: Int, startedAt now: UInt64) -> [PageScanner.Lane] {
        let partition = StreamPartition(streams: config.streams)
        let share = config.precopyBytesPerSecond.map { max($0 / UInt64(config.streams), 1) }
        return (0..<config.streams).map { stream in
            PageScanner.Lane(stream: stream, partition: partition, batchPages: batchPages,
                             pacer: share.map { Pacer(bytesPerSecond: $0, now: now) })
        }
    }
}

/// The back-fill's totals across rejoins, for one bulk stream, and its
/// pacing (`postcopyBytesPerSecond` shared evenly among the streams).
/// Sent on by one thread at a time; the counters are read by the progress
/// line and the summary.
final class BackgroundLane: @unchecked Sendable {
    // SAFETY (@unchecked): `pacer` is used by the lane's sending thread
    // alone (one per connection generation, joined before the next);
    // the counters are atomics.
    let pages = Atomic<UInt64>(0)
    let bytes = Atomic<UInt64>(0)
    var pacer: Pacer?

    init(pacer: Pacer?) { self.pacer = pacer }

    /// `count` stream's lanes, sharing `bytesPerSecond` evenly.
    static func lanes(_ count: Int, bytesPerSecond: UInt64?, now: UInt64) -> [BackgroundLane] {
        let share = bytesPerSecond.map { max($0 / UInt64(count), 1) }
        return (0..<count).map { _ in BackgroundLane(pacer: share.map { Pacer(bytesPerSecond: $0, now: now) }) }
    }
}
