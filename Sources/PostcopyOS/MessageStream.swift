import Glibc
import PostcopyCore
import Synchronization

/// Protocol messages over one connection (TCP, plain or inside TLS): whole
/// frames out, decoded frames in. Sending is safe from several threads (each frame goes out
/// whole); receiving belongs to one thread.
public final class MessageStream: @unchecked Sendable {
    // SAFETY: `decoder` is used only by the receiving thread;
    // sends are serialised by `sendLock`.
    public let connection: any ByteStream
    /// Who is at the other end, for error messages ("agent bulk connection").
    public let peer: String
    private var decoder: FrameDecoder
    /// The most one receive asks the kernel for.
    private let receiveSize: Int
    private let sendLock = Lock()
    /// Bytes received, for statistics; read from any thread.
    public let bytesReceived = Atomic<UInt64>(0)

    public init(_ connection: any ByteStream, peer: String, maxPayload: Int = FrameDecoder.defaultMaxPayload,
                receiveBuffer: Int = 1 << 20) {
        self.connection = connection
        self.peer = peer
        decoder = FrameDecoder(maxPayload: maxPayload)
        receiveSize = receiveBuffer
    }

    /// The next message, blocking until it is whole; nil when the peer
    /// closed the connection between frames. A PAGES message's data is valid
    /// until the next call.
    public func receive() throws -> Message? {
        while true {
            if let message = try decoded() { return message }
            // Straight into the decoder's buffer: no copy between the socket
            // and the frame the pages are checked in.
            let count = try decoder.receive(upTo: receiveSize) { room in try connection.receive(into: room) }
            if count == 0 {
                guard decoder.bufferedByteCount == 0 else {
                    throw StreamError.truncated(peer: peer, bytes: decoder.bufferedByteCount)
                }
                return nil
            }
            bytesReceived.add(UInt64(count), ordering: .relaxed)
        }
    }

    private func decoded() throws -> Message? {
        do throws(ProtocolError) {
            return try decoder.next()
        } catch {
            throw StreamError.malformed(peer: peer, error)
        }
    }

    /// Sends one message as a whole frame.
    public func send(_ message: Message) throws {
        try sendFrame(message.encoded())
    }

    /// Sends bytes holding one or more whole frames, none interleaved with
    /// another thread's.
    public func sendFrame(_ frame: [UInt8]) throws {
        try sendLock.withLock {
            do {
                try frame.withUnsafeBytes { try connection.send($0) }
            } catch {
                throw StreamError.sendFailed(peer: peer, error)
            }
        }
    }

    /// Sends `frames`, one or more whole frames, in one go: none is
    /// interleaved with another thread's.
    public func sendFrames(_ frames: UnsafeRawBufferPointer) throws {
        try sendLock.withLock {
            do {
                try connection.send(frames)
            } catch {
                throw StreamError.sendFailed(peer: peer, error)
            }
        }
    }

    /// Sends a PAGES frame whose page bytes go straight from `pageData`.
    public func sendPages(requestID: UInt32, firstPage: UInt64, pageData: UnsafeRawBufferPointer) throws {
        var head: [UInt8] = []
        head.reserveCapacity(32)
        Message.encodePagesHead(requestID: requestID, firstPage: firstPage, pageData: pageData, into: &head)
        try sendLock.withLock {
            do {
                try head.withUnsafeBytes { try connection.send($0) }
                try connection.send(pageData)
            } catch {
                throw StreamError.sendFailed(peer: peer, error)
            }
        }
    }

    /// Sends ERROR (best effort: the connection may be gone) and shuts the
    /// connection down, waking a thread blocked in `receive`.
    public func fail(_ code: ErrorCode, _ text: String) {
        try? send(.error(code: code, message: text))
        connection.shutdown()
    }

    /// Shuts the connection down, waking a thread blocked in `receive`.
    public func shutdown() { connection.shutdown() }

    /// Stops sending only: what the peer already sent (an ERROR saying why
    /// it ended the migration) can still be received.
    public func shutdownSending() { connection.shutdownSending() }
}

/// Why a message stream stopped.
public enum StreamError: ChainedError, CustomStringConvertible {
    case malformed(peer: String, ProtocolError)
    case truncated(peer: String, bytes: Int)
    case sendFailed(peer: String, any Error)

    public var description: String {
        switch self {
        case let .malformed(peer, error): return "malformed frame from \(peer): \(error)"
        case let .truncated(peer, bytes): return "\(peer) closed the connection in the middle of a frame (\(bytes) bytes buffered)"
        case let .sendFailed(peer, error): return "send to \(peer): \(error)"
        }
    }

    public var link: String {
        switch self {
        case let .malformed(peer, _): return "malformed frame from \(peer)"
        case .truncated: return description
        case let .sendFailed(peer, _): return "send to \(peer)"
        }
    }

    public var underlying: (any Error)? {
        switch self {
        case let .malformed(_, error): return error
        case .truncated: return nil
        case let .sendFailed(_, error): return error
        }
    }

    /// The code an ERROR frame reporting this carries.
    public var code: ErrorCode {
        if case let .malformed(_, error) = self { return error.code }
        return .peerLost
    }
}
