import Glibc
import PostcopyCore
import PostcopyOS
import Synchronization

// What the daemon says of itself: `postcopyctl status` and sd_notify's STATUS=.
extension DestinationDaemon {
    /// Where the migration is now, for `postcopyctl status` and sd_notify.
    public func status() -> DaemonStatus {
        var status = DaemonStatus()
        status.instance = config.instance
        status.pid = getpid()
        status.uptimeSeconds = Double(monotonicNanoseconds() - startedAt) / 1e9
        let (phase, id, pauses) = session.withLock { ($0.phase, $0.migrationID, $0.pauses) }
        status.migrationID = id?.description ?? ""
        let failure = failures.error
        status.failure = failure?.reason
        status.phase = switch failure?.code {
        case nil: phase.rawValue
        case .discarded?: DestinationSession.Phase.discarded.rawValue
        default: "failed"
        }
        status.pauses = pauses
        let pausedSince = pausedAt.load(ordering: .relaxed)
        if phase == .paused, pausedSince > 0 {
            status.pausedSeconds = Double(monotonicNanoseconds() &- pausedSince) / 1e9
        }
        status.listen = "\(endpoint)"
        status.agentAddresses = agentAddresses.withLock { $0 }
        status.vmmSocket = config.vmmSocketPath
        status.vmm = vmm.current.map { "\($0.credentials)" } ?? ""
        let summary = summary.withLock { $0 }
        status.memory = summary.memory
        status.regionBytes = summary.regionBytes
        status.precopyRounds = summary.precopyRounds
        status.precopyPages = summary.precopyPages
        status.stalePagesAtSwitchover = summary.stalePagesAtSwitchover
        if phase.servesPostcopy || phase == .complete { status.downtimeMs = summary.downtimeMs }
        if let postcopy = engine.withLock({ $0 }) {
            let state = postcopy.counters
            status.stalePagesLeft = state.stalePages
            status.faultsClean = state.cleanFaults
            status.faultsStale = state.staleFaults
            status.pagesRequested = state.requestedPages
            status.duplicatePages = state.duplicatePages
            status.staleFaultLatency = LatencyFigures(nanoseconds: postcopy.staleFaultLatencies)
        }
        status.bytesReceived = agent.withLock { $0.bytesReceived }
        status.receiveMiBPerSecond = receiveRate.withLock {
            $0.record(status.bytesReceived, at: monotonicNanoseconds())
        } / 1_048_576
        return status
    }
}
