import Foundation
import PostcopyCore
import PostcopyOS

/// Sizes of the benchmark runs: `full` is what `make bench` runs (about five
/// minutes on two CPUs), `quick` a smoke run of every path in about two.
public struct BenchScale: Sendable {
    public var staleRegion: UInt64
    public var backfillRegion: UInt64
    public var backfillRuns: Int
    public var endToEndRegion: UInt64
    public var scalingSizes: [UInt64]
    public var scalingStalePages: UInt64
    public var sweepRegion: UInt64
    public var sweepShares: [Double]
    public var hugeRegion: UInt64
    public var pingPongIterations: Int
    public var staleBusyRuns: Int
    public var pauseSizes: [UInt64]
    /// Benchmark 8: RAM sizes, and alternating runs (migration, baseline) at each size and transport.
    public var precopySizes: [UInt64]
    public var precopyRuns: Int

    public static let full = BenchScale(
        staleRegion: 512 << 20, backfillRegion: 1 << 30, backfillRuns: 3, endToEndRegion: 4 << 30,
        scalingSizes: [1 << 30, 2 << 30, 4 << 30, 8 << 30], scalingStalePages: 25_600,
        sweepRegion: 1 << 30, sweepShares: [0.01, 0.05, 0.10, 0.25, 0.50, 1.0], hugeRegion: 512 << 20,
        pingPongIterations: 20_000, staleBusyRuns: 3, pauseSizes: [1 << 30, 4 << 30, 8 << 30],
        precopySizes: [1 << 30, 8 << 30], precopyRuns: 3)

    public static let quick = BenchScale(
        staleRegion: 128 << 20, backfillRegion: 256 << 20, backfillRuns: 1, endToEndRegion: 512 << 20,
        scalingSizes: [256 << 20, 512 << 20], scalingStalePages: 6_400,
        sweepRegion: 256 << 20, sweepShares: [0.05, 0.5], hugeRegion: 128 << 20, pingPongIterations: 5_000,
        staleBusyRuns: 1, pauseSizes: [256 << 20, 512 << 20], precopySizes: [256 << 20, 512 << 20], precopyRuns: 1)
}

/// Benchmarks 2–8 of `make bench`; each measures its baseline in the same run.
public struct Suite: Sendable {
    public let environment: BenchEnvironment
    public let scale: BenchScale
    /// Passed to every migration (nil: the programs' default, normal).
    public var backgroundScheduling: String?

    public init(environment: BenchEnvironment, scale: BenchScale) {
        self.environment = environment
        self.scale = scale
    }

    private var baselines: Baselines { Baselines(environment: environment) }

    // MARK: 2. stale-fault latency

    /// Half the pages of the region stale, one guest thread reading every
    /// page in a random order: on an idle link (background capped at 1 MiB/s,
    /// so faults fetch nearly every stale page) and with the background
    /// stream at full speed. The guest's clock around each first touch,
    /// matched with the daemon's trace to tell stale from clean touches.
    public func staleFaults() throws -> (figures: [StaleFaultFigures], busyRun: MigrationResult, idleRun: MigrationResult) {
        let pingPong = try baselines.pingPong(responseBytes: 4096, iterations: scale.pingPongIterations, runs: 3)
        environment.say("ping-pong 4 KiB: p50 \(fixed(pingPong.p50, 1)) µs, p99 \(fixed(pingPong.p99, 1)) µs")
        var figures: [StaleFaultFigures] = []
        var medianRuns: [MigrationResult] = []
        // The busy link's tail moves from run to run: three runs, the median one reported.
        for (link, cap, repeats) in [("idle", 1.0 as Double?, 1), ("busy", nil, scale.staleBusyRuns)] {
            var measured: [(StaleFaultFigures, MigrationResult)] = []
            for run in 0..<repeats {
                var scenario = MigrationScenario(name: "stale-\(link)-\(run)", size: scale.staleRegion,
                                                 source: .image(stalePages: scale.staleRegion / 4096 / 2))
                scenario.zeroShare = 0
                scenario.guestThreads = 1
                scenario.touchLog = true
                scenario.trace = true
                scenario.postcopyMiBps = cap
                scenario.maxRounds = 2
                scenario.backgroundScheduling = backgroundScheduling
                let result = try scenario.run(in: environment)
                let (stale, clean) = result.guestStalls(pagesPerFault: 1)
                guard let guest = Distribution(micros: stale) else {
                    throw BenchmarkError("stale-\(link): the guest never waited for a stale page")
                }
                let cleanTouch = Distribution(micros: clean)
                let daemon = Distribution(micros: (result.trace?.events ?? []).filter { $0.kind == .staleFault }
                    .map { Double($0.waitedNanos) / 1000 })
                let baseline = pingPong.p99 + (cleanTouch?.p99 ?? 0)
                environment.say("stale faults, \(link) link, run \(run + 1): \(guest.count) faults, guest p50 \(fixed(guest.p50, 1)) µs, p99 \(fixed(guest.p99, 1)) µs; baseline p99 \(fixed(baseline, 1)) µs; background \(fixed(result.daemon.backgroundMiBPerSecond, 0)) MiB/s")
                measured.append((StaleFaultFigures(
                    link: link, regionBytes: scale.staleRegion, stalePages: result.daemon.stalePagesAtSwitchover,
                    guest: guest, daemon: daemon, cleanTouch: cleanTouch,
                    backgroundMiBps: result.daemon.backgroundMiBPerSecond, pingPong: pingPong, baselineP99: baseline,
                    ratioP99: guest.p99 / baseline), result))
            }
            measured.sort { $0.0.guest.p99 < $1.0.guest.p99 }
            var (median, run) = measured[measured.count / 2]
            median.runs = repeats
            median.p99Min = measured.first!.0.guest.p99
            median.p99Max = measured.last!.0.guest.p99
            figures.append(median)
            medianRuns.append(run)
        }
        return (figures, medianRuns[1], medianRuns[0])
    }

    // MARK: 3. back-fill throughput

    /// Every page stale and none zero, the guest idle: the postcopy phase is
    /// the background stream alone. Against tcp-stream's raw TCP and memcpy
    /// into the same kind of mapping, runs alternating.
    public func backfill() throws -> BackfillFigures {
        var ours: [Double] = []
        var oursAgentIdle: [Double] = []
        var tcp: [Double] = []
        var memcpy: [Double] = []
        for run in 0..<scale.backfillRuns {
            for agent in [nil, "idle"] as [String?] {
                var scenario = MigrationScenario(name: "backfill-\(run)\(agent.map { "-agent-\($0)" } ?? "")",
                                                 size: scale.backfillRegion,
                                                 source: .image(stalePages: scale.backfillRegion / 4096))
                scenario.zeroShare = 0
                scenario.guestThreads = 1
                scenario.touch = 0
                scenario.maxRounds = 2
                scenario.agentScheduling = agent
                let result = try scenario.run(in: environment)
                let bytes = Double(result.daemon.stalePagesAtSwitchover * 4096)
                let rate = bytes / max(result.daemon.postcopySeconds, 1e-9) / 1_073_741_824
                if agent == nil { ours.append(rate) } else { oursAgentIdle.append(rate) }
            }
            let baseline = try baselines.stream(bytes: scale.backfillRegion, memory: .shmem)
            tcp.append(baseline.tcp)
            memcpy.append(baseline.memcpy)
            environment.say("back-fill run \(run + 1): postcopyd \(fixed(ours.last!, 2)) GiB/s (agent at SCHED_IDLE \(fixed(oursAgentIdle.last!, 2))), raw TCP \(fixed(baseline.tcp, 2)) GiB/s, memcpy \(fixed(baseline.memcpy, 2)) GiB/s")
        }
        let median = { (values: [Double]) in LatencySummary(values)!.median }
        return BackfillFigures(bytes: scale.backfillRegion, runs: scale.backfillRuns, postcopydGiBps: median(ours),
                               postcopydRuns: ours, tcpGiBps: median(tcp), tcpRuns: tcp, memcpyGiBps: median(memcpy),
                               ratioToTCP: median(ours) / median(tcp), ratioToMemcpy: median(ours) / median(memcpy),
                               transport: "plain TCP (no TLS yet)", postcopydAgentIdleGiBps: median(oursAgentIdle),
                               postcopydAgentIdleRuns: oursAgentIdle,
                               ratioToTCPAgentIdle: median(oursAgentIdle) / median(tcp))
    }

    // MARK: 4. end-to-end

    /// The source workload rewriting `dirty` of its pages until paused; the
    /// guest's 4 threads read every page after resume.
    public func endToEnd(dirty: Double, trace: Bool) throws -> (EndToEndFigures, MigrationResult) {
        var scenario = MigrationScenario(name: "e2e-\(Int(dirty * 100))", size: scale.endToEndRegion,
                                         source: .workload(dirty: dirty))
        scenario.trace = trace
        scenario.maxRounds = dirty > 0.25 ? 3 : 5
        let result = try scenario.run(in: environment)
        let figures = EndToEndFigures(
            regionBytes: scale.endToEndRegion, dirtyShare: dirty, precopyRounds: result.agent.rounds.count,
            precopySeconds: result.agent.precopySeconds, stalePages: result.daemon.stalePagesAtSwitchover,
            totalSeconds: result.agent.totalSeconds, downtimeMs: result.daemon.downtimeMs,
            postcopySeconds: result.daemon.postcopySeconds, staleFaults: result.daemon.faultsStale,
            staleFaultDaemon: result.daemon.staleFaultLatency.map {
                Distribution(count: $0.count, p50: $0.p50Us, p99: $0.p99Us, p999: $0.p999Us, max: $0.maxUs,
                             mean: $0.totalMs * 1000 / Double(max($0.count, 1)))
            },
            guestStallTotalMs: result.guest.firstTouch?.totalMs ?? 0, guestStallMaxThreadMs: result.guest.blockedMsMaxThread,
            guestStallMaxUs: result.guest.firstTouch?.maxUs ?? 0, bytesSent: result.agent.bytesSent,
            idealBytes: result.agent.idealBytes,
            bytesToIdeal: Double(result.agent.bytesSent) / Double(max(result.agent.idealBytes, 1)))
        environment.say("end-to-end \(ByteSize.format(scale.endToEndRegion)), \(Int(dirty * 100))% dirty: total \(fixed(figures.totalSeconds, 2)) s, downtime \(fixed(figures.downtimeMs, 1)) ms, postcopy \(fixed(figures.postcopySeconds, 2)) s, \(figures.stalePages) stale")
        return (figures, result)
    }

    // MARK: 7. the pause by dirty log

    /// The source workload rewriting 10 % of its pages (the hot set) until
    /// paused, at each size, with the uffd-wp log and then with hashing,
    /// back to back: the final scan, the downtime, and the agent's CPU per
    /// precopy round. The guest touches few pages: this is about the pause.
    public func pause() throws -> [PauseFigures] {
        var figures: [PauseFigures] = []
        for size in scale.pauseSizes {
            for log in ["uffd-wp", "hash"] {
                var scenario = MigrationScenario(name: "pause-\(size >> 20)M-\(log)", size: size,
                                                 source: .workload(dirty: 0.10))
                scenario.dirtyLog = log
                scenario.maxRounds = 4
                scenario.guestThreads = 2
                scenario.touch = min(1, 5_000 / Double(size / 4096))
                let result = try scenario.run(in: environment)
                guard result.agent.dirtyLog == log else {
                    throw BenchmarkError("\(scenario.name): the agent used \(result.agent.dirtyLog) (\(result.agent.dirtyLogFallback ?? ""))")
                }
                let later = result.agent.rounds.dropFirst()
                let point = PauseFigures(
                    regionBytes: size, dirtyLog: log, stalePages: result.agent.stalePages,
                    finalScanMs: result.agent.finalScanMs, downtimeMs: result.agent.downtimeMs,
                    roundCPUSeconds: LatencySummary(later.map { $0.cpuSeconds ?? 0 })?.median ?? 0,
                    roundPagesLookedAt: UInt64(LatencySummary(later.map { Double($0.pagesWritten ?? size / 4096) })?.median ?? 0),
                    rounds: result.agent.rounds.count)
                environment.say("pause \(ByteSize.format(size)) \(log): final scan \(fixed(point.finalScanMs, 1)) ms, downtime \(fixed(point.downtimeMs, 1)) ms, CPU per later round \(fixed(point.roundCPUSeconds * 1000, 0)) ms")
                figures.append(point)
            }
        }
        return figures
    }

    // MARK: 5. scaling

    /// A still image with a fixed number of stale pages at growing RAM, then
    /// a fixed RAM with a growing share stale; the guest's 2 threads read the
    /// same number of pages (5 000) in every run, so that only RAM size or
    /// stale pages change from run to run.
    public func scaling() throws -> ScalingFigures {
        func point(_ name: String, size: UInt64, stale: UInt64) throws -> ScalingPoint {
            var scenario = MigrationScenario(name: name, size: size, source: .image(stalePages: stale))
            scenario.guestThreads = 2
            scenario.touch = min(1, 5_000 / Double(size / 4096))
            scenario.maxRounds = 2
            let result = try scenario.run(in: environment)
            let gib = Double(size) / 1_073_741_824
            let overhead = result.daemon.memoryUse?.overhead ?? 0
            let point = ScalingPoint(
                regionBytes: size, stalePages: result.daemon.stalePagesAtSwitchover,
                precopySeconds: result.agent.precopySeconds, postcopySeconds: result.daemon.postcopySeconds,
                postcopyUsPerStalePage: result.daemon.postcopySeconds * 1e6 / Double(max(result.daemon.stalePagesAtSwitchover, 1)),
                postcopyCPUSeconds: result.daemon.postcopyCPUSeconds,
                postcopyCPUUsPerStalePage: result.daemon.postcopyCPUSeconds * 1e6 / Double(max(result.daemon.stalePagesAtSwitchover, 1)),
                daemonCPUSeconds: result.daemon.cpuSeconds, daemonCPUSecondsPerGiB: result.daemon.cpuSeconds / gib,
                overheadBytes: overhead, overheadMiBPerGiB: Double(overhead) / 1_048_576 / gib)
            environment.say("scaling \(ByteSize.format(size)), \(point.stalePages) stale: postcopy \(fixed(point.postcopySeconds * 1000, 1)) ms (\(fixed(point.postcopyCPUSeconds * 1000, 1)) ms CPU), CPU \(fixed(point.daemonCPUSeconds, 2)) s, overhead \(ByteSize.format(overhead))")
            return point
        }
        let bySize = try scale.scalingSizes.map { try point("size-\($0 >> 20)M", size: $0, stale: scale.scalingStalePages) }
        let pages = scale.sweepRegion / 4096
        let byStale = try scale.sweepShares.map {
            try point("stale-\(Int($0 * 100))pct", size: scale.sweepRegion, stale: UInt64(Double(pages) * $0))
        }
        let fit = LinearFit(x: byStale.map { Double($0.stalePages) }, y: byStale.map(\.postcopyCPUSeconds))
        let memory = LinearFit(x: bySize.map { Double($0.regionBytes) / 1_073_741_824 },
                               y: bySize.map { Double($0.overheadBytes) / 1_048_576 })
        return ScalingFigures(bySize: bySize, byStalePages: byStale, fitUsPerStalePage: fit.slope * 1e6,
                              fitInterceptMs: fit.intercept * 1e3, fitR2: fit.r2,
                              postcopyLargestToSmallest: bySize.last!.postcopyCPUSeconds / max(bySize.first!.postcopyCPUSeconds, 1e-9),
                              overheadMiBPerGiB: memory.slope, overheadFixedMiB: memory.intercept)
    }

    // MARK: 8. precopy throughput

    /// A still image (no page stale: postcopy is empty), one guest thread
    /// reading nothing, at each size, in plaintext and over TLS: the agent's
    /// round 1 (every non-zero page once) and the daemon's CPU time, against
    /// precopy-stream with the region's bytes over the same transport into a
    /// fresh memfd. The baseline runs right after each migration, once the
    /// migration's processes have exited and their RAM is free; runs
    /// alternate. TLS uses one set of test certificates per bench run.
    public func precopy() throws -> PrecopyFigures {
        try TestCertificates.make(in: environment)
        var points: [PrecopyPoint] = []
        for size in scale.precopySizes {
            for transport in PrecopyTransport.allCases {
                var migrations: [PrecopyMigrationRun] = []
                var streams: [PrecopyStreamRun] = []
                for run in 0..<scale.precopyRuns {
                    var scenario = MigrationScenario(name: "precopy-\(size >> 20)M-\(transport.rawValue)-\(run)", size: size,
                                                     source: .image(stalePages: 0))
                    scenario.guestThreads = 1
                    scenario.touch = 0
                    scenario.maxRounds = 2
                    scenario.tls = transport == .tls
                    let migration = try PrecopyMigrationRun(try scenario.run(in: environment), name: scenario.name)
                    let stream = try baselines.precopyStream(bytes: size, transport: transport)
                    migrations.append(migration)
                    streams.append(stream)
                    let gib = Double(size) / 1_073_741_824
                    environment.say("precopy \(ByteSize.format(size)) \(transport.label), run \(run + 1): postcopyd round 1 \(fixed(migration.round1MiBps, 0)) MiB/s (\(ByteSize.format(migration.round1Bytes)) in \(fixed(migration.round1Seconds, 2)) s), daemon CPU \(fixed(migration.daemonCPUSeconds / gib, 2)) s/GiB; precopy-stream \(fixed(stream.mibPerSecond, 0)) MiB/s, receiver CPU \(fixed(stream.receiverCPUSecondsPerGiB, 2)) s/GiB")
                }
                points.append(PrecopyPoint(regionBytes: size, transport: transport, migrations: migrations, baselines: streams))
            }
        }
        return PrecopyFigures(points: points)
    }

    // MARK: 6. huge pages

    /// 2 MiB hugetlbfs with 1% of 4 KiB pages stale at random (a few per huge
    /// page), an idle link, one guest thread: what a stale fault fetches and
    /// how long it takes, against fetching whole 2 MiB pages.
    public func hugePages() throws -> HugePageFigures {
        let small = try baselines.pingPong(responseBytes: 4096, iterations: scale.pingPongIterations / 4, runs: 3)
        let huge = try baselines.pingPong(responseBytes: 2 << 20, iterations: 500, runs: 3)
        environment.say("ping-pong 2 MiB: p50 \(fixed(huge.p50, 1)) µs")
        var scenario = MigrationScenario(name: "huge-sparse", size: scale.hugeRegion,
                                         source: .image(stalePages: scale.hugeRegion / 4096 / 100))
        scenario.memory = .hugetlbfs
        scenario.guestThreads = 1
        scenario.touchLog = true
        scenario.trace = true
        scenario.postcopyMiBps = 1
        scenario.maxRounds = 2
        let result = try scenario.run(in: environment)
        let (stale, _) = result.guestStalls(pagesPerFault: 512)
        let guest = Distribution(micros: stale)
        let daemon = Distribution(micros: (result.trace?.events ?? []).filter { $0.kind == .staleFault }
            .map { Double($0.waitedNanos) / 1000 })
        let requests = result.daemon.pageRequests
        let bytesPerFault = Double(result.daemon.pagesRequested * 4096) / Double(max(result.daemon.faultsStale, 1))
        environment.say("huge pages: \(result.daemon.faultsStale) stale faults, \(fixed(bytesPerFault / 1024, 1)) KiB fetched each, guest p50 \(fixed(guest?.p50 ?? 0, 1)) µs")
        return HugePageFigures(regionBytes: scale.hugeRegion, stalePages: result.daemon.stalePagesAtSwitchover,
                               pageRequests: requests, pagesRequested: result.daemon.pagesRequested,
                               bytesPerStaleFault: bytesPerFault, guest: guest, daemon: daemon, pingPong4KiB: small,
                               pingPong2MiB: huge, bytesRatioTo2MiB: bytesPerFault / Double(2 << 20),
                               latencyP50RatioTo2MiB: (guest?.p50 ?? 0) / huge.p50)
    }
}

/// Ordinary least squares of y on x.
public struct LinearFit: Sendable, Equatable {
    public let slope: Double
    public let intercept: Double
    /// Coefficient of determination (1: a perfect line).
    public let r2: Double

    public init(x: [Double], y: [Double]) {
        let n = Double(x.count)
        let meanX = x.reduce(0, +) / max(n, 1)
        let meanY = y.reduce(0, +) / max(n, 1)
        var sxx = 0.0, sxy = 0.0, syy = 0.0
        for (a, b) in zip(x, y) {
            sxx += (a - meanX) * (a - meanX)
            sxy += (a - meanX) * (b - meanY)
            syy += (b - meanY) * (b - meanY)
        }
        slope = sxx > 0 ? sxy / sxx : 0
        intercept = meanY - slope * meanX
        r2 = sxx > 0 && syy > 0 ? (sxy * sxy) / (sxx * syy) : 1
    }
}
