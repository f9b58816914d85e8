import PostcopyCore

/// How the agent's bulk connection carries precopy.
public enum PrecopyTransport: String, Codable, Sendable, CaseIterable {
    /// --insecure-plaintext on both sides; precopy-stream's `tcp`.
    case plaintext
    /// Mutual TLS 1.3 with the run's test certificates; precopy-stream's `tls`.
    case tls

    /// precopy-stream's argument.
    var streamMode: String { self == .plaintext ? "tcp" : "tls" }

    /// For the report and the progress lines.
    public var label: String { self == .plaintext ? "plaintext" : "TLS 1.3" }
}

/// What one precopy migration of a still image measured, from its summaries.
struct PrecopyMigrationRun: Equatable, Sendable {
    /// The agent's round 1: bytes on the wire (the non-zero pages and their
    /// frames), its time, and its rate (bytesSent / seconds, MiB/s).
    let round1Bytes: UInt64
    let round1Seconds: Double
    let round1MiBps: Double
    /// The agent's CPU time in round 1, all threads.
    let agentRound1CPUSeconds: Double
    /// The daemon's CPU time up to completion: with no page stale, precopy
    /// (and the handshake) is nearly all of it.
    let daemonCPUSeconds: Double
}

extension PrecopyMigrationRun {
    /// Round 1 and the daemon's CPU of `result`; throws when there was no
    /// round, the agent timed none, or postcopy was not empty.
    init(_ result: MigrationResult, name: String) throws {
        guard let round = result.agent.rounds.first else { throw BenchmarkError("\(name): the agent ran no precopy round") }
        guard let cpu = round.cpuSeconds else { throw BenchmarkError("\(name): the agent reported no CPU time for round 1") }
        guard result.daemon.stalePagesAtSwitchover == 0 else {
            throw BenchmarkError("\(name): \(result.daemon.stalePagesAtSwitchover) pages stale at switchover of a still image; the daemon's CPU would not be precopy's")
        }
        self.init(round1Bytes: round.bytesSent, round1Seconds: round.seconds, round1MiBps: round.mibPerSecond,
                  agentRound1CPUSeconds: cpu, daemonCPUSeconds: result.daemon.cpuSeconds)
    }
}

/// 8. Precopy round 1 at one RAM size over one transport: a still image
/// against precopy-stream, the region's bytes over the same transport into
/// a fresh memfd, run right after each migration.
public struct PrecopyPoint: Codable, Sendable {
    public let regionBytes: UInt64
    public let transport: PrecopyTransport
    public let runs: Int
    /// What the agent sent in round 1 (median): the non-zero pages with
    /// their frames, about 87.5 % of the region.
    public let round1Bytes: UInt64
    /// The agent's round 1, bytes sent / seconds, MiB/s: the median, and each run.
    public let postcopydMiBps: Double
    public let postcopydRuns: [Double]
    /// precopy-stream: the region's bytes / its receiver's time, MiB/s.
    public let baselineMiBps: Double
    public let baselineRuns: [Double]
    /// postcopydMiBps / baselineMiBps, of the medians.
    public let ratio: Double
    /// The daemon's CPU seconds for the whole run per GiB of region (median).
    public let daemonCPUSecondsPerGiB: Double
    /// precopy-stream's receiver, CPU seconds per GiB received (median).
    public let baselineReceiverCPUSecondsPerGiB: Double
    /// The agent's CPU seconds in round 1 per GiB of region (median).
    public let agentRound1CPUSecondsPerGiB: Double
}

extension PrecopyPoint {
    /// Medians of the alternating runs at `regionBytes` over `transport`.
    init(regionBytes: UInt64, transport: PrecopyTransport, migrations: [PrecopyMigrationRun],
         baselines: [PrecopyStreamRun]) {
        precondition(!migrations.isEmpty && !baselines.isEmpty, "a precopy point needs a run of each")
        func median(_ values: [Double]) -> Double { LatencySummary(values)!.median }
        let gib = Double(regionBytes) / 1_073_741_824
        let ours = migrations.map(\.round1MiBps)
        let theirs = baselines.map(\.mibPerSecond)
        self.init(regionBytes: regionBytes, transport: transport, runs: migrations.count,
                  round1Bytes: UInt64(median(migrations.map { Double($0.round1Bytes) })),
                  postcopydMiBps: median(ours), postcopydRuns: ours, baselineMiBps: median(theirs),
                  baselineRuns: theirs, ratio: median(ours) / median(theirs),
                  daemonCPUSecondsPerGiB: median(migrations.map(\.daemonCPUSeconds)) / gib,
                  baselineReceiverCPUSecondsPerGiB: median(baselines.map(\.receiverCPUSecondsPerGiB)),
                  agentRound1CPUSecondsPerGiB: median(migrations.map(\.agentRound1CPUSeconds)) / gib)
    }
}

/// The daemon's precopy CPU per GiB at the largest RAM size / at the
/// smallest, over one transport: near 1 when the cost per byte does not
/// grow with RAM (target ≤ 1.2).
public struct PrecopyCPUGrowth: Codable, Sendable, Equatable {
    public let transport: PrecopyTransport
    public let smallestBytes: UInt64
    public let largestBytes: UInt64
    public let ratio: Double
}

public struct PrecopyFigures: Codable, Sendable {
    public let points: [PrecopyPoint]
    /// One per transport measured.
    public let cpuPerGiBLargestToSmallest: [PrecopyCPUGrowth]
}

extension PrecopyFigures {
    init(points: [PrecopyPoint]) {
        var growth: [PrecopyCPUGrowth] = []
        for transport in PrecopyTransport.allCases {
            let sized = points.filter { $0.transport == transport }
            guard let smallest = sized.min(by: { $0.regionBytes < $1.regionBytes }),
                  let largest = sized.max(by: { $0.regionBytes < $1.regionBytes }) else { continue }
            growth.append(PrecopyCPUGrowth(
                transport: transport, smallestBytes: smallest.regionBytes, largestBytes: largest.regionBytes,
                ratio: largest.daemonCPUSecondsPerGiB / max(smallest.daemonCPUSecondsPerGiB, 1e-9)))
        }
        self.init(points: points, cpuPerGiBLargestToSmallest: growth)
    }
}
