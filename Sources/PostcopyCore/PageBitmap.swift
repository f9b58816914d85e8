/// A fixed-length set of page indexes, one bit per page.
///
/// Used for the dirty bitmap (which pages are stale), for page state, and in
/// tests to check that every page faulted exactly once. Bits past `count` are
/// always zero, so `popCount` and equality need no masking.
public struct PageBitmap: Equatable, Sendable {
    public private(set) var words: [UInt64]
    public let count: UInt64

    /// An empty bitmap for `count` pages.
    public init(count: UInt64) {
        self.count = count
        self.words = Array(repeating: 0, count: Int((count + 63) / 64))
    }

    /// A bitmap over existing words, e.g. decoded from the wire. Refuses
    /// a word count that does not match `count` and set bits past `count`.
    public init?(words: [UInt64], count: UInt64) {
        guard UInt64(words.count) == PageBitmap.wordCount(bits: count) else { return nil }
        if count % 64 != 0, let last = words.last, last >> (count % 64) != 0 { return nil }
        self.words = words
        self.count = count
    }

    /// From the bytes of a dirty log (`postcopy-push --dirty-bitmap`): the
    /// words, each 8 bytes little-endian. Refuses a length other than 8 bytes
    /// per word of `count`, and set bits past `count`.
    public init?(littleEndianBytes bytes: [UInt8], count: UInt64) {
        guard bytes.count % 8 == 0, UInt64(bytes.count / 8) == PageBitmap.wordCount(bits: count) else { return nil }
        let words = bytes.count / 8
        self.init(words: (0..<words).map { index in
            (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[index * 8 + $1]) << (8 * $1) }
        }, count: count)
    }

    /// The 64-bit words that hold `bits` bits, for any count (`count + 63`
    /// would overflow near `UInt64.max`).
    static func wordCount(bits: UInt64) -> UInt64 { bits / 64 + (bits % 64 == 0 ? 0 : 1) }

    /// The bitmap as a dirty log holds it: see `init(littleEndianBytes:count:)`.
    public var littleEndianBytes: [UInt8] {
        words.flatMap { word in (0..<8).map { UInt8(truncatingIfNeeded: word >> (8 * $0)) } }
    }

    /// A bitmap with every page set.
    public static func full(count: UInt64) -> PageBitmap {
        var bitmap = PageBitmap(count: count)
        bitmap.words = bitmap.words.indices.map { _ in UInt64.max }
        if count % 64 != 0 { bitmap.words[bitmap.words.count - 1] = (1 << (count % 64)) - 1 }
        return bitmap
    }

    @inlinable
    public func contains(_ index: UInt64) -> Bool {
        precondition(index < count, "page \(index) outside a bitmap of \(count)")
        return words[Int(index >> 6)] & (1 << (index & 63)) != 0
    }

    /// Sets bit `index`; returns true when it was clear before.
    @discardableResult
    public mutating func insert(_ index: UInt64) -> Bool {
        precondition(index < count, "page \(index) outside a bitmap of \(count)")
        let mask: UInt64 = 1 << (index & 63)
        let word = Int(index >> 6)
        let wasClear = words[word] & mask == 0
        words[word] |= mask
        return wasClear
    }

    /// Clears bit `index`; returns true when it was set before.
    @discardableResult
    public mutating func remove(_ index: UInt64) -> Bool {
        precondition(index < count, "page \(index) outside a bitmap of \(count)")
        let mask: UInt64 = 1 << (index & 63)
        let word = Int(index >> 6)
        let wasSet = words[word] & mask != 0
        words[word] &= ~mask
        return wasSet
    }

    /// Sets bits [first, first+count), a word at a time where it can.
    public mutating func insert(first: UInt64, count pages: UInt64) {
        precondition(first <= count && pages <= count - first,
                     "pages \(first)..<\(first)+\(pages) outside a bitmap of \(count)")
        Self.forEachWord(in: first..<(first + pages)) { word, mask in words[word] |= mask }
    }

    /// Calls `body` with the index and the mask of each 64-bit word that
    /// the bits of `range` fall in, in order.
    @inline(__always)
    static func forEachWord(in range: Range<UInt64>, _ body: (_ word: Int, _ mask: UInt64) -> Void) {
        var index = range.lowerBound
        while index < range.upperBound {
            let bit = index & 63
            let span = min(64 - bit, range.upperBound - index)
            body(Int(index >> 6), span == 64 ? .max : ((1 << span) - 1) << bit)
            index += span
        }
    }

    /// Sets every bit set in `other`, a bitmap of the same count.
    public mutating func formUnion(_ other: PageBitmap) {
        precondition(other.count == count, "a bitmap of \(other.count) joined to one of \(count)")
        for index in words.indices { words[index] |= other.words[index] }
    }

    /// Pages set.
    public var popCount: UInt64 {
        words.reduce(0) { $0 + UInt64($1.nonzeroBitCount) }
    }

    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }

    /// The first set page at or after `start`, or nil.
    public func nextSet(from start: UInt64) -> UInt64? {
        guard start < count else { return nil }
        var word = Int(start >> 6)
        var bits = words[word] & (UInt64.max << (start & 63))
        while true {
            if bits != 0 { return UInt64(word) << 6 + UInt64(bits.trailingZeroBitCount) }
            word += 1
            guard word < words.count else { return nil }
            bits = words[word]
        }
    }

    /// Every set page, in ascending order.
    public var setIndices: [UInt64] {
        var result: [UInt64] = []
        result.reserveCapacity(Int(popCount))
        var next = nextSet(from: 0)
        while let index = next {
            result.append(index)
            next = nextSet(from: index + 1)
        }
        return result
    }
}
