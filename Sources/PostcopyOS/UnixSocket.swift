import CPostcopy
import Glibc

/// Who is at the other end of a unix socket, as the kernel vouches.
/// Kernel: `SO_PEERCRED`
public struct PeerCredentials: Equatable, Sendable, CustomStringConvertible {
    public let pid: Int32
    public let uid: UInt32
    public let gid: UInt32

    public init(pid: Int32, uid: UInt32, gid: UInt32) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
    }

    public var description: String { "pid \(pid), uid \(uid), gid \(gid)" }
}

/// A listening unix stream socket at a path, created with a restrictive
/// mode (0600 by default) and removed when the object goes away; or one
/// passed in by systemd (socket activation), which is adopted and whose
/// path is left alone.
public final class UnixListener: Sendable {
    public let fd: Int32
    public let path: String
    /// Whether the socket was passed in (`init(adopting:)`) rather than
    /// bound here: its path belongs to whoever passed it.
    public let isAdopted: Bool

    /// Binds `path` with `mode`; when `owner` is given, the socket file is
    /// then handed to that uid, so that a peer running as it (and no one
    /// else but root) may connect.
    public init(path: String, mode: mode_t = 0o600, owner: uid_t? = nil, backlog: Int32 = 4) throws {
        var address = try UnixAddress(path)
        let fd = try StreamSocket.open(family: AF_UNIX, for: path)
        do {
            try UnixListener.removeStaleSocket(at: path)
            // Bind under a umask that already excludes group and other, so
            // there is no moment at which the socket is open to them.
            let previous = umask(~mode & 0o777)
            let bound = address.withSockaddr { bind(fd, $0, $1) }
            let bindError = errno
            umask(previous)
            if bound < 0 { throw SystemCallError("bind \(path)", Errno(bindError)) }
            try checkLibc("chmod \(path)") { chmod(path, mode) }
            if let owner, owner != geteuid() {
                try checkLibc("give \(path) to uid \(owner)") { chown(path, owner, gid_t.max) }
            }
            try checkLibc("listen on \(path)") { listen(fd, backlog) }
        } catch {
            close(fd)
            throw error
        }
        self.fd = fd
        self.path = path
        isAdopted = false
    }

    /// Takes over `fd`, a listening unix socket someone else bound:
    /// systemd's socket unit, which keeps its own copy and owns the path
    /// (`getsockname`). Closing this object closes only this process's
    /// descriptor; the path is neither unlinked nor changed, so that the
    /// socket still works for the next instance systemd starts.
    public init(adopting fd: Int32) throws(SystemCallError) {
        guard case let .unix(path) = SocketIdentity.localAddress(fd), !path.isEmpty else {
            throw SystemCallError("adopt descriptor \(fd) as a unix listener: not a bound unix socket", .invalid)
        }
        self.fd = fd
        self.path = path
        isAdopted = true
    }

    deinit {
        close(fd)
        if !isAdopted { unlink(path) }
    }

    /// A socket file left by a process that died is replaced; a socket
    /// something still listens on, or any other file, is an error and is
    /// never deleted.
    private static func removeStaleSocket(at path: String) throws {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard info.st_mode & S_IFMT == S_IFSOCK else {
            throw SystemCallError("\(path) exists and is not a socket", .exists)
        }
        if (try? UnixConnection.connect(path: path)) != nil {
            throw SystemCallError("\(path): another process is listening on it", .exists)
        }
        try checkLibc("remove stale socket \(path)") { unlink(path) }
    }

    /// Waits for and accepts one connection.
    public func accept() throws(SystemCallError) -> UnixConnection {
        let connection = try check("accept on \(path)") { cpc_accept_cloexec(fd) }
        return UnixConnection(fd: connection)
    }

    /// Like `accept`, but gives up after `timeoutNanos` without a connection
    /// and returns nil.
    public func accept(timeoutNanos: UInt64) throws(SystemCallError) -> UnixConnection? {
        var waiter = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = try checkLibc("poll for a connection on \(path)") {
            poll(&waiter, 1, Int32(min(timeoutNanos / 1_000_000, UInt64(Int32.max))))
        }
        guard ready > 0 else { return nil }
        return try accept()
    }
}

/// A connected unix stream socket that can carry one file descriptor with
/// a message (SCM_RIGHTS).
public final class UnixConnection: Sendable {
    public let fd: Int32

    init(fd: Int32) { self.fd = fd }

    deinit { close(fd) }

    /// Connects to a listening socket at `path`.
    public static func connect(path: String) throws -> UnixConnection {
        var address = try UnixAddress(path)
        let connection = UnixConnection(fd: try StreamSocket.open(family: AF_UNIX, for: path))
        try address.withSockaddr { (sockaddr, length) throws(SystemCallError) in
            try StreamSocket.connect(connection.fd, sockaddr, length, to: path)
        }
        return connection
    }

    /// Two connected ends, for a peer in the same process or a child.
    public static func pair() throws -> (UnixConnection, UnixConnection) {
        var fds: [Int32] = [-1, -1]
        try checkLibc("socketpair AF_UNIX") {
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds)
        }
        return (UnixConnection(fd: fds[0]), UnixConnection(fd: fds[1]))
    }

    /// Makes `receive` fail with EAGAIN after `nanoseconds` without data
    /// (nil: wait forever).
    public func setReceiveTimeout(_ nanoseconds: UInt64?) throws(SystemCallError) {
        try StreamSocket.setReceiveTimeout(fd, nanoseconds)
    }

    /// Makes `send` fail with EAGAIN after `nanoseconds` of a full buffer
    /// (nil: wait forever).
    public func setSendTimeout(_ nanoseconds: UInt64?) throws(SystemCallError) {
        try StreamSocket.setTimeout(fd, SO_SNDTIMEO, nanoseconds)
    }

    public func peerCredentials() throws(SystemCallError) -> PeerCredentials {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
        try check("SO_PEERCRED") { cpc_peer_credentials(fd, &pid, &uid, &gid) }
        return PeerCredentials(pid: pid, uid: uid, gid: gid)
    }

    /// Sends all of `bytes`; `passing`, when given, travels with the first
    /// byte. The descriptor stays open here: the receiver gets its own.
    public func send(_ bytes: [UInt8], passing descriptor: Int32? = nil) throws(SystemCallError) {
        var offset = 0
        var attached = descriptor ?? -1
        while offset < bytes.count || (offset == 0 && bytes.isEmpty) {
            let sent = bytes.withUnsafeBytes { buffer in
                cpc_send_with_fd(fd, buffer.baseAddress! + offset, UInt64(buffer.count - offset), attached)
            }
            if sent == -Int64(EINTR) { continue }
            guard sent >= 0 else { throw SystemCallError("send on unix socket", Errno(Int32(-sent))) }
            attached = -1
            offset += Int(sent)
            if bytes.isEmpty { break }
        }
    }

    /// Receives up to `capacity` bytes and the descriptor that came with
    /// them, if any (the caller owns it). An empty result is end of stream.
    public func receive(capacity: Int = 65536) throws(SystemCallError) -> (bytes: [UInt8], descriptor: Int32?) {
        var bytes = [UInt8](repeating: 0, count: capacity)
        var descriptor: Int32 = -1
        while true {
            let count = bytes.withUnsafeMutableBytes { cpc_recv_with_fd(fd, $0.baseAddress, UInt64($0.count), &descriptor) }
            if count == -Int64(EINTR) { continue }
            guard count >= 0 else { throw SystemCallError("receive on unix socket", Errno(Int32(-count))) }
            bytes.removeSubrange(Int(count)...)
            return (bytes, descriptor >= 0 ? descriptor : nil)
        }
    }
}

/// A `sockaddr_un` for a filesystem path.
struct UnixAddress {
    private var storage = sockaddr_un()

    init(_ path: String) throws(SystemCallError) {
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: storage.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity, !bytes.contains(0) else {
            throw SystemCallError("unix socket path '\(path)' must be 1 to \(capacity - 1) bytes", Errno(ENAMETOOLONG))
        }
        storage.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &storage.sun_path) { $0.copyBytes(from: bytes) }
    }

    mutating func withSockaddr<T, E: Error>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws(E) -> T) throws(E) -> T {
        try withUnsafePointer(to: &storage) { (pointer) throws(E) -> T in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { (address) throws(E) -> T in
                try body(address, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
    }
}
