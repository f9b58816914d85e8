import Foundation
import PostcopyCore

/// Precopy over several bulk streams (`postcopy-push --streams`): round 1
/// of a still image at each count of streams, in plaintext and over TLS,
/// the counts alternating within each run so that a busy machine weighs on
/// each alike. Reported as medians, and as ratios to one stream measured in
/// the same run: on a shared machine the ratio says more than the rate.
public struct StreamsFigures: Codable, Sendable {
    public let regionBytes: UInt64
    public let points: [Point]

    /// One count of streams over one transport.
    public struct Point: Codable, Sendable {
        public let transport: PrecopyTransport
        public let streams: Int
        /// Round 1, bytes sent / seconds, MiB/s: the median, and each run.
        public let mibPerSecond: Double
        public let runs: [Double]
        /// The median over the same transport's one-stream median.
        public let ratioToOneStream: Double
        /// The daemon's and the agent's (round 1) CPU seconds per GiB, medians.
        public let daemonCPUSecondsPerGiB: Double
        public let agentRound1CPUSecondsPerGiB: Double
    }

    /// One transport's points from its runs at each count (`counts` in
    /// order, the first the reference): medians, and ratios to the first.
    static func points(_ transport: PrecopyTransport, counts: [Int], measured: [Int: [PrecopyMigrationRun]],
                       regionBytes: UInt64) -> [Point] {
        let gib = Double(regionBytes) / 1_073_741_824
        func median(_ values: [Double]) -> Double { LatencySummary(values)?.median ?? 0 }
        let reference = median(measured[counts.first ?? 1]?.map(\.round1MiBps) ?? [])
        return counts.map { count in
            let runs = measured[count] ?? []
            let rate = median(runs.map(\.round1MiBps))
            return Point(transport: transport, streams: count, mibPerSecond: rate, runs: runs.map(\.round1MiBps),
                         ratioToOneStream: reference > 0 ? rate / reference : 0,
                         daemonCPUSecondsPerGiB: median(runs.map(\.daemonCPUSeconds)) / gib,
                         agentRound1CPUSecondsPerGiB: median(runs.map(\.agentRound1CPUSeconds)) / gib)
        }
    }

    /// The figures as a markdown table.
    public var markdown: String {
        var lines = ["| RAM | transport | streams | round 1 MiB/s (median) | runs | ratio to 1 stream | daemon CPU s / GiB | agent round-1 CPU s / GiB |",
                     "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for point in points {
            lines.append("| \(ByteSize.format(regionBytes)) | \(point.transport.label) | \(point.streams) | \(fixed(point.mibPerSecond, 0)) | "
                + point.runs.map { fixed($0, 0) }.joined(separator: ", ")
                + " | \(fixed(point.ratioToOneStream, 2))× | \(fixed(point.daemonCPUSecondsPerGiB, 2)) | \(fixed(point.agentRound1CPUSecondsPerGiB, 2)) |")
        }
        return lines.joined(separator: "\n")
    }
}

extension Suite {
    /// Round 1 of a still image of `size` over each count in `streams`, in
    /// plaintext and over TLS, `runs` times each, counts alternating.
    public func precopyStreams(size: UInt64, streams counts: [Int], runs: Int) throws -> StreamsFigures {
        try TestCertificates.make(in: environment)
        let gib = Double(size) / 1_073_741_824
        var points: [StreamsFigures.Point] = []
        for transport in PrecopyTransport.allCases {
            var measured = [Int: [PrecopyMigrationRun]]()
            for run in 0..<runs {
                for count in counts {
                    var scenario = MigrationScenario(name: "streams-\(size >> 20)M-\(transport.rawValue)-\(count)-\(run)",
                                                     size: size, source: .image(stalePages: 0))
                    scenario.guestThreads = 1
                    scenario.touch = 0
                    scenario.maxRounds = 2
                    scenario.tls = transport == .tls
                    scenario.streams = count
                    let result = try scenario.run(in: environment)
                    guard result.agent.streams == count else {
                        throw BenchmarkError("\(scenario.name): the agent used \(result.agent.streams) streams, not \(count)")
                    }
                    let migration = try PrecopyMigrationRun(result, name: scenario.name)
                    measured[count, default: []].append(migration)
                    environment.say("streams \(ByteSize.format(size)) \(transport.label), \(count) stream\(count == 1 ? "" : "s"), run \(run + 1): round 1 \(fixed(migration.round1MiBps, 0)) MiB/s, daemon CPU \(fixed(migration.daemonCPUSeconds / gib, 2)) s/GiB")
                }
            }
            points += StreamsFigures.points(transport, counts: counts, measured: measured, regionBytes: size)
        }
        return StreamsFigures(regionBytes: size, points: points)
    }
}
