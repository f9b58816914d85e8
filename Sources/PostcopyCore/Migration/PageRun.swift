/// A run of consecutive 4 KiB pages: `first ..< first + count`.
public struct PageRun: Hashable, Sendable, CustomStringConvertible {
    public let first: UInt64
    public let count: UInt64

    public init(first: UInt64, count: UInt64) {
        precondition(count > 0, "an empty page run")
        self.first = first
        self.count = count
    }

    public var end: UInt64 { first + count }
    public var pages: Range<UInt64> { first..<end }

    public var description: String { "pages \(first)..<\(end)" }
}

/// Builds the shortest list of runs from pages given in ascending order.
struct PageRunBuilder {
    private(set) var runs: [PageRun] = []
    private var start: UInt64 = 0
    private var length: UInt64 = 0

    mutating func add(_ page: UInt64) {
        if length > 0 && page == start + length {
            length += 1
            return
        }
        flush()
        start = page
        length = 1
    }

    /// Adds each page set in `bits`, the 64 pages from `firstPage` on.
    mutating func add(bits: UInt64, from firstPage: UInt64) {
        var rest = bits
        while rest != 0 {
            add(firstPage + UInt64(rest.trailingZeroBitCount))
            rest &= rest - 1
        }
    }

    mutating func finish() -> [PageRun] {
        flush()
        return runs
    }

    private mutating func flush() {
        if length > 0 { runs.append(PageRun(first: start, count: length)) }
        length = 0
    }
}

extension PageBitmap {
    /// Whether any page in `range` is set.
    public func containsAny(in range: Range<UInt64>) -> Bool {
        guard let next = nextSet(from: range.lowerBound) else { return false }
        return next < range.upperBound
    }
}
