import Glibc
import PostcopyCore
import PostcopyOS

/// What this machine lets the tests do, for their enabled(if:) traits.
enum Host {
    static let isRoot = geteuid() == 0
    static let needsRoot = "needs root for /dev/userfaultfd and kernel-originated faults (run 'make test' as root)"

    static func hasHugepages(_ count: UInt64) -> Bool {
        isRoot && HugepagePool(meminfo: readTextFile("/proc/meminfo") ?? "").available >= count
    }

    /// The first 2 MiB hugetlbfs mount, if any.
    static var hugetlbfsMount: String? {
        let pool = HugepagePool(meminfo: readTextFile("/proc/meminfo") ?? "")
        return HugetlbfsMount.first2MiB(among: HugetlbfsMount.parse(mounts: readTextFile("/proc/mounts") ?? ""),
                                        defaultPageSize: pool.pageSize)?.path
    }

    static func needsHugepages(_ count: UInt64) -> String {
        "needs root and \(count) free 2 MiB hugepages ('make test' reserves them)"
    }
}
