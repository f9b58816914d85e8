/// What an error that may wrap another says, in its two forms, and the
/// error it wraps, typed.
///
/// `reason` is the whole story on one line, the cause's text where the
/// sentence puts it: what ERROR frames, the journal's REASON, log records
/// and the summaries carry. `link` is the same step without the cause's
/// text: its line in an `ErrorChain`, above a line of the cause's own.
public struct Explanation: Sendable {
    public let reason: String
    public let link: String
    public let cause: (any Error)?

    /// A reason with no cause.
    public init(_ reason: String) {
        self.reason = reason
        self.link = reason
        self.cause = nil
    }

    /// `context`, caused by `cause`: the reason reads "context: cause".
    public init(_ context: String, cause: any Error) {
        self.init(cause: cause) { $0.map { "\(context): \($0)" } ?? context }
    }

    /// `cause` with nothing added: the reason is the cause's text, and this
    /// step has no line of its own in the chain.
    public init(cause: any Error) {
        self.init(cause: cause) { $0 ?? "" }
    }

    /// `cause` where `words` puts it: given the cause's text, `words` says
    /// the reason; given nil, the link, which leaves the cause out.
    ///
    ///     Explanation(cause: lost) { last in
    ///         "could not rejoin (3 attempts\(last.map { "; last: \($0)" } ?? ""))"
    ///     }
    public init(cause: any Error, _ words: (_ cause: String?) -> String) {
        self.reason = words("\(cause)")
        self.link = words(nil)
        self.cause = cause
    }
}

/// An error that is an `Explanation` and nothing more: its description is
/// the reason, and its link and cause make it a step of an `ErrorChain`.
public protocol ExplainedError: ChainedError, CustomStringConvertible {
    var explanation: Explanation { get }
    init(_ explanation: Explanation)
}

extension ExplainedError {
    /// A reason with no cause.
    public init(_ reason: String) { self.init(Explanation(reason)) }

    /// `context`, caused by `cause`: the reason reads "context: cause".
    public init(_ context: String, cause: any Error) { self.init(Explanation(context, cause: cause)) }

    /// `cause` with nothing added: the reason is the cause's text.
    public init(cause: any Error) { self.init(Explanation(cause: cause)) }

    /// `cause` where `words` puts it (see `Explanation.init(cause:_:)`).
    public init(cause: any Error, _ words: (_ cause: String?) -> String) {
        self.init(Explanation(cause: cause, words))
    }

    /// The whole story on one line.
    public var reason: String { explanation.reason }
    public var link: String { explanation.link }
    public var underlying: (any Error)? { explanation.cause }
    public var description: String { explanation.reason }
}
