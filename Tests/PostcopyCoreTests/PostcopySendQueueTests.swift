import Foundation
import PostcopyCore
import PostcopyOS
import Synchronization
import Testing

private enum Queueing {
    static func bitmap(count: UInt64, _ pages: [UInt64]) -> PageBitmap {
        var bitmap = PageBitmap(count: count)
        for page in pages { bitmap.insert(page) }
        return bitmap
    }

    static func random(count: UInt64, seed: UInt64, percent: UInt64) -> PageBitmap {
        var generator = SplitMix64(seed: seed)
        var bitmap = PageBitmap(count: count)
        for page in 0..<count where generator.next() % 100 < percent { bitmap.insert(page) }
        return bitmap
    }

    /// The first page at or after `start` still in `pending`, wrapping round
    /// to the start: where the background sender must go next.
    static func nextPending(_ pending: PageBitmap, from start: UInt64) -> UInt64? {
        pending.nextSet(from: start) ?? pending.nextSet(from: 0)
    }
}

@Suite struct PostcopySendQueueTests {
    @Test func takeNextHandsOutRunsOfAtMostMaxPages() {
        let queue = PostcopySendQueue(stale: .full(count: 10))
        #expect(queue.remaining == 10)
        #expect(queue.takeNext(maxPages: 4) == PageRun(first: 0, count: 4))
        #expect(queue.remaining == 6)
        #expect(queue.takeNext(maxPages: 4) == PageRun(first: 4, count: 4))
        #expect(queue.remaining == 2)
        #expect(queue.takeNext(maxPages: 4) == PageRun(first: 8, count: 2))
        #expect(queue.remaining == 0)
        #expect(queue.takeNext(maxPages: 4) == nil)
        #expect(queue.takeNext(maxPages: 1) == nil)
        #expect(queue.remaining == 0)
    }

    @Test func aRunEndsAtTheFirstPageNotStale() {
        let queue = PostcopySendQueue(stale: Queueing.bitmap(count: 32, [3, 4, 5, 9, 10, 31]))
        #expect(queue.takeNext(maxPages: 100) == PageRun(first: 3, count: 3))
        #expect(queue.takeNext(maxPages: 100) == PageRun(first: 9, count: 2))
        #expect(queue.takeNext(maxPages: 100) == PageRun(first: 31, count: 1))
        #expect(queue.takeNext(maxPages: 100) == nil)
    }

    @Test func nothingStaleMeansNothingToSend() {
        let queue = PostcopySendQueue(stale: PageBitmap(count: 100))
        #expect(queue.remaining == 0)
        #expect(queue.takeNext(maxPages: 8) == nil)
        #expect(queue.takeRequested(PageRun(first: 0, count: 100)) == [])
    }

    @Test(arguments: [UInt64(1), 3, 8, 64])
    func takeNextHandsOutEveryStalePageExactlyOnce(maxPages: UInt64) {
        let stale = Queueing.random(count: 1_000, seed: 42, percent: 60)
        let queue = PostcopySendQueue(stale: stale)
        var taken = PageBitmap(count: stale.count)
        var remaining = stale.popCount
        var calls = 0
        while let run = queue.takeNext(maxPages: maxPages) {
            calls += 1
            #expect(run.count <= maxPages)
            for page in run.pages {
                #expect(stale.contains(page), "page \(page) was not stale")
                let first = taken.insert(page)
                #expect(first, "page \(page) handed out twice")
            }
            // A run stops only at maxPages, the end, or a page not to send.
            if run.count < maxPages && run.end < stale.count {
                #expect(!stale.contains(run.end) || taken.contains(run.end))
            }
            remaining -= run.count
            #expect(queue.remaining == remaining)
            if calls > 2_000 { break }
        }
        #expect(taken == stale)
        #expect(queue.remaining == 0)
    }

    @Test func takeRequestedTakesOnlyPagesNotYetTaken() {
        let queue = PostcopySendQueue(stale: Queueing.bitmap(count: 64, [10, 11, 12, 13, 20, 30]))
        #expect(queue.takeNext(maxPages: 2) == PageRun(first: 10, count: 2))
        // 10 and 11 are on their way on the bulk connection already.
        #expect(queue.takeRequested(PageRun(first: 8, count: 13))
            == [PageRun(first: 12, count: 2), PageRun(first: 20, count: 1)])
        #expect(queue.remaining == 1)
        #expect(queue.takeRequested(PageRun(first: 10, count: 4)) == [])
        #expect(queue.remaining == 1)
        #expect(queue.takeRequested(PageRun(first: 30, count: 1)) == [PageRun(first: 30, count: 1)])
        #expect(queue.remaining == 0)
        #expect(queue.takeNext(maxPages: 8) == nil)
    }

    @Test func anAnswerSendsEveryStalePageOfTheRequestThoseTheBackgroundHasToo() {
        let queue = PostcopySendQueue(stale: Queueing.bitmap(count: 64, [10, 11, 12, 13, 20, 30]))
        #expect(queue.takeNext(maxPages: 2) == PageRun(first: 10, count: 2))
        // 10 and 11 are a background sender's, maybe not sent yet: the
        // faulting thread must not wait for it, so they go again. 8, 9 and
        // 14...19 were never stale and do not go at all.
        let first = queue.answer(PageRun(first: 8, count: 13))
        #expect(first.runs == [PageRun(first: 10, count: 4), PageRun(first: 20, count: 1)])
        #expect(first.takenPages == 3 && first.resentPages == 2)
        #expect(queue.remaining == 1)
        // Asked again (a rejoin asks for what is still missing): all resent.
        let again = queue.answer(PageRun(first: 12, count: 1))
        #expect(again.runs == [PageRun(first: 12, count: 1)])
        #expect(again.takenPages == 0 && again.resentPages == 1)
        // Nothing stale in it: nothing to send.
        let none = queue.answer(PageRun(first: 0, count: 10))
        #expect(none.runs.isEmpty && none.takenPages == 0)
        let last = queue.answer(PageRun(first: 30, count: 34))
        #expect(last.runs == [PageRun(first: 30, count: 1)] && last.takenPages == 1)
        #expect(queue.remaining == 0)
        #expect(queue.takeNext(maxPages: 8) == nil)
    }

    @Test func aRequestMovesTheBackgroundCursorToJustPastIt() {
        let queue = PostcopySendQueue(stale: .full(count: 100))
        #expect(queue.takeNext(maxPages: 4) == PageRun(first: 0, count: 4))
        #expect(queue.takeRequested(PageRun(first: 50, count: 2)) == [PageRun(first: 50, count: 2)])
        // The pages around the fault go next, not 4..<7.
        #expect(queue.takeNext(maxPages: 3) == PageRun(first: 52, count: 3))
        #expect(queue.takeNext(maxPages: 3) == PageRun(first: 55, count: 3))
        // A request for pages all taken still moves the cursor.
        #expect(queue.takeRequested(PageRun(first: 1, count: 3)) == [])
        #expect(queue.takeNext(maxPages: 3) == PageRun(first: 4, count: 3))
        // A request overlapping taken pages takes the rest and moves on.
        #expect(queue.takeRequested(PageRun(first: 5, count: 10)) == [PageRun(first: 7, count: 8)])
        #expect(queue.takeNext(maxPages: 5) == PageRun(first: 15, count: 5))
        #expect(queue.remaining == 100 - 4 - 2 - 3 - 3 - 3 - 8 - 5)
    }

    @Test func theCursorWrapsRoundToTheStart() {
        let queue = PostcopySendQueue(stale: .full(count: 20))
        // A request reaching the last page sends the cursor back to 0.
        #expect(queue.takeRequested(PageRun(first: 16, count: 4)) == [PageRun(first: 16, count: 4)])
        #expect(queue.takeNext(maxPages: 100) == PageRun(first: 0, count: 16))
        #expect(queue.takeNext(maxPages: 100) == nil)

        let tail = PostcopySendQueue(stale: Queueing.bitmap(count: 20, [0, 1, 18, 19]))
        #expect(tail.takeRequested(PageRun(first: 17, count: 1)) == [])
        #expect(tail.takeNext(maxPages: 10) == PageRun(first: 18, count: 2))
        // A run never wraps; the next one starts over at the beginning.
        #expect(tail.takeNext(maxPages: 10) == PageRun(first: 0, count: 2))
        #expect(tail.takeNext(maxPages: 10) == nil)

        // A cursor past the last pending page finds the pages before it.
        let behind = PostcopySendQueue(stale: Queueing.bitmap(count: 20, [2, 3]))
        #expect(behind.takeRequested(PageRun(first: 5, count: 1)) == [])
        #expect(behind.takeNext(maxPages: 10) == PageRun(first: 2, count: 2))
        #expect(behind.remaining == 0)
    }

    @Test(arguments: [UInt64(3), 99, 0xBADC0DE])
    func requestsAndBackgroundTogetherSendEveryStalePageOnce(seed: UInt64) {
        let count: UInt64 = 700
        let stale = Queueing.random(count: count, seed: seed, percent: 45)
        let queue = PostcopySendQueue(stale: stale)
        var generator = SplitMix64(seed: seed ^ 0x5555)
        var pending = stale
        var sent = [Int](repeating: 0, count: Int(count))
        /// Where the next background run must start, as far as the test knows.
        var cursor: UInt64 = 0
        var steps = 0
        while true {
            steps += 1
            if steps > 10_000 { Issue.record("the queue never runs dry"); break }
            if generator.next() % 3 == 0 {
                let first = generator.next() % count
                let length = min(generator.next() % 16 + 1, count - first)
                let request = PageRun(first: first, count: length)
                let runs = queue.takeRequested(request)
                for run in runs {
                    #expect(run.first >= request.first && run.end <= request.end)
                    for page in run.pages {
                        let wasPending = pending.remove(page)
                        #expect(wasPending, "page \(page) handed out twice or never stale")
                        sent[Int(page)] += 1
                    }
                }
                // Every page of the request not sent was already taken.
                #expect(!pending.containsAny(in: request.pages))
                cursor = request.end == count ? 0 : request.end
            } else {
                let maxPages = generator.next() % 32 + 1
                let expectedFirst = Queueing.nextPending(pending, from: cursor)
                guard let run = queue.takeNext(maxPages: maxPages) else {
                    #expect(expectedFirst == nil, "takeNext gave up with pages pending")
                    break
                }
                #expect(run.first == expectedFirst, "the background run does not start at the cursor")
                #expect(run.count <= maxPages)
                for page in run.pages {
                    let wasPending = pending.remove(page)
                    #expect(wasPending, "page \(page) handed out twice or never stale")
                    sent[Int(page)] += 1
                }
                cursor = run.end == count ? 0 : run.end
            }
            #expect(queue.remaining == pending.popCount)
        }
        for page in 0..<count {
            #expect(sent[Int(page)] == (stale.contains(page) ? 1 : 0), "page \(page) sent \(sent[Int(page)]) times")
        }
        #expect(queue.remaining == 0)
    }

    /// Two threads at once, as in the agent: requests for random runs
    /// against a background sweep, with no lock between them. Every stale
    /// page goes exactly once.
    @Test(arguments: [UInt64(5), 0xD1CE])
    func twoSendersAtOnceSendEveryStalePageOnce(seed: UInt64) throws {
        let count: UInt64 = 20_000
        let stale = Queueing.random(count: count, seed: seed, percent: 70)
        let queue = PostcopySendQueue(stale: stale)
        let sent = Locked([UInt8](repeating: 0, count: Int(count)))
        final class Flag: Sendable { let done = Atomic<Bool>(false) }
        let requestsDone = Flag()
        let record: @Sendable ([PageRun]) -> Void = { runs in
            sent.withLock { sent in for run in runs { for page in run.pages { sent[Int(page)] += 1 } } }
        }
        let urgent = Thread {
            var generator = SplitMix64(seed: seed)
            for _ in 0..<3_000 {
                let first = generator.next() % count
                record(queue.takeRequested(PageRun(first: first, count: min(generator.next() % 24 + 1, count - first))))
            }
            requestsDone.done.store(true, ordering: .sequentiallyConsistent)
        }
        urgent.start()
        var runs = 0
        while let run = queue.takeNext(maxPages: 16) {
            record([run])
            runs += 1
        }
        while !requestsDone.done.load(ordering: .sequentiallyConsistent) { usleep(1000) }
        let counts = sent.withLock { $0 }
        for page in 0..<count where counts[Int(page)] != (stale.contains(page) ? 1 : 0) {
            Issue.record("page \(page) sent \(counts[Int(page)]) times")
        }
        #expect(runs > 0)
        #expect(queue.remaining == 0)
    }
}
