import PostcopyCore
import Testing

/// The daemon's session with several bulk streams: every connection admitted
/// on its own, the rounds counted per stream, the dirty bitmap held back
/// until every stream's last round is in, and rejoins of every connection.
@Suite struct BulkStreamSessionTests {
    typealias Action = DestinationSession.Action

    /// 8 MiB: four chunks of 2 MiB, 2048 pages, 32 bitmap words.
    static func geometry() throws -> PageGeometry { try Sessions.geometry(pages: 2048) }

    static func hello(_ stream: AgentStream, of streams: Int, _ geometry: PageGeometry, resume: Bool = false) -> Message {
        .hello(migrationID: Sessions.migrationID, role: stream.role, sourcePageSize: .small,
               regionSize: geometry.regionSize, secret: .test, resume: resume, bulkStreams: streams,
               streamIndex: stream.index)
    }

    /// Every connection of a migration with `streams` bulk streams said HELLO.
    static func precopy(streams: Int, _ geometry: PageGeometry) throws -> DestinationSession {
        var session = DestinationSession(geometry: geometry)
        for stream in AgentStream.all(bulkStreams: streams) {
            _ = try session.hello(hello(stream, of: streams, geometry))
        }
        return session
    }

    static func bitmap(_ geometry: PageGeometry, words: [UInt64]) -> Message {
        .dirtyBitmap(totalBits: geometry.smallPageCount, firstWord: 0, words: words)
    }

    /// One page of data at `page`.
    static func page(_ page: UInt64, seed: UInt8) -> Message {
        .pages(requestID: 0, firstPage: page, data: Sessions.data(pages: 1, seed: seed))
    }

    // MARK: the handshake

    /// Precopy starts once every bulk stream and the urgent connection are
    /// in, in any order; the count is the first HELLO's.
    @Test func precopyStartsOnceEveryConnectionIsIn() throws {
        let geometry = try Self.geometry()
        var session = DestinationSession(geometry: geometry)
        #expect(session.bulkStreams == nil)
        for stream in [AgentStream.bulk(2), .urgent, .bulk(0)] {
            #expect(try session.hello(Self.hello(stream, of: 3, geometry)).stream == stream)
            #expect(session.phase == .handshake)
        }
        #expect(session.bulkStreams == 3)
        #expect(try session.hello(Self.hello(.bulk(1), of: 3, geometry)).stream == .bulk(1))
        #expect(session.phase == .precopy)
    }

    /// A HELLO whose count is not the migration's, or for a stream already
    /// connected, is refused and changes nothing.
    @Test func aHelloOfAnotherCountOrASecondOneForAStreamIsRefused() throws {
        let geometry = try Self.geometry()
        var session = DestinationSession(geometry: geometry)
        _ = try session.hello(Self.hello(.bulk(0), of: 2, geometry))
        let mismatch = refusal { try session.hello(Self.hello(.bulk(1), of: 3, geometry)) }
        #expect(mismatch == .streamCountMismatch(migration: 2, hello: 3))
        #expect(mismatch?.code == .incompatible)
        #expect(mismatch?.description == "HELLO for a migration of 3 bulk streams, but this migration has 2 (start postcopy-push with --streams 2)")
        #expect(refusal { try session.hello(Self.hello(.urgent, of: 1, geometry)) }
            == .streamCountMismatch(migration: 2, hello: 1))
        let duplicate = refusal { try session.hello(Self.hello(.bulk(0), of: 2, geometry)) }
        #expect(duplicate == .duplicateConnection(.bulk(0)))
        #expect(duplicate?.description == "a second bulk connection for the same migration")
        _ = try session.hello(Self.hello(.bulk(1), of: 2, geometry))
        #expect(refusal { try session.hello(Self.hello(.bulk(1), of: 2, geometry)) }?.description
            == "a second bulk 1 connection for the same migration")
        #expect(session.phase == .handshake && session.bulkStreams == 2)
        // A HELLO made in code for a stream its count does not have (the
        // codec refuses such bytes).
        let outside = Message.hello(migrationID: Sessions.migrationID, role: .bulk, sourcePageSize: .small,
                                    regionSize: geometry.regionSize, secret: .test, bulkStreams: 2, streamIndex: 2)
        #expect(refusal { try session.hello(outside) } == .streamOutOfRange(role: .bulk, index: 2, bulkStreams: 2))
        _ = try session.hello(Self.hello(.urgent, of: 2, geometry))
        #expect(session.phase == .precopy)
    }

    // MARK: rounds

    /// Each stream ends each round; the migration's round ends with the
    /// last of them, its figures added up. Rounds go in order per stream,
    /// and a stream may be a round ahead of another.
    @Test func aRoundEndsWhenEveryStreamHasEndedIt() throws {
        let geometry = try Self.geometry()
        var session = try Self.precopy(streams: 3, geometry)
        #expect(try session.receive(.roundEnd(round: 1, pagesSent: 10, dirtyPages: 10), on: .bulk(1)) == Action.none)
        #expect(try session.receive(.roundEnd(round: 1, pagesSent: 20, dirtyPages: 21), on: .bulk(0)) == Action.none)
        #expect(try session.receive(.roundEnd(round: 2, pagesSent: 1, dirtyPages: 1), on: .bulk(0)) == Action.none)
        #expect(try session.receive(.roundEnd(round: 1, pagesSent: 30, dirtyPages: 30), on: .bulk(2))
            == .roundEnded(round: 1, pagesSent: 60, dirtyPages: 61))
        let skipped = refusal { try session.receive(.roundEnd(round: 3, pagesSent: 0, dirtyPages: 0), on: .bulk(1)) }
        #expect(skipped == .roundOutOfOrder(stream: .bulk(1), round: 3, expected: 2))
        #expect(skipped?.description == "ROUND_END for round 3 on the bulk 1 connection, whose next round is 2")
        #expect(skipped?.code == .protocolViolation)
        #expect(refusal { try session.receive(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0), on: .urgent) }
            == .unexpected(.roundEnd, phase: .precopy, stream: .urgent))
    }

    /// Precopy pages are written from the bulk stream that carries them,
    /// and refused on any other; control messages have their place on bulk
    /// stream 0 alone.
    @Test func controlMessagesTravelOnBulkStreamZeroOnly() throws {
        let geometry = try Self.geometry()
        var session = try Self.precopy(streams: 2, geometry)
        #expect(try session.receive(Self.page(600, seed: 1), on: .bulk(1))
            == .writePrecopy(PageRun(first: 600, count: 1), Sessions.data(pages: 1, seed: 1)))
        #expect(try session.receive(.zeroPages(firstPage: 1600, count: 2), on: .bulk(1)) == .zeroPrecopy(PageRun(first: 1600, count: 2)))
        #expect(refusal { try session.receive(Self.bitmap(geometry, words: Array(repeating: 0, count: 32)), on: .bulk(1)) }
            == .unexpected(.dirtyBitmap, phase: .precopy, stream: .bulk(1)))
        #expect(refusal { try session.receive(.switchover(stalePages: 0, sourcePausedAtNanos: 1), on: .bulk(1)) }
            == .unexpected(.switchover, phase: .precopy, stream: .bulk(1)))
        let off = refusal { try session.receive(Self.page(100, seed: 1), on: .bulk(1)) }
        #expect(off == .pagesOffTheirStream(.pages, PageRun(first: 100, count: 1), stream: .bulk(1), bulkStreams: 2))
        #expect(off?.description == "PAGES pages 100..<101 on the bulk 1 connection, but with 2 bulk streams a page travels on stream (page / 512) mod 2, in 2 MiB chunks")
        #expect(refusal { try session.receive(.zeroPages(firstPage: 510, count: 4), on: .bulk(0)) }
            == .pagesOffTheirStream(.zeroPages, PageRun(first: 510, count: 4), stream: .bulk, bulkStreams: 2))
    }

    // MARK: the drain rule

    /// The dirty bitmap comes on bulk stream 0 after its last ROUND_END;
    /// until every other stream has ended that round too, their pages may
    /// still be on the way, and the bitmap is not applied.
    @Test func theBitmapWaitsForEveryStreamsLastRound() throws {
        let geometry = try Self.geometry()
        var session = try Self.precopy(streams: 3, geometry)
        let bitmap = Self.bitmap(geometry, words: [0b1] + Array(repeating: 0, count: 31))
        for stream in 0..<3 { _ = try session.receive(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0), on: .bulk(stream)) }
        _ = try session.receive(.roundEnd(round: 2, pagesSent: 0, dirtyPages: 0), on: .bulk(0))
        #expect(session.streamsBehind == [1, 2] && session.precopyRound == 2)
        let early = refusal { try session.receive(bitmap, on: .bulk(0)) }
        #expect(early == .bitmapBeforeStreamsDrained(behind: [1, 2], round: 2))
        #expect(early?.description == "DIRTY_BITMAP before bulk streams 1, 2 ended round 2, the last: their pages may still be on the way")
        #expect(session.phase == .precopy)
        _ = try session.receive(Self.page(1024, seed: 2), on: .bulk(2))
        _ = try session.receive(.roundEnd(round: 2, pagesSent: 1, dirtyPages: 1), on: .bulk(2))
        #expect(session.streamsBehind == [1])
        #expect(refusal { try session.receive(bitmap, on: .bulk(0)) } == .bitmapBeforeStreamsDrained(behind: [1], round: 2))
        _ = try session.receive(.roundEnd(round: 2, pagesSent: 0, dirtyPages: 0), on: .bulk(1))
        #expect(session.streamsBehind == [])
        #expect(try session.receive(bitmap, on: .bulk(0)) == Action.none)
        #expect(session.phase == .switchingOver)
    }

    /// A precopy page that reaches the session after the dirty bitmap was
    /// applied is refused, never written: written then, a stale page's old
    /// copy would pass for the fresh one (and postcopy drop the fresh one
    /// as a duplicate), or a page the bitmap counts as sent would be
    /// dropped. Likewise pages a stream sent past the last round's
    /// ROUND_END: no round counts them, and the bitmap is refused.
    @Test func noPrecopyPageIsAppliedAfterTheBitmap() throws {
        let geometry = try Self.geometry()
        let stalePage: UInt64 = 512  // bulk stream 1's first chunk
        var words = Array(repeating: UInt64(0), count: 32)
        words[Int(stalePage / 64)] = 1
        // Stream 1's page of round 1 arrives after the bitmap: refused.
        var late = try Self.precopy(streams: 2, geometry)
        _ = try late.receive(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0), on: .bulk(0))
        _ = try late.receive(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0), on: .bulk(1))
        _ = try late.receive(Self.bitmap(geometry, words: words), on: .bulk(0))
        #expect(refusal { try late.receive(Self.page(stalePage, seed: 3), on: .bulk(1)) }
            == .unexpected(.pages, phase: .switchingOver, stream: .bulk(1)))
        _ = try late.receive(.switchover(stalePages: 1, sourcePausedAtNanos: 1), on: .bulk(0))
        #expect(late.phase == .postcopy)
        // Stream 1 sent the page after ending round 1, the last.
        var ahead = try Self.precopy(streams: 2, geometry)
        _ = try ahead.receive(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0), on: .bulk(0))
        _ = try ahead.receive(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0), on: .bulk(1))
        _ = try ahead.receive(Self.page(stalePage, seed: 3), on: .bulk(1))
        let refused = refusal { try ahead.receive(Self.bitmap(geometry, words: words), on: .bulk(0)) }
        #expect(refused == .pagesAfterLastRound(stream: .bulk(1), round: 1))
        #expect(refused?.description == "DIRTY_BITMAP after round 1, the last, but the bulk 1 connection sent pages past it")
        // A stream a round past stream 0's last: the same.
        var past = try Self.precopy(streams: 2, geometry)
        _ = try past.receive(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0), on: .bulk(1))
        _ = try past.receive(.roundEnd(round: 2, pagesSent: 0, dirtyPages: 0), on: .bulk(1))
        _ = try past.receive(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0), on: .bulk(0))
        #expect(refusal { try past.receive(Self.bitmap(geometry, words: words), on: .bulk(0)) }
            == .pagesAfterLastRound(stream: .bulk(1), round: 1))
    }

    // MARK: postcopy and rejoining

    /// The back-fill comes on every bulk stream; a rejoin needs every
    /// connection again, with the migration's count.
    @Test func postcopyAndARejoinUseEveryStream() throws {
        let geometry = try Self.geometry()
        var session = try Self.precopy(streams: 2, geometry)
        for stream in 0..<2 { _ = try session.receive(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0), on: .bulk(stream)) }
        _ = try session.receive(Self.bitmap(geometry, words: [0xFF] + Array(repeating: 0, count: 31)), on: .bulk(0))
        _ = try session.receive(.switchover(stalePages: 8, sourcePausedAtNanos: 1), on: .bulk(0))
        #expect(try session.receive(Self.page(3, seed: 4), on: .bulk(1))
            == .writePostcopy(PageRun(first: 3, count: 1), Sessions.data(pages: 1, seed: 4), requestID: 0),
            "in postcopy a page is written only while stale, whatever brings it")
        #expect(refusal { try session.receive(.imageDigest(Sessions.digest), on: .bulk(1)) }
            == .unexpected(.imageDigest, phase: .postcopy, stream: .bulk(1)))
        let paused = session.connectionLost(epoch: session.epoch, at: 10)
        #expect(paused)
        #expect(refusal { try session.hello(Self.hello(.bulk(0), of: 3, geometry, resume: true)) }
            == .streamCountMismatch(migration: 2, hello: 3))
        for stream in [AgentStream.urgent, .bulk(1)] {
            _ = try session.hello(Self.hello(stream, of: 2, geometry, resume: true), at: 20)
            #expect(session.phase == .paused && session.rejoining)
        }
        _ = try session.hello(Self.hello(.bulk(0), of: 2, geometry, resume: true), at: 30)
        #expect(session.phase == .postcopy && session.lastPauseNanos == 20)
    }

    /// A discarded migration says so to any HELLO, whatever its count.
    @Test func aDiscardedMigrationSaysSoWhateverTheCount() throws {
        let geometry = try Self.geometry()
        var session = try Self.precopy(streams: 2, geometry)
        for stream in 0..<2 { _ = try session.receive(.roundEnd(round: 1, pagesSent: 0, dirtyPages: 0), on: .bulk(stream)) }
        _ = try session.receive(Self.bitmap(geometry, words: Array(repeating: 0, count: 32)), on: .bulk)
        _ = try session.receive(.switchover(stalePages: 0, sourcePausedAtNanos: 1, handOver: true), on: .bulk)
        _ = try session.receive(.discard(reason: "QMP: failed"), on: .bulk)
        #expect(session.phase == .discarded)
        #expect(refusal { try session.hello(Self.hello(.bulk(0), of: 3, geometry, resume: true)) } == .discarded)
    }

    /// A daemon that took a migration over knows no count: the first
    /// rejoining HELLO sets it, and every other must agree.
    @Test func aTakenOverMigrationLearnsItsCountFromTheRejoin() throws {
        let geometry = try Self.geometry()
        var session = DestinationSession(takingOver: Sessions.migrationID, geometry: geometry,
                                         secretDigest: MigrationSecret.test.digest)
        #expect(session.bulkStreams == nil)
        _ = try session.hello(Self.hello(.bulk(3), of: 4, geometry, resume: true))
        #expect(session.bulkStreams == 4)
        #expect(refusal { try session.hello(Self.hello(.urgent, of: 1, geometry, resume: true)) }
            == .streamCountMismatch(migration: 4, hello: 1))
        for stream in [AgentStream.bulk(0), .bulk(1), .bulk(2)] {
            _ = try session.hello(Self.hello(stream, of: 4, geometry, resume: true))
        }
        #expect(session.phase == .paused)
        _ = try session.hello(Self.hello(.urgent, of: 4, geometry, resume: true))
        #expect(session.phase == .postcopy)
    }
}
