import PostcopyCore
import Testing

/// Sessions in each phase, and the messages that drive them.
enum Sessions {
    static let migrationID = MigrationID(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210)
    static let otherID = MigrationID(high: 0x1111_1111_1111_1111, low: 0x2222_2222_2222_2222)
    static let digest = ImageDigest(bytes: (0..<32).map { UInt8($0 * 5 + 1) })!

    /// 64 pages of 4 KiB: one bitmap word.
    static func geometry(pages: UInt64 = 64) throws -> PageGeometry {
        try PageGeometry(regionSize: pages * 4096, pageSize: .small)
    }

    static func hello(_ role: StreamRole, id: MigrationID = migrationID, regionSize: UInt64,
                      pageSize: PageSize = .small) -> Message {
        .hello(migrationID: id, role: role, sourcePageSize: pageSize, regionSize: regionSize, secret: .test)
    }

    /// Page data whose bytes differ from page to page.
    static func data(pages: Int, seed: UInt8) -> ArraySlice<UInt8> {
        (0..<(pages * Message.pageBytes)).map { UInt8(truncatingIfNeeded: $0 / 4096 &* 31 &+ $0 &+ Int(seed)) }[...]
    }

    /// Both connections said HELLO: precopy.
    static func precopy(_ geometry: PageGeometry, configured: MigrationID? = nil) throws -> DestinationSession {
        var session = DestinationSession(geometry: geometry, migrationID: configured)
        _ = try session.hello(hello(.bulk, regionSize: geometry.regionSize))
        _ = try session.hello(hello(.urgent, regionSize: geometry.regionSize))
        return session
    }

    /// Switched over with `words` as the dirty bitmap: postcopy (or, with
    /// `handOver`, the hand-over before it).
    static func postcopy(_ geometry: PageGeometry, words: [UInt64], handOver: Bool = false) throws -> DestinationSession {
        var session = try precopy(geometry)
        _ = try session.receive(.dirtyBitmap(totalBits: geometry.smallPageCount, firstWord: 0, words: words),
                                on: .bulk)
        let stale = words.reduce(0) { $0 + UInt64($1.nonzeroBitCount) }
        _ = try session.receive(.switchover(stalePages: stale, sourcePausedAtNanos: 1, handOver: handOver),
                                on: .bulk)
        return session
    }

    /// The source's digest in, every page in place, and complete.
    static func complete(_ session: inout DestinationSession) throws {
        _ = try session.receive(.imageDigest(digest), on: .bulk)
        let completes = session.pagesComplete()
        #expect(completes)
        session.complete()
    }
}

/// The error `body` throws, or nil when it returns. (The session's methods
/// throw only `SessionError`; anything else is recorded as an issue.)
func refusal<T>(_ body: () throws -> T) -> SessionError? {
    do {
        _ = try body()
        return nil
    } catch let error as SessionError {
        return error
    } catch {
        Issue.record("not a SessionError: \(error)")
        return nil
    }
}

@Suite struct DestinationSessionTests {
    // MARK: Handshake

    @Test func bothHellosStartPrecopyAndAreWelcomed() throws {
        let geometry = try Sessions.geometry()
        var session = DestinationSession(geometry: geometry)
        #expect(session.phase == .handshake)
        #expect(session.migrationID == nil)

        let bulk = try session.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize))
        #expect(bulk.stream == .bulk)
        #expect(bulk.welcome == .welcome(regionSize: geometry.regionSize, destinationPageSize: .small))
        #expect(session.phase == .handshake)
        #expect(session.migrationID == Sessions.migrationID)

        let urgent = try session.hello(Sessions.hello(.urgent, regionSize: geometry.regionSize))
        #expect(urgent.stream == .urgent)
        #expect(urgent.welcome == .welcome(regionSize: geometry.regionSize, destinationPageSize: .small))
        #expect(session.phase == .precopy)
    }

    @Test func theUrgentConnectionMayArriveFirst() throws {
        let geometry = try Sessions.geometry()
        var session = DestinationSession(geometry: geometry, migrationID: Sessions.migrationID)
        #expect(try session.hello(Sessions.hello(.urgent, regionSize: geometry.regionSize)).stream == .urgent)
        #expect(session.phase == .handshake)
        #expect(try session.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize)).stream == .bulk)
        #expect(session.phase == .precopy)
    }

    @Test func welcomeCarriesTheDestinationsPageSize() throws {
        let geometry = try PageGeometry(regionSize: 4 * PageSize.huge2M.bytes, pageSize: .huge2M)
        var session = DestinationSession(geometry: geometry)
        let answer = try session.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize, pageSize: .small))
        #expect(answer.welcome == .welcome(regionSize: 8_388_608, destinationPageSize: .huge2M))
    }

    @Test func aHelloForAnotherRegionSizeIsRefused() throws {
        let geometry = try Sessions.geometry()
        var session = DestinationSession(geometry: geometry)
        let error = refusal { try session.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize * 2)) }
        #expect(error == .regionSizeMismatch(source: geometry.regionSize * 2, destination: geometry.regionSize))
        #expect(error?.code == .incompatible)
        // Refused: nothing was recorded, not even the migration.
        #expect(session.migrationID == nil)
        #expect(session.phase == .handshake)
        #expect(try session.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize)).stream == .bulk)
    }

    @Test func aHelloForAnotherMigrationIsRefusedWhenOneIsConfigured() throws {
        let geometry = try Sessions.geometry()
        var session = DestinationSession(geometry: geometry, migrationID: Sessions.migrationID)
        let error = refusal {
            try session.hello(Sessions.hello(.bulk, id: Sessions.otherID, regionSize: geometry.regionSize))
        }
        #expect(error == .wrongMigration(expected: Sessions.migrationID, got: Sessions.otherID))
        #expect(error?.code == .unexpectedMessage)
        #expect(session.migrationID == Sessions.migrationID)
        #expect(try session.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize)).stream == .bulk)
    }

    @Test func theSecondConnectionMustBelongToTheFirstOnesMigration() throws {
        let geometry = try Sessions.geometry()
        var session = DestinationSession(geometry: geometry)
        _ = try session.hello(Sessions.hello(.bulk, id: Sessions.otherID, regionSize: geometry.regionSize))
        #expect(session.migrationID == Sessions.otherID)
        let error = refusal { try session.hello(Sessions.hello(.urgent, regionSize: geometry.regionSize)) }
        #expect(error == .wrongMigration(expected: Sessions.otherID, got: Sessions.migrationID))
        #expect(session.phase == .handshake)
    }

    @Test func aSecondHelloForTheSameRoleIsRefused() throws {
        let geometry = try Sessions.geometry()
        var session = DestinationSession(geometry: geometry)
        _ = try session.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize))
        let error = refusal { try session.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize)) }
        #expect(error == .duplicateConnection(.bulk))
        #expect(error?.code == .unexpectedMessage)
        #expect(session.phase == .handshake)

        // Once both are connected, any further HELLO has no place.
        _ = try session.hello(Sessions.hello(.urgent, regionSize: geometry.regionSize))
        #expect(refusal { try session.hello(Sessions.hello(.urgent, regionSize: geometry.regionSize)) }
            == .unexpected(.hello, phase: .precopy, stream: .urgent))
        #expect(session.phase == .precopy)
    }

    @Test func aConnectionMustStartWithHello() throws {
        let geometry = try Sessions.geometry()
        var session = DestinationSession(geometry: geometry)
        let pages = Message.pages(requestID: 0, firstPage: 0, data: Sessions.data(pages: 1, seed: 1))
        let error = refusal { try session.hello(pages) }
        #expect(error == .unexpected(.pages, phase: .handshake, stream: nil))
        #expect(error?.description == "unexpected PAGES during handshake")
        #expect(refusal { try session.hello(.heartbeat) } == .unexpected(.heartbeat, phase: .handshake, stream: nil))
        #expect(session.phase == .handshake)
    }

    @Test func nothingButHeartbeatAndErrorIsAcceptedBeforeBothConnectionsAreUp() throws {
        let geometry = try Sessions.geometry()
        var session = DestinationSession(geometry: geometry)
        _ = try session.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize))
        let pages = Message.pages(requestID: 0, firstPage: 0, data: Sessions.data(pages: 1, seed: 1))
        #expect(refusal { try session.receive(pages, on: .bulk) } == .unexpected(.pages, phase: .handshake, stream: .bulk))
        #expect(try session.receive(.heartbeat, on: .bulk) == Action.none)
    }

    // MARK: Precopy

    @Test func precopyPagesOnTheBulkConnectionAreWritten() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.precopy(geometry)
        let data = Sessions.data(pages: 3, seed: 9)
        let action = try session.receive(.pages(requestID: 0, firstPage: 5, data: data), on: .bulk)
        #expect(action == .writePrecopy(PageRun(first: 5, count: 3), data))
        // The last pages of the region are in bounds.
        let last = Sessions.data(pages: 1, seed: 2)
        #expect(try session.receive(.pages(requestID: 0, firstPage: 63, data: last), on: .bulk)
            == .writePrecopy(PageRun(first: 63, count: 1), last))
        #expect(try session.receive(.zeroPages(firstPage: 10, count: 4), on: .bulk)
            == .zeroPrecopy(PageRun(first: 10, count: 4)))
        #expect(try session.receive(.roundEnd(round: 1, pagesSent: 60, dirtyPages: 7), on: .bulk)
            == .roundEnded(round: 1, pagesSent: 60, dirtyPages: 7))
        #expect(session.phase == .precopy)
    }

    @Test func precopyPagesWithARequestIDOrOnTheUrgentConnectionAreRefused() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.precopy(geometry)
        let data = Sessions.data(pages: 1, seed: 3)
        #expect(refusal { try session.receive(.pages(requestID: 7, firstPage: 0, data: data), on: .bulk) }
            == .unexpected(.pages, phase: .precopy, stream: .bulk))
        #expect(refusal { try session.receive(.pages(requestID: 0, firstPage: 0, data: data), on: .urgent) }
            == .unexpected(.pages, phase: .precopy, stream: .urgent))
        #expect(refusal { try session.receive(.pages(requestID: 7, firstPage: 0, data: data), on: .urgent) }
            == .unexpected(.pages, phase: .precopy, stream: .urgent))
        #expect(refusal { try session.receive(.zeroPages(firstPage: 0, count: 1), on: .urgent) }
            == .unexpected(.zeroPages, phase: .precopy, stream: .urgent))
        #expect(refusal { try session.receive(.roundEnd(round: 1, pagesSent: 1, dirtyPages: 0), on: .urgent) }
            == .unexpected(.roundEnd, phase: .precopy, stream: .urgent))
        #expect(session.phase == .precopy)
    }

    @Test func pagesOutsideTheRegionAreMalformedWhateverThePhaseOrConnection() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.precopy(geometry)
        let twoPages = Sessions.data(pages: 2, seed: 4)
        let error = refusal { try session.receive(.pages(requestID: 0, firstPage: 63, data: twoPages), on: .bulk) }
        #expect(error == .malformed(.pageRangeOutOfBounds(type: .pages, firstPage: 63, count: 2, regionPages: 64)))
        #expect(error?.code == .outOfRange)
        #expect(error?.description == "page range 63..<65 outside the region's 64 pages")
        // Checked before the phase and connection: this would otherwise be unexpected.
        #expect(refusal { try session.receive(.pages(requestID: 9, firstPage: 64, data: twoPages), on: .urgent) }
            == .malformed(.pageRangeOutOfBounds(type: .pages, firstPage: 64, count: 2, regionPages: 64)))
        #expect(refusal { try session.receive(.zeroPages(firstPage: UInt64.max, count: 2), on: .bulk) }
            == .malformed(.pageRangeOutOfBounds(type: .zeroPages, firstPage: UInt64.max, count: 2, regionPages: 64)))
        #expect(session.phase == .precopy)

        var postcopy = try Sessions.postcopy(geometry, words: [0b1])
        #expect(refusal { try postcopy.receive(.pages(requestID: 5, firstPage: 100, data: twoPages), on: .urgent) }
            == .malformed(.pageRangeOutOfBounds(type: .pages, firstPage: 100, count: 2, regionPages: 64)))
        #expect(refusal { try postcopy.receive(.zeroPages(firstPage: 60, count: 5), on: .bulk) }
            == .malformed(.pageRangeOutOfBounds(type: .zeroPages, firstPage: 60, count: 5, regionPages: 64)))
    }

    // MARK: Switchover

    @Test func aBitmapSplitOverTwoFramesThenSwitchoverStartsPostcopy() throws {
        // 130 pages: three words, the last holding two bits.
        let geometry = try Sessions.geometry(pages: 130)
        var session = try Sessions.precopy(geometry)
        let words: [UInt64] = [0x8000_0000_0000_0001, 0x0F0F_0000_0000_00F0, 0b10]
        #expect(try session.receive(.dirtyBitmap(totalBits: 130, firstWord: 0, words: Array(words[0..<2])), on: .bulk)
            == Action.none)
        #expect(session.phase == .switchingOver)
        #expect(try session.receive(.heartbeat, on: .urgent) == Action.none)
        #expect(try session.receive(.dirtyBitmap(totalBits: 130, firstWord: 2, words: [words[2]]), on: .bulk)
            == Action.none)
        #expect(session.phase == .switchingOver)

        let stale = try #require(PageBitmap(words: words, count: 130))
        let action = try session.receive(.switchover(stalePages: 2 + 12 + 1, sourcePausedAtNanos: 123_456_789), on: .bulk)
        #expect(action == .switchover(stale: stale, sourcePausedAtNanos: 123_456_789, handOver: false))
        guard case let .switchover(received, _, _) = action else { return }
        #expect(received.setIndices == [0, 63, 68, 69, 70, 71, 112, 113, 114, 115, 120, 121, 122, 123, 129])
        #expect(session.phase == .postcopy)
    }

    @Test func anEmptyBitmapSwitchesOverWithNothingStale() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.precopy(geometry)
        _ = try session.receive(.dirtyBitmap(totalBits: 64, firstWord: 0, words: [0]), on: .bulk)
        let action = try session.receive(.switchover(stalePages: 0, sourcePausedAtNanos: 0),
                                         on: .bulk)
        #expect(action == .switchover(stale: PageBitmap(count: 64), sourcePausedAtNanos: 0, handOver: false))
    }

    @Test func bitmapFramesMustArriveInOrder() throws {
        let geometry = try Sessions.geometry(pages: 192)
        var skipsFirst = try Sessions.precopy(geometry)
        let first = refusal { try skipsFirst.receive(.dirtyBitmap(totalBits: 192, firstWord: 1, words: [1]), on: .bulk) }
        #expect(first == .bitmapOutOfOrder(expectedWord: 0, got: 1))
        #expect(first?.code == .unexpectedMessage)
        #expect(first?.description == "DIRTY_BITMAP frame starts at word 1, expected word 0")

        var skipsMiddle = try Sessions.precopy(geometry)
        _ = try skipsMiddle.receive(.dirtyBitmap(totalBits: 192, firstWord: 0, words: [1]), on: .bulk)
        #expect(refusal { try skipsMiddle.receive(.dirtyBitmap(totalBits: 192, firstWord: 2, words: [1]), on: .bulk) }
            == .bitmapOutOfOrder(expectedWord: 1, got: 2))

        var repeats = try Sessions.precopy(geometry)
        _ = try repeats.receive(.dirtyBitmap(totalBits: 192, firstWord: 0, words: [1, 2]), on: .bulk)
        #expect(refusal { try repeats.receive(.dirtyBitmap(totalBits: 192, firstWord: 1, words: [4]), on: .bulk) }
            == .bitmapOutOfOrder(expectedWord: 2, got: 1))
    }

    @Test func bitmapFramesAreCheckedAgainstTheRegion() throws {
        let geometry = try Sessions.geometry(pages: 130)
        var session = try Sessions.precopy(geometry)
        #expect(refusal { try session.receive(.dirtyBitmap(totalBits: 128, firstWord: 0, words: [1, 1]), on: .bulk) }
            == .malformed(.bitmapSizeMismatch(totalBits: 128, regionPages: 130)))
        #expect(refusal { try session.receive(.dirtyBitmap(totalBits: 130, firstWord: 2, words: [0b100]), on: .bulk) }
            == .malformed(.bitmapStrayBits(totalBits: 130, lastWord: 0b100)))
        #expect(refusal { try session.receive(.dirtyBitmap(totalBits: 130, firstWord: 2, words: [0, 0]), on: .bulk) }
            == .malformed(.bitmapWordsOutOfBounds(firstWord: 2, wordCount: 2, totalBits: 130)))
        // Refused before anything changed.
        #expect(session.phase == .precopy)
        // Only the bulk connection carries the bitmap.
        #expect(refusal { try session.receive(.dirtyBitmap(totalBits: 130, firstWord: 0, words: [1]), on: .urgent) }
            == .unexpected(.dirtyBitmap, phase: .precopy, stream: .urgent))
    }

    @Test func switchoverBeforeTheWholeBitmapIsRefused() throws {
        let geometry = try Sessions.geometry(pages: 192)
        var session = try Sessions.precopy(geometry)
        _ = try session.receive(.dirtyBitmap(totalBits: 192, firstWord: 0, words: [0b1]), on: .bulk)
        let error = refusal {
            try session.receive(.switchover(stalePages: 1, sourcePausedAtNanos: 5),
                                on: .bulk)
        }
        #expect(error == .bitmapIncomplete(words: 1, expected: 3))
        #expect(error?.code == .protocolViolation)
        #expect(error?.description == "SWITCHOVER after 1 of the dirty bitmap's 3 words")
        #expect(session.phase == .switchingOver)
    }

    @Test func switchoverMustAnnounceTheBitmapsStaleCount() throws {
        let geometry = try Sessions.geometry(pages: 128)
        var session = try Sessions.precopy(geometry)
        _ = try session.receive(.dirtyBitmap(totalBits: 128, firstWord: 0, words: [0b1011, 1 << 63]), on: .bulk)
        for announced: UInt64 in [3, 5, 0] {
            let error = refusal {
                try session.receive(.switchover(stalePages: announced, sourcePausedAtNanos: 5), on: .bulk)
            }
            #expect(error == .staleCountMismatch(announced: announced, bitmap: 4))
            #expect(error?.code == .protocolViolation)
        }
        #expect(session.phase == .switchingOver)
        let action = try session.receive(.switchover(stalePages: 4, sourcePausedAtNanos: 5),
                                         on: .bulk)
        #expect(action == .switchover(stale: PageBitmap(words: [0b1011, 1 << 63], count: 128)!,
                                      sourcePausedAtNanos: 5, handOver: false))
    }

    @Test func switchoverWithoutABitmapIsUnexpected() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.precopy(geometry)
        let switchover = Message.switchover(stalePages: 0, sourcePausedAtNanos: 5)
        let error = refusal { try session.receive(switchover, on: .bulk) }
        #expect(error == .unexpected(.switchover, phase: .precopy, stream: .bulk))
        #expect(error?.description == "unexpected SWITCHOVER on the bulk connection during precopy")
        #expect(session.phase == .precopy)
    }

    @Test func onlyTheBitmapAndSwitchoverHaveAPlaceDuringSwitchover() throws {
        let geometry = try Sessions.geometry(pages: 128)
        var session = try Sessions.precopy(geometry)
        _ = try session.receive(.dirtyBitmap(totalBits: 128, firstWord: 0, words: [1]), on: .bulk)
        let data = Sessions.data(pages: 1, seed: 5)
        let error = refusal { try session.receive(.pages(requestID: 0, firstPage: 0, data: data), on: .bulk) }
        #expect(error == .unexpected(.pages, phase: .switchingOver, stream: .bulk))
        #expect(error?.description == "unexpected PAGES on the bulk connection during switchover")
        #expect(refusal { try session.receive(.zeroPages(firstPage: 0, count: 1), on: .bulk) }
            == .unexpected(.zeroPages, phase: .switchingOver, stream: .bulk))
        #expect(refusal {
            try session.receive(.switchover(stalePages: 1, sourcePausedAtNanos: 1),
                                on: .urgent)
        } == .unexpected(.switchover, phase: .switchingOver, stream: .urgent))
    }

    // MARK: Postcopy

    @Test func postcopyPagesAreBackgroundOnBulkAndRequestedOnUrgent() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.postcopy(geometry, words: [0xFF00])
        #expect(session.phase == .postcopy)
        let data = Sessions.data(pages: 2, seed: 6)
        #expect(try session.receive(.pages(requestID: 0, firstPage: 8, data: data), on: .bulk)
            == .writePostcopy(PageRun(first: 8, count: 2), data, requestID: 0))
        #expect(try session.receive(.pages(requestID: 7, firstPage: 12, data: data), on: .urgent)
            == .writePostcopy(PageRun(first: 12, count: 2), data, requestID: 7))
        #expect(try session.receive(.zeroPages(firstPage: 9, count: 3), on: .bulk) == .zeroPostcopy(PageRun(first: 9, count: 3)))
        #expect(try session.receive(.zeroPages(firstPage: 14, count: 1), on: .urgent)
            == .zeroPostcopy(PageRun(first: 14, count: 1)))
        #expect(session.phase == .postcopy)
    }

    @Test func postcopyPagesOnTheWrongConnectionAreRefused() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.postcopy(geometry, words: [0xFF00])
        let data = Sessions.data(pages: 1, seed: 7)
        let error = refusal { try session.receive(.pages(requestID: 0, firstPage: 8, data: data), on: .urgent) }
        #expect(error == .unexpected(.pages, phase: .postcopy, stream: .urgent))
        #expect(error?.description == "unexpected PAGES on the urgent connection during postcopy")
        #expect(refusal { try session.receive(.pages(requestID: 7, firstPage: 8, data: data), on: .bulk) }
            == .unexpected(.pages, phase: .postcopy, stream: .bulk))
        // Precopy and switchover messages have no place any more.
        #expect(refusal { try session.receive(.roundEnd(round: 9, pagesSent: 1, dirtyPages: 1), on: .bulk) }
            == .unexpected(.roundEnd, phase: .postcopy, stream: .bulk))
        #expect(refusal { try session.receive(.dirtyBitmap(totalBits: 64, firstWord: 0, words: [1]), on: .bulk) }
            == .unexpected(.dirtyBitmap, phase: .postcopy, stream: .bulk))
        #expect(refusal {
            try session.receive(.switchover(stalePages: 8, sourcePausedAtNanos: 1),
                                on: .bulk)
        } == .unexpected(.switchover, phase: .postcopy, stream: .bulk))
        #expect(refusal { try session.receive(.pageRequest(requestID: 1, firstPage: 0, count: 1), on: .urgent) }
            == .unexpected(.pageRequest, phase: .postcopy, stream: .urgent))
        #expect(refusal { try session.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize)) }
            == .postcopyInProgress)
    }

    // MARK: Pause and rejoin

    static func resuming(_ role: StreamRole, _ geometry: PageGeometry, id: MigrationID = Sessions.migrationID) -> Message {
        .hello(migrationID: id, role: role, sourcePageSize: .small, regionSize: geometry.regionSize, secret: .test, resume: true)
    }

    @Test func aLostConnectionPausesPostcopyOncePerGeneration() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.postcopy(geometry, words: [0xFF])
        #expect(session.epoch == 0)
        let paused = session.connectionLost(epoch: 0)
        #expect(paused)
        #expect(session.phase == .paused && session.epoch == 1 && session.pauses == 1)
        // The other connection of the same generation reports it too: nothing more.
        let again = session.connectionLost(epoch: 0)
        #expect(!again)
        #expect(session.pauses == 1)
        // Pages already on their way are still admitted while paused.
        let data = Sessions.data(pages: 1, seed: 3)
        #expect(try session.receive(.pages(requestID: 0, firstPage: 2, data: data), on: .bulk)
            == .writePostcopy(PageRun(first: 2, count: 1), data, requestID: 0))
        #expect(try session.receive(.zeroPages(firstPage: 3, count: 1), on: .urgent) == .zeroPostcopy(PageRun(first: 3, count: 1)))
    }

    @Test func aLostConnectionBeforeSwitchoverDoesNotPause() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.precopy(geometry)
        let paused = session.connectionLost(epoch: 0)
        #expect(!paused)
        #expect(session.phase == .precopy && session.epoch == 0)
    }

    @Test func bothConnectionsRejoiningResumePostcopy() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.postcopy(geometry, words: [0xFF])
        _ = session.connectionLost(epoch: 0)
        let bulk = try session.hello(Self.resuming(.bulk, geometry))
        #expect(bulk.stream == .bulk && session.phase == .paused)
        // An agent that died half-way through rejoining: its successor's bulk replaces it.
        #expect(try session.hello(Self.resuming(.bulk, geometry)).stream == .bulk)
        #expect(try session.hello(Self.resuming(.urgent, geometry)).stream == .urgent)
        #expect(session.phase == .postcopy && session.epoch == 1)
        // Yet another rejoin gives this generation up in turn.
        _ = try session.hello(Self.resuming(.urgent, geometry))
        #expect(session.phase == .paused && session.epoch == 2 && session.pauses == 2)
    }

    @Test func aRejoinWhileTheOldConnectionsLookAliveGivesThemUp() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.postcopy(geometry, words: [0xFF])
        _ = try session.hello(Self.resuming(.urgent, geometry))
        #expect(session.phase == .paused && session.epoch == 1 && session.pauses == 1)
        // News from the generation given up changes nothing.
        let paused = session.connectionLost(epoch: 0)
        #expect(!paused)
        _ = try session.hello(Self.resuming(.bulk, geometry))
        #expect(session.phase == .postcopy)
    }

    @Test func resumingHellosAreRefusedOutsidePostcopy() throws {
        let geometry = try Sessions.geometry()
        var handshake = DestinationSession(geometry: geometry)
        #expect(refusal { try handshake.hello(Self.resuming(.bulk, geometry)) } == .nothingToResume(phase: .handshake))
        var precopy = try Sessions.precopy(geometry)
        #expect(refusal { try precopy.hello(Self.resuming(.bulk, geometry)) } == .nothingToResume(phase: .precopy))
        var complete = try Sessions.postcopy(geometry, words: [0])
        try Sessions.complete(&complete)
        #expect(refusal { try complete.hello(Self.resuming(.bulk, geometry)) } == .nothingToResume(phase: .complete))
        var paused = try Sessions.postcopy(geometry, words: [1])
        _ = paused.connectionLost(epoch: 0)
        #expect(refusal { try paused.hello(Self.resuming(.bulk, geometry, id: Sessions.otherID)) }
            == .wrongMigration(expected: Sessions.migrationID, got: Sessions.otherID))
        #expect(refusal { try paused.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize)) }
            == .postcopyInProgress)
        #expect(SessionError.postcopyInProgress.description.contains("postcopy-push --resume"))
    }

    @Test func aPausedSessionCanComplete() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.postcopy(geometry, words: [1])
        _ = session.connectionLost(epoch: 0)
        try Sessions.complete(&session)
        #expect(session.phase == .complete)
    }

    @Test func completeEndsTheSession() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.postcopy(geometry, words: [0])
        try Sessions.complete(&session)
        #expect(session.phase == .complete)
        let data = Sessions.data(pages: 1, seed: 8)
        #expect(refusal { try session.receive(.pages(requestID: 0, firstPage: 0, data: data), on: .bulk) }
            == .unexpected(.pages, phase: .complete, stream: .bulk))
        #expect(refusal { try session.receive(.zeroPages(firstPage: 0, count: 1), on: .bulk) }
            == .unexpected(.zeroPages, phase: .complete, stream: .bulk))
    }

    // MARK: The image digest

    static let otherDigest = ImageDigest(bytes: [UInt8](repeating: 0xEE, count: 32))!

    /// A session in each phase an IMAGE_DIGEST may meet, named.
    static func sessionsByPhase(_ geometry: PageGeometry) throws -> [(String, DestinationSession)] {
        var handshake = DestinationSession(geometry: geometry)
        _ = try handshake.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize))
        var switchingOver = try Sessions.precopy(geometry)
        _ = try switchingOver.receive(.dirtyBitmap(totalBits: 64, firstWord: 0, words: [1]), on: .bulk)
        var paused = try Sessions.postcopy(geometry, words: [1])
        _ = paused.connectionLost(epoch: 0)
        var rejoined = try Sessions.postcopy(geometry, words: [1])
        _ = rejoined.connectionLost(epoch: 0)
        _ = try rejoined.hello(Self.resuming(.bulk, geometry))
        _ = try rejoined.hello(Self.resuming(.urgent, geometry))
        var takenOver = DestinationSession(takingOver: Sessions.migrationID, geometry: geometry,
                                           secretDigest: MigrationSecret.test.digest)
        _ = try takenOver.hello(Self.resuming(.bulk, geometry))
        _ = try takenOver.hello(Self.resuming(.urgent, geometry))
        return [
            ("handshake", handshake), ("precopy", try Sessions.precopy(geometry)), ("switchover", switchingOver),
            ("postcopy", try Sessions.postcopy(geometry, words: [1])), ("paused", paused),
            ("rejoined", rejoined), ("taken over, rejoined", takenOver),
        ]
    }

    /// The receivers decide postcopy's page frames without the session
    /// (`postcopyPages`): in every phase that serves pages, for every role
    /// and every kind of page frame, valid or not, that decision is exactly
    /// what `receive` decides, and `receive` changes nothing for them.
    @Test func pageFramesDecidedWithoutTheSessionAgreeWithIt() throws {
        let geometry = try Sessions.geometry()
        let frames: [(String, Message)] = [
            ("background pages", .pages(requestID: 0, firstPage: 3, data: Sessions.data(pages: 2, seed: 1))),
            ("requested pages", .pages(requestID: 7, firstPage: 3, data: Sessions.data(pages: 1, seed: 2))),
            ("zero pages", .zeroPages(firstPage: 10, count: 4)),
            ("pages past the region", .pages(requestID: 0, firstPage: 63, data: Sessions.data(pages: 2, seed: 3))),
            ("zero pages past the region", .zeroPages(firstPage: 60, count: 5)),
        ]
        var handOver = try Sessions.postcopy(geometry, words: [1], handOver: true)
        #expect(handOver.phase == .handover)
        var phases = try Self.sessionsByPhase(geometry).filter { $0.1.phase.servesPostcopy }
        phases.append(("hand-over", handOver))
        _ = handOver.connectionLost(epoch: handOver.epoch)
        phases.append(("hand-over, paused", handOver))
        #expect(Set(phases.map(\.1.phase)) == [.postcopy, .paused, .handover])
        for (name, original) in phases {
            for role in AgentStream.all(bulkStreams: 1) {
                for (frame, message) in frames {
                    var session = original
                    let expected = Result { () throws(SessionError) in try session.receive(message, on: role) }
                    let alone = Result { () throws(SessionError) in
                        try DestinationSession.postcopyPages(message, on: role, limits: session.limits)
                    }
                    switch (expected, alone) {
                    case let (.success(action), .success(decided)):
                        #expect(decided == action, "\(name), \(role), \(frame)")
                    case let (.failure(error), .failure(decided)):
                        #expect(decided.code == error.code, "\(name), \(role), \(frame): \(decided) against \(error)")
                    default:
                        Issue.record("\(name), \(role), \(frame): receive gave \(expected), alone \(alone)")
                    }
                    #expect(session.phase == original.phase && session.epoch == original.epoch, "\(name)")
                }
            }
        }
        // Any other frame is not for it.
        #expect(try DestinationSession.postcopyPages(.heartbeat, on: .bulk, limits: RegionLimits(geometry)) == nil)
        #expect(try DestinationSession.postcopyPages(.imageDigest(Sessions.digest), on: .bulk,
                                                     limits: RegionLimits(geometry)) == nil)
    }

    /// IMAGE_DIGEST has a place on the bulk connection once postcopy began
    /// (RESUMED follows SWITCHOVER on the same thread), in any generation,
    /// and nowhere else.
    @Test func theDigestIsAcceptedOnlyOnBulkDuringPostcopy() throws {
        let geometry = try Sessions.geometry()
        let accepted: Set<String> = ["postcopy", "paused", "rejoined", "taken over, rejoined"]
        for (name, original) in try Self.sessionsByPhase(geometry) {
            for role in AgentStream.all(bulkStreams: 1) {
                var session = original
                let message = Message.imageDigest(Sessions.digest)
                if accepted.contains(name) && role == .bulk {
                    #expect(try session.receive(message, on: role) == .imageDigest(Sessions.digest, completes: false),
                            "\(name)")
                    #expect(session.imageDigest == Sessions.digest, "\(name)")
                } else {
                    let error = refusal { try session.receive(message, on: role) }
                    #expect(error == .unexpected(.imageDigest, phase: original.phase, stream: role), "\(name), \(role)")
                    #expect(error?.code == .unexpectedMessage)
                    #expect(session.imageDigest == nil, "\(name), \(role)")
                }
                #expect(session.phase == original.phase, "\(name), \(role)")
            }
        }
        var precopy = try Sessions.precopy(geometry)
        #expect(refusal { try precopy.receive(.imageDigest(Sessions.digest), on: .bulk) }?.description
            == "unexpected IMAGE_DIGEST on the bulk connection during precopy")
    }

    /// The agent sends the digest after RESUMED and again after every
    /// rejoin: the same value is harmless, in any generation and even once
    /// complete; another value is a protocol violation and changes nothing.
    @Test func theDigestMaySayItAgainButNeverChange() throws {
        let geometry = try Sessions.geometry()
        let cases: [(String, ImageDigest, Action?, SessionError?)] = [
            ("the same digest", Sessions.digest, Action.none, nil),
            ("another digest", Self.otherDigest, nil,
             .imageDigestChanged(known: Sessions.digest, got: Self.otherDigest)),
        ]
        for (name, second, action, error) in cases {
            var session = try Sessions.postcopy(geometry, words: [1])
            _ = try session.receive(.imageDigest(Sessions.digest), on: .bulk)
            var later = session
            _ = later.connectionLost(epoch: 0)
            _ = try later.hello(Self.resuming(.bulk, geometry))
            _ = try later.hello(Self.resuming(.urgent, geometry))
            var complete = session
            let completes = complete.pagesComplete()
            #expect(completes)
            complete.complete()
            for (when, original) in [("same generation", session), ("next generation", later), ("complete", complete)] {
                var copy = original
                if let action {
                    #expect(try copy.receive(.imageDigest(second), on: .bulk) == action, "\(name), \(when)")
                } else {
                    #expect(refusal { try copy.receive(.imageDigest(second), on: .bulk) } == error, "\(name), \(when)")
                }
                #expect(copy.imageDigest == Sessions.digest, "\(name), \(when)")
                #expect(copy.phase == original.phase, "\(name), \(when)")
            }
        }
        let changed = SessionError.imageDigestChanged(known: Sessions.digest, got: Self.otherDigest)
        #expect(changed.code == .protocolViolation)
        #expect(changed.description.hasPrefix("IMAGE_DIGEST \(Self.otherDigest) differs from the source's digest sent before, \(Sessions.digest)"))
    }

    /// Completion needs every page and the digest, in either order: the
    /// second of the two says it completes now.
    @Test func completionWaitsForEveryPageAndTheDigest() throws {
        let geometry = try Sessions.geometry()
        // (name, digest first, paused in between)
        let orders: [(String, Bool, Bool)] = [
            ("digest, then pages", true, false), ("pages, then digest", false, false),
            ("digest, then pages, paused", true, true), ("pages, then digest, paused", false, true),
        ]
        for (name, digestFirst, pause) in orders {
            var session = try Sessions.postcopy(geometry, words: [1])
            if digestFirst {
                #expect(try session.receive(.imageDigest(Sessions.digest), on: .bulk)
                    == .imageDigest(Sessions.digest, completes: false), "\(name)")
                #expect(!session.pagesInPlace, "\(name)")
            } else {
                let completes = session.pagesComplete()
                #expect(!completes, "\(name): complete without the digest")
                #expect(session.pagesInPlace && session.imageDigest == nil, "\(name)")
            }
            if pause { _ = session.connectionLost(epoch: 0) }
            #expect(session.phase == (pause ? .paused : .postcopy), "\(name): waits in postcopy")
            if digestFirst {
                let completes = session.pagesComplete()
                #expect(completes, "\(name)")
            } else {
                #expect(try session.receive(.imageDigest(Sessions.digest), on: .bulk)
                    == .imageDigest(Sessions.digest, completes: true), "\(name)")
            }
            session.complete()
            #expect(session.phase == .complete, "\(name)")
        }
        // A restarted daemon knows no digest until the rejoined agent sends it.
        var takenOver = DestinationSession(takingOver: Sessions.migrationID, geometry: geometry,
                                           secretDigest: MigrationSecret.test.digest)
        #expect(takenOver.imageDigest == nil)
        let completes = takenOver.pagesComplete()
        #expect(!completes)
        _ = try takenOver.hello(Self.resuming(.bulk, geometry))
        _ = try takenOver.hello(Self.resuming(.urgent, geometry))
        #expect(try takenOver.receive(.imageDigest(Sessions.digest), on: .bulk)
            == .imageDigest(Sessions.digest, completes: true))
    }

    // MARK: Any phase

    @Test func heartbeatAndErrorAreAcceptedInEveryPhase() throws {
        let geometry = try Sessions.geometry(pages: 128)
        var handshake = DestinationSession(geometry: geometry)
        _ = try handshake.hello(Sessions.hello(.bulk, regionSize: geometry.regionSize))
        let precopy = try Sessions.precopy(geometry)
        var switchingOver = try Sessions.precopy(geometry)
        _ = try switchingOver.receive(.dirtyBitmap(totalBits: 128, firstWord: 0, words: [1]), on: .bulk)
        let postcopy = try Sessions.postcopy(geometry, words: [1, 0])
        var complete = try Sessions.postcopy(geometry, words: [0, 0])
        try Sessions.complete(&complete)

        let phases: [(DestinationSession.Phase, DestinationSession)] = [
            (.handshake, handshake), (.precopy, precopy), (.switchingOver, switchingOver),
            (.postcopy, postcopy), (.complete, complete),
        ]
        for (phase, original) in phases {
            #expect(original.phase == phase)
            for role in AgentStream.all(bulkStreams: 1) {
                var session = original
                #expect(try session.receive(.heartbeat, on: role) == Action.none, "HEARTBEAT during \(phase)")
                #expect(session.phase == phase)
                #expect(try session.receive(.error(code: .cancelled, message: "operator said stop"), on: role)
                    == .peerFailed(code: .cancelled, message: "operator said stop"), "ERROR during \(phase)")
                #expect(try session.receive(.error(code: .unknown(4242), message: ""), on: role)
                    == .peerFailed(code: .unknown(4242), message: ""))
            }
        }
    }

    // MARK: The point of no return

    /// Without a hand-over the guest runs here from switchover on; with
    /// one, the session waits in `handover` until HANDED_OVER.
    @Test func aHandOverKeepsTheSourceResumableUntilHandedOver() throws {
        let geometry = try Sessions.geometry()
        let plain = try Sessions.postcopy(geometry, words: [0xFF])
        #expect(plain.phase == .postcopy && plain.pointOfNoReturnPassed && !plain.handOverPending)

        var session = try Sessions.postcopy(geometry, words: [0xFF], handOver: true)
        #expect(session.phase == .handover && !session.pointOfNoReturnPassed && session.handOverPending)
        // Pages are served during the hand-over as during postcopy.
        #expect(try session.receive(.pages(requestID: 0, firstPage: 1, data: Sessions.data(pages: 1, seed: 1)), on: .bulk)
            == .writePostcopy(PageRun(first: 1, count: 1), Sessions.data(pages: 1, seed: 1), requestID: 0))
        #expect(try session.receive(.handedOver, on: .bulk) == .handedOver(completes: false))
        #expect(session.phase == .postcopy && session.pointOfNoReturnPassed)
        // Said again after a rejoin: nothing changes.
        #expect(try session.receive(.handedOver, on: .bulk) == .none)
        #expect(refusal { try session.receive(.handedOver, on: .urgent) } == .unexpected(.handedOver, phase: .postcopy, stream: .urgent))
    }

    /// Completion needs the hand-over too, in whatever order the three
    /// things arrive; whichever is last says so.
    @Test func completionWaitsForTheHandOver() throws {
        let geometry = try Sessions.geometry()
        for order in [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
            var session = try Sessions.postcopy(geometry, words: [0xFF], handOver: true)
            var completed: [Bool] = []
            for step in order {
                switch step {
                case 0: completed.append(session.pagesComplete())
                case 1:
                    guard case let .imageDigest(_, completes) = try session.receive(.imageDigest(Sessions.digest), on: .bulk)
                    else { Issue.record("no digest action"); return }
                    completed.append(completes)
                default:
                    guard case let .handedOver(completes) = try session.receive(.handedOver, on: .bulk)
                    else { Issue.record("no hand-over action"); return }
                    completed.append(completes)
                }
            }
            #expect(completed == [false, false, true], "order \(order)")
            session.complete()
            #expect(session.phase == .complete)
        }
    }

    /// DISCARD before the point of no return ends the migration discarded;
    /// after it, it is refused (the guest may run here).
    @Test func discardIsOnlyForAHandOverStillPending() throws {
        let geometry = try Sessions.geometry()
        var pending = try Sessions.postcopy(geometry, words: [0xFF], handOver: true)
        #expect(try pending.receive(.discard(reason: "migration failed"), on: .bulk) == .discard(reason: "migration failed"))
        #expect(pending.phase == .discarded && !pending.pointOfNoReturnPassed)
        let completes = pending.pagesComplete()
        #expect(!completes)
        #expect(refusal { try pending.hello(Self.resuming(.bulk, geometry)) } == .discarded)
        #expect(refusal { try pending.receive(.pages(requestID: 0, firstPage: 1, data: Sessions.data(pages: 1, seed: 1)), on: .bulk) }
            == .unexpected(.pages, phase: .discarded, stream: .bulk))

        var plain = try Sessions.postcopy(geometry, words: [0xFF])
        #expect(refusal { try plain.receive(.discard(reason: "late"), on: .bulk) } == .discardPastPointOfNoReturn)
        var handedOver = try Sessions.postcopy(geometry, words: [0xFF], handOver: true)
        _ = try handedOver.receive(.handedOver, on: .bulk)
        #expect(refusal { try handedOver.receive(.discard(reason: "late"), on: .bulk) } == .discardPastPointOfNoReturn)
        #expect(handedOver.phase == .postcopy)
        // Before switchover there is nothing to discard: the agent fails the migration instead.
        var precopy = try Sessions.precopy(geometry)
        #expect(refusal { try precopy.receive(.discard(reason: "early"), on: .bulk) } == .unexpected(.discard, phase: .precopy, stream: .bulk))
    }

    /// A hand-over survives a lost connection: paused, the agent rejoins
    /// into `handover`, and may still discard.
    @Test func aLostConnectionDuringTheHandOverRejoinsIntoIt() throws {
        let geometry = try Sessions.geometry()
        var session = try Sessions.postcopy(geometry, words: [0xFF], handOver: true)
        let paused = session.connectionLost(epoch: 0)
        #expect(paused && session.phase == .paused && session.handOverPending)
        _ = try session.hello(Self.resuming(.bulk, geometry))
        _ = try session.hello(Self.resuming(.urgent, geometry))
        #expect(session.phase == .handover && session.epoch == 1)
        // HANDED_OVER arriving on a connection being given up counts too.
        let pausedAgain = session.connectionLost(epoch: 1)
        #expect(pausedAgain)
        #expect(try session.receive(.handedOver, on: .bulk) == .handedOver(completes: false))
        #expect(session.phase == .paused)
        _ = try session.hello(Self.resuming(.bulk, geometry))
        _ = try session.hello(Self.resuming(.urgent, geometry))
        #expect(session.phase == .postcopy)
    }

    /// A daemon taking over learns from the record's milestones whether the
    /// hand-over was still pending.
    @Test func aTakeoverKeepsTheRecordedHandOverState() throws {
        let geometry = try Sessions.geometry()
        let secret = MigrationSecret.test.digest
        var pending = DestinationSession(takingOver: Sessions.migrationID, geometry: geometry, secretDigest: secret,
                                         milestones: [.handOverPending, .vmmResumed])
        #expect(pending.handOverPending)
        _ = try pending.hello(Self.resuming(.bulk, geometry))
        _ = try pending.hello(Self.resuming(.urgent, geometry))
        #expect(pending.phase == .handover)
        let done = DestinationSession(takingOver: Sessions.migrationID, geometry: geometry, secretDigest: secret,
                                      milestones: [.handOverPending, .vmmResumed, .handedOver])
        #expect(!done.handOverPending && done.switchoverHadHandOver)
        let plain = DestinationSession(takingOver: Sessions.migrationID, geometry: geometry, secretDigest: secret)
        #expect(!plain.handOverPending && !plain.switchoverHadHandOver)
    }

    @Test func milestonesSayWhenThePointOfNoReturnPassed() {
        #expect(!PageStateMilestones().pointOfNoReturnPassed)
        #expect(PageStateMilestones.vmmResumed.pointOfNoReturnPassed)
        #expect(!PageStateMilestones([.handOverPending, .vmmResumed]).pointOfNoReturnPassed)
        #expect(PageStateMilestones([.handOverPending, .vmmResumed, .handedOver]).pointOfNoReturnPassed)
        #expect(PageStateMilestones([.handOverPending, .vmmResumed]).description == "hand-over pending, VMM resumed")
    }

    // MARK: Errors

    @Test func everySessionErrorHasTheCodeOfItsKind() {
        let cases: [(SessionError, ErrorCode)] = [
            (.malformed(.pageRangeOutOfBounds(type: .pages, firstPage: 1, count: 2, regionPages: 2)), .outOfRange),
            (.malformed(.bitmapSizeMismatch(totalBits: 1, regionPages: 2)), .incompatible),
            (.malformed(.zeroCount(type: .zeroPages)), .protocolViolation),
            (.unexpected(.pages, phase: .precopy, stream: .urgent), .unexpectedMessage),
            (.wrongMigration(expected: Sessions.migrationID, got: Sessions.otherID), .unexpectedMessage),
            (.regionSizeMismatch(source: 1, destination: 2), .incompatible),
            (.duplicateConnection(.urgent), .unexpectedMessage),
            (.bitmapOutOfOrder(expectedWord: 1, got: 2), .unexpectedMessage),
            (.bitmapIncomplete(words: 1, expected: 2), .protocolViolation),
            (.staleCountMismatch(announced: 1, bitmap: 2), .protocolViolation),
            (.imageDigestChanged(known: Sessions.digest, got: Self.otherDigest), .protocolViolation),
            (.discardPastPointOfNoReturn, .protocolViolation),
            (.discarded, .discarded),
        ]
        for (error, code) in cases {
            #expect(error.code == code, "\(error)")
        }
    }

    @Test func sessionErrorsNameTheProblem() {
        let malformed = ProtocolError.pageRangeOutOfBounds(type: .zeroPages, firstPage: 100, count: 20, regionPages: 110)
        #expect(SessionError.malformed(malformed).description == malformed.description)
        #expect(SessionError.unexpected(.roundEnd, phase: .postcopy, stream: .urgent).description
            == "unexpected ROUND_END on the urgent connection during postcopy")
        #expect(SessionError.unexpected(.welcome, phase: .handshake, stream: nil).description
            == "unexpected WELCOME during handshake")

        let wrong = SessionError.wrongMigration(expected: Sessions.migrationID, got: Sessions.otherID).description
        #expect(wrong.contains("0123456789abcdeffedcba9876543210"))
        #expect(wrong.contains("11111111111111112222222222222222"))
        #expect(wrong.hasPrefix("HELLO for migration 1111"))

        #expect(SessionError.regionSizeMismatch(source: 8192, destination: 262_144).description
            == "source region is 8192 bytes, destination region is 262144 bytes")
        #expect(SessionError.duplicateConnection(.urgent).description
            == "a second urgent connection for the same migration")
        #expect(SessionError.staleCountMismatch(announced: 5, bitmap: 4).description
            == "SWITCHOVER announces 5 stale pages, the dirty bitmap has 4")
    }
}

private typealias Action = DestinationSession.Action

/// The lost/rejoined race of issue 19, table-driven: a loss reported after
/// the rejoin that followed it must not close the rejoined generation.
@Suite struct GenerationGateTests {
    enum Event: CustomStringConvertible {
        case open(String, UInt64)
        case lost(UInt64)
        case shut
        var description: String {
            switch self {
            case let .open(target, generation): return "open \(target)@\(generation)"
            case let .lost(generation): return "lost \(generation)"
            case .shut: return "shut"
            }
        }
    }

    /// Name, the generation the gate waits for first, the news, where things go after.
    static let cases: [(String, UInt64, [Event], String?)] = [
        ("postcopy starts on generation 0", 0, [.open("u0", 0)], "u0"),
        ("a loss closes it", 0, [.open("u0", 0), .lost(0)], nil),
        ("a rejoin after the loss opens generation 1", 0, [.open("u0", 0), .lost(0), .open("u1", 1)], "u1"),
        ("the race: the loss of 0 reported after the rejoin of 1 changes nothing",
         0, [.open("u0", 0), .open("u1", 1), .lost(0)], "u1"),
        ("a rejoin that finds the old connections alive (superseded), then their loss",
         0, [.open("u0", 0), .open("u1", 1), .lost(0), .lost(0)], "u1"),
        ("the new generation's own loss still closes it", 0,
         [.open("u0", 0), .open("u1", 1), .lost(0), .lost(1)], nil),
        ("a late open of an older generation is refused", 0, [.open("u0", 0), .open("u2", 2), .open("u1", 1)], "u2"),
        ("a takeover waits closed for generation 1", 1, [], nil),
        ("and opens with it", 1, [.open("u1", 1)], "u1"),
        ("shut for good: a rejoin does not reopen it", 0, [.open("u0", 0), .shut, .open("u1", 1)], nil),
    ]

    @Test(arguments: 0..<cases.count)
    func theNewestGenerationWinsWhateverTheOrderOfTheNews(index: Int) {
        let (name, initial, events, expected) = Self.cases[index]
        var gate = GenerationGate<String>(generation: initial)
        for event in events {
            switch event {
            case let .open(target, generation): gate.open(target, generation: generation)
            case let .lost(generation): gate.close(lost: generation)
            case .shut: gate.shut()
            }
        }
        #expect(gate.target == expected, "\(name): \(events)")
    }

    /// Every interleaving of "generation g lost" with "generation g+1
    /// opened" ends open on g+1.
    @Test func everyOrderOfALossAndTheRejoinAfterItEndsOpen() {
        for lossFirst in [true, false] {
            var gate = GenerationGate<Int>()
            gate.open(0, generation: 0)
            if lossFirst {
                let closed = gate.close(lost: 0)
                let opened = gate.open(1, generation: 1)
                #expect(closed && opened)
            } else {
                let opened = gate.open(1, generation: 1)
                let closed = gate.close(lost: 0)
                #expect(opened && !closed)
            }
            #expect(gate.target == 1 && gate.generation == 1)
        }
    }
}
