import Glibc
import PostcopyCore
import PostcopyOS
import Synchronization

/// A TCP proxy on loopback that breaks the connections through it on
/// purpose, so that tests can watch an agent and a daemon meet the failures
/// a real network produces — a reset, a clean close, a peer that hangs — at
/// a moment the test chooses, or at random points replayable from a seed.
///
/// Each accepted client is paired with a new connection to the target, and
/// two threads ("pumps") copy bytes, one per direction. Two rules keep
/// injection race-free:
/// - Pumps wait in `poll` on their socket and on the pair's wake-up eventfd,
///   and send without blocking while holding the proxy's lock, so a fault is
///   atomic with respect to forwarding: once `inject` has returned, no byte
///   goes out on a broken pair, not even one a pump had already received.
/// - A pair's descriptors are closed only by the last of its pumps to leave
///   (or by `stop()` for a stalled pair), so no thread can touch a
///   descriptor number the kernel has since given to a new socket.
final class FaultProxy: Sendable {
    enum Fault: String, Sendable, CaseIterable {
        /// Both peers get a TCP RST: a crashed host, a middlebox forgetting
        /// the flow.
        case reset
        /// Both peers get a FIN: a process that closed its end cleanly.
        case drop
        /// Nothing more is forwarded and nothing is closed: a peer that stops
        /// answering. Keepalive does not notice (the proxy's kernel still
        /// acknowledges), only an application timeout does.
        case stall
    }

    /// Where clients connect instead of the target.
    let endpoint: SocketEndpoint
    private let core: Core
    private let listener: TCPListener
    private let acceptor: OSThread

    /// Listens on 127.0.0.1 (a port the kernel picks) and forwards every
    /// connection to `target`, which must be a numeric address.
    init(to target: SocketEndpoint) throws {
        let address = try Target(target)
        let listener = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0))
        let core = try Core()
        self.listener = listener
        self.core = core
        endpoint = listener.endpoint
        acceptor = try OSThread.start(name: "proxy-accept") { core.acceptLoop(listener, target: address) }
    }

    /// Threads hold the core, not the proxy, so dropping the proxy stops it.
    deinit { stop() }

    /// Breaks every connection currently forwarding, as `fault` says, and
    /// returns how many pairs it broke; counts one injected failure when
    /// that is more than zero. The sockets are closed (reset, drop) by the
    /// pumps as they leave, within microseconds; stalled ones stay open
    /// until `stop()`, detached, so new connections work normally.
    @discardableResult
    func inject(_ fault: Fault) -> Int {
        core.state.withLock { $0.stopping ? 0 : $0.inject(fault) }
    }

    /// Breaks connections at random points: after a number of bytes
    /// forwarded (uniform in `bytesRange`, counted over all pairs and both
    /// directions since the last injection) injects a fault drawn from
    /// `faults`, until `stopRandomFaults()` or `maxFaults` injected by this
    /// mode. The thresholds and faults are a function of `seed` alone, and a
    /// send is cut at the threshold, so with one connection at a time the
    /// byte at which each fault lands is too.
    func startRandomFaults(seed: UInt64, bytesRange: ClosedRange<UInt64>, faults: [Fault] = Fault.allCases,
                           maxFaults: Int) {
        precondition(!faults.isEmpty, "random faults need at least one kind of fault")
        core.state.withLock { state in
            guard !state.stopping, maxFaults > 0 else { return }
            state.random = RandomFaults(seed: seed, bytesRange: bytesRange, faults: faults, maxFaults: maxFaults)
        }
    }

    func stopRandomFaults() {
        core.state.withLock { $0.random = nil }
    }

    /// Failures injected so far.
    var injected: Int { core.state.withLock { $0.faults.count } }
    /// The failures injected so far, in order.
    var injectedFaults: [Fault] { core.state.withLock { $0.faults } }
    /// Bytes sent on, both directions, all pairs.
    var bytesForwarded: UInt64 { core.state.withLock { $0.bytesForwarded } }
    /// Pairs currently forwarding (at least one direction).
    var openPairs: Int { core.state.withLock { $0.openPairs } }

    /// Waits until at least `count` pairs are forwarding; false on timeout.
    func waitForPairs(_ count: Int, timeoutNanos: UInt64) -> Bool {
        let deadline = monotonicNanoseconds() + timeoutNanos
        while openPairs < count {
            guard monotonicNanoseconds() < deadline else { return false }
            sleepNanoseconds(1_000_000)
        }
        return true
    }

    /// Stops accepting, closes every socket (stalled ones too) and joins
    /// every thread. Never waits on a peer: every thread of the proxy blocks
    /// only in `poll` with a wake-up descriptor. Idempotent; a second caller
    /// waits for the first to finish.
    func stop() {
        guard core.beginStopping() else {
            core.stopped.wait()
            return
        }
        core.stopSignal.signal()
        _ = Glibc.shutdown(listener.fd, Int32(SHUT_RDWR))
        acceptor.join()
        for thread in core.haltAll() { thread.join() }
        core.closeStalled()
        core.stopped.open()
    }
}

// MARK: - Pairs and their table

extension FaultProxy {
    /// A client connection and its connection to the target: two raw
    /// descriptors, owned here and closed only by `close`.
    private final class Pair: Sendable {
        let id: Int
        let client: Int32
        let target: Int32
        /// Readable once the pair stops forwarding; never read, so it stays
        /// readable and wakes both pumps whenever they next poll.
        let wake: EventSignal

        init(id: Int, client: Int32, target: Int32, wake: EventSignal) {
            self.id = id
            self.client = client
            self.target = target
            self.wake = wake
        }

        /// Closes both sockets, after both pumps have left. A reset is a
        /// close with a zero linger time, which the kernel turns into RST
        /// instead of FIN; a clean close shuts down first so the peer gets
        /// its FIN even if unread data would otherwise make the close a RST.
        func close(resetting: Bool) {
            for fd in [client, target] {
                if resetting {
                    var option = Glibc.linger(l_onoff: 1, l_linger: 0)
                    _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &option, socklen_t(MemoryLayout<Glibc.linger>.size))
                } else {
                    _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
                }
                _ = Glibc.close(fd)
            }
        }
    }

    private enum PairState: Equatable {
        case forwarding
        case broken(Fault)
        /// An error on one side, or `stop()`: closed cleanly.
        case closing
    }

    private struct Record {
        let pair: Pair
        var state = PairState.forwarding
        var livePumps = 2
        var threads: [OSThread] = []
    }

    /// Everything the threads share, under one lock.
    private struct State {
        var records: [Int: Record] = [:]
        var nextPairID = 0
        /// Stalled pairs, kept open until `stop()`.
        var stalled: [Pair] = []
        /// Pump threads that have ended (or are about to), waiting to be joined.
        var finished: [OSThread] = []
        var faults: [Fault] = []
        var bytesForwarded: UInt64 = 0
        var random: RandomFaults?
        var stopping = false

        var openPairs: Int { records.values.count(where: { $0.state == .forwarding }) }

        /// Marks every forwarding pair broken and wakes its pumps; the last
        /// pump of each carries the fault out onto the sockets.
        mutating func inject(_ fault: Fault) -> Int {
            var broken = 0
            for (id, record) in records where record.state == .forwarding {
                records[id]!.state = .broken(fault)
                record.pair.wake.signal()
                broken += 1
            }
            if broken > 0 {
                faults.append(fault)
                random?.bytesSinceFault = 0
            }
            return broken
        }

        /// Injects the fault random mode draws next, and ends the mode after
        /// its last one.
        mutating func injectRandomFault() {
            guard var plan = random else { return }
            random = nil
            if inject(plan.nextFault()) > 0 { plan.faultInjected() }
            random = plan.isFinished ? nil : plan
        }

        mutating func countForwarded(_ count: UInt64) {
            bytesForwarded += count
            guard random != nil else { return }
            random!.bytesSinceFault += count
            if random!.budget == 0 { injectRandomFault() }
        }
    }

    /// When random mode breaks the next connection, and how.
    private struct RandomFaults {
        private var generator: SplitMix64
        private let bytesRange: ClosedRange<UInt64>
        private let faults: [Fault]
        private var remaining: Int
        private var threshold: UInt64
        var bytesSinceFault: UInt64 = 0

        init(seed: UInt64, bytesRange: ClosedRange<UInt64>, faults: [Fault], maxFaults: Int) {
            generator = SplitMix64(seed: seed)
            self.bytesRange = bytesRange
            self.faults = faults
            remaining = maxFaults
            threshold = 0
            threshold = drawThreshold()
        }

        /// Bytes that may still be forwarded before the next fault.
        var budget: UInt64 { threshold > bytesSinceFault ? threshold - bytesSinceFault : 0 }
        var isFinished: Bool { remaining <= 0 }

        mutating func nextFault() -> Fault { faults[Int(generator.next() % UInt64(faults.count))] }

        mutating func faultInjected() {
            remaining -= 1
            bytesSinceFault = 0
            threshold = drawThreshold()
        }

        /// Our own reduction rather than `UInt64.random(in:using:)`, whose
        /// algorithm the standard library does not promise to keep: a seed
        /// must replay the same run on every toolchain.
        private mutating func drawThreshold() -> UInt64 {
            let span = bytesRange.upperBound - bytesRange.lowerBound
            let value = generator.next()
            return bytesRange.lowerBound + (span == .max ? value : value % (span + 1))
        }
    }
}

// MARK: - Threads

extension FaultProxy {
    /// The target, its address checked once so that a bad one fails `init`
    /// rather than every connection.
    private struct Target: Sendable {
        let endpoint: SocketEndpoint
        let family: Int32

        init(_ endpoint: SocketEndpoint) throws {
            self.endpoint = endpoint
            do {
                family = try endpoint.withSockaddr { _, _, family in family }
            } catch {
                throw TestFailure("fault proxy target \(endpoint) is not a numeric address")
            }
        }

        /// Starts a non-blocking connect of `fd`: 0, or -1 and errno.
        func connect(_ fd: Int32) -> Int32 {
            (try? endpoint.withSockaddr { address, length, _ in Glibc.connect(fd, address, length) }) ?? -1
        }
    }

    /// How a pump's copying ended.
    private enum PumpEnd { case endOfStream, failed, halted }

    /// What one locked send did.
    private enum SendOutcome { case sent(Int), wouldBlock, halted, failed }

    /// The proxy's threads and the state they share. They hold this rather
    /// than the proxy, so that the proxy's deinit can stop them.
    private final class Core: Sendable {
        let state = Locked(State())
        /// Wakes the accept thread, in `poll` or in a connect to the target.
        let stopSignal: EventSignal
        let stopped = Latch()

        init() throws {
            stopSignal = try EventSignal()
        }

        /// Waits until `fd` is ready for `events` or `wake` is readable;
        /// false when woken. An error or hang-up on `fd` counts as ready:
        /// the next recv or send reports it.
        static func wait(_ fd: Int32, _ events: Int32, orWake wake: Int32) -> Bool {
            var fds = [pollfd(fd: fd, events: Int16(events), revents: 0),
                       pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
            while poll(&fds, 2, -1) < 0 {
                if errno != EINTR { return false }
            }
            return fds[1].revents == 0
        }

        func acceptLoop(_ listener: TCPListener, target: Target) {
            while Core.wait(listener.fd, POLLIN, orWake: stopSignal.fd) {
                // The pair owns raw descriptors, closed when its pumps say so;
                // a close-on-exec duplicate takes the socket over from the
                // TCPConnection, whose deinit closes only the original.
                let client: Int32
                do {
                    let connection = try listener.accept()
                    client = withExtendedLifetime(connection) { fcntl(connection.fd, F_DUPFD_CLOEXEC, 0) }
                } catch {
                    // Only shortage (EMFILE, ENOBUFS) repeats; do not spin on it.
                    if error.errno != .interrupted && error.errno.rawValue != ECONNABORTED { sleepNanoseconds(1_000_000) }
                    continue
                }
                guard client >= 0 else { continue }
                joinFinished()
                guard let server = connect(to: target) else {
                    Glibc.close(client)
                    continue
                }
                adopt(client: client, target: server)
            }
        }

        /// A connection to the target. The connect runs non-blocking and is
        /// waited for alongside the stop signal, so a target whose backlog is
        /// full cannot hold up `stop()`. Nil when refused, failed or stopped.
        private func connect(to target: Target) -> Int32? {
            let flags = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue)
            let fd = socket(target.family, flags, 0)
            guard fd >= 0 else { return nil }
            if target.connect(fd) < 0 {
                var error: Int32 = 0
                var length = socklen_t(MemoryLayout<Int32>.size)
                guard errno == EINPROGRESS || errno == EINTR, Core.wait(fd, POLLOUT, orWake: stopSignal.fd),
                      getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0, error == 0 else {
                    Glibc.close(fd)
                    return nil
                }
            }
            return fd
        }

        /// Joins pumps that have ended, so a long test does not pile up threads.
        private func joinFinished() {
            let finished = state.withLock { state in
                defer { state.finished = [] }
                return state.finished
            }
            for thread in finished { thread.join() }
        }

        /// Makes a pair of the two sockets and starts its pumps. The lock is
        /// held while they start, so their record is complete before either
        /// can look at it.
        private func adopt(client: Int32, target: Int32) {
            // Without Nagle: the protocol's small urgent messages must not
            // wait on a delayed ACK inside the proxy.
            var one: Int32 = 1
            for fd in [client, target] {
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            guard let wake = try? EventSignal() else {
                for fd in [client, target] { Glibc.close(fd) }
                return
            }
            let orphan: Pair? = state.withLock { state in
                let pair = Pair(id: state.nextPairID, client: client, target: target, wake: wake)
                state.nextPairID += 1
                guard !state.stopping else { return pair }
                var record = Record(pair: pair)
                for (from, to, name) in [(client, target, "proxy-up"), (target, client, "proxy-down")] {
                    do {
                        record.threads.append(try OSThread.start(name: name) { self.pump(pair, from: from, to: to) })
                    } catch {
                        record.livePumps -= 1
                        record.state = .closing
                        wake.signal()
                    }
                }
                guard record.livePumps > 0 else { return pair }
                state.records[pair.id] = record
                return nil
            }
            orphan?.close(resetting: false)
        }

        /// One direction of a pair, on its own thread.
        private func pump(_ pair: Pair, from: Int32, to: Int32) {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
            defer { buffer.deallocate() }
            pumpEnded(pair, to: to, copy(pair, from: from, to: to, buffer: buffer))
        }

        private func copy(_ pair: Pair, from: Int32, to: Int32, buffer: UnsafeMutableRawBufferPointer) -> PumpEnd {
            while true {
                guard Core.wait(from, POLLIN, orWake: pair.wake.fd) else { return .halted }
                let received = recv(from, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT))
                if received == 0 { return .endOfStream }
                if received < 0 {
                    if errno == EAGAIN || errno == EINTR { continue }
                    return .failed
                }
                var offset = 0
                while offset < received {
                    guard Core.wait(to, POLLOUT, orWake: pair.wake.fd) else { return .halted }
                    switch forward(pair, to: to, UnsafeRawBufferPointer(rebasing: buffer[offset..<received])) {
                    case let .sent(count): offset += count
                    case .wouldBlock: continue
                    case .halted: return .halted
                    case .failed: return .failed
                    }
                }
            }
        }

        /// Sends what it can of `bytes` without blocking, under the lock, so
        /// that it cannot interleave with an injection; cuts the send at
        /// random mode's threshold and injects there.
        private func forward(_ pair: Pair, to fd: Int32, _ bytes: UnsafeRawBufferPointer) -> SendOutcome {
            state.withLock { state in
                guard state.records[pair.id]?.state == .forwarding else { return .halted }
                let budget = state.random?.budget ?? .max
                guard budget > 0 else {
                    state.injectRandomFault()
                    return .halted
                }
                let length = Int(min(UInt64(bytes.count), budget))
                let sent = send(fd, bytes.baseAddress, length, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL))
                if sent < 0 { return errno == EAGAIN || errno == EINTR ? .wouldBlock : .failed }
                state.countForwarded(UInt64(sent))
                return .sent(sent)
            }
        }

        /// Propagates how a pump ended: end of stream half-closes the other
        /// side (a clean close from one peer reaches the other), an error
        /// closes the pair. The last pump out closes the sockets, or parks a
        /// stalled pair for `stop()`.
        private func pumpEnded(_ pair: Pair, to: Int32, _ end: PumpEnd) {
            let resetting: Bool? = state.withLock { state in
                guard var record = state.records[pair.id] else { return nil }
                if record.state == .forwarding {
                    if end == .endOfStream {
                        _ = Glibc.shutdown(to, Int32(SHUT_WR))
                    } else {
                        record.state = .closing
                        pair.wake.signal()
                    }
                }
                record.livePumps -= 1
                guard record.livePumps == 0 else {
                    state.records[pair.id] = record
                    return nil
                }
                state.records[pair.id] = nil
                state.finished += record.threads
                if record.state == .broken(.stall) {
                    state.stalled.append(pair)
                    return nil
                }
                return record.state == .broken(.reset)
            }
            if let resetting { pair.close(resetting: resetting) }
        }

        // MARK: stop

        /// Refuses new pairs and faults; true for the first caller only.
        func beginStopping() -> Bool {
            state.withLock { state in
                defer { state.stopping = true }
                state.random = nil
                return !state.stopping
            }
        }

        /// Wakes every pump, and returns every pump thread not yet joined.
        func haltAll() -> [OSThread] {
            state.withLock { state in
                var threads = state.finished
                state.finished = []
                for (id, record) in state.records {
                    if record.state == .forwarding { state.records[id]!.state = .closing }
                    record.pair.wake.signal()
                    threads += record.threads
                }
                return threads
            }
        }

        /// Closes the stalled pairs, once no pump is left.
        func closeStalled() {
            let stalled = state.withLock { state in
                state.finished = []
                defer { state.stalled = [] }
                return state.stalled
            }
            for pair in stalled { pair.close(resetting: false) }
        }
    }
}
