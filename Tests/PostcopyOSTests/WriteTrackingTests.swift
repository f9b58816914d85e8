import Glibc
import PostcopyCore
@testable import PostcopyOS
import Testing

/// uffd-wp async and PAGEMAP_SCAN on the real kernel, in one process (the
/// agent scans another process the same way; the migration tests do that).
/// Every memory kind the agent meets: shmem and hugetlbfs.
@Suite(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct WriteTrackingTests {
    /// A shared mapping of a new file in `directory`, unlinked at once.
    final class SharedRAM {
        let base: UnsafeMutableRawPointer
        let size: UInt64

        init(in directory: String, size: UInt64) throws {
            let path = "\(directory)/postcopyd-wp-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            let fd = try checkLibc("create \(path)") { open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
            defer { close(fd); unlink(path) }
            try checkLibc("ftruncate") { ftruncate(fd, off_t(size)) }
            guard let address = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), address != MAP_FAILED else {
                throw SystemCallError("mmap \(path)", .current)
            }
            base = address
            self.size = size
        }

        deinit { munmap(base, Int(size)) }

        var address: UInt64 { UInt64(UInt(bitPattern: base)) }
        func write(page: UInt64) { (base + Int(page * 4096)).storeBytes(of: page &+ 1, as: UInt64.self) }
        func read(page: UInt64) -> UInt64 { (base + Int(page * 4096)).load(as: UInt64.self) }
    }

    @Test func shmemScansReportExactlyThePagesWritten() throws {
        try scansReportThePagesWritten(SharedRAM(in: "/dev/shm", size: 8 << 20), hugetlbfs: false)
    }

    @Test(.enabled(if: Host.hasHugepages(4) && Host.hugetlbfsMount != nil, Comment(rawValue: Host.needsHugepages(4))))
    func hugetlbfsScansReportTheHugePagesWritten() throws {
        try scansReportThePagesWritten(SharedRAM(in: Host.hugetlbfsMount!, size: 8 << 20), hugetlbfs: true)
    }

    /// Pages written since the last scan, and nothing else: to the 4 KiB
    /// page on shmem, to the 2 MiB page on hugetlbfs.
    private func scansReportThePagesWritten(_ ram: SharedRAM, hugetlbfs: Bool) throws {
        let size = ram.size
        let pages = size / 4096
        // Half the pages exist before tracking starts; the rest are holes.
        for page in stride(from: 0, to: pages / 2, by: 1) { ram.write(page: page) }
        let tracking = try WriteTracking(address: ram.address, length: size)
        let scan = try PagemapScan(pid: getpid(), mapping: tracking.mapping)
        // Arming: everything mapped so far counts as written, once.
        let first = try scan.scanWritten(pageCount: pages)
        #expect(first.popCount >= pages / 2)
        #expect(try scan.scanWritten(pageCount: pages).isEmpty)
        // Writes to mapped pages and to holes, and a read, which is no write.
        let written: [UInt64] = [3, 100, pages / 2 + 7, pages - 1]
        written.forEach { ram.write(page: $0) }
        _ = ram.read(page: 200)
        let seen = try scan.scanWritten(pageCount: pages)
        let unit: UInt64 = hugetlbfs ? 512 : 1
        let expected = Set(written.flatMap { page in (page / unit * unit)..<(page / unit * unit + unit) })
        // The read of page 200 maps it; on hugetlbfs its huge page (0) is
        // reported anyway, as page 3 is in it.
        #expect(seen.setIndices == expected.sorted())
        #expect(try scan.scanWritten(pageCount: pages).isEmpty)
        // A scan that does not protect reports the same pages again.
        ram.write(page: 9)
        #expect(try scan.scanWritten(pageCount: pages, protect: false).setIndices.contains(9))
        #expect(try scan.scanWritten(pageCount: pages, protect: false).setIndices.contains(9))
        #expect(try scan.scanWritten(pageCount: pages).setIndices.contains(9))
        #expect(try scan.scanWritten(pageCount: pages).isEmpty)
    }

    /// Many runs in one scan, more than the kernel's buffer of regions: the
    /// walk is resumed where it stopped, and nothing is lost in between.
    @Test func aScanLongerThanItsBufferGoesOn() throws {
        let size: UInt64 = 64 << 20
        let ram = try SharedRAM(in: "/dev/shm", size: size)
        let pages = size / 4096
        let tracking = try WriteTracking(address: ram.address, length: size)
        let scan = try PagemapScan(pid: getpid(), mapping: tracking.mapping)
        _ = try scan.scanWritten(pageCount: pages)
        let every = stride(from: UInt64(0), to: pages, by: 2).map { $0 }
        every.forEach { ram.write(page: $0) }
        #expect(try scan.scanWritten(pageCount: pages).setIndices == every)
    }

    @Test func anUnregisteredMappingCannotBeScanned() throws {
        let ram = try SharedRAM(in: "/dev/shm", size: 1 << 20)
        ram.write(page: 0)
        let scan = try PagemapScan(pid: getpid(), mapping: TrackedMapping(address: ram.address, length: 1 << 20))
        #expect(throws: SystemCallError.self) { try scan.scanWritten(pageCount: 256) }
    }

    @Test func aMissingFeatureIsNamed() throws {
        let ram = try SharedRAM(in: "/dev/shm", size: 1 << 20)
        let text: String
        do {
            _ = try WriteTracking(address: ram.address, length: 1 << 20, pretendingAbsent: .wpAsync)
            text = "registered"
        } catch {
            text = "\(error)"
        }
        #expect(text.hasPrefix("open a userfaultfd for write tracking: the kernel's userfaultfd lacks WP_ASYNC"))
        #expect(text.hasSuffix("asynchronous write-protect of shared memory needs Linux ≥ 6.7"))
    }
}
