import Foundation
import PostcopyCore
@testable import PostcopyFuzz
import Testing

/// The checked-in fuzz inputs (fuzz/corpus, fuzz/regressions) run through
/// their targets on every `swift test`, and the corpus kept equal to what
/// the seed generator builds from the current encoders.
@Suite struct CorpusTests {
    /// The repository's fuzz/ directory, found from this file's path.
    static let fuzzDirectory = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("fuzz")

    /// Every file under fuzz/corpus/<target>/ and fuzz/regressions/<target>/.
    static let checkedIn: [FuzzInputFile] = ["corpus", "regressions"].flatMap { kind in
        FuzzTarget.allCases.flatMap { target in
            fileNames(kind, target).map { FuzzInputFile(kind: kind, target: target, name: $0) }
        }
    }

    static func fileNames(_ kind: String, _ target: FuzzTarget) -> [String] {
        let directory = fuzzDirectory.appendingPathComponent(kind).appendingPathComponent(target.rawValue)
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        return names.filter { !$0.hasPrefix(".") }.sorted()
    }

    /// Each input runs in a child process (an exit test), so that a fault
    /// fails that input's case alone and says what broke.
    @Test(arguments: checkedIn)
    func runsWithoutAFault(_ file: FuzzInputFile) async throws {
        let bytes = try file.bytes()
        let target = file.target.rawValue
        let passed = await #expect(processExitsWith: .success) { [bytes = bytes as [UInt8], target = target as String] in
            FuzzTarget(rawValue: target)?.run(bytes)
        }
        guard passed == nil else { return }
        // Failed: run it again, expecting the failure, to show what broke.
        let failed = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            [bytes = bytes as [UInt8], target = target as String] in
            FuzzTarget(rawValue: target)?.run(bytes)
        }
        let lines = String(decoding: failed?.standardErrorContent ?? [], as: UTF8.self).split(separator: "\n")
        let cause = lines.filter { $0.contains("Fatal error") || $0.contains("runtime failure") }.prefix(2)
        Issue.record("""
            fuzz/\(file.path): \(cause.isEmpty ? "a trap with no message" : cause.joined(separator: "; ")); \
            for its stack: postcopy-fuzz run \(target) fuzz/\(file.path)
            """)
    }

    @Test func theCorpusIsWhatTheSeedGeneratorBuilds() throws {
        for (target, seeds) in FuzzTarget.seeds() {
            #expect(!seeds.isEmpty, "\(target) has no seeds")
            let names = Self.fileNames("corpus", target)
            #expect(names == seeds.map(\.name).sorted(),
                    "fuzz/corpus/\(target) differs from the seeds: run make fuzz-seed")
            for seed in seeds where names.contains(seed.name) {
                let file = FuzzInputFile(kind: "corpus", target: target, name: seed.name)
                #expect(try file.bytes() == seed.bytes, "fuzz/corpus/\(target)/\(seed.name) is stale: run make fuzz-seed")
            }
        }
        #expect(Set(FuzzTarget.seeds().keys) == Set(FuzzTarget.allCases))
    }

    @Test func frameSeedsHoldEveryMessageTypeAndDecode() {
        var types: Set<MessageType> = []
        for seed in FuzzTarget.seeds()[.frames] ?? [] {
            let options = seed.bytes[0]
            var stream = Array(seed.bytes.dropFirst(10))
            if options & FrameFuzzer.repairChecksums != 0 { repairFrameChecksums(&stream) }
            if options & FrameFuzzer.vmmSocket != 0 {
                types.formUnion(Self.decodeWhole(stream, as: VMMMessage.self, seed.name))
            } else {
                types.formUnion(Self.decodeWhole(stream, as: Message.self, seed.name))
            }
        }
        #expect(types == Set(MessageType.allCases))
    }

    /// The types of the messages a seed's stream holds, which decodes
    /// without an error and leaves nothing over (but the end of a `-cut` seed).
    static func decodeWhole<M: WireMessage>(_ stream: [UInt8], as: M.Type, _ name: String) -> [MessageType] {
        let outcome = FrameFuzzer.decode(stream, as: M.self, splitSeed: nil)
        #expect(outcome.failure == nil, "\(name): \(String(describing: outcome.failure))")
        let whole = outcome.messages.reduce(0) { $0 + $1.encoded().count }
        #expect(outcome.buffered == (name.hasSuffix("-cut") ? stream.count - whole : 0), "\(name)")
        return outcome.messages.map(\.type)
    }

    @Test func handshakeSeedsReachTheirEnd() {
        let seeds = Dictionary(uniqueKeysWithValues: (FuzzTarget.seeds()[.handshake] ?? []).map { ($0.name, $0.bytes) })
        for name in ["migration", "rejoin", "takeover", "huge-pages", "bulk-streams"] {
            var input = FuzzInput(seeds[name] ?? [])
            #expect(HandshakeFuzzer.session(after: &input).phase == .complete, "\(name)")
        }
        var streams = FuzzInput(seeds["bulk-streams"] ?? [])
        let twoStreams = HandshakeFuzzer.session(after: &streams)
        #expect(twoStreams.bulkStreams == 2 && twoStreams.pauses == 1)
        var rejoin = FuzzInput(seeds["rejoin"] ?? [])
        #expect(HandshakeFuzzer.session(after: &rejoin).pauses == 1)
        // The only HELLOs admitted in "refused" are the right bulk and urgent ones.
        var refused = FuzzInput(seeds["refused"] ?? [])
        let session = HandshakeFuzzer.session(after: &refused)
        #expect(session.phase == .precopy && session.migrationID == HandshakeFuzzer.migrationID)
    }

    @Test func pageStateSeedsHoldAValidHeader() throws {
        for seed in FuzzTarget.seeds()[.bitmap] ?? [] where seed.name.hasPrefix("page-state") {
            var file = Array(seed.bytes.dropFirst(5))
            if seed.bytes[0] & BitmapFuzzer.repairChecksum != 0 {
                #expect(throws: PageStateError.self) { try PageStateHeader(decoding: file[...]) }
                let checksum = CRC32C.checksum(Array(file[0..<(PageStateHeader.bytes - 4)]))
                file.replaceSubrange((PageStateHeader.bytes - 4)..<PageStateHeader.bytes,
                                     with: (0..<4).map { UInt8(truncatingIfNeeded: checksum >> (8 * $0)) })
            }
            let header = try PageStateHeader(decoding: file[...])
            if file.count > PageStateHeader.bytes {
                #expect(UInt64(file.count) == PageStateLayout.fileBytes(for: header.geometry), "\(seed.name)")
            }
        }
    }

    /// `ConfigFuzzer.daemonSchema` copies `Serve.configSchema`, which lives
    /// in the postcopyd executable: the names quoted in its source must be
    /// the same.
    @Test func theSchemaIsTheDaemons() throws {
        let serve = Self.fuzzDirectory.deletingLastPathComponent().appendingPathComponent("Sources/postcopyd/Serve.swift")
        let source = String(decoding: try Data(contentsOf: serve), as: UTF8.self)
        let start = try #require(source.range(of: "configSchema = ConfigFile.Schema("), "no configSchema in Serve.swift")
        let end = try #require(source[start.upperBound...].range(of: "])\n"), "configSchema has no end")
        let section = source[start.upperBound..<end.upperBound]
        let flags = try #require(section.range(of: "flags:"), "configSchema has no flags")
        /// The strings quoted in `text`.
        func quoted(_ text: Substring) -> Set<String> {
            Set(text.split(separator: "\"", omittingEmptySubsequences: false).enumerated()
                .filter { $0.offset % 2 == 1 }.map { String($0.element) })
        }
        let message: Comment = "copy Serve.configSchema into ConfigFuzzer.daemonSchema"
        #expect(quoted(section[..<flags.lowerBound]) == ConfigFuzzer.daemonSchema.options, message)
        #expect(quoted(section[flags.upperBound...]) == ConfigFuzzer.daemonSchema.flags, message)
    }

    @Test func theSchemaTakesTheExampleSettingsAndTheSeed() throws {
        let example = Self.fuzzDirectory.deletingLastPathComponent().appendingPathComponent("systemd/example.conf")
        let parsed = try ConfigFile(bytes: Array(try Data(contentsOf: example)), schema: ConfigFuzzer.daemonSchema)
        #expect(parsed.entries.map(\.key).contains("listen"))
        let seed = try ConfigFile(bytes: Array(ConfigFuzzer.settingsFile.utf8), schema: ConfigFuzzer.daemonSchema)
        #expect(Set(seed.entries.map(\.key)) == ConfigFuzzer.daemonSchema.options.union(ConfigFuzzer.daemonSchema.flags)
            .subtracting(["insecure-plaintext"]))
    }
}

/// One checked-in input: fuzz/<kind>/<target>/<name>.
struct FuzzInputFile: Sendable, CustomTestStringConvertible {
    let kind: String
    let target: FuzzTarget
    let name: String

    var path: String { "\(kind)/\(target.rawValue)/\(name)" }
    var testDescription: String { path }

    func bytes() throws -> [UInt8] {
        Array(try Data(contentsOf: CorpusTests.fuzzDirectory.appendingPathComponent(path)))
    }
}
