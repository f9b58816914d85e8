import PostcopyCore

/// A fuzz input read from the front: single bytes, little-endian integers,
/// runs of bytes, and the rest. Reading past the end gives zeros (or fewer
/// bytes), so every input, however short, drives a target somewhere.
struct FuzzInput {
    private let bytes: [UInt8]
    private var offset = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    /// Bytes not read yet.
    var remaining: Int { bytes.count - offset }

    var isEmpty: Bool { remaining == 0 }

    /// The next byte; 0 past the end.
    mutating func byte() -> UInt8 {
        guard offset < bytes.count else { return 0 }
        defer { offset += 1 }
        return bytes[offset]
    }

    /// The next `MemoryLayout<T>.size` bytes as a little-endian integer;
    /// missing bytes count as zero.
    mutating func integer<T: FixedWidthInteger & UnsignedInteger>(_: T.Type = T.self) -> T {
        var value: T = 0
        for shift in stride(from: 0, to: T.bitWidth, by: 8) { value |= T(byte()) << shift }
        return value
    }

    /// The next `count` bytes, or as many as are left.
    mutating func bytes(upTo count: Int) -> ArraySlice<UInt8> {
        let end = offset + min(max(count, 0), remaining)
        defer { offset = end }
        return bytes[offset..<end]
    }

    /// Everything not read yet.
    mutating func rest() -> ArraySlice<UInt8> { bytes(upTo: remaining) }
}

/// Stops the process with `message` when a property the target checks does
/// not hold: a finding, as much as a trap inside the code under test.
/// Unlike `precondition`, it says why in every build configuration.
func require(_ condition: Bool, _ message: @autoclosure () -> String) {
    if !condition { fatalError("fuzz property broken: \(message())") }
}

extension Array where Element == UInt8 {
    /// Appends `value`'s bytes, least significant first.
    mutating func appendLittleEndian<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }
}
