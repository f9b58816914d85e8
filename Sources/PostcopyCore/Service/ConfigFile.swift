/// An instance's settings file, /etc/postcopyd/NAME.conf: the long options
/// of `postcopyd serve`, one per line.
///
///     # comment
///     listen = 0.0.0.0:7070
///     size = 4G
///     some-flag
///
/// Blank lines and lines starting with '#' are skipped; a value may be
/// quoted with double quotes (to keep leading or trailing blanks). Keys are
/// checked against the options the program knows, so that a typo is an
/// error with its line number, not a silently ignored setting.
public struct ConfigFile: Equatable, Sendable {
    public struct Entry: Equatable, Sendable {
        public let key: String
        /// nil for a bare flag.
        public let value: String?
        public let line: Int
    }

    public enum ParseError: Error, Equatable, CustomStringConvertible, Sendable {
        case malformedLine(line: Int, text: String)
        case unknownKey(line: Int, key: String, known: [String])
        case flagWithValue(line: Int, key: String)
        case missingValue(line: Int, key: String)
        case repeatedKey(line: Int, key: String, firstLine: Int)
        case unterminatedQuote(line: Int)
        case notText

        public var description: String {
            switch self {
            case let .malformedLine(line, text): "line \(line): expected 'key = value' or 'flag', got '\(text)'"
            case let .unknownKey(line, key, known):
                "line \(line): unknown setting '\(key)' (known: \(known.joined(separator: ", ")))"
            case let .flagWithValue(line, key): "line \(line): '\(key)' is a flag and takes no value"
            case let .missingValue(line, key): "line \(line): '\(key)' needs a value ('\(key) = ...')"
            case let .repeatedKey(line, key, firstLine): "line \(line): '\(key)' is already set on line \(firstLine)"
            case let .unterminatedQuote(line): "line \(line): unterminated quote"
            case .notText: "not UTF-8 text"
            }
        }
    }

    /// What a program accepts: options (with a value) and flags (without).
    public struct Schema: Sendable {
        public let options: Set<String>
        public let flags: Set<String>

        public init(options: Set<String>, flags: Set<String> = []) {
            self.options = options
            self.flags = flags
        }

        var known: [String] { (options.union(flags)).sorted() }
    }

    public let entries: [Entry]

    /// Parses `bytes` (the file's contents) against `schema`.
    public init(bytes: [UInt8], schema: Schema) throws(ParseError) {
        guard let text = String(validating: bytes, as: UTF8.self) else { throw .notText }
        var entries: [Entry] = []
        var seen: [String: Int] = [:]
        // Split on the byte: "\r\n" is one Character, which a split on "\n" misses.
        let rawLines = text.utf8.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false)
        for (index, rawLine) in rawLines.enumerated() {
            let number = index + 1
            let line = Substring(rawLine).trimmingBlanks()
            if line.isEmpty || line.hasPrefix("#") { continue }
            let key: String
            let value: String?
            if let equals = line.firstIndex(of: "=") {
                key = String(line[..<equals].trimmingBlanks())
                value = try Self.unquote(line[line.index(after: equals)...].trimmingBlanks(), line: number)
            } else {
                key = String(line)
                value = nil
            }
            guard let first = key.first, first.isLetter,
                  key.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" }) else {
                throw .malformedLine(line: number, text: String(line))
            }
            if schema.flags.contains(key) {
                guard value == nil else { throw .flagWithValue(line: number, key: key) }
            } else if schema.options.contains(key) {
                guard let value, !value.isEmpty else { throw .missingValue(line: number, key: key) }
            } else {
                throw .unknownKey(line: number, key: key, known: schema.known)
            }
            if let first = seen[key] { throw .repeatedKey(line: number, key: key, firstLine: first) }
            seen[key] = number
            entries.append(Entry(key: key, value: value, line: number))
        }
        self.entries = entries
    }

    /// The value inside double quotes, if `text` starts with one. Quotes are
    /// found by Unicode scalar, like blanks (see `trimmingBlanks`).
    private static func unquote(_ text: Substring, line: Int) throws(ParseError) -> String {
        let scalars = text.unicodeScalars
        guard scalars.first == "\"" else { return String(text) }
        guard scalars.count >= 2, scalars.last == "\"" else { throw .unterminatedQuote(line: line) }
        return String(Substring(scalars.dropFirst().dropLast()))
    }

    /// The entries as command-line arguments ("--key", "value"), to be
    /// parsed by the same parser as the command line, before it (so that
    /// the command line wins).
    public var arguments: [String] {
        entries.flatMap { entry in ["--" + entry.key] + (entry.value.map { [$0] } ?? []) }
    }
}

extension Substring {
    /// Without spaces, tabs and CRs at either end. Trimmed by Unicode scalar,
    /// not by Character: a blank followed by a combining mark is one
    /// Character, and its blank must go all the same.
    func trimmingBlanks() -> Substring {
        var scalars = unicodeScalars[...]
        let isBlank = { (scalar: Unicode.Scalar) in scalar == " " || scalar == "\t" || scalar == "\r" }
        while let first = scalars.first, isBlank(first) { scalars.removeFirst() }
        while let last = scalars.last, isBlank(last) { scalars.removeLast() }
        return Substring(scalars)
    }
}
