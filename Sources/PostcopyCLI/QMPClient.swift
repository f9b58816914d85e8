import Foundation
import PostcopyCore
import PostcopyOS

/// A QMP connection to a QEMU (its `-qmp unix:PATH,server=on` socket):
/// JSON objects, one per line, a command at a time. Asynchronous events in
/// between are skipped. Safe from several threads: one command runs at a
/// time.
public final class QMPClient: Sendable {
    public let path: String
    private let state: Locked<Connection>
    private let receiveTimeoutNanos: UInt64

    private final class Connection {
        let socket: UnixConnection
        var buffer: [UInt8] = []
        /// The statuses of MIGRATION events not yet waited for, in order.
        var migrationEvents: [String] = []
        init(_ socket: UnixConnection) { self.socket = socket }

        /// Keeps what `waitForMigration` needs of an asynchronous event.
        func note(event message: [String: Any]) {
            guard message["event"] as? String == "MIGRATION",
                  let status = (message["data"] as? [String: Any])?["status"] as? String else { return }
            migrationEvents.append(status)
        }
    }

    /// Connects, reads the greeting and leaves capabilities negotiation
    /// (`qmp_capabilities`), so that commands can follow.
    public init(path: String, timeoutNanos: UInt64 = 10_000_000_000) throws {
        self.path = path
        receiveTimeoutNanos = timeoutNanos
        let socket = try inStep("connect to QMP at \(path)") { try UnixConnection.connect(path: path) }
        try socket.setReceiveTimeout(timeoutNanos)
        let connection = Connection(socket)
        state = Locked(connection)
        let greeting = try Self.message(connection, path: path)
        guard greeting["QMP"] != nil else { throw QMPError(path: path, "not a QMP socket: it greeted with \(greeting)") }
        _ = try execute("qmp_capabilities")
    }

    /// Runs `command` and returns its "return" value; QEMU's error, if any,
    /// is thrown with its class and text.
    @discardableResult
    public func execute(_ command: String, _ arguments: [String: Any]? = nil) throws -> Any {
        var request: [String: Any] = ["execute": command]
        if let arguments { request["arguments"] = arguments }
        let line = try JSONSerialization.data(withJSONObject: request) + Data("\n".utf8)
        return try state.withLock { connection in
            try connection.socket.send(Array(line))
            while true {
                let message = try Self.message(connection, path: path)
                if message["event"] != nil {
                    connection.note(event: message)
                    continue
                }
                if let error = message["error"] as? [String: Any] {
                    throw QMPError(path: path, "\(command): \(error["class"] ?? "error"): \(error["desc"] ?? "")")
                }
                guard let answer = message["return"] else {
                    throw QMPError(path: path, "\(command): an answer with neither return nor error: \(message)")
                }
                return answer
            }
        }
    }

    /// The `status` of `query-migrate` ("none" before any migration).
    public func migrationStatus() throws -> String {
        (try execute("query-migrate") as? [String: Any])?["status"] as? String ?? "none"
    }

    /// The `status` of `query-status`: "running", "paused", "finish-migrate", …
    public func runStatus() throws -> String {
        guard let status = (try execute("query-status") as? [String: Any])?["status"] as? String else {
            throw QMPError(path: path, "query-status answered without a status")
        }
        return status
    }

    /// Waits for a MIGRATION event (QEMU sends them once the `events`
    /// migration capability is on) whose status is one of `wanted`, and
    /// returns it; one of `failed`, or `timeoutNanos` without either, throws.
    /// Events that arrived during earlier commands count, oldest first, so
    /// a status reached while the command that caused it ran is not lost.
    public func waitForMigration(_ wanted: Set<String>, failing failed: Set<String>, timeoutNanos: UInt64,
                                 _ what: String) throws -> String {
        let deadline = monotonicNanoseconds() + timeoutNanos
        return try state.withLock { connection in
            while true {
                while !connection.migrationEvents.isEmpty {
                    let status = connection.migrationEvents.removeFirst()
                    if wanted.contains(status) { return status }
                    if failed.contains(status) { throw QMPError(path: path, "\(what): QEMU says '\(status)'") }
                }
                let now = monotonicNanoseconds()
                guard now < deadline else {
                    throw QMPError(path: path, "\(what): no MIGRATION event with status \(wanted.sorted().joined(separator: " or ")) within \(timeoutNanos / 1_000_000_000) s")
                }
                try connection.socket.setReceiveTimeout(deadline - now)
                defer { try? connection.socket.setReceiveTimeout(receiveTimeoutNanos) }
                let message: [String: Any]
                do {
                    message = try Self.message(connection, path: path)
                } catch let error as SystemCallError where error.errno == .again {
                    continue
                }
                connection.note(event: message)
            }
        }
    }

    /// Forgets MIGRATION events seen so far (before starting a migration).
    public func discardMigrationEvents() { state.withLock { $0.migrationEvents.removeAll() } }

    /// Polls `query` (every 0.5 ms at first, backing off to 10 ms) until it
    /// returns one of `wanted`; one of `failed`, or `timeoutNanos`, throws.
    public func wait(for wanted: Set<String>, failing failed: Set<String> = [], timeoutNanos: UInt64,
                     _ what: String, _ query: () throws -> String) throws -> String {
        let deadline = monotonicNanoseconds() + timeoutNanos
        var delay: UInt64 = 500_000
        while true {
            let status = try query()
            if wanted.contains(status) { return status }
            if failed.contains(status) { throw QMPError(path: path, "\(what): QEMU says '\(status)'") }
            guard monotonicNanoseconds() < deadline else {
                throw QMPError(path: path, "\(what): still '\(status)' after \(timeoutNanos / 1_000_000_000) s")
            }
            sleepNanoseconds(delay)
            delay = min(delay * 2, 10_000_000)
        }
    }

    /// The next whole JSON object from QEMU.
    private static func message(_ connection: Connection, path: String) throws -> [String: Any] {
        while true {
            if let newline = connection.buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Data(connection.buffer[..<newline])
                connection.buffer.removeSubrange(...newline)
                let trimmed = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                if trimmed.isEmpty { continue }
                guard let object = try? JSONSerialization.jsonObject(with: Data(trimmed.utf8)) as? [String: Any] else {
                    throw QMPError(path: path, "not a JSON object: \(trimmed.prefix(200))")
                }
                return object
            }
            let (bytes, _) = try connection.socket.receive(capacity: 65536)
            guard !bytes.isEmpty else { throw QMPError(path: path, "QEMU closed the QMP socket") }
            guard connection.buffer.count + bytes.count <= 16 << 20 else {
                throw QMPError(path: path, "a QMP message longer than 16 MiB")
            }
            connection.buffer += bytes
        }
    }
}

/// QEMU refused a command, or the QMP conversation went wrong.
public struct QMPError: Error, CustomStringConvertible {
    public let path: String
    public let reason: String
    init(path: String, _ reason: String) {
        self.path = path
        self.reason = reason
    }
    public var description: String { "QMP \(path): \(reason)" }
}
