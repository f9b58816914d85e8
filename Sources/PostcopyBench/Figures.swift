import PostcopyCore

/// A latency distribution in microseconds.
public struct Distribution: Codable, Sendable, Equatable {
    public let count: Int
    public let p50: Double
    public let p99: Double
    public let p999: Double
    public let max: Double
    public let mean: Double

    public init(count: Int, p50: Double, p99: Double, p999: Double, max: Double, mean: Double) {
        self.count = count
        self.p50 = p50
        self.p99 = p99
        self.p999 = p999
        self.max = max
        self.mean = mean
    }

    /// From samples in µs; nil when there are none.
    public init?(micros samples: [Double]) {
        guard let summary = LatencySummary(samples) else { return nil }
        self.init(count: summary.count, p50: summary.median, p99: summary.p99, p999: summary.p999, max: summary.max,
                  mean: samples.reduce(0, +) / Double(samples.count))
    }

    /// The median of each figure over several distributions (repeated runs).
    static func medianOf(_ runs: [Distribution]) -> Distribution? {
        func median(_ values: [Double]) -> Double { LatencySummary(values)?.median ?? 0 }
        guard !runs.isEmpty else { return nil }
        return Distribution(count: runs.reduce(0) { $0 + $1.count }, p50: median(runs.map(\.p50)),
                            p99: median(runs.map(\.p99)), p999: median(runs.map(\.p999)),
                            max: median(runs.map(\.max)), mean: median(runs.map(\.mean)))
    }
}

/// 2. Stale-fault latency, seen from inside the guest.
public struct StaleFaultFigures: Codable, Sendable {
    /// "idle" (background stream capped at 1 MiB/s) or "busy" (unlimited).
    public let link: String
    public let regionBytes: UInt64
    public let stalePages: UInt64
    /// First touches that waited for a fetch, timed by the guest.
    public let guest: Distribution
    /// The same faults, timed by the daemon (fault read → page installed).
    public let daemon: Distribution?
    /// First touches of pages that were already fresh, timed by the guest:
    /// the clean-fault cost in the same run.
    public let cleanTouch: Distribution?
    /// The background stream's rate during the postcopy phase.
    public let backgroundMiBps: Double
    /// Loopback TCP 16-byte request / 4 KiB response, the same run.
    public let pingPong: Distribution
    /// pingPong.p99 + cleanTouch.p99.
    public let baselineP99: Double
    /// guest.p99 / baselineP99.
    public let ratioP99: Double
    /// Runs of this link (the figures are the median run's by p99), and
    /// the lowest and highest p99 among them.
    public var runs = 1
    public var p99Min = 0.0
    public var p99Max = 0.0
}

/// 3. Back-fill throughput.
public struct BackfillFigures: Codable, Sendable {
    public let bytes: UInt64
    public let runs: Int
    /// Stale bytes / postcopy phase, per run and the median (GiB/s).
    public let postcopydGiBps: Double
    public let postcopydRuns: [Double]
    /// Raw loopback TCP into a shared mapping, and memcpy (medians).
    public let tcpGiBps: Double
    public let tcpRuns: [Double]
    public let memcpyGiBps: Double
    public let ratioToTCP: Double
    public let ratioToMemcpy: Double
    public let transport: String
    /// The same runs with the agent's sender at SCHED_IDLE (the daemon's
    /// receiver stays at its default, normal): on loopback the agent
    /// shares the two CPUs with the daemon; across hosts it does not.
    public let postcopydAgentIdleGiBps: Double
    public let postcopydAgentIdleRuns: [Double]
    public let ratioToTCPAgentIdle: Double
}

/// 4. End-to-end.
public struct EndToEndFigures: Codable, Sendable {
    public let regionBytes: UInt64
    public let dirtyShare: Double
    public let precopyRounds: Int
    public let precopySeconds: Double
    public let stalePages: UInt64
    public let totalSeconds: Double
    public let downtimeMs: Double
    public let postcopySeconds: Double
    public let staleFaults: UInt64
    public let staleFaultDaemon: Distribution?
    /// Time guest threads spent blocked on first touches: all threads, the
    /// most-blocked thread, and the longest single stall.
    public let guestStallTotalMs: Double
    public let guestStallMaxThreadMs: Double
    public let guestStallMaxUs: Double
    public let bytesSent: UInt64
    public let idealBytes: UInt64
    public let bytesToIdeal: Double
}

/// 5. One point of the scaling runs.
public struct ScalingPoint: Codable, Sendable {
    public let regionBytes: UInt64
    public let stalePages: UInt64
    public let precopySeconds: Double
    public let postcopySeconds: Double
    /// Postcopy phase per stale page.
    public let postcopyUsPerStalePage: Double
    /// The daemon's CPU time from resume to the last stale page.
    public let postcopyCPUSeconds: Double
    public let postcopyCPUUsPerStalePage: Double
    public let daemonCPUSeconds: Double
    public let daemonCPUSecondsPerGiB: Double
    /// Resident memory besides guest RAM.
    public let overheadBytes: UInt64
    public let overheadMiBPerGiB: Double
}

public struct ScalingFigures: Codable, Sendable {
    public let bySize: [ScalingPoint]
    public let byStalePages: [ScalingPoint]
    /// Least squares of the daemon's postcopy CPU seconds on stale pages
    /// (byStalePages): the phase's cost.
    public let fitUsPerStalePage: Double
    public let fitInterceptMs: Double
    public let fitR2: Double
    /// Postcopy CPU seconds of the largest region / of the smallest
    /// (bySize): near 1 when the cost does not grow with RAM.
    public let postcopyLargestToSmallest: Double
    /// Least squares of the daemon's memory besides guest RAM on RAM size
    /// (bySize): what grows with RAM, and what does not (binary, runtime).
    public let overheadMiBPerGiB: Double
    public let overheadFixedMiB: Double
}

/// 6. Huge pages with sparse 4 KiB dirtiness.
public struct HugePageFigures: Codable, Sendable {
    public let regionBytes: UInt64
    public let stalePages: UInt64
    public let pageRequests: UInt64
    public let pagesRequested: UInt64
    /// Bytes that crossed the network per stale fault (requested pages).
    public let bytesPerStaleFault: Double
    public let guest: Distribution?
    public let daemon: Distribution?
    /// Loopback request / 4 KiB and / 2 MiB response, the same run.
    public let pingPong4KiB: Distribution
    public let pingPong2MiB: Distribution
    /// bytesPerStaleFault / 2 MiB, and guest p50 / 2 MiB ping-pong p50.
    public let bytesRatioTo2MiB: Double
    public let latencyP50RatioTo2MiB: Double
}

public struct MachineFacts: Codable, Sendable {
    public let cpuModel: String
    public let cpus: Int
    public let memoryBytes: UInt64
    public let kernel: String
    public let crc32c: String

    public init(cpuModel: String, cpus: Int, memoryBytes: UInt64, kernel: String, crc32c: String) {
        self.cpuModel = cpuModel
        self.cpus = cpus
        self.memoryBytes = memoryBytes
        self.kernel = kernel
        self.crc32c = crc32c
    }
}

/// Everything one `make bench` measured.
public struct BenchResults: Codable, Sendable {
    public var command = ""
    public var started = ""
    public var durationSeconds = 0.0
    public var machine: MachineFacts?
    public var cleanFaults: [CleanFaultFigures] = []
    public var staleFaults: [StaleFaultFigures] = []
    public var backfill: BackfillFigures?
    public var endToEnd: [EndToEndFigures] = []
    public var scaling: ScalingFigures?
    public var hugePages: HugePageFigures?
    public var pause: [PauseFigures] = []
    public var precopy: PrecopyFigures?

    public init() {}
}

/// 7. The pause by dirty log: one migration of a source rewriting 10 % of
/// its pages, at one RAM size, with one dirty log.
public struct PauseFigures: Codable, Sendable {
    public let regionBytes: UInt64
    public let dirtyLog: String
    public let stalePages: UInt64
    public let finalScanMs: Double
    /// Source paused → RESUMED received (the agent's clock).
    public let downtimeMs: Double
    /// Median over the rounds after the first: the agent's CPU seconds and
    /// the pages the log reported (all pages with hashing).
    public let roundCPUSeconds: Double
    public let roundPagesLookedAt: UInt64
    public let rounds: Int
}
