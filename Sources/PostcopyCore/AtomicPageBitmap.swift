import Synchronization

/// A fixed-length set of page indexes that threads change and read at the
/// same time without a lock: one bit per page, each 64-bit word changed by
/// atomic read-modify-writes.
///
/// What postcopy's fault path shares with the threads that receive pages
/// (`PostcopyTracker`): a fault thread that took a lock a back-fill thread
/// held would wait as long as the scheduler keeps that thread off the CPU
/// (for ever, nearly, at `SCHED_IDLE` under a busy guest). Every operation is sequentially consistent, so two
/// threads that each change one bitmap and then read the other's (a
/// receiver clearing `stale` then reading `waiting`, the fault thread
/// setting `waiting` then reading `stale`) cannot both miss the other's
/// change.
///
/// Either owns its words or views words that live elsewhere (a page-state
/// record mapped from a file). Bits past `count` are always zero.
public final class AtomicPageBitmap: @unchecked Sendable {
    // SAFETY (@unchecked): the words are only touched through atomic
    // operations; an owned allocation lives as long as the object, a viewed
    // one as long as its owner keeps it mapped (the caller's promise).
    private let words: UnsafeMutablePointer<Atomic<UInt64>>
    private let wordCount: Int
    private let owned: Bool
    public let count: UInt64

    /// An empty bitmap for `count` pages. Its memory is written here, so a
    /// bitmap made ahead of time costs nothing in page faults later.
    public init(count: UInt64) {
        self.count = count
        wordCount = Int(PageBitmap.wordCount(bits: count))
        words = .allocate(capacity: max(wordCount, 1))
        for index in 0..<max(wordCount, 1) { (words + index).initialize(to: Atomic(0)) }
        owned = true
    }

    /// A bitmap holding what `bitmap` holds.
    public convenience init(_ bitmap: PageBitmap) {
        self.init(count: bitmap.count)
        store(bitmap)
    }

    /// A view of `count` bits in the words at `raw`, which must hold
    /// (count+63)/64 of them, 8-byte aligned, with no bit set past `count`,
    /// and stay mapped as long as this view is used.
    public init(viewing raw: UnsafeMutableRawPointer, count: UInt64) {
        self.count = count
        wordCount = Int(PageBitmap.wordCount(bits: count))
        words = raw.bindMemory(to: Atomic<UInt64>.self, capacity: max(wordCount, 1))
        owned = false
    }

    deinit {
        guard owned else { return }
        words.deinitialize(count: max(wordCount, 1))
        words.deallocate()
    }

    /// The word holding bit `index`.
    @inline(__always)
    private func word(_ index: Int) -> UInt64 { words[index].load(ordering: .sequentiallyConsistent) }

    @inline(__always)
    public func contains(_ index: UInt64) -> Bool {
        precondition(index < count, "page \(index) outside a bitmap of \(count)")
        return word(Int(index >> 6)) & (1 << (index & 63)) != 0
    }

    /// Sets bit `index`; returns true when it was clear before (this thread set it).
    @discardableResult
    public func insert(_ index: UInt64) -> Bool {
        precondition(index < count, "page \(index) outside a bitmap of \(count)")
        let mask: UInt64 = 1 << (index & 63)
        return words[Int(index >> 6)].bitwiseOr(mask, ordering: .sequentiallyConsistent).oldValue & mask == 0
    }

    /// Clears bit `index`; returns true when it was set before (this thread cleared it).
    @discardableResult
    public func remove(_ index: UInt64) -> Bool {
        precondition(index < count, "page \(index) outside a bitmap of \(count)")
        let mask: UInt64 = 1 << (index & 63)
        return words[Int(index >> 6)].bitwiseAnd(~mask, ordering: .sequentiallyConsistent).oldValue & mask != 0
    }

    /// Clears the bits of `run`, one atomic operation per word; returns
    /// how many of them were set.
    @discardableResult
    public func remove(_ run: PageRun) -> UInt64 {
        var cleared: UInt64 = 0
        forEachWord(of: run) { index, mask in
            let old = words[index].bitwiseAnd(~mask, ordering: .sequentiallyConsistent).oldValue
            cleared += UInt64((old & mask).nonzeroBitCount)
        }
        return cleared
    }

    /// Clears the bits of `run`, one atomic operation per word, and calls
    /// `body` with each word's bits this thread cleared (those that were
    /// set), in order. Returns how many it cleared.
    @discardableResult
    public func take(_ run: PageRun, _ body: (_ firstBit: UInt64, _ bits: UInt64) -> Void) -> UInt64 {
        var cleared: UInt64 = 0
        forEachWord(of: run) { index, mask in
            let taken = words[index].bitwiseAnd(~mask, ordering: .sequentiallyConsistent).oldValue & mask
            cleared += UInt64(taken.nonzeroBitCount)
            if taken != 0 { body(UInt64(index) << 6, taken) }
        }
        return cleared
    }

    /// Sets, in one atomic operation per word, the bits of `run` that are
    /// set in `candidates` (a bitmap of the same count) and were clear
    /// here; calls `body` with each word's bits this thread set, in order.
    /// Returns how many bits of `run` it did not set.
    public func insert(_ run: PageRun, whereSetIn candidates: AtomicPageBitmap,
                       _ body: (_ firstBit: UInt64, _ bits: UInt64) -> Void) -> UInt64 {
        precondition(candidates.count == count, "a bitmap of \(candidates.count) bits against one of \(count)")
        var skipped: UInt64 = 0
        forEachWord(of: run) { index, mask in
            let wanted = candidates.word(index) & mask
            let taken = wanted == 0 ? 0
                : wanted & ~words[index].bitwiseOr(wanted, ordering: .sequentiallyConsistent).oldValue
            skipped += UInt64(mask.nonzeroBitCount - taken.nonzeroBitCount)
            if taken != 0 { body(UInt64(index) << 6, taken) }
        }
        return skipped
    }

    /// Calls `body` with the index and the mask of each word `run` covers.
    @inline(__always)
    private func forEachWord(of run: PageRun, _ body: (Int, UInt64) -> Void) {
        precondition(run.end <= count, "\(run) outside a bitmap of \(count)")
        PageBitmap.forEachWord(in: run.pages, body)
    }

    /// Whether any page in `range` is set.
    public func containsAny(in range: Range<UInt64>) -> Bool {
        guard let next = nextSet(from: range.lowerBound) else { return false }
        return next < range.upperBound
    }

    /// The first set page at or after `start`, or nil.
    public func nextSet(from start: UInt64) -> UInt64? {
        guard start < count else { return nil }
        var index = Int(start >> 6)
        var bits = word(index) & (UInt64.max << (start & 63))
        while true {
            if bits != 0 { return UInt64(index) << 6 + UInt64(bits.trailingZeroBitCount) }
            index += 1
            guard index < wordCount else { return nil }
            bits = word(index)
        }
    }

    /// The bitmap now, as a plain value, read word by word.
    public func snapshot() -> PageBitmap {
        PageBitmap(words: wordValues(), count: count)!
    }

    /// The words now, read one by one.
    public func wordValues() -> [UInt64] { (0..<wordCount).map(word) }

    /// Sets word `index` to `value` as it is, bits past `count` included
    /// (tests that damage a record on purpose).
    public func storeWord(_ index: Int, _ value: UInt64) {
        precondition(index < wordCount, "word \(index) of a bitmap of \(wordCount) words")
        words[index].store(value, ordering: .sequentiallyConsistent)
    }

    /// Writes `bitmap` over every word (while no other thread uses this one).
    public func store(_ bitmap: PageBitmap) {
        precondition(bitmap.count == count, "a bitmap of \(bitmap.count) bits stored in one of \(count)")
        for index in 0..<wordCount {
            words[index].store(bitmap.words[index], ordering: .sequentiallyConsistent)
        }
    }
}
