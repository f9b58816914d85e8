/// Which dirty log the agent asks for (`postcopy-push --dirty-log`).
public enum DirtyLogChoice: String, Sendable, CaseIterable {
    /// uffd-wp when the source VMM offers it, else hashing, with the reason logged.
    case auto
    /// uffd-wp, or fail.
    case uffdWP = "uffd-wp"
    /// Hash every page in every round (any source, any kernel).
    case hash
}

/// The source's guest RAM as another process maps it, and the arithmetic
/// that turns the address ranges a `PAGEMAP_SCAN` reports into 4 KiB page
/// indexes of the RAM file. The mapping must map the file from offset 0
/// (checked against `/proc/PID/maps`), so page n of the file is the page at
/// `address + n × 4096`.
public struct TrackedMapping: Equatable, Sendable, CustomStringConvertible {
    public let address: UInt64
    public let length: UInt64

    public init(address: UInt64, length: UInt64) {
        self.address = address
        self.length = length
    }

    public var end: UInt64 { address + length }

    /// The 4 KiB pages of written range [start, end), or nil when the range
    /// is empty, not page-aligned or not inside the mapping: a scan that
    /// answers that is not to be trusted.
    public func pages(start: UInt64, end: UInt64) -> PageRun? {
        guard start < end, start >= address, end <= self.end, start % 4096 == 0, end % 4096 == 0 else { return nil }
        return PageRun(first: (start - address) / 4096, count: (end - start) / 4096)
    }

    public var description: String { "0x\(String(address, radix: 16))+\(length)" }
}

/// One line of `/proc/PID/maps`: a mapping's range, whether it is shared,
/// and the file it maps.
public struct ProcMapsEntry: Equatable, Sendable {
    public let start: UInt64
    public let end: UInt64
    public let shared: Bool
    public let offset: UInt64
    /// The file's device, as `stat` gives it (`st_dev`).
    public let device: UInt64
    public let inode: UInt64

    /// Parses one line: `start-end perms offset major:minor inode [path]`,
    /// every number hexadecimal except the inode. Nil when it is not one.
    public init?(line: Substring) {
        let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
        guard fields.count >= 5 else { return nil }
        let range = fields[0].split(separator: "-")
        let device = fields[3].split(separator: ":")
        guard range.count == 2, device.count == 2, fields[1].count == 4,
              let start = UInt64(range[0], radix: 16), let end = UInt64(range[1], radix: 16), start < end,
              let offset = UInt64(fields[2], radix: 16),
              let major = UInt64(device[0], radix: 16), let minor = UInt64(device[1], radix: 16),
              let inode = UInt64(fields[4]) else { return nil }
        self.start = start
        self.end = end
        shared = fields[1].last == "s"
        self.offset = offset
        self.device = ProcMapsEntry.deviceNumber(major: major, minor: minor)
        self.inode = inode
    }

    /// glibc's `makedev`: how `st_dev` packs a major and a minor number.
    public static func deviceNumber(major: UInt64, minor: UInt64) -> UInt64 {
        (major & 0xFFFF_F000) << 32 | (major & 0xFFF) << 8 | (minor & 0xFFFF_FF00) << 12 | (minor & 0xFF)
    }

    /// The entry of `maps` (the whole file) that starts at `address`.
    public static func entry(at address: UInt64, in maps: String) -> ProcMapsEntry? {
        maps.split(separator: "\n").lazy.compactMap { ProcMapsEntry(line: $0) }.first { $0.start == address }
    }
}

/// Whether a dirty log missed a write, found by `--verify-dirty-log`: a
/// page whose bytes no longer match what was last sent, although the log
/// did not report it. While the source runs, such a page may have been
/// written after the scan, so it is only a suspect until the next scan,
/// which must report it; once the source is paused, a suspect is a miss.
public struct DirtyLogAudit: Sendable {
    /// Pages that changed but were not in the last scan.
    public private(set) var suspects: PageBitmap
    /// Pages the log missed, in all.
    public private(set) var missed: UInt64 = 0
    /// The first few missed pages, for the error message.
    public private(set) var firstMissed: [UInt64] = []

    public init(pageCount: UInt64) { suspects = PageBitmap(count: pageCount) }

    /// Takes one round: `written` is what the scan reported, `changed` the
    /// pages whose bytes differ from what was last sent, hashed after the
    /// scan. A suspect of the round before that this scan does not report
    /// is a miss; so is any change not reported when `paused`.
    public mutating func record(written: PageBitmap, changed: PageBitmap, paused: Bool) {
        var next = suspects.nextSet(from: 0)
        while let page = next {
            if !written.contains(page) { miss(page) }
            next = suspects.nextSet(from: page + 1)
        }
        suspects = PageBitmap(count: written.count)
        next = changed.nextSet(from: 0)
        while let page = next {
            if !written.contains(page) {
                if paused { miss(page) } else { suspects.insert(page) }
            }
            next = changed.nextSet(from: page + 1)
        }
    }

    private mutating func miss(_ page: UInt64) {
        missed += 1
        if firstMissed.count < 16 { firstMissed.append(page) }
    }
}
