/// What /proc/PID/smaps says about the mappings that overlap one address
/// range: how much of it is mapped with 2 MiB page-table entries (PMDs).
/// Pure: it takes the file's text, so tests feed it captured samples.
///
/// smaps has one block per mapping (VMA): a header line
/// `7f0000000000-7f0040000000 rw-s 00000000 00:01 1234  /memfd:guest (deleted)`
/// and then `Key:  value kB` lines, ending with `VmFlags:`. A mapping that
/// only partly overlaps the range counts whole: smaps has no finer figures.
/// Guest RAM is one mapping, or a few the VMM split it into.
public struct SmapsRange: Equatable, Sendable {
    /// Mappings that overlap the range.
    public var mappings = 0
    /// Their size and resident set, in bytes.
    public var size: UInt64 = 0
    public var resident: UInt64 = 0
    /// Bytes of shmem (memfd, tmpfs) mapped by PMD entries (`ShmemPmdMapped`).
    public var shmemPmdMapped: UInt64 = 0
    /// Bytes of other files mapped by PMD entries (`FilePmdMapped`).
    public var filePmdMapped: UInt64 = 0
    /// Whether any of the mappings is marked MADV_NOHUGEPAGE (`nh` in
    /// `VmFlags`), and whether all of them are marked MADV_HUGEPAGE (`hg`).
    public var noHugepage = false
    public var hugepage = false

    public init() {}

    /// The figures for the mappings of `text` that overlap [start, end).
    public init(smaps text: String, start: UInt64, end: UInt64) {
        var inside = false
        var allHugepage = true
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            if let (low, high) = Self.header(line) {
                inside = low < end && start < high
                if inside { mappings += 1 }
                continue
            }
            guard inside else { continue }
            if line.hasPrefix("VmFlags:") {
                let flags = line.dropFirst("VmFlags:".count).split(separator: " ")
                if flags.contains("nh") { noHugepage = true }
                if !flags.contains("hg") { allHugepage = false }
                continue
            }
            let fields = line.split(whereSeparator: { $0 == ":" || $0 == " " || $0 == "\t" })
            guard fields.count >= 2, let value = UInt64(fields[1]) else { continue }
            let bytes = fields.count > 2 && fields[2] == "kB" ? value * 1024 : value
            switch fields[0] {
            case "Size": size += bytes
            case "Rss": resident += bytes
            case "ShmemPmdMapped": shmemPmdMapped += bytes
            case "FilePmdMapped": filePmdMapped += bytes
            default: break
            }
        }
        hugepage = mappings > 0 && allHugepage
    }

    /// 2 MiB extents mapped by PMD entries, shmem and other files together.
    public var pmdMappedExtents: UInt64 { (shmemPmdMapped + filePmdMapped) / PageSize.huge2M.bytes }

    /// `start-end` in hex at the start of a line, with a space after: a
    /// mapping's header. Nil for a `Key: value` line.
    static func header(_ line: Substring) -> (UInt64, UInt64)? {
        guard let space = line.firstIndex(of: " ") else { return nil }
        let range = line[..<space]
        guard let dash = range.firstIndex(of: "-"),
              let low = UInt64(range[..<dash], radix: 16),
              let high = UInt64(range[range.index(after: dash)...], radix: 16) else { return nil }
        return (low, high)
    }
}
