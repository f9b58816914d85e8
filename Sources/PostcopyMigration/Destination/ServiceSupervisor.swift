import Logging
import PostcopyCore
import PostcopyOS

/// Keeps systemd informed while a daemon serves its migration: STATUS= with
/// the phase and progress every second (when it changed), and WATCHDOG=1
/// only while the daemon is healthy: its status can be taken (no lock is
/// stuck) and, during postcopy, its fault loop keeps turning. A stuck fault
/// thread blocks every guest thread that faults; systemd then sees the
/// watchdog expire and reports the unit as failed.
public final class ServiceSupervisor: Sendable {
    private let daemon: DestinationDaemon
    private let notifier: ServiceNotifier
    private let logger: Logger
    private let intervalNanos: UInt64
    private let thread: StoppableThread

    public init(daemon: DestinationDaemon, notifier: ServiceNotifier, logger: Logger) throws {
        thread = try StoppableThread()
        self.daemon = daemon
        self.notifier = notifier
        self.logger = logger
        // Ping at least twice per watchdog interval.
        intervalNanos = min(1_000_000_000, (notifier.watchdogIntervalNanos ?? .max) / 2)
    }

    deinit { stop() }

    public func start() throws {
        try thread.start(name: "postcopy-service") { [self] in run() }
    }

    public func stop() { thread.stop() }

    private func run() {
        var lastStatus = ""
        var health = HeartbeatMonitor(stallNanos: 3 * FaultLoop.heartbeatNanos)
        repeat {
            let status = daemon.status()
            if status.statusLine != lastStatus {
                lastStatus = status.statusLine
                notifier.status(lastStatus)
            }
            guard notifier.watchdogIntervalNanos != nil else { continue }
            switch health.observe(daemon.faultLoopHeartbeat, at: monotonicNanoseconds()) {
            case .healthy:
                notifier.watchdog()
            case .stalledNow(let nanos):
                logger.critical("the fault loop has not turned for \(nanos / 1_000_000) ms; withholding the watchdog ping")
            case .stalled:
                break
            }
        } while !thread.waitForStop(timeoutNanos: intervalNanos)
    }
}
