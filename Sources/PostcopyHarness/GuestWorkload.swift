import Glibc
import PostcopyCore
import PostcopyMigration
import PostcopyOS
import Synchronization

/// The reference guest's work after resume: `threads` threads read a share
/// of the 4 KiB pages of guest RAM (all by default) once, in a seeded random
/// order, timing the first touch of each (the stall a vCPU sees), hashing it
/// for the image digest, and, when `scribble` is set, then writing a marker
/// into it. Pages not touched are hashed after postcopy, once the range is
/// released, so the digest always covers all of RAM.
final class GuestWorkload: @unchecked Sendable {
    // SAFETY (@unchecked): each thread writes only its own pages' slots of
    // `hashes`, and hands its results over through `results`; `finish`
    // reads them after joining.
    private let mapping: Mapping
    private let pageCount: UInt64
    private let scribble: Bool
    private let recordTimes: Bool
    /// Work between two touches (a vCPU does more than fault).
    private let thinkNanos: UInt64
    private let hashes: UnsafeMutableBufferPointer<UInt64>
    private let touched: [Bool]
    private let shards: [[UInt64]]
    /// Per thread: its first-touch stalls, when each touch began since
    /// `started` (only with `recordTimes`), and what its loads read (kept
    /// so that they are not elided). Threads write their own slot, under the
    /// lock: slots of one array are not separate variables.
    private let results: Locked<[(stalls: [UInt64], startedAt: [UInt64], sink: UInt64)]>
    private var workers: [OSThread] = []
    private let started = monotonicNanoseconds()

    /// `touchShare` of the pages (0…1) are read by the threads, each
    /// sleeping `thinkNanos` after a touch; with `recordTimes` each touch's
    /// start is kept for `touchLog`.
    init(mapping: Mapping, geometry: PageGeometry, threads: Int, seed: UInt64, scribble: Bool,
         touchShare: Double = 1, thinkNanos: UInt64 = 0, recordTimes: Bool = false) throws {
        self.mapping = mapping
        self.thinkNanos = thinkNanos
        pageCount = geometry.smallPageCount
        self.scribble = scribble
        self.recordTimes = recordTimes
        hashes = .allocate(capacity: Int(pageCount))
        hashes.initialize(repeating: 0)
        let all = TouchOrder.random(seed: seed).pages(count: pageCount)
        let order = all.prefix(Int((Double(pageCount) * min(max(touchShare, 0), 1)).rounded()))
        var touched = [Bool](repeating: false, count: Int(pageCount))
        for page in order { touched[Int(page)] = true }
        self.touched = touched
        shards = (0..<threads).map { index in
            Array(order[(order.count * index / threads)..<(order.count * (index + 1) / threads)])
        }
        results = Locked(shards.map { _ in ([], [], 0) })
        for (index, shard) in shards.enumerated() {
            workers.append(try OSThread.start(name: "guest-vcpu\(index)") { [self] in run(shard, index) })
        }
    }

    deinit { hashes.deallocate() }

    /// The marker the guest writes into the last word of `page`.
    static func marker(_ page: UInt64) -> UInt64 { page ^ 0x5CA1_AB1E_0000_0000 }

    private func run(_ pages: [UInt64], _ index: Int) {
        var samples: [UInt64] = []
        samples.reserveCapacity(pages.count)
        var starts: [UInt64] = []
        if recordTimes { starts.reserveCapacity(pages.count) }
        var sink: UInt64 = 0
        for page in pages {
            let address = mapping.pointer(toSmallPage: page)
            let before = monotonicNanoseconds()
            // The load is used (in `sink`), so it stays between the two
            // clock reads, which are calls the compiler cannot see through.
            sink ^= address.load(as: UInt64.self)
            let after = monotonicNanoseconds()
            samples.append(after - before)
            if recordTimes { starts.append(before - started) }
            let bytes = UnsafeRawBufferPointer(start: address, count: 4096)
            hashes[Int(page)] = PageHash.of(bytes).hash
            if scribble { address.storeBytes(of: Self.marker(page), toByteOffset: 4096 - 8, as: UInt64.self) }
            if thinkNanos > 0 { sleepNanoseconds(thinkNanos) }
        }
        results.withLock { $0[index] = (samples, starts, sink) }
    }

    /// Waits for the threads, then hashes the pages they did not touch: call
    /// it once the range is released (or postcopy failed), since reading an
    /// untouched page would fault. The digest of all pages, the threads'
    /// stalls, and how many markers did not survive.
    func finish() -> GuestSummary {
        for worker in workers { worker.join() }
        let stalls = results.withLock { $0.map(\.stalls) }
        var summary = GuestSummary()
        summary.threads = workers.count
        summary.pagesRead = UInt64(shards.reduce(0) { $0 + $1.count })
        summary.workloadSeconds = Double(monotonicNanoseconds() - started) / 1e9
        summary.firstTouch = LatencyFigures(nanoseconds: stalls.flatMap { $0 })
        summary.firstTouchDist = LatencyDistribution(nanoseconds: stalls.joined())
        summary.blockedMsMaxThread = stalls.map { $0.reduce(0.0) { $0 + Double($1) } / 1e6 }.max() ?? 0
        for page in 0..<pageCount where !touched[Int(page)] {
            hashes[Int(page)] = PageHash.of(UnsafeRawBufferPointer(start: mapping.pointer(toSmallPage: page), count: 4096)).hash
        }
        summary.actualDigest = ImageDigest(pageHashes: UnsafeBufferPointer(hashes)).description
        if scribble {
            for page in 0..<pageCount where touched[Int(page)] {
                summary.scribbledPages += 1
                let word = mapping.pointer(toSmallPage: page).load(fromByteOffset: 4096 - 8, as: UInt64.self)
                if word != Self.marker(page) { summary.scribblesLost += 1 }
            }
        }
        return summary
    }

    /// Every touch as CSV, `thread,t_us,page,stall_us` (t_us since resume),
    /// in time order; empty unless `recordTimes` was set.
    func touchLog() -> String {
        var rows: [(at: UInt64, thread: Int, page: UInt64, stall: UInt64)] = []
        for (thread, result) in results.withLock({ $0 }).enumerated() {
            for (index, at) in result.startedAt.enumerated() {
                rows.append((at, thread, shards[thread][index], result.stalls[index]))
            }
        }
        rows.sort { $0.at < $1.at }
        var text = "thread,t_us,page,stall_us\n"
        for row in rows {
            text += "\(row.thread),\(fixed(Double(row.at) / 1000, 1)),\(row.page),\(fixed(Double(row.stall) / 1000, 2))\n"
        }
        return text
    }
}
