import Glibc
import Logging
import PostcopyCore
import PostcopyOS
import Synchronization

/// The daemon's figures at one moment, gathered in one place
/// (`DestinationDaemon.figures()`) from the four places that keep them: the
/// summary so far, the session, the agent's connections, and the engine's
/// tracker and counters. `status()`, the summary's postcopy figures at
/// completion, and the `postcopyComplete` journal event are filled from it.
struct DaemonFigures {
    /// When they were gathered (monotonic).
    var at: UInt64 = 0
    var phase = DestinationSession.Phase.handshake
    var migrationID = ""
    var rejoining = false
    /// Since the first agent connection, and each phase's time.
    var elapsedSeconds: Double = 0
    var phases: [PhaseDuration] = []
    /// The summary so far: guest RAM, precopy, switchover, downtime.
    var summary = DestinationSummary()
    var bytesReceived: UInt64 = 0
    /// Times postcopy paused; when the current pause began (0: not paused);
    /// the time paused before it.
    var pauses: UInt64 = 0
    var pausedSince: UInt64 = 0
    var pausedNanos: UInt64 = 0
    /// Postcopy's, from its engine (all zero until postcopy starts).
    var postcopyStarted = false
    var stalePages: UInt64 = 0
    var filledPages: UInt64 = 0
    var faultsClean: UInt64 = 0
    var faultsStale: UInt64 = 0
    var pagesRequested: UInt64 = 0
    var pageRequests: UInt64 = 0
    var duplicatePages: UInt64 = 0
    var urgentPages: UInt64 = 0
    var backgroundPages: UInt64 = 0
    var staleFaultLatency: LatencyFigures?
    var staleFaultLatencyDist: LatencyDistribution?
    /// Since the guest resumed here (at least 1 ns), and the CPU time spent since.
    var postcopySeconds: Double = 0
    var postcopyCPUSeconds: Double = 0
    var rejoinToFirstFaultMs: [Double] = []

    /// What `postcopyctl status` shows of them.
    func fill(_ status: inout DaemonStatus) {
        status.migrationID = migrationID
        status.rejoining = rejoining
        status.elapsedSeconds = elapsedSeconds
        status.phases = phases
        status.pauses = pauses
        if phase == .paused, pausedSince > 0 {
            status.pausedSeconds = Double(at &- pausedSince) / 1e9
        }
        status.memory = summary.memory
        status.regionBytes = summary.regionBytes
        status.precopyRounds = summary.precopyRounds
        status.precopyPages = summary.precopyPages
        status.stalePagesAtSwitchover = summary.stalePagesAtSwitchover
        if phase.servesPostcopy || phase == .complete { status.downtimeMs = summary.downtimeMs }
        if postcopyStarted {
            status.stalePagesLeft = stalePages
            status.faultsClean = faultsClean
            status.faultsStale = faultsStale
            status.pagesRequested = pagesRequested
            status.pageRequests = pageRequests
            status.duplicatePages = duplicatePages
            status.staleFaultLatency = staleFaultLatency
            status.staleFaultLatencyDist = staleFaultLatencyDist
        }
        status.bytesReceived = bytesReceived
    }

    /// The summary's figures of postcopy, written at completion.
    func complete(_ summary: inout DestinationSummary) {
        summary.postcopySeconds = postcopySeconds
        summary.postcopyCPUSeconds = postcopyCPUSeconds
        summary.faultsClean = faultsClean
        summary.faultsStale = faultsStale
        summary.pagesRequested = pagesRequested
        summary.pageRequests = pageRequests
        summary.duplicatePages = duplicatePages
        summary.postcopyPagesUrgent = urgentPages
        summary.postcopyPagesBackground = backgroundPages
        summary.staleFaultLatency = staleFaultLatency
        summary.staleFaultLatencyDist = staleFaultLatencyDist
        summary.phases = phases
        summary.backgroundMiBPerSecond = Double(backgroundPages * 4096) / postcopySeconds / 1_048_576
        summary.bytesReceived = bytesReceived
        summary.pauses = pauses
        summary.pausedSeconds = Double(pausedNanos) / 1e9
        summary.rejoinToFirstFaultMs = rejoinToFirstFaultMs
    }

    /// The `postcopyComplete` journal event's message and fields, for a
    /// migration that took `totalSeconds` in all.
    func completeEvent(totalSeconds: Double) -> (message: String, fields: Logger.Metadata) {
        let stale = summary.stalePagesAtSwitchover
        let message = "postcopy complete: \(stale) stale pages in \(fixed(postcopySeconds, 2)) s, downtime \(fixed(summary.downtimeMs, 1)) ms"
        return (message, [
            "pages_stale": "\(stale)",
            "pages_urgent": "\(urgentPages)",
            "pages_background": "\(backgroundPages)",
            "pages_duplicate": "\(duplicatePages)",
            "faults_clean": "\(faultsClean)",
            "faults_stale": "\(faultsStale)",
            "fault_p50_us": "\(fixed(staleFaultLatency?.p50Us ?? 0, 1))",
            "fault_p99_us": "\(fixed(staleFaultLatency?.p99Us ?? 0, 1))",
            "fault_max_us": "\(fixed(staleFaultLatency?.maxUs ?? 0, 1))",
            "bytes_received": "\(bytesReceived)",
            "downtime_ms": "\(fixed(summary.downtimeMs, 1))",
            "postcopy_seconds": "\(fixed(postcopySeconds, 3))",
            "total_seconds": "\(fixed(totalSeconds, 3))",
            "pauses": "\(pauses)",
        ])
    }
}

// What the daemon says of itself: `postcopyctl status` and sd_notify's STATUS=.
extension DestinationDaemon {
    /// Where the migration is now, for `postcopyctl status` and sd_notify.
    public func status() -> DaemonStatus {
        var status = DaemonStatus()
        status.instance = config.instance
        status.pid = getpid()
        status.uptimeSeconds = Double(monotonicNanoseconds() - startedAt) / 1e9
        let figures = figures()
        let failure = failures.error
        status.failure = failure?.reason
        status.phase = switch failure?.code {
        case nil: figures.phase.rawValue
        case .discarded?: DestinationSession.Phase.discarded.rawValue
        default: "failed"
        }
        figures.fill(&status)
        status.listen = "\(endpoint)"
        status.agentAddresses = agentAddresses.withLock { $0 }
        status.streams = session.withLock { $0.bulkStreams }
        status.vmmSocket = config.vmmSocketPath
        status.vmm = vmm.current.map { "\($0.credentials)" } ?? ""
        status.receiveMiBPerSecond = receiveRate.withLock {
            $0.record(status.bytesReceived, at: monotonicNanoseconds())
        } / 1_048_576
        status.addManagementNames()
        return status
    }

    /// The migration's figures now, from wherever each is kept. The
    /// stale-fault latencies are exact for the summary (`exactLatencies`),
    /// and read from the engine's histogram (within 3 %) for the status.
    func figures(exactLatencies: Bool = false) -> DaemonFigures {
        var figures = DaemonFigures()
        let now = monotonicNanoseconds()
        figures.at = now
        let (phase, id, pauses, since, paused, rejoining) = session.withLock {
            ($0.phase, $0.migrationID, $0.pauses, $0.pausedSince, $0.pausedNanos, $0.rejoining)
        }
        (figures.phase, figures.migrationID, figures.pauses) = (phase, id?.description ?? "", pauses)
        figures.rejoining = rejoining
        (figures.elapsedSeconds, figures.phases) = timeline.withLock {
            ($0.elapsedSeconds(at: now), $0.durations(at: now))
        }
        figures.pausedSince = since ?? 0
        figures.pausedNanos = paused
        figures.summary = summary.withLock { $0 }
        figures.bytesReceived = agent.withLock { $0.bytesReceived }
        guard let postcopy = engine.withLock({ $0 }) else { return figures }
        let state = postcopy.counters
        figures.postcopyStarted = true
        figures.stalePages = state.stalePages
        figures.filledPages = state.filledPages
        figures.faultsClean = state.cleanFaults
        figures.faultsStale = state.staleFaults
        figures.pagesRequested = state.requestedPages
        figures.duplicatePages = state.duplicatePages
        figures.pageRequests = UInt64(postcopy.lastRequestID)
        figures.urgentPages = postcopy.urgentPages.load(ordering: .relaxed)
        figures.backgroundPages = postcopy.backgroundPages.load(ordering: .relaxed)
        let histogram = postcopy.staleFaultHistogram
        figures.staleFaultLatency = exactLatencies ? LatencyFigures(nanoseconds: postcopy.staleFaultLatencies)
            : LatencyFigures(histogram: histogram)
        figures.staleFaultLatencyDist = histogram.distribution
        // Read after `now`, the start may be later while the switchover runs.
        let started = postcopy.postcopyStartedAt.load(ordering: .relaxed)
        figures.postcopySeconds = max(Double(now > started ? now - started : 0) / 1e9, 1e-9)
        let cpuAtResume = Double(postcopy.cpuMicrosAtResume.load(ordering: .relaxed)) / 1e6
        figures.postcopyCPUSeconds = max(ProcessUsage.cpuSeconds() - cpuAtResume, 0)
        figures.rejoinToFirstFaultMs = postcopy.rejoinToFirstFaultNanos.map { Double($0) / 1e6 }
        return figures
    }
}
