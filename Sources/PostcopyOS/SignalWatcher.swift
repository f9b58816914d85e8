import CPostcopy
import Glibc

/// Turns SIGTERM, SIGINT and SIGHUP into a call on a thread of its own, so
/// that a daemon can stop in order (tell systemd STOPPING=1, fail the
/// migration with the reason, close its sockets) instead of dying mid-write.
///
/// Create it before any other thread: the signals are blocked in the
/// creating thread, and threads inherit that mask, so only the watcher's
/// signalfd sees them.
public final class SignalWatcher: Sendable {
    private let signalFD: Int32
    private let thread: StoppableThread

    public init() throws(SystemCallError) {
        signalFD = try check("block termination signals and open a signalfd") { cpc_termination_signalfd() }
        do {
            thread = try StoppableThread()
        } catch {
            close(signalFD)
            throw error
        }
    }

    deinit {
        stop()
        close(signalFD)
    }

    /// Calls `handler` with the signal's name ("SIGTERM") for each signal
    /// that arrives, until `stop()`.
    public func start(_ handler: @escaping @Sendable (String) -> Void) throws(SystemCallError) {
        let fd = signalFD
        try thread.start(name: "postcopy-signal", watching: fd) {
            let signal = cpc_signalfd_read(fd)
            if signal > 0 { handler(Self.name(signal)) }
        }
    }

    public func stop() { thread.stop() }

    static func name(_ signal: Int32) -> String {
        switch signal {
        case SIGTERM: "SIGTERM"
        case SIGINT: "SIGINT"
        case SIGHUP: "SIGHUP"
        default: "signal \(signal)"
        }
    }
}
