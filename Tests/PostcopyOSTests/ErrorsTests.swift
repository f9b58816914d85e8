import Glibc
import PostcopyCore
import PostcopyOS
import Testing

/// The OS layer's errors keep their causes: a chain reaches the errno.
@Suite struct ErrorsTests {
    @Test func aStepKeepsTheSystemCallErrorBelowIt() throws {
        let thrown = #expect(throws: ContextError.self) {
            try inStep("create guest RAM (1 GiB, memfd)") {
                try inStep("reserve it") { throw SystemCallError("fallocate", Errno(ENOSPC)) }
            }
        }
        let error = try #require(thrown)
        let chain = ErrorChain(error)
        #expect(chain.errno == Errno(ENOSPC))
        #expect(chain.rendered(program: "postcopyd", headline: "cannot start") == """
            postcopyd: cannot start: create guest RAM (1 GiB, memfd)
              caused by: reserve it
              caused by: fallocate: ENOSPC (No space left on device)

            """)
        // The one-line form, which logs and ERROR frames carry, is unchanged.
        #expect("\(error)" == "create guest RAM (1 GiB, memfd): reserve it: fallocate: ENOSPC (No space left on device)")
    }

    @Test func aStreamThatFailedToSendKeepsItsCause() {
        let error = StreamError.sendFailed(peer: "127.0.0.1:7070", SystemCallError("send", Errno(EPIPE)))
        #expect(ErrorChain(error).links == ["send to 127.0.0.1:7070", "send: EPIPE (Broken pipe)"])
        #expect(ErrorChain(error).errno == Errno(EPIPE))
        #expect("\(error)" == "send to 127.0.0.1:7070: send: EPIPE (Broken pipe)")
        #expect(ErrorChain(StreamError.truncated(peer: "agent", bytes: 3)).errno == nil)
    }
}
