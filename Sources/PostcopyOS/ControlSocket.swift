import Glibc
import PostcopyCore

/// The daemon's control socket (0600, owned by the daemon's user): one
/// request line per connection, one reply, then the daemon closes it. See
/// `ControlRequest` for the protocol.
public final class ControlServer: Sendable {
    public let path: String
    private let listener: UnixListener
    private let thread: StoppableThread

    public convenience init(path: String) throws {
        try self.init(listener: UnixListener(path: path, mode: 0o600))
    }

    /// Serves on `listener`: one bound here, or the control socket of
    /// `postcopyd@NAME.socket` that systemd passed (adopted).
    public init(listener: UnixListener) throws {
        self.listener = listener
        thread = try StoppableThread()
        path = listener.path
    }

    deinit { stop() }

    /// Serves requests on a thread of its own until `stop()`: `reply` turns
    /// a request line (without its newline) into the reply's bytes. A
    /// client gets 2 s to send its line.
    public func start(_ reply: @escaping @Sendable ([UInt8]) -> [UInt8]) throws {
        let listener = self.listener
        try thread.start(name: "postcopy-control", watching: listener.fd) {
            guard let client = try? listener.accept(),
                  (try? client.setReceiveTimeout(2_000_000_000)) != nil,
                  let line = try? Self.readLine(client) else { return }
            try? client.send(reply(line))
        }
    }

    public func stop() { thread.stop() }

    /// The bytes before the first newline (or end of stream), at most one
    /// more than a request may have, so that a long line is refused whole.
    static func readLine(_ connection: UnixConnection) throws -> [UInt8] {
        var line: [UInt8] = []
        while line.count <= ControlRequest.maxLength {
            let (bytes, descriptor) = try connection.receive(capacity: ControlRequest.maxLength + 1 - line.count + 1)
            if let descriptor { close(descriptor) }
            if bytes.isEmpty { break }
            if let newline = bytes.firstIndex(of: UInt8(ascii: "\n")) {
                line.append(contentsOf: bytes[..<newline])
                return line
            }
            line.append(contentsOf: bytes)
        }
        return line
    }
}

/// `postcopyctl`'s side: sends one request line and reads the whole reply.
public enum ControlClient {
    public static func request(_ request: String, at path: String,
                               timeoutNanos: UInt64 = 5_000_000_000) throws -> [UInt8] {
        let connection = try UnixConnection.connect(path: path)
        try connection.setReceiveTimeout(timeoutNanos)
        try connection.send(Array((request + "\n").utf8))
        var reply: [UInt8] = []
        while true {
            let (bytes, descriptor) = try connection.receive()
            if let descriptor { close(descriptor) }
            if bytes.isEmpty { return reply }
            reply.append(contentsOf: bytes)
        }
    }
}
