import Foundation
import Glibc
import PostcopyCore
import PostcopyOS
import Testing
@testable import PostcopyBench

@Suite struct LoadRunTests {
    @Test func aRunThatDoesNotFitIsRefusedSayingWhatItNeeds() throws {
        let load = LoadRun(instances: 8, size: 256 << 20, dirty: 0.1)
        // 8 × (2 × 256 MiB + 64 MiB) = 4.5 GiB.
        try load.checkFits(memAvailable: 4608 << 20, shmFree: 2 << 30)
        #expect(throws: BenchmarkError.self) { try load.checkFits(memAvailable: (4608 << 20) - 1, shmFree: 2 << 30) }
        do {
            try load.checkFits(memAvailable: 1 << 30, shmFree: 4 << 30)
        } catch {
            #expect("\(error)".hasPrefix("not enough memory: 8 × 256 MiB needs 4.5 GiB"), "\(error)")
        }
        do {
            try load.checkFits(memAvailable: 8 << 30, shmFree: 1 << 30)
        } catch {
            #expect("\(error)" == "not enough room in /dev/shm for the 8 source RAM files: 2 GiB needed, 1 GiB free")
        }
    }

    /// The agents start together; one instance failing before the start
    /// lets the waiting ones go, and they fail too instead of hanging.
    @Test func theStartGateOpensOnAllOrOnAFailure() throws {
        let gate = StartGate(count: 3)
        let passed = Locked(0)
        let threads = try (0..<2).map { _ in
            try OSThread.start(name: "gate-test") { if (try? gate.arriveAndWait()) != nil { passed.withLock { $0 += 1 } } }
        }
        usleep(50_000)
        #expect(passed.withLock { $0 } == 0, "two of three arrived: nobody passes yet")
        try gate.arriveAndWait()
        threads.forEach { $0.join() }
        #expect(passed.withLock { $0 } == 2)
        #expect(gate.waitForStart() != nil)

        let failing = StartGate(count: 3)
        let thrown = Locked(0)
        let waiting = try OSThread.start(name: "gate-test") { if (try? failing.arriveAndWait()) == nil { thrown.withLock { $0 += 1 } } }
        usleep(20_000)
        failing.abandon()
        waiting.join()
        #expect(thrown.withLock { $0 } == 1)
        #expect(throws: BenchmarkError.self) { try failing.arriveAndWait() }
        #expect(failing.waitForStart() == nil)
    }

    @Test func theReportHasARowPerInstanceAndTheTotals() throws {
        var daemon = DestinationSummary()
        daemon.downtimeMs = 4.2
        daemon.postcopySeconds = 0.5
        daemon.stalePagesAtSwitchover = 819
        daemon.faultsStale = 28
        var memory = ProcessMemory()
        (memory.peakResident, memory.anonymous, memory.file) = (48 << 20, 8 << 20, 24 << 20)
        daemon.memoryUse = memory
        var agent = AgentSummary()
        agent.totalSeconds = 1.5
        agent.precopySeconds = 0.3
        let result = MigrationResult(daemon: daemon, agent: agent, guest: GuestSummary(), trace: nil, touches: [],
                                     wallSeconds: 3, migrationWallSeconds: 1.75)
        var report = LoadReport(size: 32 << 20, dirty: 0.1, setupSeconds: 0.8)
        report.perInstance = [LoadReport.Instance(name: "load1", result), LoadReport.Instance(name: "load2", result)]
        report.perInstance[1].wallSeconds = 2
        #expect(report.lines.count == 4)
        #expect(report.lines[1] == "load1       1.75         1.50       0.30          4.2        0.50          819            28             48.0             32.0")
        #expect(report.lines[3].hasPrefix("PASS — 2 × 32 MiB migrations (dirty 0.1) at once in 2.00 s wall (after 0.80 s"))
        #expect(report.lines[3].hasSuffix("sum 96.0 MiB, max 48.0 MiB"))
        let json = String(decoding: try JSONEncoder().encode(report), as: UTF8.self)
        #expect(json.contains("\"instances\":2") && json.contains("\"wallSeconds\":2"))
        #expect(try JSONDecoder().decode(LoadReport.self, from: Data(json.utf8)) == report)
    }
}
