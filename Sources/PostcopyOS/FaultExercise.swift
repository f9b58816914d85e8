import Glibc
import PostcopyCore
import Synchronization

/// A whole round trip through the fault path on one process: guest RAM is
/// filled through the alias, a second mapping is registered in minor (and
/// missing) mode, and a thread standing in for a vCPU reads every page in a
/// chosen order while the `FaultLoop` resolves the faults.
///
/// The capability probe's self-test, `postcopyd demo`, the integration
/// tests and the fault benchmark are all this exercise with other settings.
public struct FaultExercise: Sendable {
    public var backing: Backing
    public var size: UInt64
    public var order: TouchOrder
    /// Every `holeEvery`-th page (0, n, 2n, …) is never written, so it is a
    /// hole that must fault as missing and read as zeros. nil: no holes.
    public var holeEvery: UInt64?
    /// Compare every byte read through the guest mapping with what was
    /// written through the alias (off for timing runs: only one word is read).
    public var verifyBytes: Bool
    /// Record how long each page's first touch took.
    public var recordLatencies: Bool
    public var seed: UInt64
    /// How long the toucher may take before the exercise gives up and
    /// unregisters the range to free it.
    public var timeoutSeconds: Double

    public init(backing: Backing, size: UInt64, order: TouchOrder = .random(seed: 1), holeEvery: UInt64? = nil,
                verifyBytes: Bool = true, recordLatencies: Bool = false, seed: UInt64 = 0x5eed,
                timeoutSeconds: Double = 120) {
        self.backing = backing
        self.size = size
        self.order = order
        self.holeEvery = holeEvery
        self.verifyBytes = verifyBytes
        self.recordLatencies = recordLatencies
        self.seed = seed
        self.timeoutSeconds = timeoutSeconds
    }

    func isHole(_ page: UInt64) -> Bool { holeEvery.map { page % $0 == 0 } ?? false }

    /// Runs the exercise. Set-up failures throw; what happened to the pages
    /// is in the report.
    public func run() throws -> FaultExerciseReport {
        let memory = try inStep("create guest RAM") { try GuestMemory(backing: backing, size: size) }
        let geometry = memory.geometry
        let fillStart = monotonicNanoseconds()
        fill(memory)
        let fillNanoseconds = monotonicNanoseconds() - fillStart

        let guest = try inStep("map guest view") { try memory.mapGuestView() }
        let kind = backing.memoryKind
        let uffd = try inStep("open userfaultfd") { try Userfaultfd.open(enabling: kind.requiredFeatures) }
        let ioctls = try inStep("register guest range") {
            try uffd.register(start: guest.address, length: guest.length, mode: [.minor, .missing])
        }
        guard ioctls.contains(.continue) else {
            throw ContextError(step: "register guest range",
                               cause: SystemCallError("the range does not support UFFDIO_CONTINUE", .invalid))
        }
        let installer = PageInstaller(uffd: uffd, file: memory.file, guestBase: guest.address)
        let resolver = CountingResolver(pageCount: geometry.pageCount)
        let loop = try FaultLoop(installer: installer, resolver: resolver)
        try loop.start()
        defer { loop.stop() }

        let pages = order.pages(count: geometry.pageCount)
        let toucher = try Toucher(exercise: self, guest: guest, geometry: geometry, pages: pages)
        let thread = try OSThread.start(name: "postcopy-vcpu") { toucher.run() }
        let timedOut = !toucher.waitUntilDone(timeoutSeconds: timeoutSeconds, loop: loop)
        if timedOut {
            // Unregistering wakes the blocked toucher; it then reads unhindered.
            try? uffd.release(start: guest.address, length: guest.length)
        }
        thread.join()
        loop.stop()
        if !timedOut {
            try inStep("unregister guest range") { try uffd.unregister(start: guest.address, length: guest.length) }
        }

        var problem = loop.failureReason ?? resolver.firstFailure
        if timedOut {
            problem = "toucher did not finish within \(timeoutSeconds) s" + (problem.map { ": \($0)" } ?? "")
        }
        return FaultExerciseReport(
            backing: backing, geometry: geometry, pagesTouched: UInt64(pages.count),
            minorFaults: loop.counters.minorFaults.load(ordering: .relaxed),
            missingFaults: loop.counters.missingFaults.load(ordering: .relaxed),
            pagesWithoutFault: resolver.pages(faultedTimes: 0),
            pagesFaultedTwice: resolver.pagesFaultedMoreThanOnce(),
            pagesWithWrongBytes: toucher.wrongPages.load(ordering: .relaxed),
            alreadyMapped: installer.counters.alreadyMapped.load(ordering: .relaxed),
            retries: installer.counters.retries.load(ordering: .relaxed),
            fillNanoseconds: fillNanoseconds, touchNanoseconds: toucher.elapsedNanoseconds,
            latencies: toucher.latencies, error: problem,
            holes: (0..<geometry.pageCount).reduce(0) { $0 + (isHole($1) ? 1 : 0) })
    }

    /// Writes the pattern through the alias into every page but the holes.
    private func fill(_ memory: GuestMemory) {
        let geometry = memory.geometry
        let words = geometry.pageSize.bytes / 8
        for page in 0..<geometry.pageCount where !isHole(page) {
            memory.withAliasPage(PageIndex(page)) { bytes in
                let typed = bytes.bindMemory(to: UInt64.self)
                for word in 0..<words {
                    typed[Int(word)] = patternWord(page: page, word: word, seed: seed)
                }
            }
        }
    }
}

/// What a `FaultExercise` saw.
public struct FaultExerciseReport: Sendable {
    public let backing: Backing
    public let geometry: PageGeometry
    public let pagesTouched: UInt64
    public let minorFaults: UInt64
    public let missingFaults: UInt64
    public let pagesWithoutFault: UInt64
    public let pagesFaultedTwice: UInt64
    public let pagesWithWrongBytes: UInt64
    /// CONTINUEs that found the page already mapped (EEXIST).
    public let alreadyMapped: UInt64
    /// CONTINUEs retried after EAGAIN.
    public let retries: UInt64
    public let fillNanoseconds: UInt64
    public let touchNanoseconds: UInt64
    /// Per-page first-touch durations in ns, in touch order (when recorded).
    public let latencies: [UInt64]
    public let error: String?
    /// Pages left unwritten on purpose.
    public let holes: UInt64

    public var faults: UInt64 { minorFaults + missingFaults }

    /// Wall time per touched page, fault resolution included.
    public var nanosecondsPerPage: Double { Double(touchNanoseconds) / Double(max(pagesTouched, 1)) }

    /// What happened, for people: one fact per line.
    public var summaryLines: [String] {
        var lines = [
            "region:        \(ByteSize.format(geometry.regionSize)) of \(backing), \(geometry.pageCount) pages",
            "filled:        \(geometry.pageCount - holes) pages through the alias in \(fixed(Double(fillNanoseconds) / 1e6, 1)) ms, \(holes) left as holes",
            "touched:       \(pagesTouched) pages through the registered guest mapping in \(fixed(Double(touchNanoseconds) / 1e6, 1)) ms",
            "faults:        \(minorFaults) minor (UFFDIO_CONTINUE), \(missingFaults) missing (hole materialized, then CONTINUE)",
            "per page:      \(fixed(nanosecondsPerPage / 1000, 2)) µs from first touch to resolved, wall time",
            "kernel quirks: \(alreadyMapped) already mapped (EEXIST), \(retries) retried (EAGAIN)",
            "checks:        \(outcome.summary)",
        ]
        if let summary = LatencySummary(latencies.map { Double($0) }) {
            lines.insert("latency:       p50 \(fixed(summary.median / 1000, 1)) µs, p99 \(fixed(summary.p99 / 1000, 1)) µs, max \(fixed(summary.max / 1000, 1)) µs", at: 5)
        }
        return lines
    }

    public var outcome: SelfTestOutcome {
        SelfTestOutcome(memory: backing.memoryKind, pagesTouched: pagesTouched, faults: faults,
                        pagesWithoutFault: pagesWithoutFault, pagesFaultedTwice: pagesFaultedTwice,
                        pagesWithWrongBytes: pagesWithWrongBytes, error: error)
    }
}

/// Counts faults per page. Written only on the fault thread; read once the
/// loop has stopped (joining the thread orders the reads after the writes).
final class CountingResolver: FaultResolver, @unchecked Sendable {
    private let counts: UnsafeMutableBufferPointer<UInt8>
    private let failure = Locked<String?>(nil)

    init(pageCount: UInt64) {
        counts = .allocate(capacity: Int(pageCount))
        counts.initialize(repeating: 0)
    }

    deinit { counts.deallocate() }

    func decide(_ fault: PageFault) -> FaultDecision {
        let index = Int(fault.page.rawValue)
        if counts[index] < UInt8.max { counts[index] += 1 }
        return .install
    }

    func installFailed(_ fault: PageFault, _ error: InstallError) {
        failure.withLock { first in
            if first == nil { first = "\(error)" }
        }
    }

    var firstFailure: String? { failure.withLock { $0 } }

    func pages(faultedTimes times: UInt8) -> UInt64 { UInt64(counts.lazy.filter { $0 == times }.count) }

    func pagesFaultedMoreThanOnce() -> UInt64 { UInt64(counts.lazy.filter { $0 > 1 }.count) }
}

/// The stand-in vCPU: reads pages through the guest mapping in order.
final class Toucher: @unchecked Sendable {
    let exercise: FaultExercise
    let guest: Mapping
    let geometry: PageGeometry
    let pages: [UInt64]
    let wrongPages = Atomic<UInt64>(0)
    let done = Atomic<Bool>(false)
    let doneSignal: EventSignal
    // SAFETY: written only by the toucher thread, read after it is joined.
    private(set) var latencies: [UInt64] = []
    /// From the first touch to the last, measured on the toucher thread.
    private(set) var elapsedNanoseconds: UInt64 = 0

    init(exercise: FaultExercise, guest: Mapping, geometry: PageGeometry, pages: [UInt64]) throws {
        doneSignal = try EventSignal()
        self.exercise = exercise
        self.guest = guest
        self.geometry = geometry
        self.pages = pages
    }

    func run() {
        defer {
            done.store(true, ordering: .releasing)
            doneSignal.signal()
        }
        var samples = exercise.recordLatencies ? [UInt64](repeating: 0, count: pages.count) : []
        let pageBytes = Int(geometry.pageSize.bytes)
        var wrong: UInt64 = 0
        var sink: UInt64 = 0
        let start = monotonicNanoseconds()
        for (position, page) in pages.enumerated() {
            let bytes = UnsafeRawPointer(guest.pointer(toSmallPage: UInt64(page) * UInt64(pageBytes / 4096)))
            let before = exercise.recordLatencies ? monotonicNanoseconds() : 0
            let first = bytes.load(as: UInt64.self)
            if exercise.recordLatencies { samples[position] = monotonicNanoseconds() - before }
            sink ^= first
            if exercise.verifyBytes && !pageMatches(page, bytes) { wrong += 1 }
        }
        elapsedNanoseconds = monotonicNanoseconds() - start
        wrongPages.store(wrong, ordering: .relaxed)
        latencies = samples
        Toucher.keep(sink)
    }

    private func pageMatches(_ page: UInt64, _ start: UnsafeRawPointer) -> Bool {
        let words = UnsafeBufferPointer(start: start.assumingMemoryBound(to: UInt64.self),
                                        count: Int(geometry.pageSize.bytes / 8))
        if exercise.isHole(page) { return words.allSatisfy { $0 == 0 } }
        for (index, value) in words.enumerated()
        where value != patternWord(page: page, word: UInt64(index), seed: exercise.seed) {
            return false
        }
        return true
    }

    /// Waits until the run ends, the loop fails, or the timeout passes;
    /// returns false on timeout or loop failure. Sleeps in poll on an
    /// eventfd the toucher signals, waking every 100 ms to look at the loop,
    /// so that the waiting thread does not compete with the fault path.
    func waitUntilDone(timeoutSeconds: Double, loop: FaultLoop) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(timeoutSeconds * 1e9)
        var waiter = pollfd(fd: doneSignal.fd, events: Int16(POLLIN), revents: 0)
        while !done.load(ordering: .acquiring) {
            if loop.failure != nil || monotonicNanoseconds() > deadline { return false }
            _ = poll(&waiter, 1, 100)
        }
        return true
    }

    /// Keeps the reads from being optimised away.
    @inline(never)
    static func keep(_ value: UInt64) {
        if value == 0x0bad_f00d_dead_beef { print("") }
    }
}
