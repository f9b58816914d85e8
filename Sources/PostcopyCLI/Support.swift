import ArgumentParser
import Foundation
import Logging
import PostcopyCore
import PostcopyOS

// What the command-line programs share: logging set-up, argument parsing
// for sizes, endpoints and ids, JSON output, ready files.

/// Sets up logging for a program: records go to the journal when systemd
/// connected stderr to it (or POSTCOPY_LOG=journal), else to stderr
/// (POSTCOPY_LOG=stderr forces it); at info level unless POSTCOPY_LOG_LEVEL
/// says otherwise. `context` adds its fields to every journal record.
public func bootstrapLogging(_ label: String, context: LogContext? = nil) -> Logger {
    let environment = ProcessInfo.processInfo.environment
    let sink = environment["POSTCOPY_LOG"].flatMap(LogSink.init(rawValue:)) ?? .auto
    LoggingSystem.bootstrap { PostcopyLogHandler(label: $0, sink: sink, context: context) }
    var logger = Logger(label: label)
    let level = environment["POSTCOPY_LOG_LEVEL"].flatMap(Logger.Level.init(rawValue:))
    logger.logLevel = level ?? .info
    return logger
}

/// A program's last words on a failure: on stderr, `program: headline:`
/// and the error's outermost step, then a `  caused by:` line per cause,
/// down to the errno where there is one (`ErrorChain`).
public func reportFailure(_ program: String, _ headline: String?, _ error: any Error) {
    writeStandardError(ErrorChain(error).rendered(program: program, headline: headline))
}

/// `value` as one line of JSON with sorted keys (stable for scripts and tests).
public func jsonLine<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

public func printJSON<T: Encodable>(_ value: T) throws {
    print(try jsonLine(value))
}

/// Writes `text` to `path` atomically (a temporary file, then rename), so
/// a reader never sees half of it.
public func writeReadyFile(_ path: String, _ text: String) throws {
    let temporary = path + ".tmp"
    try text.write(toFile: temporary, atomically: false, encoding: .utf8)
    guard rename(temporary, path) == 0 else { throw SystemCallError("rename \(temporary) to \(path)", Errno.current) }
}

public func parseEndpoint(_ text: String) throws -> SocketEndpoint {
    guard let endpoint = SocketEndpoint(text) else {
        throw ValidationError("'\(text)' is not host:port with a numeric host (examples: 127.0.0.1:7070, [::1]:7070)")
    }
    return endpoint
}

public func parseMigrationID(_ text: String) throws -> MigrationID {
    guard let id = MigrationID(hex: text) else { throw ValidationError("'\(text)' is not 32 hex digits") }
    return id
}

public func parseSize(_ text: String) throws -> UInt64 {
    guard let size = ByteSize.parse(text) else {
        throw ValidationError("'\(text)' is not a size (examples: 4096, 64M, 1G)")
    }
    return size
}

extension MemoryKind: ExpressibleByArgument {}
extension DirtyLogChoice: ExpressibleByArgument {}

/// `--background-scheduling`, the same on both ends of a migration.
public struct BackgroundSchedulingOption: ParsableArguments {
    @Option(help: ArgumentHelp("How the background stream's threads compete for a CPU during postcopy: normal (the back-fill keeps pace with a busy guest, which then faults less), nice:N (1-19), or idle (SCHED_IDLE: only otherwise idle CPU time; each stale fault is served sooner, but a busy guest fetches most pages by faulting).", valueName: "class"),
            transform: parseScheduling)
    public var backgroundScheduling = OSThread.SchedulingClass.backgroundDefault

    public init() {}
}

/// `idle`, `normal`, or `nice:N` (N from 1 to 19).
public func parseScheduling(_ text: String) throws -> OSThread.SchedulingClass {
    switch text {
    case "idle": return .idle
    case "normal": return .normal
    default:
        if text.hasPrefix("nice:"), let nice = Int32(text.dropFirst(5)), (1...19).contains(nice) { return .background(nice: nice) }
        throw ValidationError("'\(text)' is not a scheduling class (idle, normal, or nice:N with N from 1 to 19)")
    }
}
