import PostcopyCore

/// The results as a text table (terminal), a Markdown table (docs), and
/// the two plots.
public enum Report {
    public static func markdown(_ results: BenchResults) -> String {
        var out: [String] = []
        func table(_ header: [String], _ rows: [[String]]) {
            out.append("| " + header.joined(separator: " | ") + " |")
            out.append("|" + header.map { _ in " --- |" }.joined())
            for row in rows { out.append("| " + row.joined(separator: " | ") + " |") }
            out.append("")
        }
        func us(_ value: Double) -> String { fixed(value, value < 100 ? 1 : 0) }
        func x(_ value: Double) -> String { fixed(value, 2) + "×" }

        if !results.cleanFaults.isEmpty {
            out.append("**1. Clean-fault cost** (µs per fault, median of alternating runs; target ≤ 1.2× the C loop)\n")
            table(["memory", "region", "CPUs", "postcopyd", "C loop", "ratio"], results.cleanFaults.map {
                [$0.memory, ByteSize.format($0.regionBytes), $0.cpus, fixed($0.postcopydUsPerFault, 2),
                 fixed($0.baselineUsPerFault, 2), x($0.ratio)]
            })
        }
        if !results.staleFaults.isEmpty {
            out.append("**2. Stale-fault latency seen by the guest** (µs; baseline = loopback 4 KiB ping-pong p99 + clean first touch p99 in the same run; target p99 ≤ 3× baseline with the background stream at full speed)\n")
            table(["link", "faults", "p50", "p99", "p99.9", "max", "daemon p99", "clean touch p99", "ping-pong p50 / p99",
                   "background MiB/s", "p99 / baseline"], results.staleFaults.map {
                [$0.link == "idle" ? "idle (background ≤ 1 MiB/s)" : "background at full speed", "\($0.guest.count)",
                 us($0.guest.p50), $0.runs > 1 ? "\(us($0.guest.p99)) (\(us($0.p99Min))–\(us($0.p99Max)) in \($0.runs) runs)" : us($0.guest.p99),
                 us($0.guest.p999), us($0.guest.max), $0.daemon.map { us($0.p99) } ?? "–",
                 $0.cleanTouch.map { us($0.p99) } ?? "–", "\(us($0.pingPong.p50)) / \(us($0.pingPong.p99))",
                 fixed($0.backgroundMiBps, 0), x($0.ratioP99)]
            })
        }
        if let backfill = results.backfill {
            out.append("**3. Back-fill throughput** (GiB/s, median of \(backfill.runs); \(backfill.transport); target ≥ 80% of raw TCP)\n")
            table(["bytes", "agent's sender", "postcopyd", "raw loopback TCP", "memcpy", "postcopyd / TCP", "postcopyd / memcpy"], [
                [ByteSize.format(backfill.bytes), "normal (default)", fixed(backfill.postcopydGiBps, 2), fixed(backfill.tcpGiBps, 2),
                 fixed(backfill.memcpyGiBps, 2), fixed(backfill.ratioToTCP * 100, 0) + "%",
                 fixed(backfill.ratioToMemcpy * 100, 0) + "%"],
                [ByteSize.format(backfill.bytes), "SCHED_IDLE", fixed(backfill.postcopydAgentIdleGiBps, 2), fixed(backfill.tcpGiBps, 2),
                 fixed(backfill.memcpyGiBps, 2), fixed(backfill.ratioToTCPAgentIdle * 100, 0) + "%",
                 fixed(backfill.postcopydAgentIdleGiBps / backfill.memcpyGiBps * 100, 0) + "%"],
            ])
        }
        if !results.endToEnd.isEmpty {
            out.append("**4. End-to-end** (source workload rewriting a share of pages; the guest's 4 threads read every page after resume)\n")
            table(["RAM", "dirty", "rounds", "precopy s", "stale pages", "downtime ms", "postcopy s", "total s",
                   "stale faults", "guest blocked ms (all / worst thread)", "longest stall ms", "sent / ideal"], results.endToEnd.map {
                [ByteSize.format($0.regionBytes), fixed($0.dirtyShare * 100, 0) + "%", "\($0.precopyRounds)",
                 fixed($0.precopySeconds, 2), "\($0.stalePages)", fixed($0.downtimeMs, 1), fixed($0.postcopySeconds, 2),
                 fixed($0.totalSeconds, 2), "\($0.staleFaults)",
                 "\(fixed($0.guestStallTotalMs, 0)) / \(fixed($0.guestStallMaxThreadMs, 0))",
                 fixed($0.guestStallMaxUs / 1000, 1), "\(ByteSize.format($0.bytesSent)) / \(ByteSize.format($0.idealBytes)) (\(x($0.bytesToIdeal)))"]
            })
        }
        if !results.pause.isEmpty {
            out.append("**7. The pause by dirty log** (source rewriting 10% of its pages until paused; the agent's final scan and downtime, and its CPU per precopy round after the first; uffd-wp and hash back to back at each size)\n")
            table(["RAM", "dirty log", "rounds", "stale pages", "final scan ms", "downtime ms", "pages looked at per round",
                   "agent CPU ms per round"], results.pause.map {
                [ByteSize.format($0.regionBytes), $0.dirtyLog, "\($0.rounds)", "\($0.stalePages)", fixed($0.finalScanMs, 1),
                 fixed($0.downtimeMs, 1), "\($0.roundPagesLookedAt)", fixed($0.roundCPUSeconds * 1000, 0)]
            })
            let smallest = results.pause.filter { $0.regionBytes == results.pause.first?.regionBytes }
            let largest = results.pause.filter { $0.regionBytes == results.pause.last?.regionBytes }
            if let small = smallest.first(where: { $0.dirtyLog == "uffd-wp" }), let large = largest.first(where: { $0.dirtyLog == "uffd-wp" }),
               let hash = largest.first(where: { $0.dirtyLog == "hash" }) {
                out.append("uffd-wp downtime at \(ByteSize.format(large.regionBytes)) / at \(ByteSize.format(small.regionBytes)): \(x(large.downtimeMs / max(small.downtimeMs, 0.001))) (target ≤ 1.5×); hash / uffd-wp downtime at \(ByteSize.format(large.regionBytes)): \(x(hash.downtimeMs / max(large.downtimeMs, 0.001))).\n")
            }
        }
        if let scaling = results.scaling {
            out.append("**5. Scaling** (still image, stale pages declared at switchover; the guest reads 5 000 pages in every run)\n")
            let rows = (scaling.bySize + scaling.byStalePages).map { point in
                [ByteSize.format(point.regionBytes), "\(point.stalePages)", fixed(point.precopySeconds, 2),
                 fixed(point.postcopySeconds * 1000, 1), fixed(point.postcopyCPUSeconds * 1000, 1),
                 fixed(point.postcopyCPUUsPerStalePage, 2),
                 fixed(point.daemonCPUSeconds, 2), fixed(point.daemonCPUSecondsPerGiB, 2),
                 ByteSize.format(point.overheadBytes), fixed(point.overheadMiBPerGiB, 2)]
            }
            table(["RAM", "stale pages", "precopy s", "postcopy ms", "postcopy CPU ms", "CPU µs / stale page", "daemon CPU s",
                   "CPU s / GiB", "memory besides RAM", "MiB / GiB"], rows)
            out.append("The daemon's CPU time in the postcopy phase at \(ByteSize.format(scaling.bySize.last?.regionBytes ?? 0)) / at \(ByteSize.format(scaling.bySize.first?.regionBytes ?? 0)), same stale pages: \(x(scaling.postcopyLargestToSmallest)). Against stale pages: \(fixed(scaling.fitUsPerStalePage, 2)) µs per page + \(fixed(scaling.fitInterceptMs, 1)) ms, R² = \(fixed(scaling.fitR2, 3)). Memory besides guest RAM: \(fixed(scaling.overheadMiBPerGiB, 2)) MiB per GiB of RAM + \(fixed(scaling.overheadFixedMiB, 1)) MiB fixed (program and runtime); target ≤ 1 MiB per GiB.\n")
        }
        if let precopy = results.precopy, let first = precopy.points.first {
            out.append("**8. Precopy round-1 throughput** (still image, postcopy empty; MiB/s, \(first.runs == 1 ? "one run" : "median of \(first.runs) runs"), each migration followed by its baseline: precopy-stream, the region's bytes over the same transport into a fresh memfd; target: ≥ 80 % of the same-run TLS baseline; daemon CPU per GiB within 1.2× from smallest to largest)\n")
            func rate(_ median: Double, _ runs: [Double]) -> String {
                runs.count > 1 ? "\(fixed(median, 0)) (\(runs.map { fixed($0, 0) }.joined(separator: ", ")))" : fixed(median, 0)
            }
            table(["RAM", "transport", "round 1 sent", "postcopyd MiB/s", "precopy-stream MiB/s", "postcopyd / baseline",
                   "daemon CPU s / GiB", "baseline receiver CPU s / GiB", "agent round-1 CPU s / GiB"], precopy.points.map {
                [ByteSize.format($0.regionBytes), $0.transport.label, ByteSize.format($0.round1Bytes),
                 rate($0.postcopydMiBps, $0.postcopydRuns), rate($0.baselineMiBps, $0.baselineRuns),
                 fixed($0.ratio * 100, 0) + "%", fixed($0.daemonCPUSecondsPerGiB, 2),
                 fixed($0.baselineReceiverCPUSecondsPerGiB, 2), fixed($0.agentRound1CPUSecondsPerGiB, 2)]
            })
            if !precopy.cpuPerGiBLargestToSmallest.isEmpty {
                out.append("The daemon's CPU per GiB at the largest size / at the smallest: " + precopy.cpuPerGiBLargestToSmallest.map {
                    "\($0.transport.label) \(x($0.ratio)) (\(ByteSize.format($0.largestBytes)) / \(ByteSize.format($0.smallestBytes)))"
                }.joined(separator: ", ") + " (target ≤ 1.2×). postcopyd's rate counts the bytes round 1 sent (zero pages are not sent); the baseline's, every byte of the region.\n")
            }
        }
        if let huge = results.hugePages {
            out.append("**6. Huge pages, sparse dirtiness** (2 MiB hugetlbfs, \(huge.stalePages) of \(huge.regionBytes / 4096) 4 KiB pages stale, idle link)\n")
            table(["stale faults fetch", "vs whole 2 MiB", "guest p50 / p99 µs", "daemon p50 µs", "ping-pong 4 KiB p50", "ping-pong 2 MiB p50",
                   "p50 vs 2 MiB fetch"], [[
                "\(fixed(huge.bytesPerStaleFault / 1024, 1)) KiB (\(huge.pagesRequested) pages in \(huge.pageRequests) requests)",
                fixed(huge.bytesRatioTo2MiB * 100, 1) + "%",
                huge.guest.map { "\(us($0.p50)) / \(us($0.p99))" } ?? "–", huge.daemon.map { us($0.p50) } ?? "–",
                us(huge.pingPong4KiB.p50), us(huge.pingPong2MiB.p50), x(huge.latencyP50RatioTo2MiB),
            ]])
        }
        return out.joined(separator: "\n")
    }

    /// The stale-fault latency CDFs: guest-side on an idle and a busy link,
    /// with the daemon's view of the busy run.
    public static func staleFaultCDF(idle: MigrationResult, busy: MigrationResult, pingPong: Distribution?, notes: [String]) -> String {
        var series: [ChartSeries] = []
        for (name, run) in [("guest, idle link", idle), ("guest, background at full speed", busy)] {
            let (stale, clean) = run.guestStalls(pagesPerFault: 1)
            series.append(ChartSeries(name: name + " (\(stale.count) stale faults)", points: cdfPoints(stale)))
            if name.hasSuffix("speed") {
                series.append(ChartSeries(name: "guest clean first touch, same run", points: cdfPoints(clean)))
            }
        }
        let daemon = (busy.trace?.events ?? []).filter { $0.kind == .staleFault }.map { Double($0.waitedNanos) / 1000 }
        series.append(ChartSeries(name: "daemon's view, full speed", points: cdfPoints(daemon)))
        var chart = Chart(title: "Stale-fault latency (CDF)", xLabel: "latency (µs, log scale)", yLabel: "fraction of faults ≤ x",
                          series: series)
        chart.xScale = .log10
        chart.yRange = 0...1
        chart.notes = notes + (pingPong.map { ["loopback 4 KiB ping-pong: p50 \(fixed($0.p50, 1)) µs, p99 \(fixed($0.p99, 1)) µs"] } ?? [])
        return chart.svg()
    }

    /// Fill progress of a run's postcopy phase, urgent and background, with
    /// the stale faults marked where they were resolved.
    public static func fillProgress(_ run: MigrationResult, title: String, notes: [String]) -> String {
        let trace = run.trace ?? PostcopyTrace(stalePages: 0)
        let total = Double(max(trace.stalePages, 1))
        var filled = 0.0
        var progress: [ChartPoint] = [ChartPoint(x: 0, y: 0)]
        var faults: [ChartPoint] = []
        for event in trace.events.sorted(by: { $0.atNanos < $1.atNanos }) {
            let ms = Double(event.atNanos) / 1e6
            if event.kind == .staleFault {
                faults.append(ChartPoint(x: ms, y: filled / total))
            } else {
                filled += Double(event.pages)
                progress.append(ChartPoint(x: ms, y: filled / total))
            }
        }
        // Thin the line to at most ~4000 points (it is monotone).
        if progress.count > 4000 {
            let step = progress.count / 4000 + 1
            progress = progress.enumerated().filter { $0.offset % step == 0 || $0.offset == progress.count - 1 }.map(\.element)
        }
        var chart = Chart(title: title, xLabel: "time since the guest resumed (ms)", yLabel: "stale pages filled (fraction)",
                          series: [ChartSeries(name: "pages filled (urgent + background)", points: progress),
                                   ChartSeries(name: "stale fault resolved (\(faults.count))", points: faults, style: .markers)])
        chart.yRange = 0...1
        chart.notes = notes
        return chart.svg()
    }
}
