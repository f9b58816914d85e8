/// A page bitmap on the wire: DIRTY_BITMAP frames that cover its words in
/// order from word 0. The agent sends the stale pages this way at
/// switchover, and postcopyd the pages it still lacks when an agent rejoins;
/// each receiver reassembles them with `BitmapAssembler`.
extension PageBitmap {
    /// The words per DIRTY_BITMAP frame: 512 KiB of payload, 4 Mi pages.
    public static let wordsPerFrame = 65_536

    /// This bitmap as DIRTY_BITMAP messages, in order.
    public func dirtyBitmapMessages(wordsPerFrame: Int = PageBitmap.wordsPerFrame) -> [Message] {
        stride(from: 0, to: words.count, by: wordsPerFrame).map { first in
            let end = min(first + wordsPerFrame, words.count)
            return .dirtyBitmap(totalBits: count, firstWord: UInt64(first), words: Array(words[first..<end]))
        }
    }
}

/// Reassembles a bitmap of `count` bits from DIRTY_BITMAP frames, each of
/// which must start where the previous one ended. Whether a frame's words
/// lie inside the bitmap is `Message.validate(against:)`'s to check first.
public struct BitmapAssembler: Sendable {
    public let count: UInt64
    private var words: [UInt64]
    /// Words received so far: where the next frame must start.
    public private(set) var wordsReceived: UInt64 = 0

    public init(count: UInt64) {
        self.count = count
        words = Array(repeating: 0, count: Int((count + 63) / 64))
    }

    /// The words the bitmap has in all.
    public var wordCount: UInt64 { UInt64(words.count) }

    /// Every word has arrived.
    public var isComplete: Bool { wordsReceived == wordCount }

    /// Adds a frame's words; false (and nothing added) when they do not
    /// start at `wordsReceived` or run past the end.
    public mutating func add(firstWord: UInt64, words frame: [UInt64]) -> Bool {
        guard firstWord == wordsReceived, wordsReceived + UInt64(frame.count) <= wordCount else { return false }
        words.replaceSubrange(Int(firstWord)..<(Int(firstWord) + frame.count), with: frame)
        wordsReceived += UInt64(frame.count)
        return true
    }

    /// The bitmap, once complete; nil before, or when bits past `count` are set.
    public var bitmap: PageBitmap? { isComplete ? PageBitmap(words: words, count: count) : nil }
}
