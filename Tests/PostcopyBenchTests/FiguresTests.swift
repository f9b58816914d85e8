import PostcopyCore
import Testing
@testable import PostcopyBench

@Suite struct FiguresTests {
    @Test func linearFitRecoversALine() {
        let fit = LinearFit(x: [1, 2, 3, 4], y: [5, 7, 9, 11])
        #expect(abs(fit.slope - 2) < 1e-12)
        #expect(abs(fit.intercept - 3) < 1e-12)
        #expect(abs(fit.r2 - 1) < 1e-12)
        let flat = LinearFit(x: [1, 1, 1], y: [2, 3, 4])
        #expect(flat.slope == 0 && flat.intercept == 3, "no spread in x: no slope, the mean")
    }

    @Test func distributionsAndTheirMedians() throws {
        let one = try #require(Distribution(micros: (1...100).map(Double.init)))
        #expect(one.count == 100 && one.max == 100 && one.mean == 50.5)
        #expect(Distribution(micros: []) == nil)
        let runs = [Distribution(count: 10, p50: 1, p99: 9, p999: 10, max: 10, mean: 2),
                    Distribution(count: 10, p50: 3, p99: 5, p999: 6, max: 30, mean: 4),
                    Distribution(count: 10, p50: 2, p99: 7, p999: 8, max: 20, mean: 3)]
        let median = try #require(Distribution.medianOf(runs))
        #expect(median == Distribution(count: 30, p50: 2, p99: 7, p999: 8, max: 20, mean: 3))
    }

    /// Stale touches are those whose page the daemon's trace has a stale
    /// fault for; on 2 MiB pages only a huge page's first touch counts.
    @Test func guestStallsSplitByTheTrace() {
        var trace = PostcopyTrace(stalePages: 2)
        trace.record(.init(kind: .staleFault, atNanos: 10, page: 7, pages: 1, waitedNanos: 900))
        trace.record(.init(kind: .staleFault, atNanos: 20, page: 1024, pages: 1, waitedNanos: 900))
        let touches = [Touch(thread: 0, atMicros: 1, page: 7, stallMicros: 95),
                       Touch(thread: 0, atMicros: 2, page: 8, stallMicros: 9),
                       Touch(thread: 1, atMicros: 3, page: 1030, stallMicros: 120),
                       Touch(thread: 1, atMicros: 4, page: 1031, stallMicros: 1)]
        let result = MigrationResult(daemon: DestinationSummary(), agent: AgentSummary(), guest: GuestSummary(),
                                     trace: trace, touches: touches, wallSeconds: 1, migrationWallSeconds: 1)
        let small = result.guestStalls(pagesPerFault: 1)
        #expect(small.stale == [95])
        #expect(small.clean == [9, 120, 1])
        let huge = result.guestStalls(pagesPerFault: 512)
        #expect(huge.stale == [95, 120], "page 7 and 1030 fall in huge pages 0 and 2, which faulted stale")
        #expect(huge.clean.isEmpty, "page 8 and 1031 share those huge pages: not first touches")
    }

    @Test func aReportOfNothingIsEmptyAndOfSomethingHasItsRows() throws {
        #expect(Report.markdown(BenchResults()).isEmpty)
        var results = BenchResults()
        results.backfill = BackfillFigures(bytes: 1 << 30, runs: 3, postcopydGiBps: 2.9, postcopydRuns: [2.9, 2.8, 3.0],
                                           tcpGiBps: 3.2, tcpRuns: [3.2, 3.1, 3.3], memcpyGiBps: 17.8,
                                           ratioToTCP: 2.9 / 3.2, ratioToMemcpy: 2.9 / 17.8, transport: "plain TCP",
                                           postcopydAgentIdleGiBps: 2.5, postcopydAgentIdleRuns: [2.5],
                                           ratioToTCPAgentIdle: 2.5 / 3.2)
        let table = Report.markdown(results)
        #expect(table.contains("| 1 GiB | normal (default) | 2.90 | 3.20 | 17.80 | 91% | 16% |"), "\(table)")
        #expect(table.contains("| 1 GiB | SCHED_IDLE | 2.50 | 3.20 | 17.80 | 78% | 14% |"), "\(table)")
        #expect(!table.contains("nan") && !table.contains("inf"))
    }
}
