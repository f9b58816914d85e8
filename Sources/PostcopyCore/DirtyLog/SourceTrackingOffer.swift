/// What a source VMM tells the agent about write tracking of its guest RAM,
/// over the unix socket both are given (`postcopy-guest source
/// --dirty-log-socket`, or `POSTCOPY_SOURCE_SOCKET` for the preload
/// adapter): either the address range of its RAM mapping, registered with
/// userfaultfd for asynchronous write-protect, or why it could not register.
///
/// The pid to scan is not in the message: the agent takes it from the
/// socket's peer credentials, which the kernel vouches for.
///
/// Layout, little-endian (docs/protocol.md, "The source VMM's offer"):
///
///     offset size  field
///          0    4  magic "PCWP"
///          4    2  version (1)
///          6    2  status: 0 armed, 1 unavailable
///          8    8  address of the mapping (armed), else 0
///         16    8  length in bytes (armed), else 0
///         24    2  reason length in bytes (unavailable), at most 1024
///         26    …  reason, UTF-8
public enum SourceTrackingOffer: Equatable, Sendable, CustomStringConvertible {
    /// The mapping [address, address+length) is registered for
    /// asynchronous write-protect by the process on the other end.
    case armed(address: UInt64, length: UInt64)
    /// The VMM could not register its mapping; the reason says why (kernel
    /// too old, a feature missing, …).
    case unavailable(reason: String)

    public static let magic: [UInt8] = Array("PCWP".utf8)
    public static let version: UInt16 = 1
    public static let headerSize = 26
    public static let maxReasonBytes = 1024
    /// The longest message there is, for a receive buffer.
    public static let maxSize = headerSize + maxReasonBytes

    public var encoded: [UInt8] {
        var out = SourceTrackingOffer.magic
        out.appendLittleEndian(SourceTrackingOffer.version)
        switch self {
        case let .armed(address, length):
            out.appendLittleEndian(UInt16(0))
            out.appendLittleEndian(address)
            out.appendLittleEndian(length)
            out.appendLittleEndian(UInt16(0))
        case let .unavailable(reason):
            let text = Array(reason.utf8.prefix(SourceTrackingOffer.maxReasonBytes))
            out.appendLittleEndian(UInt16(1))
            out.appendLittleEndian(UInt64(0))
            out.appendLittleEndian(UInt64(0))
            out.appendLittleEndian(UInt16(text.count))
            out.append(contentsOf: text)
        }
        return out
    }

    public var description: String {
        switch self {
        case let .armed(address, length): "guest RAM 0x\(String(address, radix: 16))+\(length) is registered for uffd-wp"
        case let .unavailable(reason): "no uffd-wp tracking: \(reason)"
        }
    }

    /// Decodes one whole message; every field is checked.
    public init(decoding bytes: [UInt8]) throws(SourceTrackingOfferError) {
        guard bytes.count >= SourceTrackingOffer.headerSize else { throw .truncated(bytes.count) }
        guard Array(bytes[0..<4]) == SourceTrackingOffer.magic else { throw .badMagic }
        let version: UInt16 = bytes[...].loadLittleEndian(at: 4)
        guard version == SourceTrackingOffer.version else { throw .unsupportedVersion(version) }
        let status: UInt16 = bytes[...].loadLittleEndian(at: 6)
        let address: UInt64 = bytes[...].loadLittleEndian(at: 8)
        let length: UInt64 = bytes[...].loadLittleEndian(at: 16)
        let reasonLength = Int(bytes[...].loadLittleEndian(at: 24) as UInt16)
        guard reasonLength <= SourceTrackingOffer.maxReasonBytes,
              bytes.count == SourceTrackingOffer.headerSize + reasonLength else {
            throw .badLength(bytes.count, reasonLength: reasonLength)
        }
        switch status {
        case 0:
            guard reasonLength == 0 else { throw .badLength(bytes.count, reasonLength: reasonLength) }
            guard length > 0, address % 4096 == 0, length % 4096 == 0, address <= UInt64.max - length else {
                throw .badRange(address: address, length: length)
            }
            self = .armed(address: address, length: length)
        case 1:
            guard address == 0, length == 0 else { throw .badRange(address: address, length: length) }
            self = .unavailable(reason: String(decoding: bytes[SourceTrackingOffer.headerSize...], as: UTF8.self))
        default:
            throw .unknownStatus(status)
        }
    }
}

/// A source VMM's offer that cannot be decoded.
public enum SourceTrackingOfferError: Error, Equatable, CustomStringConvertible {
    case truncated(Int)
    case badMagic
    case unsupportedVersion(UInt16)
    case unknownStatus(UInt16)
    case badLength(Int, reasonLength: Int)
    case badRange(address: UInt64, length: UInt64)

    public var description: String {
        switch self {
        case let .truncated(count):
            return "the source VMM's offer is \(count) bytes, shorter than its \(SourceTrackingOffer.headerSize)-byte header"
        case .badMagic: return "the source VMM's offer does not start with \"PCWP\""
        case let .unsupportedVersion(version):
            return "the source VMM's offer has version \(version); this agent speaks \(SourceTrackingOffer.version)"
        case let .unknownStatus(status): return "the source VMM's offer has an unknown status \(status)"
        case let .badLength(count, reasonLength):
            return "the source VMM's offer is \(count) bytes with a \(reasonLength)-byte reason, which do not add up"
        case let .badRange(address, length):
            return "the source VMM's offer names the range 0x\(String(address, radix: 16))+\(length), which is not a whole number of 4 KiB pages"
        }
    }
}
