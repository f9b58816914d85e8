import PostcopyCore

/// The `config` target: what operators and local clients hand postcopyd as
/// text. Byte 0 picks the parser (its value mod 4); the rest is its input:
///
/// - 0: `ConfigFile(bytes:schema:)` with the schema of `postcopyd serve`,
///   and the values of `size` and `migration-id` through their parsers;
/// - 1: `ByteSize.parse`;
/// - 2: `MigrationID(hex:)` and `ImageDigest(hex:)`;
/// - 3: `ControlRequest(line:)`, the control socket's request line.
///
/// Properties checked besides "no trap": a parsed settings file holds only
/// known keys, once each, flags without values and options with one, and
/// written out again it parses to the same entries; a parsed size parses
/// again from its decimal digits; a parsed identifier or digest prints as
/// its lower-cased digits and survives its bytes; a parsed request line
/// is the request's name.
enum ConfigFuzzer {
    /// The settings `postcopyd serve` reads from /etc/postcopyd/NAME.conf:
    /// a copy of `Serve.configSchema` (Sources/postcopyd/Serve.swift),
    /// which lives in an executable and cannot be imported. A test compares
    /// the two.
    static let daemonSchema = ConfigFile.Schema(
        options: ["listen", "vmm-socket", "control-socket", "vmm-uid", "memory", "hugetlbfs-dir", "ram-file", "size",
                  "migration-id", "vmm-timeout", "stall-warning-ms", "ready-file", "trace", "background-scheduling",
                  "dead-peer-timeout", "reconnect-timeout", "tls-ca", "tls-cert", "tls-key", "tls-client-name",
                  "migration-secret-file"],
        flags: ["json", "takeover", "insecure-plaintext"])

    static func run(_ input: inout FuzzInput) {
        let selector = input.byte()
        let bytes = Array(input.rest())
        switch selector % 4 {
        case 0: configFile(bytes)
        case 1: byteSize(String(decoding: bytes, as: UTF8.self))
        case 2: identifiers(String(decoding: bytes, as: UTF8.self))
        default: controlRequest(bytes)
        }
    }

    private static func configFile(_ bytes: [UInt8]) {
        let file: ConfigFile
        do throws(ConfigFile.ParseError) {
            file = try ConfigFile(bytes: bytes, schema: daemonSchema)
        } catch {
            use(error.description)
            return
        }
        checkEntries(file)
        let again: ConfigFile
        do throws(ConfigFile.ParseError) {
            again = try ConfigFile(bytes: Array(written(file).utf8), schema: daemonSchema)
        } catch {
            fatalError("fuzz property broken: a parsed settings file written out again is refused: \(error)")
        }
        require(again.entries.map(\.key) == file.entries.map(\.key)
                    && again.entries.map { $0.value.map { Array($0.utf8) } } == file.entries.map { $0.value.map { Array($0.utf8) } },
                "a settings file written out again parses to other entries")
        for entry in file.entries {
            switch (entry.key, entry.value) {
            case let ("size", value?): byteSize(value)
            case let ("migration-id", value?): identifiers(value)
            default: break
            }
        }
    }

    private static func checkEntries(_ file: ConfigFile) {
        var lines: [Int] = []
        for entry in file.entries {
            if daemonSchema.flags.contains(entry.key) {
                require(entry.value == nil, "flag \(entry.key) with a value")
            } else {
                require(daemonSchema.options.contains(entry.key), "unknown key \(entry.key) accepted")
                require(entry.value.map { !$0.isEmpty } == true, "option \(entry.key) without a value")
            }
            require(lines.last.map { $0 < entry.line } ?? (entry.line >= 1), "line \(entry.line) out of order")
            lines.append(entry.line)
        }
        require(Set(file.entries.map(\.key)).count == file.entries.count, "a key accepted twice")
        require(file.arguments == file.entries.flatMap { ["--" + $0.key] + ($0.value.map { [$0] } ?? []) },
                "arguments \(file.arguments) for \(file.entries)")
    }

    /// The entries as a settings file: `key = value` (quoted when a blank at
    /// either end or a leading quote needs it), or a bare flag.
    private static func written(_ file: ConfigFile) -> String {
        file.entries.map { entry in
            guard let value = entry.value else { return entry.key }
            let blanks: Set<Unicode.Scalar> = [" ", "\t", "\r"]
            let quoted = value.unicodeScalars.first.map { blanks.contains($0) || $0 == "\"" } == true
                || value.unicodeScalars.last.map { blanks.contains($0) } == true
            return "\(entry.key) = " + (quoted ? "\"\(value)\"" : value)
        }.joined(separator: "\n")
    }

    private static func byteSize(_ text: String) {
        guard let bytes = ByteSize.parse(text) else { return }
        require(ByteSize.parse(String(bytes)) == bytes, "'\(text)' is \(bytes), whose digits parse otherwise")
        use(ByteSize.format(bytes))
    }

    private static func identifiers(_ text: String) {
        if let id = MigrationID(hex: text) {
            require(id.description == text.lowercased(), "MigrationID(hex: \(text)) prints as \(id)")
            require(MigrationID(bytes: id.bytes) == id, "\(id) does not survive its bytes")
        }
        if let digest = ImageDigest(hex: text) {
            require(digest.description == text.lowercased(), "ImageDigest(hex: \(text)) prints as \(digest)")
            require(ImageDigest(bytes: digest.bytes) == digest, "\(digest) does not survive its bytes")
        }
    }

    private static func controlRequest(_ line: [UInt8]) {
        let request: ControlRequest
        do throws(ControlRequestError) {
            request = try ControlRequest(line: line)
        } catch {
            use(error.description)
            return
        }
        var text = line[...]
        while let last = text.last, last == UInt8(ascii: "\n") || last == UInt8(ascii: "\r") { text.removeLast() }
        require(text.elementsEqual(request.rawValue.utf8), "the line \(line) parses as \(request)")
    }
}
