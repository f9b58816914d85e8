import PostcopyCore
import Testing

@Suite struct LatencyHistogramTests {
    @Test func smallValuesAreExactAndEmptyHasNoQuantile() {
        var histogram = LatencyHistogram()
        #expect(histogram.quantile(0.5) == nil)
        #expect(LatencyFigures(histogram: histogram) == nil)
        for value: UInt64 in [3, 1, 2, 60, 5] { histogram.record(value) }
        #expect(histogram.quantile(0.5) == 3)
        #expect(histogram.quantile(1) == 60)
        #expect(histogram.quantile(0) == 1)
        #expect(histogram.count == 5 && histogram.sum == 71 && histogram.max == 60)
    }

    /// Against the exact nearest-rank quantiles of the same samples, over
    /// nine decades: within 1/32 of the true value, never above the max.
    @Test(arguments: [UInt64(1), 42, 0xFEED])
    func quantilesAreWithinThreePercentOfTheSortedSamples(seed: UInt64) throws {
        var generator = SplitMix64(seed: seed)
        var histogram = LatencyHistogram()
        var samples: [UInt64] = []
        for _ in 0..<20_000 {
            // Log-uniform from 1 ns to about 1 s.
            let value = UInt64(pow2(Double(generator.next() % 30_000) / 1_000))
            samples.append(value)
            histogram.record(value)
        }
        let sorted = samples.map { Double($0) }.sorted()
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let exact = q == 0.5 ? sorted[sorted.count / 2 - 1] : LatencySummary.quantile(sorted, q)
            let estimate = Double(try #require(histogram.quantile(q)))
            #expect(abs(estimate - exact) <= exact / 32 + 1, "q \(q): \(estimate) against \(exact)")
        }
        #expect(histogram.max == samples.max())
        #expect(histogram.sum == samples.reduce(0, +))
    }

    @Test func theLargestValuesHaveABucket() {
        var histogram = LatencyHistogram()
        histogram.record(.max)
        histogram.record(1 << 63)
        #expect(histogram.quantile(1) == .max)
        #expect(histogram.count == 2)
    }

    private func pow2(_ exponent: Double) -> Double {
        var result = 1.0
        var left = exponent
        while left >= 1 { result *= 2; left -= 1 }
        return result * (1 + left * 0.6931471805599453)
    }

    /// QEMU's postcopy-latency-dist: bucket N holds [2^N, 2^(N+1)) µs.
    @Test func distributionBucketsArePowersOfTwoMicroseconds() {
        let samples: [UInt64] = [0, 999, 1_999, 2_000, 3_999, 256_000, 511_999, 512_000, 8_388_608_000, 100_000_000_000]
        let dist = LatencyDistribution(nanoseconds: samples)
        #expect(dist.buckets.count == 24)
        #expect(dist.buckets[0] == 3)   // under 2 µs
        #expect(dist.buckets[1] == 2)   // 2–3.999 µs
        #expect(dist.buckets[8] == 2)   // 256–511 µs
        #expect(dist.buckets[9] == 1)
        #expect(dist.buckets[23] == 2)  // 2^23 µs and beyond
        #expect(dist.count == UInt64(samples.count))
        var histogram = LatencyHistogram()
        samples.forEach { histogram.record($0) }
        #expect(histogram.distribution == dist)
        #expect(LatencyDistribution.label(ofBucket: 0) == "< 2 µs")
        #expect(LatencyDistribution.label(ofBucket: 8) == "256–512 µs")
        #expect(LatencyDistribution.label(ofBucket: 9) == "512 µs–1.0 ms")
        #expect(LatencyDistribution.label(ofBucket: 23) == "≥ 8.4 s")
        #expect(dist.text.hasPrefix("< 2 µs: 3, 2–4 µs: 2, 256–512 µs: 2"))
    }
}
