/// A daemon instance at one moment: what `postcopyctl status` prints and
/// what sd_notify's STATUS= line says.
public struct DaemonStatus: Codable, Equatable, Sendable {
    public var instance = ""
    public var migrationID = ""
    /// handshake, precopy, switchover, postcopy, paused, complete, failed.
    public var phase = ""
    public var pid: Int32 = 0
    public var uptimeSeconds: Double = 0
    public var memory = ""
    public var regionBytes: UInt64 = 0
    /// Where the agent connects, and from where it did (empty until then).
    public var listen = ""
    public var agentAddresses: [String] = []
    public var vmmSocket = ""
    /// The attached VMM ("pid 123, uid 0, gid 0"), empty until attached.
    public var vmm = ""
    public var precopyRounds: UInt32 = 0
    public var precopyPages: UInt64 = 0
    public var stalePagesAtSwitchover: UInt64 = 0
    public var stalePagesLeft: UInt64 = 0
    public var faultsClean: UInt64 = 0
    public var faultsStale: UInt64 = 0
    public var pagesRequested: UInt64 = 0
    public var duplicatePages: UInt64 = 0
    public var staleFaultLatency: LatencyFigures?
    public var bytesReceived: UInt64 = 0
    /// Received over the last few seconds.
    public var receiveMiBPerSecond: Double = 0
    public var downtimeMs: Double?
    /// Times postcopy paused on a lost agent connection, and for how long
    /// the current pause has lasted (while paused).
    public var pauses: UInt64 = 0
    public var pausedSeconds: Double?
    /// Why the migration failed, once it has.
    public var failure: String?

    public init() {}

    /// Fraction of the migration's current phase done, when it has one:
    /// stale pages fetched during postcopy.
    public var postcopyProgress: Double? {
        guard Self.servesPostcopy(phase) || phase == "complete", stalePagesAtSwitchover > 0 else {
            return nil
        }
        return Double(stalePagesAtSwitchover - min(stalePagesLeft, stalePagesAtSwitchover)) / Double(stalePagesAtSwitchover)
    }

    /// One line for sd_notify's STATUS= (`systemctl status` shows it):
    /// "postcopy: 8123 stale pages left, 41.0 MiB/s, stale-fault p99 180 µs".
    public var statusLine: String {
        let rate = "\(fixed(receiveMiBPerSecond, 1)) MiB/s"
        switch phase {
        case "handshake":
            return "waiting for the agent on \(listen); VMM \(vmm.isEmpty ? "not attached" : "attached")"
        case "precopy":
            return "precopy round \(precopyRounds + 1): \(precopyPages) pages received, \(rate); VMM \(vmm.isEmpty ? "not attached" : "attached")"
        case "switchover":
            return "switchover: receiving the dirty bitmap\(vmm.isEmpty ? ", waiting for the VMM" : "")"
        case "handover":
            return "hand-over: the guest's memory is resumed here, the guest starts once the source's hand-over is done (the source may still resume it); \(stalePagesLeft) stale pages left, \(rate)"
        case "postcopy":
            let p99 = staleFaultLatency.map { ", stale-fault p99 \(fixed($0.p99Us, 0)) µs" } ?? ""
            return "postcopy: \(stalePagesLeft) stale pages left, \(rate)\(p99)"
        case "paused":
            let waited = pausedSeconds.map { " for \(fixed($0, 0)) s" } ?? ""
            return "paused: agent connection lost, waiting\(waited) for it to rejoin; \(stalePagesLeft) stale pages left"
        case "complete":
            return "complete: \(stalePagesAtSwitchover) stale pages fetched, \(faultsStale) stale faults"
        case "discarded":
            return "discarded: the guest never ran here; the source keeps it, and this VMM must be stopped"
        case "failed":
            return "failed: \(failure ?? "unknown reason")"
        default:
            return phase
        }
    }

    /// Phases in which postcopy serves the guest's faults.
    static func servesPostcopy(_ phase: String) -> Bool {
        phase == "handover" || phase == "postcopy" || phase == "paused"
    }

    /// `postcopyctl status` in text: one "name: value" line each.
    public var lines: [String] {
        var lines = [
            "instance:      \(instance) (pid \(pid), up \(fixed(uptimeSeconds, 1)) s)",
            "migration:     \(migrationID.isEmpty ? "(no agent yet)" : migrationID)",
            "phase:         \(phase)",
            "status:        \(statusLine)",
            "guest RAM:     \(ByteSize.format(regionBytes)) of \(memory)",
            "agent:         \(agentAddresses.isEmpty ? "not connected (listening on \(listen))" : agentAddresses.joined(separator: ", "))",
            "VMM:           \(vmm.isEmpty ? "not attached (\(vmmSocket))" : vmm)",
            "precopy:       \(precopyRounds) rounds done, \(precopyPages) pages",
        ]
        if Self.servesPostcopy(phase) || phase == "complete" {
            let percent = postcopyProgress.map { " (\(fixed($0 * 100, 1))% fetched)" } ?? ""
            lines.append("stale pages:   \(stalePagesLeft) of \(stalePagesAtSwitchover) left\(percent)")
            lines.append("faults:        \(faultsClean) clean, \(faultsStale) stale; \(pagesRequested) pages requested, \(duplicatePages) duplicates")
            if let staleFaultLatency { lines.append("stale faults:  \(staleFaultLatency.text)") }
        }
        if let downtimeMs { lines.append("downtime:      \(fixed(downtimeMs, 1)) ms") }
        if pauses > 0 { lines.append("pauses:        \(pauses) (agent connection lost and rejoined)") }
        lines.append("received:      \(ByteSize.format(bytesReceived)), \(fixed(receiveMiBPerSecond, 1)) MiB/s now")
        if let failure { lines.append("failure:       \(failure)") }
        return lines
    }
}

/// A rate over a sliding window, from samples of a growing counter.
public struct RateMeter: Sendable {
    private var samples: [(at: UInt64, value: UInt64)] = []
    public let windowNanos: UInt64

    public init(windowNanos: UInt64 = 5_000_000_000) {
        self.windowNanos = windowNanos
    }

    /// Records `value` at `now` (monotonic nanoseconds) and returns the
    /// counter's rate per second over the window (0 with one sample).
    public mutating func record(_ value: UInt64, at now: UInt64) -> Double {
        samples.append((now, value))
        while samples.count > 2, now - samples[1].at >= windowNanos { samples.removeFirst() }
        guard let first = samples.first, now > first.at, value >= first.value else { return 0 }
        return Double(value - first.value) / (Double(now - first.at) / 1e9)
    }
}

/// The control socket's protocol: one request line in, one reply out, then
/// the daemon closes the connection.
///
///     → status\n
///     ← {"phase":"postcopy", ...}\n        (a DaemonStatus as JSON)
///     → cancel\n
///     ← ok: cancelling migration …\n       (before switchover only)
///     ← error: …\n                          (during or after switchover)
///     → anything else\n
///     ← error: unknown request 'anything else' (known: status)\n
public enum ControlRequest: String, CaseIterable, Sendable {
    case status
    /// Abort the migration; allowed only before switchover, while the
    /// source still holds the only complete copy of the guest and runs it.
    case cancel

    /// The longest request line the daemon reads.
    public static let maxLength = 256

    public init(line: [UInt8]) throws(ControlRequestError) {
        var bytes = line[...]
        while let last = bytes.last, last == UInt8(ascii: "\n") || last == UInt8(ascii: "\r") { bytes.removeLast() }
        guard bytes.count <= Self.maxLength, let text = String(validating: bytes, as: UTF8.self) else {
            throw ControlRequestError(text: "a request line of at most \(Self.maxLength) bytes of text")
        }
        guard let request = ControlRequest(rawValue: text) else { throw ControlRequestError(text: text) }
        self = request
    }
}

public struct ControlRequestError: Error, Equatable, CustomStringConvertible, Sendable {
    public let text: String

    public init(text: String) {
        self.text = text
    }

    public var description: String {
        "unknown request '\(text)' (known: \(ControlRequest.allCases.map(\.rawValue).joined(separator: ", ")))"
    }
}
