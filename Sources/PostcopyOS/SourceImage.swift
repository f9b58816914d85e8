import CPostcopy
import Glibc
import PostcopyCore

/// The source agent's read-only view of guest RAM on the source host: the
/// file the workload's memory lives in (a shmem file in /dev/shm, or a
/// hugetlbfs file), mapped shared and read-only, so that what is read is
/// what the workload last wrote.
///
/// The file must not shrink while the image exists: touching a page past
/// its new end raises SIGBUS.
public final class SourceImage: @unchecked Sendable {
    /// The path the image was opened from.
    public let path: String
    /// The file's size in bytes (fstat).
    public let size: UInt64
    /// `.huge2M` when the file is on a hugetlbfs with 2 MiB pages, else `.small`.
    public let pageSize: PageSize
    /// The file's device and inode (fstat), which name it in `/proc/PID/maps`.
    public let device: UInt64
    public let inode: UInt64
    /// The file's owner.
    public let owner: UInt32
    // SAFETY: base..base+size stays mapped (PROT_READ, MAP_SHARED) for the
    // object's lifetime; the workload may write the pages concurrently, so
    // a page read while it runs can be torn: the caller's protocol decides.
    /// The start of a shared, read-only mapping of the whole file.
    public let base: UnsafeRawPointer

    private let fd: Int32
    private static let hugetlbfsMagic: Int64 = 0x9584_58f6

    /// Opens and maps `path` read-only. Fails when the file is missing, is
    /// not a regular file, is empty or not a whole number of its pages, or
    /// cannot be mapped.
    public init(path: String) throws {
        let fd = try checkLibc("open source RAM \(path)") { open(path, O_RDONLY | O_CLOEXEC) }
        do {
            var status = stat()
            try checkLibc("fstat source RAM \(path)") { fstat(fd, &status) }
            guard status.st_mode & S_IFMT == S_IFREG else {
                throw SystemCallError("source RAM \(path): not a regular file", .invalid)
            }
            let size = UInt64(status.st_size)
            var magic: Int64 = 0
            var blockSize: Int64 = 0
            try check("fstatfs source RAM \(path)") { cpc_fstatfs(fd, &magic, &blockSize) }
            let pageSize: PageSize =
                magic == SourceImage.hugetlbfsMagic && UInt64(blockSize) == PageSize.huge2M.bytes ? .huge2M : .small
            guard size > 0 else {
                throw SystemCallError("source RAM \(path): size is 0 bytes (an empty file)", .invalid)
            }
            guard size % pageSize.bytes == 0 else {
                throw SystemCallError(
                    "source RAM \(path): size \(size) bytes is not a multiple of the \(pageSize) page size", .invalid)
            }
            guard size <= UInt64(Int.max) else {
                throw SystemCallError("source RAM \(path): size \(size) bytes is too large to map", .invalid)
            }
            let address = mmap(nil, Int(size), PROT_READ, MAP_SHARED, fd, 0)
            guard let address, address != MAP_FAILED else {
                throw SystemCallError("map source RAM \(path) (\(size) bytes, read-only)", .current)
            }
            self.path = path
            self.size = size
            self.pageSize = pageSize
            device = UInt64(status.st_dev)
            inode = UInt64(status.st_ino)
            owner = status.st_uid
            self.base = UnsafeRawPointer(address)
            self.fd = fd
        } catch {
            close(fd)
            throw error
        }
    }

    deinit {
        munmap(UnsafeMutableRawPointer(mutating: base), Int(size))
        close(fd)
    }

    /// 4 KiB pages in the image, whatever its page size.
    public var smallPageCount: UInt64 { size / PageSize.small.bytes }

    /// Whether 4 KiB page `page` is all zeros now.
    public func isZero(_ page: UInt64) -> Bool {
        withPages(first: page, count: 1) { PageHash.isZero($0) }
    }

    /// A cursor that tells which pages lie in holes of the file, for pages
    /// asked in ascending order (each reader keeps its own).
    public func holes() -> Holes { Holes(fd: fd, size: size) }

    /// Which 4 KiB pages lie in a hole of the file: never written, or
    /// punched. Such a page reads as zeros, and must be known as such
    /// without being read through the mapping: a read fault on a shmem hole
    /// allocates a page, so reading every page would grow the source's
    /// memory by all the RAM its guest never used. Walks the file's
    /// extents with lseek(2) SEEK_DATA and SEEK_HOLE, two calls per
    /// extent; a filesystem without them reports one extent of data.
    ///
    /// A hole may be written right after it was seen, as any page may be
    /// after it was read: the dirty log (or the next hash scan) sends it
    /// again.
    public struct Holes {
        private let fd: Int32
        private let size: UInt64
        /// The extent last found, in bytes: [start, end), a hole or data.
        private var start: UInt64 = 0
        private var end: UInt64 = 0
        private var inHole = false

        init(fd: Int32, size: UInt64) {
            self.fd = fd
            self.size = size
        }

        /// Whether 4 KiB page `page` lies in a hole.
        public mutating func contains(_ page: UInt64) -> Bool {
            let offset = page * PageSize.small.bytes
            if offset < start || offset >= end { find(offset) }
            return inHole
        }

        private mutating func find(_ offset: UInt64) {
            start = offset
            let data = lseek(fd, off_t(offset), Int32(CPC_SEEK_DATA))
            if data < 0 {
                // ENXIO: no data from here to the end. Anything else: the
                // filesystem cannot tell, so read everything.
                inHole = errno == ENXIO
                end = size
            } else if UInt64(data) > offset {
                inHole = true
                end = UInt64(data)
            } else {
                inHole = false
                let hole = lseek(fd, off_t(offset), Int32(CPC_SEEK_HOLE))
                end = hole > data ? UInt64(hole) : size
            }
        }
    }

    /// The hash of 4 KiB page `page` as it is now; a page in a hole (as
    /// `holes`, a reader's cursor, finds it) is the zero page's, unread.
    public func hash(ofPage page: UInt64, holes: inout Holes) -> UInt64 {
        holes.contains(page) ? PageHash.zeroPage : withPages(first: page, count: 1) { PageHash.of($0).hash }
    }

    /// The bytes of 4 KiB pages [first, first+count), lent to `body`.
    /// The range must lie within the image.
    public func withPages<T>(first: UInt64, count: Int, _ body: (UnsafeRawBufferPointer) throws -> T) rethrows -> T {
        precondition(count >= 0 && first <= smallPageCount && UInt64(count) <= smallPageCount - first,
                     "pages \(first)..<\(first)+\(count) outside \(path) (\(smallPageCount) pages)")
        // SAFETY: [first, first+count) pages lie within base..base+size, checked above.
        let start = base + Int(first * PageSize.small.bytes)
        return try body(UnsafeRawBufferPointer(start: start, count: count * Int(PageSize.small.bytes)))
    }
}
