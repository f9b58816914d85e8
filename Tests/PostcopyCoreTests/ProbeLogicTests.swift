import PostcopyCore
import Testing

@Suite struct KernelVersionTests {
    @Test func parsesReleases() {
        #expect(KernelVersion(release: "6.1.0-18-amd64") == KernelVersion(6, 1, 0))
        #expect(KernelVersion(release: "5.14.0-rc3") == KernelVersion(5, 14, 0))
        #expect(KernelVersion(release: "6.18.44-fc-v657") == KernelVersion(6, 18, 44))
        #expect(KernelVersion(release: "5.13") == KernelVersion(5, 13, 0))
        #expect(KernelVersion(release: "linux") == nil)
        #expect(KernelVersion(release: "6") == nil)
    }

    @Test func ordersByNumbers() {
        #expect(KernelVersion(5, 9, 0) < KernelVersion(5, 14, 0))
        #expect(KernelVersion(5, 14, 0) < KernelVersion(6, 0, 0))
        #expect(!(KernelVersion(5, 14, 1) < KernelVersion(5, 14, 0)))
    }
}

@Suite struct ProcFileTests {
    @Test func meminfoHugepages() {
        let text = """
        MemTotal:       24579004 kB
        HugePages_Total:     320
        HugePages_Free:      300
        HugePages_Rsvd:       20
        HugePages_Surp:        0
        Hugepagesize:       2048 kB
        """
        let pool = HugepagePool(meminfo: text)
        #expect(pool.total == 320 && pool.free == 300 && pool.reserved == 20 && pool.surplus == 0)
        #expect(pool.pageSize == 2 << 20)
        #expect(pool.available == 280)
        #expect(HugepagePool(meminfo: "").available == 0)
    }

    @Test func hugetlbfsMounts() {
        let text = """
        proc /proc proc rw,nosuid 0 0
        none /dev/hugepages hugetlbfs rw,relatime,pagesize=2M,mode=1770 0 0
        hugetlbfs /mnt/huge\\0401g hugetlbfs rw,pagesize=1024M 0 0
        nodev /mnt/plain hugetlbfs rw,relatime 0 0
        tmpfs /dev/shm tmpfs rw 0 0
        """
        #expect(HugetlbfsMount.parse(mounts: text) == [
            HugetlbfsMount(path: "/dev/hugepages", pageSize: 2 << 20),
            HugetlbfsMount(path: "/mnt/huge 1g", pageSize: 1 << 30),
            HugetlbfsMount(path: "/mnt/plain", pageSize: nil),
        ])
    }

    @Test func first2MiBMountHonoursTheDefaultSize() {
        let mounts = [HugetlbfsMount(path: "/mnt/1g", pageSize: 1 << 30), HugetlbfsMount(path: "/mnt/default", pageSize: nil),
                      HugetlbfsMount(path: "/mnt/2m", pageSize: 2 << 20)]
        #expect(HugetlbfsMount.first2MiB(among: mounts, defaultPageSize: 2 << 20)?.path == "/mnt/default")
        #expect(HugetlbfsMount.first2MiB(among: mounts, defaultPageSize: 1 << 30)?.path == "/mnt/2m")
        #expect(HugetlbfsMount.first2MiB(among: Array(mounts.prefix(1)), defaultPageSize: 2 << 20) == nil)
    }

    @Test func sysfsChoice() {
        #expect(selectedSysfsChoice("always within_size advise [never] deny force\n") == "never")
        #expect(selectedSysfsChoice("[always] madvise never") == "always")
        #expect(selectedSysfsChoice("never\n") == "never")
        #expect(selectedSysfsChoice("") == nil)
    }
}

@Suite struct CapabilityReportTests {
    static let allFeatures = UffdFeatures(rawValue: (1 << 17) - 1)

    func facts(kernel: String = "6.1.0", features: UffdFeatures? = allFeatures,
               device: AccessResult = .usable, syscall: AccessResult = .usable, freeHugepages: UInt64 = 64,
               thp: String? = "never", selfTests: [SelfTestOutcome]? = nil, requireHugetlbfs: Bool = false) -> ProbeFacts {
        var pool = HugepagePool()
        pool.total = freeHugepages
        pool.free = freeHugepages
        pool.pageSize = 2 << 20
        let passing = [MemoryKind.shmem, .hugetlbfs].map {
            SelfTestOutcome(memory: $0, pagesTouched: 8, faults: 8, pagesWithoutFault: 0, pagesFaultedTwice: 0,
                            pagesWithWrongBytes: 0)
        }
        return ProbeFacts(kernelRelease: kernel, deviceAccess: device, syscallAccess: syscall, features: features,
                          hugepages: pool, hugetlbfsMounts: [HugetlbfsMount(path: "/dev/hugepages", pageSize: 2 << 20)],
                          shmemTHP: thp, selfTests: selfTests ?? passing, requireHugetlbfs: requireHugetlbfs)
    }

    @Test func readyMachinePasses() {
        let report = CapabilityReport(facts())
        #expect(report.passed)
        #expect(report.missing.isEmpty && report.warnings.isEmpty)
        #expect(report.rendered().hasSuffix("result: ready for postcopy"))
    }

    @Test func oldKernelIsNamed() {
        let report = CapabilityReport(facts(kernel: "5.10.0-28-amd64", features: [.missingShmem, .minorHugetlbfs]))
        #expect(!report.passed)
        #expect(report.missing.contains("kernel 5.10.0 is older than 5.14.0, the first with userfaultfd minor faults on shmem"))
        #expect(report.missing.contains("userfaultfd lacks MINOR_SHMEM needed for postcopy on shmem (Linux ≥ 5.14.0)"))
        #expect(report.warnings.contains("userfaultfd lacks MISSING_HUGETLBFS needed for postcopy on hugetlbfs (Linux ≥ 5.13.0)"))
    }

    @Test func noUserfaultfdAtAll() {
        let report = CapabilityReport(facts(features: nil, device: .unusable("EACCES (Permission denied)"),
                                            syscall: .unusable("EPERM (Operation not permitted)")))
        #expect(report.missing == ["no usable userfaultfd: /dev/userfaultfd unusable (EACCES (Permission denied)); userfaultfd(2) unusable (EPERM (Operation not permitted))"])
        #expect(report.rendered().hasSuffix("result: NOT ready (1 missing requirement)"))
    }

    @Test func oneWayOfOpeningIsEnough() {
        #expect(CapabilityReport(facts(device: .unusable("ENOENT (No such file or directory)"))).passed)
    }

    @Test func hugepagesAreOptionalUnlessRequired() {
        let optional = CapabilityReport(facts(freeHugepages: 0))
        #expect(optional.passed)
        #expect(optional.warnings.first?.hasPrefix("no free 2 MiB hugepages") == true)
        let required = CapabilityReport(facts(freeHugepages: 0, requireHugetlbfs: true))
        #expect(!required.passed)
        #expect(required.missing.first?.hasPrefix("no free 2 MiB hugepages") == true)
    }

    @Test func forcedShmemTHPIsRefused() {
        let report = CapabilityReport(facts(thp: "force"))
        #expect(!report.passed)
        #expect(report.missing.first?.contains("behind minor-fault tracking") == true)
    }

    @Test func selfTestThatMissedFaultsFails() {
        let faultAround = SelfTestOutcome(memory: .shmem, pagesTouched: 64, faults: 4, pagesWithoutFault: 60,
                                          pagesFaultedTwice: 0, pagesWithWrongBytes: 0)
        #expect(!faultAround.passed)
        #expect(faultAround.summary == "FAIL: 60 pages mapped without a fault (fault-around or THP) (64 pages touched, 4 faults)")
        let report = CapabilityReport(facts(selfTests: [faultAround]))
        #expect(report.missing == ["self-test on shmem failed: \(faultAround.summary)"])
    }

    @Test func featureNames() {
        #expect(UffdFeatures([.minorShmem, .move]).description == "MINOR_SHMEM MOVE")
        #expect(UffdFeatures(rawValue: 1 << 40 | 1 << 10).names == ["MINOR_SHMEM", "0x10000000000"])
        #expect(UffdFeatures().description == "none")
    }
}
