/// Why a frame or message was refused.
///
/// Every case is a reason to close the connection: the receiver sends an
/// ERROR frame with `code` and `description`, logs the same text, and writes
/// nothing to guest memory.
public enum ProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The first four bytes of a frame are not "PCPY".
    case badMagic(UInt32)
    /// The frame's version byte is not one this build speaks.
    case unsupportedVersion(UInt8)
    /// The header's flags are not zero; the protocol defines none.
    case nonzeroFlags(UInt16)
    /// The frame's type byte names no message.
    case unknownType(UInt8)
    /// A type of the other conversation: a VMM_* frame on an agent
    /// connection, or an agent's frame on the VMM socket.
    case wrongSocket(type: MessageType, received: WireSocket)
    /// The header announces a payload larger than the decoder accepts.
    case payloadTooLarge(announced: UInt32, limit: Int)
    /// The payload's length does not fit its message type.
    case payloadLength(type: MessageType, actual: Int, expected: PayloadLength)
    /// The CRC32C of the header and payload is not the one the frame carries.
    case checksumMismatch(type: MessageType, computed: UInt32, announced: UInt32)
    /// A page, word or request count is 0 where at least 1 is required.
    case zeroCount(type: MessageType)
    /// A field holds a value the protocol does not define (a stream role, an undefined flag).
    case invalidField(type: MessageType, field: String, value: UInt64)
    /// A HELLO whose bulk stream count is outside 1 … `AgentStream.maxBulkStreams`.
    case bulkStreamCount(UInt8)
    /// A HELLO naming a stream its own count does not have: a bulk stream
    /// index at or past the count, or an urgent connection's other than 0.
    case streamIndexOutOfRange(role: StreamRole, index: UInt8, bulkStreams: UInt8)
    /// A page size other than 4 KiB or 2 MiB.
    case unsupportedPageSize(type: MessageType, bytes: UInt32)
    /// An ERROR frame's message is not valid UTF-8.
    case invalidUTF8
    /// Pages `firstPage ..< firstPage + count` are not all inside the region
    /// (including when the end does not fit in 64 bits).
    case pageRangeOutOfBounds(type: MessageType, firstPage: UInt64, count: UInt64, regionPages: UInt64)
    /// A dirty bitmap whose length in bits is not the region's page count.
    case bitmapSizeMismatch(totalBits: UInt64, regionPages: UInt64)
    /// Dirty bitmap words past the end of the bitmap.
    case bitmapWordsOutOfBounds(firstWord: UInt64, wordCount: UInt64, totalBits: UInt64)
    /// A dirty bitmap's last word has bits set past `totalBits`.
    case bitmapStrayBits(totalBits: UInt64, lastWord: UInt64)

    /// The code to send back in the ERROR frame that closes the connection.
    public var code: ErrorCode {
        switch self {
        case .badMagic, .nonzeroFlags, .unknownType, .wrongSocket, .payloadTooLarge, .payloadLength, .zeroCount,
             .invalidField, .invalidUTF8, .bulkStreamCount, .streamIndexOutOfRange:
            return .protocolViolation
        case .unsupportedVersion, .unsupportedPageSize, .bitmapSizeMismatch:
            return .incompatible
        case .pageRangeOutOfBounds, .bitmapWordsOutOfBounds, .bitmapStrayBits:
            return .outOfRange
        case .checksumMismatch:
            return .checksum
        }
    }

    public var description: String {
        switch self {
        case let .badMagic(magic):
            return "bad magic \(hex32(magic)) (expected PCPY)"
        case let .unsupportedVersion(version):
            return "unsupported protocol version \(version) (this build speaks \(FrameHeader.version))"
        case let .nonzeroFlags(flags):
            return "frame flags \(hex16(flags)) are not zero (protocol version \(FrameHeader.version) defines none)"
        case let .unknownType(type):
            return "unknown message type \(type)"
        case let .wrongSocket(type, received):
            return "\(type) travels on \(type.socket), not on \(received)"
        case let .payloadTooLarge(announced, limit):
            return "frame announces \(announced) bytes, limit \(limit)"
        case let .payloadLength(type, actual, expected):
            return "\(type) payload is \(actual) bytes, expected \(expected)"
        case let .checksumMismatch(type, computed, announced):
            return "checksum mismatch on \(type) frame (computed \(hex32(computed)), frame says \(hex32(announced)))"
        case let .zeroCount(type):
            return "\(type) count is 0 (at least 1 required)"
        case let .invalidField(type, field, value):
            return "\(type) \(field) is \(value), not a value protocol version \(FrameHeader.version) defines"
        case let .bulkStreamCount(count):
            return "HELLO says the migration has \(count) bulk streams; it may have 1 to \(AgentStream.maxBulkStreams)"
        case let .streamIndexOutOfRange(.urgent, index, _):
            return "HELLO for the urgent connection names stream \(index); it must be 0"
        case let .streamIndexOutOfRange(role, index, bulkStreams):
            return "HELLO for \(role) stream \(index), but says the migration has \(bulkStreams) (0 to \(Int(bulkStreams) - 1))"
        case let .unsupportedPageSize(type, bytes):
            return "\(type) page size \(bytes) bytes is neither 4096 nor 2097152"
        case .invalidUTF8:
            return "ERROR message is not valid UTF-8"
        case let .pageRangeOutOfBounds(_, firstPage, count, regionPages):
            return "page range \(rangeText(firstPage, count)) outside the region's \(regionPages) pages"
        case let .bitmapSizeMismatch(totalBits, regionPages):
            return "dirty bitmap covers \(totalBits) pages, the region has \(regionPages)"
        case let .bitmapWordsOutOfBounds(firstWord, wordCount, totalBits):
            let words = totalBits / 64 + (totalBits % 64 == 0 ? 0 : 1)
            return "dirty bitmap words \(rangeText(firstWord, wordCount)) outside the \(words) words"
                + " of a \(totalBits)-page bitmap"
        case let .bitmapStrayBits(totalBits, lastWord):
            return "dirty bitmap sets bits past page \(totalBits) in its last word (\(hex64(lastWord)))"
        }
    }
}

/// The length a message type requires of its payload, as errors report it.
public enum PayloadLength: Equatable, Sendable, CustomStringConvertible {
    case exactly(Int)
    case atLeast(Int)
    case between(Int, Int)
    /// One of two lengths (VMM_COMPLETE: 32 bytes from the daemon, 0 from the VMM).
    case either(Int, Int)
    /// A PAGES payload: 16 bytes of fields, then `count` pages of 4096 bytes.
    case pages(count: UInt32)
    /// A DIRTY_BITMAP payload: 20 bytes of fields, then `count` words of 8 bytes.
    case bitmapWords(count: UInt32)

    /// Whether a payload of `length` bytes satisfies this rule.
    public func admits(_ length: Int) -> Bool {
        switch self {
        case let .exactly(bytes): return length == bytes
        case let .atLeast(bytes): return length >= bytes
        case let .between(low, high): return low <= length && length <= high
        case let .either(first, second): return length == first || length == second
        case let .pages(count): return UInt64(length) == 16 + UInt64(count) * 4096
        case let .bitmapWords(count): return UInt64(length) == 20 + UInt64(count) * 8
        }
    }

    public var description: String {
        switch self {
        case let .exactly(bytes): return "\(bytes)"
        case let .atLeast(bytes): return "at least \(bytes)"
        case let .between(low, high): return "\(low)...\(high)"
        case let .either(first, second): return "\(first) or \(second)"
        case let .pages(count): return "16 + \(count) × 4096 = \(16 + UInt64(count) * 4096)"
        case let .bitmapWords(count): return "20 + \(count) × 8 = \(20 + UInt64(count) * 8)"
        }
    }
}

/// The reason code of an ERROR frame.
///
/// Codes this build does not know decode to `unknown`, not to an error: a
/// newer peer may say more precisely why it is closing the connection.
public enum ErrorCode: Hashable, Sendable, CustomStringConvertible {
    /// A malformed frame: bad magic, unknown type, wrong length, bad field.
    case protocolViolation
    /// The peers cannot work together: version, page size or region size differ.
    case incompatible
    /// A page or bitmap word outside the region.
    case outOfRange
    /// A frame whose CRC32C does not match.
    case checksum
    /// A well-formed message at a point of the migration where it has no place.
    case unexpectedMessage
    /// The sender failed on its own (an I/O error, a bug).
    case internalFailure
    /// The migration was cancelled by an operator.
    case cancelled
    /// The other connection of the migration, or the VMM, went away.
    case peerLost
    /// The peer is not the migration's: a HELLO with the wrong secret.
    case refused
    /// The migration was discarded before the guest ran on the destination:
    /// the source runs it again, and the destination's copy must never run.
    case discarded
    case unknown(UInt16)

    public init(rawValue: UInt16) {
        switch rawValue {
        case 1: self = .protocolViolation
        case 2: self = .incompatible
        case 3: self = .outOfRange
        case 4: self = .checksum
        case 5: self = .unexpectedMessage
        case 6: self = .internalFailure
        case 7: self = .cancelled
        case 8: self = .peerLost
        case 9: self = .refused
        case 10: self = .discarded
        default: self = .unknown(rawValue)
        }
    }

    /// The code on the wire.
    public var rawValue: UInt16 {
        switch self {
        case .protocolViolation: return 1
        case .incompatible: return 2
        case .outOfRange: return 3
        case .checksum: return 4
        case .unexpectedMessage: return 5
        case .internalFailure: return 6
        case .cancelled: return 7
        case .peerLost: return 8
        case .refused: return 9
        case .discarded: return 10
        case let .unknown(code): return code
        }
    }

    /// Codes are equal when their wire values are: `.unknown(1)` is `.protocolViolation`.
    public static func == (a: ErrorCode, b: ErrorCode) -> Bool { a.rawValue == b.rawValue }
    public func hash(into hasher: inout Hasher) { hasher.combine(rawValue) }

    public var description: String {
        switch self {
        case .protocolViolation: return "protocol"
        case .incompatible: return "incompatible"
        case .outOfRange: return "out-of-range"
        case .checksum: return "checksum"
        case .unexpectedMessage: return "unexpected-message"
        case .internalFailure: return "internal"
        case .cancelled: return "cancelled"
        case .peerLost: return "peer-lost"
        case .refused: return "refused"
        case .discarded: return "discarded"
        case let .unknown(code): return "code \(code)"
        }
    }
}

/// `first..<end`, or `first..<(first + count overflows)` when the end does
/// not fit in 64 bits.
private func rangeText(_ first: UInt64, _ count: UInt64) -> String {
    let (end, overflow) = first.addingReportingOverflow(count)
    return overflow ? "\(first)..<(\(first) + \(count), past 2^64)" : "\(first)..<\(end)"
}

func hex16(_ value: UInt16) -> String { "0x" + hexDigits(UInt64(value), width: 4) }
func hex32(_ value: UInt32) -> String { "0x" + hexDigits(UInt64(value), width: 8) }
func hex64(_ value: UInt64) -> String { "0x" + hexDigits(value, width: 16) }

/// `value` in lower-case hex, zero-padded to `width` digits.
func hexDigits(_ value: UInt64, width: Int) -> String {
    let digits = String(value, radix: 16)
    return String(repeating: "0", count: max(0, width - digits.count)) + digits
}

/// `count` big-endian words from `bytes` (exactly `8 × count` of them).
func bigEndianWords(_ bytes: ArraySlice<UInt8>, count: Int) -> [UInt64]? {
    guard bytes.count == 8 * count else { return nil }
    return (0..<count).map { bytes.loadLittleEndian(at: 8 * $0, as: UInt64.self).byteSwapped }
}

func bigEndianBytes(_ words: [UInt64]) -> [UInt8] {
    words.flatMap { word in (0..<8).map { UInt8(truncatingIfNeeded: word >> (56 - 8 * $0)) } }
}

/// Exactly `count` bytes from `2 × count` hex digits; nil for anything else.
func bytesFromHex(_ text: String, count: Int) -> [UInt8]? {
    let digits = Array(text.utf8)
    guard digits.count == 2 * count else { return nil }
    var bytes: [UInt8] = []
    bytes.reserveCapacity(count)
    for index in stride(from: 0, to: digits.count, by: 2) {
        guard let high = hexValue(digits[index]), let low = hexValue(digits[index + 1]) else { return nil }
        bytes.append(high << 4 | low)
    }
    return bytes
}

func hexValue(_ digit: UInt8) -> UInt8? {
    switch digit {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): return digit - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): return digit - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): return digit - UInt8(ascii: "A") + 10
    default: return nil
    }
}
