import Foundation
import Glibc
import PostcopyCore
import PostcopyOS

/// `postcopy-bench load` (`make load`, `make test-load`): N whole migrations
/// at once over loopback, each with its own source workload, postcopyd,
/// reference guest and postcopy-push (a `MigrationScenario`). Every
/// instance fills its source and starts its daemon and guest; the N agents
/// then start together. Any program of any instance failing, or any guest
/// not verifying, fails the run.
public struct LoadRun: Sendable {
    public var instances: Int
    public var size: UInt64
    /// Share of pages each source keeps rewriting.
    public var dirty: Double
    /// Mutual TLS (test certificates made for the run); false: plaintext.
    public var tls = true
    /// What the programs need besides guest RAM, per instance.
    public static let programBytes: UInt64 = 64 << 20

    public init(instances: Int, size: UInt64, dirty: Double) {
        self.instances = instances
        self.size = size
        self.dirty = dirty
    }

    /// Refuses a run that does not fit this machine: each instance holds
    /// its guest RAM twice (the source file in /dev/shm, the destination's
    /// memfd) and its programs; the sources go to /dev/shm.
    public func checkFits(memAvailable: UInt64, shmFree: UInt64) throws {
        let need = UInt64(instances) * (2 * size + Self.programBytes)
        guard need <= memAvailable else {
            throw BenchmarkError("not enough memory: \(instances) × \(ByteSize.format(size)) needs \(ByteSize.format(need)) (\(instances) × (2 × \(ByteSize.format(size)) for source and destination + \(ByteSize.format(Self.programBytes)) for the programs)), MemAvailable is \(ByteSize.format(memAvailable)); lower the instances or the size")
        }
        let sources = UInt64(instances) * size
        guard sources <= shmFree else {
            throw BenchmarkError("not enough room in /dev/shm for the \(instances) source RAM files: \(ByteSize.format(sources)) needed, \(ByteSize.format(shmFree)) free")
        }
    }

    /// Runs the N migrations; throws naming every instance that failed and why.
    public func run(in environment: BenchEnvironment) throws -> LoadReport {
        let meminfo = procValues(readTextFile("/proc/meminfo") ?? "")
        var shm = statvfs()
        let shmFree = statvfs("/dev/shm", &shm) == 0 ? UInt64(shm.f_bavail) * UInt64(shm.f_frsize) : 0
        try checkFits(memAvailable: meminfo["MemAvailable"] ?? 0, shmFree: shmFree)
        // One set for all instances, made before any of them looks for it.
        if tls { try TestCertificates.make(in: environment) }
        let started = monotonicNanoseconds()
        let gate = StartGate(count: instances)
        let outcomes = Locked<[Int: Result<MigrationResult, any Error>]>([:])
        var threads: [OSThread] = []
        for index in 1...instances {
            var scenario = MigrationScenario(name: "load\(index)", size: size, source: .workload(dirty: dirty))
            scenario.tls = tls
            scenario.seed = UInt64(index)
            scenario.beforePush = { try gate.arriveAndWait() }
            let instance = scenario
            do {
                threads.append(try OSThread.start(name: "load\(index)") {
                    let outcome = Result { try instance.run(in: environment) }
                    // One that failed before the start lets the others go, so that they fail too.
                    if case .failure = outcome { gate.abandon() }
                    outcomes.withLock { $0[index] = outcome }
                })
            } catch {
                gate.abandon()
                threads.forEach { $0.join() }
                throw error
            }
        }
        let released = gate.waitForStart()
        environment.say("\(instances) migrations at once")
        threads.forEach { $0.join() }
        var report = LoadReport(size: size, dirty: dirty, setupSeconds: Double((released ?? started) - started) / 1e9)
        var failures: [String] = []
        for (index, outcome) in outcomes.withLock({ $0 }).sorted(by: { $0.key < $1.key }) {
            switch outcome {
            case let .success(result):
                report.perInstance.append(LoadReport.Instance(name: "load\(index)", result))
            case let .failure(error):
                failures.append("load\(index): \(error)")
            }
        }
        guard failures.isEmpty else {
            throw BenchmarkError("\(failures.count) of \(instances) migrations failed (\(instances) × \(ByteSize.format(size)), dirty \(dirty)):\n" + failures.joined(separator: "\n"))
        }
        return report
    }
}

/// Lets N threads through together once all have arrived, or at once when
/// one gave up (`abandon`), in which case the waiting ones throw.
final class StartGate: Sendable {
    private let count: Int
    private let state = Locked<(arrived: Int, abandoned: Bool, openedAt: UInt64?)>((0, false, nil))
    private let open = Latch()

    init(count: Int) { self.count = count }

    func arriveAndWait() throws {
        let last = state.withLock { state -> Bool in
            state.arrived += 1
            guard state.arrived == count else { return false }
            state.openedAt = monotonicNanoseconds()
            return true
        }
        if last { open.open() }
        open.wait()
        if state.withLock({ $0.abandoned }) {
            throw BenchmarkError("another instance failed before the migrations started")
        }
    }

    func abandon() {
        state.withLock { $0.abandoned = true }
        open.open()
    }

    /// Waits until the gate opens; when it opened on all arriving (nil if abandoned).
    func waitForStart() -> UInt64? {
        open.wait()
        return state.withLock { $0.abandoned ? nil : $0.openedAt }
    }
}

/// What `postcopy-bench load` reports: one row per instance, the totals,
/// and the same as one JSON object.
public struct LoadReport: Codable, Equatable, Sendable {
    public struct Instance: Codable, Equatable, Sendable {
        public var instance: String
        /// From the common start of the agents to this instance's three programs all exited 0.
        public var wallSeconds: Double
        public var migrationSeconds: Double
        public var precopySeconds: Double
        public var downtimeMs: Double
        public var postcopySeconds: Double
        public var stalePages: UInt64
        public var staleFaults: UInt64
        public var daemonPeakResidentMiB: Double
        public var daemonBesidesRAMMiB: Double

        public init(name: String, _ result: MigrationResult) {
            instance = name
            wallSeconds = result.migrationWallSeconds
            migrationSeconds = result.agent.totalSeconds
            precopySeconds = result.agent.precopySeconds
            downtimeMs = result.daemon.downtimeMs
            postcopySeconds = result.daemon.postcopySeconds
            stalePages = result.daemon.stalePagesAtSwitchover
            staleFaults = result.daemon.faultsStale
            let memory = result.daemon.memoryUse
            daemonPeakResidentMiB = Double(memory?.peakResident ?? 0) / 1_048_576
            daemonBesidesRAMMiB = Double(memory?.overhead ?? 0) / 1_048_576
        }
    }

    public var instances: Int { perInstance.count }
    public var size: UInt64
    public var dirty: Double
    /// Filling the sources and starting the daemons and guests, before the agents started.
    public var setupSeconds: Double
    public var perInstance: [Instance] = []

    public init(size: UInt64, dirty: Double, setupSeconds: Double) {
        self.size = size
        self.dirty = dirty
        self.setupSeconds = setupSeconds
    }

    public var wallSeconds: Double { perInstance.map(\.wallSeconds).max() ?? 0 }
    public var daemonPeakResidentSumMiB: Double { perInstance.map(\.daemonPeakResidentMiB).reduce(0, +) }
    public var daemonPeakResidentMaxMiB: Double { perInstance.map(\.daemonPeakResidentMiB).max() ?? 0 }

    /// The table, then the PASS line.
    public var lines: [String] {
        func column(_ text: String, _ width: Int) -> String { String(repeating: " ", count: max(width - text.count, 0)) + text }
        let heads = ["wall s", "migration s", "precopy s", "downtime ms", "postcopy s", "stale pages", "stale faults",
                     "daemon peak MiB", "besides RAM MiB"]
        var lines = ["instance" + heads.map { "  " + $0 }.joined()]
        for row in perInstance {
            let cells = [fixed(row.wallSeconds, 2), fixed(row.migrationSeconds, 2), fixed(row.precopySeconds, 2),
                         fixed(row.downtimeMs, 1), fixed(row.postcopySeconds, 2), "\(row.stalePages)", "\(row.staleFaults)",
                         fixed(row.daemonPeakResidentMiB, 1), fixed(row.daemonBesidesRAMMiB, 1)]
            lines.append(row.instance.padding(8) + zip(cells, heads).map { "  " + column($0, $1.count) }.joined())
        }
        lines.append("PASS — \(instances) × \(ByteSize.format(size)) migrations (dirty \(dirty)) at once in \(fixed(wallSeconds, 2)) s wall (after \(fixed(setupSeconds, 2)) s to fill the sources and start the daemons); daemon peak resident (VmHWM): sum \(fixed(daemonPeakResidentSumMiB, 1)) MiB, max \(fixed(daemonPeakResidentMaxMiB, 1)) MiB")
        return lines
    }

    private enum CodingKeys: String, CodingKey {
        case instances, size, dirty, wallSeconds, setupSeconds, daemonPeakResidentSumMiB, daemonPeakResidentMaxMiB, perInstance
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(instances, forKey: .instances)
        try container.encode(size, forKey: .size)
        try container.encode(dirty, forKey: .dirty)
        try container.encode(wallSeconds, forKey: .wallSeconds)
        try container.encode(setupSeconds, forKey: .setupSeconds)
        try container.encode(daemonPeakResidentSumMiB, forKey: .daemonPeakResidentSumMiB)
        try container.encode(daemonPeakResidentMaxMiB, forKey: .daemonPeakResidentMaxMiB)
        try container.encode(perInstance, forKey: .perInstance)
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        size = try container.decode(UInt64.self, forKey: .size)
        dirty = try container.decode(Double.self, forKey: .dirty)
        setupSeconds = try container.decode(Double.self, forKey: .setupSeconds)
        perInstance = try container.decode([Instance].self, forKey: .perInstance)
    }
}

private extension String {
    func padding(_ width: Int) -> String { self + String(repeating: " ", count: max(width - count, 0)) }
}
