/// The source agent's list of stale pages not yet sent after switchover,
/// shared by its two senders: the urgent one answering PAGE_REQUESTs and the
/// background one pushing everything else.
///
/// Each page is handed out once, to whichever sender asks first, so no page
/// crosses the network twice. The background sender works forward from a
/// cursor; a request moves the cursor to just past the requested pages, so
/// the pages around a fault (which the guest is likely to touch next) go
/// next. A value type: the agent keeps it behind a mutex.
public struct PostcopySendQueue: Sendable {
    private var pending: PageBitmap
    private var cursor: UInt64 = 0
    /// Pages not yet handed out.
    public private(set) var remaining: UInt64

    public init(stale: PageBitmap) {
        pending = stale
        remaining = stale.popCount
    }

    /// The pages of a request that no sender has taken yet, now taken by the
    /// urgent sender. Pages already taken are on their way on the bulk
    /// connection and are not sent again. Moves the background cursor.
    public mutating func takeRequested(_ run: PageRun) -> [PageRun] {
        precondition(run.end <= pending.count, "\(run) outside the region")
        var taken = PageRunBuilder()
        var next = pending.nextSet(from: run.first)
        while let page = next, page < run.end {
            pending.remove(page)
            taken.add(page)
            next = pending.nextSet(from: page + 1)
        }
        let runs = taken.finish()
        remaining -= runs.reduce(0) { $0 + $1.count }
        cursor = run.end < pending.count ? run.end : 0
        return runs
    }

    /// The next pages for the background sender: up to `maxPages` pending
    /// pages in a row from the cursor (wrapping round to the start), or nil
    /// when every page has been handed out.
    public mutating func takeNext(maxPages: UInt64) -> PageRun? {
        precondition(maxPages > 0)
        guard remaining > 0 else { return nil }
        guard let first = pending.nextSet(from: cursor) ?? pending.nextSet(from: 0) else { return nil }
        var count: UInt64 = 0
        while count < maxPages && first + count < pending.count && pending.contains(first + count) {
            pending.remove(first + count)
            count += 1
        }
        remaining -= count
        cursor = first + count < pending.count ? first + count : 0
        return PageRun(first: first, count: count)
    }
}
