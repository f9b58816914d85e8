import CPostcopy
import Glibc
import PostcopyCore

/// The source VMM's half of uffd-wp dirty tracking: its own mapping of
/// guest RAM registered with a userfaultfd for asynchronous write-protect.
/// The kernel then resolves a write to a protected page by itself (it lifts
/// the protection, no fault reaches anyone), and `PagemapScan` in another
/// process reads and re-arms the written bits. Only the process that owns a
/// mapping can register it, hence this type lives in the VMM.
///
/// The registration lasts while the userfaultfd is open: keep the object.
public final class WriteTracking: Sendable {
    public let uffd: Userfaultfd
    public let mapping: TrackedMapping

    /// What asynchronous write-protect of shared memory needs from UFFDIO_API:
    /// `WP_ASYNC` (Linux 6.7), `WP_UNPOPULATED` (so that a page never touched
    /// is protected too) and `WP_HUGETLBFS_SHMEM` (write-protect on shmem and
    /// hugetlbfs, not only anonymous memory).
    public static let requiredFeatures: UffdFeatures = [.wpAsync, .wpUnpopulated, .wpHugetlbfsShmem]

    /// Registers [address, address+length), a shared mapping of guest RAM
    /// this process made, for asynchronous write-protect. Nothing is
    /// protected yet: the agent's first scan protects every page.
    /// Kernel: `UFFDIO_API` (probed on one descriptor, enabled on a fresh
    /// one), `UFFDIO_REGISTER` with `UFFDIO_REGISTER_MODE_WP`
    /// `pretendingAbsent` masks features off the kernel's answer (tests of
    /// the fallback to hashing).
    public init(address: UInt64, length: UInt64, pretendingAbsent: UffdFeatures = []) throws {
        let uffd = try inStep("open a userfaultfd for write tracking") {
            try Userfaultfd.open(enabling: WriteTracking.requiredFeatures,
                                 hint: "asynchronous write-protect of shared memory needs Linux ≥ 6.7",
                                 pretendingAbsent: pretendingAbsent)
        }
        _ = try inStep("register guest RAM for write-protect") {
            try uffd.register(start: address, length: length, mode: .writeProtect)
        }
        self.uffd = uffd
        mapping = TrackedMapping(address: address, length: length)
    }

    /// Registers as `init` does, and says what to tell the agent: the
    /// registration and `.armed`, or no registration and why not.
    public static func offering(address: UInt64, length: UInt64,
                                pretendingAbsent: UffdFeatures = []) -> (WriteTracking?, SourceTrackingOffer) {
        do {
            let tracking = try WriteTracking(address: address, length: length, pretendingAbsent: pretendingAbsent)
            return (tracking, .armed(address: address, length: length))
        } catch {
            return (nil, .unavailable(reason: "\(error)"))
        }
    }
}

/// The agent's half: `PAGEMAP_SCAN` over another process's registered
/// mapping, through that process's `/proc/PID/pagemap`. Reading the file
/// needs ptrace-read access to the process (root, or the same user with
/// the default Yama setting).
public final class PagemapScan: @unchecked Sendable {
    // SAFETY (@unchecked): the region buffer is used by one scanning thread
    // at a time (the agent's caller thread).
    public let pid: Int32
    public let mapping: TrackedMapping
    private let fd: Int32
    private let regions: UnsafeMutablePointer<cpc_page_region>
    private let capacity = 4096

    /// Opens `/proc/PID/pagemap` for `mapping`.
    public init(pid: Int32, mapping: TrackedMapping) throws(SystemCallError) {
        fd = try checkLibc("open /proc/\(pid)/pagemap") { open("/proc/\(pid)/pagemap", O_RDONLY | O_CLOEXEC) }
        self.pid = pid
        self.mapping = mapping
        regions = .allocate(capacity: capacity)
    }

    deinit {
        regions.deallocate()
        close(fd)
    }

    /// Every page of the mapping written since the last scan (or since
    /// registration, for the first: every page that is mapped). With
    /// `protect`, each is write-protected again as the walk reports it, so
    /// that a write after the walk passed its page shows in the next scan;
    /// a last scan, with the writer stopped for good, can leave the page
    /// tables alone, which costs the kernel far less. `body` gets each
    /// written run of 4 KiB pages of the file. A range the kernel reports
    /// outside the mapping throws: the log is not to be trusted then.
    /// Kernel: `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`,
    /// category `PAGE_IS_WRITTEN`
    public func scanWritten(protect: Bool = true, _ body: (PageRun) -> Void) throws(SystemCallError) {
        var start = mapping.address
        while start < mapping.end {
            var walkEnd: UInt64 = 0
            let found = cpc_pagemap_scan_written(fd, start, mapping.end, protect ? 1 : 0, regions, UInt64(capacity), &walkEnd)
            guard found >= 0 else {
                throw SystemCallError("PAGEMAP_SCAN of pid \(pid) over \(mapping)", Errno(Int32(-found)))
            }
            for index in 0..<Int(found) {
                // SAFETY: the kernel filled regions[0..<found], found <= capacity.
                let region = regions[index]
                guard let run = mapping.pages(start: region.start, end: region.end) else {
                    throw SystemCallError("PAGEMAP_SCAN of pid \(pid) reported 0x\(String(region.start, radix: 16))..<0x\(String(region.end, radix: 16)), outside \(mapping)", .invalid)
                }
                body(run)
            }
            guard walkEnd > start, walkEnd <= mapping.end else {
                throw SystemCallError("PAGEMAP_SCAN of pid \(pid) stopped at 0x\(String(walkEnd, radix: 16)), not past 0x\(String(start, radix: 16))", .invalid)
            }
            start = walkEnd
        }
    }

    /// The written pages as a bitmap of `pageCount` 4 KiB pages.
    public func scanWritten(pageCount: UInt64, protect: Bool = true) throws(SystemCallError) -> PageBitmap {
        var written = PageBitmap(count: pageCount)
        try scanWritten(protect: protect) { run in written.insert(first: run.first, count: run.count) }
        return written
    }
}
