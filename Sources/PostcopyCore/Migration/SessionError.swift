/// Why the daemon's side refused a message; each closes the connection.
public enum SessionError: Error, Equatable, Sendable, CustomStringConvertible {
    case malformed(ProtocolError)
    /// A message where the migration has no place for it: this phase, or
    /// this connection (nil: before HELLO named one).
    case unexpected(MessageType, phase: DestinationSession.Phase, stream: AgentStream?)
    case wrongMigration(expected: MigrationID, got: MigrationID)
    /// A HELLO for the migration, without its secret.
    case wrongSecret(MigrationID)
    case regionSizeMismatch(source: UInt64, destination: UInt64)
    case duplicateConnection(AgentStream)
    /// A HELLO whose bulk stream count is not the migration's.
    case streamCountMismatch(migration: Int, hello: Int)
    /// A HELLO naming a stream its own count does not have (the codec
    /// refuses those; a message made in code may not be).
    case streamOutOfRange(role: StreamRole, index: Int, bulkStreams: Int)
    /// A ROUND_END that is not the round after its stream's last one.
    case roundOutOfOrder(stream: AgentStream, round: UInt32, expected: UInt32)
    /// DIRTY_BITMAP while some bulk streams have not ended the last round
    /// (their pages may still be on their way): the daemon waits for them
    /// before it hands the bitmap over, so an agent never sees this.
    case bitmapBeforeStreamsDrained(behind: [Int], round: UInt32)
    /// DIRTY_BITMAP after round `round`, but `stream` sent pages after it.
    case pagesAfterLastRound(stream: AgentStream, round: UInt32)
    /// Precopy pages on a bulk stream other than the one `StreamPartition`
    /// gives them.
    case pagesOffTheirStream(MessageType, PageRun, stream: AgentStream, bulkStreams: Int)
    case bitmapOutOfOrder(expectedWord: UInt64, got: UInt64)
    case bitmapIncomplete(words: UInt64, expected: UInt64)
    case staleCountMismatch(announced: UInt64, bitmap: UInt64)
    /// A resuming HELLO with no postcopy to resume.
    case nothingToResume(phase: DestinationSession.Phase)
    /// A fresh HELLO for a migration already in postcopy.
    case postcopyInProgress
    /// An IMAGE_DIGEST other than the one the source sent before.
    case imageDigestChanged(known: ImageDigest, got: ImageDigest)
    /// DISCARD once the guest may run here: no hand-over was pending.
    case discardPastPointOfNoReturn
    /// A HELLO for a migration discarded before the guest ran here.
    case discarded

    /// The code of the ERROR frame that reports this to the peer.
    public var code: ErrorCode {
        switch self {
        case let .malformed(error): return error.code
        case .unexpected, .duplicateConnection, .bitmapOutOfOrder, .wrongMigration, .nothingToResume,
             .postcopyInProgress, .bitmapBeforeStreamsDrained:
            return .unexpectedMessage
        case .regionSizeMismatch, .streamCountMismatch: return .incompatible
        case .streamOutOfRange, .roundOutOfOrder, .pagesAfterLastRound, .pagesOffTheirStream: return .protocolViolation
        case .wrongSecret: return .refused
        case .staleCountMismatch, .bitmapIncomplete, .imageDigestChanged, .discardPastPointOfNoReturn:
            return .protocolViolation
        case .discarded: return .discarded
        }
    }

    public var description: String {
        switch self {
        case let .malformed(error):
            return error.description
        case let .unexpected(type, phase, stream):
            return "unexpected \(type) \(stream.map { "on the \($0) connection " } ?? "")during \(phase)"
        case let .wrongMigration(expected, got):
            return "HELLO for migration \(got), this daemon serves \(expected)"
        case let .wrongSecret(id):
            return "HELLO for migration \(id) without its secret: the migration is bound to the agent that started it (a second agent, or an attempt to hijack it)"
        case let .regionSizeMismatch(source, destination):
            return "source region is \(source) bytes, destination region is \(destination) bytes"
        case let .duplicateConnection(stream):
            return "a second \(stream) connection for the same migration"
        case let .streamCountMismatch(migration, hello):
            return "HELLO for a migration of \(hello) bulk stream\(hello == 1 ? "" : "s"), but this migration has \(migration) (start postcopy-push with --streams \(migration))"
        case let .streamOutOfRange(role, index, bulkStreams):
            return "HELLO for \(role) stream \(index) of a migration with \(bulkStreams) bulk streams"
        case let .roundOutOfOrder(stream, round, expected):
            return "ROUND_END for round \(round) on the \(stream) connection, whose next round is \(expected)"
        case let .bitmapBeforeStreamsDrained(behind, round):
            return "DIRTY_BITMAP before bulk stream\(behind.count == 1 ? "" : "s") \(behind.map(String.init).joined(separator: ", ")) ended round \(round), the last: \(behind.count == 1 ? "its" : "their") pages may still be on the way"
        case let .pagesOffTheirStream(type, run, stream, bulkStreams):
            return "\(type) \(run) on the \(stream) connection, but with \(bulkStreams) bulk streams a page travels on stream (page / 512) mod \(bulkStreams), in 2 MiB chunks"
        case let .pagesAfterLastRound(stream, round):
            return "DIRTY_BITMAP after round \(round), the last, but the \(stream) connection sent pages past it"
        case let .bitmapOutOfOrder(expectedWord, got):
            return "DIRTY_BITMAP frame starts at word \(got), expected word \(expectedWord)"
        case let .bitmapIncomplete(words, expected):
            return "SWITCHOVER after \(words) of the dirty bitmap's \(expected) words"
        case let .staleCountMismatch(announced, bitmap):
            return "SWITCHOVER announces \(announced) stale pages, the dirty bitmap has \(bitmap)"
        case let .nothingToResume(phase):
            return "a resuming HELLO during \(phase): there is no postcopy to resume (start the agent without --resume)"
        case .postcopyInProgress:
            return "this migration is already in postcopy: a restarted agent must rejoin it (postcopy-push --resume)"
        case let .imageDigestChanged(known, got):
            return "IMAGE_DIGEST \(got) differs from the source's digest sent before, \(known): the image cannot have two"
        case .discardPastPointOfNoReturn:
            return "DISCARD, but no hand-over is pending: the guest may run on the destination already, so it cannot be discarded (the source must stay paused)"
        case .discarded:
            return "this migration was discarded before the guest ran on the destination: the source runs it"
        }
    }
}
