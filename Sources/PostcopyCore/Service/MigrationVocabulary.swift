/// What management layers call a migration's state and figures: QEMU's
/// `query-migrate` and libvirt's job statistics (`virsh domjobinfo`). The
/// daemon's status and the agent's summary carry both next to postcopyd's
/// own names, so that a layer that speaks QEMU's or libvirt's language
/// reads postcopyd without learning a second one. docs/operations.md has
/// the table.

/// QEMU's `MigrationStatus` for where a postcopyd migration is.
public enum QEMUMigrationStatus: String, Codable, CaseIterable, Sendable {
    case setup
    case active
    /// QEMU 10.2: the device state moves while the source is paused and
    /// the destination has not started the guest (earlier QEMUs say
    /// `postcopy-active` already).
    case postcopyDevice = "postcopy-device"
    case postcopyActive = "postcopy-active"
    case postcopyPaused = "postcopy-paused"
    case postcopyRecover = "postcopy-recover"
    case completed
    case failed
    case cancelled

    /// The state for the daemon's `phase` (`DaemonStatus.phase`);
    /// `rejoining`: paused, and one of the agent's connections is back.
    ///
    /// handshake → setup, precopy → active, switchover and hand-over →
    /// postcopy-device, postcopy → postcopy-active, paused →
    /// postcopy-paused (postcopy-recover once the agent is rejoining),
    /// complete → completed, failed → failed, discarded → cancelled (the
    /// source runs the guest; QEMU's state after a cancelled migration).
    public init?(phase: String, rejoining: Bool = false) {
        switch phase {
        case "handshake": self = .setup
        case "precopy": self = .active
        case "switchover", "handover": self = .postcopyDevice
        case "postcopy": self = .postcopyActive
        case "paused": self = rejoining ? .postcopyRecover : .postcopyPaused
        case "complete": self = .completed
        case "failed": self = .failed
        case "discarded": self = .cancelled
        default: return nil
        }
    }
}

/// The figures of QEMU's `query-migrate` that postcopyd has, under QEMU's
/// names and in its units.
public struct QEMUMigrationInfo: Codable, Equatable, Sendable {
    public var status: QEMUMigrationStatus
    /// `ram.postcopy-requests`: page requests sent to the source.
    public var postcopyRequests: UInt64?
    /// `postcopy-latency`: the mean stale-fault latency, in nanoseconds
    /// (QEMU 10.1; QEMU's counts remote faults, as this does).
    public var postcopyLatency: UInt64?
    /// `postcopy-latency-dist`: stale faults per power-of-two microsecond
    /// bucket (`LatencyDistribution`).
    public var postcopyLatencyDist: [UInt64]?
    /// `expected-downtime`, in milliseconds (the source's estimate).
    public var expectedDowntime: UInt64?

    public init(status: QEMUMigrationStatus) {
        self.status = status
    }

    enum CodingKeys: String, CodingKey {
        case status
        case postcopyRequests = "postcopy-requests"
        case postcopyLatency = "postcopy-latency"
        case postcopyLatencyDist = "postcopy-latency-dist"
        case expectedDowntime = "expected-downtime"
    }
}

/// A migration's figures under the names of libvirt's job statistics
/// (`virDomainGetJobStats`, `virsh domjobinfo`), in libvirt's units:
/// milliseconds, bytes, bytes per second, pages per second. A figure this
/// side does not know is absent: the destination cannot see the source's
/// dirty rate, nor what is left before the dirty bitmap says it.
public struct JobStats: Codable, Equatable, Sendable {
    /// Since the migration began (the first agent connection).
    public var timeElapsed: UInt64 = 0
    /// The guest's pause: source paused → guest resumed on the destination.
    public var downtime: UInt64?
    /// The agent's handshake: first connection → precopy.
    public var setupTime: UInt64?
    public var memoryTotal: UInt64 = 0
    /// Bytes of migration data moved so far.
    public var memoryProcessed: UInt64 = 0
    public var memoryRemaining: UInt64?
    public var memoryBps: UInt64 = 0
    /// Pages the guest dirties per second, from the last precopy round.
    public var memoryDirtyRate: UInt64?
    /// Precopy rounds done.
    public var memoryIteration: UInt64 = 0
    /// The page size the page figures count in (the wire's 4 KiB).
    public var memoryPageSize: UInt64 = 0
    public var memoryPostcopyRequests: UInt64 = 0

    public init() {}

    enum CodingKeys: String, CodingKey {
        case timeElapsed = "time_elapsed"
        case downtime
        case setupTime = "setup_time"
        case memoryTotal = "memory_total"
        case memoryProcessed = "memory_processed"
        case memoryRemaining = "memory_remaining"
        case memoryBps = "memory_bps"
        case memoryDirtyRate = "memory_dirty_rate"
        case memoryIteration = "memory_iteration"
        case memoryPageSize = "memory_page_size"
        case memoryPostcopyRequests = "memory_postcopy_requests"
    }
}

/// Whole milliseconds (libvirt's and QEMU's unit), rounded, from seconds.
func milliseconds(seconds: Double) -> UInt64 {
    wholeMilliseconds(seconds * 1000)
}

/// Whole milliseconds, rounded, from fractional ones.
func wholeMilliseconds(_ milliseconds: Double) -> UInt64 {
    UInt64(max(milliseconds, 0).rounded())
}
