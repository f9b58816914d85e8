import Foundation
import PostcopyCore
import PostcopyOS
import Synchronization
import Testing

/// Regions and stale bitmaps for the tracker tests.
private enum Tracking {
    /// 64 pages of 4 KiB.
    static func small(pages: UInt64 = 64) throws -> PageGeometry {
        try PageGeometry(regionSize: pages * PageSize.small.bytes, pageSize: .small)
    }

    /// 4 pages of 2 MiB: 2048 pieces of 4 KiB, 512 per page.
    static func huge(pages: UInt64 = 4) throws -> PageGeometry {
        try PageGeometry(regionSize: pages * PageSize.huge2M.bytes, pageSize: .huge2M)
    }

    /// A stale bitmap for `geometry` with exactly `pages` (4 KiB indexes) set.
    static func stale(_ geometry: PageGeometry, _ pages: [UInt64]) -> PageBitmap {
        var bitmap = PageBitmap(count: geometry.smallPageCount)
        for page in pages { bitmap.insert(page) }
        return bitmap
    }

    /// Claims `run` and commits exactly what was claimed.
    static func deliver(_ run: PageRun, to tracker: PostcopyTracker,
                        at now: UInt64) -> [PostcopyTracker.Completion] {
        commit(tracker.claim(run), to: tracker, at: now)
    }

    /// Commits `claims` and, when the commit says to wake the fault thread,
    /// takes the completed pages as it would: a completion the commit did
    /// not wake for is lost here, as it would be in the daemon.
    static func commit(_ claims: [PageRun], to tracker: PostcopyTracker,
                       at now: UInt64) -> [PostcopyTracker.Completion] {
        tracker.commit(claims) ? tracker.takeCompleted(at: now) : []
    }
}

@Suite struct PostcopyTrackerTests {
    // MARK: Faults

    @Test(arguments: [PageSize.small, .huge2M])
    func aFaultOnACleanPageIsInstalledAtOnce(pageSize: PageSize) throws {
        let geometry = pageSize == .small ? try Tracking.small() : try Tracking.huge()
        let perPage = pageSize.smallPagesPerPage
        // Page 1 is clean; its neighbours each have a stale piece right at the border.
        let tracker = PostcopyTracker(geometry: geometry,
                                      stale: Tracking.stale(geometry, [perPage - 1, 2 * perPage]))
        #expect(tracker.fault(on: PageIndex(1), at: 10) == .install)
        #expect(tracker.cleanFaults == 1)
        #expect(tracker.staleFaults == 0)
        #expect(tracker.requestedPages == 0)
        #expect(tracker.stalePages == 2)
        #expect(tracker.pendingInstalls == 0)
    }

    @Test func aFaultOnAStalePageFetchesItOnceThenWaits() throws {
        let geometry = try Tracking.small()
        let tracker = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, [3, 4, 5, 9]))
        #expect(tracker.fault(on: PageIndex(4), at: 100) == .fetch(PageRun(first: 4, count: 1)))
        #expect(tracker.requestedPages == 1)
        // A second thread faulting on the same page must not ask again.
        #expect(tracker.fault(on: PageIndex(4), at: 200) == .wait)
        #expect(tracker.requestedPages == 1)
        #expect(tracker.staleFaults == 2)
        #expect(tracker.cleanFaults == 0)
        // Requesting does not make a page fresh.
        #expect(tracker.isStale(4))
        #expect(tracker.stalePages == 4)
        // Another stale page is still fetched on its own.
        #expect(tracker.fault(on: PageIndex(9), at: 300) == .fetch(PageRun(first: 9, count: 1)))
        #expect(tracker.requestedPages == 2)
    }

    @Test func outstandingRequestsAreThoseNotArrivedOrBeingWritten() throws {
        let geometry = try Tracking.small()
        let tracker = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, [3, 4, 5, 9, 10]))
        #expect(tracker.outstandingRequests.isEmpty)
        _ = tracker.fault(on: PageIndex(4), at: 1)
        _ = tracker.fault(on: PageIndex(5), at: 2)
        _ = tracker.fault(on: PageIndex(9), at: 3)
        _ = tracker.fault(on: PageIndex(10), at: 4)
        #expect(tracker.outstandingRequests == [PageRun(first: 4, count: 2), PageRun(first: 9, count: 2)])
        // Page 9 is being written, page 4 is in: neither is asked for again.
        let claims = tracker.claim(PageRun(first: 4, count: 1)) + tracker.claim(PageRun(first: 9, count: 1))
        _ = Tracking.commit([claims[0]], to: tracker, at: 5)
        #expect(tracker.outstandingRequests == [PageRun(first: 5, count: 1), PageRun(first: 10, count: 1)])
    }

    @Test func aHugePageFetchesExactlyItsStalePieces() throws {
        let geometry = try Tracking.huge()
        // Page 1 is pieces 512..<1024: stale are 3, 4, 5, 100 and 511 of it.
        // 511 (last of page 0) and 1024 (first of page 2) are stale neighbours.
        let stalePieces: [UInt64] = [511, 512 + 3, 512 + 4, 512 + 5, 512 + 100, 512 + 511, 1024]
        let tracker = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, stalePieces))
        let action = tracker.fault(on: PageIndex(1), at: 1)
        // One span, from the first stale piece to the last; exactly the
        // stale pieces in it are requested (the source sends only those).
        #expect(action == .fetch(PageRun(first: 515, count: 1023 + 1 - 515)))
        #expect(tracker.outstandingRequests == [PageRun(first: 515, count: 3), PageRun(first: 612, count: 1),
                                                PageRun(first: 1023, count: 1)])
        #expect(tracker.requestedPages == 5)
        #expect(tracker.fault(on: PageIndex(1), at: 2) == .wait)
        #expect(tracker.requestedPages == 5)
        #expect(tracker.staleFaults == 2)
        // The neighbours were not requested: faulting on them asks for them.
        #expect(tracker.fault(on: PageIndex(0), at: 3) == .fetch(PageRun(first: 511, count: 1)))
        #expect(tracker.fault(on: PageIndex(2), at: 4) == .fetch(PageRun(first: 1024, count: 1)))
        #expect(tracker.requestedPages == 7)
    }

    @Test func aHugePageFetchSkipsPiecesAlreadyBeingWritten() throws {
        let geometry = try Tracking.huge()
        let tracker = PostcopyTracker(geometry: geometry,
                                      stale: Tracking.stale(geometry, [515, 516, 517, 612, 1023]))
        // The background path has claimed 515..<518 and is copying them.
        #expect(tracker.claim(PageRun(first: 512, count: 8)) == [PageRun(first: 515, count: 3)])
        #expect(tracker.fault(on: PageIndex(1), at: 5) == .fetch(PageRun(first: 612, count: 1023 + 1 - 612)))
        #expect(tracker.outstandingRequests == [PageRun(first: 612, count: 1), PageRun(first: 1023, count: 1)])
        #expect(tracker.requestedPages == 2)
    }

    @Test(arguments: [PageSize.small, .huge2M])
    func aFaultOnAPageWhoseStalePiecesAreAllClaimedWaitsForTheCommit(pageSize: PageSize) throws {
        let geometry = pageSize == .small ? try Tracking.small() : try Tracking.huge()
        let pieces = geometry.smallPages(of: PageIndex(2))
        let stalePieces = pageSize == .small ? [pieces.lowerBound]
                                             : [pieces.lowerBound, pieces.lowerBound + 7, pieces.upperBound - 1]
        let tracker = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, stalePieces))
        let claims = tracker.claim(PageRun(first: pieces.lowerBound, count: UInt64(pieces.count)))
        #expect(claims.reduce(0) { $0 + $1.count } == UInt64(stalePieces.count))

        #expect(tracker.fault(on: PageIndex(2), at: 1_000) == .wait)
        #expect(tracker.requestedPages == 0)
        #expect(tracker.staleFaults == 1)

        let completions = Tracking.commit(claims, to: tracker, at: 1_750)
        #expect(completions.map(\.page) == [PageIndex(2)])
        #expect(completions.map(\.latencyNanos) == [750])
        #expect(tracker.stalePages == 0)
        #expect(tracker.pendingInstalls == 1)
        #expect(!tracker.isComplete)
    }

    // MARK: Claims and commits

    @Test func claimTakesOnlyStaleUnclaimedPagesAndCountsTheRestAsDuplicates() throws {
        let geometry = try Tracking.small()
        let tracker = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, [2, 3, 5, 10]))
        #expect(tracker.stalePages == 4)

        #expect(tracker.claim(PageRun(first: 0, count: 8)) == [PageRun(first: 2, count: 2), PageRun(first: 5, count: 1)])
        #expect(tracker.duplicatePages == 5)  // 0, 1, 4, 6, 7
        // Claimed but not yet written: a second arrival is a duplicate.
        #expect(tracker.claim(PageRun(first: 2, count: 4)) == [])
        #expect(tracker.duplicatePages == 9)
        // Claiming changes nothing until the commit.
        #expect(tracker.stalePages == 4)
        #expect(tracker.filledPages == 0)
        #expect(tracker.isStale(2) && tracker.isStale(3) && tracker.isStale(5))

        let completions = Tracking.commit([PageRun(first: 2, count: 2), PageRun(first: 5, count: 1)], to: tracker, at: 50)
        #expect(completions.isEmpty)  // nobody was waiting
        #expect(tracker.pendingInstalls == 0)
        #expect(tracker.stalePages == 1)
        #expect(tracker.filledPages == 3)
        #expect(!tracker.isStale(2) && !tracker.isStale(3) && !tracker.isStale(5))
        #expect(tracker.isStale(10))
        #expect(tracker.staleBitmap.setIndices == [10])

        // After the commit, the same pages again are duplicates too.
        #expect(tracker.claim(PageRun(first: 2, count: 1)) == [])
        #expect(tracker.duplicatePages == 10)
        #expect(tracker.filledPages == 3)

        #expect(Tracking.deliver(PageRun(first: 9, count: 3), to: tracker, at: 60).isEmpty)
        #expect(tracker.duplicatePages == 12)
        #expect(tracker.filledPages == 4)
        #expect(tracker.stalePages == 0)
        #expect(tracker.isComplete)
    }

    @Test func aCommitCompletesAWaitingPageWithTheLatencyFromItsFirstFault() throws {
        let geometry = try Tracking.small()
        let tracker = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, [7, 8]))
        #expect(tracker.fault(on: PageIndex(7), at: 1_000) == .fetch(PageRun(first: 7, count: 1)))
        #expect(tracker.fault(on: PageIndex(7), at: 2_000) == .wait)

        // Committing a different page completes nothing.
        #expect(Tracking.deliver(PageRun(first: 8, count: 1), to: tracker, at: 3_000).isEmpty)

        let completions = Tracking.deliver(PageRun(first: 7, count: 1), to: tracker, at: 5_000)
        #expect(completions.count == 1)
        #expect(completions.first?.page == PageIndex(7))
        #expect(completions.first?.latencyNanos == 4_000)  // from the first fault, not the second
        #expect(tracker.pendingInstalls == 1)
    }

    @Test func aHugePageIsCompletedOnlyByItsLastStalePiece() throws {
        let geometry = try Tracking.huge()
        let tracker = PostcopyTracker(geometry: geometry,
                                      stale: Tracking.stale(geometry, [515, 516, 517, 612, 1023, 1024]))
        guard case let .fetch(span) = tracker.fault(on: PageIndex(1), at: 10) else {
            Issue.record("a fault on a stale huge page must fetch")
            return
        }
        #expect(span == PageRun(first: 515, count: 1024 - 515))
        #expect(tracker.outstandingRequests.count == 3)

        #expect(Tracking.deliver(PageRun(first: 515, count: 3), to: tracker, at: 20).isEmpty)
        #expect(Tracking.deliver(PageRun(first: 1023, count: 1), to: tracker, at: 30).isEmpty)
        #expect(tracker.pendingInstalls == 0)
        // Page 2's piece does not complete page 1.
        #expect(Tracking.deliver(PageRun(first: 1024, count: 1), to: tracker, at: 40).isEmpty)

        let last = Tracking.deliver(PageRun(first: 612, count: 1), to: tracker, at: 1_000)
        #expect(last.map(\.page) == [PageIndex(1)])
        #expect(last.map(\.latencyNanos) == [990])
        #expect(tracker.pendingInstalls == 1)
        #expect(tracker.stalePages == 0)
        #expect(tracker.filledPages == 6)
        // Fresh now: the next fault installs at once.
        #expect(tracker.fault(on: PageIndex(1), at: 2_000) == .install)
    }

    @Test func oneCommitCompletesEveryWaitingPageItCovers() throws {
        let geometry = try Tracking.small()
        let tracker = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, [2, 3, 4, 5]))
        for page: UInt64 in [2, 4, 5] { _ = tracker.fault(on: PageIndex(page), at: 100 * page) }
        let completions = Tracking.deliver(PageRun(first: 0, count: 8), to: tracker, at: 1_000)
        // In no particular order: the fault thread installs them all at once.
        let byPage = completions.sorted { $0.page < $1.page }
        #expect(byPage.map(\.page) == [PageIndex(2), PageIndex(4), PageIndex(5)])
        #expect(byPage.map(\.latencyNanos) == [800, 600, 500])
        #expect(tracker.pendingInstalls == 3)
        #expect(tracker.duplicatePages == 4)
    }

    @Test func completionsPendingInstallKeepPostcopyIncomplete() throws {
        let geometry = try Tracking.small()
        let tracker = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, [1, 6]))
        #expect(!tracker.isComplete)
        _ = tracker.fault(on: PageIndex(1), at: 0)
        _ = tracker.fault(on: PageIndex(6), at: 0)
        #expect(Tracking.deliver(PageRun(first: 1, count: 1), to: tracker, at: 5).count == 1)
        #expect(Tracking.deliver(PageRun(first: 6, count: 1), to: tracker, at: 6).count == 1)
        #expect(tracker.stalePages == 0)
        #expect(tracker.pendingInstalls == 2)
        #expect(!tracker.isComplete)

        tracker.installed(1)
        #expect(tracker.pendingInstalls == 1)
        #expect(!tracker.isComplete)
        tracker.installed(1)
        #expect(tracker.pendingInstalls == 0)
        #expect(tracker.isComplete)
    }

    @Test func aRegionWithNothingStaleIsCompleteFromTheStart() throws {
        let geometry = try Tracking.huge()
        let tracker = PostcopyTracker(geometry: geometry, stale: PageBitmap(count: geometry.smallPageCount))
        #expect(tracker.isComplete)
        #expect(tracker.fault(on: PageIndex(3), at: 0) == .install)
        #expect(tracker.claim(PageRun(first: 0, count: 512)) == [])
        #expect(tracker.duplicatePages == 512)
    }

    // MARK: Two writers, randomized

    /// The background path pushes the whole region in chunks (clean pages
    /// included, so some arrivals are duplicates); the urgent path delivers
    /// what faults fetch, in random order; commits and installs come late
    /// and out of order. Checks every piece is written once, every waiting
    /// page gets exactly one completion, and nothing is requested twice.
    @Test(arguments: [PageSize.small, .huge2M], [UInt64(1), 7, 0xC0FFEE])
    func everyStalePageIsFilledExactlyOnceAcrossTwoPaths(pageSize: PageSize, seed: UInt64) throws {
        let geometry = pageSize == .small ? try Tracking.small(pages: 512) : try Tracking.huge(pages: 4)
        let pieceCount = geometry.smallPageCount
        var generator = SplitMix64(seed: seed)
        var initial = PageBitmap(count: pieceCount)
        for piece in 0..<pieceCount where generator.next() % 5 < 2 { initial.insert(piece) }
        let initialStale = initial.popCount
        #expect(initialStale > 0)

        let tracker = PostcopyTracker(geometry: geometry, stale: initial)
        var writes = [Int](repeating: 0, count: Int(pieceCount))
        var committed = PageBitmap(count: pieceCount)
        var inFlight: [[PageRun]] = []
        var fetches: [PageRun] = []
        var outstandingRequests = Set<UInt64>()
        var waiting = Set<UInt64>()
        var unreported = 0
        var backgroundCursor: UInt64 = 0
        var delivered: UInt64 = 0
        var faults: UInt64 = 0
        var outcomes = (fetch: 0, wait: 0)
        var now: UInt64 = 0

        func hasStalePiece(_ page: UInt64) -> Bool {
            geometry.smallPages(of: PageIndex(page)).contains { initial.contains($0) && !committed.contains($0) }
        }
        func arrive(_ run: PageRun) {
            delivered += run.count
            let claims = tracker.claim(run)
            for claim in claims {
                #expect(claim.first >= run.first && claim.end <= run.end)
                for piece in claim.pages { writes[Int(piece)] += 1 }
            }
            if !claims.isEmpty { inFlight.append(claims) }
        }

        var steps = 0
        while backgroundCursor < pieceCount || !fetches.isEmpty || !inFlight.isEmpty || unreported > 0 {
            steps += 1
            try #require(steps < 200_000, "the simulation does not finish")
            now += generator.next() % 1_000 + 1
            switch generator.next() % 6 {
            case 0 where backgroundCursor < pieceCount:
                let count = min(16, pieceCount - backgroundCursor)
                arrive(PageRun(first: backgroundCursor, count: count))
                backgroundCursor += count
            case 1:
                // Half the faults are another thread on a page already waited for.
                let blocked = waiting.sorted()
                let page = !blocked.isEmpty && generator.next() % 2 == 0
                    ? blocked[Int(generator.next() % UInt64(blocked.count))]
                    : generator.next() % geometry.pageCount
                faults += 1
                let requestedBefore = tracker.requestedPages
                switch tracker.fault(on: PageIndex(page), at: now) {
                case .install:
                    #expect(!hasStalePiece(page), "page \(page) installed with a stale piece")
                    #expect(!waiting.contains(page))
                case let .fetch(span):
                    #expect(hasStalePiece(page))
                    waiting.insert(page)
                    outcomes.fetch += 1
                    #expect(geometry.smallPages(of: PageIndex(page)).contains(span.first))
                    #expect(geometry.smallPages(of: PageIndex(page)).contains(span.end - 1))
                    // Requested now: the span's stale pieces that were
                    // neither requested nor being written; the span starts
                    // and ends with one.
                    let writing = Set(inFlight.joined().flatMap(\.pages))
                    let newly = span.pages.filter {
                        initial.contains($0) && !committed.contains($0) && !outstandingRequests.contains($0)
                            && !writing.contains($0)
                    }
                    #expect(newly.first == span.first && newly.last == span.end - 1, "\(span) is not tight around \(newly)")
                    #expect(tracker.requestedPages == requestedBefore + UInt64(newly.count))
                    outstandingRequests.formUnion(newly)
                    fetches.append(span)
                case .wait:
                    #expect(hasStalePiece(page))
                    waiting.insert(page)
                    outcomes.wait += 1
                }
            case 2 where !fetches.isEmpty:
                arrive(fetches.remove(at: Int(generator.next() % UInt64(fetches.count))))
            case 3, 4:
                guard !inFlight.isEmpty else { continue }
                let claims = inFlight.remove(at: Int(generator.next() % UInt64(inFlight.count)))
                for claim in claims {
                    for piece in claim.pages {
                        committed.insert(piece)
                        outstandingRequests.remove(piece)
                    }
                }
                let completions = Tracking.commit(claims, to: tracker, at: now)
                for completion in completions {
                    let wasWaiting = waiting.remove(completion.page.rawValue) != nil
                    #expect(wasWaiting, "completion for \(completion.page), which nobody waits for")
                    #expect(!hasStalePiece(completion.page.rawValue))
                }
                unreported += completions.count
            case 5 where unreported > 0:
                let count = Int(generator.next() % UInt64(unreported)) + 1
                tracker.installed(count)
                unreported -= count
            default:
                continue
            }
            #expect(tracker.pendingInstalls == UInt64(unreported))
        }

        for piece in 0..<pieceCount {
            #expect(writes[Int(piece)] == (initial.contains(piece) ? 1 : 0), "piece \(piece) written \(writes[Int(piece)]) times")
        }
        #expect(waiting.isEmpty, "pages still waiting: \(waiting.sorted())")
        #expect(tracker.filledPages == initialStale)
        #expect(tracker.duplicatePages == delivered - initialStale)
        #expect(tracker.stalePages == 0)
        #expect(tracker.staleBitmap.isEmpty)
        #expect(tracker.staleFaults + tracker.cleanFaults == faults)
        #expect(tracker.pendingInstalls == 0)
        #expect(tracker.isComplete)
        // The simulation did exercise what it checks.
        #expect(outcomes.fetch > 0 && outcomes.wait > 0)
        #expect(tracker.duplicatePages > 0)
    }

    // MARK: Waking the fault thread

    @Test func aCommitWakesTheFaultThreadOnlyForAWaitingPageItCompletesOrTheLastStalePage() throws {
        let geometry = try Tracking.huge()
        let tracker = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, [515, 612, 1030]))
        #expect(tracker.fault(on: PageIndex(1), at: 10) == .fetch(PageRun(first: 515, count: 98)))
        // Nobody waits on page 2, and stale pages remain: no wake-up.
        #expect(!tracker.commit(tracker.claim(PageRun(first: 1030, count: 1))))
        // Page 1 waits, but keeps a stale piece: no wake-up, nothing to take.
        #expect(!tracker.commit(tracker.claim(PageRun(first: 515, count: 1))))
        #expect(tracker.takeCompleted(at: 20).isEmpty)
        // Its last piece: wake, the committing thread hears of page 1 (to
        // install it at once), and the fault thread takes it exactly once.
        var heard: [PageIndex] = []
        #expect(tracker.commit(tracker.claim(PageRun(first: 612, count: 1))) { heard.append($0) })
        #expect(heard == [PageIndex(1)])
        // The receiver installed it at 22: the wait ends there, not when
        // the fault thread takes it.
        tracker.receiverInstalled(PageIndex(1), at: 22)
        let taken = tracker.takeCompleted(at: 30)
        #expect(taken.map(\.page) == [PageIndex(1)])
        #expect(taken.map(\.latencyNanos) == [12])
        #expect(tracker.takeCompleted(at: 40).isEmpty)
        tracker.installed(1)
        #expect(tracker.isComplete)

        // The last stale page wakes even when nobody waits: completion is
        // the fault thread's to see.
        let quiet = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, [7]))
        #expect(quiet.commit(quiet.claim(PageRun(first: 0, count: 512))))
        #expect(quiet.isComplete)
    }

    @Test func aWaitingPageKeepsPostcopyIncompleteUntilTheFaultThreadTakesIt() throws {
        let geometry = try Tracking.small()
        let tracker = PostcopyTracker(geometry: geometry, stale: Tracking.stale(geometry, [3]))
        _ = tracker.fault(on: PageIndex(3), at: 0)
        #expect(tracker.commit(tracker.claim(PageRun(first: 3, count: 1))))
        // Every page is in, but a thread still waits: the VMM must not let go yet.
        #expect(tracker.stalePages == 0)
        #expect(!tracker.isComplete)
        #expect(tracker.takeCompleted(at: 5).count == 1)
        #expect(!tracker.isComplete)
        tracker.installed(1)
        #expect(tracker.isComplete)
    }

    /// Three threads: a fault thread, an urgent receiver serving its
    /// requests and a back-fill receiver sweeping the region, with no lock
    /// between them. The fault thread takes completions only when a commit
    /// woke it. The last guest page stays stale and unfaulted throughout,
    /// so no "last page in" wake-up sweeps up what a lost one left: a page
    /// still waiting at the end is a lost wake-up. A piece written twice,
    /// or a page handed out with a stale piece, fails too.
    @Test(arguments: [PageSize.small, .huge2M])
    func threadsSharingTheTrackerLoseNoWakeUpAndWriteEachPieceOnce(pageSize: PageSize) throws {
        let geometry = pageSize == .small ? try Tracking.small(pages: 4096) : try Tracking.huge(pages: 8)
        let pieceCount = geometry.smallPageCount
        let heldBack = geometry.smallPages(of: PageIndex(geometry.pageCount - 1))
        var generator = SplitMix64(seed: 0x5EED)
        var initial = PageBitmap(count: pieceCount)
        for piece in 0..<pieceCount where generator.next() % 3 != 0 || heldBack.contains(piece) { initial.insert(piece) }
        let tracker = PostcopyTracker(geometry: geometry, stale: initial)
        final class Shared: Sendable {
            let writes: Locked<[UInt8]>
            let requests = Locked<[PageRun]>([])
            let wakes = Atomic<UInt64>(0)
            let backgroundDone = Atomic<Bool>(false)
            let faultsDone = Atomic<Bool>(false)
            let faultsWaited = Atomic<Int>(0)
            let requestsServed = Atomic<Int>(0)
            let outcome = Locked<(waited: Int, completed: Int, refaulted: Int, badCompletions: Int,
                                  leftWaiting: Int)?>(nil)
            init(pieces: UInt64) { writes = Locked([UInt8](repeating: 0, count: Int(pieces))) }
        }
        let shared = Shared(pieces: pieceCount)
        let (writes, requests) = (shared.writes, shared.requests)

        @Sendable func deliver(_ run: PageRun) {
            let claims = tracker.claim(run)
            writes.withLock { counts in for claim in claims { for piece in claim.pages { counts[Int(piece)] += 1 } } }
            if tracker.commit(claims) { shared.wakes.add(1, ordering: .sequentiallyConsistent) }
        }
        let background = Thread {
            // The sweep starts once faults wait, and gives way as it goes,
            // so that it races them rather than finishing first.
            let head = Int(min(8, geometry.pageCount / 4))
            while shared.faultsWaited.load(ordering: .relaxed) < head { sched_yield() }
            var cursor: UInt64 = 0
            while cursor < heldBack.lowerBound {
                let count = min(3, heldBack.lowerBound - cursor)
                deliver(PageRun(first: cursor, count: count))
                cursor += count
                sched_yield()
            }
            shared.backgroundDone.store(true, ordering: .sequentiallyConsistent)
        }
        let urgent = Thread {
            while !shared.faultsDone.load(ordering: .sequentiallyConsistent) {
                let next = requests.withLock { $0.isEmpty ? nil : $0.removeFirst() }
                guard let next else {
                    sched_yield()
                    continue
                }
                deliver(next)
                shared.requestsServed.add(1, ordering: .sequentiallyConsistent)
            }
        }
        let faults = Thread {
            var generator = SplitMix64(seed: 0xFA017)
            var waiting = Set<UInt64>()
            var seenWakes: UInt64 = 0
            var asked = 0
            var counts = (waited: 0, completed: 0, refaulted: 0, badCompletions: 0)
            func takeIfWoken() {
                let now = shared.wakes.load(ordering: .sequentiallyConsistent)
                guard now != seenWakes else { return }
                seenWakes = now
                let completions = tracker.takeCompleted(at: 0)
                for completion in completions {
                    if waiting.remove(completion.page.rawValue) == nil { counts.badCompletions += 1 }
                    if geometry.smallPages(of: completion.page).contains(where: tracker.isStale) {
                        counts.badCompletions += 1
                    }
                }
                counts.completed += completions.count
                tracker.installed(completions.count)
            }
            while !shared.backgroundDone.load(ordering: .sequentiallyConsistent) {
                takeIfWoken()
                let page = generator.next() % (geometry.pageCount - 1)
                switch tracker.fault(on: PageIndex(page), at: 0) {
                case .install:
                    // A waiting page whose pieces all came in: this install
                    // serves it (before or instead of the wake-up).
                    if waiting.remove(page) != nil { counts.refaulted += 1 }
                case let .fetch(span):
                    if waiting.insert(page).inserted { counts.waited += 1 }
                    requests.withLock { $0.append(span) }
                    asked += 1
                case .wait:
                    if waiting.insert(page).inserted { counts.waited += 1 }
                }
                shared.faultsWaited.store(counts.waited, ordering: .relaxed)
                if generator.next() % 8 == 0 { sched_yield() }
            }
            // Every request served, then the wake-ups they caused taken.
            while shared.requestsServed.load(ordering: .sequentiallyConsistent) < asked { sched_yield() }
            takeIfWoken()
            shared.outcome.withLock {
                $0 = (counts.waited, counts.completed, counts.refaulted, counts.badCompletions, waiting.count)
            }
            shared.faultsDone.store(true, ordering: .sequentiallyConsistent)
        }
        for thread in [faults, urgent, background] { thread.start() }
        while !(shared.faultsDone.load(ordering: .sequentiallyConsistent) && urgent.isFinished) { usleep(1000) }
        let outcome = try #require(shared.outcome.withLock { $0 })

        let counts = writes.withLock { $0 }
        for piece in 0..<pieceCount where !heldBack.contains(piece)
            && counts[Int(piece)] != (initial.contains(piece) ? 1 : 0) {
            Issue.record("piece \(piece) written \(counts[Int(piece)]) times")
        }
        #expect(outcome.waited > 0, "no fault waited: the test exercised nothing")
        #expect(outcome.completed + outcome.refaulted == outcome.waited - outcome.leftWaiting)
        #expect(outcome.badCompletions == 0)
        #expect(outcome.leftWaiting == 0, "\(outcome.leftWaiting) pages still wait: a wake-up was lost")
        #expect(tracker.stalePages == UInt64(heldBack.count))
        #expect(tracker.filledPages == initial.popCount - UInt64(heldBack.count))
        // The held-back page last: its commit completes postcopy.
        #expect(tracker.commit(tracker.claim(PageRun(first: heldBack.lowerBound, count: UInt64(heldBack.count)))))
        #expect(tracker.isComplete)
    }
}

@Suite struct CompletionTimesTests {
    @Test func aSlotGivesItsPagesTimeUntilAnotherPageTakesIt() {
        let times = CompletionTimes(slots: 4)
        #expect(times.time(of: 5) == nil)
        times.record(5, at: 100)
        #expect(times.time(of: 5) == 100)
        #expect(times.time(of: 1) == nil, "page 1 shares page 5's slot but was never recorded")
        times.record(9, at: 200)  // the same slot: page 5's time is lost
        #expect(times.time(of: 5) == nil)
        #expect(times.time(of: 9) == 200)
        times.record(6, at: 300)
        #expect(times.time(of: 9) == 200 && times.time(of: 6) == 300)
    }
}
