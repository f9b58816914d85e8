import ArgumentParser
import Foundation
import Logging
import PostcopyCLI
import PostcopyCore
import PostcopyMigration
import PostcopyOS

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve one incoming migration: own guest RAM, take precopy pages, switch over, serve postcopy faults.",
        discussion: """
            Listens for the source agent (postcopy-push) on TCP, for the VMM on a unix socket (0600), and for \
            postcopyctl on a control socket (0600). Settings may come from a file (--config): the long options \
            below without dashes, one 'key = value' per line; the command line wins. Under systemd (Type=notify) \
            it reports READY, STATUS and WATCHDOG, logs to the journal with structured fields, and keeps guest RAM, \
            the page-state record and the userfaultfd in systemd's fd store from switchover on: restarted after a \
            crash during postcopy, it takes the migration over from them (without systemd, --takeover takes it \
            over from the VMM, which hands them back when it reattaches). Exits 0 once \
            every page is in place and the VMM has let go of the userfaultfd; 1 with the reason when the \
            migration fails or is stopped (SIGTERM, SIGINT). From the guest's resume here until the last page is \
            in place, a failure or a stop does not release the guest: the VMM gets no ERROR and keeps guest RAM \
            registered (faults on stale pages wait), and guest RAM, the page-state record and the userfaultfd \
            stay in systemd's fd store, so that a restarted postcopyd takes the migration over.
            """)

    @Option(help: ArgumentHelp("The instance's name (systemd's %i): names its sockets and tags its journal records.", valueName: "name"))
    var instance = "default"

    @Option(help: ArgumentHelp("Read settings from this file before the command line.", valueName: "path"))
    var config: String?

    @Option(help: ArgumentHelp("TCP address for the source agent (numeric host; port 0 picks a free port; default: 127.0.0.1:7070). A TCP socket systemd passes (postcopyd@.socket) is used instead.", valueName: "host:port"),
            transform: parseEndpoint)
    var listen: SocketEndpoint?

    @Option(help: ArgumentHelp("Unix socket for the VMM (default: /run/postcopyd/<instance>/vmm.sock).", valueName: "path"))
    var vmmSocket: String?

    @Option(help: ArgumentHelp("Unix socket for postcopyctl (default: /run/postcopyd/<instance>/control.sock). A unix socket systemd passes (postcopyd@.socket) is used instead.", valueName: "path"))
    var controlSocket: String?

    @Option(help: "The only uid allowed to attach as the VMM (default: this process's uid).")
    var vmmUID: UInt32 = getuid()

    @OptionGroup var memoryOptions: MemoryOptions

    @Option(help: ArgumentHelp("Create guest RAM as a file at this path, for a VMM that opens it by name (QEMU's memory-backend-file mem-path=): on a tmpfs such as /dev/shm for shmem, on a 2 MiB hugetlbfs mount for hugetlbfs. It must not exist; it is owned by --vmm-uid and removed when postcopyd exits.", valueName: "path"))
    var ramFile: String?

    @OptionGroup(title: "Transport security") var transportOptions: TransportOptions

    @Option(help: ArgumentHelp("With TLS, the identity the agent's certificate must name: a DNS name (or IP address) in its subjectAltName, or its CN.", valueName: "name"))
    var tlsClientName: String?

    @Option(help: "Size of guest RAM (e.g. 256M, 1G); must equal the source's. Required, but for a takeover.", transform: parseSize)
    var size: UInt64?

    @Flag(help: "Take over a migration whose postcopyd died during postcopy: wait (--vmm-timeout) for its VMM to reattach and hand back guest RAM, the page-state record and the userfaultfd, then serve postcopy on once the agent rejoins. Under systemd, what its fd store kept is used without this flag.")
    var takeover = false

    @Option(help: ArgumentHelp("Accept only this migration (32 hex digits); default: the first agent's.", valueName: "hex"),
            transform: parseMigrationID)
    var migrationID: MigrationID?

    @Option(help: ArgumentHelp("Admit only agents whose HELLO carries the secret in this file (64 hex digits, mode 0600); default: bind the migration to the first agent's secret.", valueName: "path"))
    var migrationSecretFile: String?

    @Option(help: "Seconds to wait at switchover for a VMM that has not attached.")
    var vmmTimeout: UInt64 = 30

    @Option(help: "Log a guest thread blocked on a stale page for longer than this many milliseconds.")
    var stallWarningMs: UInt64 = 100

    @Option(help: ArgumentHelp("Write the agent endpoint (host:port) to this file once listening.", valueName: "path"))
    var readyFile: String?

    @Option(help: ArgumentHelp("Declare the agent's connection dead after this many seconds without a frame (the agent sends HEARTBEAT every quarter of that). During postcopy this pauses the migration.", valueName: "seconds"))
    var deadPeerTimeout: Double = 5

    @Option(help: ArgumentHelp("How long a paused postcopy waits for the agent to rejoin before the migration fails.", valueName: "seconds"))
    var reconnectTimeout: Double = 600

    @OptionGroup var scheduling: BackgroundSchedulingOption

    @Option(help: ArgumentHelp("Write the postcopy phase's events (pages arrived, stale faults resolved) to this CSV file at the end.", valueName: "path"))
    var trace: String?

    @Flag(help: "Print the summary as one JSON object on stdout.")
    var json = false

    /// What a --config file may set: the options above but for instance and config.
    static let configSchema = ConfigFile.Schema(
        options: ["listen", "vmm-socket", "control-socket", "vmm-uid", "memory", "hugetlbfs-dir", "ram-file", "size",
                  "migration-id", "vmm-timeout", "stall-warning-ms", "ready-file", "trace", "background-scheduling",
                  "dead-peer-timeout", "reconnect-timeout", "tls-ca", "tls-cert", "tls-key", "tls-client-name", "migration-secret-file"],
        flags: ["json", "takeover", "insecure-plaintext"])

    func run() throws {
        guard let config else { return try serve() }
        // Parse again with the file's settings first, so the command line wins.
        let file: ConfigFile
        do {
            file = try ConfigFile(bytes: try readFileBytes(config), schema: Self.configSchema)
        } catch let error as ConfigFile.ParseError {
            throw ValidationError("\(config): \(error)")
        } catch {
            throw ValidationError("cannot read the settings file: \(error)")
        }
        let commandLine = CommandLine.arguments.drop { $0 != "serve" }.dropFirst()
        var merged = try Serve.parse(file.arguments + commandLine)
        merged.config = nil
        try merged.serve()
    }

    func validate() throws {
        if ramFile != nil, memoryOptions.hugetlbfsDir != nil {
            throw ValidationError("--ram-file and --hugetlbfs-dir both say where guest RAM lives: give one")
        }
        if !(deadPeerTimeout >= 0.1 && deadPeerTimeout <= 3600) {
            throw ValidationError("--dead-peer-timeout is seconds between 0.1 and 3600")
        }
        if !(reconnectTimeout >= 1 && reconnectTimeout <= 86_400) {
            throw ValidationError("--reconnect-timeout is seconds between 1 and 86400")
        }
    }

    private func serve() throws {
        let directory = "/run/postcopyd/\(instance)"
        let vmmSocket = self.vmmSocket ?? "\(directory)/vmm.sock"
        let controlSocket = self.controlSocket ?? "\(directory)/control.sock"
        if self.vmmSocket == nil || self.controlSocket == nil {
            try ensureDirectory(directory)
        }

        let context = LogContext()
        let logger = bootstrapLogging("postcopyd", context: context)
        let notifier = ServiceNotifier()
        let passed: PassedSockets
        do {
            passed = try PassedSockets(classifying: Systemd.passedDescriptorsDescribed(),
                                       storedNames: Set(StoredDescriptor.all))
        } catch {
            throw Self.cannotStart(error, logger, notifier)
        }
        let takeoverSource = takeoverSource(passed.stored, logger)
        guard size != nil || takeoverSource != nil else {
            throw ValidationError("the size of guest RAM is required: --size, or 'size = ...' in --config")
        }
        // Before any other thread: termination signals go to the watcher only.
        let signals = try SignalWatcher()
        let transport = try transportOptions.transport(.server, peerName: tlsClientName,
                                                       peerNameOption: "--tls-client-name", logger: logger)
        var settings = DestinationConfig(listen: listen ?? Self.defaultListen, transport: transport, vmmSocketPath: vmmSocket, memory: memoryOptions.memory,
                                         hugetlbfsDirectory: memoryOptions.hugetlbfsDir, regionSize: size ?? 0,
                                         vmmUID: vmmUID, migrationID: migrationID)
        settings.instance = instance
        settings.ramFile = ramFile
        settings.migrationSecret = try migrationSecretFile.map(SecretFile.read)
        settings.vmmAttachTimeoutNanos = vmmTimeout * 1_000_000_000
        settings.stallWarningNanos = stallWarningMs * 1_000_000
        settings.tracePath = trace
        settings.backgroundScheduling = scheduling.backgroundScheduling
        settings.deadPeerTimeoutNanos = UInt64(deadPeerTimeout * 1e9)
        settings.reconnectTimeoutNanos = UInt64(reconnectTimeout * 1e9)

        // Allocating (and on hugetlbfs reserving) guest RAM can take a while.
        notifier.extendTimeout(nanoseconds: 120_000_000_000)
        let daemon: DestinationDaemon
        let control: ControlServer
        do {
            // Sockets systemd passed (postcopyd@NAME.socket) win over binding our own.
            let agentListener = try passed.agent.map { agent in
                try inStep("use the agent's socket systemd passed") { try TCPListener(adopting: agent.fd) }
            }
            passed.notes(listen: listen?.description, controlSocket: self.controlSocket).forEach { logger.notice("\($0)") }
            daemon = try DestinationDaemon(config: settings, logger: logger, context: context, takeover: takeoverSource,
                                           descriptorStore: notifier.isActive ? notifier : nil, agentListener: agentListener)
            if let passedControl = passed.control {
                control = try inStep("use the control socket systemd passed") {
                    try ControlServer(listener: UnixListener(adopting: passedControl.fd))
                }
            } else {
                control = try inStep("listen for postcopyctl on \(controlSocket)") { try ControlServer(path: controlSocket) }
            }
        } catch {
            throw Self.cannotStart(error, logger, notifier)
        }
        // Open once the migration has ended: a watcher gets the final status.
        let ended = Latch()
        try control.start { line in Self.reply(to: line, daemon, ended: ended) }
        try signals.start { signal in
            let status = daemon.status()
            let phase = status.phase
            notifier.stopping(status: "stopping on \(signal) during \(phase)")
            if daemon.guestDependsOnDaemon {
                // Issue 18: the guest is not released; it waits for a
                // restarted postcopyd (the VMM gets no ERROR).
                logger.critical("\(signal) during \(phase): postcopyd stops WITHOUT releasing the guest: it waits on incomplete memory (\(status.stalePagesLeft) pages still stale) and its threads block on stale pages. Restart postcopyd to take the migration over, or stop the VM.")
            } else {
                logger.warning("\(signal): stopping the migration during \(phase)")
            }
            daemon.cancel("stopped by \(signal) during \(phase)")
        }
        defer {
            signals.stop()
            ended.open()
            control.stop()
        }

        let size = daemon.memory.geometry.regionSize
        logger.event(.ready, .info, "ready: \(ByteSize.format(size)) of \(daemon.memory.file.backing); agent on \(daemon.endpoint), VMM on \(vmmSocket)", [
            "listen": "\(daemon.endpoint)", "vmm_socket": "\(vmmSocket)", "control_socket": "\(control.path)",
            "memory": "\(daemon.memory.file.backing)", "region_bytes": "\(size)",
        ])
        if let readyFile { try writeReadyFile(readyFile, "\(daemon.endpoint)\n") }
        notifier.ready(status: daemon.status().statusLine)
        let supervisor = try ServiceSupervisor(daemon: daemon, notifier: notifier, logger: logger)
        try supervisor.start()
        defer { supervisor.stop() }
        do {
            let summary = try daemon.run()
            // The supervisor first: nothing (STATUS, WATCHDOG) after STOPPING.
            supervisor.stop()
            notifier.stopping(status: daemon.status().statusLine)
            summary.lines.forEach { logger.info("\($0)") }
            if json { try printJSON(summary) }
        } catch {
            supervisor.stop()
            notifier.stopping(status: daemon.status().statusLine)
            let discarded = (error as? MigrationError)?.code == .discarded
            reportFailure("postcopyd", discarded ? "migration discarded" : "migration failed", error)
            throw ExitCode.failure
        }
    }

    static let defaultListen = SocketEndpoint(host: "127.0.0.1", port: 7070)

    /// Logs why the daemon cannot start (journal and STATUS=), and prints it
    /// as a chain of causes on stderr; returns the exit status to throw.
    private static func cannotStart(_ error: any Error, _ logger: Logger, _ notifier: ServiceNotifier) -> ExitCode {
        logger.event(.migrationFailed, .critical, "cannot start: \(error)", [
            "error_code": "\(ErrorCode.internalFailure)", "reason": "cannot start: \(error)",
        ])
        notifier.stopping(status: "failed: cannot start: \(error)")
        reportFailure("postcopyd", "cannot start", error)
        return .failure
    }

    /// What to take a migration over from: what systemd's fd store kept
    /// (when it kept a page-state record), else the VMM with --takeover.
    private func takeoverSource(_ stored: [String: Int32], _ logger: Logger) -> TakeoverSource? {
        if stored[StoredDescriptor.pageState] != nil {
            logger.notice("systemd's fd store kept \(stored.keys.sorted().joined(separator: ", ")): taking the migration over")
            return .stored(stored)
        }
        if !stored.isEmpty {
            logger.warning("systemd's fd store kept \(stored.keys.sorted().joined(separator: ", ")) but no page-state record: the migration never reached postcopy, so there is nothing to take over")
            stored.values.forEach { close($0) }
        }
        return takeover ? .vmm : nil
    }

    /// The control socket's answer to one request line; `ended` opens once
    /// the migration has ended.
    static func reply(to line: [UInt8], _ daemon: DestinationDaemon, ended: Latch) -> ControlReply {
        do {
            switch try ControlRequest(line: line) {
            case .status:
                return .once(Array((try jsonLine(daemon.status()) + "\n").utf8))
            case .watch:
                return .stream { write in
                    let send = { (write: ([UInt8]) -> Bool) -> Bool in
                        guard let line = try? jsonLine(daemon.status()) else { return false }
                        return write(Array((line + "\n").utf8))
                    }
                    // A status now and each interval while the migration
                    // runs, then the final one.
                    repeat {
                        guard send(write) else { return }
                    } while !ended.wait(timeoutNanos: ControlRequest.watchIntervalNanos)
                    _ = send(write)
                }
            case .cancel:
                return .once(Array("ok: \(try daemon.cancelBeforeSwitchover())\n".utf8))
            }
        } catch {
            return .once(Array("error: \(error)\n".utf8))
        }
    }

    /// Creates the instance's runtime directory when systemd has not.
    private func ensureDirectory(_ path: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o755])
        } catch {
            throw ValidationError("cannot create \(path) for the instance's sockets: \(error.localizedDescription); pass --vmm-socket and --control-socket elsewhere")
        }
    }
}
