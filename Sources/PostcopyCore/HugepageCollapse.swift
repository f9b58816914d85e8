/// Putting guest RAM back into 2 MiB pages after a 4 KiB postcopy on shmem
/// (issue 22). While postcopy runs, THP is kept off the guest range
/// (MADV_NOHUGEPAGE): a collapse would map pages behind minor-fault
/// tracking. Once the last page is in and the range is unregistered, the
/// VMM asks `MADV_COLLAPSE` (Linux 6.1+) for each 2 MiB extent. This file
/// is the pure half: which extents, what each outcome means, what the
/// tmpfs/shmem THP settings allow, and the report.

/// The 2 MiB-aligned extents that lie wholly inside a mapping of `length`
/// bytes at host address `base`: what MADV_COLLAPSE can turn into PMD
/// mappings. A head or tail shorter than 2 MiB is left in 4 KiB pages.
public struct HugepageExtents: Equatable, Sendable {
    /// Offset in the mapping of the first extent.
    public let firstOffset: UInt64
    public let count: Int

    public static let extentBytes = PageSize.huge2M.bytes

    public init(base: UInt64, length: UInt64) {
        let size = Self.extentBytes
        let head = (size - base % size) % size
        firstOffset = head
        count = length > head ? Int((length - head) / size) : 0
    }

    /// The offset in the mapping of extent `index`; nil outside.
    public func offset(of index: Int) -> RegionOffset? {
        guard index >= 0, index < count else { return nil }
        return RegionOffset(firstOffset + UInt64(index) * Self.extentBytes)
    }
}

/// What one `MADV_COLLAPSE` of one extent came to, as the OS layer sorts
/// its errno.
public enum CollapseResult: Equatable, Sendable {
    /// The extent is one 2 MiB page now (or was already).
    case collapsed
    /// No page of the extent is in memory (a hole in the file: the guest
    /// never wrote it, or postcopyd left a zero page out), so it was not
    /// asked: MADV_COLLAPSE answers EINVAL for an extent that is all hole
    /// (Linux 6.18), which would read as a refusal of the whole range.
    case empty
    /// EAGAIN: a page was locked or busy; worth another try.
    case busy
    /// EINVAL: the kernel will not collapse this range at all (THP settings,
    /// MADV_NOHUGEPAGE, PR_SET_THP_DISABLE, or no MADV_COLLAPSE).
    case refused
    /// ENOMEM: no 2 MiB page could be had (or the range is unmapped).
    case noMemory
    /// Anything else, with its errno's name, for this extent only.
    case failed(String)
}

/// The collapse of a range as a state machine: the caller asks MADV_COLLAPSE
/// for `current` (unless the extent is empty), records the result, and does
/// what it is told. Rules: an empty extent is counted and passed; one that
/// is busy is tried `attempts` times in all; one that fails otherwise is
/// counted and the next one tried (one bad extent does not stop the rest);
/// EINVAL or ENOMEM stops the run, said once, since every extent after
/// would fail the same way.
public struct CollapseRun: Equatable, Sendable {
    public enum Action: Equatable, Sendable {
        /// Ask again for `current` (after a short pause).
        case retry
        /// Go on to `current`, the next extent.
        case next
        /// Nothing more to do: finished, or stopped (`stopReason`).
        case stop
    }

    public static let attempts = 3

    public let extents: Int
    /// What EINVAL means here, naming the setting that refuses (see
    /// `ShmemHugepageSettings.refusalExplanation`).
    public let refusalExplanation: String
    /// The extent to ask for next.
    public private(set) var current = 0
    public private(set) var collapsed: UInt64 = 0
    public private(set) var empty: UInt64 = 0
    public private(set) var failed: UInt64 = 0
    public private(set) var retries: UInt64 = 0
    /// Why the run stopped before the last extent, once.
    public private(set) var stopReason: String?
    /// The first extent that failed alone, and why.
    public private(set) var firstFailure: String?
    private var attempt = 1

    public init(extents: Int, refusalExplanation: String) {
        self.extents = extents
        self.refusalExplanation = refusalExplanation
    }

    public var isFinished: Bool { stopReason != nil || current >= extents }

    /// Records what asking for `current` came to.
    public mutating func record(_ result: CollapseResult) -> Action {
        precondition(!isFinished, "a result recorded after the run finished")
        switch result {
        case .collapsed:
            collapsed += 1
        case .empty:
            empty += 1
        case .busy where attempt < Self.attempts:
            attempt += 1
            retries += 1
            return .retry
        case .busy:
            failed += 1
            if firstFailure == nil { firstFailure = "extent \(current): EAGAIN \(Self.attempts) times (pages busy)" }
        case .refused:
            stopReason = "MADV_COLLAPSE refused (EINVAL) at extent \(current): \(refusalExplanation)"
            return .stop
        case .noMemory:
            stopReason = "MADV_COLLAPSE failed (ENOMEM) at extent \(current): no free 2 MiB page could be made (or guest RAM was unmapped); the rest stay in 4 KiB pages"
            return .stop
        case let .failed(name):
            failed += 1
            if firstFailure == nil { firstFailure = "extent \(current): \(name)" }
        }
        attempt = 1
        current += 1
        return isFinished ? .stop : .next
    }
}

/// The THP settings for tmpfs/shmem that decide MADV_COLLAPSE of shmem:
/// /sys/kernel/mm/transparent_hugepage/shmem_enabled and, since Linux 6.11,
/// hugepages-2048kB/shmem_enabled. MADV_COLLAPSE ignores them except to be
/// refused. Measured on Linux 6.18 (docs/kernel.md): with the per-size file
/// at `inherit`, the top one allows collapse at `never`, `advise`,
/// `within_size`, `always` and `force`, and refuses it (EINVAL) at `deny`;
/// the per-size file at `never` refuses it (EINVAL) whatever the top one
/// says, and at `advise`, `within_size` or `always` allows it (unless the
/// top one is `deny`).
public struct ShmemHugepageSettings: Equatable, Sendable {
    public static let topPath = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
    public static let pmdPath = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled"

    /// The selected value of each file, nil when the file is absent.
    public var top: String?
    public var pmd: String?

    public init(top: String?, pmd: String?) {
        self.top = top
        self.pmd = pmd
    }

    /// From the files' texts (`always within_size advise [never] deny force`).
    public init(topText: String?, pmdText: String?) {
        self.init(top: topText.flatMap(selectedSysfsChoice), pmd: pmdText.flatMap(selectedSysfsChoice))
    }

    /// Why these settings make the kernel refuse MADV_COLLAPSE on shmem,
    /// naming the setting and what to write; nil when they allow it.
    public var collapseRefusal: String? {
        if top == "deny" {
            return "\(Self.topPath) is 'deny', which refuses MADV_COLLAPSE on shmem; any other value allows it (e.g. echo never > \(Self.topPath))"
        }
        if pmd == "never" {
            return "\(Self.pmdPath) is 'never', which refuses MADV_COLLAPSE on shmem whatever shmem_enabled says; 'inherit' (with shmem_enabled not 'deny') or 'advise' allows it"
        }
        return nil
    }

    /// What EINVAL from MADV_COLLAPSE means under these settings.
    public var refusalExplanation: String {
        collapseRefusal ?? "the shmem THP settings allow it (shmem_enabled \(top ?? "absent"), hugepages-2048kB/shmem_enabled \(pmd ?? "absent")), so the range is MADV_NOHUGEPAGE, THP is off for the process (prctl PR_SET_THP_DISABLE), or the kernel lacks MADV_COLLAPSE (Linux < 6.1)"
    }
}

/// What the collapse after postcopy did, for the VMM's summary.
public struct HugepageCollapseReport: Codable, Equatable, Sendable {
    /// 2 MiB extents wholly inside guest RAM.
    public var extents: UInt64 = 0
    /// Extents mapped by 2 MiB page-table entries, from /proc/self/smaps
    /// (`ShmemPmdMapped` + `FilePmdMapped`), before and after.
    public var pmdMappedBefore: UInt64 = 0
    public var pmdMappedAfter: UInt64 = 0
    /// MADV_COLLAPSE calls that succeeded, extents left alone for having
    /// no page in memory, and extents that failed alone.
    public var collapsed: UInt64 = 0
    public var empty: UInt64 = 0
    public var failed: UInt64 = 0
    /// EAGAIN answers tried again.
    public var retries: UInt64 = 0
    /// Wall time, and the collapsing thread's CPU time (the kernel's copy
    /// into new 2 MiB pages is system time of that thread).
    public var seconds: Double = 0
    public var cpuSeconds: Double = 0
    /// Guest RAM's size, for the cost per GiB.
    public var bytes: UInt64 = 0
    /// Why nothing was asked (hugetlbfs, turned off, settings refuse).
    public var skipped: String?
    /// Why the run stopped before the last extent.
    public var stopped: String?
    /// The first extent that failed alone, and why.
    public var firstFailure: String?

    public init() {}

    /// Extents that went from 4 KiB to 2 MiB mappings.
    public var newlyMapped: UInt64 { pmdMappedAfter > pmdMappedBefore ? pmdMappedAfter - pmdMappedBefore : 0 }

    /// CPU seconds per GiB of guest RAM.
    public var cpuSecondsPerGiB: Double { bytes > 0 ? cpuSeconds / (Double(bytes) / Double(1 << 30)) : 0 }

    public var lines: [String] {
        if let skipped { return ["huge pages: not collapsed: \(skipped)"] }
        var lines = ["huge pages: \(pmdMappedAfter) of \(extents) 2 MiB extents mapped huge (\(pmdMappedBefore) before;"
            + " \(collapsed) collapsed, \(empty) empty, \(failed) failed, \(retries) retried) in \(fixed(seconds, 2)) s,"
            + " \(fixed(cpuSeconds, 2)) CPU s (\(fixed(cpuSecondsPerGiB, 2)) per GiB)"]
        if let stopped { lines.append("huge pages: stopped early: \(stopped)") }
        if let firstFailure { lines.append("huge pages: first failure: \(firstFailure)") }
        return lines
    }
}
