import Dispatch
import Glibc
import PostcopyCore
import PostcopyOS

/// The agent's memory of what the destination holds: for each 4 KiB page,
/// the hash of the bytes last sent (the zero page's hash for a page never
/// sent, which the destination holds as zeros). A page whose current hash
/// differs has changed since it was sent.
///
/// Pages are copied before they are hashed and sent, so the recorded hash
/// is always that of the bytes that went out, even when the guest writes
/// the page while it is being sent.
///
/// A round runs on one thread per bulk stream, each over its own share of
/// the pages (`StreamPartition`) and with its own `Lane`: the threads
/// write disjoint hashes, so they share the record without a lock.
final class PageScanner: @unchecked Sendable {
    // SAFETY (@unchecked): `sent` is written during a round by the lanes'
    // threads, each only at the pages of its share, and read otherwise by
    // one thread at a time (the caller's, between rounds and in the pause);
    // read-only once postcopy starts. It is allocated once and freed in
    // deinit.
    let image: SourceImage
    private let sent: UnsafeMutableBufferPointer<UInt64>
    /// Pages per PAGES frame at most.
    let batchPages: Int

    init(image: SourceImage, batchPages: Int = 256) {
        self.image = image
        self.batchPages = batchPages
        sent = .allocate(capacity: Int(image.smallPageCount))
        sent.initialize(repeating: PageHash.zeroPage)
    }

    deinit { sent.deallocate() }

    var pageCount: UInt64 { image.smallPageCount }

    /// One bulk stream's part of precopy, from round to round: which share
    /// of the pages it sends, the buffer its frames are gathered in, and its
    /// pacer (carried over from round to round).
    final class Lane: @unchecked Sendable {
        // SAFETY (@unchecked): used by one thread at a time, the one that
        // sends the lane's share of a round.
        let stream: Int
        let partition: StreamPartition
        /// The frames of one send: one full frame's worth, or many short ones.
        var batch: FrameBatch
        var pacer: Pacer?

        init(stream: Int, partition: StreamPartition, batchPages: Int, pacer: Pacer?) {
            self.stream = stream
            self.partition = partition
            batch = FrameBatch(maxPagesPerFrame: batchPages)
            self.pacer = pacer
        }
    }

    /// What one round sent.
    struct RoundResult {
        var pagesSent: UInt64 = 0
        var zeroPagesSent: UInt64 = 0
        var bytesSent: UInt64 = 0
        /// When the round was cut short at its deadline: the pages of its
        /// share it never looked at and that the destination may not hold
        /// as they are (all but the holes it holds as zeros). They are
        /// stale, whatever the dirty log says later.
        var leftOver: PageBitmap?
    }

    /// `lane`'s share of one precopy round: every page of its share whose
    /// bytes differ from what was last sent goes out on `stream`, as PAGES
    /// (copied, hashed, sent) or, when it is now all zeros, as ZERO_PAGES.
    /// `candidates` limits the pages looked at (the pages a dirty log
    /// reports written); nil looks at every page. The lane's pacer, when it
    /// has one, holds it to its rate. `progress` is called after each send
    /// with the pages looked at and what went out since the last call.
    /// Once `deadline` (monotonic nanoseconds) has passed, the round stops
    /// after the frames it has gathered, and says which pages it left
    /// (`RoundResult.leftOver`): precopy's time limit holds within a round.
    func sendChangedPages(among candidates: PageBitmap?, lane: Lane, to stream: MessageStream,
                          until deadline: UInt64? = nil,
                          progress: (_ looked: UInt64, _ sent: RoundResult) -> Void) throws -> RoundResult {
        var result = RoundResult()
        var looked: UInt64 = 0
        var reported = RoundResult()
        var pastDeadline = false

        /// Sends the batch's frames, whole, in one go.
        func send() throws {
            guard !lane.batch.isEmpty else { return }
            let bytes = try lane.batch.frames { frames in
                try stream.sendFrames(frames)
                return UInt64(frames.count)
            }
            result.pagesSent += lane.batch.pages
            result.zeroPagesSent += lane.batch.zeroPages
            result.bytesSent += bytes
            lane.batch.reset()
            var now = monotonicNanoseconds()
            if let wait = lane.pacer?.sent(bytes, now: now), wait > 0 {
                // The pacer's wait ends at the deadline: a slow cap does
                // not hold the switchover back.
                sleepNanoseconds(deadline.map { $0 > now ? min(wait, $0 - now) : 0 } ?? wait)
                now = monotonicNanoseconds()
            }
            if let deadline, now >= deadline { pastDeadline = true }
            progress(looked, RoundResult(pagesSent: result.pagesSent - reported.pagesSent,
                                         zeroPagesSent: result.zeroPagesSent - reported.zeroPagesSent,
                                         bytesSent: result.bytesSent - reported.bytesSent))
            reported = result
            looked = 0
        }
        func addZero(_ page: UInt64) throws {
            guard !lane.batch.addZero(page) else { return }
            try send()
            guard lane.batch.addZero(page) else { preconditionFailure("an empty batch has room for a zero page") }
        }

        var holes = image.holes()
        var pages = SharePages(lane.partition.chunks(of: lane.stream, pageCount: pageCount), among: candidates)
        while !pastDeadline, let page = pages.next() {
            looked += 1
            // A page in a hole is zero, and is not read (reading would make
            // it exist): it goes out only if it held data before.
            if holes.contains(page) {
                guard sent[Int(page)] != PageHash.zeroPage else { continue }
                sent[Int(page)] = PageHash.zeroPage
                try addZero(page)
                continue
            }
            // Copied into its place in the batch first and hashed there,
            // once: the hash that says whether the page changed is the hash
            // of the very bytes that go out (the guest may write the page
            // meanwhile). An unchanged page leaves its place to the next.
            var slot = lane.batch.slot(for: page)
            if slot == nil {
                try send()
                slot = lane.batch.slot(for: page)
            }
            guard let slot else { preconditionFailure("an empty batch has room for a page") }
            image.withPages(first: page, count: 1) { slot.copyMemory(from: $0) }
            let (hash, isZero) = PageHash.of(UnsafeRawBufferPointer(slot))
            guard hash != sent[Int(page)] else { continue }
            sent[Int(page)] = hash
            if isZero {
                try addZero(page)
            } else {
                lane.batch.addData(page)
            }
        }
        try send()
        if looked > 0 { progress(looked, RoundResult()) }
        if pastDeadline {
            var left = PageBitmap(count: pageCount)
            while let page = pages.next() {
                // A hole that was never sent, or last sent as zeros, is
                // what the destination holds already.
                if holes.contains(page) && sent[Int(page)] == PageHash.zeroPage { continue }
                left.insert(page)
            }
            result.leftOver = left
        }
        return result
    }

    /// The pages of a share, in ascending order: every page of its chunks,
    /// or those set in `candidates`.
    private struct SharePages {
        private let chunks: [PageRun]
        private let candidates: PageBitmap?
        private var chunk = 0
        private var page: UInt64

        init(_ chunks: [PageRun], among candidates: PageBitmap?) {
            self.chunks = chunks
            self.candidates = candidates
            page = chunks.first?.first ?? 0
        }

        mutating func next() -> UInt64? {
            while chunk < chunks.count {
                let run = chunks[chunk]
                guard let candidates else {
                    if page < run.end {
                        defer { page += 1 }
                        return page
                    }
                    chunk += 1
                    if chunk < chunks.count { page = chunks[chunk].first }
                    continue
                }
                guard let found = candidates.nextSet(from: page) else { return nil }
                if found < run.end {
                    page = found + 1
                    return found
                }
                // Past this chunk: on to the first of the share's chunks
                // that ends after `found`, so that no stretch of the
                // bitmap is searched twice.
                while chunk < chunks.count && chunks[chunk].end <= found { chunk += 1 }
                if chunk < chunks.count { page = max(found, chunks[chunk].first) }
            }
            return nil
        }
    }

    /// The final scan of the hash log, with the source paused: the pages
    /// that differ from what the destination holds (and those `alsoDirty`
    /// names, a dirty log the caller kept), and the image's digest. Hashing
    /// every page is most of the switchover's downtime, so it runs on
    /// `threads` threads (the CPUs online, at most 8), each over a
    /// contiguous share of the pages; the comparison after it is one quick
    /// pass.
    func finalScan(alsoDirty: PageBitmap?, threads: Int = PageScanner.scanThreads) -> (stale: PageBitmap, digest: ImageDigest) {
        let hashes = hashAll(threads: threads)
        var stale = changedPages(hashes)
        if let alsoDirty { stale.formUnion(alsoDirty) }
        return (stale, ImageDigest(pageHashes: hashes))
    }

    /// Pages whose bytes now differ from what was last sent, by a hash of
    /// every page (the hash log's scan, and `--verify-dirty-log`'s check).
    func changedPages(threads: Int = PageScanner.scanThreads) -> PageBitmap {
        changedPages(hashAll(threads: threads))
    }

    private func changedPages(_ hashes: [UInt64]) -> PageBitmap {
        var changed = PageBitmap(count: pageCount)
        for page in 0..<hashes.count where hashes[page] != sent[page] { changed.insert(UInt64(page)) }
        return changed
    }

    /// The image's digest once `stale` pages (those the final scan of the
    /// write log reported) are hashed: every other page is as last sent, so
    /// its recorded hash is current. Run after the destination resumed, on
    /// the paused source: this is what keeps hashing out of the pause.
    func digest(hashingStale stale: PageBitmap) -> ImageDigest {
        var hashes = Array(sent)
        var holes = image.holes()
        var next = stale.nextSet(from: 0)
        while let page = next {
            hashes[Int(page)] = image.hash(ofPage: page, holes: &holes)
            next = stale.nextSet(from: page + 1)
        }
        return ImageDigest(pageHashes: hashes)
    }

    /// The image's digest from a hash of every page: what a restarted agent
    /// (`--resume`), which has no record of what was sent, gives postcopyd.
    func imageDigest(threads: Int = PageScanner.scanThreads) -> ImageDigest {
        ImageDigest(pageHashes: hashAll(threads: threads))
    }

    /// The hash of every page, on `threads` threads over contiguous shares.
    private func hashAll(threads: Int) -> [UInt64] {
        let count = Int(pageCount)
        var hashes = [UInt64](repeating: 0, count: count)
        let workers = max(1, min(threads, count / 1024))
        let share = (count + workers - 1) / workers
        hashes.withUnsafeMutableBufferPointer { hashes in
            let slots = ScanSlots(hashes: hashes.baseAddress!)
            let image = self.image
            DispatchQueue.concurrentPerform(iterations: workers) { worker in
                let start = worker * share
                let end = min(start + share, count)
                guard start < end else { return }
                var holes = image.holes()
                for page in start..<end {
                    slots.hashes[page] = image.hash(ofPage: UInt64(page), holes: &holes)
                }
            }
        }
        return hashes
    }

    /// Where the hashing workers put each page's hash.
    // SAFETY (@unchecked): worker w writes only [w × share, (w+1) × share)
    // of the buffer, which outlives concurrentPerform, which returns once
    // every worker has.
    private struct ScanSlots: @unchecked Sendable {
        let hashes: UnsafeMutablePointer<UInt64>
    }

    /// Threads for the final scan: the CPUs online, at most 8.
    static let scanThreads = max(1, min(8, sysconf(Int32(_SC_NPROCESSORS_ONLN))))

    /// Pages that are not zero now: what an ideal migration sends at least once.
    func nonZeroPages() -> UInt64 {
        sent.reduce(0) { $0 + ($1 == PageHash.zeroPage ? 0 : 1) }
    }
}
