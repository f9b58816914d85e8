import Glibc
import PostcopyCore
import PostcopyMigration
import PostcopyOS
import Testing

/// A migration's error keeps what caused it, typed, while its reason (the
/// text of ERROR frames, the journal's REASON and the summaries) reads as
/// it always has.
@Suite struct MigrationErrorTests {
    static let lost = StreamError.sendFailed(peer: "127.0.0.1:7070", SystemCallError("send", Errno(ECONNRESET)))

    @Test func aWrappedCauseStaysTypedDownToTheErrno() {
        let error = MigrationError(.peerLost, "the agent's bulk connection", cause: Self.lost)
        #expect(error.reason == "the agent's bulk connection: send to 127.0.0.1:7070: send: ECONNRESET (Connection reset by peer)")
        #expect(error.description == error.reason)
        #expect(error.cause is StreamError)
        #expect(ErrorChain(error).errno == Errno(ECONNRESET))
        #expect(ErrorChain(error).rendered(program: "postcopyd", headline: "migration failed") == """
            postcopyd: migration failed: the agent's bulk connection
              caused by: send to 127.0.0.1:7070
              caused by: send: ECONNRESET (Connection reset by peer)

            """)
    }

    @Test func aCauseWithNothingAddedKeepsItsOwnText() {
        let error = MigrationError(.internalFailure, cause: Self.lost)
        #expect(error.reason == "\(Self.lost)")
        #expect(ErrorChain(error).links == ErrorChain(Self.lost).links)
    }

    @Test func aReasonWithoutACauseIsOneLink() {
        let error = MigrationError(.peerLost, "no agent connection")
        #expect(error.cause == nil)
        #expect(ErrorChain(error).rendered(program: "postcopy-push", headline: "migration failed")
            == "postcopy-push: migration failed: no agent connection\n")
    }
}
