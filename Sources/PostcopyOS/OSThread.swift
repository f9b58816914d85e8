import CPostcopy
import Glibc

/// A plain joinable POSIX thread, for the loops that must not share a
/// cooperative executor with anything else (the fault path above all).
public final class OSThread: @unchecked Sendable {
    // SAFETY: written once by pthread_create before start() returns, then read-only.
    private var handle = pthread_t()
    private var joined = false

    private final class Box {
        let body: @Sendable () -> Void
        let name: String
        init(_ name: String, _ body: @escaping @Sendable () -> Void) {
            self.name = name
            self.body = body
        }
    }

    private init() {}

    /// Starts `body` on a new thread named `name` (at most 15 bytes show).
    public static func start(name: String, _ body: @escaping @Sendable () -> Void) throws(SystemCallError) -> OSThread {
        let thread = OSThread()
        let box = Unmanaged.passRetained(Box(name, body)).toOpaque()
        let rc = pthread_create(&thread.handle, nil, { argument in
            // SAFETY: the pointer is the retained Box passed just below.
            let box = Unmanaged<Box>.fromOpaque(argument!).takeRetainedValue()
            _ = cpc_thread_set_name(String(box.name.prefix(15)))
            box.body()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            throw SystemCallError("start thread \(name)", Errno(rc))
        }
        return thread
    }

    /// How the calling thread competes for a CPU. Bulk work (the background
    /// stream, precopy) yields to the threads a blocked guest waits on.
    public enum SchedulingClass: Sendable, Equatable, CustomStringConvertible {
        /// SCHED_OTHER at nice 0.
        case normal
        /// SCHED_OTHER at a higher nice (1…19): less CPU under contention,
        /// never starved.
        case background(nice: Int32)
        /// SCHED_IDLE: runs only when nothing else wants the CPU.
        case idle

        /// The postcopy back-fill's threads' class unless
        /// `--background-scheduling` says otherwise, on both ends: normal,
        /// picked by measurement (docs/benchmarks.md, "The back-fill's
        /// scheduling, picked by the numbers").
        public static let backgroundDefault = SchedulingClass.normal

        public var description: String {
            switch self {
            case .normal: "normal"
            case let .background(nice): "nice:\(nice)"
            case .idle: "idle"
            }
        }
    }

    /// Moves the calling thread to `schedulingClass`. Lowering needs no
    /// privilege; going back to `.normal` from a higher nice may (EPERM).
    public static func setCurrentScheduling(_ schedulingClass: SchedulingClass) throws(SystemCallError) {
        let nice: Int32 = switch schedulingClass {
        case .normal: 0
        case let .background(nice): min(max(nice, 1), 19)
        case .idle: -1
        }
        let rc = cpc_thread_set_scheduling(nice)
        guard rc == 0 else { throw SystemCallError("set the thread's scheduling to \(schedulingClass)", Errno(-rc)) }
    }

    /// Waits for the thread to finish. Idempotent; call from one thread.
    public func join() {
        guard !joined else { return }
        joined = true
        pthread_join(handle, nil)
    }
}

/// The monotonic clock in nanoseconds.
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// Sleeps at least `nanoseconds`, resuming after signal interruptions.
public func sleepNanoseconds(_ nanoseconds: UInt64) {
    var interval = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&interval, &remaining) != 0 && errno == EINTR { interval = remaining }
}

/// An eventfd used as a wake-up signal between threads: one side signals,
/// the other polls its descriptor.
public final class EventSignal: Sendable {
    public let fd: Int32

    public init() throws(SystemCallError) {
        fd = try check("eventfd") { cpc_eventfd() }
    }

    deinit { close(fd) }

    /// Makes the descriptor readable.
    public func signal() {
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }

    /// Makes the descriptor unreadable again, however many signals came.
    public func drain() {
        var count: UInt64 = 0
        _ = read(fd, &count, 8)
    }
}

/// The wall clock (`CLOCK_REALTIME`) in nanoseconds: for times compared
/// across hosts, such as a source's pause and a destination's resume.
public func realtimeNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// A one-shot gate: threads wait until some thread opens it.
public final class Latch: @unchecked Sendable {
    // SAFETY: the mutex and condition live in their own allocations for the
    // object's lifetime; `isOpen` is only touched with the mutex held.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var isOpen = false

    public init() {
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    /// Opens the gate for every waiter, present and future.
    public func open() {
        pthread_mutex_lock(mutex)
        isOpen = true
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(mutex)
    }

    /// Waits until the gate is open or `timeoutNanos` pass (nil: forever);
    /// true when it opened.
    @discardableResult
    public func wait(timeoutNanos: UInt64? = nil) -> Bool {
        let deadline = timeoutNanos.map { monotonicNanoseconds() &+ $0 }
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while !isOpen {
            if let deadline {
                var until = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
                if pthread_cond_timedwait(condition, mutex, &until) == ETIMEDOUT { return isOpen }
            } else {
                pthread_cond_wait(condition, mutex)
            }
        }
        return true
    }

    public var opened: Bool {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return isOpen
    }
}
