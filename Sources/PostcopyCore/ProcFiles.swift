/// Parsers for the /proc and /sys files the capability probe reads. Pure:
/// they take the file's text, so tests feed them captured samples.

/// The hugepage pool as /proc/meminfo reports it.
public struct HugepagePool: Equatable, Sendable {
    public var total: UInt64 = 0
    public var free: UInt64 = 0
    public var reserved: UInt64 = 0
    public var surplus: UInt64 = 0
    /// The default hugepage size in bytes (`Hugepagesize:`), 0 when absent.
    public var pageSize: UInt64 = 0

    public init() {}

    /// Free pages not yet promised to a mapping: what a new region can use.
    public var available: UInt64 { free >= reserved ? free - reserved : 0 }

    public init(meminfo text: String) {
        let values = procValues(text)
        total = values["HugePages_Total"] ?? 0
        free = values["HugePages_Free"] ?? 0
        reserved = values["HugePages_Rsvd"] ?? 0
        surplus = values["HugePages_Surp"] ?? 0
        pageSize = values["Hugepagesize"] ?? 0
    }
}

/// The `Key: value [kB]` lines of /proc/meminfo and /proc/PID/status: each
/// key's value, in bytes where the line says kB, as written otherwise.
/// Lines that are not a key and a number are skipped.
public func procValues(_ text: String) -> [String: UInt64] {
    var values: [String: UInt64] = [:]
    for line in text.split(separator: "\n") {
        let fields = line.split(whereSeparator: { $0 == ":" || $0 == " " || $0 == "\t" })
        guard fields.count >= 2, let value = UInt64(fields[1]) else { continue }
        values[String(fields[0])] = fields.count > 2 && fields[2] == "kB" ? value * 1024 : value
    }
    return values
}

/// A mounted hugetlbfs, from /proc/mounts.
public struct HugetlbfsMount: Equatable, Sendable {
    public let path: String
    /// The mount's `pagesize=` option in bytes, nil when the mount names none
    /// (it then uses the default hugepage size).
    public let pageSize: UInt64?

    public init(path: String, pageSize: UInt64?) {
        self.path = path
        self.pageSize = pageSize
    }

    /// Every hugetlbfs mount listed in a /proc/mounts text.
    public static func parse(mounts text: String) -> [HugetlbfsMount] {
        text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count >= 4, fields[2] == "hugetlbfs" else { return nil }
            let option = fields[3].split(separator: ",").first { $0.hasPrefix("pagesize=") }
            let size = option.flatMap { parseSize($0.dropFirst("pagesize=".count)) }
            return HugetlbfsMount(path: unescapeMountPath(fields[1]), pageSize: size)
        }
    }

    /// The first mount among `mounts` whose pages are 2 MiB; a mount that
    /// names no `pagesize=` has the default hugepage size.
    public static func first2MiB(among mounts: [HugetlbfsMount], defaultPageSize: UInt64) -> HugetlbfsMount? {
        mounts.first { ($0.pageSize ?? defaultPageSize) == PageSize.huge2M.bytes }
    }

    /// "2M", "1G", "2048k" or bytes.
    static func parseSize(_ text: Substring) -> UInt64? {
        guard let unit = text.last else { return nil }
        let multipliers: [Character: UInt64] = ["k": 1 << 10, "K": 1 << 10, "m": 1 << 20,
                                                "M": 1 << 20, "g": 1 << 30, "G": 1 << 30]
        if let multiplier = multipliers[unit] {
            return UInt64(text.dropLast()).map { $0 * multiplier }
        }
        return UInt64(text)
    }

    /// /proc/mounts writes space, tab, newline and backslash as octal escapes.
    static func unescapeMountPath(_ field: Substring) -> String {
        var bytes: [UInt8] = []
        var utf8 = Array(field.utf8)[...]
        while let byte = utf8.popFirst() {
            if byte == UInt8(ascii: "\\"), utf8.count >= 3,
               let value = UInt8(String(decoding: utf8.prefix(3), as: UTF8.self), radix: 8) {
                bytes.append(value)
                utf8 = utf8.dropFirst(3)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// The selected value of a sysfs choice file such as
/// /sys/kernel/mm/transparent_hugepage/shmem_enabled: `always [never] advise`
/// gives `never`.
public func selectedSysfsChoice(_ text: String) -> String? {
    guard let open = text.firstIndex(of: "["), let close = text[open...].firstIndex(of: "]") else {
        let trimmed = text.split(whereSeparator: \.isWhitespace)
        return trimmed.count == 1 ? String(trimmed[0]) : nil
    }
    return String(text[text.index(after: open)..<close])
}

/// A process's memory, from /proc/PID/status, in bytes: what the daemon
/// costs beyond guest RAM is `anonymous + file` (the guest's shared memory
/// file is counted apart, as `shmem`).
public struct ProcessMemory: Codable, Equatable, Sendable {
    /// Peak resident set (VmHWM).
    public var peakResident: UInt64 = 0
    public var resident: UInt64 = 0
    public var anonymous: UInt64 = 0
    public var file: UInt64 = 0
    public var shmem: UInt64 = 0

    public init() {}

    /// Reads the `VmHWM`, `VmRSS`, `RssAnon`, `RssFile` and `RssShmem` lines
    /// (values in kB); nil when `VmRSS` is missing.
    public init?(status text: String) {
        let values = procValues(text)
        guard let resident = values["VmRSS"] else { return nil }
        self.resident = resident
        peakResident = values["VmHWM"] ?? 0
        anonymous = values["RssAnon"] ?? 0
        file = values["RssFile"] ?? 0
        shmem = values["RssShmem"] ?? 0
    }

    /// Resident memory that is not guest RAM.
    public var overhead: UInt64 { anonymous + file }
}
