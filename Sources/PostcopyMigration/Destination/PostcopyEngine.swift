import Glibc
import PostcopyCore
import PostcopyOS
import Synchronization

/// The destination during postcopy: the page-state tracker, shared without
/// a lock between the fault thread and the receiving threads; the fault
/// resolver the fault thread calls; and the path by which fetched pages
/// reach guest memory (claim → write through the alias → record fresh →
/// commit → install what a guest thread waits for, and wake the fault
/// thread to do the bookkeeping).
///
/// The fault thread takes no lock a receiving thread takes: a fault only
/// reads and marks the tracker's atomic bitmaps and queues its request for
/// the request sender's thread; a receiver CONTINUEs the waiting pages it
/// completed and hands them to it through `wakeSignal`, an eventfd its
/// loop polls. The locks here
/// (latencies, stall reports, the trace) are shared with readers of
/// figures, never with a receiver, except the trace's when tracing.
final class PostcopyEngine: FaultResolver, Sendable {
    let memory: GuestMemory
    let installer: PageInstaller
    private let tracker: PostcopyTracker
    /// Rung by a receiver whose commit may have completed a page a guest
    /// thread waits on (or brought in the last stale page); the fault loop
    /// polls it and calls `woken`.
    let wakeSignal: EventSignal?
    /// Sends PAGE_REQUESTs on the urgent connection, on a thread of its
    /// own: the fault thread only queues them.
    private let requests: RequestSender
    private let failures: FailureLatch
    private let onComplete: @Sendable () -> Void
    /// The fault thread's own: what `woken` installs, and the stall limiter.
    private let faultThread: FaultThreadState
    /// Stalls the fault thread found worth reporting, for `reportStalls`
    /// to log off the fault thread.
    private let stallReports = Locked<[StallLimiter.Report]>([])
    private let onStall: @Sendable (StallLimiter.Report) -> Void
    /// Each stale fault's wait, exactly (for the summary) and bucketed (for
    /// the once-a-second status, which must not sort them all under the
    /// lock the fault thread records into).
    private let latencies = Locked<(samples: [UInt64], histogram: LatencyHistogram)>(([], LatencyHistogram()))
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
    private let rejoinedAt = Atomic<UInt64>(0)
    private let rejoinToFirstFault = Locked<[UInt64]>([])
    /// The record a restarted daemon takes over from: a page's bit there is
    /// cleared once its bytes are written, before it is installed.
    let pageState: PageStateFile?
    /// Event by event, when asked for (`DestinationConfig.tracePath`).
    private let trace: Locked<PostcopyTrace>
    private let tracing: Bool

    /// What only the fault thread touches.
    private final class FaultThreadState: @unchecked Sendable {
        // SAFETY (@unchecked): used by the fault thread alone (`woken`).
        var completions: [PostcopyTracker.Completion] = []
        var stalls: StallLimiter
        init(stalls: StallLimiter) {
            self.stalls = stalls
            completions.reserveCapacity(PostcopyTracker.Scratch.waitingCapacity)
        }
    }

    /// `onStall` hears of guest threads blocked longer than the limiter's
    /// threshold (rate-limited by it), from `reportStalls`. `urgent` is the
    /// urgent connection of generation 0; with none, postcopy starts paused
    /// (a daemon taking over waits for the agent to rejoin).
    init(memory: GuestMemory, installer: PageInstaller, stale: PageBitmap, urgent: MessageStream?,
         pageState: PageStateFile?, failures: FailureLatch, stalls: StallLimiter, tracing: Bool = false,
         scratch: PostcopyTracker.Scratch? = nil,
         onStall: @escaping @Sendable (StallLimiter.Report) -> Void = { _ in },
         onComplete: @escaping @Sendable () -> Void) throws {
        self.memory = memory
        self.installer = installer
        let tracker = PostcopyTracker(stale: stale, scratch: scratch ?? PostcopyTracker.Scratch(geometry: memory.geometry))
        self.tracker = tracker
        wakeSignal = try inStep("create the fault thread's wake-up signal") { try EventSignal() }
        requests = RequestSender(outstanding: { tracker.outstandingRequests })
        self.pageState = pageState
        self.failures = failures
        self.onComplete = onComplete
        faultThread = FaultThreadState(stalls: stalls)
        self.onStall = onStall
        // Room for a fill per 64 pages and a fault per 16 stale pages up
        // front, so that recording rarely reallocates while faults wait.
        self.tracing = tracing
        trace = Locked(PostcopyTrace(stalePages: stale.popCount,
                                    reserving: tracing ? Int(stale.popCount / 64 + stale.popCount / 16) + 1024 : 0))
        try inStep("start the thread that sends page requests") { try requests.start() }
        if let urgent { requests.use(urgent, generation: 0) }
    }

    deinit { requests.stop() }

    // MARK: fault thread

    func decide(_ fault: PageFault) -> FaultDecision {
        switch tracker.fault(on: fault.page, at: monotonicNanoseconds()) {
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
        failures.fail(.internalFailure, "resolve fault on \(fault.page)", cause: error)
    }

    /// A receiver's commit may have completed pages guest threads wait on:
    /// takes each whose every piece is in, installs it (the receiver has,
    /// as a rule: this finds it mapped and wakes any thread still waiting),
    /// records the wait, then says whether postcopy is complete.
    func woken() {
        guard acceptsPages else { return }
        let state = faultThread
        state.completions.removeAll(keepingCapacity: true)
        let now = monotonicNanoseconds()
        tracker.takeCompleted(at: now, into: &state.completions)
        guard !state.completions.isEmpty else {
            if tracker.isComplete { signalComplete() }
            return
        }
        for completion in state.completions {
            do {
                try installer.install(completion.page)
            } catch {
                failures.fail(.internalFailure, "install \(completion.page) after fetching it", cause: error)
                return
            }
        }
        tracker.installed(state.completions.count)
        latencies.withLock { latencies in
            for completion in state.completions {
                latencies.samples.append(completion.latencyNanos)
                latencies.histogram.record(completion.latencyNanos)
            }
        }
        let at = rejoinedAt.load(ordering: .relaxed)
        if at != 0, now >= at, rejoinedAt.compareExchange(expected: at, desired: 0, ordering: .relaxed).exchanged {
            rejoinToFirstFault.withLock { $0.append(now &- at) }
        }
        for completion in state.completions {
            if let report = state.stalls.record(page: completion.page.rawValue, stallNanos: completion.latencyNanos,
                                                at: now) {
                stallReports.withLock { $0.append(report) }
            }
        }
        if tracing { record(state.completions, at: now) }
        if tracker.isComplete { signalComplete() }
    }

    /// Logs the stalls the fault thread found since the last call (off the
    /// fault thread: the daemon's heartbeat thread calls this).
    func reportStalls() {
        let reports = stallReports.withLock { reports in
            defer { reports.removeAll() }
            return reports
        }
        reports.forEach(onStall)
    }

    /// Whether pages may still be claimed and written: not once the
    /// migration failed or the engine was halted.
    var acceptsPages: Bool {
        !halted.load(ordering: .sequentiallyConsistent) && failures.error == nil
    }

    /// Every page is in place, so no request is of use any more: ends the
    /// request sender, so that figures taken after it count every request
    /// that went out (one queued by a fault just before the last page
    /// arrived would otherwise go out after them, and the agent would
    /// count more than the summary).
    func stopRequests() { requests.stop() }

    /// The VMM let go of guest RAM, or the migration is over: no page is
    /// claimed or written from now on, and no request goes out.
    func halt() {
        halted.store(true, ordering: .sequentiallyConsistent)
        requests.shut()
    }

    /// The agent's connections of generation `lost` are gone: stop sending
    /// requests, unless a newer generation has rejoined already.
    func pause(lost: UInt64) {
        requests.pause(lost: lost)
    }

    /// The agent rejoined on `stream`, its urgent connection of
    /// `generation`: asks again for every page a guest
    /// thread waits on, before anything else is sent (the request sender
    /// sends the tracker's outstanding list first). Returns how many pages
    /// that is. A fault from now on asks for itself, one from before is in
    /// the list (asking twice is harmless: the agent sends the pages again,
    /// and only those still stale are written).
    @discardableResult
    func rejoin(urgent stream: MessageStream, generation: UInt64, at now: UInt64) -> UInt64 {
        rejoinedAt.store(now, ordering: .relaxed)
        requests.use(stream, generation: generation)
        return tracker.outstandingRequests.reduce(0) { $0 + $1.count }
    }

    /// For each rejoin whose first stale fault has been served: how long
    /// after the rejoin that was.
    var rejoinToFirstFaultNanos: [UInt64] { rejoinToFirstFault.withLock { $0 } }

    /// The highest PAGE_REQUEST id sent so far.
    var lastRequestID: UInt32 { requests.lastRequestID }

    // MARK: receiving threads

    /// Pages `run` arrived with `data` (nil: they are zero on the source).
    /// Writes those still stale, exactly once, records them fresh, commits
    /// them, and wakes the fault thread when a guest thread may have been
    /// waiting for them. Takes no lock (but the trace's, when tracing).
    ///
    /// Once the migration has failed (the latch is set) or the engine is
    /// halted (the VMM let go), nothing is claimed or written: a frame
    /// already buffered and decoded when that happened is dropped, and its
    /// pages stay stale in the tracker and in the page-state record, for a
    /// restarted daemon to fetch. A claim made just before the failure
    /// writes only stale pages no guest maps (they are never installed
    /// now), and is neither committed nor recorded fresh.
    ///
    /// The urgent receiver stores through the alias, which takes no lock. A
    /// bulk receiver writes with `GuestMemory.write`: on shmem that is
    /// pwrite(2), which makes a page that does not exist yet without
    /// zeroing it first (most pages, when precopy sent little), and takes
    /// the file's inode lock, which only the bulk receivers share. Throws
    /// when the kernel refuses such a write; the claimed pages are then
    /// neither committed nor recorded fresh, and the caller fails the
    /// migration.
    func fill(_ run: PageRun, data: ArraySlice<UInt8>?, urgent isUrgent: Bool) throws {
        guard acceptsPages else { return }
        let claims = tracker.claim(run)
        guard !claims.isEmpty else { return }
        var written: UInt64 = 0
        for claim in claims {
            // Claims are sub-runs of run, which the session validated.
            func put(_ bytes: UnsafeRawBufferPointer?) throws {
                if isUrgent { memory.writeThroughAlias(bytes, to: claim) } else { try memory.write(bytes, to: claim) }
            }
            if let data {
                let start = data.startIndex + Int(claim.first - run.first) * 4096
                try data[start..<(start + Int(claim.count) * 4096)].withUnsafeBytes { try put($0) }
            } else {
                try put(nil)
            }
            written += claim.count
        }
        // Failed while this thread wrote: commit nothing; the record keeps
        // these pages stale.
        guard acceptsPages else { return }
        // The pages are written: record them fresh before anything can
        // install them (the page-state invariant).
        if let pageState { for claim in claims { pageState.bitmap.markFresh(claim) } }
        // Counted before the commit: the fault thread that finds postcopy
        // complete must see every page counted.
        if isUrgent {
            urgentPages.add(written, ordering: .relaxed)
        } else {
            backgroundPages.add(written, ordering: .relaxed)
        }
        if tracing { record(claims, urgent: isUrgent, at: monotonicNanoseconds()) }
        // A guest thread waiting on a page this completed is woken from here
        // at once (a CONTINUE of a page with no stale piece is always
        // right); the fault thread, woken too, does the bookkeeping and its
        // own CONTINUE finds the page mapped. A failure here is left to that
        // one: it may be the range being let go at completion.
        let wake = tracker.commit(claims) { page in
            do {
                try installer.install(page)
                tracker.receiverInstalled(page, at: monotonicNanoseconds())
            } catch {}
        }
        if wake { wakeSignal?.signal() }
    }

    private func record(_ claims: [PageRun], urgent isUrgent: Bool, at now: UInt64) {
        let at = now &- postcopyStartedAt.load(ordering: .relaxed)
        trace.withLock { trace in
            for claim in claims {
                trace.record(.init(kind: isUrgent ? .urgentFill : .backgroundFill, atNanos: at,
                                   page: claim.first, pages: claim.count))
            }
        }
    }

    private func record(_ completions: [PostcopyTracker.Completion], at now: UInt64) {
        let at = now &- postcopyStartedAt.load(ordering: .relaxed)
        let pagesPerPage = memory.geometry.pageSize.smallPagesPerPage
        trace.withLock { trace in
            for completion in completions {
                trace.record(.init(kind: .staleFault, atNanos: at, page: completion.page.rawValue * pagesPerPage,
                                   pages: 1, waitedNanos: completion.latencyNanos))
            }
        }
    }

    /// Calls `onComplete` once, when the last stale page is in.
    func signalCompleteIfDone() {
        if tracker.isComplete { signalComplete() }
    }

    private func signalComplete() {
        if !completeSignalled.exchange(true, ordering: .sequentiallyConsistent) { onComplete() }
    }

    /// The tracker's counters, for status and the summary.
    var counters: PostcopyTracker.Counters { tracker.counters }

    /// A copy made here, under the lock, so that the array the fault
    /// thread appends to is never shared (sharing would make its next
    /// append copy it all, on the fault path).
    var staleFaultLatencies: [UInt64] {
        latencies.withLock { latencies in
            Array(unsafeUninitializedCapacity: latencies.samples.count) { buffer, count in
                count = buffer.initialize(fromContentsOf: latencies.samples)
            }
        }
    }

    /// The same, bucketed: a copy of a few KiB, whatever the count.
    var staleFaultHistogram: LatencyHistogram { latencies.withLock { $0.histogram } }

    /// The events so far, if tracing.
    var traceSnapshot: PostcopyTrace? { tracing ? trace.withLock { $0 } : nil }
}

extension PostcopyEngine {
    /// 4 KiB pages still stale.
    var stalePages: UInt64 { tracker.stalePages }

    /// The stale pages now, as a bitmap of its own.
    func staleSnapshot() -> PageBitmap { tracker.staleBitmap }
}
