internal import Crypto

/// SHA-256 (FIPS 180-4), incremental: feed bytes with `update`, then take the
/// 32-byte digest with `finalize`. `hash` does both for bytes in hand.
///
/// The hashing is swift-crypto's: BoringSSL's SHA-256, which uses the CPU's
/// SHA extensions where it has them. It is pure computation (no file, no
/// configuration, no system call), and it replaced a hand-written one that
/// was many times slower (docs/benchmarks.md, "SHA-256 from swift-crypto").
/// This type keeps swift-crypto out of PostcopyCore's interface.
public struct SHA256: Sendable {
    private var hasher = Crypto.SHA256()
    /// Whether `finalize` has run, after which the value is spent.
    private var finalized = false

    /// The hash of no bytes yet.
    public init() {}

    /// Feeds `bytes`.
    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        precondition(!finalized, "SHA256 updated after finalize()")
        guard !bytes.isEmpty else { return }
        hasher.update(bufferPointer: bytes)
    }

    /// Feeds `bytes`.
    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    /// The 32-byte digest of everything fed; the value must not be updated afterwards.
    public mutating func finalize() -> [UInt8] {
        precondition(!finalized, "SHA256 finalized twice")
        finalized = true
        return Array(hasher.finalize())
    }

    /// The 32-byte digest of `bytes`.
    public static func hash(_ bytes: [UInt8]) -> [UInt8] {
        var hasher = SHA256()
        hasher.update(bytes)
        return hasher.finalize()
    }
}
