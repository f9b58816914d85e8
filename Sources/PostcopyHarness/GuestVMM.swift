import Glibc
import Logging
import PostcopyCore
import PostcopyMigration
import PostcopyOS
import Synchronization

/// What a VMM that gave up on an incomplete guest keeps until the process
/// ends: guest RAM, its userfaultfd and the workload's threads blocked on
/// it, each retained once more and its address kept here. Reachable from
/// a global, they are kept on purpose, not leaked (and LeakSanitizer,
/// which scans globals for addresses, sees them so).
private let keptUntilExit = Mutex<[UInt]>([])

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
    /// How long each thread works (sleeps) after a touch before the next.
    public var thinkNanos: UInt64 = 0
    /// Write every first touch (`thread,t_us,page,stall_us`) to this file.
    public var touchLogPath: String?
    /// When postcopyd is lost during postcopy (it died, or it sent ERROR),
    /// keep the guest's faults waiting and reattach to a restarted
    /// postcopyd for this long, handing back the RAM file, the page-state
    /// record and the userfaultfd. Past it (or at once with 0) `run` throws
    /// without releasing the range: the guest threads stay blocked on the
    /// pages still stale, and a VMM process exiting then takes them with it,
    /// so none ever reads incomplete memory.
    public var reattachTimeoutNanos: UInt64 = 0
    /// Once postcopy is complete and the range released, put shmem guest
    /// RAM back into 2 MiB pages (MADV_COLLAPSE per 2 MiB extent, on a
    /// thread of its own at nice 19: `HugepageCollapser`), and report it.
    public var collapse = true
    /// Time the random-read loop (`RandomReads`) for about this long right
    /// after postcopy, in 4 KiB mappings, and again after the collapse; the
    /// collapse then waits for the first measurement. 0: no loop.
    public var measureReadsNanos: UInt64 = 0

    public init(socketPath: String) { self.socketPath = socketPath }
}

/// The reference VMM on the destination, and the example of how a VMM
/// integrates with postcopyd: it maps the RAM file postcopyd offers,
/// registers its mapping with a userfaultfd of its own (MINOR and MISSING),
/// hands the userfaultfd over, and runs its "guest" once told to resume:
/// threads that read every page in a random order, timing each first
/// touch, and check the image against the source's digest. It keeps the
/// RAM file and the page-state record postcopyd gives it, and hands them
/// back with the userfaultfd to a postcopyd restarted after the first died.
///
/// From VMM_RESUME until VMM_COMPLETE it never releases the guest range
/// (issue 18): whatever happens, a guest thread that touches a stale page
/// waits. ERROR from postcopyd in that window is a lost postcopyd, like its
/// socket closing.
public final class GuestVMM: Sendable {
    public let config: GuestConfig
    private let logger: Logger

    public init(config: GuestConfig, logger: Logger) {
        self.config = config
        self.logger = logger
    }

    /// Attaches to postcopyd; `attached` runs once VMM_ATTACH is sent.
    public func run(attached: () -> Void = {}) throws -> GuestSummary {
        var channel = VMMChannel(try inStep("connect to postcopyd's VMM socket \(config.socketPath)") {
            try UnixConnection.connect(path: config.socketPath)
        }, side: .vmm, opening: .attach)
        let guest = try attach(channel)
        attached()
        try awaitResume(channel, guest)
        logger.info("resumed: running the guest workload", metadata: ["threads": "\(config.threads)"])

        let workload = try GuestWorkload(mapping: guest.mapping, geometry: guest.geometry, threads: config.threads,
                                         seed: config.seed, scribble: config.scribble, touchShare: config.touchShare,
                                         thinkNanos: config.thinkNanos, recordTimes: config.touchLogPath != nil)
        let digest: ImageDigest
        do {
            (channel, digest) = try awaitComplete(channel, guest)
        } catch {
            // Guest RAM is incomplete and no postcopyd serves it: the range
            // stays registered, so the threads blocked on stale pages stay
            // blocked and none reads a page that is not there. Nothing that
            // would let a fault through may go either: closing the
            // userfaultfd wakes its waiters unregistered, and unmapping
            // guest RAM under them crashes them. Both are kept for the life
            // of the process, which the caller ends (postcopy-guest exits 1).
            let kept = [UInt(bitPattern: Unmanaged.passRetained(guest).toOpaque()),
                        UInt(bitPattern: Unmanaged.passRetained(workload).toOpaque())]
            keptUntilExit.withLock { $0.append(contentsOf: kept) }
            throw error
        }
        // Postcopy is complete: every page is in place, so the range may go.
        var failure: (any Error)?
        do {
            try inStep("unregister the guest range") {
                try guest.uffd.release(start: guest.mapping.address, length: guest.mapping.length)
            }
            try channel.send(.complete(imageDigest: nil))
        } catch {
            failure = error
            try? guest.uffd.release(start: guest.mapping.address, length: guest.mapping.length)
        }
        // Released, and only then: huge pages back, while the guest runs on.
        let measuring = config.measureReadsNanos > 0
        var collapse = failure == nil && config.collapse && !measuring ? startCollapse(guest) : nil
        var summary = workload.finish()
        summary.reattachments = guest.reattachments
        if let failure { throw failure }
        if let path = config.touchLogPath {
            try inStep("write the touch log \(path)") { try writeTextFile(path, workload.touchLog()) }
        }
        summary.expectedDigest = digest.description
        summary.verified = summary.actualDigest == summary.expectedDigest && summary.scribblesLost == 0
        let reads = RandomReads(mapping: guest.mapping)
        if measuring {
            logger.info("timing random reads in 4 KiB mappings, for about \(fixed(Double(config.measureReadsNanos) / 1e9, 1)) s")
            summary.randomReadsBeforeCollapse = reads.measure(nanoseconds: config.measureReadsNanos)
            if config.collapse { collapse = startCollapse(guest) }
        }
        summary.hugepages = collapse?.report()
        if let before = summary.randomReadsBeforeCollapse {
            summary.randomReadsAfterCollapse = reads.measure(nanoseconds: config.measureReadsNanos,
                                                             readsPerPass: before.readsPerPass)
        }
        return summary
    }

    /// The collapse of guest RAM into 2 MiB pages, running.
    private final class Collapse: Sendable {
        let result = Mutex<HugepageCollapseReport?>(nil)
        let thread: Mutex<OSThread?> = Mutex(nil)

        /// Waits for the thread and returns its report.
        func report() -> HugepageCollapseReport? {
            thread.withLock { $0 }?.join()
            return result.withLock { $0 }
        }
    }

    /// Starts `HugepageCollapser` on guest RAM; a thread that cannot start
    /// is a collapse skipped, said in the report.
    private func startCollapse(_ guest: Guest) -> Collapse {
        let collapse = Collapse()
        let kind: MemoryKind = guest.geometry.pageSize == .small ? .shmem : .hugetlbfs
        do {
            let thread = try HugepageCollapser.start(guest.mapping, kind: kind) { report in
                collapse.result.withLock { $0 = report }
            }
            collapse.thread.withLock { $0 = thread }
        } catch {
            var report = HugepageCollapseReport()
            report.skipped = "\(error)"
            collapse.result.withLock { $0 = report }
            logger.warning("huge pages: not collapsed: \(error)")
        }
        return collapse
    }

    /// Guest RAM as this VMM holds it, and what it keeps for a restarted
    /// postcopyd.
    private final class Guest {
        let mapping: Mapping
        let geometry: PageGeometry
        let uffd: Userfaultfd
        let mode: RegisterMode
        /// The RAM file VMM_OFFER passed, and the page-state record
        /// VMM_RESUME passed: handed back on a reattachment.
        let ram: Int32
        var pageState: Int32 = -1
        var reattachments = 0

        init(mapping: Mapping, geometry: PageGeometry, uffd: Userfaultfd, mode: RegisterMode, ram: Int32) {
            self.mapping = mapping
            self.geometry = geometry
            self.uffd = uffd
            self.mode = mode
            self.ram = ram
        }

        /// Keeps `descriptor` as the page-state record, closing the one before.
        func keep(pageState descriptor: Int32) {
            if pageState >= 0 { close(pageState) }
            pageState = descriptor
        }

        deinit {
            close(ram)
            if pageState >= 0 { close(pageState) }
        }
    }

    private func attach(_ channel: VMMChannel) throws -> Guest {
        guard let (offer, descriptor) = try channel.receive() else {
            throw MigrationError(.peerLost, "postcopyd closed the VMM socket before VMM_OFFER")
        }
        if case let .error(code, text) = offer { throw MigrationError(code, "postcopyd refused the VMM (\(code)): \(text)") }
        // The conversation admits nothing else first.
        guard case let .offer(regionSize, pageSize, fileOffset) = offer, let descriptor else {
            throw MigrationError(.unexpectedMessage, "expected VMM_OFFER from postcopyd, got \(offer.type)")
        }
        var kept = false
        defer { if !kept { close(descriptor) } }
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
        try channel.send(.attach(guestBase: mapping.address, features: uffd.features, registerMode: mode.rawValue),
                         passing: uffd.fd)
        logger.info("attached to postcopyd", metadata: ["region": "\(geometry)"])
        kept = true
        return Guest(mapping: mapping, geometry: geometry, uffd: uffd, mode: mode, ram: descriptor)
    }

    /// VMM_RESUME, with the page-state record to keep; acknowledged with
    /// VMM_RESUMED before the guest runs, so that a restarted postcopyd
    /// knows this VMM holds it.
    private func awaitResume(_ channel: VMMChannel, _ guest: Guest) throws {
        let (message, descriptor) = try next(on: channel, "before VMM_RESUME")
        guard case .resume = message, let descriptor else {
            if let descriptor { close(descriptor) }
            throw MigrationError(.unexpectedMessage, "expected VMM_RESUME from postcopyd, got \(message.type)")
        }
        guest.keep(pageState: descriptor)
        try channel.send(.resumed)
    }

    /// What the operator must do while no postcopyd serves a guest whose
    /// RAM is incomplete.
    static let incomplete = "guest RAM is incomplete: the guest waits (its faults stay unresolved); restart postcopyd to take it over (postcopyd serve --takeover, or systemctl restart postcopyd@NAME), or stop this VM"

    /// Waits for VMM_COMPLETE; returns the channel it came on and the
    /// source's digest of the image it carried. A postcopyd that goes away
    /// or fails (ERROR, or anything else but VMM_COMPLETE) is a lost
    /// postcopyd: the guest's faults stay blocked while this VMM reattaches
    /// to a restarted one, within `reattachTimeoutNanos`. It throws when
    /// that runs out, and never releases the range.
    private func awaitComplete(_ first: VMMChannel, _ guest: Guest) throws -> (VMMChannel, ImageDigest) {
        var channel = first
        while true {
            let lost: String
            do {
                let (message, descriptor) = try next(on: channel, "during postcopy")
                if let descriptor { close(descriptor) }
                guard case let .complete(digest?) = message else {
                    throw MigrationError(.unexpectedMessage, "expected VMM_COMPLETE with the image digest from postcopyd, got \(message)")
                }
                return (channel, digest)
            } catch let gone as DaemonGone {
                lost = "postcopyd went away during postcopy (\(gone))"
            } catch let error as MigrationError where error.code == .discarded {
                // No postcopyd will take this migration over: the source
                // runs the guest. Its RAM stays registered all the same.
                channel.shutdown()
                throw MigrationError(.discarded, "postcopyd discarded the migration (\(error.reason)); not reattaching: \(Self.givingUp)")
            } catch {
                lost = "\(error)"
            }
            channel.shutdown()
            let seconds = fixed(Double(config.reattachTimeoutNanos) / 1e9, 0)
            logger.error("\(lost); \(Self.incomplete)")
            guard config.reattachTimeoutNanos > 0 else {
                throw MigrationError(.peerLost, "\(lost); not reattaching (--reattach-timeout 0): \(Self.givingUp)")
            }
            logger.warning("reattaching to a restarted postcopyd, for up to \(seconds) s")
            channel = try reattach(guest, lost: lost)
        }
    }

    /// How this VMM gives a guest up without letting it read a page that is
    /// not there.
    static let givingUp = "giving the guest up without releasing guest RAM: its threads stay blocked on the pages still stale and end with this process, so none ever reads incomplete memory"

    /// Hands the RAM file, the page-state record and the userfaultfd back
    /// to a restarted postcopyd, retrying with backoff until one takes them
    /// (it answers VMM_RESUME with the record) or the time is up.
    private func reattach(_ guest: Guest, lost: String) throws -> VMMChannel {
        let deadline = monotonicNanoseconds() + config.reattachTimeoutNanos
        var delay: UInt64 = 50_000_000
        var last = "nothing listened on \(config.socketPath)"
        while monotonicNanoseconds() < deadline {
            do {
                let channel = VMMChannel(try UnixConnection.connect(path: config.socketPath),
                                         side: .vmm, opening: .reattach)
                try channel.send(.handback(.ram), passing: guest.ram)
                try channel.send(.handback(.pageState), passing: guest.pageState)
                try channel.send(.reattach(guestBase: guest.mapping.address, features: guest.uffd.features,
                                           registerMode: guest.mode.rawValue), passing: guest.uffd.fd)
                // VMM_RESUME is all the conversation admits now; a postcopyd
                // serving a new migration offers its RAM instead, which the
                // channel refuses (VMMHandshakeError.reattachToNewMigration).
                let (message, descriptor) = try next(on: channel, "while reattaching")
                guard case .resume = message, let descriptor else {
                    throw MigrationError(.unexpectedMessage, "expected VMM_RESUME from postcopyd, got \(message.type)")
                }
                guest.keep(pageState: descriptor)
                try channel.send(.resumed)
                guest.reattachments += 1
                logger.info("reattached to a restarted postcopyd")
                return channel
            } catch {
                last = "\(error)"
            }
            sleepNanoseconds(delay)
            delay = min(delay * 2, 1_000_000_000)
        }
        throw MigrationError(.peerLost, "\(lost); no restarted postcopyd took the guest over within \(fixed(Double(config.reattachTimeoutNanos) / 1e9, 0)) s (last: \(last)): \(Self.givingUp)")
    }

    /// postcopyd's end of the VMM socket closed or broke without an ERROR:
    /// the daemon died (or was killed), rather than failing the migration.
    /// A socket that broke keeps the error that broke it.
    private struct DaemonGone: ChainedError, CustomStringConvertible {
        let link: String
        let underlying: (any Error)?
        var description: String { ErrorChain(self).description }
    }

    /// The next message from postcopyd other than HEARTBEAT, and the
    /// descriptor it carried (the caller's to close), which must be neither
    /// ERROR nor the end of the socket; `when` names what the VMM was
    /// waiting for, for errors. The socket's end, or a failure to read it,
    /// is `DaemonGone`.
    private func next(on channel: VMMChannel, _ when: String) throws -> (VMMMessage, Int32?) {
        while true {
            let received: (message: VMMMessage, descriptor: Int32?)?
            do {
                received = try channel.receive()
            } catch let error as SystemCallError {
                throw DaemonGone(link: "reading the VMM socket \(when)", underlying: error)
            }
            guard let (message, descriptor) = received else {
                throw DaemonGone(link: "postcopyd closed the VMM socket \(when)", underlying: nil)
            }
            switch message {
            case .heartbeat:
                if let descriptor { close(descriptor) }
                continue
            case let .error(code, text):
                if let descriptor { close(descriptor) }
                throw MigrationError(code, "postcopyd failed \(when) (\(code)): \(text)")
            default:
                return (message, descriptor)
            }
        }
    }
}
