/// Keeps a stream at or under a rate: after each send, how long to wait so
/// that the bytes sent since `start` took at least bytes / rate. A sender
/// that falls behind (the link is slower than the limit) never waits and
/// never bursts to catch up by more than `burstBytes`.
public struct Pacer: Sendable, Equatable {
    public let bytesPerSecond: UInt64
    public let burstBytes: UInt64
    private var start: UInt64
    private var sent: UInt64 = 0

    /// `bytesPerSecond` > 0; `now` in monotonic nanoseconds.
    public init(bytesPerSecond: UInt64, burstBytes: UInt64 = 1 << 20, now: UInt64) {
        precondition(bytesPerSecond > 0, "a pacer needs a positive rate")
        self.bytesPerSecond = bytesPerSecond
        self.burstBytes = burstBytes
        start = now
    }

    /// Counts `bytes` sent at `now`; returns the nanoseconds to wait before
    /// sending more (0: go on).
    public mutating func sent(_ bytes: UInt64, now: UInt64) -> UInt64 {
        sent += bytes
        let due = start + UInt64((Double(sent) / Double(bytesPerSecond) * 1e9).rounded(.up))
        if due > now { return due - now }
        // Behind schedule: forget the debt beyond one burst (this send
        // included), so that a stall is not followed by a flood.
        let allowance = UInt64(Double(burstBytes) / Double(bytesPerSecond) * 1e9)
        if now - due > allowance {
            start = now - allowance
            sent = bytes
        }
        return 0
    }
}
