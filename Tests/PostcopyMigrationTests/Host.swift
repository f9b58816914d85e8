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

    static func needsHugepages(_ count: UInt64) -> String {
        "needs root and \(count) free 2 MiB hugepages ('make test' reserves them)"
    }
}
