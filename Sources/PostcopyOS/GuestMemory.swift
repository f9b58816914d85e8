import CPostcopy
import Glibc
import PostcopyCore

/// Where guest RAM lives.
public enum Backing: Sendable, Equatable, CustomStringConvertible {
    /// An anonymous memfd: shmem with 4 KiB pages.
    case memfd
    /// A memfd with MFD_HUGETLB: hugetlbfs with 2 MiB pages, no mount needed.
    case hugetlbMemfd
    /// A new file in a hugetlbfs mount (2 MiB pages), unlinked once open so
    /// that nothing is left behind if the process dies.
    case hugetlbfs(directory: String)
    /// A file another process created and handed over (a restarted
    /// postcopyd taking a migration over).
    case adopted(MemoryKind)
    /// A new file at `path`, left linked so that a VMM can open it by name
    /// (QEMU's `memory-backend-file,mem-path=`): on tmpfs for shmem, on a
    /// 2 MiB hugetlbfs mount for hugetlbfs. Removed when the daemon lets go
    /// of it, if the name still points at it.
    case namedFile(path: String, kind: MemoryKind)

    public var memoryKind: MemoryKind {
        switch self {
        case .memfd: return .shmem
        case .hugetlbMemfd, .hugetlbfs: return .hugetlbfs
        case let .adopted(kind), let .namedFile(_, kind): return kind
        }
    }

    /// The backing for `kind`: for hugetlbfs, a file in `directory` when
    /// given, else in the first 2 MiB mount of `mounts`, else a MFD_HUGETLB
    /// memfd. Without `mounts`, reads them (and the default hugepage size)
    /// from /proc.
    public static func choose(_ kind: MemoryKind, hugetlbfsDirectory directory: String? = nil,
                              mounts: [HugetlbfsMount]? = nil, defaultHugepageSize: UInt64? = nil) -> Backing {
        guard kind == .hugetlbfs else { return .memfd }
        if let directory { return .hugetlbfs(directory: directory) }
        let mounts = mounts ?? HugetlbfsMount.parse(mounts: readTextFile("/proc/mounts") ?? "")
        let defaultSize = defaultHugepageSize ?? HugepagePool(meminfo: readTextFile("/proc/meminfo") ?? "").pageSize
        let mount = HugetlbfsMount.first2MiB(among: mounts, defaultPageSize: defaultSize)
        return mount.map { .hugetlbfs(directory: $0.path) } ?? .hugetlbMemfd
    }

    public var description: String {
        switch self {
        case .memfd: return "memfd (shmem, 4 KiB pages)"
        case .hugetlbMemfd: return "memfd (hugetlbfs, 2 MiB pages)"
        case let .hugetlbfs(directory): return "hugetlbfs file in \(directory) (2 MiB pages)"
        case .adopted(.shmem): return "guest RAM file taken over (shmem, 4 KiB pages)"
        case .adopted(.hugetlbfs): return "guest RAM file taken over (hugetlbfs, 2 MiB pages)"
        case let .namedFile(path, .shmem): return "file \(path) (shmem, 4 KiB pages)"
        case let .namedFile(path, .hugetlbfs): return "file \(path) (hugetlbfs, 2 MiB pages)"
        }
    }
}

/// The file that holds guest RAM. Sized with ftruncate, so no page exists
/// (and none costs memory) until something writes it.
public final class MemoryFile: Sendable {
    public let fd: Int32
    public let geometry: PageGeometry
    public let backing: Backing

    private static let hugetlbfsMagic: Int64 = 0x9584_58f6
    private static let tmpfsMagic: Int64 = 0x0102_1994

    public init(backing: Backing, size: UInt64, name: String = "postcopyd-guest-ram") throws {
        let pageSize = backing.memoryKind.pageSize
        let geometry = try inStep("size guest RAM") { try PageGeometry(regionSize: size, pageSize: pageSize) }
        let fd: Int32
        switch backing {
        case .memfd:
            fd = try check("memfd_create") { cpc_memfd_create(name, UInt32(CPC_MFD_CLOEXEC) | UInt32(CPC_MFD_ALLOW_SEALING)) }
        case .hugetlbMemfd:
            let flags = UInt32(CPC_MFD_CLOEXEC) | UInt32(CPC_MFD_ALLOW_SEALING) | UInt32(CPC_MFD_HUGETLB)
                | UInt32(CPC_MFD_HUGE_2MB)
            fd = try check("memfd_create MFD_HUGETLB") { cpc_memfd_create(name, flags) }
        case let .hugetlbfs(directory):
            fd = try MemoryFile.createUnlinked(in: directory, name: name)
        case let .namedFile(path, _):
            fd = try checkLibc("create the guest RAM file \(path)") {
                open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            }
        case .adopted:
            preconditionFailure("an adopted RAM file is opened with init(adopting:geometry:)")
        }
        do {
            try MemoryFile.verifyFilesystem(fd: fd, backing: backing)
            try checkLibc("ftruncate to \(size) bytes") { ftruncate(fd, off_t(size)) }
            // The VMM maps this file: sealed, it cannot shrink it under
            // postcopyd's alias, whose next write would then raise SIGBUS.
            // Only a memfd takes seals; a file on hugetlbfs or tmpfs cannot.
            switch backing {
            case .memfd, .hugetlbMemfd:
                try check("seal guest RAM against shrinking (F_SEAL_SHRINK)") { cpc_add_seals(fd, UInt32(CPC_F_SEAL_SHRINK)) }
            default:
                break
            }
        } catch {
            if case let .namedFile(path, _) = backing { unlink(path) }
            close(fd)
            throw error
        }
        self.fd = fd
        self.geometry = geometry
        self.backing = backing
    }

    /// Takes ownership of `descriptor`, a RAM file another process created
    /// (a restarted postcopyd taking a migration over): it must be a file of
    /// exactly `geometry.regionSize` bytes, on hugetlbfs with 2 MiB pages
    /// when the geometry says 2 MiB and on anything else (shmem) when 4 KiB.
    /// Closes the descriptor when it refuses it. `namedAt`: a path the
    /// file may still have (a named `--ram-file`); when the file there is
    /// this one, it is named again, so that its name goes when it does.
    public init(adopting descriptor: Int32, geometry: PageGeometry, namedAt path: String? = nil) throws {
        let kind: MemoryKind = geometry.pageSize == .small ? .shmem : .hugetlbfs
        var backing = Backing.adopted(kind)
        do {
            _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC)
            var magic: Int64 = 0
            var blockSize: Int64 = 0
            try check("fstatfs on the RAM file handed over") { cpc_fstatfs(descriptor, &magic, &blockSize) }
            if geometry.pageSize == .small {
                guard magic != MemoryFile.hugetlbfsMagic else {
                    throw SystemCallError("the RAM file handed over is on hugetlbfs, but the migration's pages are 4 KiB", .invalid)
                }
            } else {
                try MemoryFile.verifyFilesystem(fd: descriptor, backing: backing)
            }
            let size = try fileSize(descriptor, "the RAM file handed over")
            guard size == geometry.regionSize else {
                throw SystemCallError("the RAM file handed over is \(size) bytes; the migration's guest RAM is \(geometry.regionSize)", .invalid)
            }
        } catch {
            close(descriptor)
            throw error
        }
        if let path, FileIdentity(path: path) == FileIdentity(descriptor: descriptor) {
            backing = .namedFile(path: path, kind: kind)
        }
        fd = descriptor
        self.geometry = geometry
        self.backing = backing
    }

    deinit {
        if case let .namedFile(path, _) = backing, FileIdentity(path: path) == identity { unlink(path) }
        close(fd)
    }

    /// The file's device and inode: the same for every descriptor of it.
    public var identity: FileIdentity { FileIdentity(descriptor: fd) }

    /// Gives a named RAM file to `uid` (the VMM's), so that a VMM running
    /// as another user can open it; the mode stays 0600.
    public func giveOwnership(to uid: UInt32) throws {
        guard case let .namedFile(path, _) = backing, uid != geteuid() else { return }
        try checkLibc("chown \(path) to uid \(uid)") { fchown(fd, uid, UInt32.max) }
    }

    private static func createUnlinked(in directory: String, name: String) throws -> Int32 {
        let path = "\(directory)/\(name).\(getpid()).\(UInt32.random(in: 0...UInt32.max))"
        let fd = try checkLibc("create \(path)") { open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        unlink(path)
        return fd
    }

    /// A hugetlbfs backing must really be hugetlbfs with 2 MiB pages: a file
    /// on any other filesystem would not raise minor faults as expected.
    /// A named shmem file must be on tmpfs: a disk file raises no minor
    /// faults.
    private static func verifyFilesystem(fd: Int32, backing: Backing) throws {
        var namedShmem = false
        if case .namedFile(_, .shmem) = backing { namedShmem = true }
        guard namedShmem || backing.memoryKind == .hugetlbfs else { return }
        var magic: Int64 = 0
        var blockSize: Int64 = 0
        try check("fstatfs") { cpc_fstatfs(fd, &magic, &blockSize) }
        if namedShmem {
            guard magic == tmpfsMagic else {
                throw SystemCallError("\(backing): not on tmpfs (filesystem magic 0x\(String(magic, radix: 16))); shmem guest RAM needs a tmpfs such as /dev/shm, 2 MiB pages a hugetlbfs mount", .invalid)
            }
            return
        }
        guard magic == hugetlbfsMagic else {
            throw SystemCallError("\(backing): not a hugetlbfs file (filesystem magic 0x\(String(magic, radix: 16)))", .invalid)
        }
        guard UInt64(blockSize) == PageSize.huge2M.bytes else {
            throw SystemCallError("\(backing): page size \(blockSize) bytes, postcopyd needs 2 MiB", .invalid)
        }
    }

    /// Makes the pages of [offset, offset+length) exist in the page cache,
    /// reading as zeros where they did not exist; existing pages are left
    /// as they are. This is how a hole becomes something CONTINUE can map.
    /// Kernel: `fallocate(2)` mode 0
    public func materialize(offset: RegionOffset, length: UInt64) throws(SystemCallError) {
        try check("fallocate \(offset)+\(length)") {
            cpc_fallocate(fd, 0, Int64(offset.rawValue), Int64(length))
        }
    }

    /// Writes `bytes` into the file from `offset` with pwrite(2): into the
    /// page cache, without mapping anything. On shmem a page that does not
    /// exist yet is made for the write and not zeroed first (the write
    /// fills it whole), where a first store through a mapping would fault
    /// the page in zeroed and then copy over it. Kernel: `pwrite(2)`.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: RegionOffset) throws(SystemCallError) {
        guard let base = bytes.baseAddress else { return }
        var done = 0
        while done < bytes.count {
            let written = pwrite(fd, base + done, bytes.count - done, off_t(offset.rawValue) + off_t(done))
            if written > 0 {
                done += written
            } else if written < 0 && errno == EINTR {
                continue
            } else {
                let error = written < 0 ? Errno.current : Errno(EIO)
                throw SystemCallError("write \(bytes.count - done) bytes into guest RAM at \(offset)", error)
            }
        }
    }
}

/// A shared mapping of a `MemoryFile`, unmapped when the object goes away.
public final class Mapping: @unchecked Sendable {
    // SAFETY: base..base+length stays mapped for the object's lifetime; the
    // mapping is shared memory, so concurrent access is the callers' protocol.
    // `base` is private: every pointer into the mapping is made here, checked
    // against its length.
    private let base: UnsafeMutableRawPointer
    public let length: UInt64

    /// Maps all of `file` read-write and shared. On shmem the range is marked
    /// MADV_NOHUGEPAGE: a THP collapse there would map pages behind the back
    /// of minor-fault tracking.
    public convenience init(file: MemoryFile, purpose: String) throws {
        try self.init(descriptor: file.fd, geometry: file.geometry, fileOffset: 0,
                      onHugetlbfs: file.backing.memoryKind == .hugetlbfs, purpose: purpose)
    }

    /// Maps `geometry.regionSize` bytes of the file behind `descriptor` from
    /// `fileOffset`, read-write and shared, as `Mapping(file:purpose:)` does:
    /// for a VMM that was handed the file rather than creating it.
    public init(descriptor: Int32, geometry: PageGeometry, fileOffset: UInt64, onHugetlbfs: Bool,
                purpose: String) throws {
        let length = geometry.regionSize
        let kind = onHugetlbfs ? "hugetlbfs" : "shmem"
        let address = Self.mapAligned(length: length, descriptor: descriptor, fileOffset: fileOffset)
        guard let address else {
            let error = Errno.current
            var step = "map \(purpose) (\(length) bytes of \(kind))"
            if error.rawValue == ENOMEM && onHugetlbfs {
                step += ": not enough free 2 MiB hugepages for \(length >> 21) pages (see /proc/meminfo HugePages_Free)"
            }
            throw SystemCallError(step, error)
        }
        base = address
        self.length = length
        if !onHugetlbfs {
            do {
                try checkLibc("madvise MADV_NOHUGEPAGE on \(purpose)") { madvise(address, Int(length), MADV_NOHUGEPAGE) }
            } catch {
                munmap(address, Int(length))
                throw error
            }
        }
    }

    deinit { munmap(base, Int(length)) }

    /// Maps the file at an address that is 2 MiB-aligned where the file
    /// offset is (for offset 0: a 2 MiB-aligned address), as QEMU aligns
    /// its RAM blocks: only there can 2 MiB of the file be mapped by one PMD
    /// entry (huge pages after postcopy, `collapseHugepage`). An anonymous
    /// reservation 2 MiB longer is made, the file mapped over the right part
    /// of it (MAP_FIXED), and the rest given back. Nil with `errno` set.
    private static func mapAligned(length: UInt64, descriptor: Int32, fileOffset: UInt64) -> UnsafeMutableRawPointer? {
        let align = Int(PageSize.huge2M.bytes)
        let span = Int(length) + align
        guard let reserved = mmap(nil, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              reserved != MAP_FAILED else { return nil }
        let start = UInt(bitPattern: reserved)
        let phase = UInt(fileOffset % UInt64(align))
        // The first address at or after `start` with the file offset's phase.
        let aligned = ((start - phase + UInt(align) - 1) & ~UInt(align - 1)) + phase
        let head = Int(aligned - start)
        // SAFETY: [reserved, reserved + span) is this call's reservation,
        // and [aligned, aligned + length) lies inside it (head < 2 MiB).
        let target = reserved + head
        let mapped = mmap(target, Int(length), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, descriptor, off_t(fileOffset))
        guard let mapped, mapped != MAP_FAILED else {
            let saved = errno
            munmap(reserved, span)
            errno = saved
            return nil
        }
        if head > 0 { munmap(reserved, head) }
        let tail = span - head - Int(length)
        if tail > 0 { munmap(target + Int(length), tail) }
        return mapped
    }

    public var address: UInt64 { UInt64(UInt(bitPattern: base)) }

    /// Marks the whole mapping MADV_HUGEPAGE, which also clears the
    /// MADV_NOHUGEPAGE it was mapped with on shmem: MADV_COLLAPSE is refused
    /// (EINVAL) on a VM_NOHUGEPAGE mapping, and madvise has no neutral
    /// setting to go back to. For after postcopy, once the range is
    /// unregistered.
    /// Kernel: `madvise(MADV_HUGEPAGE)`
    public func adviseHugepages() throws(SystemCallError) {
        try checkLibc("madvise MADV_HUGEPAGE on guest RAM") { madvise(base, Int(length), MADV_HUGEPAGE) }
    }

    /// How many of the 512 4 KiB pages of the 2 MiB at `offset` are in
    /// memory (in the file's page cache, mapped here or not); 0 for a hole.
    /// Kernel: `mincore`
    public func residentSmallPages(inHugepageAt offset: RegionOffset) throws(SystemCallError) -> Int {
        let size = PageSize.huge2M.bytes
        precondition(offset.rawValue <= length && length - offset.rawValue >= size,
                     "2 MiB at \(offset) outside a mapping of \(length) bytes")
        var vector = [UInt8](repeating: 0, count: Int(size / 4096))
        // SAFETY: [offset, offset + 2 MiB) lies inside the mapping, checked above.
        try checkLibc("mincore on 2 MiB of guest RAM at \(offset)") { mincore(base + Int(offset.rawValue), Int(size), &vector) }
        return vector.reduce(0) { $0 + Int($1 & 1) }
    }

    /// Asks the kernel to make the 2 MiB at `offset` (2 MiB-aligned in the
    /// address space, wholly inside the mapping: see `HugepageExtents`) one
    /// 2 MiB page of the file, mapped by a PMD entry here, now, in this
    /// thread: it copies the 4 KiB pages into a new 2 MiB page and replaces
    /// them in the page cache. Nil when done; EINTR is retried. Never while
    /// the range is registered with userfaultfd: the pages would be mapped
    /// behind its minor-fault tracking.
    /// Kernel: `madvise(MADV_COLLAPSE)`
    public func collapseHugepage(at offset: RegionOffset) -> Errno? {
        let size = PageSize.huge2M.bytes
        precondition(offset.rawValue <= length && length - offset.rawValue >= size,
                     "2 MiB at \(offset) outside a mapping of \(length) bytes")
        // SAFETY: [offset, offset + 2 MiB) lies inside the mapping, checked above.
        let start = base + Int(offset.rawValue)
        precondition(UInt(bitPattern: start) % UInt(size) == 0, "\(offset) is not 2 MiB-aligned in the address space")
        while madvise(start, Int(size), Int32(CPC_MADV_COLLAPSE)) != 0 {
            guard errno == EINTR else { return Errno.current }
        }
        return nil
    }

    /// The start of 4 KiB page `page` of the mapping; a page outside it is a
    /// broken invariant and traps. Valid while this object lives.
    public func pointer(toSmallPage page: UInt64) -> UnsafeMutableRawPointer {
        precondition(page < length / 4096, "4 KiB page \(page) outside a mapping of \(length / 4096)")
        return base + Int(page) * 4096
    }

    /// The whole mapping's bytes, lent to `body`.
    public func withUnsafeBytes<T>(_ body: (UnsafeMutableRawBufferPointer) throws -> T) rethrows -> T {
        try body(UnsafeMutableRawBufferPointer(start: base, count: Int(length)))
    }
}

/// Guest RAM as the daemon owns it: the file, and an alias mapping that is
/// never registered with userfaultfd, through which pages are filled.
public final class GuestMemory: Sendable {
    public let file: MemoryFile
    public let alias: Mapping

    public init(backing: Backing, size: UInt64) throws {
        file = try MemoryFile(backing: backing, size: size)
        alias = try Mapping(file: file, purpose: "alias")
    }

    /// Guest RAM in a file handed over, with an alias of its own.
    public init(file: MemoryFile) throws {
        self.file = file
        alias = try Mapping(file: file, purpose: "alias")
    }

    public var geometry: PageGeometry { file.geometry }

    /// A second mapping of the same file, for a guest (or a test standing in
    /// for one) to register with userfaultfd.
    public func mapGuestView() throws -> Mapping {
        try Mapping(file: file, purpose: "guest view")
    }

    /// Writes `run`'s pages from `bytes` (exactly `run.count` × 4 KiB), or
    /// zeroes them when `bytes` is nil: with `writeThroughAlias`, the one
    /// way page bytes enter guest RAM. On shmem, data goes into the file
    /// with pwrite(2): a page that does not exist yet is made for the write
    /// and not zeroed first, where a first store through the alias faults
    /// it in zeroed and then copies over it (most of the daemon's precopy
    /// CPU time, docs/benchmarks.md). pwrite takes the file's inode lock,
    /// so this is for the bulk receivers only (precopy, and the back-fill),
    /// never for one a guest thread waits on. Hugetlbfs has no
    /// write(2), and zeroing needs none: those go through the alias. Throws
    /// when the kernel refuses the write (no memory left for shmem pages):
    /// nothing says the pages hold the bytes then.
    public func write(_ bytes: UnsafeRawBufferPointer?, to run: PageRun) throws(SystemCallError) {
        check(bytes, run)
        guard let bytes, file.backing.memoryKind == .shmem else {
            writeThroughAlias(bytes, to: run)
            return
        }
        try file.write(bytes, at: RegionOffset(run.first * 4096))
    }

    /// `write`, with stores through the alias, taking no lock: for the
    /// urgent receiver, which must never wait on the back-fill's inode
    /// lock.
    public func writeThroughAlias(_ bytes: UnsafeRawBufferPointer?, to run: PageRun) {
        check(bytes, run)
        // SAFETY: run lies within the region, checked above, and so within the alias.
        let target = alias.pointer(toSmallPage: run.first)
        if let source = bytes?.baseAddress {
            target.copyMemory(from: source, byteCount: Int(run.count) * 4096)
        } else {
            memset(target, 0, Int(run.count) * 4096)
        }
    }

    /// A run outside the region, or bytes of another length, is a broken
    /// invariant (the session and the tracker hand out only runs they
    /// checked against the region): it traps rather than writing anywhere.
    private func check(_ bytes: UnsafeRawBufferPointer?, _ run: PageRun) {
        precondition(run.end <= geometry.smallPageCount, "\(run) outside guest RAM's \(geometry.smallPageCount) pages")
        precondition(bytes.map { $0.count == Int(run.count) * 4096 } ?? true, "\(bytes?.count ?? 0) bytes for \(run)")
    }

    /// The alias bytes of `page`, lent to `body`; nil for a page outside.
    public func withAliasPage<T>(_ page: PageIndex, _ body: (UnsafeMutableRawBufferPointer) throws -> T) rethrows -> T? {
        guard let offset = geometry.offset(of: page) else { return nil }
        // SAFETY: offset + page size lies within the alias, checked by geometry.
        let start = alias.pointer(toSmallPage: offset.rawValue / 4096)
        return try body(UnsafeMutableRawBufferPointer(start: start, count: Int(geometry.pageSize.bytes)))
    }
}

/// Which file a descriptor refers to (`fstat(2)`'s device and inode), to
/// tell whether two descriptors, passed by different processes, are the
/// same file.
public struct FileIdentity: Hashable, Sendable, CustomStringConvertible {
    public let device: UInt64
    public let inode: UInt64

    /// The identity of `descriptor`'s file; device and inode 0 if fstat fails.
    public init(descriptor: Int32) {
        var status = stat()
        if fstat(descriptor, &status) == 0 {
            device = UInt64(status.st_dev)
            inode = UInt64(status.st_ino)
        } else {
            device = 0
            inode = 0
        }
    }

    /// The identity of the file at `path`, nil when there is none.
    public init?(path: String) {
        var status = stat()
        guard stat(path, &status) == 0 else { return nil }
        device = UInt64(status.st_dev)
        inode = UInt64(status.st_ino)
    }

    public var description: String { "device \(device) inode \(inode)" }
}

/// The size of the file behind `descriptor`.
func fileSize(_ descriptor: Int32, _ what: String) throws -> UInt64 {
    var status = stat()
    try checkLibc("fstat \(what)") { fstat(descriptor, &status) }
    return UInt64(status.st_size)
}
