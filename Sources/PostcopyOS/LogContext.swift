import PostcopyCore

/// Fields every log record of a process carries at the moment it is
/// written, such as MIGRATION_ID and PHASE: the daemon sets them as the
/// migration moves on, the log handler reads them for each record.
public final class LogContext: Sendable {
    private let fields = Locked<[String: String]>([:])

    public init() {}

    /// Sets journal field `name` (e.g. "PHASE"); nil removes it.
    public func set(_ name: String, _ value: String?) {
        precondition(JournalField.isValid(name), "invalid journal field name \(name)")
        fields.withLock { $0[name] = value }
    }

    /// The fields, sorted by name.
    public var snapshot: [(name: String, value: String)] {
        fields.withLock { $0 }.sorted { $0.key < $1.key }.map { (name: $0.key, value: $0.value) }
    }
}
