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
            Listens for the source agent (postcopy-push) on TCP and for the VMM on a unix socket (0600). \
            Exits 0 once every page is in place and the VMM has let go of the userfaultfd; 1 with the \
            reason when the migration fails.
            """)

    @Option(help: ArgumentHelp("TCP address for the source agent (numeric host; port 0 picks a free port).", valueName: "host:port"),
            transform: parseEndpoint)
    var listen = SocketEndpoint(host: "127.0.0.1", port: 7070)

    @Option(help: ArgumentHelp("Unix socket for the VMM.", valueName: "path"))
    var vmmSocket = "/run/postcopyd/postcopyd.sock"

    @Option(help: "The only uid allowed to attach as the VMM (default: this process's uid).")
    var vmmUID: UInt32 = getuid()

    @OptionGroup var memoryOptions: MemoryOptions

    @Option(help: "Size of guest RAM (e.g. 256M, 1G); must equal the source's.", transform: parseSize)
    var size: UInt64

    @Option(help: ArgumentHelp("Accept only this migration (32 hex digits); default: the first agent's.", valueName: "hex"),
            transform: parseMigrationID)
    var migrationID: MigrationID?

    @Option(help: "Seconds to wait at switchover for a VMM that has not attached.")
    var vmmTimeout: UInt64 = 30

    @Option(help: ArgumentHelp("Write the agent endpoint (host:port) to this file once listening.", valueName: "path"))
    var readyFile: String?

    @Flag(help: "Print the summary as one JSON object on stdout.")
    var json = false

    func run() throws {
        let logger = bootstrapLogging("postcopyd")
        var config = DestinationConfig(listen: listen, vmmSocketPath: vmmSocket, memory: memoryOptions.memory,
                                       hugetlbfsDirectory: memoryOptions.hugetlbfsDir, regionSize: size,
                                       vmmUID: vmmUID, migrationID: migrationID)
        config.vmmAttachTimeoutNanos = vmmTimeout * 1_000_000_000
        let daemon: DestinationDaemon
        do {
            daemon = try DestinationDaemon(config: config, logger: logger)
        } catch {
            logger.critical("cannot start: \(error)")
            throw ExitCode.failure
        }
        logger.info("listening", metadata: [
            "agent": "\(daemon.endpoint)", "vmm_socket": "\(vmmSocket)", "memory": "\(daemon.memory.file.backing)",
            "size": "\(ByteSize.format(size))",
        ])
        if let readyFile { try writeReadyFile(readyFile, "\(daemon.endpoint)\n") }
        do {
            let summary = try daemon.run()
            summary.lines.forEach { logger.info("\($0)") }
            if json { try printJSON(summary) }
        } catch {
            throw ExitCode.failure
        }
    }
}
