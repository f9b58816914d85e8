import ArgumentParser
import Foundation
import PostcopyCLI
import PostcopyCore
import PostcopyOS

@main
struct Postcopyctl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "postcopyctl",
        abstract: "Inspect and control the postcopyd instances running on this host.",
        subcommands: [Status.self, Watch.self, Cancel.self])
}

/// Where instances keep their sockets (systemd's RuntimeDirectory=postcopyd/%i):
/// /run/postcopyd/INSTANCE exists while the instance runs.
let runtimeDirectory = "/run/postcopyd"
/// Where postcopyd@.socket keeps the control socket of a socket-activated
/// instance, which the daemon takes from systemd instead of binding its own;
/// it is there (and listening) while the socket unit is, running or not.
let socketUnitDirectory = "/run/postcopyd-socket"

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show an instance's phase, progress, stale pages left, fault statistics, peers and uptime.",
        discussion: "Without INSTANCE: the one instance running (an error when there are several).")

    @OptionGroup var target: InstanceOptions

    @Flag(help: "Print the daemon's status as JSON.")
    var json = false

    func run() throws {
        try reportingFailure(show)
    }

    private func show() throws {
        let path = try target.controlSocket()
        let reply: [UInt8]
        do {
            reply = try ControlClient.request(ControlRequest.status.rawValue, at: path)
        } catch {
            throw Failure("cannot ask postcopyd on \(path)", cause: error)
        }
        let text = String(decoding: reply, as: UTF8.self)
        guard !text.hasPrefix("error: ") else { throw Failure("postcopyd answered: \(text.dropFirst(7))") }
        let status: DaemonStatus
        do {
            status = try JSONDecoder().decode(DaemonStatus.self, from: Data(reply))
        } catch {
            throw Failure("postcopyd on \(path) answered something that is not a status: \(text.prefix(200))")
        }
        if json {
            try printJSON(status)
        } else {
            status.lines.forEach { print($0) }
        }
    }

    /// /run/postcopyd/INSTANCE/control.sock, or for a socket-activated
    /// instance that runs, /run/postcopyd-socket/INSTANCE/control.sock;
    /// without a name, the only instance running.
    static func controlSocket(for instance: String?) throws -> String {
        if let instance {
            switch locate(instance) {
            case let .running(path): return path
            case let .idle(path):
                throw Failure("postcopyd@\(instance) is not running: its socket unit listens on \(path), and a connection there starts it for a new migration (--socket \(path) to do that)")
            case nil: return "\(runtimeDirectory)/\(instance)/control.sock"
            }
        }
        let running = ((try? FileManager.default.contentsOfDirectory(atPath: runtimeDirectory)) ?? [])
            .sorted()
            .compactMap { name -> (String, String)? in
                guard case let .running(path) = locate(name) else { return nil }
                return (name, path)
            }
        switch running.count {
        case 0: throw Failure("no postcopyd instance is running here (no control socket under \(runtimeDirectory))")
        case 1: return running[0].1
        default: throw Failure("several instances are running (\(running.map(\.0).joined(separator: ", "))): name one")
        }
    }

    enum Located {
        case running(String)
        /// Only the socket unit's socket, and the instance is not running:
        /// a connection would start it.
        case idle(String)
    }

    /// Where `instance`'s control socket is. The daemon's own comes first;
    /// the socket unit's counts as running while the instance's runtime
    /// directory exists (systemd removes it when the service stops).
    static func locate(_ instance: String) -> Located? {
        let files = FileManager.default
        let own = "\(runtimeDirectory)/\(instance)/control.sock"
        if files.fileExists(atPath: own) { return .running(own) }
        let activated = "\(socketUnitDirectory)/\(instance)/control.sock"
        guard files.fileExists(atPath: activated) else { return nil }
        return files.fileExists(atPath: "\(runtimeDirectory)/\(instance)") ? .running(activated) : .idle(activated)
    }
}

struct Watch: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Follow an instance's migration in a live view until it ends.",
        discussion: """
            On a terminal, redraws a few lines in place (phase and QEMU's name for it, a progress bar, \
            rates, time left, faults); elsewhere prints a line when the phase changes and every 5 s. \
            Exit status 0 once the migration completed; 1 when it failed or was discarded, or when \
            postcopyd went away without saying how it ended. Without INSTANCE: the one instance running.
            """)

    @OptionGroup var target: InstanceOptions

    @Flag(help: "Print each status as a line of JSON (one every 0.5 s, the final one last).")
    var json = false

    func run() throws {
        try reportingFailure(follow)
    }

    private func follow() throws {
        let path = try target.controlSocket()
        let view = LiveView()
        var last: DaemonStatus?
        do {
            // The daemon sends a status every 0.5 s: 10 s of silence is a hung daemon.
            try ControlClient.stream(ControlRequest.watch.rawValue, at: path, timeoutNanos: 10_000_000_000) { line in
                let text = String(decoding: line, as: UTF8.self)
                guard !text.hasPrefix("error: ") else { throw Failure("postcopyd answered: \(text.dropFirst(7))") }
                let status: DaemonStatus
                do {
                    status = try JSONDecoder().decode(DaemonStatus.self, from: Data(line))
                } catch {
                    throw Failure("postcopyd on \(path) sent something that is not a status: \(text.prefix(200))")
                }
                if json { print(text); fflush(nil) } else { view.show(status.watchLines, at: monotonicNanoseconds(), final: status.hasEnded) }
                last = status
            }
        } catch let failure as Failure {
            throw failure
        } catch {
            throw Failure("lost postcopyd on \(path)\(last.map { " during \($0.phase)" } ?? "")", cause: error)
        }
        guard let last else { throw Failure("postcopyd on \(path) closed the connection without a status") }
        switch last.phase {
        case "complete": return
        case "failed", "discarded": throw ExitCode.failure
        default: throw Failure("postcopyd went away during \(last.phase) without saying how the migration ended")
        }
    }
}

struct Cancel: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Abort an instance's migration before switchover; the source keeps running the guest.",
        discussion: """
            Refused once switchover has begun: from then on the guest runs on this host and the \
            source holds the pages it still lacks, so aborting would lose them. Without INSTANCE: \
            the one instance running.
            """)

    @OptionGroup var target: InstanceOptions

    func run() throws {
        try reportingFailure {
            let path = try target.controlSocket()
            let reply: [UInt8]
            do {
                reply = try ControlClient.request(ControlRequest.cancel.rawValue, at: path)
            } catch {
                throw Failure("cannot ask postcopyd on \(path)", cause: error)
            }
            let text = String(decoding: reply, as: UTF8.self).trimmingCharacters(in: .newlines)
            guard text.hasPrefix("ok: ") else { throw Failure("postcopyd refused: \(text.dropFirst(7))") }
            print(text.dropFirst(4))
        }
    }
}

/// Which instance a command asks: its name, or its control socket.
struct InstanceOptions: ParsableArguments {
    @Argument(help: "The instance (postcopyd@INSTANCE).")
    var instance: String?

    @Option(help: ArgumentHelp("Ask the daemon on this control socket instead.", valueName: "path"))
    var socket: String?

    func controlSocket() throws -> String { try socket ?? Status.controlSocket(for: instance) }
}

/// Runs `body`; a `Failure` is reported on stderr, with its causes, with
/// exit status 1.
func reportingFailure(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let failure as Failure {
        reportFailure("postcopyctl", nil, failure)
        throw ExitCode.failure
    }
}

/// A failure to report on stderr with exit status 1 (not a usage error),
/// and the error that caused it, if any.
struct Failure: ChainedError {
    let message: String
    let cause: (any Error)?
    init(_ message: String, cause: (any Error)? = nil) {
        self.message = message
        self.cause = cause
    }

    var link: String { message }
    var underlying: (any Error)? { cause }
}
