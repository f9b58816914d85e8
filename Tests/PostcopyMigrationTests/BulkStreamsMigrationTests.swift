import Glibc
import PostcopyCore
import PostcopyMigration
import PostcopyOS
import Testing

/// Whole migrations over several bulk streams (`postcopy-push --streams`):
/// precopy and the back-fill spread over them, the image byte for byte.
/// (MigrationTests.guestRunningDuringPrecopyAndGuestWritesSurvive runs a
/// source written to through precopy over 1, 2 and 4 streams; the
/// resilience and takeover tests run with 2 or 3.)
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct BulkStreamsMigrationTests {
    static let size = MigrationTests.size

    /// The summaries say how many streams carried the migration, and each
    /// round ended on every one of them.
    static func checkStreams(_ outcome: Migration.Outcome, _ streams: Int) {
        #expect(outcome.agent.streams == streams)
        #expect(outcome.daemon.streams == streams)
        #expect(outcome.daemon.precopyRounds == UInt32(outcome.agent.rounds.count))
        #expect(outcome.agent.rounds.allSatisfy { $0.mibPerSecond > 0 || $0.bytesSent == 0 })
    }

    /// With 2 and 4 bulk streams, over TLS and in plaintext: the image
    /// byte for byte, and every figure of an ordinary migration, exactly.
    @Test(arguments: [2, 4], Migration.Transport.allCases)
    func shmem(streams: Int, transport: Migration.Transport) throws {
        let (source, dirty) = try MigrationTests.source(dirty: 0.1, seed: 60 + UInt64(streams))
        var migration = Migration(rounds: 2)
        migration.streams = streams
        migration.transport = transport
        let outcome = try migration.run(source, pause: MigrationTests.dirtying(source, dirty))
        MigrationTests.check(outcome, stale: MigrationTests.stale(dirty))
        Self.checkStreams(outcome, streams)
    }

    /// On hugetlbfs, with 2 and 4 bulk streams: a 2 MiB page's pieces all
    /// travel one stream; only the stale pieces of a huge page are fetched.
    @Test(.enabled(if: Host.hasHugepages(128), Comment(rawValue: Host.needsHugepages(128))),
          arguments: [2, 4])
    func hugetlbfs(streams: Int) throws {
        let (source, dirty) = try MigrationTests.source(dirty: 0.1, seed: 70 + UInt64(streams))
        var migration = Migration(memory: .hugetlbfs, rounds: 2)
        migration.streams = streams
        let outcome = try migration.run(source, pause: MigrationTests.dirtying(source, dirty))
        MigrationTests.check(outcome, stale: MigrationTests.stale(dirty))
        Self.checkStreams(outcome, streams)
        #expect(outcome.daemon.pagesRequested <= MigrationTests.stale(dirty))
    }
}
