import Foundation
import PostcopyCore
import Testing

@Suite struct ConfigFileTests {
    let schema = ConfigFile.Schema(options: ["listen", "size", "vmm-uid"], flags: ["json"])

    func parse(_ text: String) throws(ConfigFile.ParseError) -> ConfigFile {
        try ConfigFile(bytes: Array(text.utf8), schema: schema)
    }

    @Test func settingsBecomeArgumentsInFileOrder() throws {
        let file = try parse("""
            # comment
              listen = 0.0.0.0:7070\r

            size=4G
            json
            vmm-uid = "107"
            """)
        #expect(file.arguments == ["--listen", "0.0.0.0:7070", "--size", "4G", "--json", "--vmm-uid", "107"])
        #expect(file.entries.map(\.line) == [2, 4, 5, 6])
    }

    @Test func mistakesNameTheirLine() {
        #expect(throws: ConfigFile.ParseError.unknownKey(line: 2, key: "lisen", known: ["json", "listen", "size", "vmm-uid"])) {
            try parse("size = 1G\nlisen = 1.2.3.4:5\n")
        }
        #expect(throws: ConfigFile.ParseError.flagWithValue(line: 1, key: "json")) { try parse("json = yes") }
        #expect(throws: ConfigFile.ParseError.missingValue(line: 1, key: "size")) { try parse("size =") }
        #expect(throws: ConfigFile.ParseError.missingValue(line: 1, key: "size")) { try parse("size") }
        #expect(throws: ConfigFile.ParseError.repeatedKey(line: 3, key: "size", firstLine: 1)) {
            try parse("size = 1G\n\nsize = 2G")
        }
        #expect(throws: ConfigFile.ParseError.unterminatedQuote(line: 1)) { try parse("listen = \"1.2.3.4:5") }
        #expect(throws: ConfigFile.ParseError.malformedLine(line: 1, text: "--size = 1G")) { try parse("--size = 1G") }
        #expect(throws: ConfigFile.ParseError.notText) { try ConfigFile(bytes: [0xFF, 0xFE], schema: schema) }
        #expect((try? parse("size = 1G")) != nil)
    }

    /// Blanks and quotes are found by Unicode scalar: one followed by a
    /// combining mark is a single Character, and still a blank or a quote
    /// (found by the fuzzer: fuzz/regressions/config/).
    @Test func aBlankOrQuoteBeforeACombiningMarkCounts() throws {
        #expect(try parse("listen = \u{34B}x").entries.first?.value?.unicodeScalars.first == "\u{34B}")
        #expect(try parse("listen = \r\u{34B}x").entries.first?.value?.unicodeScalars.first == "\u{34B}")
        #expect(try parse("listen = \"\u{34B}x \"").entries.first?.value?.unicodeScalars.count == 3)
        #expect(throws: ConfigFile.ParseError.unterminatedQuote(line: 1)) { try parse("listen = \"x\"\u{34B}") }
    }

    @Test func errorsReadWell() {
        #expect(ConfigFile.ParseError.unknownKey(line: 7, key: "x", known: ["a", "b"]).description
                == "line 7: unknown setting 'x' (known: a, b)")
    }
}

@Suite struct JournalFieldTests {
    @Test func metadataKeysBecomeJournalFields() {
        #expect(JournalField.name(forMetadataKey: "pages_stale") == "PAGES_STALE")
        #expect(JournalField.name(forMetadataKey: "vmm-socket") == "VMM_SOCKET")
        #expect(JournalField.name(forMetadataKey: "message_id") == "MESSAGE_ID")
        #expect(JournalField.name(forMetadataKey: "_pid") == nil, "leading _ is for trusted fields")
        #expect(JournalField.name(forMetadataKey: "9lives") == nil)
        #expect(JournalField.name(forMetadataKey: "") == nil)
        #expect(JournalField.name(forMetadataKey: String(repeating: "a", count: 65)) == nil)
        #expect(JournalField.name(forMetadataKey: "día") == "D__A", "each byte outside A-Z0-9 becomes _")
    }

    @Test func eventIDsAreStableDistinctAndInTheCatalog() throws {
        let ids = DaemonEvent.allCases.map(\.messageID)
        #expect(Set(ids).count == ids.count)
        for id in ids {
            #expect(id.count == 32 && id.allSatisfy { $0.isHexDigit && !$0.isUppercase }, "\(id)")
        }
        // Every event is explained by systemd/postcopyd.catalog, and nothing else is.
        let catalog = try String(contentsOfFile: Self.repositoryFile("systemd/postcopyd.catalog"), encoding: .utf8)
        let lines = catalog.split(separator: "\n", omittingEmptySubsequences: false)
        let catalogued = lines.filter { $0.hasPrefix("-- ") }.map { String($0.dropFirst(3)) }
        #expect(catalogued.sorted() == ids.sorted())
        // Each entry is preceded by "# event: NAME", the event whose ID it is:
        // scripts find the IDs by that name (Tests/Integration/systemd/run-test.sh).
        for (index, line) in lines.enumerated() where line.hasPrefix("-- ") {
            let named = index > 0 && lines[index - 1].hasPrefix("# event: ")
                ? DaemonEvent(rawValue: String(lines[index - 1].dropFirst("# event: ".count))) : nil
            #expect(named?.messageID == String(line.dropFirst(3)),
                    "\(line) is not preceded by '# event: NAME' naming its DaemonEvent")
        }
        #expect(DaemonEvent.postcopyComplete.messageID == "5006448c75c84692b38c4e23125a483a")
    }

    static func repositoryFile(_ path: String) -> String {
        var components = "\(#filePath)".split(separator: "/").dropLast(3)
        components.append(contentsOf: path.split(separator: "/"))
        return "/" + components.joined(separator: "/")
    }
}

@Suite struct ServicePolicyTests {
    @Test func stallsAreReportedAtMostOncePerInterval() {
        var limiter = StallLimiter(thresholdNanos: 100, intervalNanos: 1000)
        #expect(limiter.record(page: 1, stallNanos: 99, at: 0) == nil)
        #expect(limiter.record(page: 2, stallNanos: 150, at: 10) == .init(page: 2, stallNanos: 150, suppressed: 0))
        #expect(limiter.record(page: 3, stallNanos: 500, at: 500) == nil)
        #expect(limiter.record(page: 4, stallNanos: 50, at: 600) == nil)
        #expect(limiter.record(page: 5, stallNanos: 900, at: 900) == nil)
        #expect(limiter.record(page: 6, stallNanos: 120, at: 1010) == .init(page: 6, stallNanos: 120, suppressed: 2))
    }

    /// Threads read the clock before they take the limiter's lock: a time
    /// earlier than the last report's is within the interval, not a trap
    /// (it was one: an arithmetic overflow in postcopyd's bulk thread).
    @Test func aTimeBeforeTheLastReportIsSuppressed() {
        var limiter = StallLimiter(thresholdNanos: 100, intervalNanos: 1000)
        #expect(limiter.record(page: 1, stallNanos: 200, at: 5_000) != nil)
        #expect(limiter.record(page: 2, stallNanos: 200, at: 4_999) == nil)
        #expect(limiter.record(page: 3, stallNanos: 200, at: 6_000) == .init(page: 3, stallNanos: 200, suppressed: 1))
    }

    @Test func rateIsOverTheWindow() {
        var meter = RateMeter(windowNanos: 2_000_000_000)
        #expect(meter.record(0, at: 0) == 0)
        #expect(meter.record(1_000, at: 1_000_000_000) == 1_000)
        #expect(meter.record(3_000, at: 2_000_000_000) == 1_500)
        // The first sample leaves the window: 2 s from 1,000 to 5,000.
        #expect(meter.record(5_000, at: 3_000_000_000) == 2_000)
    }

    @Test func aHeartbeatThatStandsStillIsReportedOnce() {
        var monitor = HeartbeatMonitor(stallNanos: 100)
        #expect(monitor.observe(nil, at: 0) == .healthy)
        #expect(monitor.observe(1, at: 0) == .healthy)
        #expect(monitor.observe(1, at: 99) == .healthy)
        #expect(monitor.observe(1, at: 150) == .stalledNow(150))
        #expect(monitor.observe(1, at: 300) == .stalled)
        #expect(monitor.observe(2, at: 310) == .healthy)
        #expect(monitor.observe(2, at: 400) == .healthy)
        #expect(monitor.observe(2, at: 420) == .stalledNow(110))
    }

    @Test func controlRequests() throws {
        #expect(try ControlRequest(line: Array("status\n".utf8)) == .status)
        #expect(try ControlRequest(line: Array("status\r\n".utf8)) == .status)
        #expect(throws: ControlRequestError(text: "stats")) { try ControlRequest(line: Array("stats\n".utf8)) }
        #expect(ControlRequestError(text: "x").description == "unknown request 'x' (known: status, watch, cancel)")
        #expect(try ControlRequest(line: Array("cancel\n".utf8)) == .cancel)
        #expect(throws: ControlRequestError.self) { try ControlRequest(line: [UInt8](repeating: 65, count: 300)) }
    }

    @Test func aPausedStatusSaysWhatItWaitsFor() {
        var status = DaemonStatus()
        status.phase = "paused"
        status.stalePagesLeft = 812
        status.pausedSeconds = 12.4
        status.pauses = 2
        #expect(status.statusLine == "paused: agent connection lost, waiting for 12 s for it to rejoin; 812 stale pages left (QEMU: postcopy-paused)")
        #expect(status.lines.contains("pauses:        2 (agent connection lost and rejoined)"))
    }

    @Test func statusLineFollowsThePhase() {
        var status = DaemonStatus()
        status.listen = "0.0.0.0:7070"
        status.phase = "handshake"
        #expect(status.statusLine == "waiting for the agent on 0.0.0.0:7070; VMM not attached (QEMU: setup)")
        status.phase = "precopy"
        status.precopyRounds = 1
        status.precopyPages = 5000
        status.receiveMiBPerSecond = 210.04
        status.vmm = "pid 7, uid 0, gid 0"
        #expect(status.statusLine == "precopy round 2: 5000 pages received, 210.0 MiB/s; VMM attached (QEMU: active)")
        status.phase = "postcopy"
        status.stalePagesAtSwitchover = 10_000
        status.stalePagesLeft = 8123
        status.receiveMiBPerSecond = 41
        #expect(status.statusLine == "postcopy: 8123 stale pages left, 41.0 MiB/s (QEMU: postcopy-active)")
        status.phase = "handover"
        #expect(status.statusLine.hasPrefix("hand-over: the guest's memory is resumed here, the guest starts once the source's hand-over is done"))
        #expect(status.lines.contains { $0.hasPrefix("stale pages:   8123 of") })
        status.phase = "discarded"
        #expect(status.statusLine == "discarded: the guest never ran here; the source keeps it, and this VMM must be stopped (QEMU: cancelled)")
        status.phase = "postcopy"
        status.staleFaultLatency = LatencyFigures(nanoseconds: [180_000])
        #expect(status.statusLine == "postcopy: 8123 stale pages left, 41.0 MiB/s, stale-fault p99 180 µs (QEMU: postcopy-active)")
        #expect(status.postcopyProgress == 0.1877)
        status.phase = "failed"
        status.failure = "the agent closed the bulk connection during postcopy"
        #expect(status.statusLine == "failed: the agent closed the bulk connection during postcopy (QEMU: failed)")
    }

    /// The table in docs/operations.md, "In QEMU's and libvirt's words".
    @Test func everyPhaseHasItsQEMUState() {
        let expected: [(String, QEMUMigrationStatus)] = [
            ("handshake", .setup), ("precopy", .active), ("switchover", .postcopyDevice),
            ("handover", .postcopyDevice), ("postcopy", .postcopyActive), ("paused", .postcopyPaused),
            ("complete", .completed), ("failed", .failed), ("discarded", .cancelled),
        ]
        for (phase, state) in expected { #expect(QEMUMigrationStatus(phase: phase) == state, "\(phase)") }
        #expect(QEMUMigrationStatus(phase: "paused", rejoining: true) == .postcopyRecover)
        #expect(QEMUMigrationStatus(phase: "postcopy", rejoining: true) == .postcopyActive)
        #expect(QEMUMigrationStatus(phase: "unheard of") == nil)
    }

    @Test func statusSpeaksQEMUAndLibvirtInTheirUnits() throws {
        var status = DaemonStatus()
        status.phase = "postcopy"
        status.regionBytes = 1 << 30
        status.precopyRounds = 3
        status.stalePagesAtSwitchover = 1000
        status.stalePagesLeft = 100
        status.pageRequests = 40
        status.pagesRequested = 45
        status.bytesReceived = 5_000_000
        status.receiveMiBPerSecond = 2
        status.downtimeMs = 12.6
        status.elapsedSeconds = 15.4321
        status.phases = [PhaseDuration(phase: "handshake", seconds: 0.1004), PhaseDuration(phase: "precopy", seconds: 12),
                         PhaseDuration(phase: "postcopy", seconds: 3.3)]
        status.staleFaultLatency = LatencyFigures(nanoseconds: [100_000, 300_000])
        status.staleFaultLatencyDist = LatencyDistribution(nanoseconds: [100_000, 300_000])
        status.addManagementNames()
        let qemu = try #require(status.qemu)
        #expect(qemu.status == .postcopyActive)
        #expect(qemu.postcopyRequests == 40)
        #expect(qemu.postcopyLatency == 200_000)
        #expect(qemu.postcopyLatencyDist?[6] == 1 && qemu.postcopyLatencyDist?[8] == 1)
        let job = try #require(status.libvirt)
        #expect(job.timeElapsed == 15_432 && job.setupTime == 100 && job.downtime == 13)
        #expect(job.memoryTotal == 1 << 30 && job.memoryProcessed == 5_000_000 && job.memoryRemaining == 409_600)
        #expect(job.memoryBps == 2_097_152 && job.memoryIteration == 3 && job.memoryPageSize == 4096)
        #expect(job.memoryPostcopyRequests == 40 && job.memoryDirtyRate == nil)
        // JSON under QEMU's and libvirt's own keys.
        let json = String(decoding: try JSONEncoder().encode(status), as: UTF8.self)
        for key in ["\"postcopy-latency-dist\"", "\"postcopy-requests\"", "\"status\":\"postcopy-active\"",
                    "\"time_elapsed\":15432", "\"memory_remaining\":409600", "\"memory_postcopy_requests\":40"] {
            #expect(json.contains(key), "\(key) in \(json)")
        }
        #expect(try JSONDecoder().decode(DaemonStatus.self, from: Data(json.utf8)) == status)
        // Text: postcopyd's figure, and theirs beside it.
        let lines = status.lines
        #expect(lines.contains { $0.hasPrefix("phase:         postcopy ") && $0.hasSuffix("│ QEMU postcopy-active") })
        #expect(lines.contains { $0.hasPrefix("elapsed:       15.4 s: handshake 0.10 s, precopy 12.0 s, postcopy 3.3 s")
            && $0.hasSuffix("│ time_elapsed 15432 ms, setup_time 100 ms") })
        #expect(lines.contains { $0.hasPrefix("fault latency: 64–128 µs: 1, 256–512 µs: 1") && $0.hasSuffix("│ postcopy-latency-dist") })
        #expect(lines.contains { $0.hasPrefix("stale pages:   100 of 1000 left") && $0.hasSuffix("│ memory_remaining 409600") })
    }

    @Test func beforeTheDirtyBitmapNothingIsKnownToRemain() throws {
        var status = DaemonStatus()
        status.phase = "precopy"
        status.phases = [PhaseDuration(phase: "handshake", seconds: 0.2)]
        status.addManagementNames()
        let job = try #require(status.libvirt)
        #expect(job.memoryRemaining == nil)
        // Still in the handshake's successor's first moment: setup is known once precopy is in the list.
        #expect(job.setupTime == nil)
        #expect(status.qemu?.postcopyRequests == nil && status.qemu?.postcopyLatencyDist == nil)
    }

    @Test func phaseTimelineAddsUpEachPhaseFromTheFirstConnection() {
        var timeline = PhaseTimeline()
        timeline.enter("handshake", at: 0)
        #expect(timeline.durations(at: 5_000_000_000).isEmpty)
        #expect(timeline.elapsedSeconds(at: 5_000_000_000) == 0)
        timeline.begin(at: 10_000_000_000)
        timeline.begin(at: 11_000_000_000)  // only the first counts
        timeline.enter("precopy", at: 10_500_000_000)
        timeline.enter("precopy", at: 10_600_000_000)  // already there
        timeline.enter("postcopy", at: 20_500_000_000)
        timeline.enter("paused", at: 21_000_000_000)
        timeline.enter("postcopy", at: 23_000_000_000)
        timeline.enter("paused", at: 24_000_000_000)
        let durations = timeline.durations(at: 25_000_000_000)
        #expect(durations.map(\.phase) == ["handshake", "precopy", "postcopy", "paused"])
        #expect(durations.map(\.seconds) == [0.5, 10, 1.5, 3])
        #expect(timeline.elapsedSeconds(at: 25_000_000_000) == 15)
        #expect(timeline.current == "paused")
        // The clock stops at the end; nothing moves it after.
        timeline.enter("complete", at: 26_000_000_000)
        timeline.enter("failed", at: 27_000_000_000)
        #expect(timeline.durations(at: 30_000_000_000).map(\.seconds) == [0.5, 10, 1.5, 4])
        #expect(timeline.elapsedSeconds(at: 30_000_000_000) == 16)
        #expect(timeline.current == "complete")
    }

    @Test func theAgentsSummarySpeaksQEMUAndLibvirtToo() throws {
        var summary = AgentSummary()
        summary.regionBytes = 64 << 20
        summary.rounds = [
            PrecopyRound(round: 1, pagesSent: 16_000, zeroPagesSent: 384, bytesSent: 65_600_000, seconds: 0.5),
            PrecopyRound(round: 2, pagesSent: 400, zeroPagesSent: 0, bytesSent: 1_640_000, seconds: 0.05,
                         pagesWritten: 410, dirtyPagesPerSecond: 820.4),
        ]
        summary.totalSeconds = 2
        summary.setupSeconds = 0.0304
        summary.bytesSent = 70_000_000
        summary.downtimeMs = 4.4
        summary.expectedDowntimeMs = 3.6
        summary.pageRequests = 12
        summary.addManagementNames()
        #expect(summary.qemu?.status == .completed && summary.qemu?.expectedDowntime == 4 && summary.qemu?.postcopyRequests == 12)
        let job = try #require(summary.libvirt)
        #expect(job.timeElapsed == 2000 && job.setupTime == 30 && job.downtime == 4)
        #expect(job.memoryProcessed == 70_000_000 && job.memoryRemaining == 0 && job.memoryBps == 35_000_000)
        #expect(job.memoryDirtyRate == 820 && job.memoryIteration == 2 && job.memoryPageSize == 4096)
        #expect(summary.lines[1].hasSuffix("; last dirty rate 820 pages/s"), "\(summary.lines[1])")
        #expect(summary.lines[3].contains("downtime 4.4 ms (expected 3.6 ms)"), "\(summary.lines[3])")
        // A 1 GiB bitmap (262 144 pages, 32 768 bytes) at 32.768 MB/s is 1 ms, after a 0.5 ms scan.
        #expect(AgentSummary.expectedDowntimeMs(scanMs: 0.5, pageCount: 262_144, bytesPerSecond: 32_768_000) == 1.5)
        #expect(AgentSummary.expectedDowntimeMs(scanMs: 0.5, pageCount: 262_144, bytesPerSecond: 0) == 0.5)
    }

    @Test func watchViewShowsProgressRatesAndTimeLeft() {
        var status = DaemonStatus()
        status.instance = "vm42"
        status.migrationID = "3f2a9c0e11d2485b9e9d2b1c0a7f6e55"
        status.regionBytes = 1 << 30
        status.elapsedSeconds = 3.14
        status.phase = "precopy"
        status.precopyPages = 65_536
        status.receiveMiBPerSecond = 812.34
        #expect(status.watchLines == [
            "postcopyd@vm42 · migration 3f2a9c0e… · precopy (QEMU active) · 3.1 s",
            "[######..................]  25.0%  round 1: 256 MiB of 1 GiB · 812.3 MiB/s",
        ])
        status.precopyRounds = 2
        #expect(status.watchLines[1] == "round 3: 65536 pages received in all · 812.3 MiB/s")
        status.phase = "postcopy"
        status.stalePagesAtSwitchover = 10_000
        status.stalePagesLeft = 4_183
        status.receiveMiBPerSecond = 40
        status.faultsClean = 120
        status.faultsStale = 812
        status.downtimeMs = 12.34
        status.staleFaultLatency = LatencyFigures(nanoseconds: [340_000])
        // 4183 pages of 4 KiB at 40 MiB/s: 0.41 s.
        #expect(status.watchLines == [
            "postcopyd@vm42 · migration 3f2a9c0e… · postcopy (QEMU postcopy-active) · 3.1 s",
            "[#############...........]  58.2%  4183 of 10000 stale pages left · 40.0 MiB/s · about 0.41 s left",
            "faults 120 clean, 812 stale · p99 340 µs · downtime 12.3 ms",
        ])
        #expect(!status.hasEnded)
        status.phase = "paused"
        status.pausedSeconds = 2.5
        status.pauses = 1
        #expect(status.watchLines[2] == "faults 120 clean, 812 stale · p99 340 µs · downtime 12.3 ms · 1 pauses · paused 2.5 s, waiting for the agent")
        status.phase = "failed"
        status.failure = "the agent did not rejoin within 60 s"
        #expect(status.watchLines.last == "failed: the agent did not rejoin within 60 s")
        #expect(status.hasEnded)
    }
}
