/// What the capability probe found, and the verdict on it.
///
/// The OS layer gathers `ProbeFacts`; this file alone decides what is
/// required, what is only worth a warning, and how the table reads, so the
/// rules are tested without a kernel.

/// How one way of opening a userfaultfd fared.
public enum AccessResult: Equatable, Sendable {
    case usable
    case unusable(String)

    public var isUsable: Bool { self == .usable }
}

/// The outcome of a live self-test on one kind of memory.
public struct SelfTestOutcome: Equatable, Sendable {
    public let memory: MemoryKind
    public let pagesTouched: UInt64
    public let faults: UInt64
    /// Pages read without raising a fault: mapped behind the tracker's back
    /// (fault-around, THP).
    public let pagesWithoutFault: UInt64
    /// Pages that faulted more than once.
    public let pagesFaultedTwice: UInt64
    /// Pages whose bytes read through the guest mapping differ from those
    /// written through the alias.
    public let pagesWithWrongBytes: UInt64
    /// Set when the test could not run to the end.
    public let error: String?

    public init(memory: MemoryKind, pagesTouched: UInt64, faults: UInt64, pagesWithoutFault: UInt64,
                pagesFaultedTwice: UInt64, pagesWithWrongBytes: UInt64, error: String? = nil) {
        self.memory = memory
        self.pagesTouched = pagesTouched
        self.faults = faults
        self.pagesWithoutFault = pagesWithoutFault
        self.pagesFaultedTwice = pagesFaultedTwice
        self.pagesWithWrongBytes = pagesWithWrongBytes
        self.error = error
    }

    public static func failed(_ memory: MemoryKind, _ error: String) -> SelfTestOutcome {
        SelfTestOutcome(memory: memory, pagesTouched: 0, faults: 0, pagesWithoutFault: 0,
                        pagesFaultedTwice: 0, pagesWithWrongBytes: 0, error: error)
    }

    public var passed: Bool {
        error == nil && pagesTouched > 0 && faults == pagesTouched && pagesWithoutFault == 0
            && pagesFaultedTwice == 0 && pagesWithWrongBytes == 0
    }

    /// One line: the verdict, then the counts that produced it.
    public var summary: String {
        if let error { return "FAIL: \(error)" }
        var problems: [String] = []
        if pagesWithoutFault > 0 {
            problems.append("\(pagesWithoutFault) pages mapped without a fault (fault-around or THP)")
        }
        if pagesFaultedTwice > 0 { problems.append("\(pagesFaultedTwice) pages faulted twice") }
        if pagesWithWrongBytes > 0 { problems.append("\(pagesWithWrongBytes) pages read wrong bytes") }
        let counts = "\(pagesTouched) pages touched, \(faults) faults"
        return problems.isEmpty ? "pass: \(counts)" : "FAIL: \(problems.joined(separator: "; ")) (\(counts))"
    }
}

/// Everything the probe gathered from the running system.
public struct ProbeFacts: Sendable {
    public var kernelRelease: String
    public var deviceAccess: AccessResult
    public var syscallAccess: AccessResult
    /// Features UFFDIO_API offered, nil when no userfaultfd could be opened.
    public var features: UffdFeatures?
    public var hugepages: HugepagePool
    public var hugetlbfsMounts: [HugetlbfsMount]
    /// /sys/kernel/mm/transparent_hugepage/shmem_enabled, nil when absent.
    public var shmemTHP: String?
    public var selfTests: [SelfTestOutcome]
    /// Whether the user asked for hugetlbfs to be required rather than optional.
    public var requireHugetlbfs: Bool
    /// Whether systemd is the init system (informational: the daemon also
    /// runs by hand).
    public var systemdBooted: Bool = false

    public init(kernelRelease: String, deviceAccess: AccessResult, syscallAccess: AccessResult,
                features: UffdFeatures?, hugepages: HugepagePool, hugetlbfsMounts: [HugetlbfsMount],
                shmemTHP: String?, selfTests: [SelfTestOutcome], requireHugetlbfs: Bool) {
        self.kernelRelease = kernelRelease
        self.deviceAccess = deviceAccess
        self.syscallAccess = syscallAccess
        self.features = features
        self.hugepages = hugepages
        self.hugetlbfsMounts = hugetlbfsMounts
        self.shmemTHP = shmemTHP
        self.selfTests = selfTests
        self.requireHugetlbfs = requireHugetlbfs
    }
}

/// The verdict: a table to print, the requirements that are missing (each a
/// one-line reason; any of them makes the probe fail) and warnings.
public struct CapabilityReport: Sendable {
    public let rows: [(name: String, value: String)]
    public let missing: [String]
    public let warnings: [String]

    public var passed: Bool { missing.isEmpty }

    public init(_ facts: ProbeFacts) {
        var rows: [(String, String)] = []
        var missing: [String] = []
        var warnings: [String] = []
        let kernel = KernelVersion(release: facts.kernelRelease)

        rows.append(("kernel", facts.kernelRelease))
        if let kernel, kernel < MemoryKind.shmem.minimumKernel {
            missing.append("kernel \(kernel) is older than \(MemoryKind.shmem.minimumKernel), the first with userfaultfd minor faults on shmem")
        } else if kernel == nil {
            warnings.append("cannot parse kernel release '\(facts.kernelRelease)'; relying on the feature probe")
        }

        rows.append(("/dev/userfaultfd", Self.describe(facts.deviceAccess)))
        rows.append(("userfaultfd(2)", Self.describe(facts.syscallAccess)))
        if !facts.deviceAccess.isUsable && !facts.syscallAccess.isUsable {
            missing.append("no usable userfaultfd: /dev/userfaultfd \(Self.describe(facts.deviceAccess)); userfaultfd(2) \(Self.describe(facts.syscallAccess))")
        }

        if let features = facts.features {
            rows.append(("uffd features", features.description))
            Self.requireFeatures(of: .shmem, in: features, required: true, &missing, &warnings)
            Self.requireFeatures(of: .hugetlbfs, in: features, required: facts.requireHugetlbfs,
                                 &missing, &warnings)
        } else {
            rows.append(("uffd features", "unknown (no userfaultfd could be opened)"))
        }

        let pool = facts.hugepages
        rows.append(("hugepages (2 MiB)", "\(pool.total) total, \(pool.free) free, \(pool.reserved) reserved, \(pool.surplus) surplus"))
        let mounts = facts.hugetlbfsMounts.map { mount in
            mount.path + (mount.pageSize.map { " (pagesize \($0 >> 10) KiB)" } ?? "")
        }
        rows.append(("hugetlbfs mounts", mounts.isEmpty ? "none" : mounts.joined(separator: ", ")))
        if pool.available == 0 {
            let reason = "no free 2 MiB hugepages (reserve some: echo N > /proc/sys/vm/nr_hugepages)"
            if facts.requireHugetlbfs { missing.append(reason) } else { warnings.append(reason) }
        }
        if facts.hugetlbfsMounts.isEmpty {
            warnings.append("no hugetlbfs mount: file-backed 2 MiB regions need one (mount -t hugetlbfs none /dev/hugepages); MFD_HUGETLB memfds still work")
        }

        rows.append(("systemd", facts.systemdBooted ? "booted with systemd" : "not the init system (postcopyd runs by hand)"))
        rows.append(("shmem THP", facts.shmemTHP ?? "unknown"))
        if let thp = facts.shmemTHP, thp == "force" {
            missing.append("shmem THP is 'force': huge pages would map guest memory behind minor-fault tracking; set /sys/kernel/mm/transparent_hugepage/shmem_enabled to never or advise")
        }

        for test in facts.selfTests {
            rows.append(("self-test \(test.memory)", test.summary))
            if !test.passed && (test.memory == .shmem || facts.requireHugetlbfs) {
                missing.append("self-test on \(test.memory) failed: \(test.summary)")
            } else if !test.passed {
                warnings.append("self-test on \(test.memory) failed: \(test.summary)")
            }
        }
        self.rows = rows
        self.missing = missing
        self.warnings = warnings
    }

    private static func describe(_ access: AccessResult) -> String {
        switch access {
        case .usable: return "usable"
        case let .unusable(reason): return "unusable (\(reason))"
        }
    }

    private static func requireFeatures(of memory: MemoryKind, in features: UffdFeatures, required: Bool,
                                        _ missing: inout [String], _ warnings: inout [String]) {
        let absent = memory.requiredFeatures.subtracting(features)
        guard !absent.isEmpty else { return }
        let reason = "userfaultfd lacks \(absent.description) needed for postcopy on \(memory) (Linux ≥ \(memory.minimumKernel))"
        if required { missing.append(reason) } else { warnings.append(reason) }
    }

    /// The report as aligned text: the table, then warnings and missing
    /// requirements one per line, then the verdict.
    public func rendered() -> String {
        let width = rows.map(\.name.count).max() ?? 0
        var lines = rows.map { row in
            row.name + String(repeating: " ", count: width - row.name.count) + "  " + row.value
        }
        lines += warnings.map { "warning: \($0)" }
        lines += missing.map { "missing: \($0)" }
        lines.append(passed ? "result: ready for postcopy" : "result: NOT ready (\(missing.count) missing requirement\(missing.count == 1 ? "" : "s"))")
        return lines.joined(separator: "\n")
    }
}
