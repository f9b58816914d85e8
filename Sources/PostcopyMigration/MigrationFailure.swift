import PostcopyCore
import Synchronization

/// Why a migration failed: the first reason any thread gave. Later reasons
/// are usually consequences (a socket shut down because of the first).
public struct MigrationError: Error, CustomStringConvertible, Sendable {
    public let code: ErrorCode
    public let reason: String

    public init(_ code: ErrorCode, _ reason: String) {
        self.code = code
        self.reason = reason
    }

    public var description: String { reason }
}

/// Records the first failure and runs the shutdown that wakes every other
/// thread of a migration, exactly once.
final class FailureLatch: Sendable {
    private let first = Mutex<MigrationError?>(nil)
    private let handler = Mutex<(@Sendable (MigrationError) -> Void)?>(nil)

    init() {}

    /// Sets what the first failure runs: the shutdown of every connection.
    func whenFailed(_ body: @escaping @Sendable (MigrationError) -> Void) {
        handler.withLock { $0 = body }
    }

    /// Records `error` if it is the first, and then shuts everything down.
    func fail(_ error: MigrationError) {
        let isFirst = first.withLock { current -> Bool in
            guard current == nil else { return false }
            current = error
            return true
        }
        if isFirst, let body = handler.withLock({ $0 }) { body(error) }
    }

    func fail(_ code: ErrorCode, _ reason: String) { fail(MigrationError(code, reason)) }

    var error: MigrationError? { first.withLock { $0 } }

    /// Throws the recorded failure, if any.
    func check() throws {
        if let error { throw error }
    }
}
