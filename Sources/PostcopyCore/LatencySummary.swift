/// Order statistics over a set of samples (durations in nanoseconds, or
/// any other measure), for benchmarks and the summaries the daemon prints.
public struct LatencySummary: Equatable, Sendable {
    public let count: Int
    public let min: Double
    public let median: Double
    public let p99: Double
    public let p999: Double
    public let max: Double

    /// nil for no samples.
    public init?(_ samples: [Double]) {
        guard !samples.isEmpty else { return nil }
        let sorted = samples.sorted()
        count = sorted.count
        min = sorted[0]
        max = sorted[sorted.count - 1]
        median = Self.quantile(sorted, 0.5)
        p99 = Self.quantile(sorted, 0.99)
        p999 = Self.quantile(sorted, 0.999)
    }

    /// Nearest-rank quantile over sorted samples; the median of an even
    /// count is the mean of the middle two.
    public static func quantile(_ sorted: [Double], _ q: Double) -> Double {
        precondition(!sorted.isEmpty && q >= 0 && q <= 1)
        if q == 0.5 && sorted.count % 2 == 0 {
            return (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
        }
        let rank = Int((q * Double(sorted.count)).rounded(.up))
        return sorted[Swift.max(rank, 1) - 1]
    }
}
