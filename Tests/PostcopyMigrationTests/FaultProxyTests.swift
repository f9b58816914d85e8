import Glibc
import PostcopyOS
import Synchronization
import Testing
import PostcopyCore

/// The fault proxy itself, against an echo server: it must forward bytes
/// unchanged, and each fault must look to a peer exactly as documented,
/// or the failure tests built on it test the wrong thing.
@Suite
struct FaultProxyTests {
    /// Bounds every receive, so a proxy bug fails a test instead of hanging it.
    static let receiveTimeout: UInt64 = 5_000_000_000

    @Test func forwardsBothWaysUnchanged() throws {
        let echo = try EchoServer()
        defer { echo.stop() }
        let proxy = try FaultProxy(to: echo.endpoint)
        defer { proxy.stop() }
        let client = try Self.connect(proxy)
        let pattern = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 11) }
        // Sending from another thread: 1 MiB in flight both ways is more
        // than the sockets buffer, so one thread alone would deadlock.
        let sender = try Background("proxy-test-send") { try client.send(pattern) }
        let echoed = try Self.receive(pattern.count, from: client)
        _ = try sender.wait(seconds: 10, "the sender").get()
        #expect(echoed == pattern)
        #expect(proxy.bytesForwarded == 2 << 20)
        #expect(proxy.openPairs == 1)
        #expect(proxy.injected == 0)
    }

    @Test func resetGivesECONNRESETAndNewConnectionsWork() throws {
        try Self.throughProxy { proxy, client in
            #expect(proxy.inject(.reset) == 1)
            #expect(Self.receiveError(client)?.rawValue == ECONNRESET)
            try Self.roundTrip(try Self.connect(proxy))
            #expect(proxy.injectedFaults == [.reset])
        }
    }

    @Test func dropGivesEndOfStream() throws {
        try Self.throughProxy { proxy, client in
            #expect(proxy.inject(.drop) == 1)
            #expect(try Self.receiveOne(client) == 0)
            try Self.roundTrip(try Self.connect(proxy))
            #expect(proxy.injectedFaults == [.drop])
        }
    }

    @Test func stallKeepsTheConnectionOpenButSilent() throws {
        try Self.throughProxy { proxy, client in
            #expect(proxy.inject(.stall) == 1)
            #expect(proxy.openPairs == 0)

            try client.send(Array("anyone there?".utf8))
            try client.setReceiveTimeout(200_000_000)
            #expect(Self.receiveError(client) == .again)
            // Not closed: no FIN, no RST, nothing to read.
            var waiter = pollfd(fd: client.fd, events: Int16(POLLIN), revents: 0)
            #expect(poll(&waiter, 1, 0) == 0)

            try Self.roundTrip(try Self.connect(proxy))
            #expect(proxy.injectedFaults == [.stall])

            // stop() closes the stalled sockets too.
            proxy.stop()
            try client.setReceiveTimeout(Self.receiveTimeout)
            do throws(SystemCallError) {
                let received = try Self.receiveOne(client)
                #expect(received == 0)
            } catch {
                #expect(error.errno.rawValue == ECONNRESET)
            }
        }
    }

    @Test func randomFaultsStopAfterMaxFaults() throws {
        let faults = try Self.runRandomFaults(seed: 42)
        #expect(faults.count == 3)
    }

    @Test func randomFaultsReplayFromTheSeed() throws {
        let first = try Self.runRandomFaults(seed: 7)
        let second = try Self.runRandomFaults(seed: 7)
        #expect(first == second)
    }

    /// A peer that sends and never reads fills the proxy's buffers; stop()
    /// must still end every thread at once.
    @Test func stopDoesNotWaitForAStuckPeer() throws {
        let echo = try EchoServer()
        defer { echo.stop() }
        let proxy = try FaultProxy(to: echo.endpoint)
        let client = try Self.connect(proxy)
        try Self.setSendTimeout(client, 200_000_000)
        let block = [UInt8](repeating: 0xA5, count: 1 << 20)
        // Until the buffers are full and send times out.
        for _ in 0..<64 {
            guard (try? client.send(block)) != nil else { break }
        }
        #expect(proxy.openPairs == 1)
        let stopping = try Background("proxy-test-stop") { proxy.stop() }
        _ = stopping.wait(seconds: 10, "FaultProxy.stop()")
        #expect(proxy.openPairs == 0)
    }

    // MARK: helpers

    /// Runs `body` with a proxy in front of an echo server and a client that
    /// has already made one round trip through it; stops both afterwards.
    static func throughProxy(_ body: (FaultProxy, TCPConnection) throws -> Void) throws {
        let echo = try EchoServer()
        defer { echo.stop() }
        let proxy = try FaultProxy(to: echo.endpoint)
        defer { proxy.stop() }
        let client = try connect(proxy)
        try roundTrip(client)
        try body(proxy, client)
    }

    /// A client that reconnects after every failure until the proxy has
    /// injected `maxFaults`; the faults injected, in order.
    static func runRandomFaults(seed: UInt64, maxFaults: Int = 3) throws -> [FaultProxy.Fault] {
        let echo = try EchoServer()
        defer { echo.stop() }
        let proxy = try FaultProxy(to: echo.endpoint)
        defer { proxy.stop() }
        proxy.startRandomFaults(seed: seed, bytesRange: 20_000...200_000, maxFaults: maxFaults)
        let deadline = monotonicNanoseconds() + 30_000_000_000
        var failures = 0
        while proxy.injected < maxFaults {
            guard monotonicNanoseconds() < deadline else { throw TestFailure("random faults: \(proxy.injected) in 30 s") }
            let client = try connect(proxy)
            try client.setReceiveTimeout(300_000_000)
            try setSendTimeout(client, 300_000_000)
            do {
                while true { try roundTrip(client, size: 16 * 1024) }
            } catch {
                failures += 1
            }
        }
        #expect(failures == maxFaults)
        // The mode is over: a long exchange goes through untouched.
        try roundTrip(try connect(proxy), size: 1 << 20)
        #expect(proxy.injected == maxFaults)
        let faults = proxy.injectedFaults
        #expect(faults.count == maxFaults)
        return faults
    }

    static func connect(_ proxy: FaultProxy) throws -> TCPConnection {
        let client = try TCPConnection.connect(to: proxy.endpoint)
        try client.setReceiveTimeout(receiveTimeout)
        try setSendTimeout(client, receiveTimeout)
        guard proxy.waitForPairs(1, timeoutNanos: receiveTimeout) else { throw TestFailure("the proxy paired nothing") }
        return client
    }

    static func setSendTimeout(_ connection: TCPConnection, _ nanoseconds: UInt64) throws {
        var timeout = timeval(tv_sec: Int(nanoseconds / 1_000_000_000), tv_usec: Int(nanoseconds % 1_000_000_000 / 1000))
        guard setsockopt(connection.fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size)) == 0 else {
            throw TestFailure("SO_SNDTIMEO: errno \(errno)")
        }
    }

    /// Exactly `count` bytes; end of stream is an error.
    static func receive(_ count: Int, from connection: TCPConnection) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var offset = 0
        while offset < count {
            let received = try bytes.withUnsafeMutableBytes {
                try connection.receive(into: UnsafeMutableRawBufferPointer(rebasing: $0[offset...]))
            }
            guard received > 0 else { throw TestFailure("end of stream after \(offset) of \(count) bytes") }
            offset += received
        }
        return bytes
    }

    /// Sends `size` bytes and checks they come back.
    static func roundTrip(_ connection: TCPConnection, size: Int = 100) throws {
        let message = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try connection.send(message)
        guard try receive(size, from: connection) == message else { throw TestFailure("echo differs") }
    }

    /// One receive of up to one byte: 0 at end of stream.
    static func receiveOne(_ connection: TCPConnection) throws(SystemCallError) -> Int {
        var byte: UInt8 = 0
        return try withUnsafeMutableBytes(of: &byte) { (bytes) throws(SystemCallError) in try connection.receive(into: bytes) }
    }

    /// The errno of the next receive; nil (and an issue) when it succeeds.
    static func receiveError(_ connection: TCPConnection) -> Errno? {
        do {
            let count = try receiveOne(connection)
            Issue.record("receive returned \(count) instead of failing")
            return nil
        } catch {
            return error.errno
        }
    }
}

/// A target that sends back every byte it receives: one thread per
/// connection, all woken and joined by `stop()`.
final class EchoServer: Sendable {
    /// What the accept thread shares with `stop()`. The thread holds this,
    /// never the server, so the server's deinit can stop it.
    private final class Connections: Sendable {
        let state = Locked<(open: [TCPConnection], threads: [OSThread], stopped: Bool)>(([], [], false))
    }

    private let listener: TCPListener
    private let connections = Connections()
    private let acceptor: OSThread

    var endpoint: SocketEndpoint { listener.endpoint }

    init() throws {
        let listener = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0), backlog: 64)
        let connections = self.connections
        self.listener = listener
        acceptor = try OSThread.start(name: "echo-accept") {
            // A listener shut down by stop() fails accept with EINVAL.
            while let connection = try? listener.accept() {
                connections.state.withLock { state in
                    guard !state.stopped else { return connection.shutdown() }
                    state.open.append(connection)
                    if let thread = try? OSThread.start(name: "echo", { EchoServer.echo(connection) }) {
                        state.threads.append(thread)
                    }
                }
            }
        }
    }

    deinit { stop() }

    private static func echo(_ connection: TCPConnection) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
        defer { buffer.deallocate() }
        while let count = try? connection.receive(into: buffer), count > 0 {
            guard (try? connection.send(UnsafeRawBufferPointer(rebasing: buffer[..<count]))) != nil else { return }
        }
    }

    /// Wakes every thread (shutdown fails a blocked receive or send) and
    /// joins them. Idempotent.
    func stop() {
        let threads: [OSThread]? = connections.state.withLock { state in
            guard !state.stopped else { return nil }
            state.stopped = true
            state.open.forEach { $0.shutdown() }
            return state.threads
        }
        guard let threads else { return }
        _ = Glibc.shutdown(listener.fd, Int32(SHUT_RDWR))
        acceptor.join()
        threads.forEach { $0.join() }
        connections.state.withLock { $0.open = [] }
    }
}
