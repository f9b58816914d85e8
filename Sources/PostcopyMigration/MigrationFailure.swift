import Logging
import PostcopyCore
import PostcopyOS

/// Why a migration failed: the first reason any thread gave. Later reasons
/// are usually consequences (a socket shut down because of the first).
///
/// `reason` is the whole story on one line, as ERROR frames, the journal's
/// REASON and the summaries carry it. An error that wraps another keeps it
/// as `cause`, so that `ErrorChain` prints one line per step down to the
/// errno, and a caller can still look at the typed cause.
public struct MigrationError: ChainedError, CustomStringConvertible, Sendable {
    public let code: ErrorCode
    /// What it says, with and without its cause's text, and the cause.
    public let explanation: Explanation

    public init(_ code: ErrorCode, _ explanation: Explanation) {
        self.code = code
        self.explanation = explanation
    }

    public init(_ code: ErrorCode, _ reason: String) { self.init(code, Explanation(reason)) }

    /// `context`, caused by `cause`: the reason reads "context: cause".
    public init(_ code: ErrorCode, _ context: String, cause: any Error) {
        self.init(code, Explanation(context, cause: cause))
    }

    /// `cause` with `code` and nothing to add: the reason is the cause's text.
    public init(_ code: ErrorCode, cause: any Error) { self.init(code, Explanation(cause: cause)) }

    /// `cause` where `words` puts it in the reason (see
    /// `Explanation.init(cause:_:)`).
    public init(_ code: ErrorCode, cause: any Error, _ words: (_ cause: String?) -> String) {
        self.init(code, Explanation(cause: cause, words))
    }

    /// The whole story on one line.
    public var reason: String { explanation.reason }
    /// The error this one wraps, if any.
    public var cause: (any Error)? { explanation.cause }
    /// What this step says of its own: `reason` without the cause's text.
    public var link: String { explanation.link }
    public var underlying: (any Error)? { cause }

    public var description: String { reason }
}

/// Records the first failure and runs the shutdown that wakes every other
/// thread of a migration, exactly once.
final class FailureLatch: Sendable {
    private let first = Locked<MigrationError?>(nil)
    private let handler = Locked<(@Sendable (MigrationError) -> Void)?>(nil)

    init() {}

    /// Sets what the first failure runs: the shutdown of every connection.
    func whenFailed(_ body: @escaping @Sendable (MigrationError) -> Void) {
        handler.withLock { $0 = body }
    }

    /// Records `error` if it is the first, and then shuts everything down.
    /// Returns whether it was the first.
    @discardableResult
    func fail(_ error: MigrationError) -> Bool {
        let isFirst = first.withLock { current -> Bool in
            guard current == nil else { return false }
            current = error
            return true
        }
        if isFirst, let body = handler.withLock({ $0 }) { body(error) }
        return isFirst
    }

    @discardableResult
    func fail(_ code: ErrorCode, _ reason: String) -> Bool { fail(MigrationError(code, reason)) }

    @discardableResult
    func fail(_ code: ErrorCode, _ context: String, cause: any Error) -> Bool {
        fail(MigrationError(code, context, cause: cause))
    }

    var error: MigrationError? { first.withLock { $0 } }

    /// Throws the recorded failure, if any.
    func check() throws {
        if let error { throw error }
    }
}

extension Logger {
    /// Logs one of the events operators look for, with its stable
    /// MESSAGE_ID and `fields` (lower-case keys; the journal gets them in
    /// upper case, as fields of their own).
    public func event(_ event: DaemonEvent, _ level: Logger.Level, _ message: @autoclosure () -> Logger.Message,
               _ fields: Logger.Metadata = [:], file: String = #fileID, function: String = #function,
               line: UInt = #line) {
        var metadata = fields
        metadata["message_id"] = "\(event.messageID)"
        log(level: level, message(), metadata: metadata, file: file, function: function, line: line)
    }
}
