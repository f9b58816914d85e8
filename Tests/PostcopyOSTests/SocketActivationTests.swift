import Foundation
import Glibc
import PostcopyCore
import PostcopyOS
import Testing

/// Socket activation (postcopyd@.socket): what the daemon learns of the
/// sockets systemd passes, that it leaves them working for the next
/// instance, and `postcopyd serve` started with real descriptors at 3 and 4
/// and LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES, as systemd starts it.
@Suite struct SocketActivationTests {
    /// A second descriptor for the same socket, as systemd passes a copy of
    /// its own; close-on-exec, numbered 100 or above.
    func duplicate(_ fd: Int32) throws -> Int32 {
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 100)
        try #require(copy >= 0, "F_DUPFD_CLOEXEC: errno \(errno)")
        return copy
    }

    @Test func theShapeOfEachKindOfDescriptor() throws {
        let tcp = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0))
        #expect(SocketIdentity.shape(of: tcp.fd)
                == SocketShape(family: .inet, kind: .stream, listening: true, address: "\(tcp.endpoint)"))
        let tcp6 = try TCPListener(endpoint: SocketEndpoint(host: "::1", port: 0))
        #expect(SocketIdentity.shape(of: tcp6.fd)
                == SocketShape(family: .inet6, kind: .stream, listening: true, address: "[::1]:\(tcp6.endpoint.port)"))
        let path = UnixSocketTests.temporaryPath("shape")
        let unix = try UnixListener(path: path)
        #expect(SocketIdentity.shape(of: unix.fd) == SocketShape(family: .unix, kind: .stream, listening: true, address: path))

        let udp = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(udp) }
        #expect(SocketIdentity.shape(of: udp)?.kind == .datagram)
        #expect(SocketIdentity.shape(of: udp)?.listening == false)
        let (one, _) = try UnixConnection.pair()
        #expect(SocketIdentity.shape(of: one.fd)
                == SocketShape(family: .unix, kind: .stream, listening: false, address: ""), "a connected, unbound socket")
        let file = try MemoryFile(backing: .memfd, size: 4096)
        #expect(SocketIdentity.shape(of: file.fd) == nil, "a memfd is not a socket")
    }

    @Test func anAdoptedTCPListenerKeepsListeningForItsOwner() throws {
        let owner = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0))
        var adopted: TCPListener? = try TCPListener(adopting: try duplicate(owner.fd))
        #expect(adopted?.endpoint == owner.endpoint, "the address comes from getsockname")
        #expect(adopted?.isAdopted == true)
        // What the daemon does when its migration ends.
        adopted?.stopAccepting()
        adopted = nil
        // systemd's copy still listens: the next connection is there to start the next instance.
        let client = try TCPConnection.connect(to: owner.endpoint)
        _ = client
        #expect(try owner.accept(timeoutNanos: 2_000_000_000) != nil, "the owner's socket stopped listening")
    }

    @Test func anAdoptedUnixListenerLeavesItsPathAlone() throws {
        let path = UnixSocketTests.temporaryPath("adopted")
        let owner = try UnixListener(path: path)
        var adopted: UnixListener? = try UnixListener(adopting: try duplicate(owner.fd))
        #expect(adopted?.path == path)
        adopted = nil
        #expect(access(path, F_OK) == 0, "the adopted listener unlinked the owner's path")
        _ = try UnixConnection.connect(path: path)
        #expect(try owner.accept(timeoutNanos: 2_000_000_000) != nil)
    }

    @Test func adoptingTheWrongKindOfSocketFails() throws {
        let path = UnixSocketTests.temporaryPath("wrong")
        let unix = try UnixListener(path: path)
        #expect(throws: SystemCallError.self) { try TCPListener(adopting: try duplicate(unix.fd)) }
        let tcp = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0))
        #expect(throws: SystemCallError.self) { try UnixListener(adopting: try duplicate(tcp.fd)) }
    }

    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func serveUsesTheSocketsSystemdPassesAndLeavesThemWorking() throws {
        let directory = try ServiceRun.makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let agent = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0))
        let control = try UnixListener(path: "\(directory)/activated.sock")
        // The settings name other sockets: the passed ones win.
        let daemon = try ActivatedDaemon(directory: directory, passing: [control.fd, agent.fd], settings: """
            listen = 127.0.0.1:0
            control-socket = \(directory)/bound.sock
            """)
        defer { daemon.kill(SIGKILL) }
        try daemon.waitUntilReady()

        let ready = try String(contentsOfFile: "\(directory)/daemon.ready", encoding: .utf8)
        #expect(ready == "\(agent.endpoint)\n", "the ready file names the passed socket's address")
        let json = try CommandLineTests().run("postcopyctl", ["status", "--socket", control.path, "--json"])
        try #require(json.status == 0, "postcopyctl through the passed control socket: \(json.stderr)")
        let status = try JSONDecoder().decode(DaemonStatus.self, from: Data(json.stdout.utf8))
        #expect(status.pid == daemon.pid)
        #expect(status.listen == "\(agent.endpoint)")
        #expect(access("\(directory)/bound.sock", F_OK) != 0, "the daemon bound a control socket of its own")

        #expect(daemon.kill(SIGTERM) == 1, "stopped in the handshake: exit status 1")
        let log = daemon.log
        #expect(log.contains("listening for the agent on \(agent.endpoint), the socket systemd passed (descriptor 4, 'postcopyd@socket-test.socket')"), "\(log)")
        #expect(log.contains("the settings' listen = 127.0.0.1:0 is not used: the agent's socket systemd passed (\(agent.endpoint)) wins"), "\(log)")
        #expect(log.contains("listening for postcopyctl on \(control.path), the socket systemd passed (descriptor 3, 'postcopyd@socket-test.socket')"), "\(log)")
        #expect(log.contains("the settings' control-socket = \(directory)/bound.sock is not used"), "\(log)")

        // Both still work for the next instance systemd would start.
        #expect(access(control.path, F_OK) == 0, "the daemon removed the passed control socket's path")
        _ = try UnixConnection.connect(path: control.path)
        #expect(try control.accept(timeoutNanos: 2_000_000_000) != nil)
        _ = try TCPConnection.connect(to: agent.endpoint)
        #expect(try agent.accept(timeoutNanos: 2_000_000_000) != nil, "the daemon shut the passed agent socket down")
    }

    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func serveRefusesASocketItCannotUseAndNamesIt() throws {
        let directory = try ServiceRun.makeTemporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let udp = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try #require(udp >= 0)
        defer { close(udp) }
        var address = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: 0,
                                  sin_addr: in_addr(s_addr: UInt32(0x7f00_0001).bigEndian), sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(udp, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        try #require(bound == 0)
        let port = SocketIdentity.localAddress(udp)
        let daemon = try ActivatedDaemon(directory: directory, passing: [udp], settings: "listen = 127.0.0.1:0")
        #expect(daemon.wait() == 1)
        #expect(daemon.log.contains("cannot start: systemd passed descriptor 3 ('postcopyd@socket-test.socket', a non-listening AF_INET datagram socket on \(port.text)), which postcopyd cannot use: "), "\(daemon.log)")
        #expect(access("\(directory)/daemon.ready", F_OK) != 0)
    }
}

/// `postcopyd serve` started as systemd starts a socket-activated service:
/// `passing` at descriptors 3, 4, … (named like a socket unit's, by default
/// its own name), LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID set to the
/// daemon's own pid (a shell sets it, then execs the daemon in its place).
final class ActivatedDaemon {
    let pid: pid_t
    let directory: String
    private var status: Int32?

    init(directory: String, passing descriptors: [Int32], settings: String) throws {
        self.directory = directory
        try """
            # written by SocketActivationTests
            \(settings)
            size = 16M
            memory = shmem
            vmm-socket = \(directory)/vmm.sock
            ready-file = \(directory)/daemon.ready
            insecure-plaintext
            """.write(toFile: "\(directory)/test.conf", atomically: true, encoding: .utf8)
        let arguments = ["/bin/sh", "-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\"", CommandLineTests.binary("postcopyd"),
                         "serve", "--instance", "socket-test", "--config", "\(directory)/test.conf"]
        var environment = ProcessInfo.processInfo.environment.filter {
            !["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"].contains($0.key)
        }
        environment["LISTEN_FDS"] = "\(descriptors.count)"
        environment["LISTEN_FDNAMES"] = descriptors.map { _ in "postcopyd@socket-test.socket" }.joined(separator: ":")
        environment["POSTCOPY_LOG"] = "stderr"

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        // From copies numbered 100 and up, so that no dup2 overwrites a source.
        var copies: [Int32] = []
        defer { copies.forEach { close($0) } }
        for fd in descriptors {
            let copy = fcntl(fd, F_DUPFD_CLOEXEC, 100)
            guard copy >= 0 else { throw POSIXError(.EBADF) }
            copies.append(copy)
        }
        for (index, copy) in copies.enumerated() {
            posix_spawn_file_actions_adddup2(&actions, copy, 3 + Int32(index))
        }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "\(directory)/daemon.err", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, "/bin/sh", &actions, nil, argv, envp)
        guard spawned == 0 else { throw POSIXError(POSIXErrorCode(rawValue: spawned) ?? .EIO) }
        self.pid = pid
    }

    /// What the daemon wrote to stderr.
    var log: String { (try? String(contentsOfFile: "\(directory)/daemon.err", encoding: .utf8)) ?? "" }

    func waitUntilReady() throws {
        for _ in 0..<300 {
            if let size = try? FileManager.default.attributesOfItem(atPath: "\(directory)/daemon.ready")[.size] as? Int,
               size > 0 { return }
            if hasExited { break }
            usleep(50_000)
        }
        Issue.record("postcopyd did not get ready; it said:\n\(log)")
        throw CancellationError()
    }

    /// Waits for the daemon to exit; its exit status (128 + signal when killed).
    @discardableResult
    func wait() -> Int32 {
        while status == nil, reap(options: 0) {}
        return status ?? -1
    }

    /// Whether the daemon has exited (reaped without waiting).
    private var hasExited: Bool {
        if status == nil { _ = reap(options: WNOHANG) }
        return status != nil
    }

    /// One waitpid; records the status when the child was reaped. Returns
    /// whether to try again (interrupted).
    private func reap(options: Int32) -> Bool {
        var raw: Int32 = 0
        let reaped = waitpid(pid, &raw, options)
        if reaped < 0 { return errno == EINTR }
        if reaped == pid { status = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f) }
        return false
    }

    /// Sends `signal` (unless the daemon has been waited for) and waits.
    @discardableResult
    func kill(_ signal: Int32) -> Int32 {
        if status == nil { Glibc.kill(pid, signal) }
        return wait()
    }
}
