/// Decides which stalled faults are logged: a guest thread blocked longer
/// than the threshold is worth a journal record, but a lost link stalls
/// thousands at once, so at most one record per interval is written and it
/// says how many it stands for.
public struct StallLimiter: Sendable {
    public struct Report: Equatable, Sendable {
        /// The guest page (in guest pages, not 4 KiB pieces) of the stall reported.
        public let page: UInt64
        public let stallNanos: UInt64
        /// Stalls over the threshold since the last report, not reported one by one.
        public let suppressed: UInt64

        public init(page: UInt64, stallNanos: UInt64, suppressed: UInt64) {
            self.page = page
            self.stallNanos = stallNanos
            self.suppressed = suppressed
        }
    }

    public let thresholdNanos: UInt64
    private var limiter: ReportLimiter
    public var intervalNanos: UInt64 { limiter.intervalNanos }

    public init(thresholdNanos: UInt64, intervalNanos: UInt64 = 1_000_000_000) {
        self.thresholdNanos = thresholdNanos
        limiter = ReportLimiter(intervalNanos: intervalNanos)
    }

    /// A fault on `page` was resolved after `stallNanos`; returns what to
    /// log now, if anything. Threads call it with times they read before
    /// taking the limiter's lock, so `now` may be earlier than the last
    /// report's: that counts as within the interval.
    public mutating func record(page: UInt64, stallNanos: UInt64, at now: UInt64) -> Report? {
        guard stallNanos >= thresholdNanos, let suppressed = limiter.record(at: now) else { return nil }
        return Report(page: page, stallNanos: stallNanos, suppressed: suppressed)
    }
}

/// At most one report per interval, each saying how many events it stands
/// for: what keeps a burst (stalled faults, a flood of connections) to a
/// journal record a second.
public struct ReportLimiter: Sendable {
    public let intervalNanos: UInt64
    private var lastReportAt: UInt64?
    private var suppressed: UInt64 = 0

    public init(intervalNanos: UInt64 = 1_000_000_000) {
        self.intervalNanos = intervalNanos
    }

    /// An event at `now` (monotonic ns): nil when it is only counted, else
    /// how many events since the last report were not reported. Threads may
    /// pass times read before taking the limiter's lock, so `now` may be
    /// earlier than the last report's: that counts as within the interval.
    public mutating func record(at now: UInt64) -> UInt64? {
        if let last = lastReportAt, now < last || now - last < intervalNanos {
            suppressed += 1
            return nil
        }
        defer {
            lastReportAt = now
            suppressed = 0
        }
        return suppressed
    }
}
