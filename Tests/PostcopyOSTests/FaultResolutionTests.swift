import PostcopyCore
import PostcopyOS
import Testing

/// The fault path end to end on the real kernel, for every kind of memory:
/// a thread reads every page through the registered mapping in random
/// order while the fault loop resolves it; each page must fault exactly once
/// and read exactly what the alias wrote (zeros for holes).
@Suite(.serialized) struct FaultResolutionTests {
    func expectClean(_ report: FaultExerciseReport, holes: UInt64) {
        let pages = report.geometry.pageCount
        #expect(report.error == nil)
        #expect(report.pagesTouched == pages)
        #expect(report.minorFaults == pages - holes, "one minor fault per written page")
        #expect(report.missingFaults == holes, "one missing fault per hole")
        #expect(report.pagesWithoutFault == 0)
        #expect(report.pagesFaultedTwice == 0)
        #expect(report.pagesWithWrongBytes == 0)
        #expect(report.outcome.passed)
    }

    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func shmemMemfd256MiB() throws {
        let exercise = FaultExercise(backing: .memfd, size: 256 << 20, order: .random(seed: 7), holeEvery: 101)
        let report = try exercise.run()
        expectClean(report, holes: (65536 + 100) / 101)
    }

    @Test(.enabled(if: Host.hasHugepages(32) && Host.hugetlbfsMount != nil,
                   Comment(rawValue: Host.needsHugepages(32) + " and a hugetlbfs mount")))
    func hugetlbfsFile64MiB() throws {
        let directory = try #require(Host.hugetlbfsMount)
        let exercise = FaultExercise(backing: .hugetlbfs(directory: directory), size: 64 << 20,
                                     order: .random(seed: 8), holeEvery: 5)
        expectClean(try exercise.run(), holes: 7)
    }

    @Test(.enabled(if: Host.hasHugepages(32), Comment(rawValue: Host.needsHugepages(32))))
    func hugetlbMemfd64MiB() throws {
        let exercise = FaultExercise(backing: .hugetlbMemfd, size: 64 << 20, order: .random(seed: 9), holeEvery: 4)
        expectClean(try exercise.run(), holes: 8)
    }

    /// Fault-around would map a page's neighbours on its first touch; a
    /// strided order touches those neighbours later, when they must still fault.
    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func stridedTouchesFaultEveryPage() throws {
        let exercise = FaultExercise(backing: .memfd, size: 16 << 20, order: .strided(16), holeEvery: nil)
        expectClean(try exercise.run(), holes: 0)
    }

    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func liveProbePasses() {
        let report = CapabilityReport(CapabilityProbe.gather(requireHugetlbfs: false))
        #expect(report.passed, "\(report.rendered())")
        let shmemRow = report.rows.first { $0.name == "self-test shmem" }?.value
        #expect(shmemRow == "pass: 4096 pages touched, 4096 faults")
    }
}
