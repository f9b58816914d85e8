import Glibc
import PostcopyCore
import PostcopyOS

/// A source RAM file in /dev/shm that a test fills and then writes, as a
/// guest would, while the agent migrates it. Removed when released.
final class SourceFile: @unchecked Sendable {
    let path: String
    let size: UInt64
    let base: UnsafeMutableRawPointer
    let seed: UInt64

    /// Filled with the pattern of `seed`, except pages for which `isZero`
    /// holds; in `directory` (a tmpfs, or a hugetlbfs mount).
    init(size: UInt64, seed: UInt64, in directory: String = "/dev/shm", isZero: (UInt64) -> Bool) throws {
        path = "\(directory)/postcopy-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        self.size = size
        self.seed = seed
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw TestFailure("create \(path): errno \(errno)") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0,
              let address = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), address != MAP_FAILED else {
            unlink(path)
            throw TestFailure("size and map \(path): errno \(errno)")
        }
        base = address
        for page in 0..<(size / 4096) where !isZero(page) { write(page, generation: 0) }
    }

    deinit {
        munmap(base, Int(size))
        unlink(path)
    }

    var pageCount: UInt64 { size / 4096 }

    /// 4 KiB pages of the file that exist (its allocated blocks): the
    /// pages never written are holes.
    var allocatedPages: UInt64 {
        var status = stat()
        return stat(path, &status) == 0 ? UInt64(status.st_blocks) / 8 : 0
    }

    /// Registers this process's mapping for uffd-wp, as a source VMM does;
    /// the registration (nil when refused) and what to tell the agent.
    func trackWrites(pretendingAbsent: UffdFeatures = []) -> (WriteTracking?, SourceTrackingOffer) {
        WriteTracking.offering(address: UInt64(UInt(bitPattern: base)), length: size, pretendingAbsent: pretendingAbsent)
    }

    /// Rewrites `page` with the pattern of `generation`.
    func write(_ page: UInt64, generation: UInt64) {
        let words = (base + Int(page * 4096)).assumingMemoryBound(to: UInt64.self)
        for word in 0..<512 {
            words[word] = patternWord(page: page, word: UInt64(word), seed: seed &+ generation)
        }
    }

    func zero(_ page: UInt64) { memset(base + Int(page * 4096), 0, 4096) }

    func isZero(_ page: UInt64) -> Bool {
        UnsafeBufferPointer(start: (base + Int(page * 4096)).assumingMemoryBound(to: UInt64.self), count: 512)
            .allSatisfy { $0 == 0 }
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
