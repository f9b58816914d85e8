/// The kinds of message, as the frame header's type byte names them.
///
/// 1–16 travel on the TCP connections between the source's agent and
/// postcopyd; 32–38 on the unix socket between postcopyd and the VMM, which
/// also carries ERROR and HEARTBEAT.
public enum MessageType: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case hello = 1
    case welcome = 2
    case pages = 3
    case zeroPages = 4
    case roundEnd = 5
    case dirtyBitmap = 6
    case switchover = 7
    case resumed = 8
    case pageRequest = 9
    case complete = 10
    case error = 11
    case heartbeat = 12
    case resync = 13
    case imageDigest = 14
    case handedOver = 15
    case discard = 16
    case vmmOffer = 32
    case vmmAttach = 33
    case vmmResume = 34
    case vmmComplete = 35
    case vmmHandback = 36
    case vmmReattach = 37
    case vmmResumed = 38

    /// The length rule a header's payloadLength must meet for this type,
    /// checked before any of the payload is buffered. PAGES and DIRTY_BITMAP
    /// are checked again, exactly, once their count field has arrived.
    public var allowedPayloadLength: PayloadLength {
        switch self {
        case .hello: return .exactly(64)
        case .welcome: return .exactly(12)
        case .pages: return .atLeast(16)
        case .zeroPages: return .exactly(12)
        case .roundEnd: return .exactly(20)
        case .dirtyBitmap: return .atLeast(20)
        case .switchover: return .exactly(20)
        case .resumed, .resync: return .exactly(8)
        case .pageRequest: return .exactly(16)
        case .complete: return .exactly(24)
        case .error: return .between(2, 2 + Message.maxErrorMessageBytes)
        case .heartbeat, .vmmResume, .vmmResumed, .handedOver: return .exactly(0)
        case .discard: return .between(0, Message.maxErrorMessageBytes)
        case .imageDigest: return .exactly(32)
        // 32 from the daemon (the image digest), 0 in the VMM's answer.
        case .vmmComplete: return .either(0, 32)
        case .vmmOffer: return .exactly(20)
        case .vmmAttach, .vmmReattach: return .exactly(24)
        case .vmmHandback: return .exactly(4)
        }
    }

    /// Whether a frame of this type travels with exactly one file descriptor
    /// (SCM_RIGHTS ancillary data on the VMM socket, outside the frame):
    /// VMM_OFFER carries the RAM file, VMM_ATTACH and VMM_REATTACH the
    /// userfaultfd, VMM_RESUME the page-state file for the VMM to keep, and
    /// VMM_HANDBACK what the VMM kept, back to a restarted postcopyd.
    public var carriesFileDescriptor: Bool {
        switch self {
        case .vmmOffer, .vmmAttach, .vmmResume, .vmmHandback, .vmmReattach: return true
        default: return false
        }
    }

    /// The connection this type travels on: ERROR and HEARTBEAT on both.
    public var socket: WireSocket {
        switch self {
        case .error, .heartbeat: return .either
        case .vmmOffer, .vmmAttach, .vmmResume, .vmmComplete, .vmmHandback, .vmmReattach, .vmmResumed: return .vmm
        default: return .agent
        }
    }

    /// The name the protocol document uses: `PAGE_REQUEST`, `VMM_OFFER`.
    public var description: String {
        switch self {
        case .hello: return "HELLO"
        case .welcome: return "WELCOME"
        case .pages: return "PAGES"
        case .zeroPages: return "ZERO_PAGES"
        case .roundEnd: return "ROUND_END"
        case .dirtyBitmap: return "DIRTY_BITMAP"
        case .switchover: return "SWITCHOVER"
        case .resumed: return "RESUMED"
        case .pageRequest: return "PAGE_REQUEST"
        case .complete: return "COMPLETE"
        case .error: return "ERROR"
        case .heartbeat: return "HEARTBEAT"
        case .resync: return "RESYNC"
        case .imageDigest: return "IMAGE_DIGEST"
        case .handedOver: return "HANDED_OVER"
        case .discard: return "DISCARD"
        case .vmmOffer: return "VMM_OFFER"
        case .vmmAttach: return "VMM_ATTACH"
        case .vmmResume: return "VMM_RESUME"
        case .vmmComplete: return "VMM_COMPLETE"
        case .vmmHandback: return "VMM_HANDBACK"
        case .vmmReattach: return "VMM_REATTACH"
        case .vmmResumed: return "VMM_RESUMED"
        }
    }
}

/// Which connection a message type travels on.
public enum WireSocket: Sendable, CustomStringConvertible {
    /// The TCP connections between the source's agent and postcopyd (`Message`).
    case agent
    /// The unix socket between postcopyd and the VMM (`VMMMessage`).
    case vmm
    /// Both: ERROR and HEARTBEAT.
    case either

    /// Whether a type of this socket may travel on `socket`.
    public func admits(_ socket: WireSocket) -> Bool { self == .either || self == socket }

    public var description: String {
        switch self {
        case .agent: return "an agent connection"
        case .vmm: return "the VMM socket"
        case .either: return "either connection"
        }
    }
}

/// A message of one of the two conversations, as frames carry it: the
/// agent's (`Message`) or the VMM's (`VMMMessage`). Both share the frame
/// (header, checksum, type numbers); each decodes only its own types.
public protocol WireMessage: Equatable, Sendable {
    /// The connection this conversation runs on.
    static var socket: WireSocket { get }
    /// The largest payload a frame of this conversation carries, and so the
    /// default limit of its decoder.
    static var maxPayload: Int { get }
    /// The frame type of this message.
    var type: MessageType { get }
    /// Appends the payload (no header) to `out`.
    func appendPayload(to out: inout [UInt8])
    /// Decodes the payload of a frame of `type` (one of this socket's types),
    /// whose checksum has been checked.
    static func decode(type: MessageType, payload: ArraySlice<UInt8>) throws(ProtocolError) -> Self
}

/// The 16 bytes in front of every payload. All integers little-endian.
///
///     offset  size  field
///          0     4  magic 0x59504350 (the bytes "PCPY")
///          4     1  version (5)
///          5     1  type
///          6     2  flags (0 in v1)
///          8     4  payloadLength
///         12     4  CRC32C of header bytes 0..<12, then the payload
public struct FrameHeader: Equatable, Sendable {
    public static let size = 16
    public static let magic: UInt32 = 0x5950_4350
    /// 4: the point of no return — SWITCHOVER says whether a hand-over
    /// starts the guest, HANDED_OVER and DISCARD settle it, and the VMM
    /// acknowledges VMM_RESUME with VMM_RESUMED (3: the image digest
    /// travels in IMAGE_DIGEST and VMM_COMPLETE, after the guest resumed;
    /// 2: HELLO carries the migration secret).
    public static let version: UInt8 = 5
    /// Header bytes the checksum covers: all but the checksum itself.
    public static let checksummedSize = 12

    public let type: MessageType
    public let payloadLength: UInt32
    /// The CRC32C the frame carries.
    public let checksum: UInt32

    /// Parses the 16 header bytes in `bytes` and checks everything that can
    /// be checked before the payload arrives: magic, version, flags, type
    /// (one that travels on `socket`, when given), `payloadLength` against
    /// `maxPayload` and against the type's rule.
    public init(parsing bytes: ArraySlice<UInt8>, maxPayload: Int, socket: WireSocket? = nil) throws(ProtocolError) {
        precondition(bytes.count == FrameHeader.size, "a frame header is \(FrameHeader.size) bytes")
        let magic: UInt32 = bytes.loadLittleEndian(at: 0)
        guard magic == FrameHeader.magic else { throw .badMagic(magic) }
        let version: UInt8 = bytes.loadLittleEndian(at: 4)
        guard version == FrameHeader.version else { throw .unsupportedVersion(version) }
        let flags: UInt16 = bytes.loadLittleEndian(at: 6)
        guard flags == 0 else { throw .nonzeroFlags(flags) }
        let rawType: UInt8 = bytes.loadLittleEndian(at: 5)
        guard let type = MessageType(rawValue: rawType) else { throw .unknownType(rawType) }
        if let socket, !type.socket.admits(socket) { throw .wrongSocket(type: type, received: socket) }
        let length: UInt32 = bytes.loadLittleEndian(at: 8)
        guard UInt64(length) <= UInt64(max(maxPayload, 0)) else {
            throw .payloadTooLarge(announced: length, limit: maxPayload)
        }
        guard type.allowedPayloadLength.admits(Int(length)) else {
            throw .payloadLength(type: type, actual: Int(length), expected: type.allowedPayloadLength)
        }
        self.type = type
        self.payloadLength = length
        self.checksum = bytes.loadLittleEndian(at: 12)
    }
}

extension WireMessage {
    /// Appends this message to `out` as one whole frame, checksum included.
    ///
    /// An ERROR message longer than `maxErrorMessageBytes` of UTF-8 is cut
    /// at the last whole character that fits. A PAGES message must hold a
    /// whole number of pages, at least one (a broken invariant traps).
    public func encode(into out: inout [UInt8]) {
        let start = out.count
        appendHeaderPlaceholder(type: type, to: &out)
        appendPayload(to: &out)
        let payloadLength = out.count - start - FrameHeader.size
        precondition(payloadLength <= Int(UInt32.max), "\(type) payload of \(payloadLength) bytes")
        var crc = CRC32C()
        out.withUnsafeMutableBytes { frame in
            frame.storeBytes(of: UInt32(payloadLength).littleEndian, toByteOffset: start + 8, as: UInt32.self)
            crc.update(UnsafeRawBufferPointer(rebasing: frame[start..<(start + FrameHeader.checksummedSize)]))
            crc.update(UnsafeRawBufferPointer(rebasing: frame[(start + FrameHeader.size)...]))
            frame.storeBytes(of: crc.value.littleEndian, toByteOffset: start + 12, as: UInt32.self)
        }
    }

    /// This message as one whole frame.
    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        encode(into: &out)
        return out
    }
}

extension Message {
    /// Appends a whole PAGES frame whose page bytes are copied once, straight
    /// from `pageData` (a whole number of 4096-byte pages, at least one).
    public static func encodePages(requestID: UInt32, firstPage: UInt64, pageData: UnsafeRawBufferPointer,
                                   into out: inout [UInt8]) {
        out.reserveCapacity(out.count + FrameHeader.size + pagesFieldsSize + pageData.count)
        encodePagesHead(requestID: requestID, firstPage: firstPage, pageData: pageData, into: &out)
        out.append(contentsOf: pageData)
    }

    /// Appends the first 32 bytes of a PAGES frame (header and fields), with
    /// the checksum already covering `pageData`. Sending these bytes and then
    /// `pageData` itself (with `writev`, say) sends the frame without copying
    /// the pages at all.
    public static func encodePagesHead(requestID: UInt32, firstPage: UInt64, pageData: UnsafeRawBufferPointer,
                                       into out: inout [UInt8]) {
        let count = checkedPageCount(byteCount: pageData.count)
        let start = out.count
        appendHeaderPlaceholder(type: .pages, to: &out)
        out.appendLittleEndian(requestID)
        out.appendLittleEndian(firstPage)
        out.appendLittleEndian(count)
        let payloadLength = UInt32(pagesFieldsSize + pageData.count)
        var crc = CRC32C()
        out.withUnsafeMutableBytes { frame in
            frame.storeBytes(of: payloadLength.littleEndian, toByteOffset: start + 8, as: UInt32.self)
            crc.update(UnsafeRawBufferPointer(rebasing: frame[start..<(start + FrameHeader.checksummedSize)]))
            crc.update(UnsafeRawBufferPointer(rebasing: frame[(start + FrameHeader.size)...]))
            crc.update(pageData)
            frame.storeBytes(of: crc.value.littleEndian, toByteOffset: start + 12, as: UInt32.self)
        }
    }

    /// The page count of `byteCount` bytes of page data; traps unless it is a
    /// whole number of pages, at least one, that fits a frame.
    static func checkedPageCount(byteCount: Int) -> UInt32 {
        precondition(byteCount > 0 && byteCount % Message.pageBytes == 0,
                     "PAGES data of \(byteCount) bytes is not a whole number of 4096-byte pages")
        precondition(byteCount <= Int(UInt32.max) - pagesFieldsSize, "PAGES data of \(byteCount) bytes")
        return UInt32(byteCount / Message.pageBytes)
    }
}

/// The fields of a PAGES payload before its page data: requestID, firstPage, count.
let pagesFieldsSize = 16
/// The fields of a DIRTY_BITMAP payload before its words: totalBits, firstWord, wordCount.
let bitmapFieldsSize = 20

/// Magic, version and type in place; length and checksum are patched in later.
private func appendHeaderPlaceholder(type: MessageType, to out: inout [UInt8]) {
    out.appendLittleEndian(FrameHeader.magic)
    out.appendLittleEndian(FrameHeader.version)
    out.appendLittleEndian(type.rawValue)
    out.appendLittleEndian(UInt16(0))
    out.appendLittleEndian(UInt32(0))
    out.appendLittleEndian(UInt32(0))
}

extension Array where Element == UInt8 {
    /// Appends `value`'s bytes, least significant first.
    mutating func appendLittleEndian<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }

    /// Appends every word of `words`, each least significant byte first, in
    /// one copy: a bitmap of 8 GiB of RAM is 32 768 words, which one append
    /// each made a millisecond-scale part of the switchover.
    mutating func appendLittleEndian(words: [UInt64]) {
        #if _endian(little)
        words.withUnsafeBytes { append(contentsOf: $0) }
        #else
        for word in words { appendLittleEndian(word) }
        #endif
    }
}

extension ArraySlice where Element == UInt8 {
    /// `count` little-endian 64-bit words from `offset` bytes into the
    /// slice, in one copy (see `appendLittleEndian(words:)`).
    func loadLittleEndianWords(at offset: Int, count: Int) -> [UInt64] {
        precondition(offset >= 0 && count >= 0 && offset + 8 * count <= self.count, "read past the payload")
        return [UInt64](unsafeUninitializedCapacity: count) { words, initialized in
            // SAFETY: the precondition keeps the 8 × count bytes inside the slice, and words has room for count.
            withUnsafeBytes { bytes in
                UnsafeMutableRawBufferPointer(words).copyMemory(
                    from: UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + 8 * count)]))
            }
            #if !_endian(little)
            for index in 0..<count { words[index] = UInt64(littleEndian: words[index]) }
            #endif
            initialized = count
        }
    }

    /// The little-endian integer `offset` bytes into the slice.
    func loadLittleEndian<T: FixedWidthInteger>(at offset: Int, as type: T.Type = T.self) -> T {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count, "read past the payload")
        // SAFETY: the precondition keeps the load inside the slice's bytes.
        return withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }
}
