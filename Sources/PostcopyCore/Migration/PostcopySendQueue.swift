import Synchronization

/// The source agent's list of stale pages not yet sent after switchover,
/// shared by its two senders: the urgent one answering PAGE_REQUESTs and the
/// background one pushing everything else.
///
/// Each page is handed out once, to whichever sender asks first, so no page
/// crosses the network twice. The background sender works forward from a
/// cursor; a request moves the cursor to just past the requested pages, so
/// the pages around a fault (which the guest is likely to touch next) go
/// next.
///
/// Shared without a lock: a page is taken by clearing its bit with an
/// atomic operation, and the thread that cleared it sends it. A lock here
/// would let the background sender, which runs at `SCHED_IDLE`, keep the
/// urgent one (and the guest thread behind it) waiting whenever the
/// scheduler took the CPU from it inside.
public final class PostcopySendQueue: Sendable {
    private let pending: AtomicPageBitmap
    private let cursor = Atomic<UInt64>(0)
    private let remainingPages: Atomic<UInt64>

    public init(stale: PageBitmap) {
        pending = AtomicPageBitmap(stale)
        remainingPages = Atomic(stale.popCount)
    }

    /// Pages not yet handed out.
    public var remaining: UInt64 { remainingPages.load(ordering: .sequentiallyConsistent) }

    /// The pages of a request that no sender has taken yet, now taken by the
    /// urgent sender. Pages already taken are on their way on the bulk
    /// connection and are not sent again. Moves the background cursor.
    public func takeRequested(_ run: PageRun) -> [PageRun] {
        precondition(run.end <= pending.count, "\(run) outside the region")
        var taken = PageRunBuilder()
        let count = pending.take(run) { firstBit, bits in taken.add(bits: bits, from: firstBit) }
        remainingPages.subtract(count, ordering: .sequentiallyConsistent)
        cursor.store(run.end < pending.count ? run.end : 0, ordering: .relaxed)
        return taken.finish()
    }

    /// The next pages for the background sender: up to `maxPages` pending
    /// pages in a row from the cursor (wrapping round to the start), or nil
    /// when every page has been handed out. A run ends early where the
    /// urgent sender took a page first.
    public func takeNext(maxPages: UInt64) -> PageRun? {
        precondition(maxPages > 0)
        while remaining > 0 {
            let from = cursor.load(ordering: .relaxed)
            guard let first = pending.nextSet(from: from) ?? pending.nextSet(from: 0) else { return nil }
            var count: UInt64 = 0
            while count < maxPages && first + count < pending.count && pending.remove(first + count) {
                count += 1
            }
            // Zero: the urgent sender took `first` meanwhile; look again.
            guard count > 0 else { continue }
            remainingPages.subtract(count, ordering: .sequentiallyConsistent)
            cursor.store(first + count < pending.count ? first + count : 0, ordering: .relaxed)
            return PageRun(first: first, count: count)
        }
        return nil
    }
}
