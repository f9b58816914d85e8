import ArgumentParser
import Glibc
import PostcopyCLI
import PostcopyCore
import PostcopyMigration
import PostcopyOS

@main
struct PostcopyPush: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "postcopy-push",
        abstract: "Migrate guest RAM from a shared memory file on this host to a postcopyd: precopy, switchover, postcopy.",
        discussion: """
            Precopy sends every non-zero page, then resends pages whose contents changed (found by a \
            per-page hash scan) until few enough change, or a round or time limit. At switchover the \
            source is paused (--pause-pid and/or --pause-cmd), the stale pages are sent as a dirty \
            bitmap, and the guest resumes on the destination, which fetches stale pages on demand \
            while the rest stream in the background. If the migration fails before the destination \
            resumed, the source is resumed (SIGCONT and/or --resume-cmd). If the connections are lost \
            during postcopy, it rejoins postcopyd (retrying with backoff up to --reconnect-timeout) and \
            resends only what the destination still lacks; a restarted agent does the same with --resume.
            """)

    @Option(help: ArgumentHelp("The source guest RAM file (e.g. /dev/shm/NAME, or a file on hugetlbfs).", valueName: "path"))
    var ram: String

    @Option(help: ArgumentHelp("postcopyd's agent endpoint.", valueName: "host:port"), transform: parseEndpoint)
    var to: SocketEndpoint

    @Option(help: ArgumentHelp("The migration id (32 hex digits); default: a random one.", valueName: "hex"),
            transform: parseMigrationID)
    var migrationID: MigrationID?

    @Option(help: ArgumentHelp("Pause the source by sending this process SIGSTOP (and wait until it is stopped).", valueName: "pid"))
    var pausePID: Int32?

    @Option(help: ArgumentHelp("Pause the source by running this shell command (after --pause-pid, if both).", valueName: "command"))
    var pauseCmd: String?

    @Option(help: ArgumentHelp("Resume the source with this shell command if the migration fails before switchover completes.", valueName: "command"))
    var resumeCmd: String?

    @Option(help: ArgumentHelp("Once postcopyd has resumed the guest's memory, run this shell command to start the guest on the destination (for QEMU: migrate its device state, then 'cont' there); its time counts as downtime. Postcopy goes on if it fails; the source stays paused.", valueName: "command"))
    var resumedCmd: String?

    @Flag(help: "Switch over without pausing anything: only for a source image nothing writes any more.")
    var noPause = false

    @Option(help: ArgumentHelp("The source QEMU's QMP socket: pause, resume and hand over through it, over one connection opened before precopy, with no process started at switchover; the source stays resumable until the destination QEMU has loaded the device state. Needs --qmp-migrate-uri. With --resume: finishes the hand-over the agent before began.", valueName: "path"))
    var qmp: String?

    @Option(help: ArgumentHelp("With --qmp: where the source QEMU sends its device state, the URI of the destination QEMU's migrate-incoming (e.g. unix:/run/vm42/incoming.sock or tcp:HOST:PORT).", valueName: "uri"))
    var qmpMigrateUri: String?

    @Option(help: "Precopy rounds at most, the first full pass included.")
    var maxRounds = 5

    @Option(help: "Precopy seconds at most: a round still under way then stops, and the pages it did not reach are left to postcopy.")
    var maxPrecopySeconds: UInt64 = 120

    @Option(help: "Switch over once a round resends at most this many pages.")
    var switchoverPages: UInt64 = 256

    @Option(help: ArgumentHelp("Bulk connections to postcopyd, 1 to 8: precopy and the postcopy back-fill are spread over them, each with its share of the pages (2 MiB chunks in turn) and a thread on each side; page requests keep a connection of their own. A --resume must give the first agent's count. Default: the CPUs online, at most 8.", valueName: "n"))
    var streams: Int = AgentConfig.defaultStreams

    @Option(help: ArgumentHelp("Limit precopy to this many MiB/s over all its rounds, as QEMU's max-bandwidth does (default: no limit). The switchover and postcopy are not held back by it.", valueName: "MiB/s"))
    var maxBandwidth: Double?

    @Option(help: ArgumentHelp("Limit the background stream during postcopy to this many MiB/s (default: no limit). Pages the destination asks for are never held back.", valueName: "MiB/s"))
    var postcopyBandwidth: Double?

    @OptionGroup var scheduling: BackgroundSchedulingOption

    @OptionGroup(title: "Transport security") var transportOptions: TransportOptions

    @Option(help: ArgumentHelp("The identity postcopyd's certificate must name (a DNS name or an IP address in its subjectAltName); default: the host of --to.", valueName: "name"))
    var tlsServerName: String?

    @Option(help: ArgumentHelp("The migration secret (64 hex digits, mode 0600) that binds the migration to this agent; created with a fresh secret when missing. A --resume needs the file the first agent used. Default: a fresh secret kept in memory only.", valueName: "path"))
    var migrationSecretFile: String?

    @Option(help: ArgumentHelp("A dirty log kept by the caller, read at switchover and merged with the scan (one bit per 4 KiB page, little-endian 64-bit words).", valueName: "path"))
    var dirtyBitmap: String?

    @Option(help: ArgumentHelp("How precopy finds the pages that changed: 'uffd-wp' reads the source VMM's write log (Linux ≥ 6.7; the VMM registers its RAM mapping and offers the log on --dirty-log-socket), 'hash' hashes every page each round, 'auto' takes uffd-wp when offered and otherwise hashes, saying why.", valueName: "auto|uffd-wp|hash"))
    var dirtyLog = DirtyLogChoice.auto

    @Option(help: ArgumentHelp("The source VMM's dirty-log socket (postcopy-guest source --dirty-log-socket, or POSTCOPY_SOURCE_SOCKET of libpostcopy-vmm.so in the source QEMU).", valueName: "path"))
    var dirtyLogSocket: String?

    @Flag(help: "Testing and debugging: after each scan of the uffd-wp log, also hash every page, and fail the migration, naming them, if the log missed a page that changed.")
    var verifyDirtyLog = false

    @Flag(help: "Rejoin a postcopy phase already under way (after the agent that started it died): no precopy, no pause; send what postcopyd still lacks. Needs the same --migration-id and --ram.")
    var resume = false

    @Option(help: ArgumentHelp("Declare postcopyd dead after this many seconds without a frame from it (it sends HEARTBEAT every quarter of that).", valueName: "seconds"))
    var deadPeerTimeout: Double = 5

    @Option(help: ArgumentHelp("After losing postcopyd during postcopy, keep trying to rejoin for this many seconds (backoff 0.1 s doubling to 2 s).", valueName: "seconds"))
    var reconnectTimeout: Double = 600

    @Flag(help: "No progress display.")
    var quiet = false

    @Flag(help: "Print the summary as one JSON object on stdout.")
    var json = false

    func validate() throws {
        if resume && migrationID == nil {
            throw ValidationError("--resume rejoins a migration under way: give its --migration-id")
        }
        if !(deadPeerTimeout >= 0.1 && deadPeerTimeout <= 3600) {
            throw ValidationError("--dead-peer-timeout is seconds between 0.1 and 3600")
        }
        if !(reconnectTimeout >= 0 && reconnectTimeout <= 86_400) {
            throw ValidationError("--reconnect-timeout is seconds between 0 and 86400")
        }
        if pausePID == nil && pauseCmd == nil && qmp == nil && !noPause && !resume {
            throw ValidationError("say how to pause the source at switchover: --qmp, --pause-pid, --pause-cmd, or --no-pause")
        }
        if qmp != nil {
            if qmpMigrateUri == nil && !resume {
                throw ValidationError("--qmp needs --qmp-migrate-uri: where the device state goes")
            }
            if pausePID != nil || pauseCmd != nil || resumeCmd != nil || resumedCmd != nil || noPause {
                throw ValidationError("--qmp pauses, resumes and hands over by itself: drop --pause-pid, --pause-cmd, --resume-cmd, --resumed-cmd and --no-pause")
            }
        } else if qmpMigrateUri != nil {
            throw ValidationError("--qmp-migrate-uri goes with --qmp")
        }
        if noPause && (pausePID != nil || pauseCmd != nil) {
            throw ValidationError("--no-pause contradicts --pause-pid/--pause-cmd")
        }
        if maxRounds < 1 { throw ValidationError("--max-rounds must be at least 1") }
        if !(1...AgentStream.maxBulkStreams).contains(streams) {
            throw ValidationError("--streams is a number of bulk connections from 1 to \(AgentStream.maxBulkStreams), not \(streams)")
        }
        if dirtyLog == .uffdWP && dirtyLogSocket == nil {
            throw ValidationError("--dirty-log uffd-wp reads the source VMM's write log: give its --dirty-log-socket")
        }
        if noPause && resumedCmd != nil {
            throw ValidationError("--no-pause contradicts --resumed-cmd: a source nothing pauses has no guest to hand over")
        }
        for (option, value) in [("--max-bandwidth", maxBandwidth), ("--postcopy-bandwidth", postcopyBandwidth)] {
            if let value, !(value > 0) || value > 1e6 {
                throw ValidationError("\(option) is MiB/s above 0 (and at most 1000000)")
            }
        }
    }

    func run() throws {
        let logger = bootstrapLogging("postcopy-push")
        let transport = try transportOptions.transport(.client, peerName: tlsServerName ?? to.host,
                                                       peerNameOption: "--tls-server-name", logger: logger)
        let qmpControl = try qmp.map { path in
            try inStep("open QMP to the source QEMU") {
                try QMPSourceControl(socketPath: path, migrateURI: qmpMigrateUri ?? "", logger: logger, rejoining: resume)
            }
        }
        var config = AgentConfig(ramPath: ram, daemon: to, transport: transport,
                                 migrationID: migrationID ?? MigrationID.random(),
                                 control: qmpControl?.control ?? sourceControl())
        config.policy = PrecopyPolicy(maxRounds: maxRounds, maxDurationNanos: maxPrecopySeconds * 1_000_000_000,
                                      switchoverPages: switchoverPages)
        config.dirtyBitmapPath = dirtyBitmap
        config.dirtyLog = dirtyLog
        config.dirtyLogSocket = dirtyLogSocket
        config.verifyDirtyLog = verifyDirtyLog
        config.streams = streams
        config.precopyBytesPerSecond = maxBandwidth.map { UInt64($0 * 1_048_576) }
        config.postcopyBytesPerSecond = postcopyBandwidth.map { UInt64($0 * 1_048_576) }
        config.backgroundScheduling = scheduling.backgroundScheduling
        config.resume = resume
        if let migrationSecretFile {
            let (secret, created) = try SecretFile.readOrCreate(migrationSecretFile)
            config.secret = secret
            if created { logger.info("wrote a fresh migration secret to \(migrationSecretFile)") }
        } else if resume {
            throw ValidationError("--resume needs --migration-secret-file: the secret the agent that started the migration used")
        }
        config.deadPeerTimeoutNanos = UInt64(deadPeerTimeout * 1e9)
        config.reconnectTimeoutNanos = UInt64(reconnectTimeout * 1e9)
        do {
            let agent = try SourceAgent(config: config, logger: logger, progress: ProgressReporter(enabled: !quiet))
            var summary = try agent.run()
            summary.guestPauseMs = qmpControl?.guestPauseMs
            summary.lines.forEach { logger.info("\($0)") }
            if json { try printJSON(summary) }
        } catch {
            reportFailure("postcopy-push", "migration failed", error)
            throw ExitCode.failure
        }
    }

    private func sourceControl() -> SourceControl {
        if noPause { return SourceControl("nothing to pause", pause: {}, resume: {}) }
        let pid = pausePID
        let pauseCommand = pauseCmd
        let resumeCommand = resumeCmd
        let parts = [pid.map { "SIGSTOP pid \($0)" }, pauseCommand.map { "'\($0)'" }].compactMap { $0 }
        let handOver = resumedCmd.map { command in
            (description: "'\(command)'", run: { @Sendable in
                try ProcessPause.run(command: command, timeoutNanoseconds: 300_000_000_000)
            })
        }
        return SourceControl(parts.joined(separator: " + "), pause: {
            if let pid { try ProcessPause.stop(pid: pid, timeoutNanoseconds: 10_000_000_000) }
            if let pauseCommand { try ProcessPause.run(command: pauseCommand, timeoutNanoseconds: 60_000_000_000) }
        }, resume: {
            if let resumeCommand { try ProcessPause.run(command: resumeCommand, timeoutNanoseconds: 60_000_000_000) }
            if let pid { try ProcessPause.resume(pid: pid) }
        }, handOver: handOver)
    }
}
