import Foundation
import PostcopyCore
import PostcopyOS

/// Clean-fault cost: a thread reads every page of a region once, in order,
/// through a mapping registered in minor mode, while a fault thread resolves
/// each fault with UFFDIO_CONTINUE. postcopyd's `FaultLoop` against the same
/// loop in plain C (benchmarks/baseline/uffd-minor-loop.c), with the same
/// set-up: a memfd (MFD_HUGETLB for 2 MiB) filled through an alias, MINOR |
/// MISSING registration, poll + batched read + CONTINUE on the fault thread.
struct CleanFaultBenchmark {
    let memory: MemoryKind
    let size: UInt64
    let runs: Int
    let baseline: String

    func run() throws -> CleanFaultResult {
        var swiftSamples: [Double] = []
        var cSamples: [Double] = []
        for _ in 0..<runs {
            swiftSamples.append(try swiftRun())
            cSamples.append(try baselineRun())
        }
        return CleanFaultResult(memory: memory, size: size, swift: LatencySummary(swiftSamples)!,
                                baseline: LatencySummary(cSamples)!)
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
        guard process.terminationStatus == 0,
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("ns_per_fault=") }),
              let value = Double(line.dropFirst("ns_per_fault=".count)) else {
            throw BenchmarkError("C baseline \(baseline) exited \(process.terminationStatus): \(text)")
        }
        return value
    }
}

struct CleanFaultResult {
    let memory: MemoryKind
    let size: UInt64
    let swift: LatencySummary
    let baseline: LatencySummary

    var ratio: Double { swift.median / baseline.median }

    static func table(_ results: [CleanFaultResult]) -> String {
        var lines = ["clean-fault cost, µs per fault (median of \(results.first?.swift.count ?? 0) alternating runs)",
                     "memory     region    postcopyd   C baseline   ratio"]
        for result in results {
            lines.append([result.memory.rawValue.padding(toLength: 10, withPad: " ", startingAt: 0),
                          ByteSize.format(result.size).padding(toLength: 9, withPad: " ", startingAt: 0),
                          fixed(result.swift.median / 1000, 2).padding(toLength: 11, withPad: " ", startingAt: 0),
                          fixed(result.baseline.median / 1000, 2).padding(toLength: 12, withPad: " ", startingAt: 0),
                          fixed(result.ratio, 2) + "x"].joined(separator: " "))
        }
        return lines.joined(separator: "\n")
    }

    static func json(_ results: [CleanFaultResult]) -> String {
        let entries = results.map { result in
            """
              {"memory": "\(result.memory)", "region_bytes": \(result.size), "runs": \(result.swift.count), \
            "postcopyd_ns_per_fault_median": \(fixed(result.swift.median, 1)), \
            "postcopyd_ns_per_fault_min": \(fixed(result.swift.min, 1)), \
            "baseline_ns_per_fault_median": \(fixed(result.baseline.median, 1)), \
            "baseline_ns_per_fault_min": \(fixed(result.baseline.min, 1)), \
            "ratio_median": \(fixed(result.ratio, 3))}
            """
        }
        return "{\"clean_faults\": [\n" + entries.joined(separator: ",\n") + "\n]}\n"
    }
}

struct BenchmarkError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

func writeFile(_ path: String, _ text: String) throws {
    try text.write(toFile: path, atomically: true, encoding: .utf8)
}
