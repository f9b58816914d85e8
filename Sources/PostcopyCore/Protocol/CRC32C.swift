import CCRC32C

/// CRC-32C (Castagnoli), the checksum of every protocol frame.
///
/// Reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF:
/// the CRC of iSCSI, SCTP and ext4 metadata. Computed by the CPU's own
/// instruction where it has one (SSE4.2, the AArch64 CRC extension; through
/// the CCRC32C shim), else in software, eight bytes per step
/// ("slicing-by-8") from tables built once per process. Both give the same
/// values; `Implementation` lets tests and benchmarks pick one.
///
/// A checksum can be continued: `checksum(b, seed: checksum(a))` equals the
/// checksum of `a` followed by `b`, which is how a frame's header and payload
/// are fed separately. `CRC32C` values do the same incrementally.
public struct CRC32C: Sendable {
    /// The running CRC register, before the final inversion.
    private var register: UInt32

    /// A checksum that continues from `seed`, the checksum of the bytes fed
    /// so far (0, the default, for none).
    public init(seed: UInt32 = 0) { register = ~seed }

    /// Feeds `bytes`.
    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        register = CRC32C.advance(register, over: bytes)
    }

    /// Feeds `bytes`.
    public mutating func update(_ bytes: ArraySlice<UInt8>) {
        bytes.withUnsafeBytes { update($0) }
    }

    /// The checksum of everything fed so far.
    public var value: UInt32 { ~register }

    /// The checksum of `bytes`, continuing from `seed` (the checksum of the
    /// bytes before them; 0 for none).
    public static func checksum(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        ~advance(~seed, over: bytes)
    }

    public enum Implementation: String, Sendable, CaseIterable {
        case hardware, software
    }

    /// What `checksum` uses on this CPU.
    public static let implementation: Implementation = ccrc32c_available() == 1 ? .hardware : .software

    /// The checksum of `bytes` computed by `implementation`, which must be
    /// `.software` or this CPU's `implementation`.
    public static func checksum(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0,
                                using implementation: Implementation) -> UInt32 {
        switch implementation {
        case .hardware:
            precondition(Self.implementation == .hardware, "this CPU has no CRC-32C instruction")
            return ~ccrc32c_advance(~seed, bytes.baseAddress, bytes.count)
        case .software:
            return ~advanceInSoftware(~seed, over: bytes)
        }
    }

    /// The checksum of `bytes`, continuing from `seed`.
    public static func checksum(_ bytes: [UInt8], seed: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, seed: seed) }
    }

    /// The reflected Castagnoli polynomial.
    public static let polynomial: UInt32 = 0x82F6_3B78

    /// Eight tables of 256 entries, one after another. Table 0 is the classic
    /// byte-at-a-time table; entry `i` of table `k` is the CRC of byte `i`
    /// followed by `k` zero bytes, so eight table lookups advance eight bytes.
    private static let tables: [UInt32] = {
        var tables = [UInt32](repeating: 0, count: 8 * 256)
        for byte in 0..<256 {
            var crc = UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 == 1 ? (crc >> 1) ^ polynomial : crc >> 1 }
            tables[byte] = crc
        }
        for table in 1..<8 {
            for byte in 0..<256 {
                let previous = tables[(table - 1) * 256 + byte]
                tables[table * 256 + byte] = (previous >> 8) ^ tables[Int(previous & 0xFF)]
            }
        }
        return tables
    }()

    /// Advances the (non-inverted) register over `bytes`.
    @inline(__always)
    private static func advance(_ register: UInt32, over bytes: UnsafeRawBufferPointer) -> UInt32 {
        if implementation == .hardware { return ccrc32c_advance(register, bytes.baseAddress, bytes.count) }
        return advanceInSoftware(register, over: bytes)
    }

    private static func advanceInSoftware(_ register: UInt32, over bytes: UnsafeRawBufferPointer) -> UInt32 {
        tables.withUnsafeBufferPointer { table in
            var crc = register
            var offset = 0
            let count = bytes.count
            while count - offset >= 8 {
                // SAFETY: offset + 8 <= count, so the 8-byte load is inside `bytes`.
                let word = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
                    ^ UInt64(crc)
                crc = table[7 * 256 + Int(word & 0xFF)]
                    ^ table[6 * 256 + Int((word >> 8) & 0xFF)]
                    ^ table[5 * 256 + Int((word >> 16) & 0xFF)]
                    ^ table[4 * 256 + Int((word >> 24) & 0xFF)]
                    ^ table[3 * 256 + Int((word >> 32) & 0xFF)]
                    ^ table[2 * 256 + Int((word >> 40) & 0xFF)]
                    ^ table[1 * 256 + Int((word >> 48) & 0xFF)]
                    ^ table[Int(word >> 56)]
                offset += 8
            }
            while offset < count {
                crc = table[Int((crc ^ UInt32(bytes[offset])) & 0xFF)] ^ (crc >> 8)
                offset += 1
            }
            return crc
        }
    }
}
