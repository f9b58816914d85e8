import Glibc
import PostcopyCore

/// One end of the VMM's unix socket: its messages, with the file
/// descriptor five of them carry (SCM_RIGHTS), and the conversation
/// (`VMMHandshake`) every message sent and received is recorded in, so that
/// one out of turn, either way, is an error (`VMMHandshakeError`) and never
/// acted on.
public final class VMMChannel: @unchecked Sendable {
    // SAFETY: `decoder` and `pendingDescriptor` belong to the one receiving
    // thread; `handshake` is locked, as a switchover thread sends while the
    // receiving thread reads.
    public let connection: UnixConnection
    /// The end this channel speaks for.
    public let side: VMMPeer
    private var decoder = VMMFrameDecoder()
    private var pendingDescriptor: Int32?
    private let handshake: Locked<VMMHandshake>

    /// `side`'s end of `connection`, a conversation that opens as `opening`.
    public init(_ connection: UnixConnection, side: VMMPeer, opening: VMMHandshake.Opening) {
        self.connection = connection
        self.side = side
        self.handshake = Locked(VMMHandshake(opening: opening))
    }

    /// Where the conversation stands.
    public var phase: VMMHandshake.Phase { handshake.withLock { $0.phase } }

    deinit { if let pendingDescriptor { close(pendingDescriptor) } }

    /// Sends `message`, with `descriptor` when its type carries one; throws
    /// `VMMHandshakeError`, sending nothing, when it is out of turn.
    public func send(_ message: VMMMessage, passing descriptor: Int32? = nil) throws {
        precondition(message.type.carriesFileDescriptor == (descriptor != nil),
                     "\(message.type) \(descriptor == nil ? "needs" : "takes no") descriptor")
        // Recorded before it leaves, so that the answer, which may come at
        // once to the receiving thread, finds the conversation ready for it.
        try handshake.withLock { handshake throws(VMMHandshakeError) in try handshake.record(message, from: side) }
        try inStep("send \(message.type) to the VMM socket peer") {
            try connection.send(message.encoded(), passing: descriptor)
        }
    }

    /// The next message and the descriptor it carried (the caller owns it);
    /// nil when the peer closed the socket between frames. A message out of
    /// turn throws `VMMHandshakeError` (its descriptor closed).
    public func receive() throws -> (message: VMMMessage, descriptor: Int32?)? {
        while true {
            let next: VMMMessage?
            do throws(ProtocolError) {
                next = try decoder.next()
            } catch {
                throw ChannelError.malformed(error)
            }
            if let message = next {
                var descriptor: Int32?
                if message.type.carriesFileDescriptor {
                    guard let pending = pendingDescriptor else { throw ChannelError.missingDescriptor(message.type) }
                    pendingDescriptor = nil
                    descriptor = pending
                }
                do {
                    try handshake.withLock { handshake throws(VMMHandshakeError) in
                        try handshake.record(message, from: side == .daemon ? .vmm : .daemon)
                    }
                } catch {
                    if let descriptor { close(descriptor) }
                    throw error
                }
                return (message, descriptor)
            }
            let (bytes, descriptor) = try connection.receive(capacity: 4096)
            if let descriptor {
                if pendingDescriptor != nil {
                    close(descriptor)
                    throw ChannelError.unexpectedDescriptor
                }
                pendingDescriptor = descriptor
            }
            if bytes.isEmpty {
                guard decoder.bufferedByteCount == 0 else { throw ChannelError.truncated }
                return nil
            }
            decoder.append(bytes)
        }
    }

    public func shutdown() { _ = Glibc.shutdown(connection.fd, Int32(SHUT_RDWR)) }
}

public enum ChannelError: Error, CustomStringConvertible {
    case malformed(ProtocolError)
    case missingDescriptor(MessageType)
    case unexpectedDescriptor
    case truncated

    public var description: String {
        switch self {
        case let .malformed(error): return "malformed frame on the VMM socket: \(error)"
        case let .missingDescriptor(type): return "\(type) arrived without its file descriptor"
        case .unexpectedDescriptor: return "a second file descriptor arrived before the first was used"
        case .truncated: return "the VMM socket closed in the middle of a frame"
        }
    }
}
