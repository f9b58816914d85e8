/// Figures of a latency distribution, in microseconds, for summaries.
public struct LatencyFigures: Codable, Equatable, Sendable {
    public let count: Int
    public let p50Us: Double
    public let p99Us: Double
    public let p999Us: Double
    public let maxUs: Double
    /// The sum of all samples: for stalls, the total time threads were blocked.
    public let totalMs: Double

    public init(count: Int, p50Us: Double, p99Us: Double, p999Us: Double, maxUs: Double, totalMs: Double) {
        self.count = count
        self.p50Us = p50Us
        self.p99Us = p99Us
        self.p999Us = p999Us
        self.maxUs = maxUs
        self.totalMs = totalMs
    }

    /// From samples in nanoseconds; nil when there are none.
    public init?(nanoseconds samples: [UInt64]) {
        guard let summary = LatencySummary(samples.map { Double($0) }) else { return nil }
        self.init(count: summary.count, p50Us: summary.median / 1000, p99Us: summary.p99 / 1000,
                  p999Us: summary.p999 / 1000, maxUs: summary.max / 1000,
                  totalMs: samples.reduce(0.0) { $0 + Double($1) } / 1e6)
    }

    /// "p50 12.3 µs, p99 45.6 µs, max 78.9 µs (1234 samples)"
    public var text: String {
        "p50 \(fixed(p50Us, 1)) µs, p99 \(fixed(p99Us, 1)) µs, max \(fixed(maxUs, 1)) µs (\(count) samples)"
    }
}

/// What the daemon reports when a migration ends.
public struct DestinationSummary: Codable, Equatable, Sendable {
    public var migrationID = ""
    public var memory = ""
    public var regionBytes: UInt64 = 0
    public var pageBytes: UInt64 = 0
    /// The agent's bulk streams (`postcopy-push --streams`).
    public var streams = 1
    public var precopyRounds: UInt32 = 0
    public var precopyPages: UInt64 = 0
    public var precopyZeroPages: UInt64 = 0
    public var stalePagesAtSwitchover: UInt64 = 0
    /// Source pause → guest resumed here, by the two hosts' wall clocks.
    public var downtimeMs: Double = 0
    public var faultsClean: UInt64 = 0
    public var faultsStale: UInt64 = 0
    public var pageRequests: UInt64 = 0
    public var pagesRequested: UInt64 = 0
    /// Stale pages that arrived answering a PAGE_REQUEST, and in the background.
    public var postcopyPagesUrgent: UInt64 = 0
    public var postcopyPagesBackground: UInt64 = 0
    /// Pages that arrived when no longer stale, and were dropped.
    public var duplicatePages: UInt64 = 0
    /// From the first fault on a stale page to the page written and installed.
    public var staleFaultLatency: LatencyFigures?
    /// The same in power-of-two microsecond buckets (QEMU's postcopy-latency-dist).
    public var staleFaultLatencyDist: LatencyDistribution?
    /// Each phase's time, from the first agent connection (`PhaseTimeline`).
    public var phases: [PhaseDuration] = []
    public var postcopySeconds: Double = 0
    public var backgroundMiBPerSecond: Double = 0
    public var bytesReceived: UInt64 = 0
    public var totalSeconds: Double = 0
    public var imageDigest = ""
    /// The daemon's CPU time (user + system) up to completion, and the part
    /// of it spent from resume to the last stale page.
    public var cpuSeconds: Double = 0
    public var postcopyCPUSeconds: Double = 0
    /// The daemon's memory at completion (guest RAM is `shmem`).
    public var memoryUse: ProcessMemory?
    /// Times postcopy paused on a lost agent connection and the agent
    /// rejoined; the time paused, in all; and for each rejoin, how long
    /// until the first stale fault after it was served.
    public var pauses: UInt64 = 0
    public var pausedSeconds: Double = 0
    public var rejoinToFirstFaultMs: [Double] = []
    /// This daemon took the migration over from one that died during
    /// postcopy; figures before that (precopy, faults served then) were the
    /// dead daemon's and are not in this summary.
    public var tookOver = false

    public init() {}

    /// The summary as log lines.
    public var lines: [String] {
        var lines = [
            "migration \(migrationID): \(ByteSize.format(regionBytes)) of \(memory)",
            "precopy: \(precopyRounds) rounds, \(precopyPages) pages (\(ByteSize.format(precopyPages * 4096)))"
                + ", \(precopyZeroPages) pages zeroed, \(streams) bulk stream\(streams == 1 ? "" : "s")",
            "switchover: \(stalePagesAtSwitchover) stale pages, downtime \(fixed(downtimeMs, 1)) ms",
            "postcopy: \(fixed(postcopySeconds, 2)) s; faults \(faultsClean) clean, \(faultsStale) stale"
                + "; \(pageRequests) requests for \(pagesRequested) pages",
            "postcopy pages: \(postcopyPagesUrgent) urgent, \(postcopyPagesBackground) background"
                + " (\(fixed(backgroundMiBPerSecond, 1)) MiB/s), \(duplicatePages) duplicates dropped",
        ]
        if let staleFaultLatency { lines.append("stale-fault latency: \(staleFaultLatency.text)") }
        if let dist = staleFaultLatencyDist, dist.count > 0 { lines.append("stale-fault latency by bucket: \(dist.text)") }
        if !phases.isEmpty {
            lines.append("phases: " + phases.map { "\($0.phase) \(fixed($0.seconds, 3)) s" }.joined(separator: ", "))
        }
        if tookOver {
            lines.append("took over from a postcopyd that died during postcopy; precopy and earlier faults were that daemon's")
        }
        if pauses > 0 {
            let first = rejoinToFirstFaultMs.isEmpty ? "" : "; first stale fault served "
                + rejoinToFirstFaultMs.map { fixed($0, 1) }.joined(separator: ", ") + " ms after rejoining"
            lines.append("paused: \(pauses) times, \(fixed(pausedSeconds, 2)) s in all\(first)")
        }
        lines.append("total: \(fixed(totalSeconds, 2)) s, \(ByteSize.format(bytesReceived)) received"
            + ", \(fixed(cpuSeconds, 2)) s CPU (\(fixed(postcopyCPUSeconds, 2)) s in postcopy)")
        if let memoryUse {
            lines.append("memory: \(ByteSize.format(memoryUse.overhead)) besides guest RAM"
                + " (\(ByteSize.format(memoryUse.anonymous)) anonymous), peak resident \(ByteSize.format(memoryUse.peakResident))")
        }
        return lines
    }
}

/// One precopy round, as the agent saw it.
public struct PrecopyRound: Codable, Equatable, Sendable {
    public let round: UInt32
    public let pagesSent: UInt64
    public let zeroPagesSent: UInt64
    public let bytesSent: UInt64
    public let seconds: Double
    /// Pages the uffd-wp log reported written before this round (nil in
    /// round 1 and with the hash log, which look at every page).
    public let pagesWritten: UInt64?
    /// The agent's CPU time in the round, all threads: it follows the dirty
    /// pages with uffd-wp, all of RAM with the hash log.
    public let cpuSeconds: Double?
    /// The round's rate on the wire: bytesSent over seconds, in MiB/s.
    public let mibPerSecond: Double
    /// Pages the guest dirtied per second between the scan before the
    /// previous round and the one before this one (written pages with
    /// uffd-wp, changed ones with hashing); nil in round 1.
    public let dirtyPagesPerSecond: Double?
    /// When precopy's time limit stopped this round before its end: the
    /// pages it did not reach, left to postcopy (nil for a whole round).
    public let pagesLeft: UInt64?

    public init(round: UInt32, pagesSent: UInt64, zeroPagesSent: UInt64, bytesSent: UInt64, seconds: Double,
                pagesWritten: UInt64? = nil, cpuSeconds: Double? = nil, dirtyPagesPerSecond: Double? = nil,
                pagesLeft: UInt64? = nil) {
        self.dirtyPagesPerSecond = dirtyPagesPerSecond
        self.pagesLeft = pagesLeft
        self.round = round
        self.pagesSent = pagesSent
        self.zeroPagesSent = zeroPagesSent
        self.bytesSent = bytesSent
        self.seconds = seconds
        self.pagesWritten = pagesWritten
        self.cpuSeconds = cpuSeconds
        mibPerSecond = seconds > 0 ? Double(bytesSent) / seconds / 1_048_576 : 0
    }
}

/// What the source agent reports when a migration ends.
public struct AgentSummary: Codable, Equatable, Sendable {
    public var migrationID = ""
    public var regionBytes: UInt64 = 0
    /// Bulk streams to postcopyd (`--streams`): each carries its share of
    /// the pages, precopy's and the back-fill's.
    public var streams = 1
    public var rounds: [PrecopyRound] = []
    public var precopyEndReason = ""
    public var precopySeconds: Double = 0
    /// Start → both connections to postcopyd admitted (the dirty log
    /// opened, TLS and HELLO done).
    public var setupSeconds: Double = 0
    /// The guest's pause as estimated when precopy ended
    /// (`expectedDowntimeMs(...)`), to hold against `downtimeMs`.
    public var expectedDowntimeMs: Double?
    public var stalePages: UInt64 = 0
    /// How precopy found changed pages: "uffd-wp" (the source VMM's write
    /// log, read with PAGEMAP_SCAN) or "hash" (every page hashed each round).
    public var dirtyLog = ""
    /// Why the agent hashes although uffd-wp was the default, when it does.
    public var dirtyLogFallback: String?
    /// With `--verify-dirty-log` and uffd-wp: pages that changed although
    /// the log did not report them (0, or the log is broken).
    public var missedByDirtyLog: UInt64?
    /// The final scan of the paused source: one PAGEMAP_SCAN with uffd-wp,
    /// a hash of every page with hash (then most of the downtime).
    public var finalScanMs: Double = 0
    /// Source paused → RESUMED received, on this host's clock (an upper
    /// bound on the guest's downtime).
    public var downtimeMs: Double = 0
    /// Source paused → destination resumed, by the two hosts' wall clocks.
    public var downtimeByClocksMs: Double = 0
    /// The hand-over command (`--resumed-cmd`), when one ran.
    public var handOverMs: Double?
    /// Source paused → hand-over command done: the guest's downtime when
    /// that command is what starts it on the destination.
    public var guestDowntimeMs: Double?
    /// With `--qmp`: the source QEMU's `migrate` (its vCPUs stop) → its
    /// `completed` (the destination QEMU has the device state and runs).
    public var guestPauseMs: Double?
    public var pageRequests: UInt64 = 0
    /// Stale pages the urgent sender took for a request: with the
    /// background ones, every stale page once.
    public var postcopyPagesUrgent: UInt64 = 0
    public var postcopyPagesBackground: UInt64 = 0
    /// Pages a request named that a background sender had taken already,
    /// sent again on the urgent connection so that the guest did not wait
    /// behind the back-fill (postcopyd drops the copy that comes second).
    public var postcopyPagesResent: UInt64 = 0
    public var postcopySeconds: Double = 0
    public var backgroundMiBPerSecond: Double = 0
    public var bytesSent: UInt64 = 0
    /// Non-zero pages + stale pages: what an ideal migration would send, in bytes.
    public var idealBytes: UInt64 = 0
    public var totalSeconds: Double = 0
    public var imageDigest = ""
    /// The daemon's COMPLETE.
    public var destinationFaultsClean: UInt64 = 0
    public var destinationFaultsStale: UInt64 = 0
    /// Times the agent rejoined a postcopy after losing its connections.
    public var rejoins: UInt64 = 0
    /// This agent rejoined a postcopy another agent started (`--resume`).
    public var resumedOnly = false
    /// The same in QEMU's and libvirt's names (`addManagementNames()`).
    public var qemu: QEMUMigrationInfo?
    public var libvirt: JobStats?

    public init() {}

    /// The part of a switchover's pause that grows with RAM and the dirty
    /// rate, as QEMU's `expected-downtime` estimates it: the final scan,
    /// as long as the last one took (`scanMs`), and the dirty bitmap of
    /// `pageCount` pages at `bytesPerSecond`. What the destination does to
    /// resume the guest (a millisecond or two on loopback) comes on top.
    public static func expectedDowntimeMs(scanMs: Double, pageCount: UInt64, bytesPerSecond: Double) -> Double {
        let bitmapBytes = Double((pageCount + 63) / 64 * 8)
        return scanMs + (bytesPerSecond > 0 ? bitmapBytes / bytesPerSecond * 1000 : 0)
    }

    /// Fills `qemu` and `libvirt` for a migration that completed.
    public mutating func addManagementNames() {
        var qemu = QEMUMigrationInfo(status: .completed)
        qemu.postcopyRequests = pageRequests
        qemu.expectedDowntime = expectedDowntimeMs.map { wholeMilliseconds($0) }
        self.qemu = qemu
        var job = JobStats()
        job.timeElapsed = milliseconds(seconds: totalSeconds)
        job.downtime = wholeMilliseconds(downtimeMs)
        job.setupTime = resumedOnly ? nil : milliseconds(seconds: setupSeconds)
        job.memoryTotal = regionBytes
        job.memoryProcessed = bytesSent
        job.memoryRemaining = 0
        job.memoryBps = totalSeconds > 0 ? UInt64((Double(bytesSent) / totalSeconds).rounded()) : 0
        job.memoryDirtyRate = rounds.last?.dirtyPagesPerSecond.map { UInt64($0.rounded()) }
        job.memoryIteration = UInt64(rounds.count)
        job.memoryPageSize = UInt64(Message.pageBytes)
        job.memoryPostcopyRequests = pageRequests
        libvirt = job
    }

    public var lines: [String] {
        let precopyPages = rounds.reduce(0) { $0 + $1.pagesSent }
        return [
            "migration \(migrationID): \(ByteSize.format(regionBytes))",
            "precopy: \(rounds.count) rounds, \(precopyPages) pages in \(fixed(precopySeconds, 2)) s"
                + " over \(streams) bulk stream\(streams == 1 ? "" : "s") (ended by \(precopyEndReason))"
                + (rounds.last?.dirtyPagesPerSecond.map { "; last dirty rate \(fixed($0, 0)) pages/s" } ?? ""),
            "dirty log: \(dirtyLog)" + (dirtyLogFallback.map { " (\($0))" } ?? "")
                + (missedByDirtyLog.map { "; --verify-dirty-log: \($0) pages missed" } ?? ""),
            "switchover: \(stalePages) stale pages, downtime \(fixed(downtimeMs, 1)) ms"
                + (expectedDowntimeMs.map { " (expected \(fixed($0, 1)) ms)" } ?? "")
                + " (by wall clocks \(fixed(downtimeByClocksMs, 1)) ms; final scan \(fixed(finalScanMs, 1)) ms)"
                + (guestDowntimeMs.map { "; with the hand-over (\(fixed(handOverMs ?? 0, 1)) ms) the guest was paused \(fixed($0, 1)) ms" } ?? "")
                + (guestPauseMs.map { " (QMP: vCPUs stopped → device state delivered \(fixed($0, 1)) ms)" } ?? ""),
            "postcopy: \(fixed(postcopySeconds, 2)) s; \(pageRequests) requests, \(postcopyPagesUrgent) pages urgent"
                + (postcopyPagesResent > 0 ? " (and \(postcopyPagesResent) resent: the background had them)" : "")
                + ", \(postcopyPagesBackground) background (\(fixed(backgroundMiBPerSecond, 1)) MiB/s)",
            "destination faults: \(destinationFaultsClean) clean, \(destinationFaultsStale) stale"
                + (rejoins > 0 ? "; rejoined postcopyd \(rejoins) times" : ""),
            "total: \(fixed(totalSeconds, 2)) s, \(ByteSize.format(bytesSent)) sent"
                + " (ideal \(ByteSize.format(idealBytes)))",
            "image digest \(imageDigest)",
        ]
    }
}

/// What the reference guest reports.
public struct GuestSummary: Codable, Equatable, Sendable {
    public var threads = 0
    public var pagesRead: UInt64 = 0
    /// The first touch of each page, timed around the access.
    public var firstTouch: LatencyFigures?
    /// The same in power-of-two microsecond buckets: the guest's side of
    /// postcopyd's `staleFaultLatencyDist` (clean pages' touches included).
    public var firstTouchDist: LatencyDistribution?
    /// The most time one thread spent blocked on first touches, summed (a
    /// vCPU's "blocktime"); `firstTouch.totalMs` sums all threads.
    public var blockedMsMaxThread: Double = 0
    public var workloadSeconds: Double = 0
    public var expectedDigest = ""
    public var actualDigest = ""
    public var verified = false
    /// Pages the guest wrote after reading, checked again at the end: any
    /// changed would mean a late page overwrote what the guest wrote.
    public var scribbledPages: UInt64 = 0
    public var scribblesLost: UInt64 = 0
    /// Times the VMM reattached to a postcopyd restarted after the one
    /// serving it died.
    public var reattachments = 0
    /// The collapse back into 2 MiB pages after postcopy (nil: turned off).
    public var hugepages: HugepageCollapseReport?
    /// The random-read loop (`--measure-tlb`) right after postcopy, in
    /// 4 KiB mappings, and again after the collapse.
    public var randomReadsBeforeCollapse: RandomReadFigures?
    public var randomReadsAfterCollapse: RandomReadFigures?

    public init() {}

    public var lines: [String] {
        var lines = ["guest: \(threads) threads read \(pagesRead) pages in \(fixed(workloadSeconds, 2)) s"]
        if reattachments > 0 { lines.append("reattached to a restarted postcopyd \(reattachments) times") }
        if let firstTouch {
            lines.append("first-touch stall: \(firstTouch.text), total \(fixed(firstTouch.totalMs, 1)) ms"
                + " (at most \(fixed(blockedMsMaxThread, 1)) ms in one thread)")
        }
        if let firstTouchDist, firstTouchDist.count > 0 { lines.append("first-touch stall by bucket: \(firstTouchDist.text)") }
        if scribbledPages > 0 { lines.append("guest writes kept: \(scribbledPages - scribblesLost) of \(scribbledPages)") }
        if let hugepages { lines += hugepages.lines }
        if let randomReadsBeforeCollapse { lines.append("random reads before the collapse: \(randomReadsBeforeCollapse.text)") }
        if let randomReadsAfterCollapse { lines.append("random reads after the collapse: \(randomReadsAfterCollapse.text)") }
        lines.append(verified ? "verify: PASS, image digest \(actualDigest)"
                              : "verify: FAIL, image digest \(actualDigest), expected \(expectedDigest)")
        return lines
    }
}


/// The reference guest's random-read loop (`postcopy-guest vmm
/// --measure-tlb`): 8-byte reads at random across all of guest RAM, each
/// address drawn from a generator mixed with the word read before (so the
/// reads are dependent, and the same sequence before and after a
/// collapse), timed in passes of `readsPerPass`. With RAM far larger than
/// the TLB's reach, nearly every read misses the TLB: the figure shows what
/// the page-table walk costs in 4 KiB against 2 MiB mappings.
public struct RandomReadFigures: Codable, Equatable, Sendable {
    public var readsPerPass: UInt64 = 0
    /// Nanoseconds per read in each pass, and their median.
    public var nanosPerRead: [Double] = []
    public var medianNanosPerRead: Double = 0

    public init() {}

    /// From each pass's duration in nanoseconds.
    public init(readsPerPass: UInt64, passNanos: [UInt64]) {
        self.readsPerPass = readsPerPass
        nanosPerRead = passNanos.map { Double($0) / Double(max(readsPerPass, 1)) }
        medianNanosPerRead = LatencySummary(nanosPerRead)?.median ?? 0
    }

    /// Reads per second at the median.
    public var readsPerSecond: Double { medianNanosPerRead > 0 ? 1e9 / medianNanosPerRead : 0 }

    public var text: String {
        "\(fixed(medianNanosPerRead, 1)) ns/read median of \(nanosPerRead.count) passes of \(readsPerPass)"
            + " (\(fixed(readsPerSecond / 1e6, 2)) M reads/s; passes \(nanosPerRead.map { fixed($0, 1) }.joined(separator: " ")))"
    }
}
