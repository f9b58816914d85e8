import Glibc
import PostcopyCore
import PostcopyOS
import Testing

/// Unix sockets carry the VMM handshake: descriptors travel with messages,
/// and the daemon checks who connected. None of this needs root.
@Suite struct UnixSocketTests {
    static func temporaryPath(_ name: String) -> String {
        "/tmp/postcopyd-test-\(getpid())-\(name).sock"
    }

    func inode(_ fd: Int32) -> (UInt64, UInt64) {
        var info = stat()
        fstat(fd, &info)
        return (UInt64(info.st_dev), UInt64(info.st_ino))
    }

    @Test func descriptorTravelsWithTheMessage() throws {
        let (daemon, vmm) = try UnixConnection.pair()
        let file = try MemoryFile(backing: .memfd, size: 1 << 20)
        try daemon.send([1, 2, 3], passing: file.fd)
        let received = try vmm.receive()
        #expect(received.bytes == [1, 2, 3])
        let descriptor = try #require(received.descriptor)
        defer { close(descriptor) }
        #expect(descriptor != file.fd)
        #expect(inode(descriptor) == inode(file.fd), "the received descriptor is the same file")
        #expect(fcntl(descriptor, F_GETFD) & FD_CLOEXEC != 0, "received descriptors are close-on-exec")
    }

    @Test func messagesWithoutADescriptorCarryNone() throws {
        let (one, other) = try UnixConnection.pair()
        try one.send(Array(repeating: 7, count: 100))
        let received = try other.receive()
        #expect(received.bytes.count == 100)
        #expect(received.descriptor == nil)
    }

    @Test func endOfStreamIsAnEmptyReceive() throws {
        var (one, other): (UnixConnection?, UnixConnection) = try UnixConnection.pair()
        _ = one
        one = nil
        let received = try other.receive()
        #expect(received.bytes.isEmpty && received.descriptor == nil)
    }

    @Test func listenerIsPrivateAndNamesItsPeer() throws {
        let path = Self.temporaryPath("listener")
        let listener = try UnixListener(path: path)
        var info = stat()
        #expect(stat(path, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o600)
        let client = try UnixConnection.connect(path: path)
        let server = try listener.accept()
        let peer = try server.peerCredentials()
        #expect(peer == PeerCredentials(pid: getpid(), uid: geteuid(), gid: getegid()))
        try client.send([42])
        #expect(try server.receive().bytes == [42])
    }

    @Test func staleSocketIsReplacedButOtherFilesAreNot() throws {
        let path = Self.temporaryPath("stale")
        do { _ = try UnixListener(path: path) }
        // The listener above removed its file; leave a stale socket file behind.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(bound == 0)
        _ = try UnixListener(path: path)

        let plain = Self.temporaryPath("plain")
        let file = creat(plain, 0o600)
        close(file)
        defer { unlink(plain) }
        let error = try #require(throws: SystemCallError.self) { try UnixListener(path: plain) }
        #expect(error.description == "\(plain) exists and is not a socket: EEXIST (File exists)")
        #expect(access(plain, F_OK) == 0, "a file that is not a socket is never removed")
    }

    @Test func overlongPathIsRefused() {
        let path = "/tmp/" + String(repeating: "x", count: 200)
        #expect(throws: SystemCallError.self) { try UnixListener(path: path) }
    }
}
