import Glibc
import PostcopyCore

/// Puts guest RAM back into 2 MiB pages once postcopy is over (issue 22):
/// a 4 KiB postcopy on shmem leaves it mapped in 4 KiB pages, kept so by
/// MADV_NOHUGEPAGE while postcopy ran, and the guest pays for it in TLB
/// misses. Call it only once the last page is in place and the range is
/// unregistered from userfaultfd, in the process that maps guest RAM (the
/// VMM): MADV_COLLAPSE works on the caller's address space.
///
/// The steps: skip hugetlbfs (already 2 MiB) and shmem THP settings that
/// refuse collapse (`ShmemHugepageSettings`); count the PMD-mapped extents
/// in /proc/self/smaps; MADV_HUGEPAGE on the range (clearing its
/// MADV_NOHUGEPAGE, without which the kernel refuses); MADV_COLLAPSE each
/// 2 MiB extent in turn that has a page in memory (mincore), as
/// `CollapseRun` decides; count again. An extent with any page becomes a
/// whole 2 MiB page, the rest of it zero-filled: sparse guest RAM grows, as
/// it would under khugepaged with its default max_ptes_none (511).
public enum HugepageCollapser {
    /// The shmem THP settings as sysfs has them now.
    public static func currentSettings() -> ShmemHugepageSettings {
        ShmemHugepageSettings(topText: readTextFile(ShmemHugepageSettings.topPath),
                              pmdText: readTextFile(ShmemHugepageSettings.pmdPath))
    }

    /// What /proc/self/smaps says about `mapping`'s range.
    public static func smaps(of mapping: Mapping) -> SmapsRange {
        SmapsRange(smaps: readTextFile("/proc/self/smaps") ?? "", start: mapping.address,
                   end: mapping.address + mapping.length)
    }

    /// Collapses `mapping` (guest RAM of `kind`) on the calling thread and
    /// says what came of it. It never throws: a collapse that cannot be
    /// done leaves RAM in 4 KiB pages, which is where it was, and the
    /// report says why. `settings` is for tests; nil reads sysfs.
    public static func run(_ mapping: Mapping, kind: MemoryKind,
                           settings: ShmemHugepageSettings? = nil) -> HugepageCollapseReport {
        var report = HugepageCollapseReport()
        let extents = HugepageExtents(base: mapping.address, length: mapping.length)
        report.bytes = mapping.length
        report.extents = UInt64(extents.count)
        guard kind == .shmem else {
            report.skipped = "guest RAM is on hugetlbfs: already in 2 MiB pages"
            return report
        }
        let settings = settings ?? currentSettings()
        report.pmdMappedBefore = smaps(of: mapping).pmdMappedExtents
        report.pmdMappedAfter = report.pmdMappedBefore
        if let refusal = settings.collapseRefusal {
            report.skipped = refusal
            return report
        }
        let started = monotonicNanoseconds()
        let cpuStarted = ProcessUsage.threadCPUSeconds()
        do {
            try mapping.adviseHugepages()
        } catch {
            report.skipped = "\(error)"
            return report
        }
        var run = CollapseRun(extents: extents.count, refusalExplanation: settings.refusalExplanation)
        while !run.isFinished, let offset = extents.offset(of: run.current) {
            let resident = (try? mapping.residentSmallPages(inHugepageAt: offset)) ?? 1
            let outcome = resident == 0 ? .empty : result(of: mapping.collapseHugepage(at: offset))
            if run.record(outcome) == .retry { sleepNanoseconds(1_000_000) }
        }
        report.seconds = Double(monotonicNanoseconds() - started) / 1e9
        report.cpuSeconds = ProcessUsage.threadCPUSeconds() - cpuStarted
        report.collapsed = run.collapsed
        report.empty = run.empty
        report.failed = run.failed
        report.retries = run.retries
        report.stopped = run.stopReason
        report.firstFailure = run.firstFailure
        report.pmdMappedAfter = smaps(of: mapping).pmdMappedExtents
        return report
    }

    /// `run` on a thread of its own, named `postcopy-thp`, at nice 19;
    /// `done` gets the report on that thread. Nice 19 rather than
    /// SCHED_IDLE: MADV_COLLAPSE holds the extent's 512 page locks while it
    /// copies them into the new 2 MiB page, and a guest thread touching one
    /// waits for them. Under SCHED_IDLE a busy guest could keep the
    /// collapsing thread off the CPU with the locks held, stalling the very
    /// vCPU that keeps it off; at nice 19 it still gets a small share
    /// (weight 15 against 1024 at nice 0), so a lock is held for a bounded
    /// time, while the guest keeps nearly all the CPU.
    public static func start(_ mapping: Mapping, kind: MemoryKind,
                             done: @escaping @Sendable (HugepageCollapseReport) -> Void) throws(SystemCallError) -> OSThread {
        try OSThread.start(name: "postcopy-thp") {
            try? OSThread.setCurrentScheduling(.background(nice: 19))
            done(run(mapping, kind: kind))
        }
    }

    /// What MADV_COLLAPSE's errno means for the run.
    static func result(of error: Errno?) -> CollapseResult {
        switch error?.rawValue {
        case nil: .collapsed
        case EAGAIN: .busy
        case EINVAL: .refused
        case ENOMEM: .noMemory
        case let code?: .failed(Errno(code).name)
        }
    }
}
