/// Orders in which a test or benchmark touches the pages of a region.
public enum TouchOrder: Sendable, Equatable {
    case sequential
    /// Every `stride`-th page, then the ones after each of those, and so on:
    /// a page is touched only after its neighbours' first chance to be mapped
    /// behind the tracker's back (fault-around maps up to 16 neighbours).
    case strided(Int)
    /// A permutation from a seeded generator: reproducible per seed.
    case random(seed: UInt64)

    public func pages(count: UInt64) -> [UInt64] {
        switch self {
        case .sequential:
            return Array(0..<count)
        case let .strided(step):
            let step = UInt64(max(step, 1))
            return (0..<min(step, count)).flatMap { first in Swift.stride(from: first, to: count, by: Int(step)) }
        case let .random(seed):
            var generator = SplitMix64(seed: seed)
            return Array(0..<count).shuffled(using: &generator)
        }
    }
}

/// A small, fast, seedable generator (Steele, Lea & Flood's SplitMix64), so
/// that test orders and page patterns are reproducible.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// The test pattern for one 8-byte word of a page: distinct for every page
/// and word of a region, so a page read from the wrong place is caught.
@inlinable
public func patternWord(page: UInt64, word: UInt64, seed: UInt64) -> UInt64 {
    var z = (page << 20 | word) &+ seed &* 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 31)) &* 0xBF58_476D_1CE4_E5B9
    return z ^ (z >> 29) | 1
}
