/// The per-migration secret that binds a migration to the agent that
/// started it: every HELLO carries it, and postcopyd admits a connection
/// only when it matches — the one it was configured with, else the first
/// HELLO's. A second agent, even one holding a valid certificate and the
/// migration id (which logs show), can neither join nor hijack the
/// migration, nor rejoin it after a pause or a daemon restart.
///
/// 32 random bytes; written as 64 hex digits in files. Never printed: its
/// description is redacted, and the page-state record keeps only its digest.
public struct MigrationSecret: Equatable, Sendable, CustomStringConvertible {
    public static let byteCount = 32
    public let bytes: [UInt8]

    /// Exactly 32 bytes; nil for any other count.
    public init?(bytes: [UInt8]) {
        guard bytes.count == Self.byteCount else { return nil }
        self.bytes = bytes
    }

    /// 64 hex digits, with surrounding blanks and newlines allowed (a file's
    /// contents); nil for anything else.
    public init?(hex text: String) {
        let trimmed = text.trimmingBlanks
        guard let bytes = bytesFromHex(trimmed, count: Self.byteCount) else { return nil }
        self.bytes = bytes
    }

    /// A fresh secret from `generator` (use a cryptographic one).
    public init<Generator: RandomNumberGenerator>(using generator: inout Generator) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Self.byteCount)
        for _ in 0..<(Self.byteCount / 8) { bytes.append(contentsOf: bigEndianBytes([generator.next()])) }
        self.bytes = bytes
    }

    /// A fresh secret from the system's generator. Call this rather than
    /// `init(using:)` with a local `SystemRandomNumberGenerator`: that struct
    /// is empty, Swift passes an empty `inout` as an undefined address, and a
    /// ThreadSanitizer build instruments the access and crashes on it.
    public static func random() -> MigrationSecret {
        MigrationSecret(bytes: bigEndianBytes((0..<byteCount / 8).map { _ in UInt64.random(in: .min ... .max) }))!
    }

    /// The 64 hex digits a secret file holds.
    public var hex: String { bytes.map { hexDigits(UInt64($0), width: 2) }.joined() }

    /// What a daemon keeps to check later HELLOs against (SHA-256).
    public var digest: SecretDigest { SecretDigest(bytes: SHA256.hash(bytes))! }

    /// In constant time, like `SecretDigest.matches`.
    public static func == (a: MigrationSecret, b: MigrationSecret) -> Bool {
        constantTimeEqual(a.bytes, b.bytes)
    }

    public var description: String { "(secret)" }
}

/// The SHA-256 digest of a `MigrationSecret`: what the session and the
/// page-state record keep.
public struct SecretDigest: Equatable, Sendable, CustomStringConvertible {
    public static let byteCount = 32
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == Self.byteCount else { return nil }
        self.bytes = bytes
    }

    /// Compares in time that does not depend on where the bytes differ, so
    /// that a peer cannot learn the digest a byte at a time.
    public func matches(_ other: SecretDigest) -> Bool { constantTimeEqual(bytes, other.bytes) }

    public static func == (a: SecretDigest, b: SecretDigest) -> Bool { a.matches(b) }

    public var description: String { "(secret digest)" }
}

/// Whether two byte strings of the same length are equal, in time that
/// does not depend on where they differ.
private func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    var difference: UInt8 = 0
    for index in a.indices { difference |= a[index] ^ b[index] }
    return difference == 0
}

extension String {
    /// Without leading and trailing spaces, tabs, CRs and newlines.
    var trimmingBlanks: String {
        let blank: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" || $0 == "\r\n" }
        return String(drop(while: blank).reversed().drop(while: blank).reversed())
    }
}
