import Glibc
import Synchronization
import PostcopyCore

/// A thread that runs until asked to stop: `stop()` makes an eventfd
/// readable, which the thread's body polls beside whatever it waits for,
/// and then joins the thread.
public final class StoppableThread: Sendable {
    /// Readable once `stop()` was called.
    public let stopSignal: EventSignal
    private let thread = Locked<OSThread?>(nil)

    public init() throws(SystemCallError) {
        stopSignal = try EventSignal()
    }

    deinit { stop() }

    /// Starts `body` on a thread named `name`; it must return soon after
    /// `stopSignal` becomes readable.
    public func start(name: String, _ body: @escaping @Sendable () -> Void) throws(SystemCallError) {
        let started = try OSThread.start(name: name, body)
        thread.withLock { thread in
            precondition(thread == nil, "\(name) started twice")
            thread = started
        }
    }

    /// Starts a thread that calls `onReadable` each time `fd` is readable,
    /// until `stop()`.
    public func start(name: String, watching fd: Int32,
                      _ onReadable: @escaping @Sendable () -> Void) throws(SystemCallError) {
        let stopFD = stopSignal.fd
        try start(name: name) {
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0)]
            while true {
                let ready = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, 2, -1) }
                if ready < 0 && errno == EINTR { continue }
                if ready < 0 || fds[1].revents != 0 { return }
                onReadable()
            }
        }
    }

    /// For a body that works on a timer: waits up to `nanoseconds`;
    /// returns true when `stop()` was called.
    public func waitForStop(timeoutNanos nanoseconds: UInt64) -> Bool {
        var waiter = pollfd(fd: stopSignal.fd, events: Int16(POLLIN), revents: 0)
        let deadline = monotonicNanoseconds() + nanoseconds
        while true {
            let now = monotonicNanoseconds()
            guard now < deadline else { return false }
            let ready = poll(&waiter, 1, Int32(min((deadline - now + 999_999) / 1_000_000, UInt64(Int32.max))))
            if ready > 0 { return true }
            if ready < 0 && errno != EINTR { return false }
        }
    }

    /// Asks the thread to finish and waits for it (at once if it never ran).
    public func stop() {
        guard let running = thread.withLock({ thread -> OSThread? in
            defer { thread = nil }
            return thread
        }) else { return }
        stopSignal.signal()
        running.join()
    }
}
