/// How long a migration has spent in each of its phases: the daemon says
/// when it enters one (`enter`), and `durations` adds the time up, a phase
/// entered more than once (paused twice) counting once with its total.
/// Phases are named as `DaemonStatus.phase` names them, "failed" included.
///
/// The migration's clock starts at `begin`, when the first agent
/// connection is admitted: time spent waiting for an agent that has not
/// come yet is not part of it (a daemon is often started well ahead). A
/// daemon that took a migration over begins at the takeover and knows only
/// what came after it.
public struct PhaseTimeline: Equatable, Sendable {
    /// Phases left, in the order first entered, with their time so far.
    private var done: [PhaseDuration] = []
    /// The phase the migration is in, and since when (monotonic ns).
    public private(set) var current: String?
    private var since: UInt64 = 0
    /// When the migration began (monotonic ns); nil before `begin`.
    public private(set) var begunAt: UInt64?
    /// When it ended (complete, failed, discarded): the clock stops there.
    public private(set) var endedAt: UInt64?
    public static let endings: Set<String> = ["complete", "failed", "discarded"]

    public init() {}

    /// The migration is in `phase` from `now` on; nothing when it already was.
    public mutating func enter(_ phase: String, at now: UInt64) {
        guard phase != current, endedAt == nil else { return }
        if let current, begunAt != nil { add(current, nanos: now &- since) }
        (current, since) = (phase, now)
        if Self.endings.contains(phase) { endedAt = now }
    }

    /// The migration begins at `now` (the first agent connection): the
    /// current phase counts from here. Only the first call counts.
    public mutating func begin(at now: UInt64) {
        guard begunAt == nil else { return }
        begunAt = now
        since = now
    }

    private mutating func add(_ phase: String, nanos: UInt64) {
        let seconds = Double(nanos) / 1e9
        if let index = done.firstIndex(where: { $0.phase == phase }) {
            done[index].seconds += seconds
        } else {
            done.append(PhaseDuration(phase: phase, seconds: seconds))
        }
    }

    /// Each phase's time up to `now`, the current one's so far, in the
    /// order first entered; empty before `begin`. The ending is not a
    /// phase with a time.
    public func durations(at now: UInt64) -> [PhaseDuration] {
        guard begunAt != nil else { return [] }
        var timeline = self
        if let current, endedAt == nil { timeline.add(current, nanos: now &- since) }
        return timeline.done
    }

    /// Since `begin` up to `now` or the end (0 before `begin`).
    public func elapsedSeconds(at now: UInt64) -> Double {
        begunAt.map { Double((endedAt ?? now) &- $0) / 1e9 } ?? 0
    }
}

/// One phase's time: "precopy", 12.3 s.
public struct PhaseDuration: Codable, Equatable, Sendable {
    public var phase: String
    public var seconds: Double

    public init(phase: String, seconds: Double) {
        self.phase = phase
        self.seconds = seconds
    }
}
