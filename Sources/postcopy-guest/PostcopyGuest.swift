import ArgumentParser
import Glibc
import PostcopyCLI
import PostcopyCore
import PostcopyHarness
import PostcopyMigration
import PostcopyOS
import Synchronization

@main
struct PostcopyGuest: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "postcopy-guest",
        abstract: "The reference guest: a VMM stand-in on the destination, and a dirtying workload on the source.",
        subcommands: [VMM.self, Source.self])
}

struct VMM: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Attach to postcopyd as the VMM, run a guest that reads all of RAM after resume, and verify it.",
        discussion: """
            Maps the RAM file postcopyd offers, registers the mapping with its own userfaultfd \
            (MINOR|MISSING) and hands that over. After VMM_RESUME, threads read every 4 KiB page once \
            in a random order, timing each first touch, then write a marker into it. Exits 0 only if \
            the image matches the source's digest and every marker survived. Once postcopy is complete \
            and guest RAM released, shmem RAM goes back into 2 MiB pages (MADV_COLLAPSE per 2 MiB \
            extent, on a thread at nice 19; --no-collapse to leave it in 4 KiB pages), and the summary \
            says how many extents are mapped huge before and after. From VMM_RESUME until \
            VMM_COMPLETE guest RAM is never released: if postcopyd dies or sends ERROR during \
            postcopy, the guest's faults wait while it reattaches to a restarted postcopyd \
            (--reattach-timeout), handing back the RAM file, the page-state record and the userfaultfd. \
            If none comes in time, it exits 1 without releasing: the guest threads end with the \
            process, so none ever reads incomplete memory.
            """)

    @Option(help: ArgumentHelp("postcopyd's VMM socket.", valueName: "path"))
    var socket = "/run/postcopyd/postcopyd.sock"

    @Option(help: "Guest threads (vCPUs) reading RAM.")
    var threads = 4

    @Option(help: "Seed of the random read order.")
    var seed: UInt64 = 1

    @Flag(help: "Do not write markers into pages after reading them.")
    var noScribble = false

    @Option(help: "Share of the pages the threads read after resume (0…1); the rest are hashed once postcopy is over.")
    var touch = 1.0

    @Option(help: ArgumentHelp("Write every first touch as CSV (thread,t_us,page,stall_us) to this file.", valueName: "path"))
    var touchLog: String?

    @Option(help: ArgumentHelp("Microseconds each thread works (sleeps) after a touch before the next.", valueName: "µs"))
    var thinkUs: UInt64 = 0

    @Option(help: ArgumentHelp("If postcopyd dies or fails (ERROR) during postcopy, wait this long for a restarted one to take the guest over; then exit 1 without releasing guest RAM, the guest's threads still blocked on the pages still stale (0: exit so at once).", valueName: "seconds"))
    var reattachTimeout: Double = 60

    @Flag(help: "Leave guest RAM in 4 KiB pages after postcopy: no MADV_COLLAPSE into 2 MiB pages.")
    var noCollapse = false

    @Option(help: ArgumentHelp("After postcopy, time dependent random 8-byte reads across all of guest RAM for about this long (5 passes; ns/read, median), in 4 KiB mappings and again after the collapse.", valueName: "seconds"))
    var measureTlb: Double = 0

    func validate() throws {
        guard (0...1).contains(touch) else { throw ValidationError("--touch is a share from 0 to 1") }
        guard measureTlb >= 0, measureTlb <= 3600 else { throw ValidationError("--measure-tlb is seconds between 0 and 3600") }
        guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
        guard reattachTimeout >= 0, reattachTimeout <= 86_400 else {
            throw ValidationError("--reattach-timeout is seconds between 0 and 86400")
        }
    }

    @Flag(help: "Print the summary as one JSON object on stdout.")
    var json = false

    func run() throws {
        let logger = bootstrapLogging("postcopy-guest")
        var config = GuestConfig(socketPath: socket)
        config.threads = threads
        config.seed = seed
        config.scribble = !noScribble
        config.touchShare = touch
        config.touchLogPath = touchLog
        config.reattachTimeoutNanos = UInt64(reattachTimeout * 1e9)
        config.thinkNanos = thinkUs * 1000
        config.collapse = !noCollapse
        config.measureReadsNanos = UInt64(measureTlb * 1e9)
        do {
            let summary = try GuestVMM(config: config, logger: logger).run()
            summary.lines.forEach { logger.info("\($0)") }
            if json { try printJSON(summary) }
            if !summary.verified { throw ExitCode.failure }
        } catch let exit as ExitCode {
            throw exit
        } catch {
            reportFailure("postcopy-guest", "guest failed", error)
            throw ExitCode.failure
        }
    }
}

/// "WP_ASYNC,WP_UNPOPULATED" → the features, by their kernel names.
func parseUffdFeatureNames(_ text: String) throws -> UffdFeatures {
    try text.split(separator: ",").reduce(into: UffdFeatures()) { features, name in
        guard let known = UffdFeatures.named.first(where: { $0.name == name.uppercased() }) else {
            throw ValidationError("unknown userfaultfd feature '\(name)'; known: \(UffdFeatures.named.map(\.name).joined(separator: ", "))")
        }
        features.insert(known.feature)
    }
}

struct Source: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create and fill a source RAM file, then keep writing a hot set of its pages until stopped.")

    @Option(help: ArgumentHelp("The RAM file to create (e.g. /dev/shm/NAME).", valueName: "path"))
    var ram: String

    @Option(help: "Size of guest RAM (a multiple of 2 MiB).", transform: parseSize)
    var size: UInt64

    @Option(help: "Share of pages in the hot set rewritten continuously (0…1).")
    var dirty = 0.10

    @Option(help: "Share of pages left zero (0…1).")
    var zero = 0.125

    @Option(help: "Seed of the page pattern and the hot set.")
    var seed: UInt64 = 7

    @Option(help: "Microseconds between passes over the hot set.")
    var passPause: UInt32 = 20_000

    @Option(help: ArgumentHelp("Write this file once the RAM is filled.", valueName: "path"))
    var readyFile: String?

    @Option(help: ArgumentHelp("Register the RAM mapping for uffd-wp dirty tracking and tell an agent about it on this unix socket (postcopy-push --dirty-log-socket).", valueName: "path"))
    var dirtyLogSocket: String?

    @Option(help: ArgumentHelp("Testing: act as if the kernel lacked these userfaultfd features (names as 'postcopyd check' prints them, comma-separated), to exercise the agent's fallback to hashing.", valueName: "names"),
            transform: parseUffdFeatureNames)
    var pretendAbsent: UffdFeatures = []

    func validate() throws {
        guard (0...1).contains(dirty), (0...1).contains(zero) else { throw ValidationError("--dirty and --zero are shares from 0 to 1") }
    }

    func run() throws {
        let logger = bootstrapLogging("postcopy-guest")
        let workload = try SourceWorkload(path: ram, size: size, dirtyFraction: dirty, zeroFraction: zero, seed: seed)
        logger.info("source RAM filled", metadata: [
            "path": "\(ram)", "size": "\(ByteSize.format(size))", "hot_pages": "\(workload.hotPages.count)",
        ])
        var tracking: (WriteTracking?, SourceTrackingServer)?
        if let dirtyLogSocket {
            let (registration, offer) = workload.trackWrites(pretendingAbsent: pretendAbsent)
            if registration == nil { logger.warning("\(offer)") }
            tracking = (registration, try SourceTrackingServer(path: dirtyLogSocket, offer: offer, logger: logger))
        }
        if let readyFile { try writeReadyFile(readyFile, "\(getpid())\n") }
        defer { withExtendedLifetime(tracking) {} }
        let never = Atomic<Bool>(false)
        workload.dirty(pauseMicroseconds: passPause, stop: never)
    }
}
