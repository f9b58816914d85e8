import ArgumentParser
import PostcopyCLI
import PostcopyCore
import PostcopyOS

@main
struct PostcopyBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "postcopy-bench",
        abstract: "postcopyd's benchmarks, each against a baseline measured in the same run.",
        subcommands: [CleanFaults.self])
}

struct CleanFaults: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clean-faults",
        abstract: "Cost per clean minor fault: postcopyd's resolve loop vs the same loop in plain C.",
        discussion: "Runs the Swift loop and the C baseline alternately, --runs times each, and reports medians and their ratio.")

    @Option(help: ArgumentHelp("The C baseline binary (benchmarks/baseline/uffd-minor-loop).", valueName: "path"))
    var baseline: String

    @Option(help: "Region size for 4 KiB shmem pages.", transform: parseSize)
    var shmemSize: UInt64 = 256 << 20

    @Option(help: "Region size for 2 MiB hugetlbfs pages (0 to skip).", transform: parseSize)
    var hugetlbSize: UInt64 = 256 << 20

    @Option(help: "Alternating runs per side.")
    var runs: Int = 7

    @Option(help: ArgumentHelp("Write the results as JSON to this file.", valueName: "path"))
    var json: String?

    func run() throws {
        var results: [CleanFaultResult] = []
        results.append(try CleanFaultBenchmark(memory: .shmem, size: shmemSize, runs: runs, baseline: baseline).run())
        if hugetlbSize > 0 {
            results.append(try CleanFaultBenchmark(memory: .hugetlbfs, size: hugetlbSize, runs: runs, baseline: baseline).run())
        }
        print(CleanFaultResult.table(results))
        if let json { try writeFile(json, CleanFaultResult.json(results)) }
    }
}
