/// The events of a migration an operator looks for in the journal. Each has
/// a stable MESSAGE_ID (never change one: journal filters, alerts and the
/// catalog in systemd/postcopyd.catalog refer to it).
public enum DaemonEvent: String, CaseIterable, Sendable {
    case ready
    case migrationAccepted
    case vmmAttached
    case switchover
    case postcopyComplete
    case migrationFailed
    case faultStalled
    case connectionLost
    /// Postcopy paused: the agent's connections were lost.
    case postcopyPaused
    /// The agent rejoined a paused postcopy.
    case postcopyResumed
    /// A restarted postcopyd took over a migration whose daemon died during postcopy.
    case migrationTakenOver
    /// An agent connection was refused: TLS, its certificate, or its HELLO
    /// (a wrong migration or secret). The migration goes on.
    case agentRefused
    /// postcopyd stopped during postcopy (a failure, SIGTERM, SIGINT)
    /// without releasing the guest: its RAM stays registered and its faults
    /// on stale pages wait for a restarted postcopyd to take over.
    case guestLeftWaiting
    /// The hand-over is done (HANDED_OVER): the guest runs here, and the
    /// source can no longer take it back — the point of no return.
    case pointOfNoReturn
    /// The hand-over failed before the guest ran here, and the source runs
    /// it again (DISCARD), or a restarted postcopyd found that the guest
    /// never resumed here: this copy is discarded and must never run.
    case migrationDiscarded

    /// The journal's MESSAGE_ID: 32 lowercase hex digits.
    public var messageID: String {
        switch self {
        case .ready: "b99b2c1a1273418cb585442989372fa0"
        case .migrationAccepted: "e2aaf165d3814a388208aabe58391c7a"
        case .vmmAttached: "92596745fecc410095d3741bae74377a"
        case .switchover: "2968fddeec3244b8a51a16e2fc84e6f9"
        case .postcopyComplete: "5006448c75c84692b38c4e23125a483a"
        case .migrationFailed: "3cc5a6c412d04c27a3eb3ed27442dc86"
        case .faultStalled: "43ade87bd26045c09e9d8c40f6c5b2ae"
        case .connectionLost: "292784b104304e68bc02cc8d834978fc"
        case .postcopyPaused: "14c69670ea3d41c9af456da93a6f26d8"
        case .postcopyResumed: "477af0a540f34d719568f47c0d525d72"
        case .migrationTakenOver: "ea930c537fa5448ba7cbf921af607dd0"
        case .agentRefused: "ffbdc5116c514418a09f3aa19416dd4a"
        case .guestLeftWaiting: "c1f0a7d2e85b4b6a9e3d42f7a61b0c58"
        case .pointOfNoReturn: "c5bc4a42b8764414bbfb37746748f5d2"
        case .migrationDiscarded: "baca874db8974070895287caa3a27e48"
        }
    }
}

/// Names of the structured fields the daemon's records carry, as journal
/// field names. Log metadata uses the same names in lower case.
public enum JournalField {
    /// The journal's rules: 1–64 characters of A–Z, 0–9 and '_', not
    /// starting with '_' (reserved for trusted fields) or a digit.
    public static func isValid(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...64).contains(bytes.count), let first = bytes.first,
              first != UInt8(ascii: "_"), !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first)
        else { return false }
        return bytes.allSatisfy { byte in
            (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: "_")
        }
    }

    /// The journal field for a log metadata key: "pages_stale" → "PAGES_STALE",
    /// "vmm-socket" → "VMM_SOCKET"; nil when no valid name results.
    public static func name(forMetadataKey key: String) -> String? {
        let mapped = String(decoding: key.utf8.map { byte -> UInt8 in
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"): byte - 32
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): byte
            default: UInt8(ascii: "_")
            }
        }, as: UTF8.self)
        return isValid(mapped) ? mapped : nil
    }

    /// Fields the journal itself or libsystemd sets; a metadata key must not
    /// override them.
    public static let reserved: Set<String> = [
        "MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "SYSLOG_IDENTIFIER",
    ]
}

/// syslog(3) priorities, as the journal's PRIORITY field takes them.
public enum SyslogPriority: Int, Sendable {
    case emergency = 0, alert, critical, error, warning, notice, info, debug
}
