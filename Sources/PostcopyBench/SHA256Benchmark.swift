import PostcopyCore
import PostcopyOS

/// SHA-256 throughput, the way postcopyd uses it and the way its cost is
/// usually quoted: a buffer hashed as separate 4 KiB pages (one digest
/// each), the same buffer as one message, and the image digest of a guest
/// of that size (SHA-256 over 8 bytes per 4 KiB page). Each figure is the
/// median of `runs`; the kinds alternate within a run.
public struct SHA256Benchmark: Sendable {
    public let bytes: Int
    public let runs: Int

    public init(bytes: Int, runs: Int) {
        precondition(bytes > 0 && bytes % 4096 == 0, "a whole number of 4 KiB pages")
        self.bytes = bytes
        self.runs = runs
    }

    /// One measured way of hashing: its name, and MB/s (10^6 bytes of
    /// input per second), the median and the slowest and fastest runs.
    public struct Figure: Sendable, Codable {
        public let kind: String
        public let inputBytes: Int
        public let runs: Int
        public let medianMBps: Double
        public let minMBps: Double
        public let maxMBps: Double
    }

    public func run() -> [Figure] {
        // Not zeros, so that nothing can take a short cut.
        var buffer = [UInt8](repeating: 0, count: bytes)
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        for index in buffer.indices {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            buffer[index] = UInt8(truncatingIfNeeded: state >> 56)
        }
        let pageHashes = (0..<(bytes / 4096)).map { UInt64($0) &* 0x9E37_79B9_7F4A_7C15 }
        var seconds: [String: [Double]] = [:]
        var sink: UInt8 = 0
        for _ in 0..<runs {
            buffer.withUnsafeBytes { memory in
                seconds["4 KiB pages", default: []].append(timed {
                    for offset in stride(from: 0, to: memory.count, by: 4096) {
                        var hasher = SHA256()
                        hasher.update(UnsafeRawBufferPointer(rebasing: memory[offset..<(offset + 4096)]))
                        sink ^= hasher.finalize()[0]
                    }
                })
                seconds["one buffer", default: []].append(timed {
                    var hasher = SHA256()
                    hasher.update(memory)
                    sink ^= hasher.finalize()[0]
                })
            }
            seconds["image digest", default: []].append(timed {
                sink ^= ImageDigest(pageHashes: pageHashes).bytes[0]
            })
        }
        // Keeps the digests alive, so that no hashing is optimised away.
        if sink == 0x5A { print("", terminator: "") }
        return [("4 KiB pages", bytes), ("one buffer", bytes), ("image digest", pageHashes.count * 8)].map { kind, input in
            let rates = seconds[kind]!.map { Double(input) / $0 / 1e6 }
            let summary = LatencySummary(rates)!
            return Figure(kind: kind, inputBytes: input, runs: runs, medianMBps: summary.median,
                          minMBps: summary.min, maxMBps: summary.max)
        }
    }

    private func timed(_ body: () -> Void) -> Double {
        let start = monotonicNanoseconds()
        body()
        return Double(monotonicNanoseconds() - start) / 1e9
    }
}
