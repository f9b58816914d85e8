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

    /// A reason that tells its cause mid-sentence reads as it always has;
    /// its chain gives the cause a line of its own.
    @Test func aCauseMidSentenceLeavesTheLinkWhole() {
        let error = MigrationError(.internalFailure, cause: SystemCallError("read userfaultfd events", Errno(EBADF))) {
            "the fault loop stopped\($0.map { ": \($0)" } ?? ""); no guest fault is served any more"
        }
        #expect(error.reason == "the fault loop stopped: read userfaultfd events: EBADF (Bad file descriptor); no guest fault is served any more")
        #expect(ErrorChain(error).errno == Errno(EBADF))
        #expect(ErrorChain(error).rendered(program: "postcopyd", headline: "migration failed") == """
            postcopyd: migration failed: the fault loop stopped; no guest fault is served any more
              caused by: read userfaultfd events: EBADF (Bad file descriptor)

            """)
    }

    /// A failed CONTINUE keeps its errno below the page it was for.
    @Test func anInstallErrorKeepsItsSystemCallError() {
        let failed = InstallError.system(PageIndex(7), SystemCallError("UFFDIO_CONTINUE", Errno(ENOMEM)))
        let error = MigrationError(.internalFailure, "resolve fault on \(PageIndex(7))", cause: failed)
        #expect(error.reason == "resolve fault on \(PageIndex(7)): install \(PageIndex(7)): UFFDIO_CONTINUE: ENOMEM (Cannot allocate memory)")
        #expect(ErrorChain(error).links == ["resolve fault on \(PageIndex(7))", "install \(PageIndex(7))",
                                            "UFFDIO_CONTINUE: ENOMEM (Cannot allocate memory)"])
        #expect(ErrorChain(error).errno == Errno(ENOMEM))
        #expect(ErrorChain(InstallError.hole(PageIndex(7))).links == ["\(InstallError.hole(PageIndex(7)))"])
    }

    @Test func aReasonWithoutACauseIsOneLink() {
        let error = MigrationError(.peerLost, "no agent connection")
        #expect(error.cause == nil)
        #expect(ErrorChain(error).rendered(program: "postcopy-push", headline: "migration failed")
            == "postcopy-push: migration failed: no agent connection\n")
    }
}
