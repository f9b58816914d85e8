import Glibc
import PostcopyCore

/// Protocol messages over the VMM's unix socket, with the file descriptor
/// that VMM_OFFER and VMM_ATTACH carry (SCM_RIGHTS).
public final class VMMChannel: @unchecked Sendable {
    // SAFETY: `decoder` and `pendingDescriptor` belong to the one receiving thread.
    public let connection: UnixConnection
    private var decoder = FrameDecoder(maxPayload: FrameDecoder.vmmMaxPayload)
    private var pendingDescriptor: Int32?

    public init(_ connection: UnixConnection) { self.connection = connection }

    deinit { if let pendingDescriptor { close(pendingDescriptor) } }

    /// Sends `message`, with `descriptor` when its type carries one.
    public func send(_ message: Message, passing descriptor: Int32? = nil) throws {
        precondition(message.type.carriesFileDescriptor == (descriptor != nil),
                     "\(message.type) \(descriptor == nil ? "needs" : "takes no") descriptor")
        try inStep("send \(message.type) to the VMM socket peer") {
            try connection.send(message.encoded(), passing: descriptor)
        }
    }

    /// The next message and the descriptor it carried (the caller owns it);
    /// nil when the peer closed the socket between frames.
    public func receive() throws -> (message: Message, descriptor: Int32?)? {
        while true {
            let next: Message?
            do throws(ProtocolError) {
                next = try decoder.next()
            } catch {
                throw ChannelError.malformed(error)
            }
            if let message = next {
                guard message.type.carriesFileDescriptor else { return (message, nil) }
                guard let descriptor = pendingDescriptor else { throw ChannelError.missingDescriptor(message.type) }
                pendingDescriptor = nil
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
