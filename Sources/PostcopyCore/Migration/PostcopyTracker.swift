import Synchronization

/// The destination's view of guest pages during postcopy: which 4 KiB pages
/// are still stale, which are being fetched or written, and which guest
/// pages have a thread blocked on them.
///
/// Shared without a lock between the fault thread and the threads that
/// receive pages, so that a fault never waits for a receiver (the
/// back-fill ones may run at `SCHED_IDLE`, and a lock one held while the
/// scheduler kept it off the CPU would stall every fault behind it). Each
/// method says which threads may call it:
///
/// - **Receivers** (any number, at once): `claim`, `commit` and
///   `receiverInstalled`.
/// - **The fault thread** (one): `fault`, `takeCompleted` and `installed`.
///   It alone owns the pages that wait and when they first faulted.
/// - **Anyone**: the counters, `isComplete`, `staleBitmap` and
///   `outstandingRequests`.
///
/// No clock of its own: the callers pass the time in, so tests drive it
/// step by step.
///
/// The invariant it exists for: **a page is written through the alias only
/// while it is stale, and installed in the guest only once none of its 4 KiB
/// pieces is stale.** A writer claims stale pieces (`claim`, an atomic
/// test-and-set per word), copies them, then commits them (`commit`); a
/// piece that is not stale, or already claimed, is a duplicate and is
/// dropped. So nothing the guest may have written is ever overwritten, and
/// each piece is written once. A commit that may have completed a waiting
/// page says so; the caller then wakes the fault thread, which takes the
/// completed pages (`takeCompleted`) and installs them. No wake-up is lost:
/// the fault thread marks a page waiting before it looks at its pieces, and
/// a receiver clears pieces before it looks for waiting pages, both with
/// sequentially consistent operations, so one of them sees the other.
public final class PostcopyTracker: @unchecked Sendable {
    // SAFETY (@unchecked): the bitmaps and counters are atomic; `waitList`
    // is touched only by the fault thread (the calling contract above).

    /// What the fault thread does with a fault.
    public enum FaultAction: Equatable, Sendable {
        /// No piece of the page is stale: CONTINUE it now.
        case install
        /// Ask the source for this span: from the first to the last piece
        /// newly marked requested. The source sends only the pieces in it
        /// that are still stale and unsent, so the clean pieces of a huge
        /// page between stale ones never travel. The page is installed once
        /// `takeCompleted` hands it out.
        case fetch(PageRun)
        /// Every stale piece is already requested or being written; the page
        /// is installed once `takeCompleted` hands it out.
        case wait
    }

    /// A guest page whose last stale piece has been written while a thread
    /// was blocked on it: install it now.
    public struct Completion: Equatable, Sendable {
        public let page: PageIndex
        /// From the first fault on the page to the install by the receiver
        /// that completed it (`receiverInstalled`), or else to the fault
        /// thread taking it.
        public let latencyNanos: UInt64
    }

    public let geometry: PageGeometry
    /// 4 KiB pieces not yet written.
    private let stale: AtomicPageBitmap
    /// 4 KiB pieces a receiver took to write: set once, never cleared, so
    /// a piece is written by exactly one thread in the life of postcopy.
    private let claimed: AtomicPageBitmap
    /// 4 KiB pieces asked for with PAGE_REQUEST (set by the fault thread only).
    private let requested: AtomicPageBitmap
    /// Guest pages (in the region's page size) with a thread blocked on
    /// them: set and cleared by the fault thread only, read by receivers.
    private let waiting: AtomicPageBitmap
    /// The waiting pages and when each first faulted, in no order: the
    /// fault thread's own. Made with room for `Scratch.waitingCapacity`
    /// pages, so that the fault path does not allocate until more pages
    /// than that wait at once.
    private var waitList: [(page: UInt64, since: UInt64)]
    /// When a receiver installed a waiting page it completed (`receiverInstalled`).
    private let installedAt = CompletionTimes()

    private let stalePieces: Atomic<UInt64>
    private let duplicatePieces = Atomic<UInt64>(0)
    private let filledPieces = Atomic<UInt64>(0)
    private let requestedPieces = Atomic<UInt64>(0)
    private let staleFaultCount = Atomic<UInt64>(0)
    private let cleanFaultCount = Atomic<UInt64>(0)
    private let waitingPages = Atomic<UInt64>(0)
    private let pendingInstallCount = Atomic<UInt64>(0)

    /// 4 KiB pages still stale.
    public var stalePages: UInt64 { stalePieces.load(ordering: .sequentiallyConsistent) }
    /// 4 KiB pages that arrived after they were no longer stale, or while
    /// another thread was writing them.
    public var duplicatePages: UInt64 { duplicatePieces.load(ordering: .relaxed) }
    /// 4 KiB pages written while stale.
    public var filledPages: UInt64 { filledPieces.load(ordering: .relaxed) }
    /// 4 KiB pages asked for with PAGE_REQUEST.
    public var requestedPages: UInt64 { requestedPieces.load(ordering: .relaxed) }
    /// Faults on pages with a stale piece (the first and any concurrent ones).
    public var staleFaults: UInt64 { staleFaultCount.load(ordering: .relaxed) }
    /// Faults on pages with no stale piece.
    public var cleanFaults: UInt64 { cleanFaultCount.load(ordering: .relaxed) }
    /// Completions handed out by `takeCompleted` whose install has not been
    /// reported done (`installed`). Postcopy is not complete while any is
    /// pending: the VMM must not unregister the range under an install in
    /// progress.
    public var pendingInstalls: UInt64 { pendingInstallCount.load(ordering: .sequentiallyConsistent) }

    /// The tracker's empty bitmaps, made ahead of the switchover. Made in
    /// the pause, they cost what zeroing fresh memory costs: 1 MiB at
    /// 8 GiB of RAM, more than 2 ms of the guest's downtime on this
    /// machine's VMs, most of it page faults.
    public struct Scratch: Sendable {
        public let geometry: PageGeometry
        fileprivate let stale: AtomicPageBitmap
        fileprivate let claimed: AtomicPageBitmap
        fileprivate let requested: AtomicPageBitmap
        fileprivate let waiting: AtomicPageBitmap

        /// Guest pages that may wait at once before the list of them
        /// grows: far more than a guest's threads can block on between two
        /// fetches.
        public static let waitingCapacity = 4096

        public init(geometry: PageGeometry) {
            self.geometry = geometry
            stale = AtomicPageBitmap(count: geometry.smallPageCount)
            claimed = AtomicPageBitmap(count: geometry.smallPageCount)
            requested = AtomicPageBitmap(count: geometry.smallPageCount)
            waiting = AtomicPageBitmap(count: geometry.pageCount)
        }
    }

    /// Starts postcopy with `stale` (one bit per 4 KiB page of the region).
    public convenience init(geometry: PageGeometry, stale: PageBitmap) {
        self.init(stale: stale, scratch: Scratch(geometry: geometry))
    }

    /// Starts postcopy with `stale`, on bitmaps made ahead of time (used
    /// once: a scratch serves one tracker).
    public init(stale: PageBitmap, scratch: Scratch) {
        precondition(stale.count == scratch.geometry.smallPageCount, "stale bitmap of \(stale.count) bits for \(scratch.geometry)")
        geometry = scratch.geometry
        scratch.stale.store(stale)
        self.stale = scratch.stale
        claimed = scratch.claimed
        requested = scratch.requested
        waiting = scratch.waiting
        waitList = []
        waitList.reserveCapacity(Scratch.waitingCapacity)
        stalePieces = Atomic(stale.popCount)
    }

    /// No page is stale, no thread waits and every completion is installed.
    public var isComplete: Bool {
        stalePages == 0 && waitingPages.load(ordering: .sequentiallyConsistent) == 0 && pendingInstalls == 0
    }

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

    // MARK: the fault thread

    /// A guest thread faulted on `page` (in the region's page size) at `now`.
    /// Pieces to fetch are marked requested, so concurrent faults on the same
    /// page ask the source only once. Allocates nothing (while fewer than
    /// `Scratch.waitingCapacity` pages wait). Fault thread only.
    public func fault(on page: PageIndex, at now: UInt64) -> FaultAction {
        let pieces = geometry.smallPages(of: page)
        guard stale.containsAny(in: pieces) else {
            bump(cleanFaultCount)
            // A page that waited and whose last piece came in since: this
            // install serves its threads, so the wake-up has nothing to do.
            if waiting.contains(page.rawValue) { stopWaiting(on: page.rawValue) }
            return .install
        }
        bump(staleFaultCount)
        // Waiting first, then the pieces looked at again: a receiver that
        // clears the last stale piece from now on sees the page waiting and
        // wakes this thread; one that cleared it before is seen below.
        if waiting.insert(page.rawValue) {
            waitList.append((page.rawValue, now))
            waitingPages.add(1, ordering: .sequentiallyConsistent)
        }
        var first: UInt64?
        var end: UInt64 = 0
        var anyStale = false
        var next = stale.nextSet(from: pieces.lowerBound)
        while let piece = next, piece < pieces.upperBound {
            anyStale = true
            if !requested.contains(piece) && !claimed.contains(piece) {
                requested.insert(piece)
                bump(requestedPieces)
                if first == nil { first = piece }
                end = piece + 1
            }
            next = stale.nextSet(from: piece + 1)
        }
        guard anyStale else {
            // Written meanwhile: the page is complete, and this thread
            // installs it now rather than on the wake-up.
            stopWaiting(on: page.rawValue)
            return .install
        }
        guard let first else { return .wait }
        return .fetch(PageRun(first: first, count: end - first))
    }

    /// Hands out, into `completions`, every waiting page that no longer has
    /// a stale piece, and stops it waiting; install each, then report how
    /// many with `installed`. Fault thread only; allocates nothing while
    /// `completions` has room.
    public func takeCompleted(at now: UInt64, into completions: inout [Completion]) {
        var index = 0
        while index < waitList.count {
            let (page, since) = waitList[index]
            guard !stale.containsAny(in: geometry.smallPages(of: PageIndex(page))) else {
                index += 1
                continue
            }
            // Counted pending before the page stops waiting: `isComplete`
            // must never see neither.
            pendingInstallCount.add(1, ordering: .sequentiallyConsistent)
            let end = installedAt.time(of: page).map { Swift.max($0, since) } ?? now
            completions.append(Completion(page: PageIndex(page), latencyNanos: end &- since))
            stopWaiting(at: index)
        }
    }

    /// `takeCompleted` as an array (tests, and callers with no buffer).
    public func takeCompleted(at now: UInt64) -> [Completion] {
        var completions: [Completion] = []
        takeCompleted(at: now, into: &completions)
        return completions
    }

    /// `count` completions from `takeCompleted` are installed in the guest.
    /// Fault thread only.
    public func installed(_ count: Int) {
        precondition(UInt64(count) <= pendingInstalls, "more installs reported than handed out")
        pendingInstallCount.subtract(UInt64(count), ordering: .sequentiallyConsistent)
    }

    private func stopWaiting(on page: UInt64) {
        guard let index = waitList.firstIndex(where: { $0.page == page }) else { return }
        stopWaiting(at: index)
    }

    /// The page at `index` of the wait list waits no more (the last entry
    /// takes its place).
    private func stopWaiting(at index: Int) {
        waiting.remove(waitList[index].page)
        waitList.swapAt(index, waitList.count - 1)
        waitList.removeLast()
        waitingPages.subtract(1, ordering: .sequentiallyConsistent)
    }

    // MARK: receivers

    /// Pages `run` arrived. Returns the runs of them that are stale and not
    /// already being written, now claimed by the calling thread: it writes
    /// exactly those through the alias, then calls `commit` with the same
    /// runs. The rest are dropped and counted as duplicates. Any receiver.
    public func claim(_ run: PageRun) -> [PageRun] {
        precondition(run.end <= geometry.smallPageCount, "\(run) outside the region")
        var claims = PageRunBuilder()
        let dropped = claimed.insert(run, whereSetIn: stale) { firstBit, bits in
            claims.add(bits: bits, from: firstBit)
        }
        if dropped > 0 { duplicatePieces.add(dropped, ordering: .relaxed) }
        return claims.finish()
    }

    /// The claimed `runs` are written: marks them fresh. Returns whether the
    /// fault thread must be woken: a guest page a thread waits on may have
    /// lost its last stale piece, or no page is stale any more. Any
    /// receiver, after writing every piece of `runs`.
    ///
    /// `completed` hears of each waiting guest page seen with no stale
    /// piece left, so that the receiver may install it at once rather than
    /// after the fault thread's wake-up; the page stays waiting until the
    /// fault thread takes it (and installs it again, harmlessly).
    public func commit(_ runs: [PageRun], completed: (PageIndex) -> Void = { _ in }) -> Bool {
        var wake = false
        let piecesPerPage = geometry.pageSize.smallPagesPerPage
        for run in runs {
            precondition(stale.remove(run) == run.count, "commit of \(run), not all of it stale")
            let left = stalePieces.subtract(run.count, ordering: .sequentiallyConsistent).newValue
            filledPieces.add(run.count, ordering: .relaxed)
            if left == 0 { wake = true }
            var guestPage = run.first / piecesPerPage
            while guestPage * piecesPerPage < run.end {
                if waiting.contains(guestPage),
                   !stale.containsAny(in: geometry.smallPages(of: PageIndex(guestPage))) {
                    wake = true
                    completed(PageIndex(guestPage))
                }
                guestPage += 1
            }
        }
        return wake
    }

    /// A receiver installed `page`, which `commit` reported completed, at
    /// `time`: the wait `takeCompleted` reports for it ends there. Any
    /// receiver.
    public func receiverInstalled(_ page: PageIndex, at time: UInt64) {
        installedAt.record(page.rawValue, at: time)
    }

    // MARK: anyone

    /// The stale pages now, as a bitmap of its own (pages only ever leave
    /// it, so one read word by word while receivers commit is at worst a
    /// little stale itself).
    public var staleBitmap: PageBitmap { stale.snapshot() }

    /// The pages asked for with PAGE_REQUEST that have neither arrived nor
    /// are being written: after a lost connection these are asked for
    /// again, first, since guest threads wait on them.
    public var outstandingRequests: [PageRun] {
        var runs = PageRunBuilder()
        var next = requested.nextSet(from: 0)
        while let page = next {
            if stale.contains(page) && !claimed.contains(page) { runs.add(page) }
            next = requested.nextSet(from: page + 1)
        }
        return runs.finish()
    }

    /// A counter with one writer (the fault thread), read from anywhere.
    @inline(__always)
    private func bump(_ counter: borrowing Atomic<UInt64>) {
        counter.store(counter.load(ordering: .relaxed) &+ 1, ordering: .relaxed)
    }
}
