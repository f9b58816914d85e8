import Glibc
import PostcopyCore
import PostcopyMigration
import PostcopyOS
import Testing

/// postcopyd's rules for several bulk streams, driven by hand against the
/// real daemon: every connection admitted (or refused) on its own, and the
/// dirty bitmap applied only once every stream's last round is in.
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct BulkStreamsDaemonTests {
    /// The agent's connections of a migration with `bulkStreams` bulk
    /// streams, spoken by hand: each bulk stream, then the urgent one.
    static func connect(to daemon: DestinationDaemon, pages: UInt64, bulkStreams: Int)
        throws -> (bulk: [MessageStream], urgent: MessageStream) {
        func open(_ stream: AgentStream) throws -> MessageStream {
            let connection = try FailureTests.dial(daemon)
            try connection.send(hello(stream, of: bulkStreams, pages: pages))
            guard case .welcome? = try FailureTests.next(connection) else { throw TestFailure("no WELCOME on \(stream)") }
            return connection
        }
        return (try (0..<bulkStreams).map { try open(.bulk($0)) }, try open(.urgent))
    }

    static func hello(_ stream: AgentStream, of bulkStreams: Int, pages: UInt64) -> Message {
        .hello(migrationID: MigrationID(high: 7, low: 7), role: stream.role, sourcePageSize: .small,
               regionSize: pages * 4096, secret: .test, bulkStreams: bulkStreams, streamIndex: stream.index)
    }

    static func page(_ page: UInt64, byte: UInt8) -> Message {
        .pages(requestID: 0, firstPage: page, data: ArraySlice(repeating: byte, count: 4096))
    }

    /// The drain rule, against the real daemon. Bulk stream 0 ends the last
    /// round and sends the dirty bitmap (page 600 stale) and SWITCHOVER
    /// while bulk stream 1's copy of page 600 from that round is still to
    /// come. postcopyd must hold the bitmap until stream 1 has ended the
    /// round: it writes that copy as precopy's, applies the bitmap after it
    /// (the page is still stale), and takes the fresh copy in postcopy. A
    /// daemon that applied the bitmap at once would resume the guest first
    /// and then take the late old copy for the stale page's fresh one,
    /// dropping the real one as a duplicate: the stale page applied after
    /// the bitmap.
    @Test func theBitmapWaitsForEveryStreamsLastRound() throws {
        let daemon = try FailSafeDaemonTests.Daemon()
        let vmm = try FailSafeDaemonTests.HandVMM(daemon)
        let pages = FailSafeDaemonTests.size / 4096
        let (bulk, urgent) = try Self.connect(to: daemon.daemon, pages: pages, bulkStreams: 2)
        defer { withExtendedLifetime(urgent) {} }
        let stalePage: UInt64 = 600
        #expect(StreamPartition(streams: 2).stream(of: stalePage) == 1)
        try bulk[0].send(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0))
        var stale = PageBitmap(count: pages)
        stale.insert(stalePage)
        try bulk[0].send(.dirtyBitmap(totalBits: stale.count, firstWord: 0, words: stale.words))
        try bulk[0].send(.switchover(stalePages: 1, sourcePausedAtNanos: realtimeNanoseconds()))
        usleep(300_000)
        #expect(daemon.daemon.status().phase == "precopy", "the bitmap was applied before bulk stream 1's last round")

        try bulk[1].send(Self.page(stalePage, byte: 0x11))
        try bulk[1].send(.roundEnd(round: 1, pagesSent: 1, dirtyPages: 1))
        guard case .resume? = try vmm.next() else { throw TestFailure("no VMM_RESUME") }
        try vmm.channel.send(.resumed)
        guard case .resumed? = try FailureTests.next(bulk[0]) else { throw TestFailure("no RESUMED") }
        #expect(FailureTests.bytes(of: daemon.daemon, page: stalePage) == [UInt8](repeating: 0x11, count: 4096),
                "precopy's copy was not written before the bitmap")
        #expect(daemon.daemon.status().stalePagesLeft == 1, "precopy's copy counted as the stale page's fresh one")

        // The fresh copy, in the back-fill on its stream.
        try bulk[1].send(Self.page(stalePage, byte: 0x22))
        #expect(FailSafeDaemonTests.waitUntil { daemon.daemon.status().stalePagesLeft == 0 })
        #expect(FailureTests.bytes(of: daemon.daemon, page: stalePage) == [UInt8](repeating: 0x22, count: 4096))
        daemon.daemon.cancel("test over")
        _ = daemon.failure()
    }

    /// A HELLO whose bulk stream count is not the migration's, or for a
    /// stream already connected, is refused on its own with ERROR saying
    /// why; the migration goes on with the right ones.
    @Test func aHelloOfAnotherCountOrForAConnectedStreamIsRefused() throws {
        let daemon = try FailureTests.Daemon()
        let pages = FailureTests.size / 4096
        let first = try FailureTests.dial(daemon.daemon)
        try first.send(Self.hello(.bulk(0), of: 2, pages: pages))
        guard case .welcome? = try FailureTests.next(first) else { throw TestFailure("no WELCOME") }
        for (hello, code, text) in [
            (Self.hello(.bulk(1), of: 3, pages: pages), ErrorCode.incompatible,
             "HELLO for a migration of 3 bulk streams, but this migration has 2 (start postcopy-push with --streams 2)"),
            (Self.hello(.bulk(0), of: 2, pages: pages), .unexpectedMessage,
             "a second bulk connection for the same migration"),
        ] {
            let refused = try FailureTests.dial(daemon.daemon)
            try refused.send(hello)
            let answer = try FailureTests.next(refused)
            #expect(answer == .error(code: code, message: text), "\(String(describing: answer))")
        }
        var rest: [MessageStream] = []
        for stream in [AgentStream.bulk(1), .urgent] {
            let connection = try FailureTests.dial(daemon.daemon)
            try connection.send(Self.hello(stream, of: 2, pages: pages))
            guard case .welcome? = try FailureTests.next(connection) else { throw TestFailure("no WELCOME on \(stream)") }
            rest.append(connection)
        }
        #expect(daemon.daemon.waitForPhase(["precopy"], seconds: 10))
        daemon.daemon.cancel("test over")
        #expect(daemon.failure().contains("test over"))
        withExtendedLifetime((first, rest)) {}
    }
}
