import Glibc
import Logging
import PostcopyCore
import PostcopyMigration
import PostcopyOS
import Synchronization
import Testing

/// A log handler that keeps the records a test asserts on.
final class LogCapture: Sendable {
    private let records = Locked<[(Logger.Level, String, Logger.Metadata)]>([])

    var logger: Logger {
        var logger = Logger(label: "postcopyd") { _ in Handler(capture: self) }
        logger.logLevel = .info
        return logger
    }

    /// The messages at `level` or above whose MESSAGE_ID is `event`'s.
    func messages(_ event: DaemonEvent) -> [String] {
        records.withLock { records in
            records.filter { $0.2["message_id"].map { "\($0)" } == event.messageID }.map(\.1)
        }
    }

    struct Handler: LogHandler {
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .info

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            let merged = metadata.merging(event.metadata ?? [:]) { $1 }
            capture.records.withLock { $0.append((event.level, "\(event.message)", merged)) }
        }
    }
}

/// Who may talk to postcopyd: TLS 1.3 with certificates checked both ways,
/// and a migration bound to its agent's secret. Every peer refused here is
/// refused with a reason in the journal (POSTCOPYD_AGENT_REFUSED) and
/// nothing it sent reaches guest memory; the migration goes on.
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct SecurityTests {
    static let size: UInt64 = 4 << 20

    /// Whether every byte of the daemon's guest RAM is still zero.
    static func untouched(_ daemon: DestinationDaemon) -> Bool {
        daemon.memory.alias.withUnsafeBytes { $0.allSatisfy { $0 == 0 } }
    }

    /// A real agent with `transport`, against a daemon with `daemonTransport`:
    /// the agent must fail saying `agentSays`, the daemon must log a refusal
    /// saying `daemonSays` (nil: no refusal logged), and guest RAM stays zero.
    func refused(agent transport: TransportSecurity, daemon daemonTransport: TransportSecurity = TestCertificates.daemon,
                 agentSays: String, daemonSays: String?) throws {
        let capture = LogCapture()
        let daemon = try FailureTests.Daemon(size: Self.size, transport: daemonTransport, logger: capture.logger)
        let source = try SourceFile(size: Self.size, seed: 5) { _ in false }
        var config = AgentConfig(ramPath: source.path, daemon: daemon.daemon.endpoint, transport: transport,
                                 migrationID: MigrationID(high: 3, low: 3),
                                 control: SourceControl("test", pause: {}, resume: {}))
        config.deadPeerTimeoutNanos = 2_000_000_000 * TestTiming.scale
        let agent = try SourceAgent(config: config, logger: testLogger("agent"), progress: ProgressReporter(enabled: false))
        let outcome = try Background("test-agent") { try agent.run() }.wait("the agent")
        guard case let .failure(error) = outcome else {
            Issue.record("the agent was not refused")
            return
        }
        #expect("\(error)".contains(agentSays), "agent: \(error)")
        Self.expectRefused(daemon, capture, saying: daemonSays)
    }

    /// The daemon logged a refusal saying `reason` (nil: none expected),
    /// guest RAM is untouched and no migration started; then it is stopped.
    static func expectRefused(_ daemon: FailureTests.Daemon, _ capture: LogCapture, saying reason: String?) {
        if let reason {
            // The daemon logs a refusal as it happens; give its thread a moment.
            var refusals: [String] = []
            for _ in 0..<100 {
                refusals = capture.messages(.agentRefused)
                if !refusals.isEmpty { break }
                usleep(20_000)
            }
            #expect(refusals.contains { $0.contains(reason) }, "postcopyd logged: \(refusals)")
        }
        #expect(untouched(daemon.daemon), "a refused agent's pages reached guest memory")
        #expect(daemon.daemon.status().phase == "handshake")
        daemon.daemon.cancel("test over")
        _ = daemon.failure()
    }

    @Test func anAgentCertificateFromAnotherCAIsRefused() throws {
        try refused(agent: TestCertificates.agent("stranger-agent"), agentSays: "postcopyd refused the handshake",
                    daemonSays: "the client's certificate is refused: unable to get local issuer certificate")
    }

    @Test func anExpiredAgentCertificateIsRefused() throws {
        // The agent refuses to start with it; the daemon, which would refuse
        // it too, is shown it by a hand-made client below.
        #expect(throws: TLSError.self) {
            _ = try TLSContext(.client, TestCertificates.configuration(certificate: "expired-agent", peerName: "127.0.0.1"))
        }
        let capture = LogCapture()
        let daemon = try FailureTests.Daemon(size: Self.size, logger: capture.logger)
        #expect(throws: (any Error).self) {
            let stream = try FailureTests.dial(daemon.daemon, try ExpiredClient.transport)
            try stream.send(.hello(migrationID: MigrationID(high: 3, low: 3), role: .bulk, sourcePageSize: .small,
                                   regionSize: Self.size, secret: .test))
            _ = try FailureTests.next(stream)
        }
        Self.expectRefused(daemon, capture, saying: "the client's certificate is refused: certificate has expired")
    }

    @Test func anAgentCertificateForAnotherClientIsRefused() throws {
        try refused(agent: TestCertificates.agent("other-agent"), agentSays: "postcopyd refused the handshake",
                    daemonSays: "the client's certificate is refused: it does not name 'postcopy-agent'")
    }

    @Test func aPlaintextAgentIsRefusedByATLSDaemon() throws {
        try refused(agent: .plaintext, agentSays: "(refused): the peer speaks the postcopy protocol without TLS; this postcopyd requires TLS",
                    daemonSays: "the peer speaks the postcopy protocol without TLS")
    }

    @Test func aTLSAgentIsRefusedByAPlaintextDaemon() throws {
        try refused(agent: TestCertificates.agent(), daemon: .plaintext, agentSays: "does not speak TLS",
                    daemonSays: "the peer speaks TLS, but this postcopyd runs with --insecure-plaintext")
    }

    @Test func theAgentRefusesADaemonItCannotVerify() throws {
        let impostor = TestCertificates.transport(.server, certificate: "stranger-daemon", peerName: TestCertificates.clientName)
        try refused(agent: TestCertificates.agent(), daemon: impostor,
                    agentSays: "postcopyd's certificate is refused: unable to get local issuer certificate",
                    daemonSays: nil)
    }

    /// A second agent with a valid certificate and the migration id, but
    /// not the secret, can neither join in precopy nor rejoin in postcopy;
    /// the migration completes byte for byte.
    @Test func aHijackedMigrationIDIsRefused() throws {
        let (source, dirty) = try MigrationTests.source(dirty: 0.05)
        let capture = LogCapture()
        let hijacks = Locked<[String]>([])
        var migration = Migration()
        migration.daemonLogger = capture.logger
        // Postcopy must outlast both attempts (each a TLS handshake): the
        // guest reads a few pages, and the back-fill is slow. A migration
        // that completed first answered the second attempt by closing.
        // Smaller (POSTCOPY_TEST_SIZE_SCALE), it is paced slower to last as
        // long, and longer still where handshakes are slower.
        migration.touchShare = 0.05
        migration.postcopyBytesPerSecond = (2 << 20) / (TestSize.divisor * TestTiming.scale)
        migration.duringPostcopy = { daemon in
            for resume in [false, true] {
                do {
                    let stream = try FailureTests.dial(daemon)
                    try stream.send(.hello(migrationID: MigrationID(high: 1, low: UInt64(getpid())), role: .urgent,
                                           sourcePageSize: .small, regionSize: MigrationTests.size,
                                           secret: .other, resume: resume))
                    let answer = try FailureTests.next(stream)
                    hijacks.withLock { $0.append(answer.map { "\($0)" } ?? "closed") }
                    // Were it admitted, these pages would overwrite page 0.
                    try stream.sendFrame(FailureTests.pagesFrame(first: 0, count: 1, byte: 0x66))
                } catch {
                    hijacks.withLock { $0.append("\(error)") }
                }
            }
        }
        let outcome = try migration.run(source, pause: MigrationTests.dirtying(source, dirty))
        #expect(outcome.identical, "destination RAM differs from the source")
        #expect(outcome.guest.verified)
        #expect(outcome.daemon.stalePagesAtSwitchover == MigrationTests.stale(dirty))
        MigrationTests.expectNoPageTwice(outcome)
        let answers = hijacks.withLock { $0 }
        #expect(answers.count == 2)
        #expect(answers.allSatisfy { $0.contains("ERROR refused") }, "\(answers)")
        #expect(capture.messages(.agentRefused).filter { $0.contains("without its secret") }.count == 2)
    }

    /// Connections that never finish their handshake hold at most
    /// `maxPendingConnections` admission threads: one more gives up the
    /// oldest at once, and the real agent, coming last, is admitted.
    @Test func connectionsInTheirHandshakeAreBounded() throws {
        let capture = LogCapture()
        let daemon = try FailureTests.Daemon(logger: capture.logger, maxPendingConnections: 2)
        let oldest = try TCPConnection.connect(to: daemon.daemon.endpoint)
        try oldest.setReceiveTimeout(5_000_000_000)
        usleep(100_000)
        let idle = try (0..<2).map { _ in try TCPConnection.connect(to: daemon.daemon.endpoint) }
        var byte = [UInt8](repeating: 0, count: 1)
        let started = monotonicNanoseconds()
        let count = try? byte.withUnsafeMutableBytes { try oldest.receive(into: $0) }
        #expect(count == nil || count == 0, "the oldest connection was not given up")
        #expect(monotonicNanoseconds() - started < 2_000_000_000, "given up only after a timeout")
        #expect(capture.messages(.agentRefused).contains { $0.contains("2 connections were already in their handshake (the limit): gave up the oldest") },
                "\(capture.messages(.agentRefused))")
        // Two more idle ones are still there; the agent's two connections
        // push them out in turn.
        let (bulk, urgent) = try FailureTests.connectAgent(to: daemon.daemon)
        withExtendedLifetime(idle) {}
        bulk.shutdown()
        urgent.shutdown()
        #expect(daemon.failure().contains("during precopy"))
    }

    /// While the VMM is attached, a second connection to the VMM socket is
    /// answered with ERROR at once, and the migration completes.
    @Test func aSecondVMMIsRefusedWhileOneIsAttached() throws {
        let (source, dirty) = try MigrationTests.source(dirty: 0.02)
        let answer = Locked<String>("")
        var migration = Migration()
        migration.duringPostcopy = { daemon in
            do {
                let channel = VMMChannel(try UnixConnection.connect(path: daemon.config.vmmSocketPath), side: .vmm, opening: .attach)
                let reply = try channel.receive()
                answer.withLock { $0 = reply.map { "\($0.message)" } ?? "closed" }
            } catch {
                answer.withLock { $0 = "\(error)" }
            }
        }
        let outcome = try migration.run(source, pause: MigrationTests.dirtying(source, dirty))
        MigrationTests.check(outcome, stale: MigrationTests.stale(dirty))
        let reply = answer.withLock { $0 }
        #expect(reply.contains("ERROR unexpected-message: a VMM is already attached to this migration"), "\(reply)")
    }
}

/// A client presenting the expired certificate, without the check
/// `TLSContext` makes of its own certificate: what a careless or hostile
/// agent would use.
enum ExpiredClient {
    static var transport: TransportSecurity {
        get throws {
            .tls(try TLSContext(.client, TestCertificates.configuration(certificate: "expired-agent", peerName: "127.0.0.1"),
                                checkingOwnValidity: false))
        }
    }
}
