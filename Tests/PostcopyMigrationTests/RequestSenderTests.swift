import Glibc
import PostcopyCore
@testable import PostcopyMigration
import PostcopyOS
import Synchronization
import Testing

/// The thread that sends PAGE_REQUESTs for the fault thread.
@Suite struct RequestSenderTests {
    /// A sender on one end of a loopback connection, and the other end to read.
    struct Pair {
        let sender: RequestSender
        let wire: MessageStream
        let peer: MessageStream
        let outstanding = Locked<[PageRun]>([])

        init(started: Bool = true) throws {
            // A TCP connection over loopback, as the urgent connection is.
            let listener = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0))
            let ours = try TCPConnection.connect(to: listener.endpoint)
            wire = MessageStream(ours, peer: "test agent")
            peer = MessageStream(try listener.accept(), peer: "test daemon")
            let outstanding = self.outstanding
            sender = RequestSender(outstanding: { outstanding.withLock { $0 } })
            if started { try sender.start() }
        }

        /// The next `count` messages the agent's end reads.
        func read(_ count: Int) throws -> [Message] {
            try peer.connection.setReceiveTimeout(5_000_000_000)
            return try (0..<count).map { _ in try #require(try peer.receive()) }
        }
    }

    // The sender's contract, which the engine keeps: a span is marked
    // requested (in `outstanding`) before it is queued. So when the sender
    // sends the outstanding list (a new stream, an overflow) it may drop
    // what is queued. The tests keep the same contract.

    /// While paused nothing is queued; a new stream gets the outstanding
    /// list first, then what faults ask for, each as it comes.
    @Test func aNewStreamGetsTheOutstandingListFirst() throws {
        let pair = try Pair()
        defer { pair.sender.stop() }
        pair.sender.request(PageRun(first: 1, count: 1))  // paused: dropped
        pair.outstanding.withLock { $0 = [PageRun(first: 1, count: 1), PageRun(first: 7, count: 2)] }
        pair.sender.use(pair.wire, generation: 0)
        #expect(try pair.read(2) == [.pageRequest(requestID: 1, firstPage: 1, count: 1),
                                     .pageRequest(requestID: 2, firstPage: 7, count: 2)])
        pair.outstanding.withLock { $0.append(PageRun(first: 20, count: 1)) }
        pair.sender.request(PageRun(first: 20, count: 1))
        #expect(try pair.read(1) == [.pageRequest(requestID: 3, firstPage: 20, count: 1)])
    }

    /// A span longer than one request's limit goes out as several
    /// requests, in order, with increasing ids, covering it exactly.
    @Test func aLongSpanIsSplitIntoRequests() throws {
        let pair = try Pair()
        defer { pair.sender.stop() }
        pair.outstanding.withLock { $0 = [PageRun(first: 0, count: 1)] }
        pair.sender.use(pair.wire, generation: 0)
        #expect(try pair.read(1) == [.pageRequest(requestID: 1, firstPage: 0, count: 1)])
        let max = RequestSender.maxPagesPerRequest
        let span = PageRun(first: 10, count: 2 * max + 1)
        pair.outstanding.withLock { $0.append(span) }
        pair.sender.request(span)
        #expect(try pair.read(3) == [
            .pageRequest(requestID: 2, firstPage: 10, count: UInt32(max)),
            .pageRequest(requestID: 3, firstPage: 10 + max, count: UInt32(max)),
            .pageRequest(requestID: 4, firstPage: 10 + 2 * max, count: 1),
        ])
        #expect(pair.sender.lastRequestID == 4)
    }

    /// More requests than the queue holds before the thread can send: the
    /// overflow is not lost, the outstanding list is sent instead.
    @Test func aFullQueueFallsBackToTheOutstandingList() throws {
        let pair = try Pair(started: false)
        defer { pair.sender.stop() }
        // The thread is not running yet: the faults fill the queue.
        let count = UInt64(RequestSender.capacity) + 10
        pair.outstanding.withLock { $0 = [PageRun(first: 0, count: count)] }
        pair.sender.use(pair.wire, generation: 0)
        for page in 0..<count { pair.sender.request(PageRun(first: page, count: 1)) }
        try pair.sender.start()
        // The outstanding list (one span, split at the request limit) goes
        // out instead of the queue that overflowed.
        let expected = Int((count + RequestSender.maxPagesPerRequest - 1) / RequestSender.maxPagesPerRequest)
        let requests = try pair.read(expected)
        var covered: UInt64 = 0
        for case let .pageRequest(_, first, pages) in requests {
            #expect(first == covered)
            covered += UInt64(pages)
        }
        #expect(covered == count)
    }

    /// The race of issue 19, on the real sender: the loss of generation 0
    /// reported after generation 1 rejoined leaves requests flowing on
    /// generation 1's connection; the loss of generation 1 itself stops them.
    @Test func aLossReportedAfterTheRejoinDoesNotUndoIt() throws {
        let pair = try Pair()
        defer { pair.sender.stop() }
        pair.sender.use(pair.wire, generation: 1)
        pair.sender.pause(lost: 0)
        pair.outstanding.withLock { $0 = [PageRun(first: 5, count: 1)] }
        pair.sender.request(PageRun(first: 5, count: 1))
        let sent = try pair.read(1)
        #expect(sent.first.map { if case .pageRequest(_, 5, 1) = $0 { true } else { false } } == true, "\(sent)")
        pair.sender.pause(lost: 1)
        pair.sender.request(PageRun(first: 9, count: 1))
        try pair.peer.connection.setReceiveTimeout(200_000_000)
        #expect(throws: (any Error).self) { _ = try pair.peer.receive() }
    }

    /// Stopping ends the thread; nothing is sent after.
    @Test func stopEndsTheThread() throws {
        let pair = try Pair()
        pair.sender.use(pair.wire, generation: 0)
        pair.sender.stop()
        pair.sender.request(PageRun(first: 3, count: 1))
        try pair.peer.connection.setReceiveTimeout(200_000_000)
        #expect(throws: (any Error).self) { _ = try pair.peer.receive() }
    }
}
