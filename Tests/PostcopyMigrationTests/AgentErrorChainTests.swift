import Glibc
import PostcopyCore
@testable import PostcopyMigration
import PostcopyOS
import Synchronization
import Testing

/// The agent's failures keep what caused them, typed, down to the errno
/// the kernel gave, on real failures over loopback: the chain the agent
/// prints at exit ends in the failed call and its errno, while the one-line
/// reason reads as before.
@Suite struct AgentErrorChainTests {
    /// A postcopyd that reads the first bytes of each connection (the HELLO)
    /// and resets it: a close with a zero linger time, which the kernel
    /// sends as RST. The agent, waiting for WELCOME, sees ECONNRESET.
    final class ResettingListener: Sendable {
        private final class Shared: Sendable {
            let stopping = Atomic<Bool>(false)
            let resets = Atomic<Int>(0)
        }

        let listener: TCPListener
        private let shared = Shared()
        private let thread: OSThread

        init() throws {
            let listener = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0))
            let shared = self.shared
            self.listener = listener
            thread = try OSThread.start(name: "test-resetter") {
                while !shared.stopping.load(ordering: .relaxed) {
                    guard let connection = try? listener.accept(timeoutNanos: 50_000_000) else { continue }
                    var hello = [UInt8](repeating: 0, count: 4096)
                    _ = hello.withUnsafeMutableBytes { try? connection.receive(into: $0) }
                    var option = Glibc.linger(l_onoff: 1, l_linger: 0)
                    _ = setsockopt(connection.fd, SOL_SOCKET, SO_LINGER, &option, socklen_t(MemoryLayout<Glibc.linger>.size))
                    shared.resets.add(1, ordering: .relaxed)
                }
            }
        }

        var endpoint: SocketEndpoint { listener.endpoint }
        var connectionsReset: Int { shared.resets.load(ordering: .relaxed) }

        func stop() {
            shared.stopping.store(true, ordering: .relaxed)
            thread.join()
        }
    }

    /// A restarted agent (`--resume`) that rejoins `daemon` for a second
    /// at most: what it fails with.
    static func rejoinFailure(_ daemon: SocketEndpoint) throws -> any Error {
        let source = try SourceFile(size: 1 << 20, seed: 21) { _ in false }
        var config = AgentConfig(ramPath: source.path, daemon: daemon, transport: .plaintext,
                                 migrationID: MigrationID(high: 21, low: 21),
                                 control: SourceControl("test", pause: {}, resume: {}))
        config.resume = true
        config.reconnectTimeoutNanos = 1_000_000_000
        config.reconnectInitialDelayNanos = 20_000_000
        config.reconnectMaxDelayNanos = 100_000_000
        let agent = try SourceAgent(config: config, logger: testLogger("agent"), progress: ProgressReporter(enabled: false))
        do {
            _ = try agent.run()
        } catch {
            return error
        }
        throw TestFailure("the agent rejoined \(daemon), where no postcopyd runs")
    }

    /// Nothing listens: each attempt's connect is refused, and the last
    /// refusal is the root of the agent's failure.
    @Test func aRejoinRefusedEndsInECONNREFUSED() throws {
        // Bound and closed: a port on which nothing listens.
        let port = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0)).endpoint.port
        let daemon = SocketEndpoint(host: "127.0.0.1", port: port)
        let error = try Self.rejoinFailure(daemon)
        let failure = try #require(error as? MigrationError, "\(error)")
        #expect(failure.code == .peerLost)
        #expect(failure.reason.hasPrefix("could not rejoin postcopyd at \(daemon) within 1 s ("), "\(failure.reason)")
        #expect(failure.reason.contains("; last: connect the bulk connection to postcopyd at \(daemon): connect to \(daemon): ECONNREFUSED (Connection refused)). The source stays paused"), "\(failure.reason)")
        let chain = ErrorChain(failure)
        #expect(chain.errors.contains { $0 is ConnectionLost })
        #expect((chain.root as? SystemCallError) == SystemCallError("connect to \(daemon)", Errno(ECONNREFUSED)))
        #expect(chain.errno == Errno(ECONNREFUSED))
        let attempts = failure.link.split(separator: "(")[1].split(separator: " ")[0]
        #expect(chain.rendered(program: "postcopy-push", headline: "migration failed") == """
            postcopy-push: migration failed: could not rejoin postcopyd at \(daemon) within 1 s (\(attempts) attempts). The source stays paused: the guest runs on the destination and may still need its pages
              caused by: connect the bulk connection to postcopyd at \(daemon)
              caused by: connect to \(daemon): ECONNREFUSED (Connection refused)

            """)
    }

    /// A postcopyd that resets every connection after its HELLO: the
    /// agent's failure ends in the receive that the reset failed.
    @Test func aRejoinResetEndsInECONNRESET() throws {
        let resetter = try ResettingListener()
        defer { resetter.stop() }
        let error = try Self.rejoinFailure(resetter.endpoint)
        #expect(resetter.connectionsReset > 0)
        let failure = try #require(error as? MigrationError, "\(error)")
        #expect(failure.reason.contains("; last: receive: ECONNRESET (Connection reset by peer)). The source stays paused"), "\(failure.reason)")
        let chain = ErrorChain(failure)
        #expect((chain.root as? SystemCallError) == SystemCallError("receive", Errno(ECONNRESET)), "\(chain.links)")
        #expect(chain.links.count == 2, "\(chain.links)")
        #expect(chain.links.last == "receive: ECONNRESET (Connection reset by peer)")
    }

    /// A dirty-log socket that does not exist, with the log asked for by
    /// name: the migration fails before the agent connects anywhere, with
    /// the connect's ENOENT at the root.
    @Test func aMissingDirtyLogSocketEndsInENOENT() throws {
        let source = try SourceFile(size: 1 << 20, seed: 22) { _ in false }
        let directory = try TemporaryDirectory()
        let socket = directory.path + "/no-such.sock"
        // Nothing listens on port 1: had the agent connected, it would say so instead.
        var config = AgentConfig(ramPath: source.path, daemon: SocketEndpoint(host: "127.0.0.1", port: 1),
                                 transport: .plaintext, migrationID: MigrationID(high: 22, low: 22),
                                 control: SourceControl("test", pause: {}, resume: {}))
        config.dirtyLog = .uffdWP
        config.dirtyLogSocket = socket
        let agent = try SourceAgent(config: config, logger: testLogger("agent"), progress: ProgressReporter(enabled: false))
        let failure: MigrationError
        do {
            _ = try agent.run()
            throw TestFailure("the agent ran without its dirty log")
        } catch let error as MigrationError {
            failure = error
        }
        #expect(failure.code == .incompatible)
        #expect(failure.reason == "--dirty-log uffd-wp: the source VMM's dirty-log socket \(socket) does not answer: connect to \(socket): ENOENT (No such file or directory)")
        let chain = ErrorChain(failure)
        #expect(chain.errors.map { "\(type(of: $0))" } == ["MigrationError", "DirtyLogUnavailable", "SystemCallError"])
        #expect(chain.errno == Errno(ENOENT))
        #expect(chain.rendered(program: "postcopy-push", headline: "migration failed") == """
            postcopy-push: migration failed: --dirty-log uffd-wp
              caused by: the source VMM's dirty-log socket \(socket) does not answer
              caused by: connect to \(socket): ENOENT (No such file or directory)

            """)
    }

    /// A send that postcopyd does not take within the send timeout is a
    /// lost connection whose cause is the send's EAGAIN.
    @Test func aSendTimeoutIsALossCausedByEAGAIN() throws {
        let listener = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0))
        let client = try TCPConnection.connect(to: listener.endpoint)
        let server = try listener.accept()  // never reads
        try client.setSendTimeout(50_000_000)
        // A MiB at a time until the socket buffers on both ends are full.
        let chunk = [UInt8](repeating: 0x5A, count: 1 << 20)
        var sendError: (any Error)?
        for _ in 0..<1024 where sendError == nil {
            do {
                try chunk.withUnsafeBytes { try client.send($0) }
            } catch {
                sendError = error
            }
        }
        let timedOut = try #require(sendError, "1 GiB went into a connection nobody reads")
        withExtendedLifetime(server) {}
        let lost = try #require(SourceAgent.connectionLoss(timedOut))
        #expect(lost.reason == "postcopyd took nothing for the send timeout: send: EAGAIN (Resource temporarily unavailable)")
        #expect(lost.link == "postcopyd took nothing for the send timeout")
        #expect((ErrorChain(lost).root as? SystemCallError) == SystemCallError("send", .again))
        #expect(SourceAgent.connectionLoss(MigrationError(.peerLost, "x")) == nil)
    }
}
