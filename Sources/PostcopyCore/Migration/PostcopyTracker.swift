/// The destination's view of guest pages during postcopy: which 4 KiB pages
/// are still stale, which are being fetched or written, and which guest
/// pages have a thread blocked on them.
///
/// A value type with no locking and no clock of its own: the daemon keeps it
/// behind one mutex and passes the time in, so tests drive it step by step.
///
/// The invariant it exists for: **a page is written through the alias only
/// while it is stale, and installed in the guest only once none of its 4 KiB
/// pieces is stale.** A writer claims stale pieces (`claim`), copies them
/// outside the lock, then commits them (`commit`); a piece that is not stale,
/// or already claimed, is a duplicate and is dropped. So nothing the guest
/// may have written is ever overwritten, and each piece is written once.
public struct PostcopyTracker: Sendable {
    /// What the fault thread does with a fault.
    public enum FaultAction: Equatable, Sendable {
        /// No piece of the page is stale: CONTINUE it now.
        case install
        /// Ask the source for this span: from the first to the last piece
        /// newly marked requested. The source sends only the pieces in it
        /// that are still stale and unsent, so the clean pieces of a huge
        /// page between stale ones never travel. The page is installed by
        /// `commit`.
        case fetch(PageRun)
        /// Every stale piece is already requested or being written; the page
        /// is installed by `commit`.
        case wait
    }

    /// A guest page whose last stale piece has just been written while a
    /// thread was blocked on it: install it now.
    public struct Completion: Equatable, Sendable {
        public let page: PageIndex
        /// From the first fault on the page to its last piece written.
        public let latencyNanos: UInt64
    }

    public let geometry: PageGeometry
    private var stale: PageBitmap
    private var claimed: PageBitmap
    private var requested: PageBitmap
    /// Guest pages (in the region's page size) with a thread blocked on them.
    private var waiting: PageBitmap
    /// When the first fault on each waiting guest page was read. Made with
    /// room for `Scratch.waitingCapacity` pages, so that the fault path
    /// does not allocate until more pages than that wait at once.
    private var firstFaultAt: [UInt64: UInt64]

    /// 4 KiB pages still stale.
    public private(set) var stalePages: UInt64
    /// 4 KiB pages that arrived after they were no longer stale.
    public private(set) var duplicatePages: UInt64 = 0
    /// 4 KiB pages written while stale.
    public private(set) var filledPages: UInt64 = 0
    /// 4 KiB pages asked for with PAGE_REQUEST.
    public private(set) var requestedPages: UInt64 = 0
    /// Faults on pages with a stale piece (the first and any concurrent ones).
    public private(set) var staleFaults: UInt64 = 0
    /// Faults on pages with no stale piece.
    public private(set) var cleanFaults: UInt64 = 0
    /// Completions handed out by `commit` whose install has not been reported
    /// done (`installed`). Postcopy is not complete while any is pending: the
    /// VMM must not unregister the range under an install in progress.
    public private(set) var pendingInstalls: UInt64 = 0

    /// The tracker's empty bitmaps, made ahead of the switchover. Made in
    /// the pause, they cost what zeroing fresh memory costs: 768 KiB at
    /// 8 GiB of RAM, 2.3 ms of the guest's downtime on this machine's VMs,
    /// most of it page faults.
    public struct Scratch: Sendable {
        public let geometry: PageGeometry
        fileprivate let claimed: PageBitmap
        fileprivate let requested: PageBitmap
        fileprivate let waiting: PageBitmap
        fileprivate let firstFaultAt: [UInt64: UInt64]

        /// Guest pages that may wait at once before the table of their
        /// first faults grows: far more than a guest's threads can block on
        /// between two fetches.
        public static let waitingCapacity = 4096

        public init(geometry: PageGeometry) {
            self.geometry = geometry
            claimed = PageBitmap(count: geometry.smallPageCount)
            requested = PageBitmap(count: geometry.smallPageCount)
            waiting = PageBitmap(count: geometry.pageCount)
            firstFaultAt = Dictionary(minimumCapacity: Scratch.waitingCapacity)
        }
    }

    /// Starts postcopy with `stale` (one bit per 4 KiB page of the region).
    public init(geometry: PageGeometry, stale: PageBitmap) {
        self.init(stale: stale, scratch: Scratch(geometry: geometry))
    }

    /// Starts postcopy with `stale`, on bitmaps made ahead of time. The
    /// scratch is consumed: a copy left behind would make the fault path's
    /// first change copy a whole bitmap.
    public init(stale: PageBitmap, scratch: consuming Scratch) {
        precondition(stale.count == scratch.geometry.smallPageCount, "stale bitmap of \(stale.count) bits for \(scratch.geometry)")
        geometry = scratch.geometry
        self.stale = stale
        claimed = scratch.claimed
        requested = scratch.requested
        waiting = scratch.waiting
        firstFaultAt = scratch.firstFaultAt
        stalePages = stale.popCount
    }

    /// No page is stale and every completion is installed.
    public var isComplete: Bool { stalePages == 0 && pendingInstalls == 0 }

    /// The counts above, without the per-page state.
    public struct Counters: Sendable, Equatable {
        public let stalePages: UInt64
        public let duplicatePages: UInt64
        public let filledPages: UInt64
        public let requestedPages: UInt64
        public let staleFaults: UInt64
        public let cleanFaults: UInt64
    }

    public var counters: Counters {
        Counters(stalePages: stalePages, duplicatePages: duplicatePages, filledPages: filledPages,
                 requestedPages: requestedPages, staleFaults: staleFaults, cleanFaults: cleanFaults)
    }

    /// Whether `page` (4 KiB) is still stale.
    public func isStale(_ page: UInt64) -> Bool { stale.contains(page) }

    /// A guest thread faulted on `page` (in the region's page size) at `now`.
    /// Pieces to fetch are marked requested, so concurrent faults on the same
    /// page ask the source only once. Allocates nothing (while fewer than
    /// `Scratch.waitingCapacity` pages wait).
    public mutating func fault(on page: PageIndex, at now: UInt64) -> FaultAction {
        let pieces = geometry.smallPages(of: page)
        guard stale.containsAny(in: pieces) else {
            cleanFaults += 1
            return .install
        }
        staleFaults += 1
        if waiting.insert(page.rawValue) { firstFaultAt[page.rawValue] = now }
        var first: UInt64?
        var end: UInt64 = 0
        var next = stale.nextSet(from: pieces.lowerBound)
        while let piece = next, piece < pieces.upperBound {
            if !requested.contains(piece) && !claimed.contains(piece) {
                requested.insert(piece)
                requestedPages += 1
                if first == nil { first = piece }
                end = piece + 1
            }
            next = stale.nextSet(from: piece + 1)
        }
        guard let first else { return .wait }
        return .fetch(PageRun(first: first, count: end - first))
    }

    /// Pages `run` arrived. Returns the runs of them that are stale and not
    /// already being written: the caller writes exactly those through the
    /// alias, then calls `commit` with the same runs. The rest are dropped
    /// and counted as duplicates.
    public mutating func claim(_ run: PageRun) -> [PageRun] {
        precondition(run.end <= stale.count, "\(run) outside the region")
        var claims = PageRunBuilder()
        for page in run.pages {
            if stale.contains(page) && !claimed.contains(page) {
                claimed.insert(page)
                claims.add(page)
            } else {
                duplicatePages += 1
            }
        }
        return claims.finish()
    }

    /// The claimed `runs` are written. Marks them fresh and returns the guest
    /// pages that were waiting for them and now have no stale piece; report
    /// each install done with `installed`.
    public mutating func commit(_ runs: [PageRun], at now: UInt64) -> [Completion] {
        var completions: [Completion] = []
        let piecesPerPage = geometry.pageSize.smallPagesPerPage
        for run in runs {
            for page in run.pages {
                precondition(claimed.remove(page), "commit of unclaimed page \(page)")
                stale.remove(page)
                requested.remove(page)
            }
            stalePages -= run.count
            filledPages += run.count
            var guestPage = run.first / piecesPerPage
            while guestPage * piecesPerPage < run.end {
                let index = PageIndex(guestPage)
                if waiting.contains(guestPage) && !stale.containsAny(in: geometry.smallPages(of: index)) {
                    waiting.remove(guestPage)
                    let started = firstFaultAt.removeValue(forKey: guestPage) ?? now
                    completions.append(Completion(page: index, latencyNanos: now &- started))
                }
                guestPage += 1
            }
        }
        pendingInstalls += UInt64(completions.count)
        return completions
    }

    /// `count` completions from `commit` are installed in the guest.
    public mutating func installed(_ count: Int) {
        precondition(UInt64(count) <= pendingInstalls, "more installs reported than handed out")
        pendingInstalls -= UInt64(count)
    }

    /// The stale pages, as a bitmap.
    public var staleBitmap: PageBitmap { stale }

    /// The pages asked for with PAGE_REQUEST that have not arrived: after a
    /// lost connection these are asked for again, first, since guest
    /// threads wait on them.
    public var outstandingRequests: [PageRun] {
        var runs = PageRunBuilder()
        var next = requested.nextSet(from: 0)
        while let page = next {
            if !claimed.contains(page) { runs.add(page) }
            next = requested.nextSet(from: page + 1)
        }
        return runs.finish()
    }
}
