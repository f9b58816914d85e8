/// One of the agent's TCP connections to postcopyd, as its HELLO names it:
/// the urgent connection, or bulk stream `index` of the migration's bulk
/// streams (`postcopy-push --streams`). The daemon's session keys the
/// connections of a generation by it.
///
/// Bulk stream 0 is the control stream: besides its share of the pages it
/// carries every control message (ROUND_END of its own share excepted, which
/// every bulk stream sends): the dirty bitmap, SWITCHOVER, RESUMED, the
/// resync of a rejoin, IMAGE_DIGEST, HANDED_OVER, DISCARD and COMPLETE. A
/// migration with one bulk stream is the protocol before version 5.
public struct AgentStream: Hashable, Sendable, CustomStringConvertible {
    public let role: StreamRole
    /// Which bulk stream, `0 ..< bulkStreams`; 0 for the urgent connection.
    public let index: Int

    /// The most bulk streams a migration may have: what HELLO allows.
    public static let maxBulkStreams = 8

    /// Bulk stream `index`.
    public static func bulk(_ index: Int) -> AgentStream {
        precondition(index >= 0 && index < maxBulkStreams, "no bulk stream \(index)")
        return AgentStream(.bulk, index)
    }
    /// Bulk stream 0, which also carries the control messages.
    public static let bulk = AgentStream(.bulk, 0)
    public static let urgent = AgentStream(.urgent, 0)

    private init(_ role: StreamRole, _ index: Int) {
        self.role = role
        self.index = index
    }

    /// The connection a HELLO opens, by its role and stream index; nil for
    /// an index the role cannot have (the codec refuses those).
    public init?(role: StreamRole, index: Int) {
        guard index >= 0, index < Self.maxBulkStreams, role == .bulk || index == 0 else { return nil }
        self.init(role, index)
    }

    /// Bulk stream 0: the one that carries the control messages.
    public var isControl: Bool { self == .bulk }

    /// Every connection of a migration with `bulkStreams` bulk streams:
    /// each bulk stream, then the urgent connection.
    public static func all(bulkStreams: Int) -> [AgentStream] {
        (0..<bulkStreams).map { bulk($0) } + [.urgent]
    }

    /// "urgent", "bulk" (stream 0), "bulk 1", …
    public var description: String {
        switch (role, index) {
        case (.urgent, _): "urgent"
        case (.bulk, 0): "bulk"
        case let (.bulk, index): "bulk \(index)"
        }
    }
}
