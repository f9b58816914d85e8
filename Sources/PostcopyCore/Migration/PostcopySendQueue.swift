import Synchronization

/// The source agent's list of stale pages not yet sent after switchover,
/// shared by its senders: the urgent one answering PAGE_REQUESTs and the
/// background ones pushing everything else, one per bulk stream, each over
/// its share of the pages (`StreamPartition`).
///
/// Each page is handed out once, to whichever sender asks first. A request
/// is answered with every stale page it names, those a background sender
/// took before it too (`answer`): such a page may sit unsent behind a
/// background sender the scheduler is starving, and the guest thread that
/// faulted on it must not wait for that (postcopyd keeps whichever copy
/// arrives first). Each background sender works forward from a cursor of
/// its own; a request moves every cursor to just past the requested pages,
/// so the pages around a fault (which the guest is likely to touch next)
/// go next.
///
/// Shared without a lock: a page is taken by clearing its bit with an
/// atomic operation, and the thread that cleared it sends it. A lock here
/// would let a background sender (which may run at `SCHED_IDLE`) keep the
/// urgent one (and the guest thread behind it) waiting whenever the
/// scheduler took the CPU from it inside.
public final class PostcopySendQueue: Sendable {
    /// The pages stale when the queue was made; never changes.
    private let stale: PageBitmap
    private let pending: AtomicPageBitmap
    /// Which bulk stream's background sender each page belongs to.
    public let partition: StreamPartition
    /// Each bulk stream's cursor and pages not yet handed out.
    private let shares: [Share]
    private let remainingPages: Atomic<UInt64>

    /// One bulk stream's part of the queue.
    private final class Share: Sendable {
        let cursor = Atomic<UInt64>(0)
        let remaining: Atomic<UInt64>
        init(_ remaining: UInt64) { self.remaining = Atomic(remaining) }
    }

    /// The `stale` pages, each handed to the background sender of the bulk
    /// stream `partition` gives it (or to the urgent sender, if a request
    /// asks for it first).
    public init(stale: PageBitmap, partition: StreamPartition = StreamPartition(streams: 1)) {
        self.stale = stale
        pending = AtomicPageBitmap(stale)
        self.partition = partition
        shares = partition.counts(of: stale).map(Share.init)
        remainingPages = Atomic(stale.popCount)
    }

    /// Pages not yet handed out.
    public var remaining: UInt64 { remainingPages.load(ordering: .sequentiallyConsistent) }

    /// Pages of bulk stream `stream`'s share not yet handed out.
    public func remaining(on stream: Int) -> UInt64 { shares[stream].remaining.load(ordering: .sequentiallyConsistent) }

    /// The pages of a request that no sender has taken yet, now taken by the
    /// urgent sender (pages already taken are not among them: `answer` adds
    /// them back). Moves every background cursor to just past the request.
    public func takeRequested(_ run: PageRun) -> [PageRun] {
        precondition(run.end <= pending.count, "\(run) outside the region")
        var taken = PageRunBuilder()
        for piece in partition.pieces(of: run) {
            let count = pending.take(piece.run) { firstBit, bits in taken.add(bits: bits, from: firstBit) }
            shares[piece.stream].remaining.subtract(count, ordering: .sequentiallyConsistent)
            remainingPages.subtract(count, ordering: .sequentiallyConsistent)
        }
        for share in shares { share.cursor.store(run.end < pending.count ? run.end : 0, ordering: .relaxed) }
        return taken.finish()
    }

    /// What the urgent sender sends for one PAGE_REQUEST.
    public struct Answer: Equatable, Sendable {
        /// Every page of the request that was stale, in order: all of them
        /// go on the urgent connection.
        public let runs: [PageRun]
        /// How many of them no sender had taken: now the urgent sender's.
        public let takenPages: UInt64
        /// How many a background sender had taken before the request (on
        /// their way on a bulk connection, or there already), sent again.
        public var resentPages: UInt64 { runs.reduce(0) { $0 + $1.count } - takenPages }
    }

    /// Answers a request for `run`: takes its pages no sender has taken yet
    /// (as `takeRequested`), and returns every stale page of it to send on
    /// the urgent connection, the ones a background sender already has
    /// included, so that the faulting guest thread never waits behind the
    /// back-fill. Pages of `run` that were never stale are not sent.
    public func answer(_ run: PageRun) -> Answer {
        let taken = takeRequested(run).reduce(0) { $0 + $1.count }
        var runs = PageRunBuilder()
        var page = stale.nextSet(from: run.first)
        while let next = page, next < run.end {
            runs.add(next)
            page = next + 1 < run.end ? stale.nextSet(from: next + 1) : nil
        }
        return Answer(runs: runs.finish(), takenPages: taken)
    }

    /// The next pages for bulk stream `stream`'s background sender: up to
    /// `maxPages` pending pages of its share in a row from its cursor
    /// (wrapping round to the start), or nil when every page of its share
    /// has been handed out. A run ends early where the urgent sender took a
    /// page first, and at the end of a 2 MiB chunk.
    public func takeNext(maxPages: UInt64, stream: Int = 0) -> PageRun? {
        precondition(maxPages > 0)
        let share = shares[stream]
        while share.remaining.load(ordering: .sequentiallyConsistent) > 0 {
            let from = share.cursor.load(ordering: .relaxed)
            guard let first = nextPending(of: stream, from: from) ?? nextPending(of: stream, from: 0) else { return nil }
            let chunkEnd = min((first / StreamPartition.chunkPages + 1) * StreamPartition.chunkPages, pending.count)
            var count: UInt64 = 0
            while count < maxPages && first + count < chunkEnd && pending.remove(first + count) {
                count += 1
            }
            // Zero: the urgent sender took `first` meanwhile; look again.
            guard count > 0 else { continue }
            share.remaining.subtract(count, ordering: .sequentiallyConsistent)
            remainingPages.subtract(count, ordering: .sequentiallyConsistent)
            share.cursor.store(first + count < pending.count ? first + count : 0, ordering: .relaxed)
            return PageRun(first: first, count: count)
        }
        return nil
    }

    /// The first pending page of `stream`'s share at or after `from`.
    private func nextPending(of stream: Int, from: UInt64) -> UInt64? {
        var page = partition.firstPage(of: stream, atOrAfter: from)
        while page < pending.count {
            guard let next = pending.nextSet(from: page) else { return nil }
            if partition.stream(of: next) == stream { return next }
            page = partition.firstPage(of: stream, atOrAfter: next)
        }
        return nil
    }
}
