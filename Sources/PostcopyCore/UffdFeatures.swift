/// The userfaultfd feature bits a kernel can offer through UFFDIO_API.
///
/// The values are the kernel's ABI (include/uapi/linux/userfaultfd.h), kept
/// here so that pure logic can reason about them without importing C.
/// Kernel: `UFFD_FEATURE_*`
public struct UffdFeatures: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let pagefaultFlagWP = UffdFeatures(rawValue: 1 << 0)
    public static let eventFork = UffdFeatures(rawValue: 1 << 1)
    public static let eventRemap = UffdFeatures(rawValue: 1 << 2)
    public static let eventRemove = UffdFeatures(rawValue: 1 << 3)
    public static let missingHugetlbfs = UffdFeatures(rawValue: 1 << 4)
    public static let missingShmem = UffdFeatures(rawValue: 1 << 5)
    public static let eventUnmap = UffdFeatures(rawValue: 1 << 6)
    public static let sigbus = UffdFeatures(rawValue: 1 << 7)
    public static let threadID = UffdFeatures(rawValue: 1 << 8)
    /// Minor faults on hugetlbfs (Linux 5.13).
    public static let minorHugetlbfs = UffdFeatures(rawValue: 1 << 9)
    /// Minor faults on shmem (Linux 5.14).
    public static let minorShmem = UffdFeatures(rawValue: 1 << 10)
    public static let exactAddress = UffdFeatures(rawValue: 1 << 11)
    public static let wpHugetlbfsShmem = UffdFeatures(rawValue: 1 << 12)
    public static let wpUnpopulated = UffdFeatures(rawValue: 1 << 13)
    public static let poison = UffdFeatures(rawValue: 1 << 14)
    public static let wpAsync = UffdFeatures(rawValue: 1 << 15)
    public static let move = UffdFeatures(rawValue: 1 << 16)

    /// Every feature this build knows by name, with the kernel's name for it.
    public static let named: [(feature: UffdFeatures, name: String)] = [
        (.pagefaultFlagWP, "PAGEFAULT_FLAG_WP"), (.eventFork, "EVENT_FORK"),
        (.eventRemap, "EVENT_REMAP"), (.eventRemove, "EVENT_REMOVE"),
        (.missingHugetlbfs, "MISSING_HUGETLBFS"), (.missingShmem, "MISSING_SHMEM"),
        (.eventUnmap, "EVENT_UNMAP"), (.sigbus, "SIGBUS"), (.threadID, "THREAD_ID"),
        (.minorHugetlbfs, "MINOR_HUGETLBFS"), (.minorShmem, "MINOR_SHMEM"),
        (.exactAddress, "EXACT_ADDRESS"), (.wpHugetlbfsShmem, "WP_HUGETLBFS_SHMEM"),
        (.wpUnpopulated, "WP_UNPOPULATED"), (.poison, "POISON"),
        (.wpAsync, "WP_ASYNC"), (.move, "MOVE"),
    ]

    /// The kernel names of the features in this set; unknown bits as hex.
    public var names: [String] {
        var result = UffdFeatures.named.filter { contains($0.feature) }.map(\.name)
        let known = UffdFeatures.named.reduce(UffdFeatures()) { $0.union($1.feature) }
        let unknown = subtracting(known).rawValue
        if unknown != 0 { result.append("0x" + String(unknown, radix: 16)) }
        return result
    }

    public var description: String { names.isEmpty ? "none" : names.joined(separator: " ") }
}

/// The kinds of memory a region can live in, and what each needs from the kernel.
public enum MemoryKind: String, Sendable, CaseIterable, CustomStringConvertible {
    /// memfd or tmpfs: 4 KiB pages.
    case shmem
    /// hugetlbfs (a mounted file or a MFD_HUGETLB memfd): 2 MiB pages.
    case hugetlbfs

    public var pageSize: PageSize { self == .shmem ? .small : .huge2M }

    /// What minor-mode postcopy on this memory needs from UFFDIO_API. MISSING
    /// is registered too, so that a page absent from the page cache (a hole)
    /// raises a fault instead of silently mapping a zero page.
    public var requiredFeatures: UffdFeatures {
        self == .shmem ? [.minorShmem, .missingShmem] : [.minorHugetlbfs, .missingHugetlbfs]
    }

    /// The first kernel release with minor faults on this memory.
    public var minimumKernel: KernelVersion {
        self == .shmem ? KernelVersion(5, 14, 0) : KernelVersion(5, 13, 0)
    }

    public var description: String { rawValue }
}
