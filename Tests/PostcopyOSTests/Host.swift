import Glibc
import PostcopyCore
import PostcopyOS

/// What this machine lets the tests do, for their enabled(if:) traits: a
/// test that cannot run says why, visibly, instead of passing silently.
enum Host {
    static let isRoot = geteuid() == 0
    static let needsRoot = "needs root for /dev/userfaultfd and kernel-originated faults (run 'make test' as root)"

    static var hugepagePool: HugepagePool { HugepagePool(meminfo: readTextFile("/proc/meminfo") ?? "") }

    static func hasHugepages(_ count: UInt64) -> Bool { isRoot && hugepagePool.available >= count }

    static func needsHugepages(_ count: UInt64) -> String {
        "needs root and \(count) free 2 MiB hugepages (\(hugepagePool.available) available; 'make test' reserves them)"
    }

    /// The first 2 MiB hugetlbfs mount, if any.
    static var hugetlbfsMount: String? {
        HugetlbfsMount.first2MiB(among: HugetlbfsMount.parse(mounts: readTextFile("/proc/mounts") ?? ""),
                                 defaultPageSize: hugepagePool.pageSize)?.path
    }
}
