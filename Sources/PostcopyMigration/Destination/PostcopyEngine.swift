import Glibc
import PostcopyCore
import PostcopyOS
import Synchronization

/// The destination during postcopy: the page-state tracker behind one lock,
/// the fault resolver the fault thread calls, and the path by which fetched
/// pages reach guest memory (claim → write through the alias → commit →
/// install whatever a guest thread waits for).
final class PostcopyEngine: FaultResolver, Sendable {
    let memory: GuestMemory
    let installer: PageInstaller
    private let tracker: Locked<PostcopyTracker>
    /// Sends PAGE_REQUESTs on the urgent connection, on a thread of its
    /// own: the fault thread only queues them.
    private let requests: RequestSender
    private let failures: FailureLatch
    private let onComplete: @Sendable () -> Void
    private let stalls: Locked<StallLimiter>
    private let onStall: @Sendable (StallLimiter.Report) -> Void
    private let latencies = Locked<[UInt64]>([])
    private let completeSignalled = Atomic<Bool>(false)
    /// Set once the VMM has let go of guest RAM (or is being let go of):
    /// from then on nothing is claimed or written through the alias.
    private let halted = Atomic<Bool>(false)
    let urgentPages = Atomic<UInt64>(0)
    let backgroundPages = Atomic<UInt64>(0)
    /// When the guest resumed (monotonic): the start of the postcopy phase.
    let postcopyStartedAt = Atomic<UInt64>(0)
    /// The process's CPU time then, in microseconds.
    let cpuMicrosAtResume = Atomic<UInt64>(0)
    /// When the agent last rejoined (monotonic; 0 once the first stale
    /// fault after it is served), and then how long that took, per rejoin.
    /// An atomic, so that the fault path takes no lock for it.
    private let rejoinedAt = Atomic<UInt64>(0)
    private let rejoinToFirstFault = Locked<[UInt64]>([])
    /// The record a restarted daemon takes over from: a page's bit there is
    /// cleared once its bytes are written, before it is installed.
    let pageState: PageStateFile?
    /// Event by event, when asked for (`DestinationConfig.tracePath`).
    private let trace: Locked<PostcopyTrace>
    private let tracing: Bool

    /// `onStall` hears of guest threads blocked longer than the limiter's
    /// threshold (rate-limited by it). With no `urgent` stream, postcopy
    /// starts paused (a daemon taking over waits for the agent to rejoin).
    init(memory: GuestMemory, installer: PageInstaller, stale: PageBitmap, urgent: MessageStream?,
         pageState: PageStateFile?, failures: FailureLatch, stalls: StallLimiter, tracing: Bool = false,
         scratch: PostcopyTracker.Scratch? = nil,
         onStall: @escaping @Sendable (StallLimiter.Report) -> Void = { _ in },
         onComplete: @escaping @Sendable () -> Void) {
        self.memory = memory
        self.installer = installer
        let tracker = Locked(PostcopyTracker(stale: stale, scratch: scratch ?? PostcopyTracker.Scratch(geometry: memory.geometry)))
        self.tracker = tracker
        requests = RequestSender(outstanding: { tracker.withLock { $0.outstandingRequests } })
        self.pageState = pageState
        self.failures = failures
        self.onComplete = onComplete
        self.stalls = Locked(stalls)
        self.onStall = onStall
        // Room for a fill per 64 pages and a fault per 16 stale pages up
        // front, so that recording rarely reallocates while faults wait.
        self.tracing = tracing
        trace = Locked(PostcopyTrace(stalePages: stale.popCount,
                                    reserving: tracing ? Int(stale.popCount / 64 + stale.popCount / 16) + 1024 : 0))
        do {
            try requests.start()
        } catch {
            failures.fail(.internalFailure, "start the thread that sends page requests: \(error)")
        }
        if let urgent { requests.use(urgent) }
    }

    deinit { requests.stop() }

    // MARK: fault thread

    func decide(_ fault: PageFault) -> FaultDecision {
        let action = tracker.withLock { $0.fault(on: fault.page, at: monotonicNanoseconds()) }
        switch action {
        case .install:
            return .install
        case .wait:
            return .deferred
        case let .fetch(span):
            requests.request(span)
            return .deferred
        }
    }

    func installFailed(_ fault: PageFault, _ error: InstallError) {
        failures.fail(.internalFailure, "resolve fault on \(fault.page): \(error)")
    }

    /// Whether pages may still be claimed and written: not once the
    /// migration failed or the engine was halted.
    var acceptsPages: Bool {
        !halted.load(ordering: .sequentiallyConsistent) && failures.error == nil
    }

    /// The VMM let go of guest RAM, or the migration is over: no page is
    /// claimed or written from now on, and no request goes out.
    func halt() {
        halted.store(true, ordering: .sequentiallyConsistent)
        requests.use(nil)
    }

    /// The agent's connections are gone: stop sending requests.
    func pause() {
        requests.use(nil)
    }

    /// The agent rejoined on `stream`: asks again for every page a guest
    /// thread waits on, before anything else is sent (the request sender
    /// sends the tracker's outstanding list first). Returns how many pages
    /// that is. A fault from now on asks for itself, one from before is in
    /// the list (asking twice is harmless: the agent sends only pages it has
    /// not sent since).
    @discardableResult
    func rejoin(urgent stream: MessageStream, at now: UInt64) -> UInt64 {
        rejoinedAt.store(now, ordering: .relaxed)
        requests.use(stream)
        return tracker.withLock { $0.outstandingRequests }.reduce(0) { $0 + $1.count }
    }

    /// For each rejoin whose first stale fault has been served: how long
    /// after the rejoin that was.
    var rejoinToFirstFaultNanos: [UInt64] { rejoinToFirstFault.withLock { $0 } }

    /// The highest PAGE_REQUEST id sent so far.
    var lastRequestID: UInt32 { requests.lastRequestID }

    // MARK: receiving threads

    /// Pages `run` arrived with `data` (nil: they are zero on the source).
    /// Writes those still stale, exactly once, and installs the guest pages
    /// that were waiting for them.
    ///
    /// Once the migration has failed (the latch is set) or the engine is
    /// halted (the VMM let go), nothing is claimed or written: a frame
    /// already buffered and decoded when that happened is dropped, and its
    /// pages stay stale in the tracker and in the page-state record, for a
    /// restarted daemon to fetch. The check is made under the tracker's
    /// lock, with the claim; a claim made just before the failure writes
    /// only stale pages no guest maps (they are never installed now), and is
    /// neither committed nor recorded fresh.
    func fill(_ run: PageRun, data: ArraySlice<UInt8>?, urgent isUrgent: Bool) {
        let claims = tracker.withLock { state -> [PageRun] in
            guard acceptsPages else { return [] }
            return state.claim(run)
        }
        guard !claims.isEmpty else { return }
        var written: UInt64 = 0
        for claim in claims {
            // Claims are sub-runs of run, which the session validated.
            if let data {
                let start = data.startIndex + Int(claim.first - run.first) * 4096
                data[start..<(start + Int(claim.count) * 4096)].withUnsafeBytes { memory.write($0, to: claim) }
            } else {
                memory.write(nil, to: claim)
            }
            written += claim.count
        }
        // Counted (and traced) under the tracker's lock, with the commit: the
        // thread that commits the last pages signals completion, and the
        // summary must then see every other thread's pages counted. The time
        // is read under the lock too: a fault registered while this thread
        // waited for it must not look as if it ended before it began.
        let committed = tracker.withLock { state -> ([PostcopyTracker.Completion], Bool, UInt64)? in
            // Failed while this thread wrote: commit nothing and install
            // nothing; the record keeps these pages stale.
            guard acceptsPages else { return nil }
            let now = monotonicNanoseconds()
            // The pages are written: record them fresh before anything can
            // install them (the page-state invariant). The tracker's lock
            // serialises every change to the record.
            if let pageState { for claim in claims { pageState.bitmap.markFresh(claim) } }
            let completions = state.commit(claims, at: now)
            if isUrgent {
                urgentPages.add(written, ordering: .relaxed)
            } else {
                backgroundPages.add(written, ordering: .relaxed)
            }
            if tracing { record(claims, completions, urgent: isUrgent, at: now) }
            return (completions, completions.isEmpty && state.isComplete, now)
        }
        guard let (completions, doneNow, now) = committed else { return }
        for completion in completions {
            do {
                try installer.install(completion.page)
            } catch {
                failures.fail(.internalFailure, "install \(completion.page) after fetching it: \(error)")
                return
            }
        }
        guard !completions.isEmpty else {
            if doneNow { signalComplete() }
            return
        }
        latencies.withLock { $0.append(contentsOf: completions.map(\.latencyNanos)) }
        let at = rejoinedAt.load(ordering: .relaxed)
        if at != 0, now >= at, rejoinedAt.compareExchange(expected: at, desired: 0, ordering: .relaxed).exchanged {
            rejoinToFirstFault.withLock { $0.append(now &- at) }
        }
        let stalled = stalls.withLock { limiter in
            completions.compactMap { limiter.record(page: $0.page.rawValue, stallNanos: $0.latencyNanos, at: now) }
        }
        stalled.forEach(onStall)
        let done = tracker.withLock { state in
            state.installed(completions.count)
            return state.isComplete
        }
        if done { signalComplete() }
    }

    private func record(_ claims: [PageRun], _ completions: [PostcopyTracker.Completion], urgent isUrgent: Bool,
                        at now: UInt64) {
        let at = now &- postcopyStartedAt.load(ordering: .relaxed)
        let pagesPerPage = memory.geometry.pageSize.smallPagesPerPage
        trace.withLock { trace in
            for claim in claims {
                trace.record(.init(kind: isUrgent ? .urgentFill : .backgroundFill, atNanos: at,
                                   page: claim.first, pages: claim.count))
            }
            for completion in completions {
                trace.record(.init(kind: .staleFault, atNanos: at, page: completion.page.rawValue * pagesPerPage,
                                   pages: 1, waitedNanos: completion.latencyNanos))
            }
        }
    }

    /// Calls `onComplete` once, when the last stale page is in.
    func signalCompleteIfDone() {
        if tracker.withLock({ $0.isComplete }) { signalComplete() }
    }

    private func signalComplete() {
        if !completeSignalled.exchange(true, ordering: .sequentiallyConsistent) { onComplete() }
    }

    /// The tracker's counters, for status and the summary. Not a copy of the
    /// tracker: a copy would share its per-page bitmaps, and the fault
    /// path's next change would then copy them all (1 MiB at 8 GiB of RAM)
    /// while holding the lock.
    var counters: PostcopyTracker.Counters { tracker.withLock { $0.counters } }

    /// A copy made here, under the lock, so that the array the filling
    /// threads append to is never shared (sharing would make their next
    /// append copy it all, on the fault path).
    var staleFaultLatencies: [UInt64] {
        latencies.withLock { samples in
            Array(unsafeUninitializedCapacity: samples.count) { buffer, count in
                count = buffer.initialize(fromContentsOf: samples)
            }
        }
    }

    /// The events so far, if tracing.
    var traceSnapshot: PostcopyTrace? { tracing ? trace.withLock { $0 } : nil }
}

extension PostcopyEngine {
    /// 4 KiB pages still stale.
    var stalePages: UInt64 { tracker.withLock { $0.stalePages } }

    /// The stale pages now, as a bitmap of its own: its words are copied
    /// under the lock, so the tracker's next change copies nothing.
    func staleSnapshot() -> PageBitmap {
        tracker.withLock { state in
            let bitmap = state.staleBitmap
            let words = bitmap.words.withUnsafeBufferPointer { Array($0) }
            return PageBitmap(words: words, count: bitmap.count)!
        }
    }
}
