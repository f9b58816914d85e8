import PostcopyCore
import Testing

/// Errors of the shapes the layers above have: a step wrapping a cause, a
/// wrapper with nothing to add, and a leaf that is no `ChainedError`.
private struct Step: ChainedError, CustomStringConvertible {
    let link: String
    let underlying: (any Error)?
    var description: String { underlying.map { "\(link): \($0)" } ?? link }
}

private struct Leaf: Error, CustomStringConvertible {
    let description: String
}

@Suite struct ErrorChainTests {
    fileprivate static let leaf = Leaf(description: "fallocate: ENOSPC (No space left on device)")
    fileprivate static let nested = Step(link: "create guest RAM (1 GiB, memfd)",
                             underlying: Step(link: "reserve the file", underlying: leaf))

    @Test func printsOneLinePerCauseDownToTheLeaf() {
        #expect(ErrorChain(Self.nested).rendered(program: "postcopyd", headline: "cannot start") == """
            postcopyd: cannot start: create guest RAM (1 GiB, memfd)
              caused by: reserve the file
              caused by: fallocate: ENOSPC (No space left on device)

            """)
        #expect(ErrorChain(Self.nested).links == ["create guest RAM (1 GiB, memfd)", "reserve the file",
                                                  "fallocate: ENOSPC (No space left on device)"])
    }

    @Test func keepsEveryErrorTypedWithTheInnermostLast() {
        let chain = ErrorChain(Self.nested)
        #expect(chain.errors.count == 3)
        #expect((chain.root as? Leaf)?.description == Self.leaf.description)
        #expect(chain.errors.first is Step)
    }

    @Test func aWrapperWithNothingToSayShowsOnlyItsCause() {
        let wrapped = Step(link: "", underlying: Self.nested)
        #expect(ErrorChain(wrapped).links == ErrorChain(Self.nested).links)
        #expect(ErrorChain(wrapped).errors.count == 4)
    }

    @Test func aPlainErrorIsOneLineWithoutAHeadline() {
        #expect(ErrorChain(Self.leaf).rendered(program: "postcopyctl")
            == "postcopyctl: fallocate: ENOSPC (No space left on device)\n")
        #expect(ErrorChain(Step(link: "no instance is running", underlying: nil)).rendered(program: "postcopyctl")
            == "postcopyctl: no instance is running\n")
    }

    @Test func theOneLineFormReadsLikeTheNestedDescriptions() {
        #expect(ErrorChain(Self.nested).description == Self.nested.description)
    }

    /// An `ExplainedError` reads as its reason on one line, and in a chain
    /// as its own words above its cause's.
    @Test func anExplainedErrorKeepsItsCauseBesideItsReason() {
        struct Lost: ExplainedError {
            let explanation: Explanation
            init(_ explanation: Explanation) { self.explanation = explanation }
        }
        let plain = Lost("postcopyd closed the connection")
        #expect(plain.description == "postcopyd closed the connection" && plain.underlying == nil)
        #expect(ErrorChain(plain).links == ["postcopyd closed the connection"])

        let context = Lost("no answer", cause: Self.leaf)
        #expect(context.reason == "no answer: fallocate: ENOSPC (No space left on device)")
        #expect(ErrorChain(context).links == ["no answer", "fallocate: ENOSPC (No space left on device)"])
        #expect(ErrorChain(context).root is Leaf)

        let bare = Lost(cause: Self.leaf)
        #expect(bare.reason == Self.leaf.description && bare.link.isEmpty)
        #expect(ErrorChain(bare).links == ["fallocate: ENOSPC (No space left on device)"])

        // The cause mid-sentence in the reason; left out of the link.
        let words = Lost(cause: Self.nested) { last in "gave up (3 attempts\(last.map { "; last: \($0)" } ?? "")), paused" }
        #expect(words.reason == "gave up (3 attempts; last: \(Self.nested)), paused")
        #expect(ErrorChain(words).rendered(program: "postcopy-push") == """
            postcopy-push: gave up (3 attempts), paused
              caused by: create guest RAM (1 GiB, memfd)
              caused by: reserve the file
              caused by: fallocate: ENOSPC (No space left on device)

            """)
    }

    @Test func aChainThatLoopsStops() {
        final class Loop: ChainedError, @unchecked Sendable {
            var next: Loop?
            var link: String { "again" }
            var underlying: (any Error)? { next }
        }
        let loop = Loop()
        loop.next = loop
        let chain = ErrorChain(loop)
        #expect(chain.errors.count == 32)
        loop.next = nil
    }
}
