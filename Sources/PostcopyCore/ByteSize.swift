/// Sizes as operators write them: `256M`, `1G`, `64MiB`, `4096`.
public enum ByteSize {
    /// Parses a size with an optional binary unit (K, M, G, T, with or
    /// without `iB`/`B`); nil for anything else or on overflow.
    public static func parse(_ text: String) -> UInt64? {
        var digits = Substring(text.trimmingPrefixAndSuffixSpaces)
        for suffix in ["iB", "B"] where digits.hasSuffix(suffix) && digits.count > suffix.count {
            digits = digits.dropLast(suffix.count)
            break
        }
        let shifts: [Character: UInt64] = ["K": 10, "k": 10, "M": 20, "m": 20, "G": 30, "g": 30, "T": 40, "t": 40]
        var shift: UInt64 = 0
        if let unit = digits.last, let found = shifts[unit] {
            shift = found
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy(\.isASCII), let value = UInt64(digits) else { return nil }
        let (result, overflow) = value.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : result
    }

    /// `1.5 GiB`, `256 MiB`, `4 KiB`, `17 B`.
    public static func format(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        if unit == 0 || value == value.rounded() { return "\(Int(value)) \(units[unit])" }
        return "\((value * 10).rounded() / 10) \(units[unit])"
    }
}

extension String {
    fileprivate var trimmingPrefixAndSuffixSpaces: Substring {
        let start = firstIndex { $0 != " " } ?? endIndex
        let end = lastIndex { $0 != " " }.map { index(after: $0) } ?? start
        return self[start..<max(start, end)]
    }
}

/// `value` with exactly `digits` decimals, without Foundation: `fixed(3.14159, 2)` is "3.14".
public func fixed(_ value: Double, _ digits: Int) -> String {
    guard value.isFinite else { return "\(value)" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let scaled = (abs(value) * scale).rounded()
    let whole = UInt64(scaled / scale)
    var text = (value < 0 && scaled > 0 ? "-" : "") + String(whole)
    if digits > 0 {
        let fraction = String(UInt64(scaled - Double(whole) * scale))
        text += "." + String(repeating: "0", count: max(0, digits - fraction.count)) + fraction
    }
    return text
}
