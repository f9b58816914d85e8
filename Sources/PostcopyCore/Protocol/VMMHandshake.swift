/// The conversation on the VMM socket, as either end keeps it: which
/// message may come next, and from whom. postcopyd's `VMMLink` and the
/// reference VMM (`GuestVMM`) both feed it every message they send and
/// receive (their `VMMChannel` does), so the two ends follow one
/// definition; the C adapter follows docs/protocol.md.
///
/// A new migration (`.attach`):
///
///     daemon  VMM_OFFER (RAM file)
///     VMM     VMM_ATTACH (userfaultfd)
///     daemon  VMM_RESUME (page-state file)       at switchover
///     VMM     VMM_RESUMED
///     daemon  VMM_COMPLETE (image digest)        once every page is in
///     VMM     VMM_COMPLETE (empty)
///
/// A VMM reattaching to a restarted daemon (`.reattach`) opens with
/// VMM_HANDBACK of the RAM file and of the page-state file (in either
/// order), then VMM_REATTACH (userfaultfd); the daemon answers VMM_RESUME
/// and the conversation goes on as above. HEARTBEAT may come from either
/// side at any time before the end; ERROR from either side ends it.
public struct VMMHandshake: Equatable, Sendable {
    /// How the conversation opens.
    public enum Opening: Equatable, Sendable {
        /// The daemon offers the RAM file of a new migration.
        case attach
        /// The VMM hands back what it kept to a daemon taking over.
        case reattach
    }

    /// Where the conversation stands.
    public enum Phase: Equatable, Sendable {
        /// Nothing said yet: VMM_OFFER comes next (`.attach`), or
        /// VMM_HANDBACK (`.reattach`).
        case opening(Opening)
        /// VMM_OFFER sent: VMM_ATTACH next.
        case offered
        /// The VMM handed these back so far: more VMM_HANDBACK, or, once
        /// both are in, VMM_REATTACH.
        case handingBack(Set<HandbackKind>)
        /// The VMM attached (or reattached): VMM_RESUME next.
        case attached(reattached: Bool)
        /// VMM_RESUME sent: VMM_RESUMED next.
        case resuming
        /// The guest runs on postcopyd's memory: VMM_COMPLETE with the digest next.
        case running
        /// VMM_COMPLETE sent: the VMM's empty VMM_COMPLETE next — after its
        /// VMM_RESUMED, when the daemon completed without waiting for it
        /// (a VMM reattaching to a daemon that has every page already).
        case completing(resumed: Bool)
        /// The VMM released the range: nothing more.
        case completed
        /// An ERROR ended it.
        case ended(by: VMMPeer, code: ErrorCode, message: String)
    }

    public private(set) var phase: Phase

    public init(opening: Opening) { phase = .opening(opening) }

    /// Whether the VMM attached (or reattached) and the daemon may send
    /// VMM_RESUME or has.
    public var isAttached: Bool {
        switch phase {
        case .attached, .resuming, .running, .completing, .completed: return true
        default: return false
        }
    }

    /// Takes `message`, sent by `sender`, into the conversation; throws,
    /// and changes nothing, when it is out of turn.
    public mutating func record(_ message: VMMMessage, from sender: VMMPeer) throws(VMMHandshakeError) {
        switch (phase, message, sender) {
        case (.completed, _, _):
            throw .afterEnd(message.type, from: sender, phase: phase)
        case (.ended, _, _):
            throw .afterEnd(message.type, from: sender, phase: phase)
        case (_, .heartbeat, _):
            return
        case let (_, .error(code, text), _):
            phase = .ended(by: sender, code: code, message: text)
        case (.opening(.attach), .offer, .daemon):
            phase = .offered
        // The two ends disagree on what the socket is for: the daemon
        // serves a new migration, the VMM reattaches to one under way.
        case (.offered, .handback, .vmm), (.offered, .reattach, .vmm),
             (.opening(.reattach), .offer, .daemon), (.handingBack, .offer, .daemon),
             (.attached(reattached: true), .offer, .daemon):
            throw .reattachToNewMigration
        case (.offered, .attach, .vmm):
            phase = .attached(reattached: false)
        case let (.opening(.reattach), .handback(kind), .vmm):
            phase = .handingBack([kind])
        case let (.handingBack(kinds), .handback(kind), .vmm):
            phase = .handingBack(kinds.union([kind]))
        case let (.handingBack(kinds), .reattach, .vmm):
            let missing = Set(HandbackKind.allCases).subtracting(kinds)
            guard missing.isEmpty else { throw .reattachBeforeHandback(missing: missing.sorted { $0.rawValue < $1.rawValue }) }
            phase = .attached(reattached: true)
        case (.attached, .resume, .daemon):
            phase = .resuming
        case (.resuming, .resumed, .vmm):
            phase = .running
        case (.running, .complete(_?), .daemon):
            phase = .completing(resumed: true)
        // Each end records its own order: the daemon may send VMM_COMPLETE
        // before the VMM's VMM_RESUMED, sent before it, arrives.
        case (.resuming, .complete(_?), .daemon):
            phase = .completing(resumed: false)
        case (.completing(resumed: false), .resumed, .vmm):
            phase = .completing(resumed: true)
        case (.completing(resumed: true), .complete(nil), .vmm):
            phase = .completed
        default:
            throw .outOfTurn(message.type, from: sender, phase: phase)
        }
    }

    /// What the conversation takes in `phase`, and from whom (HEARTBEAT
    /// and ERROR aside); nothing once it ended.
    public static func expected(in phase: Phase) -> [(sender: VMMPeer, type: MessageType)] {
        switch phase {
        case .opening(.attach): return [(.daemon, .vmmOffer)]
        case .opening(.reattach): return [(.vmm, .vmmHandback)]
        case .offered: return [(.vmm, .vmmAttach)]
        case .handingBack: return [(.vmm, .vmmHandback), (.vmm, .vmmReattach)]
        case .attached: return [(.daemon, .vmmResume)]
        case .resuming: return [(.vmm, .vmmResumed), (.daemon, .vmmComplete)]
        case .running: return [(.daemon, .vmmComplete)]
        case let .completing(resumed): return [(.vmm, resumed ? .vmmComplete : .vmmResumed)]
        case .completed, .ended: return []
        }
    }
}

/// The two ends of the VMM socket.
public enum VMMPeer: Equatable, Sendable, CustomStringConvertible {
    case daemon
    case vmm

    public var description: String { self == .daemon ? "postcopyd" : "the VMM" }
}

/// A message out of turn on the VMM socket. Every case refuses that
/// connection (ERROR with `code`, then closed): the migration itself is
/// unharmed while no VMM has attached.
public enum VMMHandshakeError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A message the conversation does not expect here.
    case outOfTurn(MessageType, from: VMMPeer, phase: VMMHandshake.Phase)
    /// A message after VMM_COMPLETE was answered, or after an ERROR.
    case afterEnd(MessageType, from: VMMPeer, phase: VMMHandshake.Phase)
    /// VMM_HANDBACK or VMM_REATTACH meeting the VMM_OFFER of a new
    /// migration, either way round: the VMM reattaches to a migration
    /// under way, but the daemon serves a new one.
    case reattachToNewMigration
    /// VMM_REATTACH before the VMM handed back all it kept.
    case reattachBeforeHandback(missing: [HandbackKind])

    /// The code of the ERROR that refuses the connection.
    public var code: ErrorCode { .unexpectedMessage }

    public var description: String {
        switch self {
        case let .outOfTurn(type, sender, phase):
            let expected = VMMHandshake.expected(in: phase).map { "\($0.type) from \($0.sender)" }
            guard !expected.isEmpty else { return "\(type) from \(sender) after the VMM socket's conversation ended" }
            return "expected \(expected.joined(separator: " or ")), got \(type) from \(sender)"
        case let .afterEnd(type, sender, .ended(by, code, _)):
            return "\(type) from \(sender) after \(by) ended the VMM socket's conversation with ERROR \(code)"
        case let .afterEnd(type, sender, _):
            return "\(type) from \(sender) after the VMM released the range (VMM_COMPLETE answered)"
        case .reattachToNewMigration:
            return "the VMM reattaches to a migration under way, but postcopyd serves a new one (it offered a new migration's RAM)"
        case let .reattachBeforeHandback(missing):
            return "VMM_REATTACH before VMM_HANDBACK of the \(missing.map { "\($0)" }.joined(separator: " and "))"
        }
    }
}
