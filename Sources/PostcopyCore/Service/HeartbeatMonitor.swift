/// Whether a loop's heartbeat counter still moves: a loop that turns at
/// least once per period is healthy; one whose counter stood still for
/// `stallNanos` is stuck.
public struct HeartbeatMonitor: Sendable {
    public enum Verdict: Equatable, Sendable {
        case healthy
        /// Just found stuck (for this long): say so once.
        case stalledNow(UInt64)
        case stalled
    }

    public let stallNanos: UInt64
    private var last: (beat: UInt64, at: UInt64)?
    private var reported = false

    public init(stallNanos: UInt64) {
        self.stallNanos = stallNanos
    }

    /// `beat` is the counter now (nil: no loop runs, nothing to watch).
    public mutating func observe(_ beat: UInt64?, at now: UInt64) -> Verdict {
        guard let beat else {
            last = nil
            return .healthy
        }
        guard let previous = last, previous.beat == beat else {
            last = (beat, now)
            reported = false
            return .healthy
        }
        let still = now - previous.at
        guard still >= stallNanos else { return .healthy }
        if reported { return .stalled }
        reported = true
        return .stalledNow(still)
    }
}
