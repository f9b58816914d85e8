import CPostcopy
import Glibc
import PostcopyCore

/// The page-state record (`PageStateHeader`, `PageStateBitmap`) in a memfd
/// of its own, mapped shared. It outlives the daemon while the VMM (or
/// systemd's fd store) holds a descriptor of it, and a restarted daemon
/// adopts it to take the migration over.
public final class PageStateFile: @unchecked Sendable {
    // SAFETY (@unchecked): the mapping stays for the object's lifetime; the
    // bitmap's words change only under the caller's lock (see PageStateBitmap).
    public let fd: Int32
    public let header: PageStateHeader
    /// The stale bitmap, in place.
    public let bitmap: PageStateBitmap
    private let base: UnsafeMutableRawPointer
    private let length: Int

    /// A record's file made ahead of the switchover: the memfd, sized,
    /// sealed, mapped and every page touched, so that writing the record in
    /// the pause faults in no fresh memory.
    public final class Prepared: @unchecked Sendable {
        // SAFETY (@unchecked): used once, by the thread that writes the record.
        let fd: Int32
        let base: UnsafeMutableRawPointer
        let length: Int
        let geometry: PageGeometry
        /// Whether a record took the file over (it then closes it).
        var taken = false

        public init(geometry: PageGeometry) throws {
            let length = PageStateLayout.fileBytes(for: geometry)
            let fd = try check("memfd_create for the page-state record") {
                cpc_memfd_create("postcopyd-page-state", UInt32(CPC_MFD_CLOEXEC) | UInt32(CPC_MFD_ALLOW_SEALING))
            }
            do {
                try checkLibc("ftruncate the page-state record to \(length) bytes") { ftruncate(fd, off_t(length)) }
                // The VMM keeps the record: sealed, it can neither shrink it
                // (SIGBUS here) nor grow it into something else.
                try check("seal the page-state record's size (F_SEAL_SHRINK | F_SEAL_GROW)") {
                    cpc_add_seals(fd, UInt32(CPC_F_SEAL_SHRINK) | UInt32(CPC_F_SEAL_GROW))
                }
                base = try PageStateFile.map(fd, length)
            } catch {
                close(fd)
                throw error
            }
            // SAFETY: base..base+length is the mapping just made.
            memset(base, 0, Int(length))
            self.fd = fd
            self.length = Int(length)
            self.geometry = geometry
        }

        deinit {
            guard !taken else { return }
            munmap(base, length)
            close(fd)
        }
    }

    /// Writes a new record at switchover: the stale bitmap first, then the
    /// header, whose checksum makes the record valid. Into `prepared` when
    /// given (its geometry must be the header's), else a file made now.
    public init(prepared: Prepared? = nil, header: PageStateHeader, stale: PageBitmap) throws {
        precondition(stale.count == header.geometry.smallPageCount, "stale bitmap of \(stale.count) bits for \(header.geometry)")
        let file = try prepared ?? Prepared(geometry: header.geometry)
        precondition(file.geometry == header.geometry, "a record prepared for \(file.geometry), written for \(header.geometry)")
        precondition(!file.taken, "a prepared record written twice")
        file.taken = true
        fd = file.fd
        base = file.base
        length = file.length
        self.header = header
        bitmap = PageStateBitmap(words: base + PageStateLayout.bitmapOffset,
                                 count: stale.count)
        bitmap.store(stale)
        header.encoded.withUnsafeBytes { base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }

    /// Takes ownership of `descriptor`, a record handed back; refuses (and
    /// closes) one whose header or size does not check out.
    public init(adopting descriptor: Int32) throws {
        _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC)
        let base: UnsafeMutableRawPointer
        let header: PageStateHeader
        let length: Int
        do {
            // The header first, read rather than mapped: it says how big
            // the record must be, before anything of that size is mapped.
            let size = try fileSize(descriptor, "the page-state record handed over")
            var bytes = [UInt8](repeating: 0, count: PageStateHeader.bytes)
            let read = bytes.withUnsafeMutableBytes { pread(descriptor, $0.baseAddress, $0.count, 0) }
            guard read >= 0 else { throw SystemCallError("read the page-state record's header", Errno.current) }
            header = try PageStateHeader(decoding: bytes.prefix(read))
            let expected = PageStateLayout.fileBytes(for: header.geometry)
            guard size == expected else { throw PageStateError.sizeMismatch(fileBytes: size, expected: expected) }
            length = Int(size)
            base = try PageStateFile.map(descriptor, size)
        } catch {
            close(descriptor)
            throw error
        }
        fd = descriptor
        self.base = base
        self.length = length
        self.header = header
        bitmap = PageStateBitmap(words: base + PageStateLayout.bitmapOffset,
                                 count: header.geometry.smallPageCount)
    }

    deinit {
        munmap(base, length)
        close(fd)
    }

    /// The stale pages the record holds; throws when it holds bits past the
    /// region or more stale pages than there were at switchover (it can
    /// only ever lose them).
    public func stalePages() throws -> PageBitmap {
        guard let stale = bitmap.load() else {
            throw SystemCallError("the page-state record sets bits past the end of guest RAM", .invalid)
        }
        guard stale.popCount <= header.stalePagesAtSwitchover else {
            throw SystemCallError("the page-state record holds \(stale.popCount) stale pages, more than the \(header.stalePagesAtSwitchover) of switchover", .invalid)
        }
        return stale
    }

    public var identity: FileIdentity { FileIdentity(descriptor: fd) }

    private var milestonesWord: UnsafeMutablePointer<UInt64> {
        (base + PageStateLayout.milestonesOffset).assumingMemoryBound(to: UInt64.self)
    }

    /// How far the migration got past switchover, as recorded; bits this
    /// version does not define are dropped.
    public var milestones: PageStateMilestones {
        PageStateMilestones(rawValue: milestonesWord.pointee).intersection(.known)
    }

    /// Adds `reached` to the record with one aligned 8-byte store. One
    /// thread of the daemon records at a time (switchover, then the
    /// session's lock).
    public func record(_ reached: PageStateMilestones) {
        milestonesWord.pointee |= reached.rawValue
    }

    private static func map(_ fd: Int32, _ length: UInt64) throws -> UnsafeMutableRawPointer {
        let address = mmap(nil, Int(length), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let address, address != MAP_FAILED else {
            throw SystemCallError("map the page-state record (\(length) bytes)", Errno.current)
        }
        return address
    }
}
