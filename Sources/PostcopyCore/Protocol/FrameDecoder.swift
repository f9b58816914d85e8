/// Turns a byte stream into messages, one frame at a time.
///
/// Feed it whatever the socket returned with `append`, then call `next()`
/// until it returns nil (more bytes needed). A header is checked as soon as
/// its 16 bytes are in, so a frame announcing more than `maxPayload` bytes,
/// an unknown type or a length its type does not allow is refused before any
/// of its payload is buffered; nothing is ever reserved for an announced
/// length. The checksum is checked once the whole frame is in, before the
/// payload is decoded.
///
/// The first error is final: the decoder keeps it, drops further bytes, and
/// every later `next()` throws it again. The connection is to be closed with
/// an ERROR frame (`Message.reporting(error)`).
///
/// The data of a decoded PAGES message is a slice of the decoder's buffer,
/// not a copy, so pages can be copied straight into guest memory. Drop the
/// message before the next `append`, or that append copies the buffer.
public struct FrameDecoder: Sendable {
    /// The default `maxPayload`: one PAGES frame of 1024 pages (4 MiB)
    /// and then some (64 KiB).
    public static let defaultMaxPayload = 4 << 20 + 64 << 10

    /// The largest payload a header may announce.
    public let maxPayload: Int
    /// The error that stopped the decoder, if one did.
    public private(set) var failure: ProtocolError?

    /// Received bytes; those before `readIndex` are consumed.
    private var buffer: [UInt8] = []
    private var readIndex = 0
    /// The checked header of the frame being assembled, once its bytes are in.
    private var header: FrameHeader?

    public init(maxPayload: Int = FrameDecoder.defaultMaxPayload) {
        precondition(maxPayload >= 0, "maxPayload \(maxPayload) is negative")
        self.maxPayload = maxPayload
    }

    /// Bytes received and not yet consumed by a decoded frame. Nonzero when
    /// the stream ends means the peer stopped in the middle of a frame.
    public var bufferedByteCount: Int { buffer.count - readIndex }

    /// Adds received bytes. Ignored once the decoder has failed.
    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        guard failure == nil, !bytes.isEmpty else { return }
        compact()
        buffer.append(contentsOf: bytes)
    }

    /// Adds received bytes. Ignored once the decoder has failed.
    public mutating func append(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { append($0) }
    }

    /// The next whole message, or nil when more bytes are needed.
    public mutating func next() throws(ProtocolError) -> Message? {
        if let failure { throw failure }
        do throws(ProtocolError) {
            return try decodeNext()
        } catch {
            failure = error
            buffer = []
            readIndex = 0
            header = nil
            throw error
        }
    }

    private mutating func decodeNext() throws(ProtocolError) -> Message? {
        if header == nil {
            guard bufferedByteCount >= FrameHeader.size else { return nil }
            header = try FrameHeader(parsing: buffer[readIndex..<(readIndex + FrameHeader.size)],
                                     maxPayload: maxPayload)
        }
        guard let header else { return nil }
        let frameSize = FrameHeader.size + Int(header.payloadLength)
        guard bufferedByteCount >= frameSize else { return nil }

        let payload = buffer[(readIndex + FrameHeader.size)..<(readIndex + frameSize)]
        var crc = CRC32C()
        crc.update(buffer[readIndex..<(readIndex + FrameHeader.checksummedSize)])
        crc.update(payload)
        guard crc.value == header.checksum else {
            throw .checksumMismatch(type: header.type, computed: crc.value, announced: header.checksum)
        }
        let message = try Message.decode(type: header.type, payload: payload)
        readIndex += frameSize
        self.header = nil
        return message
    }

    /// Drops consumed bytes when that is cheap overall: all of them when
    /// nothing is left over, otherwise only once the consumed bytes outnumber
    /// those left, so each byte is moved at most once on average.
    private mutating func compact() {
        if readIndex == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            readIndex = 0
        } else if readIndex >= 4096 && readIndex >= buffer.count - readIndex {
            buffer.removeSubrange(0..<readIndex)
            readIndex = 0
        }
    }
}
