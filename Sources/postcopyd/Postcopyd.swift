import ArgumentParser
import PostcopyCLI
import PostcopyCore
import PostcopyOS

@main
struct Postcopyd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "postcopyd",
        abstract: "Destination-side postcopy for VM live migration, on userfaultfd minor faults.",
        subcommands: [Serve.self, Check.self, Exercise.self])
}

/// Options naming the memory guest RAM lives in.
struct MemoryOptions: ParsableArguments {
    @Option(help: "Memory backing guest RAM: shmem (memfd, 4 KiB pages) or hugetlbfs (2 MiB pages).")
    var memory: MemoryKind = .shmem

    @Option(help: ArgumentHelp("A hugetlbfs mount to create the RAM file in (default: the first 2 MiB mount, else a MFD_HUGETLB memfd).", valueName: "dir"))
    var hugetlbfsDir: String?

    var backing: Backing { Backing.choose(memory, hugetlbfsDirectory: hugetlbfsDir) }
}


struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Probe the kernel for what postcopy needs and run a live minor-fault self-test.",
        discussion: "Exits 0 when ready, 1 with one 'missing:' line per unmet requirement.")

    @Flag(help: "Fail when 2 MiB hugetlbfs postcopy is unavailable (by default only a warning).")
    var requireHugetlbfs = false

    @Option(help: ArgumentHelp("The hugetlbfs mount for the 2 MiB self-test.", valueName: "dir"))
    var hugetlbfsDir: String?

    func run() throws {
        let report = CapabilityReport(CapabilityProbe.gather(requireHugetlbfs: requireHugetlbfs,
                                                             hugetlbfsDirectory: hugetlbfsDir))
        print(report.rendered())
        if !report.passed { throw ExitCode.failure }
    }
}

struct Exercise: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Resolve minor faults on a local region: fill it through the alias, touch it through a registered mapping, verify every byte.")

    @OptionGroup var memoryOptions: MemoryOptions

    @Option(help: "Size of the region (e.g. 256M, 1G).", transform: parseSize)
    var size: UInt64 = 1 << 30

    @Option(help: "Leave every N-th page unwritten, a hole that must read as zeros (0: none).")
    var holeEvery: UInt64 = 97

    @Option(help: "Seed for the random touch order and the page pattern.")
    var seed: UInt64 = 1

    func run() throws {
        let exercise = FaultExercise(backing: memoryOptions.backing, size: size, order: .random(seed: seed),
                                     holeEvery: holeEvery == 0 ? nil : holeEvery, verifyBytes: true,
                                     recordLatencies: true, seed: seed)
        print("postcopyd exercise: \(ByteSize.format(size)) of \(exercise.backing), random touch order (seed \(seed))")
        let report = try exercise.run()
        report.summaryLines.forEach { print($0) }
        if !report.outcome.passed { throw ExitCode.failure }
    }
}
