import ArgumentParser
import Foundation
import PostcopyBench
import PostcopyCLI
import PostcopyCore
import PostcopyOS

struct Streams: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Precopy round 1 over 1 and more bulk streams (postcopy-push --streams), plaintext and TLS.",
        discussion: """
            A still image of SIZE migrated RUNS times at each count of streams and over each transport, the \
            counts alternating within a run; prints the medians, each run, and the ratio to one stream \
            measured in the same run, as a markdown table and one JSON line. Needs root and a release \
            build of the programs.
            """)

    @Option(help: ArgumentHelp("Guest RAM.", valueName: "size"))
    var size = "1G"

    @Option(help: ArgumentHelp("The counts of bulk streams, comma-separated; the first is the reference.", valueName: "list"))
    var streams = "1,2"

    @Option(help: "Runs at each count and transport; the median is reported.")
    var runs = 3

    @OptionGroup var programs: BenchPrograms

    @Option(help: ArgumentHelp("Where the runs keep their files (kept after the run).", valueName: "dir"))
    var work = "bench-results/streams"

    func run() throws {
        let counts = streams.split(separator: ",").compactMap { Int($0) }
        guard !counts.isEmpty, counts.count == streams.split(separator: ",").count,
              counts.allSatisfy({ (1...AgentStream.maxBulkStreams).contains($0) }) else {
            throw ValidationError("--streams is a comma-separated list of counts from 1 to \(AgentStream.maxBulkStreams), not '\(streams)'")
        }
        guard runs >= 1 else { throw ValidationError("--runs must be at least 1") }
        guard getuid() == 0 else { throw ValidationError("needs root: postcopyd resolves the VMM's faults with userfaultfd") }
        let bytes = try parseSize(size)
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        let say: @Sendable (String) -> Void = { line in writeStandardError("bench: \(line)\n") }
        let environment = BenchEnvironment(binDirectory: programs.bin, baselineDirectory: "", scriptsDirectory: programs.scripts,
                                           workDirectory: work, say: say)
        let figures = try Suite(environment: environment, scale: .full).precopyStreams(size: bytes, streams: counts, runs: runs)
        print(figures.markdown)
        try printJSON(figures)
    }
}
