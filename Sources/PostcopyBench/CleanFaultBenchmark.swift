import Foundation
import PostcopyCore
import PostcopyOS

/// Clean-fault cost: a thread reads every page of a region once, in order,
/// through a mapping registered in minor mode, while a fault thread resolves
/// each fault with UFFDIO_CONTINUE. postcopyd's `FaultLoop` against the same
/// loop in plain C (benchmarks/baseline/uffd-minor-loop.c), with the same
/// set-up: a memfd (MFD_HUGETLB for 2 MiB) filled through an alias, MINOR |
/// MISSING registration, poll + batched read + CONTINUE on the fault thread.
/// Runs alternate (postcopyd, C, postcopyd, C, …).
public struct CleanFaultBenchmark: Sendable {
    public let memory: MemoryKind
    public let size: UInt64
    public let runs: Int
    /// The C baseline binary.
    public let baseline: String

    public init(memory: MemoryKind, size: UInt64, runs: Int, baseline: String) {
        self.memory = memory
        self.size = size
        self.runs = runs
        self.baseline = baseline
    }

    /// `cpus` says how the process was placed (e.g. "1 (taskset -c 0)").
    public func run(cpus: String) throws -> CleanFaultFigures {
        var swiftSamples: [Double] = []
        var cSamples: [Double] = []
        for _ in 0..<runs {
            swiftSamples.append(try swiftRun())
            cSamples.append(try baselineRun())
        }
        let swift = LatencySummary(swiftSamples)!
        let c = LatencySummary(cSamples)!
        return CleanFaultFigures(memory: memory.rawValue, regionBytes: size, cpus: cpus, runs: runs,
                                 postcopydUsPerFault: swift.median / 1000, baselineUsPerFault: c.median / 1000,
                                 postcopydUsPerFaultMin: swift.min / 1000, baselineUsPerFaultMin: c.min / 1000,
                                 ratio: swift.median / c.median)
    }

    /// Nanoseconds per fault through postcopyd's loop.
    private func swiftRun() throws -> Double {
        let backing: Backing = memory == .shmem ? .memfd : .hugetlbMemfd
        let report = try FaultExercise(backing: backing, size: size, order: .sequential, verifyBytes: false).run()
        guard report.outcome.passed else { throw BenchmarkError("postcopyd loop: \(report.outcome.summary)") }
        return report.nanosecondsPerPage
    }

    /// Nanoseconds per fault through the C loop.
    private func baselineRun() throws -> Double {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: baseline)
        process.arguments = [memory == .shmem ? "shmem" : "hugetlb", String(size)]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard process.terminationStatus == 0, let value = keyValues(text)["ns_per_fault"].flatMap(Double.init) else {
            throw BenchmarkError("C baseline \(baseline) exited \(process.terminationStatus): \(text)")
        }
        return value
    }
}

public struct CleanFaultFigures: Codable, Sendable {
    public let memory: String
    public let regionBytes: UInt64
    public let cpus: String
    public let runs: Int
    /// Medians over the runs, µs per fault.
    public let postcopydUsPerFault: Double
    public let baselineUsPerFault: Double
    public let postcopydUsPerFaultMin: Double
    public let baselineUsPerFaultMin: Double
    /// postcopyd / C, of the medians.
    public let ratio: Double
}
