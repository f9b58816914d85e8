import Glibc
import Logging
import PostcopyCore
import PostcopyOS
import Synchronization

/// What the VMM handed over when it attached.
struct VMMAttachment: Sendable {
    let channel: VMMChannel
    let uffd: Userfaultfd
    let guestBase: UInt64
    let credentials: PeerCredentials
    /// The UFFDIO_REGISTER_MODE_* word the VMM registered its range with.
    let registerMode: UInt64
}

/// What a VMM hands a restarted daemon (VMM_HANDBACK twice, then
/// VMM_REATTACH): the descriptors are the receiver's to close.
struct Reattachment: Sendable {
    let channel: VMMChannel
    let credentials: PeerCredentials
    let ram: Int32
    let pageState: Int32
    let uffd: Int32
    let guestBase: UInt64
    let features: UffdFeatures
    let registerMode: UInt64

    func closeDescriptors() {
        for fd in [ram, pageState, uffd] { close(fd) }
    }
}

/// A daemon taking a migration over: the record it took over from, and the
/// VMM when it is what handed the migration back.
struct VMMTakeover: Sendable {
    let pageState: PageStateFile
    let attached: VMMAttachment?
}

/// The daemon's side of the VMM socket, on a thread of its own: accepts the
/// VMM, offers it the RAM file, takes its userfaultfd, then watches the
/// socket so that a VMM that goes away fails the migration at once. A
/// daemon taking a migration over instead accepts the VMM's reattachment
/// (when the VMM did not hand the migration over in the first place).
final class VMMLink: Sendable {
    let listener: UnixListener
    private let memory: GuestMemory
    private let takeover: VMMTakeover?
    private let allowedUID: UInt32
    private let failures: FailureLatch
    private let logger: Logger
    private let attachment = Locked<VMMAttachment?>(nil)
    /// Opens once the VMM attached.
    let attached = Latch()
    /// Opens once the VMM acknowledged VMM_RESUME (VMM_RESUMED), which the
    /// page-state record then says too.
    let resumed = Latch()
    /// The record VMM_RESUME passed, where the acknowledgement is recorded.
    private let resumedRecord = Locked<PageStateFile?>(nil)
    /// Opens once the VMM acknowledged VMM_COMPLETE.
    let completed = Latch()
    /// Asked first when the VMM closes its socket: true when it settled
    /// what that means (the daemon's, for a hand-over still pending).
    private let goneHandler = Locked<(@Sendable (String) -> Bool)?>(nil)
    private let thread = Locked<OSThread?>(nil)
    /// How long a VMM connection may take over its handshake (VMM_ATTACH,
    /// or VMM_HANDBACK ×2 and VMM_REATTACH) before it is refused.
    private let handshakeTimeoutNanos: UInt64
    /// Why the last VMM connection was refused, if one was: a switchover
    /// that finds no VMM says so.
    private let refusal = Locked<String?>(nil)

    init(listener: UnixListener, memory: GuestMemory, allowedUID: UInt32, failures: FailureLatch, logger: Logger,
         takeover: VMMTakeover? = nil, handshakeTimeoutNanos: UInt64 = 10_000_000_000) {
        self.listener = listener
        self.handshakeTimeoutNanos = handshakeTimeoutNanos
        self.memory = memory
        self.takeover = takeover
        if let vmm = takeover?.attached {
            attachment.withLock { $0 = vmm }
            attached.open()
        }
        self.allowedUID = allowedUID
        self.failures = failures
        self.logger = logger
    }

    /// `handler` decides first what a VMM that closed its socket means
    /// (with the reason); returning false leaves it a lost VMM.
    func whenGone(_ handler: @escaping @Sendable (String) -> Bool) {
        goneHandler.withLock { $0 = handler }
    }

    func start() throws {
        let started = try OSThread.start(name: "postcopy-vmm") { [self] in run() }
        thread.withLock { $0 = started }
    }

    func join() { thread.withLock { $0 }?.join() }

    /// The VMM, once attached.
    var current: VMMAttachment? { attachment.withLock { $0 } }

    /// Tells the VMM to run the guest, and hands it the page-state record
    /// to keep for a restarted daemon; `resumed` opens when it acknowledges.
    func resume(pageState: PageStateFile) throws {
        guard let vmm = current else { throw MigrationError(.internalFailure, "resume before the VMM attached") }
        resumedRecord.withLock { $0 = pageState }
        try vmm.channel.send(.resume, passing: pageState.fd)
    }

    /// Tells the VMM every page is in place, with the source's digest of
    /// the image; it answers once it unregistered.
    func complete(imageDigest: ImageDigest) throws {
        guard let vmm = current else { return }
        try vmm.channel.send(.complete(imageDigest: imageDigest))
    }

    /// Wakes the thread and closes the VMM's connection, with ERROR when
    /// `error` is given. A switchover waiting for VMM_RESUMED wakes too
    /// (and finds the failure).
    func shutdown(reporting error: MigrationError?) {
        resumed.open()
        if let vmm = current {
            if let error { try? vmm.channel.send(.error(code: error.code, message: error.reason)) }
            vmm.channel.shutdown()
        }
        _ = Glibc.shutdown(listener.fd, Int32(SHUT_RDWR))
    }

    private func run() {
        do {
            let vmm: VMMAttachment
            if let handedBack = takeover?.attached {
                vmm = handedBack
            } else {
                guard let accepted = try acceptVMM() else { return }
                vmm = accepted
                attachment.withLock { $0 = vmm }
                attached.open()
            }
            let watching = Atomic<Bool>(true)
            let refuser = try OSThread.start(name: "postcopy-vmm-refuse") { [self] in
                refuseOthers(vmm.credentials, while: watching)
            }
            defer {
                watching.store(false, ordering: .sequentiallyConsistent)
                refuser.join()
            }
            try watch(vmm)
        } catch let error as VMMHandshakeError {
            failures.fail(error.code, "the VMM broke the VMM socket's protocol", cause: error)
        } catch {
            failures.fail(.peerLost, "VMM", cause: error)
        }
    }

    /// While `vmm` is attached, answers any other connection to the socket
    /// with ERROR at once — one VMM per migration — instead of leaving it
    /// waiting in the backlog.
    private func refuseOthers(_ vmm: PeerCredentials, while watching: borrowing Atomic<Bool>) {
        while watching.load(ordering: .sequentiallyConsistent) {
            let next: UnixConnection?
            do {
                next = try listener.accept(timeoutNanos: 200_000_000)
            } catch {
                return  // the listener was shut down: the migration is ending
            }
            guard let connection = next else { continue }
            let credentials = try? connection.peerCredentials()
            let reason = "a VMM is already attached to this migration (\(vmm)); one VMM per migration"
            logger.warning("refused VMM connection: \(reason)", metadata: ["peer": "\(credentials.map { "\($0)" } ?? "unknown")"])
            try? VMMChannel(connection, side: .daemon, opening: .attach).send(.error(code: .unexpectedMessage, message: reason))
        }
    }

    /// Accepts connections until one from the allowed uid attaches; refuses
    /// others. Any error in one connection's handshake — another uid, a
    /// wrong message, a closed socket, nothing within
    /// `handshakeTimeoutNanos` — refuses that connection alone (ERROR with
    /// the reason, then closed): the daemon goes on waiting for the right
    /// VMM, and the migration, or the takeover, is unharmed.
    private func acceptVMM() throws -> VMMAttachment? {
        while failures.error == nil {
            let connection: UnixConnection
            do {
                connection = try listener.accept()
            } catch {
                if failures.error != nil { return nil }
                throw error
            }
            var channel: VMMChannel?
            var peer = "unknown"
            do {
                try connection.setReceiveTimeout(handshakeTimeoutNanos)
                guard let (admitted, credentials) = try VMMLink.admit(connection, allowedUID: allowedUID,
                                                                     opening: takeover == nil ? .attach : .reattach,
                                                                     logger: logger) else {
                    refusal.withLock { $0 = "a VMM connection from another uid than \(allowedUID)" }
                    continue
                }
                channel = admitted
                peer = "\(credentials)"
                let vmm = if let takeover {
                    try reattach(admitted, credentials, takeover.pageState)
                } else {
                    try attach(admitted, credentials)
                }
                // Attached: from here the socket is watched without a deadline.
                try connection.setReceiveTimeout(nil)
                return vmm
            } catch {
                if failures.error != nil { return nil }
                let (code, reason) = VMMLink.refusalReason(error, timeoutNanos: handshakeTimeoutNanos)
                refusal.withLock { $0 = reason }
                logger.warning("refused VMM connection: \(reason); still waiting for the VMM", metadata: ["peer": "\(peer)"])
                let answer = channel ?? VMMChannel(connection, side: .daemon, opening: .attach)
                try? answer.send(.error(code: code, message: reason))
                answer.shutdown()
                continue
            }
        }
        return nil
    }

    /// Why the last VMM connection was refused, if one was.
    var lastRefusal: String? { refusal.withLock { $0 } }

    /// The code and the reason a VMM connection's handshake is refused with.
    static func refusalReason(_ error: any Error, timeoutNanos: UInt64) -> (ErrorCode, String) {
        switch error {
        case let refusal as VMMRefusal:
            return (refusal.code, refusal.reason)
        case VMMHandshakeError.reattachToNewMigration:
            return (.unexpectedMessage, "a VMM tried to reattach, but this postcopyd serves a new migration: it was not started to take one over (postcopyd serve --takeover) and systemd's fd store held no page-state record")
        case let error as VMMHandshakeError:
            return (error.code, "\(error)")
        case let error as SystemCallError where error.errno == .again:
            return (.peerLost, "the VMM sent no VMM_ATTACH (or VMM_REATTACH) within \(fixed(Double(timeoutNanos) / 1e9, 1)) s of connecting")
        case let error as MigrationError:
            return (error.code, error.reason)
        default:
            return (.protocolViolation, "the VMM's handshake failed: \(error)")
        }
    }

    /// The connection as the daemon's end of a conversation that opens as
    /// `opening`, with its peer's credentials, when the peer is
    /// `allowedUID`; otherwise refused with ERROR (nil).
    static func admit(_ connection: UnixConnection, allowedUID: UInt32, opening: VMMHandshake.Opening,
                      logger: Logger) throws -> (VMMChannel, PeerCredentials)? {
        let credentials = try connection.peerCredentials()
        let channel = VMMChannel(connection, side: .daemon, opening: opening)
        guard credentials.uid == allowedUID else {
            let reason = "VMM socket peer uid \(credentials.uid) is not the allowed uid \(allowedUID)"
            logger.warning("refused VMM connection: \(reason)", metadata: ["peer": "\(credentials)"])
            try? channel.send(.error(code: .unexpectedMessage, message: reason))
            return nil
        }
        return (channel, credentials)
    }

    /// A VMM connection turned away on its own, the migration unharmed.
    private struct VMMRefusal: Error {
        let code: ErrorCode
        let reason: String
    }

    /// Accepts the reattachment of the VMM of a migration this daemon took
    /// over from what systemd's fd store kept: what it hands back must be
    /// the very files taken over, and it must map guest RAM where it did.
    private func reattach(_ channel: VMMChannel, _ credentials: PeerCredentials,
                          _ pageState: PageStateFile) throws -> VMMAttachment {
        let handed = try VMMLink.receiveReattachment(channel, credentials)
        defer { close(handed.ram); close(handed.pageState) }
        let header = pageState.header
        guard FileIdentity(descriptor: handed.ram) == memory.file.identity,
              FileIdentity(descriptor: handed.pageState) == pageState.identity else {
            close(handed.uffd)
            throw VMMRefusal(code: .incompatible, reason: "the VMM handed back another migration's files (RAM \(FileIdentity(descriptor: handed.ram)), page state \(FileIdentity(descriptor: handed.pageState)))")
        }
        guard handed.guestBase == header.guestBase else {
            close(handed.uffd)
            throw VMMRefusal(code: .incompatible, reason: "the VMM reattached with guest base 0x\(String(handed.guestBase, radix: 16)); the migration's is 0x\(String(header.guestBase, radix: 16))")
        }
        let uffd = Userfaultfd.adopting(fd: handed.uffd, features: handed.features)
        try VMMLink.makeNonBlocking(uffd, from: credentials, logger: logger)
        let vmm = VMMAttachment(channel: channel, uffd: uffd,
                                guestBase: handed.guestBase, credentials: credentials, registerMode: handed.registerMode)
        resumedRecord.withLock { $0 = pageState }
        try channel.send(.resume, passing: pageState.fd)
        logger.event(.vmmAttached, .info, "VMM reattached: \(credentials)", [
            "vmm_pid": "\(credentials.pid)", "vmm_uid": "\(credentials.uid)",
            "guest_base": "0x\(String(handed.guestBase, radix: 16))", "features": "\(handed.features)",
            "reattached": "1",
        ])
        return vmm
    }

    /// Reads what a reattaching VMM sends: VMM_HANDBACK of the RAM file and
    /// of the page-state record, then VMM_REATTACH with the userfaultfd
    /// (the channel's conversation refuses any other order).
    static func receiveReattachment(_ channel: VMMChannel, _ credentials: PeerCredentials) throws -> Reattachment {
        var handed: [HandbackKind: Int32] = [:]
        var done = false
        defer { if !done { handed.values.forEach { close($0) } } }
        while true {
            guard let (message, descriptor) = try channel.receive() else {
                throw MigrationError(.peerLost, "the VMM closed the socket while reattaching")
            }
            switch (message, descriptor) {
            case let (.handback(kind), descriptor?):
                if let earlier = handed.updateValue(descriptor, forKey: kind) { close(earlier) }
            case let (.reattach(guestBase, features, registerMode), uffd?):
                guard let ram = handed[.ram], let pageState = handed[.pageState] else {
                    close(uffd)
                    throw VMMHandshakeError.reattachBeforeHandback(missing: HandbackKind.allCases.filter { handed[$0] == nil })
                }
                done = true
                return Reattachment(channel: channel, credentials: credentials, ram: ram, pageState: pageState,
                                    uffd: uffd, guestBase: guestBase, features: features, registerMode: registerMode)
            case (.heartbeat, _):
                continue
            case let (.error(code, text), _):
                throw MigrationError(.peerLost, "the reattaching VMM reported \(code): \(text)")
            case let (other, descriptor):
                // The conversation admits nothing else here.
                if let descriptor { close(descriptor) }
                throw MigrationError(.unexpectedMessage, "expected VMM_HANDBACK or VMM_REATTACH from a reattaching VMM, got \(other.type)")
            }
        }
    }

    private func attach(_ channel: VMMChannel, _ credentials: PeerCredentials) throws -> VMMAttachment {
        let geometry = memory.geometry
        try channel.send(.offer(regionSize: geometry.regionSize, pageSize: geometry.pageSize, fileOffset: 0),
                         passing: memory.file.fd)
        var attachment: (message: VMMMessage, descriptor: Int32?)
        repeat {
            guard let next = try channel.receive() else {
                throw MigrationError(.peerLost, "the VMM closed the socket before VMM_ATTACH")
            }
            attachment = next
        } while attachment.message == .heartbeat
        if case let .error(code, text) = attachment.message {
            throw MigrationError(.peerLost, "the VMM reported \(code) instead of attaching: \(text)")
        }
        // The conversation admits nothing else after VMM_OFFER.
        guard case let .attach(guestBase, features, registerMode) = attachment.message,
              let descriptor = attachment.descriptor else {
            throw MigrationError(.unexpectedMessage, "expected VMM_ATTACH from the VMM, got \(attachment.message)")
        }
        let uffd = Userfaultfd.adopting(fd: descriptor, features: features)
        try VMMLink.makeNonBlocking(uffd, from: credentials, logger: logger)
        let mode = RegisterMode(rawValue: registerMode)
        let kind = memory.file.backing.memoryKind
        guard mode.contains([.minor, .missing]) else {
            throw MigrationError(.incompatible, "the VMM registered its mapping with mode 0x\(String(registerMode, radix: 16)); postcopyd needs MINOR and MISSING")
        }
        guard features.isSuperset(of: kind.requiredFeatures) else {
            throw MigrationError(.incompatible, "the VMM's userfaultfd lacks \(kind.requiredFeatures.subtracting(features)) for \(kind)")
        }
        guard guestBase % geometry.pageSize.bytes == 0 else {
            throw MigrationError(.incompatible, "guest base 0x\(String(guestBase, radix: 16)) is not aligned to \(geometry.pageSize)")
        }
        logger.event(.vmmAttached, .info, "VMM attached: \(credentials)", [
            "vmm_pid": "\(credentials.pid)", "vmm_uid": "\(credentials.uid)",
            "guest_base": "0x\(String(guestBase, radix: 16))", "features": "\(features)",
        ])
        return VMMAttachment(channel: channel, uffd: uffd, guestBase: guestBase, credentials: credentials,
                             registerMode: registerMode)
    }

    /// Sets O_NONBLOCK on a userfaultfd the VMM handed over without it, and
    /// says so: the fault loop must never block in read(2).
    static func makeNonBlocking(_ uffd: Userfaultfd, from credentials: PeerCredentials, logger: Logger) throws {
        do {
            if try uffd.makeNonBlocking() {
                logger.notice("the VMM (\(credentials)) handed over a blocking userfaultfd: set O_NONBLOCK on it (fcntl), so that the fault thread never blocks reading it")
            }
        } catch {
            throw VMMRefusal(code: .incompatible, reason: "the VMM's userfaultfd is blocking, and O_NONBLOCK could not be set on it: \(error)")
        }
    }

    /// Reads the VMM socket until the VMM acknowledges completion or goes away.
    private func watch(_ vmm: VMMAttachment) throws {
        while true {
            guard let (message, descriptor) = try vmm.channel.receive() else {
                if failures.error == nil {
                    let reason = "the VMM closed its socket before the migration completed"
                    if goneHandler.withLock({ $0 })?(reason) == true { return }
                    if failures.fail(.peerLost, reason) {
                        logger.event(.connectionLost, .error, "lost the VMM: \(reason)", [
                            "peer": "vmm", "connection": "vmm socket", "reason": "\(reason)",
                        ])
                    }
                }
                return
            }
            if let descriptor { close(descriptor) }
            // The channel's conversation admitted the message: it is the
            // one expected now.
            switch message {
            // The VMM's answer is empty: the digest travels to the VMM only.
            case .complete(imageDigest: nil):
                completed.open()
                return
            case .heartbeat:
                continue
            // The VMM holds the range and the record: a restarted daemon may
            // take this migration over without waiting for it to reattach.
            case .resumed:
                resumedRecord.withLock { $0 }?.record(.vmmResumed)
                resumed.open()
                continue
            case let .error(code, text):
                failures.fail(.peerLost, "the VMM reported \(code): \(text)")
                return
            default:
                failures.fail(.unexpectedMessage, "unexpected \(message.type) from the VMM")
                return
            }
        }
    }
}
