import Glibc
import PostcopyCore

/// Gathers `ProbeFacts` from the running system: the kernel release,
/// userfaultfd access and features, the hugepage pool and mounts, shmem THP,
/// and a live self-test per memory kind. The verdict is `CapabilityReport`'s.
public enum CapabilityProbe {
    /// Self-test sizes: large enough to span many fault-around windows,
    /// small enough to run in milliseconds.
    public static let shmemSelfTestSize: UInt64 = 16 << 20
    public static let hugetlbSelfTestSize: UInt64 = 16 << 20

    public static func gather(requireHugetlbfs: Bool, hugetlbfsDirectory: String? = nil) -> ProbeFacts {
        let hugepages = HugepagePool(meminfo: readTextFile("/proc/meminfo") ?? "")
        let mounts = HugetlbfsMount.parse(mounts: readTextFile("/proc/mounts") ?? "")
        let features = try? Userfaultfd.offeredFeatures()

        var selfTests = [selfTest(FaultExercise(backing: .memfd, size: shmemSelfTestSize))]
        let hugePages = hugetlbSelfTestSize / PageSize.huge2M.bytes
        if hugepages.available >= hugePages {
            let backing = Backing.choose(.hugetlbfs, hugetlbfsDirectory: hugetlbfsDirectory, mounts: mounts,
                                        defaultHugepageSize: hugepages.pageSize)
            selfTests.append(selfTest(FaultExercise(backing: backing, size: hugetlbSelfTestSize)))
        } else {
            selfTests.append(.failed(.hugetlbfs, "not run: needs \(hugePages) free 2 MiB hugepages, \(hugepages.available) available"))
        }

        var facts = ProbeFacts(
            kernelRelease: kernelRelease(),
            deviceAccess: Userfaultfd.tryOpen(.device),
            syscallAccess: Userfaultfd.tryOpen(.syscall),
            features: features,
            hugepages: hugepages,
            hugetlbfsMounts: mounts,
            shmemTHP: readTextFile("/sys/kernel/mm/transparent_hugepage/shmem_enabled").flatMap(selectedSysfsChoice),
            selfTests: selfTests,
            requireHugetlbfs: requireHugetlbfs)
        facts.systemdBooted = Systemd.isBooted
        return facts
    }

    /// The strided self-test: every page read once, a stride apart, so that a
    /// page mapped behind the tracker's back (fault-around, THP) shows up as a
    /// page that did not fault. Every 64th page is a hole, which must fault as
    /// missing and read as zeros.
    static func selfTest(_ base: FaultExercise) -> SelfTestOutcome {
        var exercise = base
        exercise.order = .strided(7)
        exercise.holeEvery = 64
        exercise.timeoutSeconds = 20
        do {
            return try exercise.run().outcome
        } catch {
            return .failed(base.backing.memoryKind, "\(error)")
        }
    }

    public static func kernelRelease() -> String {
        var names = utsname()
        uname(&names)
        return withUnsafeBytes(of: &names.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }
}

/// The whole text of a small file (procfs, sysfs), or nil when unreadable.
public func readTextFile(_ path: String) -> String? {
    (try? readFileBytes(path)).map { String(decoding: $0, as: UTF8.self) }
}

/// Every byte of the file at `path`.
public func readFileBytes(_ path: String) throws(SystemCallError) -> [UInt8] {
    let fd = try checkLibc("open \(path)") { open(path, O_RDONLY | O_CLOEXEC) }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        guard count >= 0 else { throw SystemCallError("read \(path)", Errno.current) }
        if count == 0 { return bytes }
        bytes += chunk[0..<count]
    }
}

/// Writes `text` to `path` (created 0644 or truncated), every byte or an error.
public func writeTextFile(_ path: String, _ text: String) throws(SystemCallError) {
    let fd = try checkLibc("create \(path)") { open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
    defer { close(fd) }
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let count = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        guard count > 0 else { throw SystemCallError("write \(path)", Errno.current) }
        bytes = bytes.dropFirst(count)
    }
}
