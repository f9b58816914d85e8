import PostcopyCore
import Testing
@testable import PostcopyBench

@Suite struct StreamsFiguresTests {
    static func run(_ mibPerSecond: Double, daemonCPU: Double = 1, agentCPU: Double = 0.5) -> PrecopyMigrationRun {
        PrecopyMigrationRun(round1Bytes: 1 << 30, round1Seconds: 1024 / mibPerSecond, round1MiBps: mibPerSecond,
                            agentRound1CPUSeconds: agentCPU, daemonCPUSeconds: daemonCPU)
    }

    /// Medians of the runs, each count's ratio to the first count's median,
    /// CPU per GiB; and one table row per point.
    @Test func mediansAndRatiosToOneStream() {
        let points = StreamsFigures.points(.tls, counts: [1, 2], measured: [
            1: [Self.run(500), Self.run(600), Self.run(400)],
            2: [Self.run(900, daemonCPU: 4), Self.run(600, daemonCPU: 2), Self.run(750, daemonCPU: 3)],
        ], regionBytes: 2 << 30)
        #expect(points.map(\.streams) == [1, 2])
        #expect(points.map(\.mibPerSecond) == [500, 750])
        #expect(points.map(\.ratioToOneStream) == [1, 1.5])
        #expect(points[1].runs == [900, 600, 750])
        #expect(points[1].daemonCPUSecondsPerGiB == 1.5 && points[1].agentRound1CPUSecondsPerGiB == 0.25)
        let table = StreamsFigures(regionBytes: 2 << 30, points: points).markdown.split(separator: "\n")
        #expect(table.count == 4)
        #expect(table[3] == "| 2 GiB | TLS 1.3 | 2 | 750 | 900, 600, 750 | 1.50× | 1.50 | 0.25 |", "\(table[3])")
    }
}
