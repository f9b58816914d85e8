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

    /// Whether a journald accepts records on its native socket. The socket
    /// file alone proves nothing: a journald started by hand and since killed
    /// leaves it behind, and connecting to it is then refused.
    static var journaldAnswers: Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let path = "/run/systemd/journal/socket"
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            buffer.copyBytes(from: path.utf8.prefix(buffer.count - 1))
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
            }
        }
    }

    /// The first 2 MiB hugetlbfs mount, if any.
    static var hugetlbfsMount: String? {
        HugetlbfsMount.first2MiB(among: HugetlbfsMount.parse(mounts: readTextFile("/proc/mounts") ?? ""),
                                 defaultPageSize: hugepagePool.pageSize)?.path
    }
}
