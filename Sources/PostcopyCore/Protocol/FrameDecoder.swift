/// Turns a byte stream into messages of one conversation, one frame at a
/// time: `FrameDecoder` for an agent connection's `Message`s,
/// `VMMFrameDecoder` for the VMM socket's `VMMMessage`s.
///
/// Feed it whatever the socket returned with `append`, then call `next()`
/// until it returns nil (more bytes needed). A header is checked as soon as
/// its 16 bytes are in, so a frame announcing more than `maxPayload` bytes,
/// an unknown type, a type of the other conversation or a length its type
/// does not allow is refused before any of its payload is buffered; nothing
/// is ever reserved for an announced length. The checksum is checked once
/// the whole frame is in, before the payload is decoded.
///
/// The first error is final: the decoder keeps it, drops further bytes, and
/// every later `next()` throws it again. The connection is to be closed with
/// an ERROR frame (`Message.reporting(error)`).
///
/// The data of a decoded PAGES message is a slice of the decoder's buffer,
/// not a copy, so pages can be copied straight into guest memory. Drop the
/// message before the next `append`/`receive`, or that call copies the
/// buffer. `receive` lets the socket write into that buffer directly, so a
/// page is copied once from the kernel and once into guest memory.
public struct WireDecoder<Decoded: WireMessage>: Sendable {
    /// The default `maxPayload`: the conversation's largest frame.
    public static var defaultMaxPayload: Int { Decoded.maxPayload }

    /// The largest payload a header may announce.
    public let maxPayload: Int
    /// The error that stopped the decoder, if one did.
    public private(set) var failure: ProtocolError?

    /// Received bytes are `buffer[readIndex..<writeIndex]`; those before
    /// `readIndex` are consumed, those from `writeIndex` on are room.
    private var buffer: [UInt8] = []
    private var readIndex = 0
    private var writeIndex = 0
    /// The checked header of the frame being assembled, once its bytes are in.
    private var header: FrameHeader?

    public init(maxPayload: Int = Decoded.maxPayload) {
        precondition(maxPayload >= 0, "maxPayload \(maxPayload) is negative")
        self.maxPayload = maxPayload
    }

    /// Bytes received and not yet consumed by a decoded frame. Nonzero when
    /// the stream ends means the peer stopped in the middle of a frame.
    public var bufferedByteCount: Int { writeIndex - readIndex }

    /// Adds received bytes. Ignored once the decoder has failed.
    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        guard failure == nil, !bytes.isEmpty else { return }
        _ = receive(upTo: bytes.count) { room in
            room.copyMemory(from: bytes)
            return bytes.count
        }
    }

    /// Lets `fill` write up to `count` received bytes straight into the
    /// decoder's buffer and returns how many it wrote (0: the stream ended).
    /// `fill` gets room for exactly `count` bytes and must return at most
    /// that. Once the decoder has failed, `fill` still runs (so the caller
    /// sees the end of the stream) but its bytes are dropped.
    public mutating func receive(upTo count: Int,
                                 _ fill: (UnsafeMutableRawBufferPointer) throws -> Int) rethrows -> Int {
        precondition(count > 0, "receive needs room for at least one byte")
        makeRoom(count)
        let written = try buffer.withUnsafeMutableBytes { bytes in
            try fill(UnsafeMutableRawBufferPointer(rebasing: bytes[writeIndex..<(writeIndex + count)]))
        }
        precondition((0...count).contains(written), "fill wrote \(written) bytes into room for \(count)")
        if failure == nil { writeIndex += written }
        return written
    }

    /// Adds received bytes. Ignored once the decoder has failed.
    public mutating func append(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { append($0) }
    }

    /// The next whole message, or nil when more bytes are needed.
    public mutating func next() throws(ProtocolError) -> Decoded? {
        if let failure { throw failure }
        do throws(ProtocolError) {
            return try decodeNext()
        } catch {
            failure = error
            buffer = []
            readIndex = 0
            writeIndex = 0
            header = nil
            throw error
        }
    }

    private mutating func decodeNext() throws(ProtocolError) -> Decoded? {
        if header == nil {
            guard bufferedByteCount >= FrameHeader.size else { return nil }
            header = try FrameHeader(parsing: buffer[readIndex..<(readIndex + FrameHeader.size)],
                                     maxPayload: maxPayload, socket: Decoded.socket)
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
        let message = try Decoded.decode(type: header.type, payload: payload)
        readIndex += frameSize
        self.header = nil
        return message
    }

    /// Makes room for `count` more bytes after `writeIndex`: forgets the
    /// consumed bytes when nothing is left over; otherwise moves what is left
    /// (a partial frame) to the front when the room is short and the consumed
    /// bytes outnumber those left, so each byte moves at most once on
    /// average; grows the buffer (zero-filled once) only when that is not
    /// enough. What is left is less than one frame whenever the caller
    /// receives (it received because `next()` needed more), so the buffer
    /// stays under two frames and `count`.
    private mutating func makeRoom(_ count: Int) {
        if readIndex == writeIndex {
            readIndex = 0
            writeIndex = 0
        } else if buffer.count - writeIndex < count && readIndex >= writeIndex - readIndex {
            let left = writeIndex - readIndex
            buffer.withUnsafeMutableBytes { bytes in
                bytes.baseAddress!.copyMemory(from: bytes.baseAddress! + readIndex, byteCount: left)
            }
            readIndex = 0
            writeIndex = left
        }
        if buffer.count - writeIndex < count {
            buffer.append(contentsOf: repeatElement(0, count: writeIndex + count - buffer.count))
        }
    }
}

/// The decoder of an agent connection.
public typealias FrameDecoder = WireDecoder<Message>
/// The decoder of the VMM socket.
public typealias VMMFrameDecoder = WireDecoder<VMMMessage>
