/// A daemon instance at one moment: what `postcopyctl status` prints and
/// what sd_notify's STATUS= line says. Next to postcopyd's own names it
/// carries QEMU's state (`qemu`) and libvirt's job statistics (`libvirt`),
/// filled from its own figures by `addManagementNames()`.
public struct DaemonStatus: Codable, Equatable, Sendable {
    public var instance = ""
    public var migrationID = ""
    /// handshake, precopy, switchover, handover, postcopy, paused,
    /// complete, discarded, failed.
    public var phase = ""
    /// Paused, and one of the agent's connections is back already.
    public var rejoining = false
    /// Since the migration began (the first agent connection), and each
    /// phase's time in the order first entered (`PhaseTimeline`).
    public var elapsedSeconds: Double = 0
    public var phases: [PhaseDuration] = []
    public var pid: Int32 = 0
    public var uptimeSeconds: Double = 0
    public var memory = ""
    public var regionBytes: UInt64 = 0
    /// Where the agent connects, and from where it did (empty until then).
    public var listen = ""
    public var agentAddresses: [String] = []
    /// The agent's bulk streams (`postcopy-push --streams`), once its first
    /// HELLO said.
    public var streams: Int?
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
    /// PAGE_REQUEST messages sent for them (QEMU's postcopy-requests).
    public var pageRequests: UInt64 = 0
    public var duplicatePages: UInt64 = 0
    public var staleFaultLatency: LatencyFigures?
    /// The same latencies in power-of-two microsecond buckets.
    public var staleFaultLatencyDist: LatencyDistribution?
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
    /// The same, in QEMU's and libvirt's names (`addManagementNames()`).
    public var qemu: QEMUMigrationInfo?
    public var libvirt: JobStats?

    public init() {}

    /// QEMU's state for the phase (nil for a phase QEMU has no name for).
    public var qemuStatus: QEMUMigrationStatus? { QEMUMigrationStatus(phase: phase, rejoining: rejoining) }

    /// Fills `qemu` and `libvirt` from postcopyd's own figures.
    public mutating func addManagementNames() {
        let afterSwitchover = Self.servesPostcopy(phase) || phase == "complete"
        if let status = qemuStatus {
            var qemu = QEMUMigrationInfo(status: status)
            if afterSwitchover {
                qemu.postcopyRequests = pageRequests
                if let latency = staleFaultLatency, latency.count > 0 {
                    qemu.postcopyLatency = UInt64((latency.totalMs * 1e6 / Double(latency.count)).rounded())
                }
                qemu.postcopyLatencyDist = staleFaultLatencyDist?.buckets
            }
            self.qemu = qemu
        }
        var job = JobStats()
        job.timeElapsed = milliseconds(seconds: elapsedSeconds)
        // The handshake's time, once precopy has begun.
        if phases.count > 1, let handshake = phases.first(where: { $0.phase == "handshake" }) {
            job.setupTime = milliseconds(seconds: handshake.seconds)
        }
        job.downtime = downtimeMs.map { wholeMilliseconds($0) }
        job.memoryTotal = regionBytes
        job.memoryProcessed = bytesReceived
        // Known here only once the dirty bitmap has said what is stale.
        if afterSwitchover { job.memoryRemaining = stalePagesLeft * UInt64(Message.pageBytes) }
        job.memoryBps = UInt64((receiveMiBPerSecond * 1_048_576).rounded())
        job.memoryIteration = UInt64(precopyRounds)
        job.memoryPageSize = UInt64(Message.pageBytes)
        job.memoryPostcopyRequests = pageRequests
        libvirt = job
    }

    /// Fraction of the migration's current phase done, when it has one:
    /// stale pages fetched during postcopy.
    public var postcopyProgress: Double? {
        guard Self.servesPostcopy(phase) || phase == "complete", stalePagesAtSwitchover > 0 else {
            return nil
        }
        return Double(stalePagesAtSwitchover - min(stalePagesLeft, stalePagesAtSwitchover)) / Double(stalePagesAtSwitchover)
    }

    /// One line for sd_notify's STATUS= (`systemctl status` shows it):
    /// "postcopy: 8123 stale pages left, 41.0 MiB/s, stale-fault p99 180 µs
    /// (QEMU: postcopy-active)".
    public var statusLine: String {
        phaseLine + (qemuStatus.map { " (QEMU: \($0.rawValue))" } ?? "")
    }

    private var phaseLine: String {
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

    /// `postcopyctl status` in text: one "name: value" line each, and
    /// where QEMU or libvirt name it, their name and figure beside it
    /// (`addManagementNames()` first).
    public var lines: [String] {
        let job = libvirt
        var rows: [(String, String, String?)] = [
            ("instance", "\(instance) (pid \(pid), up \(fixed(uptimeSeconds, 1)) s)", nil),
            ("migration", migrationID.isEmpty ? "(no agent yet)" : migrationID, nil),
            ("phase", phase, qemu.map { "QEMU \($0.status.rawValue)" }),
            ("status", phaseLine, nil),
        ]
        if !phases.isEmpty {
            let each = phases.map { "\($0.phase) \(Self.seconds($0.seconds))" }.joined(separator: ", ")
            rows.append(("elapsed", "\(Self.seconds(elapsedSeconds)): \(each)",
                         job.map { job in
                             "time_elapsed \(job.timeElapsed) ms" + (job.setupTime.map { ", setup_time \($0) ms" } ?? "")
                         }))
        }
        rows += [
            ("guest RAM", "\(ByteSize.format(regionBytes)) of \(memory)",
             job.map { "memory_total \($0.memoryTotal), memory_page_size \($0.memoryPageSize)" }),
            ("agent", agentAddresses.isEmpty ? "not connected (listening on \(listen))"
                : agentAddresses.joined(separator: ", ") + (streams.map { ", \($0) bulk stream\($0 == 1 ? "" : "s")" } ?? ""), nil),
            ("VMM", vmm.isEmpty ? "not attached (\(vmmSocket))" : vmm, nil),
            ("precopy", "\(precopyRounds) rounds done, \(precopyPages) pages", job.map { "memory_iteration \($0.memoryIteration)" }),
        ]
        if Self.servesPostcopy(phase) || phase == "complete" {
            let percent = postcopyProgress.map { " (\(fixed($0 * 100, 1))% fetched)" } ?? ""
            rows.append(("stale pages", "\(stalePagesLeft) of \(stalePagesAtSwitchover) left\(percent)",
                         job?.memoryRemaining.map { "memory_remaining \($0)" }))
            rows.append(("faults", "\(faultsClean) clean, \(faultsStale) stale; \(pagesRequested) pages requested in \(pageRequests) requests, \(duplicatePages) duplicates",
                         job.map { "memory_postcopy_requests \($0.memoryPostcopyRequests)" }))
            if let staleFaultLatency {
                rows.append(("stale faults", staleFaultLatency.text, qemu?.postcopyLatency.map { "postcopy-latency \($0) ns" }))
            }
            if let dist = staleFaultLatencyDist, dist.count > 0 {
                rows.append(("fault latency", dist.text, qemu?.postcopyLatencyDist.map { _ in "postcopy-latency-dist" }))
            }
        }
        if let downtimeMs { rows.append(("downtime", "\(fixed(downtimeMs, 1)) ms", job?.downtime.map { "downtime \($0) ms" })) }
        if pauses > 0 { rows.append(("pauses", "\(pauses) (agent connection lost and rejoined)", nil)) }
        rows.append(("received", "\(ByteSize.format(bytesReceived)), \(fixed(receiveMiBPerSecond, 1)) MiB/s now",
                     job.map { "memory_processed \($0.memoryProcessed), memory_bps \($0.memoryBps)" }))
        if let failure { rows.append(("failure", failure, nil)) }
        return rows.map { label, value, aside in
            let head = Self.padded(label + ":", to: 15) + value
            guard let aside else { return head }
            return Self.padded(head, to: 56, atLeast: 2) + "│ " + aside
        }
    }

    /// `text` and spaces up to `width` characters, and at least `atLeast` spaces.
    static func padded(_ text: String, to width: Int, atLeast: Int = 1) -> String {
        text + String(repeating: " ", count: max(width - text.count, atLeast))
    }

    /// "0.25 s", "12.3 s", "1 min 3 s".
    static func seconds(_ value: Double) -> String {
        switch value {
        case ..<1: "\(fixed(value, 2)) s"
        case ..<60: "\(fixed(value, 1)) s"
        default: "\(Int(value) / 60) min \(Int(value) % 60) s"
        }
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
///     → watch\n
///     ← {"phase":"precopy", ...}\n         (a status every `watchIntervalNanos`,
///     ← {"phase":"postcopy", ...}\n          until the migration has ended;
///     ← {"phase":"complete", ...}\n          the last is the final status)
///     → cancel\n
///     ← ok: cancelling migration …\n       (before switchover only)
///     ← error: …\n                          (during or after switchover)
///     → anything else\n
///     ← error: unknown request 'anything else' (known: status, watch, cancel)\n
public enum ControlRequest: String, CaseIterable, Sendable {
    case status
    /// A status now, then one every `watchIntervalNanos` until the
    /// migration ends, the final status last; then the daemon closes.
    case watch
    /// Abort the migration; allowed only before switchover, while the
    /// source still holds the only complete copy of the guest and runs it.
    case cancel

    /// The longest request line the daemon reads.
    public static let maxLength = 256
    /// How often a `watch` gets a status.
    public static let watchIntervalNanos: UInt64 = 500_000_000

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
