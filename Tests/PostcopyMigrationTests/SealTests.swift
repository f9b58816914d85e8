import Glibc
import PostcopyCore
import PostcopyOS
import Testing

/// The files postcopyd hands the VMM are sealed: the VMM maps them, and a
/// file shrunk under postcopyd's own mapping would make its next access
/// raise SIGBUS in the daemon.
@Suite struct SealTests {
    @Test func guestRAMCannotShrink() throws {
        let ram = try MemoryFile(backing: .memfd, size: 4 << 20)
        #expect(ftruncate(ram.fd, off_t(2 << 20)) == -1 && errno == EPERM)
        // Growing is the VMM's business and harmless to postcopyd's mapping.
        #expect(ftruncate(ram.fd, off_t(8 << 20)) == 0)
    }

    @Test(.enabled(if: Host.hasHugepages(4), Comment(rawValue: Host.needsHugepages(4))))
    func hugetlbGuestRAMCannotShrink() throws {
        let ram = try MemoryFile(backing: .hugetlbMemfd, size: 4 << 20)
        #expect(ftruncate(ram.fd, off_t(2 << 20)) == -1 && errno == EPERM)
    }

    @Test func thePageStateRecordKeepsItsSize() throws {
        let geometry = try PageGeometry(regionSize: 4 << 20, pageSize: .small)
        let header = PageStateHeader(migrationID: MigrationID(high: 1, low: 2), geometry: geometry, guestBase: 1 << 30,
                                     features: MemoryKind.shmem.requiredFeatures, registerMode: 0b101,
                                     stalePagesAtSwitchover: 0, sourcePausedAtNanos: 1,
                                     secretDigest: MigrationSecret.test.digest)
        let record = try PageStateFile(header: header, stale: PageBitmap(count: geometry.smallPageCount))
        var info = stat()
        #expect(fstat(record.fd, &info) == 0)
        #expect(ftruncate(record.fd, 0) == -1 && errno == EPERM)
        #expect(ftruncate(record.fd, info.st_size + 4096) == -1 && errno == EPERM)
        // A record handed back is still taken: sealing changed nothing in it.
        let copy = try PageStateFile(adopting: dup(record.fd))
        #expect(copy.header == header)
    }
}
