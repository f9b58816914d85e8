/// `postcopyctl watch`: a few lines, redrawn in place while a migration
/// runs, with a progress bar where the destination knows how much is left
/// (round 1 of precopy, and postcopy), the rates, and the time left.
extension DaemonStatus {
    /// The migration has ended, one way or the other.
    public var hasEnded: Bool { PhaseTimeline.endings.contains(phase) }

    /// The view, two or three lines:
    ///
    ///     postcopyd@vm42 · migration 3f2a…  · postcopy (QEMU postcopy-active) · 15.4 s
    ///     [##############..........]  58.2%  4183 of 10000 stale pages left · 41.0 MiB/s · about 0.4 s left
    ///     faults 120 clean, 812 stale · p99 340 µs · downtime 12.3 ms
    public var watchLines: [String] {
        let id = migrationID.isEmpty ? "no agent yet" : "migration \(migrationID.prefix(8))…"
        let qemuName = qemuStatus.map { " (QEMU \($0.rawValue))" } ?? ""
        var lines = ["postcopyd@\(instance) · \(id) · \(phase)\(qemuName) · \(DaemonStatus.seconds(elapsedSeconds))"]
        let rate = "\(fixed(receiveMiBPerSecond, 1)) MiB/s"
        switch phase {
        case "handshake":
            lines.append("waiting for the agent on \(listen) · VMM \(vmm.isEmpty ? "not attached" : "attached")")
        case "precopy":
            if precopyRounds == 0, regionBytes > 0 {
                // Round 1 sends every page with data once.
                let bytes = precopyPages * UInt64(Message.pageBytes)
                let fraction = min(Double(bytes) / Double(regionBytes), 1)
                lines.append("\(Self.bar(fraction)) \(Self.percent(fraction))  round 1: \(ByteSize.format(bytes)) of \(ByteSize.format(regionBytes)) · \(rate)")
            } else {
                lines.append("round \(precopyRounds + 1): \(precopyPages) pages received in all · \(rate)")
            }
        case "switchover":
            lines.append("the source is paused; receiving the dirty bitmap\(vmm.isEmpty ? ", waiting for the VMM" : "")")
        case "handover", "postcopy", "paused":
            let fraction = postcopyProgress ?? (stalePagesLeft == 0 ? 1 : 0)
            var progress = "\(Self.bar(fraction)) \(Self.percent(fraction))  \(stalePagesLeft) of \(stalePagesAtSwitchover) stale pages left · \(rate)"
            if let left = secondsLeft { progress += " · about \(DaemonStatus.seconds(left)) left" }
            lines.append(progress)
            lines.append(faultsLine + (phase == "paused" ? " · paused\(pausedSeconds.map { " \(DaemonStatus.seconds($0))" } ?? ""), waiting for the agent" : ""))
        case "complete":
            lines.append("complete: \(stalePagesAtSwitchover) stale pages fetched · \(ByteSize.format(bytesReceived)) received")
            lines.append(faultsLine)
        case "discarded":
            lines.append("discarded: the guest never ran here; the source keeps it")
        case "failed":
            lines.append("failed: \(failure ?? "unknown reason")")
        default:
            break
        }
        return lines
    }

    /// Postcopy at the receive rate now; nil before it has a rate.
    public var secondsLeft: Double? {
        guard receiveMiBPerSecond > 0.01 else { return nil }
        return Double(stalePagesLeft * UInt64(Message.pageBytes)) / (receiveMiBPerSecond * 1_048_576)
    }

    private var faultsLine: String {
        var parts = ["faults \(faultsClean) clean, \(faultsStale) stale"]
        if let latency = staleFaultLatency { parts.append("p99 \(fixed(latency.p99Us, 0)) µs") }
        if let downtimeMs { parts.append("downtime \(fixed(downtimeMs, 1)) ms") }
        if pauses > 0 { parts.append("\(pauses) pauses") }
        return parts.joined(separator: " · ")
    }

    static func bar(_ fraction: Double, width: Int = 24) -> String {
        let done = Int((min(max(fraction, 0), 1) * Double(width)).rounded(.down))
        return "[" + String(repeating: "#", count: done) + String(repeating: ".", count: width - done) + "]"
    }

    /// " 58.2%", right-aligned in six columns.
    static func percent(_ fraction: Double) -> String {
        let text = fixed(min(max(fraction, 0), 1) * 100, 1) + "%"
        return String(repeating: " ", count: max(6 - text.count, 0)) + text
    }
}
