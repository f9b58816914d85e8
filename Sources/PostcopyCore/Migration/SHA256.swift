/// SHA-256 (FIPS 180-4), incremental: feed bytes with `update`, then take the
/// 32-byte digest with `finalize`. `hash` does both for bytes in hand.
///
/// Whole 64-byte blocks are compressed straight from the caller's memory;
/// only a partial block is copied, into a fixed 64-byte buffer inside the
/// value, so hashing allocates nothing on the heap but the digest array.
public struct SHA256: Sendable {
    /// The eight working words H0…H7 (FIPS 180-4 §6.2).
    private struct State {
        var a, b, c, d, e, f, g, h: UInt32
    }

    /// The intermediate hash value, after every whole block fed so far.
    private var state = State(a: 0x6A09_E667, b: 0xBB67_AE85, c: 0x3C6E_F372, d: 0xA54F_F53A,
                              e: 0x510E_527F, f: 0x9B05_688C, g: 0x1F83_D9AB, h: 0x5BE0_CD19)
    /// The bytes of the block not yet complete: the first `pendingCount`.
    private var pending: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) =
        (0, 0, 0, 0, 0, 0, 0, 0)
    /// How many bytes of `pending` hold data, 0..<64.
    private var pendingCount = 0
    /// Every byte fed, for the length field of the padding.
    private var messageBytes: UInt64 = 0
    /// Whether `finalize` has run, after which the value is spent.
    private var finalized = false

    /// The hash of no bytes yet.
    public init() {}

    /// Feeds `bytes`.
    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        precondition(!finalized, "SHA256 updated after finalize()")
        let count = bytes.count
        guard count > 0 else { return }
        messageBytes &+= UInt64(count)
        var offset = 0
        var words = state
        let filled = pendingCount
        var buffered = filled
        withUnsafeTemporaryAllocation(of: UInt32.self, capacity: 64) { schedule in
            SHA256.roundConstants.withUnsafeBufferPointer { constants in
                if filled > 0 {
                    let take = min(64 - filled, count)
                    withUnsafeMutableBytes(of: &pending) { block in
                        // SAFETY: filled + take <= 64 and take <= count, so both ranges are in bounds.
                        UnsafeMutableRawBufferPointer(rebasing: block[filled..<(filled + take)])
                            .copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[0..<take]))
                        if filled + take == 64 {
                            SHA256.compress(&words, UnsafeRawBufferPointer(block), schedule, constants)
                        }
                    }
                    offset = take
                    buffered = (filled + take) % 64
                }
                while count - offset >= 64 {
                    // SAFETY: offset + 64 <= count, so the block lies inside `bytes`.
                    let block = UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + 64)])
                    SHA256.compress(&words, block, schedule, constants)
                    offset += 64
                }
            }
        }
        state = words
        if offset < count {
            // `buffered` is 0 here: a partial fill either completed the block or used up `bytes`.
            let rest = count - offset
            withUnsafeMutableBytes(of: &pending) { block in
                // SAFETY: rest < 64 fits the 64-byte buffer, and offset + rest == count.
                UnsafeMutableRawBufferPointer(rebasing: block[0..<rest])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<count]))
            }
            buffered = rest
        }
        pendingCount = buffered
    }

    /// Feeds `bytes`.
    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    /// The 32-byte digest of everything fed; the value must not be updated afterwards.
    public mutating func finalize() -> [UInt8] {
        precondition(!finalized, "SHA256 finalized twice")
        let bitLength = messageBytes &* 8
        // 0x80, zeros up to 56 bytes into a block, then the bit length, big-endian (§5.1.1).
        let zeros = pendingCount < 56 ? 55 - pendingCount : 119 - pendingCount
        var padding = [UInt8](repeating: 0, count: 1 + zeros + 8)
        padding[0] = 0x80
        for index in 0..<8 {
            padding[zeros + 1 + index] = UInt8(truncatingIfNeeded: bitLength >> (56 - 8 * index))
        }
        update(padding)
        finalized = true
        let words = [state.a, state.b, state.c, state.d, state.e, state.f, state.g, state.h]
        var digest: [UInt8] = []
        digest.reserveCapacity(32)
        for word in words {
            for shift in stride(from: 24, through: 0, by: -8) {
                digest.append(UInt8(truncatingIfNeeded: word >> shift))
            }
        }
        return digest
    }

    /// The 32-byte digest of `bytes`.
    public static func hash(_ bytes: [UInt8]) -> [UInt8] {
        var hasher = SHA256()
        hasher.update(bytes)
        return hasher.finalize()
    }

    /// K0…K63: the first 32 bits of the fractional parts of the cube roots
    /// of the first 64 primes (§4.2.2).
    private static let roundConstants: [UInt32] = [
        0x428A_2F98, 0x7137_4491, 0xB5C0_FBCF, 0xE9B5_DBA5, 0x3956_C25B, 0x59F1_11F1, 0x923F_82A4, 0xAB1C_5ED5,
        0xD807_AA98, 0x1283_5B01, 0x2431_85BE, 0x550C_7DC3, 0x72BE_5D74, 0x80DE_B1FE, 0x9BDC_06A7, 0xC19B_F174,
        0xE49B_69C1, 0xEFBE_4786, 0x0FC1_9DC6, 0x240C_A1CC, 0x2DE9_2C6F, 0x4A74_84AA, 0x5CB0_A9DC, 0x76F9_88DA,
        0x983E_5152, 0xA831_C66D, 0xB003_27C8, 0xBF59_7FC7, 0xC6E0_0BF3, 0xD5A7_9147, 0x06CA_6351, 0x1429_2967,
        0x27B7_0A85, 0x2E1B_2138, 0x4D2C_6DFC, 0x5338_0D13, 0x650A_7354, 0x766A_0ABB, 0x81C2_C92E, 0x9272_2C85,
        0xA2BF_E8A1, 0xA81A_664B, 0xC24B_8B70, 0xC76C_51A3, 0xD192_E819, 0xD699_0624, 0xF40E_3585, 0x106A_A070,
        0x19A4_C116, 0x1E37_6C08, 0x2748_774C, 0x34B0_BCB5, 0x391C_0CB3, 0x4ED8_AA4A, 0x5B9C_CA4F, 0x682E_6FF3,
        0x748F_82EE, 0x78A5_636F, 0x84C8_7814, 0x8CC7_0208, 0x90BE_FFFA, 0xA450_6CEB, 0xBEF9_A3F7, 0xC671_78F2,
    ]

    /// `x` rotated right by `n` bits, 0 < n < 32.
    @inline(__always)
    private static func rotr(_ x: UInt32, _ n: UInt32) -> UInt32 {
        (x &>> n) | (x &<< (32 &- n))
    }

    /// Folds one 64-byte block into `state` (§6.2.2), using `schedule`
    /// (64 words of scratch) for the message schedule W.
    @inline(__always)
    private static func compress(_ state: inout State, _ block: UnsafeRawBufferPointer,
                                 _ schedule: UnsafeMutableBufferPointer<UInt32>,
                                 _ constants: UnsafeBufferPointer<UInt32>) {
        for t in 0..<16 {
            // SAFETY: the block is 64 bytes and 4 * t + 4 <= 64.
            schedule[t] = UInt32(bigEndian: block.loadUnaligned(fromByteOffset: 4 * t, as: UInt32.self))
        }
        for t in 16..<64 {
            let w15 = schedule[t - 15], w2 = schedule[t - 2]
            let sigma0 = rotr(w15, 7) ^ rotr(w15, 18) ^ (w15 &>> 3)
            let sigma1 = rotr(w2, 17) ^ rotr(w2, 19) ^ (w2 &>> 10)
            schedule[t] = sigma1 &+ schedule[t - 7] &+ sigma0 &+ schedule[t - 16]
        }
        var a = state.a, b = state.b, c = state.c, d = state.d
        var e = state.e, f = state.f, g = state.g, h = state.h
        for t in 0..<64 {
            let sum1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)
            let choose = (e & f) ^ (~e & g)
            let t1 = h &+ sum1 &+ choose &+ constants[t] &+ schedule[t]
            let sum0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)
            let majority = (a & b) ^ (a & c) ^ (b & c)
            let t2 = sum0 &+ majority
            h = g; g = f; f = e; e = d &+ t1
            d = c; c = b; b = a; a = t1 &+ t2
        }
        state.a &+= a; state.b &+= b; state.c &+= c; state.d &+= d
        state.e &+= e; state.f &+= f; state.g &+= g; state.h &+= h
    }
}
