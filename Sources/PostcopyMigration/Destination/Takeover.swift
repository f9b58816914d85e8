import Glibc
import Logging
import PostcopyCore
import PostcopyOS

/// Where a restarted postcopyd finds the migration it takes over from a
/// daemon that died during postcopy.
public enum TakeoverSource: Sendable, CustomStringConvertible {
    /// systemd's file-descriptor store kept them: descriptors by FDNAME
    /// (`StoredDescriptor`).
    case stored([String: Int32])
    /// The VMM hands them back when it reattaches (VMM_HANDBACK, VMM_REATTACH).
    case vmm

    public var description: String {
        switch self {
        case .stored: return "systemd's file-descriptor store"
        case .vmm: return "the VMM's reattachment"
        }
    }
}

/// The names under which the daemon keeps descriptors in systemd's fd store.
public enum StoredDescriptor {
    public static let ram = "ram"
    public static let pageState = "page-state"
    public static let uffd = "uffd"
    public static let all = [ram, pageState, uffd]
}

/// What a daemon taking a migration over has taken back.
struct Recovered: Sendable {
    let memory: GuestMemory
    let pageState: PageStateFile
    let uffd: Userfaultfd
    /// The VMM, when it handed the migration back.
    let vmm: VMMAttachment?

    var header: PageStateHeader { pageState.header }

    /// Takes the migration back from `source`. For `.vmm`, accepts VMM
    /// connections on `listener` (from `allowedUID` only) for up to
    /// `timeoutNanos`. A connection whose reattachment fails — another uid,
    /// a wrong message, files that do not check out, nothing within
    /// `handshakeTimeoutNanos` — is refused on its own (ERROR with the
    /// reason, then closed), and the daemon goes on waiting for the VMM.
    /// `ramFile`: the instance's `ram-file`; when the RAM file taken back is
    /// still there under that name, this daemon removes the name at the
    /// end, as the one before it would have.
    static func take(from source: TakeoverSource, listener: UnixListener, allowedUID: UInt32,
                     timeoutNanos: UInt64, handshakeTimeoutNanos: UInt64 = 10_000_000_000,
                     ramFile: String? = nil, logger: Logger) throws -> Recovered {
        switch source {
        case let .stored(descriptors):
            return try fromStore(descriptors, ramFile: ramFile)
        case .vmm:
            let deadline = monotonicNanoseconds() + timeoutNanos
            var last: String?
            while true {
                // One clock reading: the deadline may pass between two.
                let now = monotonicNanoseconds()
                guard now < deadline else { break }
                let left = deadline - now
                guard let connection = try listener.accept(timeoutNanos: min(left, 250_000_000)) else { continue }
                var channel: VMMChannel?
                do {
                    try connection.setReceiveTimeout(handshakeTimeoutNanos)
                    guard let (admitted, credentials) = try VMMLink.admit(connection, allowedUID: allowedUID,
                                                                         opening: .reattach, logger: logger) else { continue }
                    channel = admitted
                    let taken = try fromVMM(try VMMLink.receiveReattachment(admitted, credentials), ramFile: ramFile,
                                            logger: logger)
                    try connection.setReceiveTimeout(nil)
                    return taken
                } catch {
                    let (code, reason) = VMMLink.refusalReason(error, timeoutNanos: handshakeTimeoutNanos)
                    last = reason
                    logger.warning("refused VMM connection: cannot take the migration over from it: \(reason); still waiting for the VMM to reattach")
                    let answer = channel ?? VMMChannel(connection, side: .daemon, opening: .reattach)
                    try? answer.send(.error(code: code, message: "cannot take the migration over: \(reason)"))
                    answer.shutdown()
                }
            }
            throw MigrationError(.peerLost, "no VMM reattached to \(listener.path) within \(timeoutNanos / 1_000_000_000) s, so there is no migration to take over\(last.map { " (last refused: \($0))" } ?? "")")
        }
    }

    private static func fromStore(_ descriptors: [String: Int32], ramFile: String?) throws -> Recovered {
        var left = descriptors
        defer { left.values.forEach { close($0) } }
        guard let state = left.removeValue(forKey: StoredDescriptor.pageState),
              let ram = left.removeValue(forKey: StoredDescriptor.ram) else {
            throw MigrationError(.internalFailure, "systemd's fd store holds \(descriptors.keys.sorted()), not both '\(StoredDescriptor.ram)' and '\(StoredDescriptor.pageState)'")
        }
        let uffdFD = left.removeValue(forKey: StoredDescriptor.uffd)
        let pageState: PageStateFile
        do {
            pageState = try PageStateFile(adopting: state)
        } catch {
            close(ram)
            if let uffdFD { close(uffdFD) }
            throw MigrationError(.internalFailure, "the page-state record in systemd's fd store is unusable, so which pages the guest may have written is unknown; not taking over", cause: error)
        }
        let file: MemoryFile
        do {
            file = try MemoryFile(adopting: ram, geometry: pageState.header.geometry, namedAt: ramFile)
        } catch {
            if let uffdFD { close(uffdFD) }
            throw error
        }
        guard let uffdFD else {
            throw MigrationError(.internalFailure, "systemd's fd store holds no '\(StoredDescriptor.uffd)': the guest's userfaultfd is not there to serve faults with")
        }
        let uffd = Userfaultfd.adopting(fd: uffdFD, features: pageState.header.features)
        return Recovered(memory: try GuestMemory(file: file), pageState: pageState, uffd: uffd, vmm: nil)
    }

    private static func fromVMM(_ handed: Reattachment, ramFile: String?, logger: Logger) throws -> Recovered {
        let uffd = Userfaultfd.adopting(fd: handed.uffd, features: handed.features)
        do {
            try VMMLink.makeNonBlocking(uffd, from: handed.credentials, logger: logger)
        } catch {
            close(handed.ram)
            close(handed.pageState)
            throw error
        }
        let pageState: PageStateFile
        do {
            pageState = try PageStateFile(adopting: handed.pageState)
        } catch {
            close(handed.ram)
            throw MigrationError(.internalFailure, "the page-state record the VMM handed back is unusable, so which pages the guest may have written is unknown; not taking over", cause: error)
        }
        let header = pageState.header
        let file = try MemoryFile(adopting: handed.ram, geometry: header.geometry, namedAt: ramFile)
        guard handed.guestBase == header.guestBase else {
            throw MigrationError(.incompatible, "the VMM reattached with guest base 0x\(String(handed.guestBase, radix: 16)); the page-state record says 0x\(String(header.guestBase, radix: 16))")
        }
        let vmm = VMMAttachment(channel: handed.channel, uffd: uffd, guestBase: handed.guestBase,
                                credentials: handed.credentials, registerMode: handed.registerMode)
        return Recovered(memory: try GuestMemory(file: file), pageState: pageState, uffd: uffd, vmm: vmm)
    }
}
