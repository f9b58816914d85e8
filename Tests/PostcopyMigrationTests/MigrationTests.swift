import Glibc
import PostcopyCore
import PostcopyMigration
import PostcopyOS
import Synchronization
import Testing

/// Whole migrations in one process over loopback TCP, on the real kernel:
/// precopy, a dirty set written at switchover, postcopy with the reference
/// guest reading every page from 4 threads while the back-fill runs. (Each
/// memory kind × transport × failure point, and how much is stale: MatrixTests.)
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct MigrationTests {
    /// 256 MiB, less under POSTCOPY_TEST_SIZE_SCALE.
    static let size: UInt64 = TestSize.scaled(256 << 20)

    /// Every 8th page zero; `dirty` of the pages rewritten at switchover, a
    /// fifth of those to all zeros. Returns which pages changed.
    static func source(dirty fraction: Double, seed: UInt64 = 11, size: UInt64 = size) throws -> (SourceFile, [UInt64]) {
        let source = try SourceFile(size: size, seed: seed) { $0 % 8 == 3 }
        var generator = SplitMix64(seed: seed)
        let pages = Array(0..<source.pageCount).shuffled(using: &generator)
        let dirty = Array(pages.prefix(Int(Double(source.pageCount) * fraction))).sorted()
        return (source, dirty)
    }

    static func dirtying(_ source: SourceFile, _ pages: [UInt64]) -> @Sendable () -> Void {
        { for page in pages { page % 5 == 0 ? source.zero(page) : source.write(page, generation: 1) } }
    }

    /// Pages the final scan finds stale after `dirtying`: with uffd-wp
    /// every page written, with hashing only those whose bytes changed (a
    /// zero page zeroed again does not).
    static func stale(_ pages: [UInt64], log: DirtyLogChoice = .uffdWP) -> UInt64 {
        log == .hash ? UInt64(pages.filter { !($0 % 8 == 3 && $0 % 5 == 0) }.count) : UInt64(pages.count)
    }

    /// What every whole migration of `pages` 4 KiB pages, `stale` of them
    /// stale at switchover, must end with. With `connectionsLost` during
    /// postcopy, the daemon's counts still hold, the agent's do not: it sent
    /// again what was lost with the connections, a page still on its way
    /// may then have come twice (the second is dropped: docs/protocol.md,
    /// "Losing the connections"), and one whose send the loss cut short may
    /// have arrived without the agent counting it.
    /// No page crossed the network twice but those the agent sent again
    /// for a request while a background sender had them (the copy that
    /// came second, if it came before the end, is postcopyd's duplicate).
    static func expectNoPageTwice(_ outcome: Migration.Outcome, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(outcome.daemon.duplicatePages <= outcome.agent.postcopyPagesResent,
                "\(outcome.daemon.duplicatePages) duplicates, \(outcome.agent.postcopyPagesResent) pages resent",
                sourceLocation: sourceLocation)
    }

    static func check(_ outcome: Migration.Outcome, stale: UInt64, pages: UInt64 = size / 4096,
                      connectionsLost: Bool = false) {
        #expect(outcome.identical, "destination RAM differs from the source")
        if outcome.agent.dirtyLog == "uffd-wp" { #expect(outcome.agent.missedByDirtyLog == 0) }
        #expect(outcome.guest.verified, "guest digest \(outcome.guest.actualDigest) vs \(outcome.guest.expectedDigest)")
        #expect(outcome.agent.stalePages == stale)
        #expect(outcome.daemon.stalePagesAtSwitchover == stale)
        // Each stale page crossed the network once, by one path or the
        // other, but for those a request named while the background had
        // them; it was installed once in any case.
        if !connectionsLost { expectNoPageTwice(outcome) }
        #expect(outcome.daemon.postcopyPagesUrgent + outcome.daemon.postcopyPagesBackground == stale)
        if !connectionsLost {
            #expect(outcome.agent.postcopyPagesUrgent + outcome.agent.postcopyPagesBackground == stale)
        }
        #expect(outcome.daemon.imageDigest == outcome.agent.imageDigest)
        #expect(outcome.guest.pagesRead == pages)
        // The guest's side of the latency counts each page read once, as the daemon's counts each stale fault.
        #expect(outcome.guest.firstTouchDist?.count == outcome.guest.pagesRead)
        #expect(outcome.daemon.staleFaultLatencyDist?.count == UInt64(outcome.daemon.staleFaultLatency?.count ?? 0))
    }

    /// `--max-bandwidth` holds every precopy round to its rate (the
    /// pacer allows one 1 MiB burst), rounds after the first included, and
    /// the migration is as whole as without it.
    @Test func precopyKeepsToMaxBandwidth() throws {
        let (source, dirty) = try Self.source(dirty: 0.1)
        var migration = Migration()
        migration.rounds = 2
        // About half a second for the first round at full size.
        let limit = (224 << 20) / TestSize.divisor * 2
        migration.precopyBytesPerSecond = limit
        let outcome = try migration.run(source, pause: Self.dirtying(source, dirty))
        Self.check(outcome, stale: Self.stale(dirty))
        #expect(outcome.agent.rounds.count == 2)
        for round in outcome.agent.rounds {
            let allowed = Double(limit) * round.seconds + Double(1 << 20)
            #expect(Double(round.bytesSent) <= allowed * 1.02,
                    "round \(round.round): \(round.bytesSent) bytes in \(round.seconds) s at \(round.mibPerSecond) MiB/s, over the limit")
        }
        #expect(outcome.agent.rounds[0].seconds >= 0.3, "round 1 took \(outcome.agent.rounds[0].seconds) s: not paced")
    }

    /// `--max-precopy-seconds` holds within a round: round 1, paced to
    /// take about two seconds, stops at 0.3 s, and what it did not reach is
    /// stale — fetched in postcopy, each page once — with either dirty log
    /// (the uffd-wp one audited by `--verify-dirty-log`, which must not
    /// count the pages left as changes it missed).
    @Test(arguments: [DirtyLogChoice.uffdWP, .hash])
    func theTimeLimitStopsARoundUnderWay(log: DirtyLogChoice) throws {
        let (source, dirty) = try Self.source(dirty: 0.1)
        var migration = Migration()
        migration.dirtyLog = log
        migration.rounds = 3
        migration.precopyBytesPerSecond = (224 << 20) / TestSize.divisor / 2
        migration.precopySeconds = 0.3
        let outcome = try migration.run(source, pause: Self.dirtying(source, dirty))
        #expect(outcome.identical, "destination RAM differs from the source")
        #expect(outcome.guest.verified, "guest digest \(outcome.guest.actualDigest) vs \(outcome.guest.expectedDigest)")
        #expect(outcome.daemon.imageDigest == outcome.agent.imageDigest)
        if log == .uffdWP { #expect(outcome.agent.missedByDirtyLog == 0) }
        #expect(outcome.agent.precopyEndReason == "time limit")
        try #require(outcome.agent.rounds.count == 1, "\(outcome.agent.rounds)")
        let left = try #require(outcome.agent.rounds[0].pagesLeft, "round 1 was not cut short")
        #expect(left > 0)
        // Every page round 1 did not reach is stale, and so is each page
        // written in the pause (some of them among those left).
        let stale = outcome.agent.stalePages
        #expect(stale >= left && stale <= left + Self.stale(dirty, log: log), "\(stale) stale, \(left) left")
        #expect(outcome.daemon.stalePagesAtSwitchover == stale)
        Self.expectNoPageTwice(outcome)
        #expect(outcome.daemon.postcopyPagesUrgent + outcome.daemon.postcopyPagesBackground == stale)
    }

    /// The source's zero pages are holes in its file (every 8th page here).
    /// The agent tells them by the file's extents and never reads them:
    /// reading a shmem hole through a mapping allocates a page, so a
    /// migration would otherwise grow the source by all the RAM its guest
    /// never used. With either dirty log (hashing scans every page at
    /// switchover).
    @Test(arguments: [DirtyLogChoice.uffdWP, .hash])
    func theSourceKeepsItsHoles(log: DirtyLogChoice) throws {
        let (source, _) = try Self.source(dirty: 0)
        let before = source.allocatedPages
        #expect(before == source.pageCount - source.pageCount / 8, "the source's zero pages are not holes")
        var migration = Migration()
        migration.dirtyLog = log
        migration.rounds = 2
        let outcome = try migration.run(source)
        Self.check(outcome, stale: 0)
        #expect(outcome.sourcePagesAllocated == before,
                "the migration read \(outcome.sourcePagesAllocated - before) holes of the source")
    }

    /// The same with the agent hashing every page (`--dirty-log hash`).
    @Test func shmemWithTheHashLog() throws {
        let (source, dirty) = try Self.source(dirty: 0.1)
        var migration = Migration()
        migration.dirtyLog = .hash
        let outcome = try migration.run(source, pause: Self.dirtying(source, dirty))
        Self.check(outcome, stale: Self.stale(dirty, log: .hash))
        #expect(outcome.agent.dirtyLog == "hash" && outcome.agent.dirtyLogFallback == nil)
    }

    @Test func allZeroRegion() throws {
        let source = try SourceFile(size: Self.size, seed: 5) { _ in true }
        let outcome = try Migration().run(source)
        Self.check(outcome, stale: 0)
        #expect(outcome.agent.rounds.first?.pagesSent == 0, "zero pages are never sent")
        #expect(outcome.daemon.precopyPages == 0)
    }

    @Test func precopyConvergesWhenNothingChanges() throws {
        let (source, dirty) = try Self.source(dirty: 0.1, seed: 23)
        let outcome = try Migration(rounds: 5).run(source, pause: Self.dirtying(source, dirty))
        // Round 2 resent nothing: converged, switch over with what changed at the pause.
        #expect(outcome.agent.rounds.map(\.pagesSent).last == 0)
        #expect(outcome.agent.precopyEndReason == PrecopyPolicy.Reason.converged.rawValue)
        // Nothing was dirtied between the rounds; round 1 has no rate.
        #expect(outcome.agent.rounds.map(\.dirtyPagesPerSecond) == [nil, 0])
        #expect(outcome.agent.libvirt?.memoryDirtyRate == 0 && outcome.agent.libvirt?.memoryIteration == 2)
        #expect(outcome.agent.qemu?.status == .completed && outcome.agent.expectedDowntimeMs != nil)
        Self.check(outcome, stale: Self.stale(dirty))
    }

    /// The hand-over (`--resumed-cmd`, what starts a QEMU on the
    /// destination) runs once postcopyd has resumed the guest, and postcopy
    /// serves faults while it runs: QEMU reads guest RAM while it loads its
    /// device state. This hand-over waits for a stale fault to be served,
    /// which an agent that ran it before serving requests never lets happen.
    @Test func handOverRunsWhilePostcopyServes() throws {
        let (source, dirty) = try Self.source(dirty: 0.5)
        let phaseAtHandOver = Locked("")
        let statusServing = Locked<DaemonStatus?>(nil)
        var migration = Migration()
        migration.handOver = { daemon in
            phaseAtHandOver.withLock { $0 = daemon.status().phase }
            let deadline = monotonicNanoseconds() + 30_000_000_000 * TestTiming.scale
            while daemon.status().faultsStale == 0 {
                guard monotonicNanoseconds() < deadline else {
                    throw MigrationError(.internalFailure, "no stale fault was served while the hand-over ran")
                }
                usleep(1_000)
            }
            statusServing.withLock { $0 = daemon.status() }
            usleep(50_000)
        }
        let outcome = try migration.run(source, pause: Self.dirtying(source, dirty))
        Self.check(outcome, stale: Self.stale(dirty))
        #expect(["postcopy", "complete"].contains(phaseAtHandOver.withLock { $0 }), "the hand-over ran before RESUMED")
        // While postcopy served: QEMU's and libvirt's names, from the daemon's own figures.
        let serving = try #require(statusServing.withLock { $0 })
        #expect(serving.qemu?.status == .postcopyActive)
        #expect(serving.libvirt?.memoryRemaining == serving.stalePagesLeft * 4096)
        #expect(serving.libvirt?.memoryTotal == serving.regionBytes)
        #expect(serving.phases.map(\.phase).starts(with: ["handshake", "precopy", "switchover"]), "\(serving.phases)")
        #expect(serving.elapsedSeconds >= serving.phases.map(\.seconds).reduce(0, +) - 0.001)
        #expect((serving.staleFaultLatencyDist?.count ?? 0) <= serving.faultsStale)  // counted once served
        // At the end: the distribution counts every stale fault, the phases add up.
        #expect(outcome.daemon.staleFaultLatencyDist?.count == outcome.daemon.faultsStale)
        #expect(outcome.daemon.phases.last?.phase == "postcopy")
        let handOver = try #require(outcome.agent.handOverMs)
        let guestDowntime = try #require(outcome.agent.guestDowntimeMs)
        #expect(handOver >= 50)
        #expect(guestDowntime >= outcome.agent.downtimeMs + handOver - 1)
    }

    /// A hand-over that fails does not cost the destination a page: postcopy
    /// completes, and the agent then says the guest may not run there.
    @Test func aFailedHandOverStillCompletesTheMemory() throws {
        let (source, dirty) = try Self.source(dirty: 0.1)
        var migration = Migration()
        migration.agentMayFail = true
        migration.handOver = { _ in throw MigrationError(.internalFailure, "device state refused") }
        let outcome = try migration.run(source, pause: Self.dirtying(source, dirty))
        #expect(outcome.identical, "destination RAM differs from the source")
        #expect(outcome.guest.verified)
        #expect(outcome.daemon.stalePagesAtSwitchover == Self.stale(dirty))
        let failure = try #require(outcome.agentFailure)
        #expect("\(failure)".contains("every page reached the destination, but the hand-over command failed"), "\(failure)")
        #expect("\(failure)".contains("device state refused"), "\(failure)")
    }

    /// A writer keeps changing a hot set during precopy, as a running guest
    /// does; pausing stops it. Every round resends what changed, the guest on
    /// the destination writes every page after reading it, and nothing it
    /// wrote is overwritten by a page arriving late. With 1, 2 and 4 bulk
    /// streams: a page resent round after round travels its own stream, and
    /// is never overtaken by its older copy.
    @Test(arguments: [1, 2, 4])
    func guestRunningDuringPrecopyAndGuestWritesSurvive(streams: Int) throws {
        let source = try SourceFile(size: Self.size, seed: 31) { $0 % 8 == 3 }
        let pauseRequested = Atomic<Bool>(false)
        let writer = try Background("test-source-writer") { [source] in
            var generation: UInt64 = 1
            while !pauseRequested.load(ordering: .acquiring) {
                for page in stride(from: UInt64(0), to: source.pageCount, by: 10) { source.write(page, generation: generation) }
                generation += 1
                usleep(5_000)
            }
        }
        var migration = Migration(rounds: 3)
        migration.streams = streams
        migration.scribble = true
        let outcome = try migration.run(source) {
            pauseRequested.store(true, ordering: .releasing)
            _ = writer.wait("the source writer")
        }
        #expect(outcome.agent.streams == streams && outcome.daemon.streams == streams)
        #expect(outcome.daemon.precopyRounds == 3)
        #expect(outcome.agent.rounds.count == 3)
        #expect(outcome.agent.rounds.dropFirst().allSatisfy { $0.pagesSent > 0 }, "the writer dirtied nothing between rounds")
        #expect(outcome.agent.stalePages > 0)
        #expect(outcome.daemon.stalePagesAtSwitchover == outcome.agent.stalePages)
        Self.expectNoPageTwice(outcome)
        #expect(outcome.guest.verified)
        #expect(outcome.guest.scribbledPages == Self.size / 4096)
        #expect(outcome.guest.scribblesLost == 0, "a page arriving late overwrote what the guest wrote")
    }

    /// The daemon's trace accounts for every stale page and every stale
    /// fault, and the guest's touch log for every page it read; a guest that
    /// reads only some pages still checks all of RAM.
    @Test func traceAndTouchLogAccountForEverything() throws {
        try Self.traced(memory: .shmem)
    }

    @Test(.enabled(if: Host.hasHugepages(128), Comment(rawValue: Host.needsHugepages(128))))
    func traceAndTouchLogOnHugetlbfs() throws {
        try Self.traced(memory: .hugetlbfs)
    }

    static func traced(memory: MemoryKind) throws {
        let (source, dirty) = try Self.source(dirty: 0.2, seed: 41)
        var migration = Migration(memory: memory)
        migration.traced = true
        migration.touchShare = 0.25
        migration.guestThreads = 2
        // A slow background stream: most stale pages the guest reads are fetched.
        migration.postcopyBytesPerSecond = (64 << 20) / TestSize.divisor
        let outcome = try migration.run(source, pause: Self.dirtying(source, dirty))
        #expect(outcome.identical)
        #expect(outcome.guest.verified, "the digest covers the pages the guest did not read too")
        #expect(outcome.guest.pagesRead == size / 4096 / 4)

        let trace = try #require(outcome.trace.flatMap(PostcopyTrace.init(csv:)), "no readable trace")
        #expect(trace.stalePages == stale(dirty))
        let fills = trace.events.filter { $0.kind != .staleFault }
        #expect(fills.reduce(0) { $0 + $1.pages } == trace.stalePages, "every stale page is in the trace once")
        let urgent = fills.filter { $0.kind == .urgentFill }.reduce(0) { $0 + $1.pages }
        #expect(urgent == outcome.daemon.postcopyPagesUrgent)
        let faults = trace.events.filter { $0.kind == .staleFault }
        #expect(faults.count == outcome.daemon.staleFaultLatency?.count ?? 0)
        #expect(faults.count > 0, "the guest never waited for a stale page")
        let stale = Set(dirty)
        let pagesPerPage = memory == .shmem ? UInt64(1) : 512
        for fault in faults {
            #expect((0..<pagesPerPage).contains { stale.contains(fault.page + $0) }, "fault on \(fault.page) was not stale")
        }

        let touches = try #require(outcome.touchLog).split(separator: "\n").dropFirst()
        #expect(UInt64(touches.count) == outcome.guest.pagesRead)
        // The guest saw each fault the daemon resolved as a touch that waited
        // at least as long as the daemon measured (the guest's clock also
        // covers the wake-up): check the largest.
        let waited = Dictionary(touches.map { row -> (UInt64, Double) in
            let fields = row.split(separator: ",")
            return (UInt64(fields[2])!, Double(fields[3])!)
        }, uniquingKeysWith: max)
        if memory == .shmem, let longest = faults.max(by: { $0.waitedNanos < $1.waitedNanos }), let seen = waited[longest.page] {
            #expect(seen * 1000 >= Double(longest.waitedNanos) * 0.5, "guest saw \(seen) µs for a fault the daemon timed at \(longest.waitedNanos) ns")
        }
    }
}
