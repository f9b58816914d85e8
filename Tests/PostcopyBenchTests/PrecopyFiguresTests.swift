import PostcopyCore
import Testing
@testable import PostcopyBench

@Suite struct PrecopyFiguresTests {
    static let streamOutput = """
        bytes=268435456
        mode=tls
        memory=shmem
        seconds=0.412
        mib_per_s=621.4
        receiver_cpu_s_per_gib=1.184

        """

    @Test func precopyStreamOutputIsRead() throws {
        let run = try PrecopyStreamRun(output: Self.streamOutput)
        #expect(run == PrecopyStreamRun(bytes: 256 << 20, mode: "tls", seconds: 0.412, mibPerSecond: 621.4,
                                        receiverCPUSecondsPerGiB: 1.184))
    }

    @Test func precopyStreamOutputMissingAKeyIsAClearError() {
        let missing = Self.streamOutput.split(separator: "\n").filter { !$0.hasPrefix("mib_per_s=") }.joined(separator: "\n")
        let error = #expect(throws: BenchmarkError.self) { try PrecopyStreamRun(output: missing) }
        #expect(error?.description.hasPrefix("precopy-stream printed no mib_per_s=: bytes=268435456") == true,
                "\(error?.description ?? "")")
        let nothing = #expect(throws: BenchmarkError.self) { try PrecopyStreamRun(output: "") }
        #expect(nothing?.description == "precopy-stream printed no mode=: (nothing)")
        let garbled = Self.streamOutput.replacingOccurrences(of: "seconds=0.412", with: "seconds=fast")
        let unreadable = #expect(throws: BenchmarkError.self) { try PrecopyStreamRun(output: garbled) }
        #expect(unreadable?.description == "precopy-stream printed seconds=fast, not a number")
    }

    static func migration(mibps: Double, daemonCPU: Double, agentCPU: Double = 0.5,
                          bytes: UInt64 = 7 << 27) -> PrecopyMigrationRun {
        PrecopyMigrationRun(round1Bytes: bytes, round1Seconds: Double(bytes) / 1_048_576 / mibps,
                            round1MiBps: mibps, agentRound1CPUSeconds: agentCPU, daemonCPUSeconds: daemonCPU)
    }

    static func stream(mibps: Double, cpu: Double) -> PrecopyStreamRun {
        PrecopyStreamRun(bytes: 1 << 30, mode: "tls", seconds: 1024 / mibps, mibPerSecond: mibps, receiverCPUSecondsPerGiB: cpu)
    }

    /// Medians of each side's runs (in run order in the figures), the ratio
    /// of the medians, and CPU seconds per GiB of region.
    @Test func aPointIsTheMediansOfItsRuns() {
        let point = PrecopyPoint(
            regionBytes: 2 << 30, transport: .tls,
            migrations: [Self.migration(mibps: 700, daemonCPU: 1.6, agentCPU: 0.9),
                         Self.migration(mibps: 500, daemonCPU: 1.2, agentCPU: 0.7),
                         Self.migration(mibps: 600, daemonCPU: 1.4, agentCPU: 0.8)],
            baselines: [Self.stream(mibps: 800, cpu: 1.1), Self.stream(mibps: 1000, cpu: 0.9), Self.stream(mibps: 750, cpu: 1.0)])
        #expect(point.runs == 3)
        #expect(point.round1Bytes == 7 << 27)
        #expect(point.postcopydMiBps == 600 && point.postcopydRuns == [700, 500, 600])
        #expect(point.baselineMiBps == 800 && point.baselineRuns == [800, 1000, 750])
        #expect(point.ratio == 0.75)
        #expect(abs(point.daemonCPUSecondsPerGiB - 0.7) < 1e-12, "1.4 s over 2 GiB")
        #expect(abs(point.agentRound1CPUSecondsPerGiB - 0.4) < 1e-12, "0.8 s over 2 GiB")
        #expect(point.baselineReceiverCPUSecondsPerGiB == 1.0, "already per GiB")

        let two = PrecopyPoint(regionBytes: 1 << 30, transport: .plaintext,
                               migrations: [Self.migration(mibps: 900, daemonCPU: 0.6), Self.migration(mibps: 1100, daemonCPU: 0.8)],
                               baselines: [Self.stream(mibps: 1000, cpu: 0.5)])
        #expect(two.postcopydMiBps == 1000 && two.ratio == 1, "an even count's median is the mean of the middle two")
        #expect(abs(two.daemonCPUSecondsPerGiB - 0.7) < 1e-12)
    }

    /// One run at `bytes`, 7/8 of it sent, the agent at 0.5 s of CPU.
    static func point(_ bytes: UInt64, _ transport: PrecopyTransport, cpuPerGiB: Double) -> PrecopyPoint {
        let gib = Double(bytes) / 1_073_741_824
        return PrecopyPoint(regionBytes: bytes, transport: transport,
                            migrations: [Self.migration(mibps: 600, daemonCPU: cpuPerGiB * gib, bytes: bytes / 8 * 7)],
                            baselines: [Self.stream(mibps: 800, cpu: 0.9)])
    }

    /// Per transport, the daemon's CPU per GiB at the largest size over that
    /// at the smallest, whatever order the points came in.
    @Test func cpuGrowthIsLargestOverSmallestPerTransport() {
        let figures = PrecopyFigures(points: [
            Self.point(8 << 30, .plaintext, cpuPerGiB: 0.66), Self.point(1 << 30, .plaintext, cpuPerGiB: 0.6),
            Self.point(1 << 30, .tls, cpuPerGiB: 1.5), Self.point(4 << 30, .tls, cpuPerGiB: 1.6),
            Self.point(8 << 30, .tls, cpuPerGiB: 2.0),
        ])
        #expect(figures.cpuPerGiBLargestToSmallest.map(\.transport) == [.plaintext, .tls])
        let plaintext = figures.cpuPerGiBLargestToSmallest[0]
        #expect(plaintext.smallestBytes == 1 << 30 && plaintext.largestBytes == 8 << 30)
        #expect(abs(plaintext.ratio - 1.1) < 1e-9)
        #expect(abs(figures.cpuPerGiBLargestToSmallest[1].ratio - 2.0 / 1.5) < 1e-9)
        #expect(PrecopyFigures(points: [Self.point(1 << 30, .tls, cpuPerGiB: 1)]).cpuPerGiBLargestToSmallest
            == [PrecopyCPUGrowth(transport: .tls, smallestBytes: 1 << 30, largestBytes: 1 << 30, ratio: 1)],
                "one size: a ratio of 1, and no line for a transport not measured")
    }

    @Test func theReportHasATableWithTheTargets() {
        var results = BenchResults()
        results.precopy = PrecopyFigures(points: [Self.point(256 << 20, .tls, cpuPerGiB: 1.2),
                                                  Self.point(512 << 20, .tls, cpuPerGiB: 1.32)])
        let table = Report.markdown(results)
        #expect(table.contains("target: ≥ 80 % of the same-run TLS baseline; daemon CPU per GiB within 1.2× from smallest to largest"))
        #expect(table.contains("| 512 MiB | TLS 1.3 | 448 MiB | 600 | 800 | 75% | 1.32 | 0.90 | 1.00 |"), "\(table)")
        #expect(table.contains("TLS 1.3 1.10× (512 MiB / 256 MiB) (target ≤ 1.2×)"), "\(table)")
        #expect(!table.contains("nan") && !table.contains("inf"))
    }
}
