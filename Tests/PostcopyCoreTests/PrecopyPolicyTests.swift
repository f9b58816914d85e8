import PostcopyCore
import Testing

@Suite struct PrecopyPolicyTests {
    @Test func defaults() {
        let policy = PrecopyPolicy()
        #expect(policy.maxRounds == 5)
        #expect(policy.maxDurationNanos == 120_000_000_000)
        #expect(policy.switchoverPages == 256)
    }

    @Test func theRoundLimitCountsRoundsDone() {
        let policy = PrecopyPolicy(maxRounds: 3, maxDurationNanos: 10_000_000_000, switchoverPages: 0)
        #expect(policy.limitReached(roundsDone: 0, elapsedNanos: 0) == nil)
        #expect(policy.limitReached(roundsDone: 2, elapsedNanos: 0) == nil)
        #expect(policy.limitReached(roundsDone: 3, elapsedNanos: 0) == .roundLimit)
        #expect(policy.limitReached(roundsDone: 4, elapsedNanos: 0) == .roundLimit)
    }

    @Test func oneRoundAtMostStopsAfterTheFirstPass() {
        let policy = PrecopyPolicy(maxRounds: 1)
        #expect(policy.limitReached(roundsDone: 0, elapsedNanos: 0) == nil)
        #expect(policy.limitReached(roundsDone: 1, elapsedNanos: 0) == .roundLimit)
    }

    @Test func theTimeLimitIsReachedAtExactlyTheDuration() {
        let policy = PrecopyPolicy(maxRounds: 100, maxDurationNanos: 10_000_000_000, switchoverPages: 0)
        #expect(policy.limitReached(roundsDone: 1, elapsedNanos: 9_999_999_999) == nil)
        #expect(policy.limitReached(roundsDone: 1, elapsedNanos: 10_000_000_000) == .timeLimit)
        #expect(policy.limitReached(roundsDone: 1, elapsedNanos: UInt64.max) == .timeLimit)
    }

    @Test func whenBothLimitsAreReachedTheRoundLimitIsReported() {
        let policy = PrecopyPolicy(maxRounds: 2, maxDurationNanos: 1_000)
        #expect(policy.limitReached(roundsDone: 2, elapsedNanos: 5_000) == .roundLimit)
        #expect(policy.limitReached(roundsDone: 1, elapsedNanos: 5_000) == .timeLimit)
    }

    @Test func convergedIncludesTheThreshold() {
        let policy = PrecopyPolicy(switchoverPages: 256)
        #expect(policy.converged(dirtyPages: 0))
        #expect(policy.converged(dirtyPages: 255))
        #expect(policy.converged(dirtyPages: 256))
        #expect(!policy.converged(dirtyPages: 257))
        #expect(!policy.converged(dirtyPages: UInt64.max))

        let strict = PrecopyPolicy(switchoverPages: 0)
        #expect(strict.converged(dirtyPages: 0))
        #expect(!strict.converged(dirtyPages: 1))
    }

    @Test func reasonsReadAsSummariesShowThem() {
        #expect(PrecopyPolicy.Reason.converged.rawValue == "converged")
        #expect(PrecopyPolicy.Reason.roundLimit.rawValue == "round limit")
        #expect(PrecopyPolicy.Reason.timeLimit.rawValue == "time limit")
    }
}
