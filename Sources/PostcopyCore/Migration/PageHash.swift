/// A fast 64-bit hash of one page's bytes, used by the source agent to find pages that changed since they were sent (hash scan), and to build the image digest. Not cryptographic; collision probability for distinct pages ~2^-64.
///
/// Four independent 64-bit lanes each take one little-endian word of every
/// 32-byte stripe, so their multiplies overlap in the CPU. A lane's step
/// `acc = rotl(acc + word * P2, 31) * P1` is a bijection of `acc` for a fixed
/// word, and of the word for a fixed `acc`; the lanes are then merged in
/// order, each through a bijection, and the length and a final avalanche are
/// folded in. So two inputs of the same length that differ in a single 8-byte
/// word always hash differently. Lanes start from distinct seeds and merge
/// in a fixed order, and a step does not commute with the next, so swapping
/// words between lanes or between stripes changes the hash (with the same
/// ~2^-64 exception as any other change).
///
/// The hash is a fixed function of the bytes, the same on every host: it may
/// be compared across machines and stored.
public enum PageHash {
    /// Multiplier applied after each lane's rotation; odd, so invertible.
    private static let p1: UInt64 = 0x9B12_E261_1CFD_06E5
    /// Multiplier applied to each input word; odd, so invertible.
    private static let p2: UInt64 = 0xCA13_C7D6_C3A3_B4E5
    /// Multiplier and offset of the lane merge and the final avalanche.
    private static let p3: UInt64 = 0xFB15_2A5D_E12A_AE41
    private static let p4: UInt64 = 0xCD65_020F_A0F1_7C7D
    /// Initial values of the four lanes, distinct so lanes are not interchangeable.
    private static let seed0: UInt64 = 0xFE4A_2579_DA08_2E37
    private static let seed1: UInt64 = 0x85BE_46F5_6380_EA3B
    private static let seed2: UInt64 = 0xA3E8_DEEF_7C84_8511
    private static let seed3: UInt64 = 0xD9E5_2133_86D2_7F15

    /// The hash of `bytes` (a multiple of 32 bytes, typically 4096) and whether every byte is zero.
    public static func of(_ bytes: UnsafeRawBufferPointer) -> (hash: UInt64, isZero: Bool) {
        precondition(bytes.count % 32 == 0)
        let count = bytes.count
        var lane0 = seed0, lane1 = seed1, lane2 = seed2, lane3 = seed3
        var anyBits: UInt64 = 0
        var offset = 0
        while offset < count {
            // SAFETY: count is a multiple of 32 and offset < count, so bytes offset..<offset+32 are in bounds.
            let word0 = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
            // SAFETY: as above, offset + 16 <= count.
            let word1 = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset &+ 8, as: UInt64.self))
            // SAFETY: as above, offset + 24 <= count.
            let word2 = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset &+ 16, as: UInt64.self))
            // SAFETY: as above, offset + 32 <= count.
            let word3 = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset &+ 24, as: UInt64.self))
            lane0 = step(lane0, word0)
            lane1 = step(lane1, word1)
            lane2 = step(lane2, word2)
            lane3 = step(lane3, word3)
            anyBits |= (word0 | word1) | (word2 | word3)
            offset &+= 32
        }
        var hash = p4
        hash = merge(hash, lane0)
        hash = merge(hash, lane1)
        hash = merge(hash, lane2)
        hash = merge(hash, lane3)
        hash &+= UInt64(truncatingIfNeeded: count) &* p2
        return (avalanche(hash), anyBits == 0)
    }

    /// Whether every byte of `bytes` (a multiple of 32 bytes) is zero; stops
    /// at the first 32 bytes that are not, so a page of data costs a few
    /// loads.
    public static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        precondition(bytes.count % 32 == 0)
        var offset = 0
        while offset < bytes.count {
            // SAFETY: count is a multiple of 32 and offset < count, so bytes offset..<offset+32 are in bounds.
            let bits = bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self)
                | bytes.loadUnaligned(fromByteOffset: offset &+ 8, as: UInt64.self)
                | bytes.loadUnaligned(fromByteOffset: offset &+ 16, as: UInt64.self)
                | bytes.loadUnaligned(fromByteOffset: offset &+ 24, as: UInt64.self)
            if bits != 0 { return false }
            offset &+= 32
        }
        return true
    }

    /// The hash of a 4096-byte page of zeros.
    public static let zeroPage: UInt64 = {
        let zeros = [UInt8](repeating: 0, count: 4096)
        return zeros.withUnsafeBytes { of($0).hash }
    }()

    /// `x` rotated left by `n` bits, 0 < n < 64.
    @inline(__always)
    private static func rotl(_ x: UInt64, _ n: UInt64) -> UInt64 {
        (x &<< n) | (x &>> (64 &- n))
    }

    /// One lane consuming one word.
    @inline(__always)
    private static func step(_ lane: UInt64, _ word: UInt64) -> UInt64 {
        rotl(lane &+ word &* p2, 31) &* p1
    }

    /// `hash` with one finished lane mixed in; a bijection of `lane` for a fixed `hash`.
    @inline(__always)
    private static func merge(_ hash: UInt64, _ lane: UInt64) -> UInt64 {
        (hash ^ step(0, lane)) &* p1 &+ p3
    }

    /// Spreads every input bit over every output bit (xor-shift-multiply).
    @inline(__always)
    private static func avalanche(_ value: UInt64) -> UInt64 {
        var x = value
        x ^= x &>> 32
        x &*= p3
        x ^= x &>> 29
        x &*= p4
        x ^= x &>> 32
        return x
    }
}
