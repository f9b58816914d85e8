/// When the source agent stops iterating precopy and switches over.
public struct PrecopyPolicy: Equatable, Sendable {
    /// Rounds at most, the first full pass included (≥ 1).
    public var maxRounds: Int
    /// Precopy time at most, in nanoseconds.
    public var maxDurationNanos: UInt64
    /// Switch over as soon as a scan finds at most this many changed pages.
    public var switchoverPages: UInt64

    public init(maxRounds: Int = 5, maxDurationNanos: UInt64 = 120_000_000_000, switchoverPages: UInt64 = 256) {
        precondition(maxRounds >= 1, "at least one precopy round")
        self.maxRounds = maxRounds
        self.maxDurationNanos = maxDurationNanos
        self.switchoverPages = switchoverPages
    }

    /// Why precopy ended.
    public enum Reason: String, Equatable, Sendable, Codable {
        /// A scan found few enough changed pages.
        case converged
        case roundLimit = "round limit"
        case timeLimit = "time limit"
    }

    /// Whether to start another round, after `roundsDone` rounds and
    /// `elapsedNanos` of precopy: the limits say so before the scan.
    public func limitReached(roundsDone: Int, elapsedNanos: UInt64) -> Reason? {
        if roundsDone >= maxRounds { return .roundLimit }
        if elapsedNanos >= maxDurationNanos { return .timeLimit }
        return nil
    }

    /// Whether a scan that found `dirtyPages` changed pages is small enough
    /// to leave them to postcopy.
    public func converged(dirtyPages: UInt64) -> Bool { dirtyPages <= switchoverPages }
}
