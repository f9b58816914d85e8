extension DestinationSession {
    /// Where the session is, each case carrying what means something in it
    /// and nowhere else; the public properties below read it.
    enum State: Sendable {
        /// The connections that said HELLO so far (never all: then precopy).
        case handshake(connected: Set<AgentStream>)
        /// Each bulk stream's rounds.
        case precopy(PrecopyRounds)
        /// The dirty bitmap, from the first DIRTY_BITMAP frame to SWITCHOVER.
        case switchingOver(BitmapAssembler)
        /// From SWITCHOVER on, while postcopy serves the guest's faults: the
        /// phase is `paused` while the agent's connections are lost, else
        /// `handover` while the hand-over is pending, else `postcopy`. One
        /// case for the three, so that what postcopy has learnt goes through
        /// a pause and a rejoin as it is, and a hand-over is pending exactly
        /// in the phases that say so.
        case postcopy(Postcopy, Connections)
        /// Every page in place, the source's digest known, the guest running
        /// here; `handedOver`: the guest started after a hand-over.
        case complete(imageDigest: ImageDigest, handedOver: Bool)
        /// DISCARD while the hand-over was pending: this copy must never
        /// run. What postcopy had learnt stays known.
        case discarded(imageDigest: ImageDigest?, pagesInPlace: Bool)
    }
}

extension DestinationSession.State {
    /// Whether SWITCHOVER asked for a hand-over to start the guest, and
    /// whether HANDED_OVER has come.
    enum HandOver: Sendable {
        /// The guest may run here from switchover on.
        case notAsked
        /// The source may still resume (DISCARD).
        case pending
        case handedOver
    }

    /// What postcopy learns on its way to completion, in any order.
    struct Postcopy: Sendable {
        var handOver: HandOver
        /// Every page is in place (`pagesComplete()` was called).
        var pagesInPlace = false
        /// The source's image digest, once IMAGE_DIGEST brought it; it never
        /// changes after.
        var imageDigest: ImageDigest?

        /// Everything completion needs is here.
        var completes: Bool { pagesInPlace && imageDigest != nil && handOver != .pending }
    }

    /// The agent's connections during postcopy.
    enum Connections: Sendable {
        case connected
        /// Lost at `since` (the caller's monotonic clock, as passed in);
        /// `rejoined`: the connections whose resuming HELLO came since.
        case paused(since: UInt64, rejoined: Set<AgentStream>)
    }
}

extension DestinationSession {
    public var phase: Phase {
        switch state {
        case .handshake: .handshake
        case .precopy: .precopy
        case .switchingOver: .switchingOver
        case let .postcopy(postcopy, .connected): postcopy.handOver == .pending ? .handover : .postcopy
        case .postcopy(_, .paused): .paused
        case .complete: .complete
        case .discarded: .discarded
        }
    }

    /// When the current pause began (the caller's monotonic clock, as
    /// passed in); nil while not paused. The daemon fails a pause that
    /// outlasts its reconnect timeout.
    public var pausedSince: UInt64? {
        guard case let .postcopy(_, .paused(since, _)) = state else { return nil }
        return since
    }

    /// Paused, and the agent is rejoining: one of its connections is back
    /// (QEMU's postcopy-recover).
    public var rejoining: Bool {
        guard case let .postcopy(_, .paused(_, rejoined)) = state else { return false }
        return !rejoined.isEmpty
    }

    /// The source's image digest, once IMAGE_DIGEST brought it; it never
    /// changes after.
    public var imageDigest: ImageDigest? {
        switch state {
        case let .postcopy(postcopy, _): postcopy.imageDigest
        case let .complete(digest, _): digest
        case let .discarded(digest, _): digest
        case .handshake, .precopy, .switchingOver: nil
        }
    }

    /// Every page is in place (`pagesComplete()` was called).
    public var pagesInPlace: Bool {
        switch state {
        case let .postcopy(postcopy, _): postcopy.pagesInPlace
        case .complete: true
        case let .discarded(_, pagesInPlace): pagesInPlace
        case .handshake, .precopy, .switchingOver: false
        }
    }

    /// SWITCHOVER said a hand-over starts the guest.
    public var switchoverHadHandOver: Bool {
        switch state {
        case let .postcopy(postcopy, _): postcopy.handOver != .notAsked
        case let .complete(_, handedOver): handedOver
        // Only a pending hand-over is discarded.
        case .discarded: true
        case .handshake, .precopy, .switchingOver: false
        }
    }

    /// SWITCHOVER said a hand-over starts the guest, and HANDED_OVER has not
    /// come yet: the source may still resume.
    public var handOverPending: Bool {
        guard case let .postcopy(postcopy, _) = state else { return false }
        return postcopy.handOver == .pending
    }

    /// Whether the guest may run on the destination: switchover is done and
    /// no hand-over is pending (or the migration was discarded: never).
    public var pointOfNoReturnPassed: Bool {
        switch state {
        case let .postcopy(postcopy, _): postcopy.handOver != .pending
        case .complete: true
        case .handshake, .precopy, .switchingOver, .discarded: false
        }
    }
}
