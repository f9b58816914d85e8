import Glibc
import PostcopyCore
import PostcopyOS
import Synchronization

/// The reference guest's work after resume: `threads` threads read every
/// 4 KiB page of guest RAM once, in a seeded random order, timing the first
/// touch of each (the stall a vCPU sees), hashing it for the image digest,
/// and, when `scribble` is set, then writing a marker into it.
final class GuestWorkload: @unchecked Sendable {
    // SAFETY (@unchecked): each thread writes only its own pages' slots of
    // `hashes` and its own `stalls` array; `finish` reads them after joining.
    private let mapping: Mapping
    private let pageCount: UInt64
    private let scribble: Bool
    private let hashes: UnsafeMutableBufferPointer<UInt64>
    private var stalls: [[UInt64]]
    /// What each thread's first loads read, kept so the loads are not elided.
    private var sinks: [UInt64]
    private var workers: [OSThread] = []
    private let started = monotonicNanoseconds()

    init(mapping: Mapping, geometry: PageGeometry, threads: Int, seed: UInt64, scribble: Bool) throws {
        self.mapping = mapping
        pageCount = geometry.smallPageCount
        self.scribble = scribble
        hashes = .allocate(capacity: Int(pageCount))
        hashes.initialize(repeating: 0)
        let order = TouchOrder.random(seed: seed).pages(count: pageCount)
        let shards = (0..<threads).map { index in
            Array(order[(order.count * index / threads)..<(order.count * (index + 1) / threads)])
        }
        stalls = shards.map { _ in [] }
        sinks = shards.map { _ in 0 }
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
        var sink: UInt64 = 0
        for page in pages {
            // SAFETY: page < pageCount, so the 4 KiB at this offset lie in the mapping.
            let address = mapping.base + Int(page * 4096)
            let before = monotonicNanoseconds()
            // The load is used (in `sink`), so it stays between the two
            // clock reads, which are calls the compiler cannot see through.
            sink ^= address.load(as: UInt64.self)
            let after = monotonicNanoseconds()
            samples.append(after - before)
            let bytes = UnsafeRawBufferPointer(start: address, count: 4096)
            hashes[Int(page)] = PageHash.of(bytes).hash
            if scribble { address.storeBytes(of: Self.marker(page), toByteOffset: 4096 - 8, as: UInt64.self) }
        }
        stalls[index] = samples
        sinks[index] = sink
    }

    /// Waits for the threads; the digest of what they read, their stalls,
    /// and how many markers did not survive.
    func finish() -> GuestSummary {
        for worker in workers { worker.join() }
        var summary = GuestSummary()
        summary.threads = workers.count
        summary.pagesRead = pageCount
        summary.workloadSeconds = Double(monotonicNanoseconds() - started) / 1e9
        summary.firstTouch = LatencyFigures(nanoseconds: stalls.flatMap { $0 })
        summary.actualDigest = ImageDigest(pageHashes: UnsafeBufferPointer(hashes)).description
        if scribble {
            summary.scribbledPages = pageCount
            for page in 0..<pageCount {
                let word = (mapping.base + Int(page * 4096 + 4096 - 8)).load(as: UInt64.self)
                if word != Self.marker(page) { summary.scribblesLost += 1 }
            }
        }
        return summary
    }
}
