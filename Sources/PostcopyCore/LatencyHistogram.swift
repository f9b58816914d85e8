/// Durations counted in log-linear buckets: exact below 64 ns, then 32
/// buckets per power of two, so a quantile read from it is within 1/32
/// (3 %) of the true sample's value. Recording is a few instructions and
/// allocates nothing; reading a quantile walks at most 1 920 counters,
/// however many samples there are.
///
/// What the daemon's once-a-second status reads, instead of sorting every
/// stale fault's latency under the lock the fault thread records into (the
/// summary at the end still uses the exact samples).
public struct LatencyHistogram: Equatable, Sendable {
    /// Sub-buckets per power of two, as a power of two.
    private static let subBits = 5
    private static let bucketCount = (64 - subBits + 1) * (1 << subBits)

    private var buckets: [UInt64]
    public private(set) var count: UInt64 = 0
    /// The sum and the largest of the samples, exactly.
    public private(set) var sum: UInt64 = 0
    public private(set) var max: UInt64 = 0
    /// The same samples in QEMU's `postcopy-latency-dist` buckets.
    public private(set) var distribution = LatencyDistribution()

    public init() {
        buckets = [UInt64](repeating: 0, count: Self.bucketCount)
    }

    public mutating func record(_ value: UInt64) {
        buckets[Self.bucket(of: value)] += 1
        distribution.record(nanoseconds: value)
        count += 1
        sum &+= value
        if value > max { max = value }
    }

    /// The bucket of `value`: the value itself below 64; above, the top six
    /// bits of the value and how far they were shifted.
    static func bucket(of value: UInt64) -> Int {
        let width = 64 - value.leadingZeroBitCount
        guard width > subBits + 1 else { return Int(value) }
        let shift = width - (subBits + 1)
        return shift << subBits + Int(value >> UInt64(shift))
    }

    /// The smallest and largest value bucket `index` holds.
    static func range(of index: Int) -> ClosedRange<UInt64> {
        guard index >= 2 << subBits else { return UInt64(index)...UInt64(index) }
        let shift = UInt64(index >> subBits - 1)
        let mantissa = UInt64(index & (1 << subBits - 1) + 1 << subBits)
        return (mantissa << shift)...(((mantissa + 1) << shift) &- 1)
    }

    /// The nearest-rank quantile `q` (0...1): the middle of the bucket that
    /// holds it, never above the largest sample (and the largest itself for
    /// the top rank); nil with no samples.
    public func quantile(_ q: Double) -> UInt64? {
        precondition(q >= 0 && q <= 1)
        guard count > 0 else { return nil }
        let rank = Swift.max(UInt64((q * Double(count)).rounded(.up)), 1)
        // The top rank is the largest sample, which is known exactly.
        guard rank < count else { return max }
        var seen: UInt64 = 0
        for (index, inBucket) in buckets.enumerated() where inBucket > 0 {
            seen += inBucket
            if seen >= rank {
                let range = Self.range(of: index)
                return Swift.min(range.lowerBound + (range.upperBound - range.lowerBound) / 2, max)
            }
        }
        return max
    }
}

extension LatencyFigures {
    /// From a histogram of nanoseconds (quantiles within 3 %); nil when empty.
    public init?(histogram: LatencyHistogram) {
        guard let p50 = histogram.quantile(0.5), let p99 = histogram.quantile(0.99),
              let p999 = histogram.quantile(0.999) else { return nil }
        self.init(count: Int(histogram.count), p50Us: Double(p50) / 1000, p99Us: Double(p99) / 1000,
                  p999Us: Double(p999) / 1000, maxUs: Double(histogram.max) / 1000,
                  totalMs: Double(histogram.sum) / 1e6)
    }
}

/// Latencies counted in power-of-two microsecond buckets, the way QEMU's
/// `query-migrate` reports `postcopy-latency-dist` (since 10.1): bucket N
/// counts the samples in [2^N, 2^(N+1)) µs, so bucket 8 holds those from
/// 256 to 511 µs. Like QEMU's, there are 24 buckets; a sample under 2 µs
/// counts in bucket 0 and one of 2^23 µs (8.4 s) or more in bucket 23.
public struct LatencyDistribution: Codable, Equatable, Sendable {
    public static let bucketCount = 24

    /// Samples per bucket, bucket 0 first; always `bucketCount` of them.
    public private(set) var buckets = [UInt64](repeating: 0, count: bucketCount)

    public init() {}

    /// From whole samples in nanoseconds.
    public init(nanoseconds samples: some Sequence<UInt64>) {
        for sample in samples { record(nanoseconds: sample) }
    }

    public mutating func record(nanoseconds: UInt64) {
        buckets[Self.bucket(ofMicroseconds: nanoseconds / 1000)] += 1
    }

    /// ⌊log2 µs⌋, within 0...23.
    static func bucket(ofMicroseconds micros: UInt64) -> Int {
        guard micros > 1 else { return 0 }
        return min(63 - micros.leadingZeroBitCount, bucketCount - 1)
    }

    public var count: UInt64 { buckets.reduce(0, +) }

    /// "64–128 µs: 12, 128–256 µs: 340, ≥ 8.4 s: 1": the buckets that hold
    /// samples, in order (empty text with none).
    public var text: String {
        buckets.indices.filter { buckets[$0] > 0 }.map { "\(Self.label(ofBucket: $0)): \(buckets[$0])" }
            .joined(separator: ", ")
    }

    /// "< 2 µs", "256–512 µs", "512 µs–1.0 ms", "≥ 8.4 s" (the last).
    public static func label(ofBucket index: Int) -> String {
        if index == 0 { return "< 2 µs" }
        let (low, lowUnit) = duration(1 << UInt64(index))
        guard index < bucketCount - 1 else { return "≥ \(low) \(lowUnit)" }
        let (high, highUnit) = duration(1 << UInt64(index + 1))
        return lowUnit == highUnit ? "\(low)–\(high) \(highUnit)" : "\(low) \(lowUnit)–\(high) \(highUnit)"
    }

    /// 512 → ("512", "µs"), 2048 → ("2.0", "ms"): a power of two of
    /// microseconds, rounded for reading.
    private static func duration(_ micros: UInt64) -> (String, String) {
        switch micros {
        case ..<1000: ("\(micros)", "µs")
        case ..<1_000_000: (fixed(Double(micros) / 1000, micros < 10_000 ? 1 : 0), "ms")
        default: (fixed(Double(micros) / 1e6, 1), "s")
        }
    }
}
