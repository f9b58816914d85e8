import CPostcopy
import Glibc
import PostcopyCore
import Synchronization

/// Decides, for each fault, whether the page can be installed now.
///
/// Called on the fault thread: it must not block, allocate per fault, or log
/// above trace level. A resolver that needs to fetch a page returns
/// `.deferred` and later installs it through the `PageInstaller`.
public protocol FaultResolver: AnyObject, Sendable {
    func decide(_ fault: PageFault) -> FaultDecision
    /// A page the loop was told to install could not be; its thread stays
    /// blocked until something installs the page or the range is unregistered.
    func installFailed(_ fault: PageFault, _ error: InstallError)
    /// A signal the loop polls besides the userfaultfd, for other threads
    /// to hand the fault thread work (pages that were deferred and may now
    /// be installed); nil when there is none.
    var wakeSignal: EventSignal? { get }
    /// `wakeSignal` fired: called on the fault thread, under the same rules
    /// as `decide`.
    func woken()
}

extension FaultResolver {
    public var wakeSignal: EventSignal? { nil }
    public func woken() {}
}

/// What the fault loop has seen. Each counter has a single writer (the fault
/// thread) and is read with relaxed loads from anywhere.
public final class FaultLoopCounters: Sendable {
    public let minorFaults = Atomic<UInt64>(0)
    public let missingFaults = Atomic<UInt64>(0)
    /// Faults at addresses outside the region, which the loop cannot serve.
    public let strayFaults = Atomic<UInt64>(0)
    public let otherEvents = Atomic<UInt64>(0)
    public let reads = Atomic<UInt64>(0)
    public let failedInstalls = Atomic<UInt64>(0)
    /// Times the resolver's `wakeSignal` woke the loop.
    public let wakeUps = Atomic<UInt64>(0)
    /// Turns of the loop, at least one per `FaultLoop.heartbeatNanos` even
    /// when no fault comes: a watchdog that sees it stand still knows the
    /// fault thread is stuck, and with it every guest thread that faults.
    public let heartbeats = Atomic<UInt64>(0)
    public init() {}

    public var faults: UInt64 { minorFaults.load(ordering: .relaxed) + missingFaults.load(ordering: .relaxed) }

    @inline(__always)
    static func bump(_ counter: borrowing Atomic<UInt64>, by amount: UInt64 = 1) {
        counter.store(counter.load(ordering: .relaxed) &+ amount, ordering: .relaxed)
    }
}

/// The fault-resolution loop: a dedicated thread blocked on the userfaultfd
/// (and on an eventfd that asks it to stop, and the resolver's wake-up
/// signal), reading faults in batches and resolving each through a
/// `FaultResolver` and the `PageInstaller`.
///
/// Clean (minor) faults are CONTINUEd; missing faults (holes) are
/// materialized first so that they read as zeros.
public final class FaultLoop: Sendable {
    public let installer: PageInstaller
    public let counters = FaultLoopCounters()
    private let resolver: any FaultResolver
    private let batchSize: Int
    private let thread: StoppableThread
    private let ending = Locked<(any Error)?>(nil)
    private let onFailure: (@Sendable (any Error) -> Void)?
    private let onStray: (@Sendable (UInt64) -> Void)?

    /// `onFailure` runs on the fault thread, once, when the loop ends on its
    /// own (a userfaultfd that errs or hangs up), with the error that ended
    /// it: from then on no fault is served, so the owner must learn of it at
    /// once, not at completion. It must not call `stop()` (that joins the
    /// very thread it runs on).
    /// `onStray` runs on the fault thread with the address of each fault
    /// outside the region, before its thread is woken; it must be quick.
    public init(installer: PageInstaller, resolver: any FaultResolver, batchSize: Int = 64,
                onFailure: (@Sendable (any Error) -> Void)? = nil,
                onStray: (@Sendable (UInt64) -> Void)? = nil) throws {
        self.installer = installer
        self.resolver = resolver
        self.batchSize = batchSize
        self.onStray = onStray
        self.onFailure = onFailure
        thread = try inStep("create the fault loop's stop signal") { try StoppableThread() }
    }

    deinit { stop() }

    /// Starts the fault thread. The thread keeps the loop alive until
    /// `stop()` is called: every start needs a stop.
    public func start() throws {
        let buffer = UffdEventBuffer(capacity: batchSize)
        try thread.start(name: "postcopy-fault") { [self] in run(buffer) }
    }

    /// Asks the fault thread to finish and waits for it. Faults still queued
    /// stay queued; their threads are woken when the range is unregistered.
    public func stop() { thread.stop() }

    /// Why the loop ended on its own, if it did: the `SystemCallError` of
    /// the call that failed, or `UserfaultfdPollFailure`.
    public var failure: (any Error)? { ending.withLock { $0 } }

    /// `failure` as one line.
    public var failureReason: String? { failure.map { "\($0)" } }

    /// The longest the fault thread sleeps without a turn of the loop.
    public static let heartbeatNanos: UInt64 = 500_000_000

    private func run(_ buffer: UffdEventBuffer) {
        let wake = resolver.wakeSignal
        var fds = [pollfd(fd: installer.uffd.fd, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: thread.stopSignal.fd, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wake?.fd ?? -1, events: Int16(POLLIN), revents: 0)]
        let timeoutMs = Int32(Self.heartbeatNanos / 1_000_000)
        while true {
            FaultLoopCounters.bump(counters.heartbeats)
            let ready = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), timeoutMs) }
            if ready == 0 { continue }
            if ready < 0 {
                if errno == EINTR { continue }
                fail(SystemCallError("poll userfaultfd", .current))
                return
            }
            if fds[1].revents != 0 { return }
            // Deferred pages first: their threads have waited longest.
            if let wake, fds[2].revents != 0 {
                wake.drain()
                FaultLoopCounters.bump(counters.wakeUps)
                resolver.woken()
            }
            if fds[0].revents == 0 { continue }
            if fds[0].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 {
                fail(UserfaultfdPollFailure(events: fds[0].revents))
                return
            }
            let count: Int
            do {
                count = try installer.uffd.readEvents(into: buffer)
            } catch {
                fail(error)
                return
            }
            FaultLoopCounters.bump(counters.reads)
            for index in 0..<count {
                handle(buffer.message(index))
            }
        }
    }

    @inline(__always)
    private func handle(_ message: (event: UInt8, flags: UInt64, address: UInt64, threadID: UInt32)) {
        guard message.event == UInt8(CPC_UFFD_EVENT_PAGEFAULT) else {
            FaultLoopCounters.bump(counters.otherEvents)
            return
        }
        guard let page = installer.geometry.page(atAddress: message.address, mappingBase: installer.guestBase) else {
            // Not guest RAM (the VMM registered more than it on this
            // userfaultfd), so not ours to resolve; but its thread must not
            // sleep for good. Woken, it goes on if the range's owner mapped
            // the page, and faults again otherwise.
            FaultLoopCounters.bump(counters.strayFaults)
            onStray?(message.address)
            try? installer.uffd.wake(start: message.address & ~4095, length: 4096)
            return
        }
        let isMinor = message.flags & UInt64(CPC_UFFD_PAGEFAULT_FLAG_MINOR) != 0
        if isMinor {
            FaultLoopCounters.bump(counters.minorFaults)
        } else {
            FaultLoopCounters.bump(counters.missingFaults)
        }
        let fault = PageFault(page: page, address: message.address, kind: isMinor ? .minor : .missing,
                              isWrite: message.flags & UInt64(CPC_UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                              threadID: message.threadID)
        guard resolver.decide(fault) == .install else { return }
        do {
            if isMinor {
                try installer.install(page)
            } else {
                try installer.materializeAndInstall(page)
            }
        } catch {
            FaultLoopCounters.bump(counters.failedInstalls)
            resolver.installFailed(fault, error)
        }
    }

    private func fail(_ error: any Error) {
        ending.withLock { $0 = error }
        onFailure?(error)
    }
}

/// The userfaultfd polled as failed or hung up (POLLERR, POLLHUP or
/// POLLNVAL): it was never enabled (no UFFDIO_API), or it was closed.
public struct UserfaultfdPollFailure: Error, Sendable, CustomStringConvertible {
    /// The `revents` poll gave.
    public let events: Int16

    public var description: String { "userfaultfd reported poll events 0x\(String(events, radix: 16))" }
}
