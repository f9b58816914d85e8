import Synchronization

/// When the receiver that completed a waiting guest page installed it, for
/// the fault thread, which takes the page later, to time the wait as the
/// guest thread saw it rather than up to its own wake-up.
///
/// A small table of slots indexed by page modulo its size, without a lock:
/// a writer invalidates its slot, writes the time, then the page; a reader
/// takes the time only if it read the same page before and after it. Two
/// pages completing in one slot before the fault thread takes the first
/// lose the first's time (the reader then uses its own clock): the table
/// is sized for the handful of pages that wait at once.
public final class CompletionTimes: @unchecked Sendable {
    // SAFETY (@unchecked): the slots are touched only through atomics.
    private let slots: UnsafeMutablePointer<Atomic<UInt64>>
    private let count: Int

    public init(slots count: Int = 1024) {
        precondition(count > 0)
        self.count = count
        slots = .allocate(capacity: 2 * count)
        for index in 0..<(2 * count) { (slots + index).initialize(to: Atomic(0)) }
    }

    deinit {
        slots.deinitialize(count: 2 * count)
        slots.deallocate()
    }

    private func slot(_ page: UInt64) -> Int { 2 * Int(page % UInt64(count)) }

    /// `page` was installed at `time`.
    public func record(_ page: UInt64, at time: UInt64) {
        let index = slot(page)
        slots[index].store(0, ordering: .sequentiallyConsistent)
        slots[index + 1].store(time, ordering: .sequentiallyConsistent)
        slots[index].store(page + 1, ordering: .sequentiallyConsistent)
    }

    /// When `page` was installed, if its slot still says.
    public func time(of page: UInt64) -> UInt64? {
        let index = slot(page)
        guard slots[index].load(ordering: .sequentiallyConsistent) == page + 1 else { return nil }
        let time = slots[index + 1].load(ordering: .sequentiallyConsistent)
        guard slots[index].load(ordering: .sequentiallyConsistent) == page + 1 else { return nil }
        return time
    }
}
