/// Which of a migration's bulk streams carries each page: the region cut
/// into 2 MiB chunks (512 pages of 4 KiB), chunk `c` on stream
/// `c mod streams`. Precopy and the postcopy back-fill both follow it.
///
/// What the rule guarantees:
/// - Each stream carries distinct pages, and a page always travels the same
///   stream. A page resent in a later round is therefore queued on the same
///   TCP connection as its older copy, behind it, and the daemon, which
///   receives each connection in order on one thread, can never write the
///   older copy after the newer one.
/// - The 512 pieces of a 2 MiB page (hugetlbfs) travel one stream, in order.
/// - Whole chunks keep the frames long: a run of pages is cut only at a
///   2 MiB boundary, where a PAGES frame of 256 pages ends anyway.
///
/// With one stream every page is on stream 0: the protocol before version 5.
public struct StreamPartition: Hashable, Sendable, CustomStringConvertible {
    /// Pages of 4 KiB in a chunk: 2 MiB.
    public static let chunkPages: UInt64 = 512

    /// How many bulk streams share the pages, 1 … `AgentStream.maxBulkStreams`.
    public let streams: Int

    public init(streams: Int) {
        precondition(streams >= 1 && streams <= AgentStream.maxBulkStreams, "\(streams) bulk streams")
        self.streams = streams
    }

    /// The stream that carries `page`.
    public func stream(of page: UInt64) -> Int {
        Int((page / Self.chunkPages) % UInt64(streams))
    }

    /// The first page at or after `page` that `stream` carries (past the
    /// region's end when the region has no more of them).
    public func firstPage(of stream: Int, atOrAfter page: UInt64) -> UInt64 {
        precondition(stream >= 0 && stream < streams, "no stream \(stream) of \(streams)")
        let chunk = page / Self.chunkPages
        let ahead = UInt64((stream - Int(chunk % UInt64(streams)) + streams) % streams)
        return ahead == 0 ? page : (chunk + ahead) * Self.chunkPages
    }

    /// The chunks `stream` carries in a region of `pageCount` pages, in
    /// ascending order; the region's last chunk may be short.
    public func chunks(of stream: Int, pageCount: UInt64) -> [PageRun] {
        precondition(stream >= 0 && stream < streams, "no stream \(stream) of \(streams)")
        let chunkCount = (pageCount + Self.chunkPages - 1) / Self.chunkPages
        return stride(from: UInt64(stream), to: chunkCount, by: streams).map { chunk in
            let first = chunk * Self.chunkPages
            return PageRun(first: first, count: min(Self.chunkPages, pageCount - first))
        }
    }

    /// The stream that carries every page of `run`; nil when its pages
    /// belong to several streams.
    public func stream(carrying run: PageRun) -> Int? {
        let first = run.first / Self.chunkPages
        let last = (run.end - 1) / Self.chunkPages
        guard streams == 1 || first == last else { return nil }
        return stream(of: run.first)
    }

    /// `run` cut at the chunk boundaries it crosses, each piece with the
    /// stream that carries it, in ascending order.
    public func pieces(of run: PageRun) -> [(stream: Int, run: PageRun)] {
        var pieces: [(stream: Int, run: PageRun)] = []
        var first = run.first
        while first < run.end {
            let end = min((first / Self.chunkPages + 1) * Self.chunkPages, run.end)
            pieces.append((stream(of: first), PageRun(first: first, count: end - first)))
            first = end
        }
        return pieces
    }

    /// How many of the pages set in `pages` each stream carries.
    public func counts(of pages: PageBitmap) -> [UInt64] {
        var counts = [UInt64](repeating: 0, count: streams)
        // A chunk is 8 words of the bitmap.
        let wordsPerChunk = Int(Self.chunkPages / 64)
        for (index, word) in pages.words.enumerated() where word != 0 {
            counts[(index / wordsPerChunk) % streams] += UInt64(word.nonzeroBitCount)
        }
        return counts
    }

    public var description: String {
        streams == 1 ? "one bulk stream" : "\(streams) bulk streams, 2 MiB chunks in turn"
    }
}
