import Glibc
import PostcopyCore
import PostcopyOS
import Testing

/// `HugepageCollapser` on the real kernel: guest RAM in a memfd, mapped as
/// the VMM maps it (MADV_NOHUGEPAGE, 4 KiB pages), touched, then collapsed
/// back into 2 MiB pages, counted in /proc/self/smaps. A memfd and
/// MADV_COLLAPSE need no privilege, so these run without root; they need
/// Linux 6.1 (MADV_COLLAPSE) and shmem THP settings that allow it.
@Suite(.serialized) struct HugepageCollapserTests {
    static let size: UInt64 = 16 << 20
    static let extents: UInt64 = size >> 21

    static var kernelHasCollapse: Bool {
        (KernelVersion(release: CapabilityProbe.kernelRelease()) ?? KernelVersion(0, 0, 0)) >= KernelVersion(6, 1, 0)
    }

    static var collapseAllowed: Bool { kernelHasCollapse && HugepageCollapser.currentSettings().collapseRefusal == nil }

    static var needsCollapse: String {
        guard kernelHasCollapse else { return "needs Linux 6.1 for MADV_COLLAPSE (this is \(CapabilityProbe.kernelRelease()))" }
        return "the shmem THP settings refuse MADV_COLLAPSE: \(HugepageCollapser.currentSettings().collapseRefusal ?? "")"
    }

    /// Guest RAM as the VMM holds it after postcopy: every 4 KiB page
    /// written (its index in its first word), mapped in 4 KiB pages.
    static func touchedGuestRAM() throws -> (MemoryFile, Mapping) {
        let file = try MemoryFile(backing: .memfd, size: size)
        let mapping = try Mapping(file: file, purpose: "guest RAM")
        for page in 0..<(size / 4096) { mapping.pointer(toSmallPage: page).storeBytes(of: page ^ 0xA5A5, as: UInt64.self) }
        return (file, mapping)
    }

    static func intact(_ mapping: Mapping) -> Bool {
        (0..<(size / 4096)).allSatisfy { mapping.pointer(toSmallPage: $0).load(as: UInt64.self) == $0 ^ 0xA5A5 }
    }

    @Test(.enabled(if: collapseAllowed, Comment(rawValue: needsCollapse)))
    func collapsesEveryExtentFromNoneToAll() throws {
        let (file, mapping) = try Self.touchedGuestRAM()
        defer { withExtendedLifetime(file) {} }
        #expect(mapping.address % (2 << 20) == 0, "guest RAM is mapped 2 MiB-aligned")
        let before = HugepageCollapser.smaps(of: mapping)
        #expect(before.mappings == 1 && before.noHugepage && before.resident == Self.size)
        #expect(before.pmdMappedExtents == 0, "a MADV_NOHUGEPAGE memfd mapping is in 4 KiB pages")

        let report = HugepageCollapser.run(mapping, kind: .shmem)
        #expect(report.skipped == nil && report.stopped == nil, "\(report.lines)")
        #expect(report.extents == Self.extents)
        #expect(report.pmdMappedBefore == 0)
        #expect(report.pmdMappedAfter == Self.extents, "\(report.lines)")
        #expect(report.collapsed == Self.extents && report.failed == 0)
        #expect(report.seconds > 0 && report.cpuSeconds > 0)
        let after = HugepageCollapser.smaps(of: mapping)
        #expect(after.shmemPmdMapped == Self.size && after.hugepage && !after.noHugepage)
        #expect(Self.intact(mapping), "a page's bytes changed in the collapse")
    }

    /// An extent with no page in memory (a hole: the guest never wrote it)
    /// is left alone, not asked: the kernel answers EINVAL for an all-hole
    /// extent, which would read as a refusal and stop the run. One page is
    /// enough for an extent to be collapsed (the rest zero-filled).
    @Test(.enabled(if: collapseAllowed, Comment(rawValue: needsCollapse)))
    func holesAreLeftAloneAndOnePageIsEnough() throws {
        let file = try MemoryFile(backing: .memfd, size: Self.size)
        let mapping = try Mapping(file: file, purpose: "guest RAM")
        for extent in stride(from: 0, to: Self.extents, by: 2) {
            mapping.pointer(toSmallPage: extent * 512 + 7).storeBytes(of: extent, as: UInt64.self)
        }
        let report = HugepageCollapser.run(mapping, kind: .shmem)
        #expect(report.stopped == nil, "\(report.lines)")
        #expect(report.collapsed == Self.extents / 2 && report.empty == Self.extents / 2 && report.failed == 0)
        #expect(report.pmdMappedAfter == Self.extents / 2)
        // What asking would have done: EINVAL for an all-hole extent, though
        // the mapping is MADV_HUGEPAGE now and the extents beside it collapsed.
        #expect(mapping.collapseHugepage(at: RegionOffset(1 << 21)) == Errno.invalid)
        for extent in stride(from: 0, to: Self.extents, by: 2) {
            #expect(mapping.pointer(toSmallPage: extent * 512 + 7).load(as: UInt64.self) == extent)
            #expect(mapping.pointer(toSmallPage: extent * 512 + 8).load(as: UInt64.self) == 0)
        }
    }

    /// The same on the thread `start` makes (nice 19), as the VMM runs it.
    @Test(.enabled(if: collapseAllowed, Comment(rawValue: needsCollapse)))
    func collapsesOnItsOwnThread() throws {
        let (file, mapping) = try Self.touchedGuestRAM()
        defer { withExtendedLifetime(file) {} }
        let reported = Latch()
        let got = Locked<HugepageCollapseReport?>(nil)
        let thread = try HugepageCollapser.start(mapping, kind: .shmem) { report in
            got.withLock { $0 = report }
            reported.open()
        }
        #expect(reported.wait(timeoutNanos: 60_000_000_000))
        thread.join()
        #expect(got.withLock { $0 }?.pmdMappedAfter == Self.extents)
    }

    /// What the kernel does on a MADV_NOHUGEPAGE mapping (the state postcopy
    /// leaves it in): EINVAL, which is why the collapser clears it first.
    @Test(.enabled(if: kernelHasCollapse, Comment(rawValue: "needs Linux 6.1 for MADV_COLLAPSE")))
    func theKernelRefusesANoHugepageMapping() throws {
        let (file, mapping) = try Self.touchedGuestRAM()
        defer { withExtendedLifetime(file) {} }
        #expect(mapping.collapseHugepage(at: RegionOffset(0)) == Errno.invalid)
        #expect(HugepageCollapser.smaps(of: mapping).pmdMappedExtents == 0)
    }

    /// Settings that refuse, and hugetlbfs, are skipped with the reason,
    /// nothing asked: RAM stays as it was.
    @Test func refusingSettingsAndHugetlbfsAreSkipped() throws {
        let (file, mapping) = try Self.touchedGuestRAM()
        defer { withExtendedLifetime(file) {} }
        let denied = HugepageCollapser.run(mapping, kind: .shmem, settings: ShmemHugepageSettings(top: "deny", pmd: "inherit"))
        #expect(denied.skipped?.contains("shmem_enabled is 'deny'") == true)
        #expect(denied.collapsed == 0 && denied.pmdMappedAfter == 0)
        let hugetlb = HugepageCollapser.run(mapping, kind: .hugetlbfs)
        #expect(hugetlb.skipped == "guest RAM is on hugetlbfs: already in 2 MiB pages")
        #expect(HugepageCollapser.smaps(of: mapping).noHugepage, "a skipped collapse leaves MADV_NOHUGEPAGE alone")
    }
}
