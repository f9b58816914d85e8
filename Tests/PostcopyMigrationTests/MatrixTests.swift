import Glibc
import PostcopyCore
import PostcopyMigration
import PostcopyOS
import Testing

/// Whole migrations declared as a matrix, the way the kernel's
/// uffd-unit-tests run each test on each memory type it declares: one body,
/// `migrate`, run for every memory kind × transport × failure point, each
/// case checking the guest's image byte for byte and the counts that say
/// postcopy did its work once (every stale page installed once, stale
/// faults served, a pause and a rejoin for each failure, no page sent twice
/// when nothing failed, nothing the guest wrote overwritten).
///
/// The axes, 2 × 2 × 4 = 16 cases, each of 32 MiB, half of it stale:
/// - memory kind: shmem and hugetlbfs fault, fetch and place differently
///   (4 KiB pages; 2 MiB pages of which only the stale 4 KiB pieces cross
///   the network). One function each, `shmem` and `hugetlbfs`, so that a
///   host without hugepages shows the hugetlbfs cases skipped with the
///   reason, never passed;
/// - `Migration.Transport`: TLS, as in production, and plaintext. A reset,
///   a close or a silence meets a different stream (TLS records and
///   alerts, a new handshake on every rejoin);
/// - `FailurePoint`: what breaks, and when.
/// Beside it, the dirty share's two edges × memory kind: 4 cases. All 20
/// take about 20 s on 2 cores, as long as the tests they replaced.
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct MatrixTests {
    /// 32 MiB: long enough a postcopy to break at a chosen point, short
    /// enough to run every case.
    static let size: UInt64 = 32 << 20

    /// Where postcopy is broken, through the fault proxy every case runs
    /// through. Never near its end: connections lost once the last page has
    /// arrived take COMPLETE with them, and postcopyd, done, is not there
    /// for the agent to rejoin; the agent then leaves the source paused
    /// for an operator (DaemonCompletion), which is not what a row tests.
    enum FailurePoint: CaseIterable, Sendable {
        /// Nothing breaks: the control row. Postcopy never pauses and the
        /// agent never rejoins, so what the other rows count is their
        /// failure's doing, not the proxy's.
        case none
        /// Both connections reset (RST) the moment postcopy begins, the
        /// guest threads just blocked on their first stale pages and their
        /// requests in flight: postcopy pauses, the agent rejoins, and the
        /// requests lost with the connections are served all the same.
        case resetAsPostcopyBegins
        /// Both connections closed cleanly (FIN) half-way through postcopy:
        /// the pages already on their way are still written, and the
        /// rejoined agent sends what the daemon lacked as it rejoined (a
        /// page that was both is dropped the second time).
        case dropHalfWay
        /// Nothing forwarded and nothing closed, a quarter of the way into
        /// postcopy, for longer than the dead-peer timeout: only that
        /// timeout finds it (keepalive does not: the proxy's kernel still
        /// acknowledges). Postcopy pauses within it, and the agent, finding
        /// the daemon silent too, rejoins.
        case stallPastTheTimeout

        /// The fault injected, once this share of the stale pages has arrived.
        var injection: (fault: FaultProxy.Fault, share: Double)? {
            switch self {
            case .none: nil
            case .resetAsPostcopyBegins: (.reset, 0)
            case .dropHalfWay: (.drop, 0.5)
            case .stallPastTheTimeout: (.stall, 0.25)
            }
        }
    }

    /// How much of RAM the source rewrites at switchover, at random pages
    /// (a fifth of them to zeros): what postcopy has to bring.
    enum DirtyShare: Double, Sendable {
        /// Nothing stale: postcopy is complete at once, nothing is requested.
        case nothing = 0
        /// Half, the failure matrix's share: clean faults beside stale ones,
        /// and huge pages stale in part, of which only the stale pieces are
        /// fetched.
        case half = 0.5
        /// Every page: every fault stale, every huge page wholly.
        case all = 1
    }

    /// One case of the matrix.
    struct Case: Sendable, CustomStringConvertible {
        var memory: MemoryKind
        var transport = Migration.Transport.tls
        var failure = FailurePoint.none
        var dirty = DirtyShare.half

        var description: String { "\(memory) \(transport) \(failure) dirty \(dirty)" }
    }

    @Test(arguments: Migration.Transport.allCases, FailurePoint.allCases)
    func shmem(transport: Migration.Transport, failure: FailurePoint) throws {
        try Self.migrate(Case(memory: .shmem, transport: transport, failure: failure))
    }

    @Test(.enabled(if: Host.hasHugepages(MatrixTests.size >> 21), Comment(rawValue: Host.needsHugepages(MatrixTests.size >> 21))),
          arguments: Migration.Transport.allCases, FailurePoint.allCases)
    func hugetlbfs(transport: Migration.Transport, failure: FailurePoint) throws {
        try Self.migrate(Case(memory: .hugetlbfs, transport: transport, failure: failure))
    }

    /// The dirty share's edges, over TLS with nothing failing (half is the
    /// matrix's): the failures and transports above do not depend on how
    /// much is stale, as long as some pages are and some are not.
    @Test(arguments: [DirtyShare.nothing, .all])
    func shmem(dirty: DirtyShare) throws {
        try Self.migrate(Case(memory: .shmem, dirty: dirty))
    }

    @Test(.enabled(if: Host.hasHugepages(MatrixTests.size >> 21), Comment(rawValue: Host.needsHugepages(MatrixTests.size >> 21))),
          arguments: [DirtyShare.nothing, .all])
    func hugetlbfs(dirty: DirtyShare) throws {
        try Self.migrate(Case(memory: .hugetlbfs, dirty: dirty))
    }

    /// What the postcopy hook saw.
    struct Observed {
        /// From the stall to the pause.
        var pausedAfterStallNanos: UInt64?
        /// What `postcopyctl cancel` was answered during postcopy.
        var cancel: Result<String, DestinationDaemon.CancelRefusal>?
    }

    /// Runs `c` through a fault proxy, the guest scribbling, and checks it.
    static func migrate(_ c: Case) throws {
        let (source, dirty) = try MigrationTests.source(dirty: c.dirty.rawValue, size: size)
        let stale = MigrationTests.stale(dirty)
        let proxy = ProxySlot()
        let observed = Locked(Observed())
        var migration = ResilienceTests.throughProxy(proxy)
        migration.memory = c.memory
        migration.transport = c.transport
        migration.duringPostcopy = { daemon in
            if let injection = c.failure.injection, let proxy = proxy.current {
                guard waitUntil(daemon, received: injection.share) else { return }
                let injectedAt = monotonicNanoseconds()
                proxy.inject(injection.fault)
                if injection.fault == .stall, daemon.waitForPhase(["paused", "complete", "failed"], seconds: 30) {
                    observed.withLock { $0.pausedAfterStallNanos = monotonicNanoseconds() - injectedAt }
                }
            }
            let answer = Result { () throws(DestinationDaemon.CancelRefusal) in try daemon.cancelBeforeSwitchover() }
            observed.withLock { $0.cancel = answer }
        }
        let outcome = try migration.run(source, pause: MigrationTests.dirtying(source, dirty))
        let injected = proxy.current?.injectedFaults ?? []
        proxy.current?.stop()
        ResilienceTests.report("matrix \(c)", outcome, injected: injected)
        check(c, outcome, stale: stale, injected: injected, observed: observed.withLock { $0 },
              deadPeerTimeoutNanos: (migration.deadPeerTimeoutNanos ?? 0) * TestTiming.scale)
    }

    /// Waits until `share` of the stale pages have arrived, in postcopy;
    /// false if the migration ended first.
    static func waitUntil(_ daemon: DestinationDaemon, received share: Double) -> Bool {
        let total = Double(daemon.status().stalePagesAtSwitchover)
        while true {
            let status = daemon.status()
            if status.phase == "complete" || status.phase == "failed" { return false }
            if status.phase == "postcopy", Double(status.stalePagesLeft) <= total * (1 - share) { return true }
            usleep(2_000)
        }
    }

    /// What every case must end with: `stale` pages stale at switchover,
    /// `injected` what the proxy did, and `deadPeerTimeoutNanos` both
    /// sides' timeout as the harness applied it.
    static func check(_ c: Case, _ outcome: Migration.Outcome, stale: UInt64, injected: [FaultProxy.Fault],
                      observed: Observed, deadPeerTimeoutNanos timeout: UInt64) {
        MigrationTests.check(outcome, stale: stale, pages: size / 4096, connectionsLost: c.failure != .none)
        #expect(outcome.guest.scribbledPages == size / 4096)
        #expect(outcome.guest.scribblesLost == 0, "a page arriving late overwrote what the guest wrote")
        switch observed.cancel {
        case .success?: Issue.record("an operator's cancel was accepted during postcopy")
        case .failure?: break
        case nil: Issue.record("the postcopy hook did not run to its end")
        }

        if let injection = c.failure.injection {
            #expect(injected == [injection.fault], "injected \(injected)")
            #expect(outcome.daemon.pauses == 1, "paused \(outcome.daemon.pauses) times")
            #expect(outcome.agent.rejoins == 1, "rejoined \(outcome.agent.rejoins) times")
        } else {
            #expect(injected.isEmpty)
            #expect(outcome.daemon.pauses == 0 && outcome.agent.rejoins == 0)
        }
        if c.failure == .stallPastTheTimeout {
            // Found dead within the timeout, plus scheduling slack. The clock
            // starts at the last frame before the stall, which may be a
            // HEARTBEAT up to a quarter of the timeout earlier.
            if let took = observed.pausedAfterStallNanos {
                print("matrix \(c): paused \(fixed(Double(took) / 1e6, 0)) ms after the stall (timeout \(timeout / 1_000_000) ms)")
                #expect(took >= timeout * 7 / 10, "paused before the timeout: \(took) ns")
                #expect(took < timeout + 1_500_000_000 * TestTiming.scale, "found dead after \(took) ns")
            } else {
                Issue.record("postcopy never paused on a silent agent")
            }
        }

        if c.dirty == .nothing {
            // Nothing stale: postcopy is complete at once, nothing is requested.
            #expect(outcome.daemon.pageRequests == 0)
            #expect(outcome.agent.pageRequests == 0)
        } else {
            #expect(outcome.daemon.faultsStale > 0, "the guest threads never waited for a stale page")
        }
        if c.failure == .none {
            #expect(outcome.agent.pageRequests == outcome.daemon.pageRequests)
        } else {
            // Requests are lost with the connections (and a rejoin asks
            // again for every page a guest thread waits on).
            #expect(outcome.agent.pageRequests <= outcome.daemon.pageRequests)
        }
        switch c.memory {
        case .shmem:
            if c.failure == .none {
                // Only a fault on a stale page asks the source for anything:
                // clean faults, however many, never touch the network. (A
                // huge page's stale pieces may take several requests.)
                #expect(outcome.daemon.pageRequests <= outcome.daemon.faultsStale)
            }
            if c.dirty == .half {
                #expect(outcome.daemon.faultsClean > 0, "no clean fault happened during postcopy")
            }
            checkCollapse(outcome)
        case .hugetlbfs:
            #expect(outcome.guest.hugepages?.skipped == "guest RAM is on hugetlbfs: already in 2 MiB pages")
            if c.dirty == .half {
                // Only the stale 4 KiB pieces of a huge page are fetched, never all 512.
                #expect(outcome.daemon.pagesRequested <= stale)
            }
        }
    }

    /// Once postcopy is complete, the guest put its RAM back into 2 MiB
    /// pages (issue 22): every extent PMD-mapped in its smaps, or, where
    /// this host's shmem THP settings refuse MADV_COLLAPSE, skipped with
    /// the setting named.
    static func checkCollapse(_ outcome: Migration.Outcome) {
        guard let collapse = outcome.guest.hugepages else {
            Issue.record("the guest reported no collapse into 2 MiB pages")
            return
        }
        #expect(collapse.extents == size >> 21)
        if let refusal = HugepageCollapser.currentSettings().collapseRefusal {
            #expect(collapse.skipped == refusal)
        } else {
            #expect(collapse.pmdMappedBefore == 0, "guest RAM was in 2 MiB mappings during postcopy")
            #expect(collapse.pmdMappedAfter == size >> 21, "\(collapse.lines)")
        }
    }
}
