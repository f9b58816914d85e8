import PostcopyCore
import Testing

/// The session's states seen through its public properties, table-driven:
/// what a state does not carry reads as absent in it, and what postcopy
/// has learnt goes through pauses, rejoins, completion and a discard.
@Suite struct DestinationSessionStateTests {
    /// Where a session starts: new, or taken over from a page-state record
    /// with these milestones, paused at a time.
    enum Start {
        case new
        case takenOver(PageStateMilestones, at: UInt64)
    }

    /// What a session goes through, each step accepted (64 pages).
    enum Step: CustomStringConvertible {
        case hello(StreamRole)
        /// DIRTY_BITMAP: eight stale pages in the region's one word.
        case bitmap
        case switchover(handOver: Bool)
        /// The current generation's connections lost at a time.
        case lost(at: UInt64)
        /// A resuming HELLO at a time.
        case rejoin(StreamRole, at: UInt64)
        case digest
        case pagesComplete
        case handedOver
        case discard
        case complete

        var description: String {
            switch self {
            case let .hello(role): return "HELLO \(role)"
            case .bitmap: return "DIRTY_BITMAP"
            case let .switchover(handOver): return handOver ? "SWITCHOVER with a hand-over" : "SWITCHOVER"
            case let .lost(now): return "lost at \(now)"
            case let .rejoin(role, now): return "rejoin \(role) at \(now)"
            case .digest: return "IMAGE_DIGEST"
            case .pagesComplete: return "every page in"
            case .handedOver: return "HANDED_OVER"
            case .discard: return "DISCARD"
            case .complete: return "complete"
            }
        }
    }

    static func session(_ start: Start, _ steps: [Step]) throws -> DestinationSession {
        let geometry = try Sessions.geometry()
        var session = switch start {
        case .new:
            DestinationSession(geometry: geometry)
        case let .takenOver(milestones, now):
            DestinationSession(takingOver: Sessions.migrationID, geometry: geometry,
                               secretDigest: MigrationSecret.test.digest, milestones: milestones, pausedAt: now)
        }
        for step in steps {
            switch step {
            case let .hello(role):
                _ = try session.hello(Sessions.hello(role, regionSize: geometry.regionSize))
            case .bitmap:
                _ = try session.receive(.dirtyBitmap(totalBits: 64, firstWord: 0, words: [0xFF]), on: .bulk)
            case let .switchover(handOver):
                _ = try session.receive(.switchover(stalePages: 8, sourcePausedAtNanos: 1, handOver: handOver), on: .bulk)
            case let .lost(now):
                let paused = session.connectionLost(epoch: session.epoch, at: now)
                #expect(paused, "\(step)")
            case let .rejoin(role, now):
                _ = try session.hello(DestinationSessionTests.resuming(role, geometry), at: now)
            case .digest:
                _ = try session.receive(.imageDigest(Sessions.digest), on: .bulk)
            case .pagesComplete:
                _ = session.pagesComplete()
            case .handedOver:
                _ = try session.receive(.handedOver, on: .bulk)
            case .discard:
                _ = try session.receive(.discard(reason: "the source runs again"), on: .bulk)
            case .complete:
                session.complete()
            }
        }
        return session
    }

    static let precopy: [Step] = [.hello(.bulk), .hello(.urgent)]
    static let postcopy = precopy + [.bitmap, .switchover(handOver: false)]
    static let handOver = precopy + [.bitmap, .switchover(handOver: true)]
    static let rejoin: [Step] = [.rejoin(.bulk, at: 9), .rejoin(.urgent, at: 12)]

    // MARK: What each state shows

    /// What the public properties say of a session.
    struct View: Equatable {
        var phase: DestinationSession.Phase
        var pausedSince: UInt64?
        var imageDigest: ImageDigest?
        var pagesInPlace = false
        var switchoverHadHandOver = false
        var handOverPending = false
        var pointOfNoReturnPassed = false
    }

    static let digest = Sessions.digest

    /// Name, start, steps, what the session shows after them.
    static let views: [(String, Start, [Step], View)] = [
        ("new", .new, [], View(phase: .handshake)),
        ("one connection", .new, [.hello(.urgent)], View(phase: .handshake)),
        ("precopy", .new, precopy, View(phase: .precopy)),
        ("switching over", .new, precopy + [.bitmap], View(phase: .switchingOver)),
        ("postcopy", .new, postcopy, View(phase: .postcopy, pointOfNoReturnPassed: true)),
        ("hand-over", .new, handOver, View(phase: .handover, switchoverHadHandOver: true, handOverPending: true)),
        ("handed over", .new, handOver + [.handedOver],
         View(phase: .postcopy, switchoverHadHandOver: true, pointOfNoReturnPassed: true)),
        ("paused", .new, postcopy + [.lost(at: 5)],
         View(phase: .paused, pausedSince: 5, pointOfNoReturnPassed: true)),
        ("half rejoined: still paused since the loss", .new, postcopy + [.lost(at: 5), .rejoin(.bulk, at: 9)],
         View(phase: .paused, pausedSince: 5, pointOfNoReturnPassed: true)),
        ("a role rejoining twice: still paused since the loss", .new,
         postcopy + [.lost(at: 5), .rejoin(.bulk, at: 9), .rejoin(.bulk, at: 10)],
         View(phase: .paused, pausedSince: 5, pointOfNoReturnPassed: true)),
        ("rejoined", .new, postcopy + [.lost(at: 5)] + rejoin, View(phase: .postcopy, pointOfNoReturnPassed: true)),
        ("a rejoin that finds the old connections alive pauses there", .new, postcopy + [.rejoin(.urgent, at: 7)],
         View(phase: .paused, pausedSince: 7, pointOfNoReturnPassed: true)),
        ("the digest and every page, paused", .new, postcopy + [.digest, .pagesComplete, .lost(at: 5)],
         View(phase: .paused, pausedSince: 5, imageDigest: digest, pagesInPlace: true, pointOfNoReturnPassed: true)),
        ("the digest and every page, rejoined", .new, postcopy + [.digest, .pagesComplete, .lost(at: 5)] + rejoin,
         View(phase: .postcopy, imageDigest: digest, pagesInPlace: true, pointOfNoReturnPassed: true)),
        ("the digest, then every page while paused", .new, postcopy + [.digest, .lost(at: 5), .pagesComplete],
         View(phase: .paused, pausedSince: 5, imageDigest: digest, pagesInPlace: true, pointOfNoReturnPassed: true)),
        ("hand-over, paused", .new, handOver + [.lost(at: 3)],
         View(phase: .paused, pausedSince: 3, switchoverHadHandOver: true, handOverPending: true)),
        ("hand-over, rejoined into it", .new, handOver + [.lost(at: 3)] + rejoin,
         View(phase: .handover, switchoverHadHandOver: true, handOverPending: true)),
        ("handed over while paused, rejoined", .new, handOver + [.digest, .lost(at: 3), .handedOver] + rejoin,
         View(phase: .postcopy, imageDigest: digest, switchoverHadHandOver: true, pointOfNoReturnPassed: true)),
        ("taken over", .takenOver([.vmmResumed], at: 20), [],
         View(phase: .paused, pausedSince: 20, pointOfNoReturnPassed: true)),
        ("taken over, rejoined", .takenOver([.vmmResumed], at: 2), rejoin,
         View(phase: .postcopy, pointOfNoReturnPassed: true)),
        ("taken over in the hand-over", .takenOver([.handOverPending, .vmmResumed], at: 20), [],
         View(phase: .paused, pausedSince: 20, switchoverHadHandOver: true, handOverPending: true)),
        ("taken over in the hand-over, rejoined", .takenOver([.handOverPending, .vmmResumed], at: 2), rejoin,
         View(phase: .handover, switchoverHadHandOver: true, handOverPending: true)),
        ("taken over, handed over", .takenOver([.handOverPending, .vmmResumed, .handedOver], at: 20), [],
         View(phase: .paused, pausedSince: 20, switchoverHadHandOver: true, pointOfNoReturnPassed: true)),
        ("complete", .new, postcopy + [.digest, .pagesComplete, .complete],
         View(phase: .complete, imageDigest: digest, pagesInPlace: true, pointOfNoReturnPassed: true)),
        ("complete while paused: the pause is over", .new,
         postcopy + [.lost(at: 5), .pagesComplete, .digest, .complete],
         View(phase: .complete, imageDigest: digest, pagesInPlace: true, pointOfNoReturnPassed: true)),
        ("complete after a hand-over", .new, handOver + [.pagesComplete, .digest, .handedOver, .complete],
         View(phase: .complete, imageDigest: digest, pagesInPlace: true, switchoverHadHandOver: true,
              pointOfNoReturnPassed: true)),
        ("discarded", .new, handOver + [.discard], View(phase: .discarded, switchoverHadHandOver: true)),
        ("discarded with the digest and every page", .new, handOver + [.digest, .pagesComplete, .discard],
         View(phase: .discarded, imageDigest: digest, pagesInPlace: true, switchoverHadHandOver: true)),
        ("discarded, then every page", .new, handOver + [.discard, .pagesComplete],
         View(phase: .discarded, pagesInPlace: true, switchoverHadHandOver: true)),
        ("discarded while paused: the pause is over", .new, handOver + [.lost(at: 6), .discard],
         View(phase: .discarded, switchoverHadHandOver: true)),
    ]

    @Test(arguments: 0..<views.count)
    func eachStateShowsWhatItCarriesAndNothingElse(index: Int) throws {
        let (name, start, steps, expected) = Self.views[index]
        let session = try Self.session(start, steps)
        let view = View(phase: session.phase, pausedSince: session.pausedSince, imageDigest: session.imageDigest,
                        pagesInPlace: session.pagesInPlace, switchoverHadHandOver: session.switchoverHadHandOver,
                        handOverPending: session.handOverPending,
                        pointOfNoReturnPassed: session.pointOfNoReturnPassed)
        #expect(view == expected, "\(name): \(steps)")
    }

    /// Once switched over, no bitmap is assembled any more: DIRTY_BITMAP
    /// and SWITCHOVER have no place, in whatever state followed, and change
    /// nothing.
    @Test(arguments: (0..<views.count).filter { ![.handshake, .precopy, .switchingOver].contains(views[$0].3.phase) })
    func noBitmapIsAssembledAfterSwitchover(index: Int) throws {
        let (name, start, steps, expected) = Self.views[index]
        var session = try Self.session(start, steps)
        let (epoch, digest) = (session.epoch, session.imageDigest)
        #expect(refusal { try session.receive(.dirtyBitmap(totalBits: 64, firstWord: 0, words: [0xFF]), on: .bulk) }
            == .unexpected(.dirtyBitmap, phase: expected.phase, stream: .bulk), "\(name)")
        #expect(refusal { try session.receive(.switchover(stalePages: 8, sourcePausedAtNanos: 1), on: .bulk) }
            == .unexpected(.switchover, phase: expected.phase, stream: .bulk), "\(name)")
        #expect(session.phase == expected.phase && session.epoch == epoch && session.imageDigest == digest, "\(name)")
    }

    // MARK: The pause clock

    /// Name, start, steps, then pauses, time paused in all, in the last pause.
    static let clocks: [(String, Start, [Step], UInt64, UInt64, UInt64)] = [
        ("no pause", .new, postcopy, 0, 0, 0),
        ("paused, not yet over", .new, postcopy + [.lost(at: 5), .rejoin(.bulk, at: 50)], 1, 0, 0),
        ("paused at 5, rejoined at 12", .new, postcopy + [.lost(at: 5)] + rejoin, 1, 7, 7),
        ("a role rejoining twice keeps the pause's start", .new,
         postcopy + [.lost(at: 5), .rejoin(.bulk, at: 6), .rejoin(.bulk, at: 8), .rejoin(.urgent, at: 10)], 1, 5, 5),
        ("two pauses add up", .new,
         postcopy + [.lost(at: 5)] + rejoin + [.lost(at: 20), .rejoin(.urgent, at: 21), .rejoin(.bulk, at: 23)], 2, 10, 3),
        ("a rejoin that finds the old connections alive starts the pause", .new,
         postcopy + [.rejoin(.urgent, at: 7), .rejoin(.bulk, at: 10)], 1, 3, 3),
        ("a clock that went back counts nothing", .new,
         postcopy + [.lost(at: 50), .rejoin(.bulk, at: 40), .rejoin(.urgent, at: 40)], 1, 0, 0),
        ("a pause during the hand-over", .new, handOver + [.lost(at: 4)] + rejoin, 1, 8, 8),
        ("taken over at 2: paused, though not by a lost connection", .takenOver([.vmmResumed], at: 2), rejoin, 0, 10, 10),
        ("a pause that ends in completion is not timed", .new,
         postcopy + [.digest, .lost(at: 5), .pagesComplete, .complete], 1, 0, 0),
    ]

    @Test(arguments: 0..<clocks.count)
    func aPauseIsTimedFromItsStartToTheLastRejoin(index: Int) throws {
        let (name, start, steps, pauses, pausedNanos, lastPauseNanos) = Self.clocks[index]
        let session = try Self.session(start, steps)
        #expect(session.pauses == pauses, "\(name)")
        #expect(session.pausedNanos == pausedNanos, "\(name)")
        #expect(session.lastPauseNanos == lastPauseNanos, "\(name)")
    }

    // MARK: The dirty bitmap

    /// Name, then DIRTY_BITMAP frames (first word, words) with the refusal
    /// each meets, then the bitmap SWITCHOVER finds (192 pages: 3 words).
    static let bitmaps: [(String, [(UInt64, [UInt64], SessionError?)], [UInt64])] = [
        ("in order", [(0, [1, 2], nil), (2, [4], nil)], [1, 2, 4]),
        ("a refused first frame begins switchover all the same",
         [(1, [2], .bitmapOutOfOrder(expectedWord: 0, got: 1)), (0, [1, 2, 4], nil)], [1, 2, 4]),
        ("a gap is refused, keeping the words before it",
         [(0, [1], nil), (2, [4], .bitmapOutOfOrder(expectedWord: 1, got: 2)), (1, [2, 4], nil)], [1, 2, 4]),
        ("a repeat is refused and overwrites nothing",
         [(0, [1, 2], nil), (1, [9], .bitmapOutOfOrder(expectedWord: 2, got: 1)), (2, [4], nil)], [1, 2, 4]),
    ]

    /// The bitmap grows in the switching-over state, frame by frame; a
    /// refused frame leaves it as it was.
    @Test(arguments: 0..<bitmaps.count)
    func theBitmapGrowsOnlyByFramesInOrder(index: Int) throws {
        let (name, frames, words) = Self.bitmaps[index]
        let geometry = try Sessions.geometry(pages: 192)
        var session = try Sessions.precopy(geometry)
        for (firstWord, frame, error) in frames {
            #expect(refusal { try session.receive(.dirtyBitmap(totalBits: 192, firstWord: firstWord, words: frame), on: .bulk) }
                == error, "\(name): frame at \(firstWord)")
            #expect(session.phase == .switchingOver, "\(name): frame at \(firstWord)")
        }
        let stale = try #require(PageBitmap(words: words, count: 192))
        #expect(try session.receive(.switchover(stalePages: stale.popCount, sourcePausedAtNanos: 1), on: .bulk)
            == .switchover(stale: stale, sourcePausedAtNanos: 1, handOver: false), "\(name)")
        #expect(session.phase == .postcopy, "\(name)")
    }
}
