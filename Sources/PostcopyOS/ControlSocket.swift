import Glibc
import PostcopyCore

/// What the control socket does with a request line.
public enum ControlReply: Sendable {
    /// One reply, then the connection closes.
    case once([UInt8])
    /// Replies written by `body` on a thread of its own (`write` returns
    /// false once the client has gone); the connection closes when it
    /// returns. `body` must return once the daemon is done: `stop()`
    /// waits for it.
    case stream(@Sendable (_ write: ([UInt8]) -> Bool) -> Void)
}

/// The daemon's control socket (0600, owned by the daemon's user): one
/// request line per connection, then one reply or a stream of them, then
/// the daemon closes it. See `ControlRequest` for the protocol.
public final class ControlServer: Sendable {
    public let path: String
    private let listener: UnixListener
    private let thread: StoppableThread
    /// The threads of streaming replies, at most `maxStreams` at once.
    private let streams = Locked<[(thread: OSThread, done: Latch)]>([])
    public static let maxStreams = 8

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
    /// a request line (without its newline) into the reply. A client gets
    /// 2 s to send its line, and 2 s for each reply to be taken.
    public func start(_ reply: @escaping @Sendable ([UInt8]) -> ControlReply) throws {
        let listener = self.listener
        try thread.start(name: "postcopy-control", watching: listener.fd) { [self] in
            guard let client = try? listener.accept(),
                  (try? client.setReceiveTimeout(2_000_000_000)) != nil,
                  (try? client.setSendTimeout(2_000_000_000)) != nil,
                  let line = try? Self.readLine(client) else { return }
            switch reply(line) {
            case let .once(bytes):
                try? client.send(bytes)
            case let .stream(body):
                stream(body, to: client)
            }
        }
    }

    /// Runs `body` for `client` on a thread of its own, or refuses it when
    /// `maxStreams` already run.
    private func stream(_ body: @escaping @Sendable (([UInt8]) -> Bool) -> Void, to client: UnixConnection) {
        reapStreams()
        let running = streams.withLock { $0.count }
        guard running < Self.maxStreams else {
            try? client.send(Array("error: \(running) watchers already (the most there may be)\n".utf8))
            return
        }
        let done = Latch()
        do {
            let thread = try OSThread.start(name: "postcopy-watch") {
                defer { done.open() }
                body { bytes in (try? client.send(bytes)) != nil }
            }
            streams.withLock { $0.append((thread, done)) }
        } catch {
            try? client.send(Array("error: cannot start a thread for the reply: \(error)\n".utf8))
        }
    }

    private func reapStreams() {
        let finished = streams.withLock { streams in
            let finished = streams.filter { $0.done.opened }
            streams.removeAll { $0.done.opened }
            return finished
        }
        finished.forEach { $0.thread.join() }
    }

    /// Stops taking requests, and waits for the streaming replies to end.
    public func stop() {
        thread.stop()
        streams.withLock { streams in
            defer { streams.removeAll() }
            return streams
        }.forEach { $0.thread.join() }
    }

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

/// `postcopyctl`'s side: sends one request line and reads the whole reply,
/// or each line of a streamed one.
public enum ControlClient {
    /// Sends `request` and calls `line` with each reply line (without its
    /// newline) as it arrives, until the daemon closes the connection.
    /// `timeoutNanos` bounds the wait for each line.
    public static func stream(_ request: String, at path: String, timeoutNanos: UInt64,
                              line: ([UInt8]) throws -> Void) throws {
        let connection = try UnixConnection.connect(path: path)
        try connection.setReceiveTimeout(timeoutNanos)
        try connection.send(Array((request + "\n").utf8))
        var pending: [UInt8] = []
        while true {
            let (bytes, descriptor) = try connection.receive()
            if let descriptor { close(descriptor) }
            if bytes.isEmpty {
                if !pending.isEmpty { try line(pending) }
                return
            }
            pending.append(contentsOf: bytes)
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                try line(Array(pending[..<newline]))
                pending.removeSubrange(...newline)
            }
        }
    }

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
