import Glibc
import Logging
import PostcopyCore
import PostcopyOS
import Synchronization

public struct GuestConfig: Sendable {
    /// postcopyd's VMM socket.
    public var socketPath: String
    /// Workload threads (vCPUs) reading guest RAM after resume.
    public var threads = 4
    /// Seed of the random order in which pages are read.
    public var seed: UInt64 = 1
    /// Write a marker into each page after reading it, and check at the end
    /// that every marker survived (no late page overwrote a guest write).
    public var scribble = true
    /// Share of the pages the threads read (0…1); the rest are only hashed
    /// after postcopy, for the digest.
    public var touchShare = 1.0
    /// Write every first touch (`thread,t_us,page,stall_us`) to this file.
    public var touchLogPath: String?

    public init(socketPath: String) { self.socketPath = socketPath }
}

/// The reference VMM on the destination, and the example of how a VMM
/// integrates with postcopyd: it maps the RAM file postcopyd offers,
/// registers its mapping with a userfaultfd of its own (MINOR and MISSING),
/// hands the userfaultfd over, and runs its "guest" once told to resume:
/// threads that read every page in a random order, timing each first
/// touch, and check the image against the source's digest.
public final class GuestVMM: Sendable {
    public let config: GuestConfig
    private let logger: Logger

    public init(config: GuestConfig, logger: Logger) {
        self.config = config
        self.logger = logger
    }

    /// Attaches to postcopyd; `attached` runs once VMM_ATTACH is sent.
    public func run(attached: () -> Void = {}) throws -> GuestSummary {
        let channel = VMMChannel(try inStep("connect to postcopyd's VMM socket \(config.socketPath)") {
            try UnixConnection.connect(path: config.socketPath)
        })
        let (mapping, geometry, uffd) = try attach(channel)
        attached()
        let digest = try awaitResume(channel)
        logger.info("resumed: running the guest workload", metadata: ["threads": "\(config.threads)"])

        let workload = try GuestWorkload(mapping: mapping, geometry: geometry, threads: config.threads,
                                         seed: config.seed, scribble: config.scribble, touchShare: config.touchShare,
                                         recordTimes: config.touchLogPath != nil)
        var failure: (any Error)?
        do {
            try awaitComplete(channel)
            try inStep("unregister the guest range") { try uffd.release(start: mapping.address, length: mapping.length) }
            try channel.send(.vmmComplete)
        } catch {
            // Releasing the range wakes any thread blocked on a fault, so
            // the workload ends (reading whatever is there) and nothing hangs.
            failure = error
            try? uffd.release(start: mapping.address, length: mapping.length)
        }
        var summary = workload.finish()
        if let failure { throw failure }
        if let path = config.touchLogPath {
            try inStep("write the touch log \(path)") { try writeTextFile(path, workload.touchLog()) }
        }
        summary.expectedDigest = digest.description
        summary.verified = summary.actualDigest == summary.expectedDigest && summary.scribblesLost == 0
        return summary
    }

    private func attach(_ channel: VMMChannel) throws -> (Mapping, PageGeometry, Userfaultfd) {
        guard let (offer, descriptor) = try channel.receive() else {
            throw MigrationError(.peerLost, "postcopyd closed the VMM socket before VMM_OFFER")
        }
        if case let .error(code, text) = offer { throw MigrationError(code, "postcopyd refused the VMM (\(code)): \(text)") }
        guard case let .vmmOffer(regionSize, pageSize, fileOffset) = offer, let descriptor else {
            throw MigrationError(.unexpectedMessage, "expected VMM_OFFER from postcopyd, got \(offer.type)")
        }
        defer { close(descriptor) }
        let geometry = try inStep("guest RAM geometry") { try PageGeometry(regionSize: regionSize, pageSize: pageSize) }
        let kind: MemoryKind = pageSize == .small ? .shmem : .hugetlbfs
        let mapping = try Mapping(descriptor: descriptor, geometry: geometry, fileOffset: fileOffset,
                                  onHugetlbfs: kind == .hugetlbfs, purpose: "guest RAM")
        let uffd = try inStep("open a userfaultfd for \(kind) minor faults") {
            try Userfaultfd.open(enabling: kind.requiredFeatures)
        }
        let mode: RegisterMode = [.minor, .missing]
        let ioctls = try inStep("register guest RAM (MINOR|MISSING)") {
            try uffd.register(start: mapping.address, length: mapping.length, mode: mode)
        }
        guard ioctls.contains(.continue) else {
            throw MigrationError(.incompatible, "the kernel does not offer UFFDIO_CONTINUE on the registered guest range")
        }
        try channel.send(.vmmAttach(guestBase: mapping.address, features: uffd.features, registerMode: mode.rawValue),
                         passing: uffd.fd)
        logger.info("attached to postcopyd", metadata: ["region": "\(geometry)"])
        return (mapping, geometry, uffd)
    }

    private func awaitResume(_ channel: VMMChannel) throws -> ImageDigest {
        switch try next(on: channel, "before VMM_RESUME") {
        case let .vmmResume(digest): return digest
        case let other: throw MigrationError(.unexpectedMessage, "expected VMM_RESUME from postcopyd, got \(other.type)")
        }
    }

    private func awaitComplete(_ channel: VMMChannel) throws {
        switch try next(on: channel, "during postcopy") {
        case .vmmComplete: return
        case let other: throw MigrationError(.unexpectedMessage, "expected VMM_COMPLETE from postcopyd, got \(other.type)")
        }
    }

    /// The next message from postcopyd other than HEARTBEAT, which must be
    /// neither ERROR nor the end of the socket; `when` names what the VMM
    /// was waiting for, for errors.
    private func next(on channel: VMMChannel, _ when: String) throws -> Message {
        while true {
            guard let (message, descriptor) = try channel.receive() else {
                throw MigrationError(.peerLost, "postcopyd closed the VMM socket \(when)")
            }
            if let descriptor { close(descriptor) }
            switch message {
            case .heartbeat: continue
            case let .error(code, text): throw MigrationError(code, "postcopyd failed \(when) (\(code)): \(text)")
            default: return message
            }
        }
    }
}
