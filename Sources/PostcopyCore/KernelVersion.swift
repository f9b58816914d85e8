/// A Linux kernel release, as far as feature checks care: major.minor.patch.
public struct KernelVersion: Comparable, Hashable, Sendable, CustomStringConvertible {
    public let major: Int
    public let minor: Int
    public let patch: Int

    public init(_ major: Int, _ minor: Int, _ patch: Int) {
        self.major = major
        self.minor = minor
        self.patch = patch
    }

    /// Parses a release string such as `6.1.0-18-amd64` or `5.14.0-rc3`:
    /// the leading dotted numbers, the patch level optional.
    public init?(release: String) {
        let leading = release.prefix { $0.isNumber || $0 == "." }
        let parts = leading.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count >= 2, let major = Int(parts[0]), let minor = Int(parts[1]) else {
            return nil
        }
        let patch = parts.count > 2 ? Int(parts[2]) ?? 0 : 0
        self.init(major, minor, patch)
    }

    public static func < (a: KernelVersion, b: KernelVersion) -> Bool {
        (a.major, a.minor, a.patch) < (b.major, b.minor, b.patch)
    }

    public var description: String { "\(major).\(minor).\(patch)" }
}
