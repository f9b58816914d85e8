import Glibc
import PostcopyCore
import PostcopyHarness
import PostcopyMigration
import PostcopyOS
import Synchronization
import Testing

/// Precopy on the source VMM's uffd-wp write log, against a guest that
/// never stops writing until it is paused, with every scan checked against
/// a hash of every page (`--verify-dirty-log`); and the fallback to hashing
/// whenever the log cannot be had, with the reason.
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct DirtyLogMigrationTests {
    /// Four threads writing random pages at full speed (a word in each, or
    /// the whole page to zeros now and then) until `stop`; the pause hook
    /// stops them and waits, as SIGSTOP would.
    final class Writers: Sendable {
        private final class Shared: Sendable {
            let stop = Atomic<Bool>(false)
            let writes = Atomic<UInt64>(0)
        }

        private let shared = Shared()
        private let threads: [OSThread]

        init(_ source: SourceFile, count: Int = 4) throws {
            let shared = self.shared
            threads = try (0..<count).map { index in
                try OSThread.start(name: "test-writer\(index)") {
                    var generator = SplitMix64(seed: UInt64(index) &+ 99)
                    var done: UInt64 = 0
                    while !shared.stop.load(ordering: .relaxed) {
                        let page = generator.next() % source.pageCount
                        if page % 97 == 0 {
                            source.zero(page)
                        } else {
                            let word = source.base + Int(page * 4096) + Int(generator.next() % 512) * 8
                            word.storeBytes(of: generator.next(), as: UInt64.self)
                        }
                        done += 1
                    }
                    shared.writes.add(done, ordering: .relaxed)
                }
            }
        }

        var writes: UInt64 { shared.writes.load(ordering: .relaxed) }

        func pause() {
            shared.stop.store(true, ordering: .relaxed)
            threads.forEach { $0.join() }
        }
    }

    static func migrateUnderWriters(_ source: SourceFile, memory: MemoryKind) throws {
        var migration = Migration(memory: memory)
        migration.rounds = 5
        migration.guestThreads = 2
        let writers = try Writers(source)
        defer { writers.pause() }
        let outcome = try migration.run(source, pause: { writers.pause() })
        #expect(outcome.agent.dirtyLog == "uffd-wp", "fell back: \(outcome.agent.dirtyLogFallback ?? "")")
        #expect(outcome.agent.missedByDirtyLog == 0)
        #expect(outcome.agent.rounds.count == 5)
        #expect(outcome.agent.rounds.dropFirst().allSatisfy { ($0.pagesWritten ?? 0) > 0 })
        #expect(writers.writes > 0)
        #expect(outcome.identical, "destination RAM differs from the source")
        #expect(outcome.guest.verified, "guest digest \(outcome.guest.actualDigest) vs \(outcome.guest.expectedDigest)")
        #expect(outcome.daemon.imageDigest == outcome.agent.imageDigest)
        MigrationTests.expectNoPageTwice(outcome)
    }

    @Test func shmemSourceUnderFourWriters() throws {
        try Self.migrateUnderWriters(SourceFile(size: 64 << 20, seed: 3) { $0 % 8 == 1 }, memory: .shmem)
    }

    @Test(.enabled(if: Host.hasHugepages(64) && Host.hugetlbfsMount != nil, Comment(rawValue: Host.needsHugepages(64))))
    func hugetlbfsSourceUnderFourWriters() throws {
        let source = try SourceFile(size: 64 << 20, seed: 4, in: Host.hugetlbfsMount!) { $0 % 8 == 1 }
        try Self.migrateUnderWriters(source, memory: .hugetlbfs)
    }

    /// Each way of not having the log ends in hashing, with its reason in
    /// the summary; the migration is as good as ever.
    @Test(arguments: [Fallback.noSocket, .featureMasked, .notRegistered, .wrongRange])
    func withoutTheLogTheAgentHashes(_ fallback: Fallback) throws {
        let source = try SourceFile(size: 16 << 20, seed: 6) { $0 % 8 == 2 }
        var migration = Migration()
        migration.dirtyLog = .auto
        fallback.apply(to: &migration, source: source)
        let outcome = try migration.run(source, pause: { (0..<64).forEach { source.write($0 * 7, generation: 2) } })
        #expect(outcome.agent.dirtyLog == "hash")
        #expect(outcome.agent.dirtyLogFallback?.contains(fallback.reason) == true,
                "reason: \(outcome.agent.dirtyLogFallback ?? "none")")
        #expect(outcome.agent.missedByDirtyLog == nil)
        #expect(outcome.identical && outcome.guest.verified)
    }

    /// Asked for by name, a log that cannot be had fails the migration
    /// before the agent connects anywhere, saying why.
    @Test func uffdWPByNameFailsWithoutIt() throws {
        let source = try SourceFile(size: 4 << 20, seed: 8) { _ in false }
        let directory = try TemporaryDirectory()
        let (registration, offer) = source.trackWrites(pretendingAbsent: .wpAsync)
        #expect(registration == nil)
        let server = try SourceTrackingServer(path: directory.path + "/dirty-log.sock", offer: offer, logger: testLogger("source"))
        // Nothing listens on port 1: had the agent connected, it would say so instead.
        var config = AgentConfig(ramPath: source.path, daemon: SocketEndpoint(host: "127.0.0.1", port: 1),
                                 transport: .plaintext, migrationID: MigrationID(high: 8, low: 8),
                                 control: SourceControl("test", pause: {}, resume: {}))
        config.dirtyLog = .uffdWP
        config.dirtyLogSocket = directory.path + "/dirty-log.sock"
        let agent = try SourceAgent(config: config, logger: testLogger("agent"), progress: ProgressReporter(enabled: false))
        let failure: String
        do {
            _ = try agent.run()
            failure = "none"
        } catch {
            failure = "\(error)"
        }
        withExtendedLifetime(server) {}
        #expect(failure.contains("--dirty-log uffd-wp: the source VMM (pid \(getpid())) did not register its RAM"), "\(failure)")
        #expect(failure.contains("lacks WP_ASYNC"), "\(failure)")
    }

    enum Fallback: String, CustomStringConvertible, CaseIterable {
        case noSocket, featureMasked, notRegistered, wrongRange

        var description: String { rawValue }

        var reason: String {
            switch self {
            case .noSocket: "no --dirty-log-socket"
            case .featureMasked: "lacks WP_ASYNC"
            case .notRegistered: "the mapping is not registered for asynchronous write-protect"
            case .wrongRange: "has no shared mapping of"
            }
        }

        func apply(to migration: inout Migration, source: SourceFile) {
            switch self {
            case .noSocket: migration.dirtyLog = .auto; migration.offer = nil; migration.skipDirtyLogSocket = true
            case .featureMasked: migration.pretendAbsent = .wpAsync
            case .notRegistered:
                // A VMM that claims a registration it does not have: the
                // kernel's check (PM_SCAN_CHECK_WPASYNC) catches it.
                migration.pretendAbsent = .wpAsync
                migration.offer = .armed(address: UInt64(UInt(bitPattern: source.base)), length: source.size)
            case .wrongRange:
                migration.offer = .armed(address: UInt64(UInt(bitPattern: source.base)) + 4096, length: source.size)
            }
        }
    }
}
