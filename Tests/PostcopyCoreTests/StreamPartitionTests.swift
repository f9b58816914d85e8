import PostcopyCore
import Testing

/// The rule that gives each page its bulk stream, and the agent's send
/// queue that follows it.
@Suite struct StreamPartitionTests {
    @Test func oneStreamCarriesEveryPage() {
        let partition = StreamPartition(streams: 1)
        for page in [0, 1, 511, 512, 1_000_000] as [UInt64] { #expect(partition.stream(of: page) == 0) }
        #expect(partition.chunks(of: 0, pageCount: 1300)
            == [PageRun(first: 0, count: 512), PageRun(first: 512, count: 512), PageRun(first: 1024, count: 276)])
        #expect(partition.firstPage(of: 0, atOrAfter: 777) == 777)
    }

    /// 2 MiB chunks in turn: chunk c on stream c mod N.
    @Test func chunksGoToTheStreamsInTurn() {
        let partition = StreamPartition(streams: 3)
        #expect([0, 511, 512, 1023, 1024, 1535, 1536, 5 * 512 + 7].map(partition.stream(of:)) == [0, 0, 1, 1, 2, 2, 0, 2])
        #expect(partition.chunks(of: 0, pageCount: 4 * 512 + 100)
            == [PageRun(first: 0, count: 512), PageRun(first: 1536, count: 512)])
        // The region's short last chunk belongs to its stream like any other.
        #expect(partition.chunks(of: 1, pageCount: 4 * 512 + 100)
            == [PageRun(first: 512, count: 512), PageRun(first: 2048, count: 100)])
        #expect(partition.chunks(of: 2, pageCount: 4 * 512 + 100) == [PageRun(first: 1024, count: 512)])
        #expect(partition.chunks(of: 2, pageCount: 5 * 512 + 100).last == PageRun(first: 2560, count: 100))
        #expect(partition.stream(carrying: PageRun(first: 512, count: 512)) == 1)
        #expect(partition.stream(carrying: PageRun(first: 1020, count: 8)) == nil)
        #expect(partition.stream(carrying: PageRun(first: 1000, count: 1536)) == nil, "two chunks of stream 1 and one of 2")
    }

    /// Every page lies in exactly one stream's chunks, the one `stream(of:)`
    /// names, for every stream count; `firstPage` and `counts` agree with a
    /// page-by-page walk.
    @Test(arguments: 1...8)
    func everyPageHasExactlyOneStream(streams: Int) {
        let partition = StreamPartition(streams: streams)
        let pageCount: UInt64 = 9 * 512 + 300
        var owner = [Int?](repeating: nil, count: Int(pageCount))
        for stream in 0..<streams {
            for chunk in partition.chunks(of: stream, pageCount: pageCount) {
                for page in chunk.pages {
                    #expect(owner[Int(page)] == nil, "page \(page) on two streams")
                    owner[Int(page)] = stream
                }
            }
        }
        for page in 0..<pageCount {
            #expect(owner[Int(page)] == partition.stream(of: page), "page \(page)")
        }
        for stream in 0..<streams {
            for from in stride(from: UInt64(0), to: pageCount, by: 97) {
                let walked = (from..<pageCount).first { partition.stream(of: $0) == stream }
                let found = partition.firstPage(of: stream, atOrAfter: from)
                #expect(walked.map { $0 == found } ?? (found >= pageCount), "stream \(stream) from \(from)")
            }
        }
        var stale = PageBitmap(count: pageCount)
        var generator = SplitMix64(seed: UInt64(streams))
        for page in 0..<pageCount where generator.next() % 3 == 0 { stale.insert(page) }
        let counts = partition.counts(of: stale)
        for stream in 0..<streams {
            #expect(counts[stream] == UInt64(stale.setIndices.filter { partition.stream(of: $0) == stream }.count))
        }
    }

    /// The 512 pieces of a 2 MiB page (hugetlbfs) travel one stream, and a
    /// run is cut only where it crosses into another chunk.
    @Test func aHugePageTravelsOneStream() {
        let partition = StreamPartition(streams: 4)
        for hugePage in 0..<UInt64(16) {
            let streams = Set((0..<512).map { partition.stream(of: hugePage * 512 + $0) })
            #expect(streams == [Int(hugePage % 4)])
        }
        let pieces = partition.pieces(of: PageRun(first: 500, count: 600))
        #expect(pieces.map(\.stream) == [0, 1, 2])
        #expect(pieces.map(\.run) == [PageRun(first: 500, count: 12), PageRun(first: 512, count: 512),
                                      PageRun(first: 1024, count: 76)])
        #expect(partition.pieces(of: PageRun(first: 3, count: 4)).map(\.run) == [PageRun(first: 3, count: 4)])
    }

    // MARK: the send queue over several streams

    /// Each stream's background sender gets only its share, in runs that
    /// stay inside one chunk; together they hand out every stale page once.
    @Test(arguments: [1, 2, 3, 8])
    func eachStreamTakesItsShareOnce(streams: Int) {
        let partition = StreamPartition(streams: streams)
        let pageCount: UInt64 = 11 * 512 + 77
        var stale = PageBitmap(count: pageCount)
        var generator = SplitMix64(seed: 7)
        for page in 0..<pageCount where generator.next() % 4 != 0 { stale.insert(page) }
        let queue = PostcopySendQueue(stale: stale, partition: partition)
        #expect((0..<streams).map(queue.remaining(on:)) == partition.counts(of: stale))
        var sent = PageBitmap(count: pageCount)
        for stream in (0..<streams).reversed() {
            while let run = queue.takeNext(maxPages: 256, stream: stream) {
                #expect(run.count <= 256)
                #expect(run.first / 512 == (run.end - 1) / 512, "\(run) crosses a chunk")
                for page in run.pages {
                    #expect(partition.stream(of: page) == stream, "page \(page) of stream \(partition.stream(of: page)) sent on \(stream)")
                    #expect(stale.contains(page) && sent.insert(page), "page \(page) not stale, or sent twice")
                }
            }
            #expect(queue.remaining(on: stream) == 0)
        }
        #expect(sent == stale)
        #expect(queue.remaining == 0)
    }

    /// A request takes its pages from every stream's share it spans, counts
    /// them against each, and sends every stream's cursor past it.
    @Test func aRequestSpanningChunksTakesFromEachShare() {
        let partition = StreamPartition(streams: 2)
        let queue = PostcopySendQueue(stale: .full(count: 4 * 512), partition: partition)
        #expect(queue.takeRequested(PageRun(first: 500, count: 30)) == [PageRun(first: 500, count: 30)])
        #expect(queue.remaining(on: 0) == 1024 - 12 && queue.remaining(on: 1) == 1024 - 18)
        #expect(queue.remaining == 2048 - 30)
        // Stream 1 goes on from the request's end; stream 0 from its next chunk.
        #expect(queue.takeNext(maxPages: 8, stream: 1) == PageRun(first: 530, count: 8))
        #expect(queue.takeNext(maxPages: 8, stream: 0) == PageRun(first: 1024, count: 8))
        // The rest of stream 0's first chunk is still handed out, after wrapping.
        var left: [PageRun] = []
        while let run = queue.takeNext(maxPages: 512, stream: 0) { left.append(run) }
        #expect(left.contains(PageRun(first: 0, count: 500)), "\(left)")
        #expect(queue.remaining(on: 0) == 0)
    }
}
