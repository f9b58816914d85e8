import ArgumentParser
import Foundation
import PostcopyBench
import PostcopyCLI
import PostcopyCore
import PostcopyOS

@main
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "postcopy-bench",
        abstract: "postcopyd's benchmarks, each against a baseline measured in the same run.",
        subcommands: [Run.self, Demo.self, Load.self, CleanFaults.self, SHA256Throughput.self, Streams.self])
}

/// Why the migrations need root, for a refusal.
let rootReason = "postcopyd resolves the VMM's faults with userfaultfd, which needs root here"

/// Where a benchmark finds the programs it runs and the repository's
/// scripts: the options `run`, `load` and `streams` share.
struct BenchPrograms: ParsableArguments {
    @Option(help: ArgumentHelp("The programs (a release build; .build/debug works, slower).", valueName: "dir"))
    var bin = ".build/release"

    @Option(help: ArgumentHelp("The repository's scripts (make-test-certs.sh, for the TLS runs).", valueName: "dir"))
    var scripts = "scripts"
}

/// Refuses a run when any of `programs` is not an executable in `bin`.
func requirePrograms(_ programs: [String], in bin: String) throws {
    for program in programs where !FileManager.default.isExecutableFile(atPath: "\(bin)/\(program)") {
        throw ValidationError("\(bin)/\(program) is missing: build first ('make build', or 'swift build' for .build/debug) or give --bin")
    }
}

struct Load: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "N whole migrations at once over loopback (what 'make load' and 'make test-load' run).",
        discussion: """
            Each instance has its own source workload dirtying its RAM, postcopyd, reference guest as its \
            VMM, and postcopy-push; the N agents start together once every source is filled and every \
            daemon listens. Fails, naming each instance that failed and why (the end of the failing \
            program's log), when any program fails or any guest does not verify; otherwise prints each \
            instance's figures, a PASS line, and the same as one JSON line. Needs root, and memory for \
            N × SIZE twice plus 64 MiB per instance.
            """)

    @Option(name: [.customShort("n"), .long], help: "Migrations at once.")
    var instances = 8

    @Option(help: ArgumentHelp("Guest RAM of each.", valueName: "size"))
    var size = "256M"

    @Option(help: "Share of pages each source keeps rewriting.")
    var dirty = 0.10

    @Flag(help: "--insecure-plaintext on both ends instead of mutual TLS with certificates made for the run.")
    var plaintext = false

    @OptionGroup var programs: BenchPrograms

    @Option(help: ArgumentHelp("Where each instance keeps its logs and summaries (kept after the run).", valueName: "dir"))
    var work = "/tmp/postcopy-load"

    @Flag(help: "Not root is a skip (exit 0, saying so) instead of a refusal, for make test.")
    var skipUnlessRoot = false

    func validate() throws {
        guard instances > 0 else { throw ValidationError("--instances must be at least 1") }
        guard dirty >= 0 && dirty <= 1 else { throw ValidationError("--dirty must be a share between 0 and 1, not \(dirty)") }
    }

    func run() throws {
        let bytes = try parseSize(size)
        guard getuid() == 0 else {
            if skipUnlessRoot {
                print("load: SKIP: needs root (postcopyd resolves the VMM's faults with userfaultfd)")
                return
            }
            throw ValidationError("needs root: \(rootReason)")
        }
        try requirePrograms(["postcopyd", "postcopy-push", "postcopy-guest"], in: programs.bin)
        try? FileManager.default.removeItem(atPath: work)
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        let say: @Sendable (String) -> Void = { line in print("load: \(line)") }
        let environment = BenchEnvironment(binDirectory: programs.bin, baselineDirectory: "", scriptsDirectory: programs.scripts,
                                           workDirectory: work, say: say)
        var load = LoadRun(instances: instances, size: bytes, dirty: dirty)
        load.tls = !plaintext
        say("\(instances) × \(ByteSize.format(bytes)) (dirty \(dirty), \(plaintext ? "plaintext" : "TLS")): filling the sources, starting the daemons and guests; logs in \(work)/loadN/")
        do {
            let report = try load.run(in: environment)
            report.lines.forEach { say($0) }
            try printJSON(report)
        } catch let error as BenchmarkError {
            writeStandardError("load: FAIL: \(error)\n")
            throw ExitCode.failure
        }
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run every benchmark (what 'make bench' does): a table, one JSON file, two plots.",
        discussion: """
            1 clean-fault cost vs a C loop, 2 stale-fault latency vs loopback ping-pong, 3 back-fill \
            throughput vs raw TCP and memcpy, 4 end-to-end, 5 scaling, 6 huge pages, 7 the pause by \
            dirty log, 8 precopy round-1 throughput in plaintext and over TLS vs precopy-stream. Needs \
            root, a release build of the programs and the C baselines (make bench builds both).
            """)

    @Option(help: ArgumentHelp("Where results go.", valueName: "dir"))
    var out = "bench-results"

    @OptionGroup var programs: BenchPrograms

    @Option(help: ArgumentHelp("The C baselines.", valueName: "dir"))
    var baselines = "benchmarks/baseline"

    @Flag(help: "Small sizes: every path in a couple of minutes (figures not comparable with a full run).")
    var quick = false

    @Option(help: ArgumentHelp("--background-scheduling for postcopyd and postcopy-push in the stale-fault runs (default: theirs, normal).", valueName: "class"))
    var backgroundScheduling: String?

    @Option(help: ArgumentHelp("Only these benchmarks (comma-separated: clean,stale,backfill,e2e,scaling,precopy,huge,pause).", valueName: "list"))
    var only: String?

    func run() throws {
        let all = ["clean", "stale", "backfill", "e2e", "scaling", "precopy", "huge", "pause"]
        let chosen = only.map { $0.split(separator: ",").map(String.init) } ?? all
        if let unknown = chosen.first(where: { !all.contains($0) }) {
            throw ValidationError("unknown benchmark '\(unknown)' (known: \(all.joined(separator: ", ")))")
        }
        let started = Date()
        let say: @Sendable (String) -> Void = { line in writeStandardError("bench: \(line)\n") }
        try FileManager.default.createDirectory(atPath: out + "/work", withIntermediateDirectories: true)
        let environment = BenchEnvironment(binDirectory: programs.bin, baselineDirectory: baselines, scriptsDirectory: programs.scripts,
                                           workDirectory: out + "/work", say: say)
        var suite = Suite(environment: environment, scale: quick ? .quick : .full)
        suite.backgroundScheduling = backgroundScheduling
        var results = BenchResults()
        results.command = CommandLine.arguments.joined(separator: " ")
        results.started = ISO8601DateFormatter().string(from: started)
        results.machine = MachineFacts.current()
        let notes = ["\(results.machine!.cpus) CPUs, \(results.machine!.cpuModel), Linux \(results.machine!.kernel)",
                     "make bench, \(results.started)"]

        if chosen.contains("clean") {
            say("1. clean-fault cost (pinned to CPU 0, then free)")
            results.cleanFaults = try cleanFaults(pinned: true) + (try cleanFaults(pinned: false))
        }
        if chosen.contains("stale") {
            say("2. stale-fault latency")
            let (figures, busy, idle) = try suite.staleFaults()
            results.staleFaults = figures
            try write(Report.staleFaultCDF(idle: idle, busy: busy, pingPong: figures.first?.pingPong, notes: notes),
                      "stale-fault-cdf.svg")
        }
        if chosen.contains("backfill") {
            say("3. back-fill throughput")
            results.backfill = try suite.backfill()
        }
        if chosen.contains("e2e") {
            say("4. end-to-end")
            let (ten, tenRun) = try suite.endToEnd(dirty: 0.10, trace: true)
            let (fifty, _) = try suite.endToEnd(dirty: 0.50, trace: false)
            results.endToEnd = [ten, fifty]
            try write(Report.fillProgress(tenRun, title: "Postcopy fill progress, \(ByteSize.format(ten.regionBytes)), 10% dirty workload",
                                          notes: notes), "fill-progress.svg")
        }
        if chosen.contains("scaling") {
            say("5. scaling")
            results.scaling = try suite.scaling()
        }
        if chosen.contains("precopy") {
            say("8. precopy throughput (plaintext and TLS)")
            results.precopy = try suite.precopy()
        }
        if chosen.contains("huge") {
            say("6. huge pages")
            results.hugePages = try suite.hugePages()
        }
        if chosen.contains("pause") {
            say("7. the pause by dirty log")
            results.pause = try suite.pause()
        }
        results.durationSeconds = Date().timeIntervalSince(started)
        let table = Report.markdown(results)
        print(table)
        try write(table + "\n", "table.md")
        try write(try jsonLine(results) + "\n", "bench.json")
        say("done in \(fixed(results.durationSeconds / 60, 1)) min; results in \(out)/ (bench.json, table.md, *.svg)")
    }

    /// Benchmark 1 runs in a child of this program, so that it can be pinned
    /// to one CPU (with everything it starts) or left free.
    private func cleanFaults(pinned: Bool) throws -> [CleanFaultFigures] {
        let json = "\(out)/work/clean-faults-\(pinned ? "1cpu" : "2cpu").json"
        let process = Process()
        let me = CommandLine.arguments[0].contains("/") ? CommandLine.arguments[0] : "\(programs.bin)/postcopy-bench"
        var arguments = [me, "clean-faults", "--baseline", "\(baselines)/uffd-minor-loop", "--runs", quick ? "3" : "7",
                         "--cpus", pinned ? "1 (taskset -c 0)" : "\(ProcessInfo.processInfo.activeProcessorCount) (free)",
                         "--json", json]
        if quick { arguments += ["--shmem-size", "64M", "--hugetlb-size", "64M"] }
        if pinned { arguments = ["-c", "0"] + arguments }
        process.executableURL = URL(fileURLWithPath: pinned ? "/usr/bin/taskset" : me)
        process.arguments = pinned ? arguments : Array(arguments.dropFirst())
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw BenchmarkError("clean-faults exited \(process.terminationStatus)") }
        return try JSONDecoder().decode([CleanFaultFigures].self, from: Data(contentsOf: URL(fileURLWithPath: json)))
    }

    private func write(_ text: String, _ name: String) throws {
        try text.write(toFile: "\(out)/\(name)", atomically: true, encoding: .utf8)
    }
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

    @Option(help: "How this process is placed, for the report (e.g. '1 (taskset -c 0)').")
    var cpus = "as started"

    @Option(help: ArgumentHelp("Write the results as JSON to this file.", valueName: "path"))
    var json: String?

    func run() throws {
        var results: [CleanFaultFigures] = []
        results.append(try CleanFaultBenchmark(memory: .shmem, size: shmemSize, runs: runs, baseline: baseline).run(cpus: cpus))
        if hugetlbSize > 0 {
            results.append(try CleanFaultBenchmark(memory: .hugetlbfs, size: hugetlbSize, runs: runs, baseline: baseline).run(cpus: cpus))
        }
        for result in results {
            print("clean faults, \(result.memory), \(ByteSize.format(result.regionBytes)), CPUs \(result.cpus): postcopyd \(fixed(result.postcopydUsPerFault, 2)) µs, C \(fixed(result.baselineUsPerFault, 2)) µs, ratio \(fixed(result.ratio, 2))")
        }
        if let json { try (try jsonLine(results) + "\n").write(toFile: json, atomically: true, encoding: .utf8) }
    }
}

struct SHA256Throughput: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sha256",
        abstract: "SHA-256 throughput of the implementation postcopyd is built with: 4 KiB pages, one buffer, the image digest.",
        discussion: "Hashes --size bytes as 4 KiB pages (a digest each) and as one message, and computes the image digest of a guest that size, --runs times each; reports medians in MB/s (10^6 bytes of input per second).")

    @Option(help: "Bytes to hash (a multiple of 4 KiB).", transform: parseSize)
    var size: UInt64 = 1 << 30

    @Option(help: "Runs of each kind; the median is reported.")
    var runs: Int = 5

    @Option(help: ArgumentHelp("Write the results as JSON to this file.", valueName: "path"))
    var json: String?

    func validate() throws {
        guard size > 0, size % 4096 == 0 else { throw ValidationError("--size must be a positive multiple of 4 KiB") }
        guard runs >= 1 else { throw ValidationError("--runs must be at least 1") }
    }

    func run() throws {
        let figures = SHA256Benchmark(bytes: Int(size), runs: runs).run()
        for figure in figures {
            print("sha256 \(figure.kind), \(ByteSize.format(UInt64(figure.inputBytes))), \(figure.runs) runs: median \(fixed(figure.medianMBps, 0)) MB/s (\(fixed(figure.minMBps, 0))-\(fixed(figure.maxMBps, 0)))")
        }
        if let json { try (try jsonLine(figures) + "\n").write(toFile: json, atomically: true, encoding: .utf8) }
    }
}
