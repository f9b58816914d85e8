import Glibc
import PostcopyCore
import PostcopyMigration
import PostcopyOS
import Synchronization

/// The reference guest's source role: creates the source RAM file, fills it
/// with a known pattern (leaving a share of pages zero), then keeps writing
/// a hot set of pages, so that precopy has real dirtying to chase. Some hot
/// pages flip between data and all zeros, which exercises ZERO_PAGES.
public final class SourceWorkload: @unchecked Sendable {
    // SAFETY (@unchecked): the mapping is shared memory written by the one
    // dirtying thread; other processes read it, which is the point.
    public let path: String
    public let size: UInt64
    private let base: UnsafeMutableRawPointer
    private let seed: UInt64
    public let hotPages: [UInt64]

    /// Creates (or truncates) `path` with `size` bytes and fills it: a
    /// `zeroFraction` of pages stay zero; `dirtyFraction` of the pages form
    /// the hot set `dirty` rewrites.
    public init(path: String, size: UInt64, dirtyFraction: Double, zeroFraction: Double, seed: UInt64) throws {
        guard size > 0, size % (2 << 20) == 0 else {
            throw MigrationError(.incompatible, "source RAM size \(size) must be a positive multiple of 2 MiB")
        }
        self.path = path
        self.size = size
        self.seed = seed
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemCallError("create source RAM \(path)", Errno.current) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw SystemCallError("size \(path) to \(size) bytes", Errno.current) }
        guard let address = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), address != MAP_FAILED else {
            throw SystemCallError("map source RAM \(path)", Errno.current)
        }
        base = address
        let pages = size / 4096
        var generator = SplitMix64(seed: seed)
        let order = Array(0..<pages).shuffled(using: &generator)
        hotPages = Array(order.prefix(Int(Double(pages) * min(max(dirtyFraction, 0), 1)))).sorted()
        let zeroEvery = zeroFraction > 0 ? max(UInt64((1 / zeroFraction).rounded()), 1) : 0
        for page in 0..<pages where zeroEvery == 0 || SourceWorkload.mix(page ^ seed) % zeroEvery != 0 {
            fill(page, generation: 0)
        }
    }

    deinit { munmap(base, Int(size)) }

    /// Registers this process's mapping of the RAM for asynchronous
    /// write-protect, so that the agent can read which pages were written
    /// (`postcopy-push --dirty-log uffd-wp`). Returns the registration
    /// (keep it: closing it ends the tracking) and what to tell the agent;
    /// when the kernel cannot, no registration and the reason.
    public func trackWrites(pretendingAbsent: UffdFeatures = []) -> (WriteTracking?, SourceTrackingOffer) {
        WriteTracking.offering(address: UInt64(UInt(bitPattern: base)), length: size, pretendingAbsent: pretendingAbsent)
    }

    private static func mix(_ value: UInt64) -> UInt64 {
        var generator = SplitMix64(seed: value)
        return generator.next()
    }

    private func fill(_ page: UInt64, generation: UInt64) {
        // SAFETY: page < size / 4096, so its 512 words lie in the mapping.
        let words = (base + Int(page * 4096)).assumingMemoryBound(to: UInt64.self)
        for word in 0..<UInt64(512) {
            words[Int(word)] = patternWord(page: page, word: word, seed: seed &+ generation)
        }
    }

    /// Rewrites the hot set, pass after pass, pausing `pauseMicroseconds`
    /// between passes, until `stop` is set (or forever, when the process is
    /// to be stopped by SIGSTOP and killed). Each pass changes one cache line
    /// of every hot page; one hot page in 64 becomes all zeros instead.
    public func dirty(pauseMicroseconds: UInt32 = 20_000, stop: borrowing Atomic<Bool>) {
        var generation: UInt64 = 1
        while !stop.load(ordering: .relaxed) {
            for page in hotPages {
                // SAFETY: hot pages are pages of the region.
                let bytes = base + Int(page * 4096)
                if (page &+ generation) % 64 == 0 {
                    memset(bytes, 0, 4096)
                    continue
                }
                let words = bytes.assumingMemoryBound(to: UInt64.self)
                let line = Int(generation % 64) * 8
                for word in line..<(line + 8) {
                    words[word] = patternWord(page: page, word: UInt64(word), seed: seed &+ generation)
                }
            }
            generation += 1
            usleep(pauseMicroseconds)
        }
    }
}
