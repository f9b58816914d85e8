import PostcopyCore
import Testing

/// /proc/self/smaps as Linux 6.18 writes it (Size…VmFlags per mapping,
/// lines trimmed to those that vary), with guest RAM split into two
/// mappings by a VMM's madvise: 6 MiB then 2 MiB, 4 MiB of it PMD-mapped.
private let smapsSample = """
55d0a0000000-55d0a0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  12 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
VmFlags: rd wr mr mw me ac 
7fe248e00000-7fe249400000 rw-s 00000000 00:01 12784                      /memfd:guest (deleted)
Size:               6144 kB
KernelPageSize:        4 kB
Rss:                6144 kB
AnonHugePages:         0 kB
ShmemPmdMapped:     4096 kB
FilePmdMapped:         0 kB
Locked:                0 kB
THPeligible:           0
VmFlags: rd wr sh mr mw me ms hg 
7fe249400000-7fe249600000 rw-s 00600000 00:01 12784                      /memfd:guest (deleted)
Size:               2048 kB
Rss:                 512 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
VmFlags: rd wr sh mr mw me ms nh 
7fe249600000-7fe249800000 rw-s 00000000 00:2a 99                         /dev/shm/other
Size:               2048 kB
Rss:                2048 kB
ShmemPmdMapped:     2048 kB
FilePmdMapped:         0 kB
VmFlags: rd wr sh mr mw me ms hg 
7fe249800000-7fe249a00000 r--s 00000000 08:01 4242                       /var/lib/disk.img
Size:               2048 kB
Rss:                2048 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:      2048 kB
VmFlags: rd sh mr mw me ms 
"""

@Suite struct SmapsRangeTests {
    @Test func sumsTheMappingsOfTheRange() {
        let guest = SmapsRange(smaps: smapsSample, start: 0x7fe2_48e0_0000, end: 0x7fe2_4960_0000)
        #expect(guest.mappings == 2)
        #expect(guest.size == 8 << 20)
        #expect(guest.resident == (6 << 20) + (512 << 10))
        #expect(guest.shmemPmdMapped == 4 << 20)
        #expect(guest.filePmdMapped == 0)
        #expect(guest.pmdMappedExtents == 2)
        #expect(guest.noHugepage, "the second mapping is nh")
        #expect(!guest.hugepage, "not every mapping is hg")
    }

    @Test func rangeEndsAreExclusive() {
        // Ends where the next mapping starts, and starts where the heap ends.
        let first = SmapsRange(smaps: smapsSample, start: 0x7fe2_48e0_0000, end: 0x7fe2_4940_0000)
        #expect(first.mappings == 1 && first.pmdMappedExtents == 2 && first.hugepage && !first.noHugepage)
        let none = SmapsRange(smaps: smapsSample, start: 0x55d0_a002_1000, end: 0x7fe2_48e0_0000)
        #expect(none.mappings == 0 && none.pmdMappedExtents == 0 && !none.hugepage)
    }

    @Test func aPartlyOverlappingMappingCountsWhole() {
        let part = SmapsRange(smaps: smapsSample, start: 0x7fe2_4900_0000, end: 0x7fe2_4900_1000)
        #expect(part.mappings == 1 && part.shmemPmdMapped == 4 << 20)
    }

    @Test func filePmdMappedCountsToo() {
        let file = SmapsRange(smaps: smapsSample, start: 0x7fe2_4980_0000, end: 0x7fe2_49a0_0000)
        #expect(file.filePmdMapped == 2 << 20 && file.shmemPmdMapped == 0 && file.pmdMappedExtents == 1)
    }

    @Test func emptyOrForeignTextGivesNothing() {
        #expect(SmapsRange(smaps: "", start: 0, end: .max) == SmapsRange())
        #expect(SmapsRange(smaps: "Size: 4 kB\nShmemPmdMapped: 2048 kB\n", start: 0, end: .max).shmemPmdMapped == 0,
                "figures before any header belong to no mapping")
    }
}

@Suite struct HugepageExtentsTests {
    @Test func alignedMappingIsAllExtents() {
        let extents = HugepageExtents(base: 0x7f00_0000_0000, length: 1 << 30)
        #expect(extents.count == 512 && extents.firstOffset == 0)
        #expect(extents.offset(of: 511) == RegionOffset(511 << 21))
        #expect(extents.offset(of: 512) == nil && extents.offset(of: -1) == nil)
    }

    @Test func headAndTailShorterThan2MiBAreLeft() {
        // 4 KiB past a 2 MiB boundary, 8 MiB long: the first whole extent is
        // 2 MiB − 4 KiB in, and 3 fit before the end.
        let extents = HugepageExtents(base: 0x7f00_0000_1000, length: 8 << 20)
        #expect(extents.firstOffset == (2 << 20) - 4096)
        #expect(extents.count == 3)
        #expect(extents.offset(of: 2) == RegionOffset((2 << 20) - 4096 + (4 << 20)))
        #expect(HugepageExtents(base: 0x1000, length: 1 << 20).count == 0)
    }
}

@Suite struct CollapseRunTests {
    static func run(_ results: [CollapseResult], extents: Int) -> (CollapseRun, [CollapseRun.Action]) {
        var run = CollapseRun(extents: extents, refusalExplanation: "because")
        var actions: [CollapseRun.Action] = []
        for result in results { actions.append(run.record(result)) }
        return (run, actions)
    }

    @Test func everyExtentInTurn() {
        let (run, actions) = Self.run([.collapsed, .collapsed, .collapsed], extents: 3)
        #expect(actions == [.next, .next, .stop])
        #expect(run.isFinished && run.collapsed == 3 && run.failed == 0 && run.stopReason == nil)
    }

    @Test func busyIsTriedThreeTimesThenCountedAndPassed() {
        let (run, actions) = Self.run([.busy, .busy, .collapsed, .busy, .busy, .busy, .collapsed], extents: 3)
        #expect(actions == [.retry, .retry, .next, .retry, .retry, .next, .stop])
        #expect(run.collapsed == 2 && run.failed == 1 && run.retries == 4)
        #expect(run.firstFailure == "extent 1: EAGAIN 3 times (pages busy)")
        #expect(run.stopReason == nil)
    }

    @Test func emptyExtentsAreCountedAndPassed() {
        let (run, actions) = Self.run([.empty, .collapsed, .empty], extents: 3)
        #expect(actions == [.next, .next, .stop])
        #expect(run.collapsed == 1 && run.empty == 2 && run.failed == 0 && run.stopReason == nil)
    }

    @Test func oneBadExtentDoesNotStopTheRest() {
        let (run, actions) = Self.run([.failed("EIO"), .collapsed, .failed("EBUSY")], extents: 3)
        #expect(actions == [.next, .next, .stop])
        #expect(run.collapsed == 1 && run.failed == 2 && run.firstFailure == "extent 0: EIO")
    }

    @Test func refusedStopsAtOnceNamingTheCause() {
        let (run, actions) = Self.run([.collapsed, .refused], extents: 5)
        #expect(actions == [.next, .stop])
        #expect(run.isFinished && run.current == 1 && run.collapsed == 1)
        #expect(run.stopReason == "MADV_COLLAPSE refused (EINVAL) at extent 1: because")
    }

    @Test func noMemoryStops() {
        let (run, actions) = Self.run([.noMemory], extents: 5)
        #expect(actions == [.stop])
        #expect(run.stopReason?.hasPrefix("MADV_COLLAPSE failed (ENOMEM) at extent 0") == true)
    }

    @Test func nothingToDo() {
        #expect(CollapseRun(extents: 0, refusalExplanation: "").isFinished)
    }
}

@Suite struct ShmemHugepageSettingsTests {
    static let top = "always within_size advise [never] deny force\n"

    @Test func readsTheSelectedValues() {
        let settings = ShmemHugepageSettings(topText: Self.top, pmdText: "always [inherit] within_size advise never\n")
        #expect(settings == ShmemHugepageSettings(top: "never", pmd: "inherit"))
        #expect(ShmemHugepageSettings(topText: nil, pmdText: nil) == ShmemHugepageSettings(top: nil, pmd: nil))
    }

    /// As measured on Linux 6.18 (docs/kernel.md, "Huge pages after postcopy").
    @Test(arguments: ["never", "advise", "within_size", "always", "force"])
    func everyTopValueButDenyAllowsCollapse(top: String) {
        #expect(ShmemHugepageSettings(top: top, pmd: "inherit").collapseRefusal == nil)
        #expect(ShmemHugepageSettings(top: top, pmd: nil).collapseRefusal == nil, "a kernel before 6.11 has no per-size file")
    }

    @Test func denyRefusesNamingTheFile() throws {
        let refusal = try #require(ShmemHugepageSettings(top: "deny", pmd: "inherit").collapseRefusal)
        #expect(refusal.hasPrefix("/sys/kernel/mm/transparent_hugepage/shmem_enabled is 'deny'"))
        #expect(ShmemHugepageSettings(top: "deny", pmd: "advise").collapseRefusal != nil, "deny wins over the per-size file")
    }

    @Test func perSizeNeverRefusesWhateverTheTopSays() throws {
        for top in ["never", "always", "advise"] {
            let refusal = try #require(ShmemHugepageSettings(top: top, pmd: "never").collapseRefusal)
            #expect(refusal.hasPrefix("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled is 'never'"))
        }
        #expect(ShmemHugepageSettings(top: "never", pmd: "advise").collapseRefusal == nil)
    }

    @Test func einvalUnderAllowingSettingsNamesTheOtherCauses() {
        let explanation = ShmemHugepageSettings(top: "never", pmd: "inherit").refusalExplanation
        #expect(explanation.contains("MADV_NOHUGEPAGE") && explanation.contains("PR_SET_THP_DISABLE"))
        #expect(explanation.contains("shmem_enabled never"))
    }
}

@Suite struct HugepageCollapseReportTests {
    @Test func linesSayCountsTimeAndCost() {
        var report = HugepageCollapseReport()
        report.extents = 512
        report.pmdMappedAfter = 510
        report.collapsed = 508
        report.empty = 2
        report.failed = 2
        report.seconds = 1.5
        report.cpuSeconds = 0.75
        report.bytes = 1 << 30
        report.firstFailure = "extent 7: EIO"
        #expect(report.newlyMapped == 510)
        #expect(report.lines == [
            "huge pages: 510 of 512 2 MiB extents mapped huge (0 before; 508 collapsed, 2 empty, 2 failed, 0 retried) in 1.50 s, 0.75 CPU s (0.75 per GiB)",
            "huge pages: first failure: extent 7: EIO",
        ])
        report.skipped = "guest RAM is on hugetlbfs: already in 2 MiB pages"
        #expect(report.lines == ["huge pages: not collapsed: guest RAM is on hugetlbfs: already in 2 MiB pages"])
    }

    @Test func randomReadFiguresTakeTheMedian() {
        let figures = RandomReadFigures(readsPerPass: 1000, passNanos: [90_000, 100_000, 300_000, 80_000, 110_000])
        #expect(figures.nanosPerRead == [90, 100, 300, 80, 110])
        #expect(figures.medianNanosPerRead == 100)
        #expect(figures.readsPerSecond == 10_000_000)
    }
}
