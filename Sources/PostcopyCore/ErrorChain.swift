/// An error that wraps the error that caused it, so that a failure can be
/// read from the outer step down to the inner cause, and the inner cause
/// (a `SystemCallError` with its errno, say) stays a typed value.
public protocol ChainedError: Error {
    /// What this step says, without its cause's text; empty when it adds
    /// nothing of its own (then only the cause is shown).
    var link: String { get }
    /// The error this one wraps, if any.
    var underlying: (any Error)? { get }
}

/// An error and its causes, outermost first: how a program's last words
/// print a failure.
///
///     postcopyd: cannot start: create guest RAM (64 MiB, file /x/ram (shmem, 4 KiB pages))
///       caused by: create the guest RAM file /x/ram: ENOENT (No such file or directory)
///
/// An error that is not a `ChainedError` ends the chain with its whole
/// description.
public struct ErrorChain: CustomStringConvertible {
    /// The errors, the outermost first and the innermost last.
    public let errors: [any Error]
    /// What each error says at its step; no empty ones.
    public let links: [String]

    /// A bound on the depth, so that a chain that loops cannot hang the
    /// report of a failure.
    static let maximumDepth = 32

    public init(_ error: any Error) {
        var errors: [any Error] = []
        var links: [String] = []
        var next: (any Error)? = error
        while let current = next, errors.count < Self.maximumDepth {
            errors.append(current)
            if let chained = current as? ChainedError {
                if !chained.link.isEmpty { links.append(chained.link) }
                next = chained.underlying
            } else {
                links.append("\(current)")
                next = nil
            }
        }
        self.errors = errors
        self.links = links.isEmpty ? ["\(error)"] : links
    }

    /// The innermost error: the cause of all the others.
    public var root: any Error { errors[errors.count - 1] }

    /// The chain as lines: `program: headline: outermost`, then one
    /// `  caused by: …` line per cause, each ending in a newline.
    public func rendered(program: String, headline: String? = nil) -> String {
        let top = ([headline].compactMap { $0 } + links.prefix(1)).joined(separator: ": ")
        return "\(program): \(top)\n" + links.dropFirst().map { "  caused by: \($0)\n" }.joined()
    }

    /// The links on one line, outermost first, each followed by its cause
    /// after ": ".
    public var description: String { links.joined(separator: ": ") }
}
