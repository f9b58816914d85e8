import PostcopyCore
import PostcopyMigration
import PostcopyOS

/// The reference guest's TLB-heavy loop (`postcopy-guest vmm
/// --measure-tlb`): dependent 8-byte reads at random across all of guest
/// RAM, timed in passes, on the calling thread. Each address comes from a
/// fixed-seed generator mixed with the word read before: a read cannot
/// start before the one before it ends, so a pass times the latency of a
/// read, page-table walk included, and the sequence is the same before and
/// after a collapse (the bytes are).
struct RandomReads {
    let mapping: Mapping
    static let passes = 5

    /// Five passes, each about a fifth of `nanoseconds`: of `readsPerPass`
    /// reads when given (to repeat an earlier measurement exactly), else
    /// as many as a first short pass says fit.
    func measure(nanoseconds: UInt64, readsPerPass given: UInt64? = nil) -> RandomReadFigures {
        let readsPerPass = given ?? calibrate(nanoseconds / UInt64(Self.passes))
        var passNanos: [UInt64] = []
        for _ in 0..<Self.passes {
            let started = monotonicNanoseconds()
            read(readsPerPass)
            passNanos.append(monotonicNanoseconds() - started)
        }
        return RandomReadFigures(readsPerPass: readsPerPass, passNanos: passNanos)
    }

    /// Reads that take about `nanoseconds`, from a pass of 2^20.
    private func calibrate(_ nanoseconds: UInt64) -> UInt64 {
        let probe: UInt64 = 1 << 20
        let started = monotonicNanoseconds()
        read(probe)
        let took = max(monotonicNanoseconds() - started, 1)
        return max(probe, UInt64(Double(probe) * Double(nanoseconds) / Double(took)))
    }

    /// `count` dependent reads; what they read is returned, so that the
    /// loads are not elided.
    @discardableResult
    private func read(_ count: UInt64) -> UInt64 {
        mapping.withUnsafeBytes { bytes in
            let words = UInt64(bytes.count / 8)
            var state: UInt64 = 0x9E37_79B9_7F4A_7C15
            var last: UInt64 = 0
            for _ in 0..<count {
                state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                // The high half of (state ^ last) × words: uniform in 0..<words.
                let word = (state ^ last).multipliedFullWidth(by: words).high
                // SAFETY: word < words, so the 8 bytes lie inside the mapping.
                last = bytes.load(fromByteOffset: Int(word) * 8, as: UInt64.self)
            }
            return last
        }
    }
}
