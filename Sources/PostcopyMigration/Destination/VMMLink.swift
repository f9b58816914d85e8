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
}

/// The daemon's side of the VMM socket, on a thread of its own: accepts the
/// VMM, offers it the RAM file, takes its userfaultfd, then watches the
/// socket so that a VMM that goes away fails the migration at once.
final class VMMLink: Sendable {
    let listener: UnixListener
    private let memory: GuestMemory
    private let allowedUID: UInt32
    private let failures: FailureLatch
    private let logger: Logger
    private let attachment = Mutex<VMMAttachment?>(nil)
    /// Opens once the VMM attached.
    let attached = Latch()
    /// Opens once the VMM acknowledged VMM_COMPLETE.
    let completed = Latch()
    private let completeSent = Atomic<Bool>(false)
    private let thread = Mutex<OSThread?>(nil)

    init(listener: UnixListener, memory: GuestMemory, allowedUID: UInt32, failures: FailureLatch, logger: Logger) {
        self.listener = listener
        self.memory = memory
        self.allowedUID = allowedUID
        self.failures = failures
        self.logger = logger
    }

    func start() throws {
        let started = try OSThread.start(name: "postcopy-vmm") { [self] in run() }
        thread.withLock { $0 = started }
    }

    func join() { thread.withLock { $0 }?.join() }

    /// The VMM, once attached.
    var current: VMMAttachment? { attachment.withLock { $0 } }

    /// Tells the VMM to run the guest.
    func resume(imageDigest: ImageDigest) throws {
        guard let vmm = current else { throw MigrationError(.internalFailure, "resume before the VMM attached") }
        try vmm.channel.send(.vmmResume(imageDigest: imageDigest))
    }

    /// Tells the VMM every page is in place; it answers once it unregistered.
    func complete() throws {
        guard let vmm = current else { return }
        completeSent.store(true, ordering: .sequentiallyConsistent)
        try vmm.channel.send(.vmmComplete)
    }

    /// Wakes the thread and closes the VMM's connection, with ERROR when
    /// `error` is given.
    func shutdown(reporting error: MigrationError?) {
        if let vmm = current {
            if let error { try? vmm.channel.send(.error(code: error.code, message: error.reason)) }
            vmm.channel.shutdown()
        }
        _ = Glibc.shutdown(listener.fd, Int32(SHUT_RDWR))
    }

    private func run() {
        do {
            guard let vmm = try acceptVMM() else { return }
            attachment.withLock { $0 = vmm }
            attached.open()
            try watch(vmm)
        } catch {
            failures.fail(.peerLost, "VMM: \(error)")
        }
    }

    /// Accepts connections until one from the allowed uid attaches; refuses others.
    private func acceptVMM() throws -> VMMAttachment? {
        while failures.error == nil {
            let connection: UnixConnection
            do {
                connection = try listener.accept()
            } catch {
                if failures.error != nil { return nil }
                throw error
            }
            let credentials = try connection.peerCredentials()
            let channel = VMMChannel(connection)
            guard credentials.uid == allowedUID else {
                let reason = "VMM socket peer uid \(credentials.uid) is not the allowed uid \(allowedUID)"
                logger.warning("refused VMM connection: \(reason)", metadata: ["peer": "\(credentials)"])
                try? channel.send(.error(code: .unexpectedMessage, message: reason))
                continue
            }
            return try attach(channel, credentials)
        }
        return nil
    }

    private func attach(_ channel: VMMChannel, _ credentials: PeerCredentials) throws -> VMMAttachment {
        let geometry = memory.geometry
        try channel.send(.vmmOffer(regionSize: geometry.regionSize, pageSize: geometry.pageSize, fileOffset: 0),
                         passing: memory.file.fd)
        guard let (message, descriptor) = try channel.receive() else {
            throw MigrationError(.peerLost, "the VMM closed the socket before VMM_ATTACH")
        }
        guard case let .vmmAttach(guestBase, features, registerMode) = message, let descriptor else {
            throw MigrationError(.unexpectedMessage, "expected VMM_ATTACH from the VMM, got \(message)")
        }
        let uffd = Userfaultfd.adopting(fd: descriptor, features: features)
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
        return VMMAttachment(channel: channel, uffd: uffd, guestBase: guestBase, credentials: credentials)
    }

    /// Reads the VMM socket until the VMM acknowledges completion or goes away.
    private func watch(_ vmm: VMMAttachment) throws {
        while true {
            guard let (message, descriptor) = try vmm.channel.receive() else {
                if failures.error == nil {
                    let reason = "the VMM closed its socket before the migration completed"
                    if failures.fail(.peerLost, reason) {
                        logger.event(.connectionLost, .error, "lost the VMM: \(reason)", [
                            "peer": "vmm", "connection": "vmm socket", "reason": "\(reason)",
                        ])
                    }
                }
                return
            }
            if let descriptor { close(descriptor) }
            switch message {
            case .vmmComplete where completeSent.load(ordering: .sequentiallyConsistent):
                completed.open()
                return
            case .heartbeat:
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
