import Glibc
import PostcopyCore
import Synchronization

/// Why a page could not be installed. A failed system call stays its
/// cause, errno and all.
public enum InstallError: ChainedError, Equatable, CustomStringConvertible {
    /// UFFDIO_CONTINUE found no page in the page cache.
    case hole(PageIndex)
    /// The page lies outside the region.
    case outOfRange(PageIndex)
    /// The kernel kept answering EAGAIN.
    case stillChanging(PageIndex, attempts: Int)
    case system(PageIndex, SystemCallError)

    public var description: String {
        switch self {
        case let .hole(page):
            return "install \(page): not in the page cache (a hole); it must be written or materialized through the alias before UFFDIO_CONTINUE"
        case let .outOfRange(page):
            return "install \(page): outside the region"
        case let .stillChanging(page, attempts):
            return "install \(page): UFFDIO_CONTINUE still answered EAGAIN after \(attempts) attempts"
        case let .system(page, error):
            return "install \(page): \(error)"
        }
    }

    public var link: String {
        guard case let .system(page, _) = self else { return description }
        return "install \(page)"
    }

    public var underlying: (any Error)? {
        guard case let .system(_, error) = self else { return nil }
        return error
    }
}

/// Counters of what the installer did. Written with relaxed atomics so that
/// status readers on other threads see them without slowing the fault path.
public final class InstallCounters: Sendable {
    public let continued = Atomic<UInt64>(0)
    public let alreadyMapped = Atomic<UInt64>(0)
    public let retries = Atomic<UInt64>(0)
    public let materialized = Atomic<UInt64>(0)
    public init() {}
}

/// Makes guest pages visible to the guest: UFFDIO_CONTINUE on its mapping,
/// with the outcomes the kernel can give handled in one place.
///
/// Safe to use from several threads: the fault thread installs pages that
/// are ready, and (in later layers) the threads that receive fetched pages
/// install those.
public final class PageInstaller: Sendable {
    public let uffd: Userfaultfd
    public let file: MemoryFile
    /// Where the guest's registered mapping of `file` starts.
    public let guestBase: UInt64
    public let counters = InstallCounters()

    /// EAGAIN means the address space is changing under us (mremap, fork,
    /// a VMA split); it settles quickly, but never wait forever.
    public static let maxRetries = 10_000

    public init(uffd: Userfaultfd, file: MemoryFile, guestBase: UInt64) {
        self.uffd = uffd
        self.file = file
        self.guestBase = guestBase
    }

    public var geometry: PageGeometry { file.geometry }

    /// Maps `page` into the guest and wakes its waiters. A page something
    /// else mapped first is not an error: its waiters are woken.
    @inline(__always)
    public func install(_ page: PageIndex) throws(InstallError) {
        guard let offset = geometry.offset(of: page) else { throw .outOfRange(page) }
        let start = guestBase + offset.rawValue
        let length = geometry.pageSize.bytes
        var attempts = 0
        while true {
            let outcome: ContinueOutcome
            do {
                outcome = try uffd.continue(start: start, length: length)
            } catch {
                throw .system(page, error)
            }
            switch outcome {
            case .mapped:
                counters.continued.add(1, ordering: .relaxed)
                return
            case .alreadyMapped:
                counters.alreadyMapped.add(1, ordering: .relaxed)
                do { try uffd.wake(start: start, length: length) } catch { throw .system(page, error) }
                return
            case .hole:
                throw .hole(page)
            case .retry:
                attempts += 1
                counters.retries.add(1, ordering: .relaxed)
                guard attempts < Self.maxRetries else { throw .stillChanging(page, attempts: attempts) }
                sched_yield()
            }
        }
    }

    /// Installs a page that may be a hole: makes it exist first (zeros where
    /// nothing was ever written; an existing page is left untouched), then
    /// CONTINUEs it.
    public func materializeAndInstall(_ page: PageIndex) throws(InstallError) {
        guard let offset = geometry.offset(of: page) else { throw .outOfRange(page) }
        do {
            try file.materialize(offset: offset, length: geometry.pageSize.bytes)
        } catch {
            throw .system(page, error)
        }
        counters.materialized.add(1, ordering: .relaxed)
        try install(page)
    }
}
