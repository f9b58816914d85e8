import Glibc

/// A value behind a lock: every access goes through `withLock`.
///
/// It plays the part of the standard library's `Mutex`, on a
/// `pthread_mutex_t`. The reason is ThreadSanitizer: on Linux `Mutex` waits
/// with futexes inside the uninstrumented Synchronization library, so TSan
/// sees none of its ordering and reports every access it guards as a race
/// (a two-thread counter behind a `Mutex` is enough). pthread mutexes it
/// intercepts, so `make test-sanitizers` reports only races that exist. The
/// cost is a heap allocation per lock and the same uncontended lock and
/// unlock (a futex word in both).
public final class Locked<Value>: @unchecked Sendable {
    // SAFETY (@unchecked): `value` is only touched between lock and unlock
    // of `mutex`, which lives as long as this object.
    private var value: Value
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    public init(_ value: Value) {
        self.value = value
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with the value, holding the lock.
    @inline(__always)
    public func withLock<Result, Failure: Error>(_ body: (inout Value) throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}

/// A lock that guards no value of its own: what a `Locked<Void>` would be,
/// without a zero-sized stored value that shares its address with the next
/// field (ThreadSanitizer takes an access to one for an access to the other).
public final class Lock: @unchecked Sendable {
    // SAFETY (@unchecked): the mutex lives as long as this object.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    public init() { pthread_mutex_init(mutex, nil) }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` holding the lock.
    @inline(__always)
    public func withLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}
