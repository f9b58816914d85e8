import CPostcopy
import Glibc

/// A host and port, numeric: `127.0.0.1:7410`, `[::1]:7410`.
public struct SocketEndpoint: Hashable, Sendable, CustomStringConvertible {
    public let host: String
    public let port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// Parses `HOST:PORT`, with IPv6 hosts in brackets; nil when malformed.
    public init?(_ text: String) {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { return nil }
        self.init(host: host, port: port)
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    private static func pass<Address, T>(_ address: inout Address, family: Int32,
                                         to body: (UnsafePointer<sockaddr>, socklen_t, Int32) throws -> T) rethrows -> T {
        try withUnsafePointer(to: &address) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                try body($0, socklen_t(MemoryLayout<Address>.size), family)
            }
        }
    }

    /// The socket address for a numeric host (no name resolution: the
    /// daemon must not block on DNS), lent to `body` with its length and
    /// address family.
    public func withSockaddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t, Int32) throws -> T) throws -> T {
        var v4 = sockaddr_in()
        if inet_pton(AF_INET, host, &v4.sin_addr) == 1 {
            v4.sin_family = sa_family_t(AF_INET)
            v4.sin_port = port.bigEndian
            return try Self.pass(&v4, family: AF_INET, to: body)
        }
        var v6 = sockaddr_in6()
        if inet_pton(AF_INET6, host, &v6.sin6_addr) == 1 {
            v6.sin6_family = sa_family_t(AF_INET6)
            v6.sin6_port = port.bigEndian
            return try Self.pass(&v6, family: AF_INET6, to: body)
        }
        throw SystemCallError("'\(host)' is not a numeric IPv4 or IPv6 address", .invalid)
    }
}

/// Keepalive settings: how soon a silent peer is declared dead.
public struct KeepAlive: Sendable, Equatable {
    public var idleSeconds: Int32
    public var intervalSeconds: Int32
    public var probes: Int32

    public init(idleSeconds: Int32 = 2, intervalSeconds: Int32 = 1, probes: Int32 = 3) {
        self.idleSeconds = idleSeconds
        self.intervalSeconds = intervalSeconds
        self.probes = probes
    }
}

/// A listening TCP socket: bound here, or passed in by systemd (socket
/// activation) and adopted.
public final class TCPListener: Sendable {
    public let fd: Int32
    /// The bound address, with the port the kernel chose when 0 was asked.
    public let endpoint: SocketEndpoint
    /// Whether the socket was passed in (`init(adopting:)`) rather than
    /// bound here: its listening socket is shared with whoever passed it.
    public let isAdopted: Bool

    public init(endpoint: SocketEndpoint, backlog: Int32 = 8) throws {
        let fd = try endpoint.withSockaddr { address, length, family in
            let fd = try StreamSocket.open(family: family, for: endpoint.description)
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if bind(fd, address, length) < 0 || listen(fd, backlog) < 0 {
                let error = Errno.current
                close(fd)
                throw SystemCallError("listen on \(endpoint)", error)
            }
            return fd
        }
        self.fd = fd
        self.endpoint = SocketEndpoint(host: endpoint.host, port: TCPListener.localPort(fd))
        isAdopted = false
    }

    /// Takes over `fd`, a listening TCP socket someone else bound: systemd's
    /// socket unit, which keeps its own copy. `endpoint` is the address it
    /// is bound to (`getsockname`). Closing this object closes only this
    /// process's descriptor.
    public init(adopting fd: Int32) throws(SystemCallError) {
        guard case let .inet(host, port) = SocketIdentity.localAddress(fd) else {
            throw SystemCallError("adopt descriptor \(fd) as the agent's listener: not a TCP socket", .invalid)
        }
        self.fd = fd
        endpoint = SocketEndpoint(host: host, port: port)
        isAdopted = true
    }

    deinit { close(fd) }

    /// Wakes a thread blocked in `accept` for good, by shutting the socket
    /// down; does nothing to an adopted socket. That one is systemd's too:
    /// shut down, it would stop listening for systemd as well, and the next
    /// connection would start no new instance. A thread waiting on it with
    /// `accept(timeoutNanos:)` notices within its timeout instead.
    /// Kernel: `shutdown(2)`
    public func stopAccepting() {
        guard !isAdopted else { return }
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    private static func localPort(_ fd: Int32) -> UInt16 {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return withUnsafeBytes(of: &storage) { bytes in
            // sin_port and sin6_port both sit at offset 2, in network order.
            UInt16(bigEndian: bytes.load(fromByteOffset: 2, as: UInt16.self))
        }
    }

    /// Waits for and accepts one connection, tuned with `keepAlive`.
    public func accept(keepAlive: KeepAlive = KeepAlive()) throws(SystemCallError) -> TCPConnection {
        let connection = try check("accept on \(endpoint)") { cpc_accept_cloexec(fd) }
        let tcp = TCPConnection(fd: connection)
        try tcp.tune(keepAlive)
        return tcp
    }

    /// Like `accept`, but gives up after `timeoutNanos` without a connection
    /// and returns nil, so that a caller can check its deadlines. A listener
    /// shut down meanwhile fails the accept.
    public func accept(keepAlive: KeepAlive = KeepAlive(), timeoutNanos: UInt64) throws(SystemCallError) -> TCPConnection? {
        var waiter = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = try checkLibc("poll for a connection on \(endpoint)") {
            poll(&waiter, 1, Int32(min(timeoutNanos / 1_000_000, UInt64(Int32.max))))
        }
        guard ready > 0 else { return nil }
        do {
            return try accept(keepAlive: keepAlive)
        } catch where error.errno == .again {
            // A socket systemd passed is non-blocking: the connection that
            // woke the poll may be gone (reset) before the accept.
            return nil
        }
    }
}

/// A connected TCP stream, blocking, with whole-buffer send and receive.
public final class TCPConnection: Sendable {
    public let fd: Int32

    init(fd: Int32) { self.fd = fd }

    deinit { close(fd) }

    /// Connects to `endpoint` (numeric host), tuned with `keepAlive`.
    public static func connect(to endpoint: SocketEndpoint, keepAlive: KeepAlive = KeepAlive()) throws -> TCPConnection {
        let fd = try endpoint.withSockaddr { address, length, family in
            let fd = try StreamSocket.open(family: family, for: endpoint.description)
            do {
                try StreamSocket.connect(fd, address, length, to: endpoint.description)
            } catch {
                close(fd)
                throw error
            }
            return fd
        }
        let connection = TCPConnection(fd: fd)
        try connection.tune(keepAlive)
        return connection
    }

    func tune(_ keepAlive: KeepAlive) throws(SystemCallError) {
        try check("TCP keepalive and TCP_NODELAY") {
            cpc_tcp_tune(fd, keepAlive.idleSeconds, keepAlive.intervalSeconds, keepAlive.probes)
        }
    }

    /// Sends all of `bytes`.
    public func send(_ bytes: UnsafeRawBufferPointer) throws(SystemCallError) {
        var offset = 0
        while offset < bytes.count {
            let sent = Glibc.send(fd, bytes.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL))
            if sent < 0 {
                if errno == EINTR { continue }
                throw SystemCallError("send", Errno.current)
            }
            offset += sent
        }
    }

    public func send(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try send($0) }
    }

    /// Receives whatever is available, up to `buffer.count` bytes; 0 is
    /// end of stream.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws(SystemCallError) -> Int {
        while true {
            let count = recv(fd, buffer.baseAddress, buffer.count, 0)
            if count >= 0 { return count }
            if errno == EINTR { continue }
            throw SystemCallError("receive", Errno.current)
        }
    }

    /// Makes `receive` fail with EAGAIN after `nanoseconds` without data
    /// (nil: wait forever).
    public func setReceiveTimeout(_ nanoseconds: UInt64?) throws(SystemCallError) {
        try StreamSocket.setReceiveTimeout(fd, nanoseconds)
    }

    /// Makes `send` fail with EAGAIN after `nanoseconds` in which the peer
    /// took no data (nil: wait forever): a peer that stopped reading is
    /// found dead instead of blocking the sender for good.
    /// Kernel: `SO_SNDTIMEO`
    public func setSendTimeout(_ nanoseconds: UInt64?) throws(SystemCallError) {
        try StreamSocket.setTimeout(fd, SO_SNDTIMEO, nanoseconds)
    }

    /// The peer's address, "192.0.2.7:41234" ("[2001:db8::7]:41234").
    public var peerEndpoint: SocketEndpoint? {
        var host = [CChar](repeating: 0, count: 64)
        var port: UInt16 = 0
        guard cpc_peer_address(fd, &host, UInt64(host.count), &port) == 0 else { return nil }
        let length = host.firstIndex(of: 0) ?? host.count
        return SocketEndpoint(host: String(decoding: host[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self),
                              port: port)
    }

    /// Stops both directions, waking a thread blocked in `receive`.
    public func shutdown() {
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    /// Stops sending only (the peer reads end of file), waking a thread
    /// blocked in `send`; the receiving direction stays open.
    public func shutdownSending() {
        _ = Glibc.shutdown(fd, Int32(SHUT_WR))
    }
}
