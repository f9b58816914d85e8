import PostcopyCore
import Testing

/// The VMM socket's conversation: what each end may say, and when.
@Suite struct VMMHandshakeTests {
    static let digest = ImageDigest(bytes: (0..<32).map { UInt8($0) })!
    static let attach = VMMMessage.attach(guestBase: 0x7F00_0000_0000, features: [.minorShmem, .missingShmem],
                                          registerMode: 0b101)
    static let reattach = VMMMessage.reattach(guestBase: 0x7F00_0000_0000, features: [.minorShmem, .missingShmem],
                                              registerMode: 0b101)
    static let offer = VMMMessage.offer(regionSize: 1 << 30, pageSize: .small, fileOffset: 0)

    /// Plays `script` into a conversation that opens as `opening`.
    static func play(_ opening: VMMHandshake.Opening, _ script: [(VMMPeer, VMMMessage)]) throws -> VMMHandshake {
        var handshake = VMMHandshake(opening: opening)
        for (sender, message) in script { try handshake.record(message, from: sender) }
        return handshake
    }

    static let attachScript: [(VMMPeer, VMMMessage)] = [
        (.daemon, offer), (.vmm, attach), (.daemon, .resume), (.vmm, .resumed),
        (.daemon, .complete(imageDigest: digest)), (.vmm, .complete(imageDigest: nil)),
    ]

    @Test func aNewMigrationFromOfferToComplete() throws {
        var handshake = VMMHandshake(opening: .attach)
        let phases: [VMMHandshake.Phase] = [.offered, .attached(reattached: false), .resuming, .running,
                                            .completing(resumed: true), .completed]
        for ((sender, message), phase) in zip(Self.attachScript, phases) {
            try handshake.record(message, from: sender)
            #expect(handshake.phase == phase, "after \(message)")
            // HEARTBEAT, either way, changes nothing until the end.
            if phase != .completed {
                try handshake.record(.heartbeat, from: .vmm)
                try handshake.record(.heartbeat, from: .daemon)
                #expect(handshake.phase == phase)
            }
        }
        #expect(handshake.isAttached)
    }

    @Test(arguments: [[HandbackKind.ram, .pageState], [.pageState, .ram], [.ram, .ram, .pageState]])
    func aReattachmentHandsBackBothFilesInAnyOrder(_ kinds: [HandbackKind]) throws {
        let handshake = try Self.play(.reattach, kinds.map { (.vmm, .handback($0)) } + [
            (.vmm, Self.reattach), (.daemon, .resume), (.vmm, .resumed),
        ])
        #expect(handshake.phase == .running)
    }

    @Test func vmmReattachBeforeBothHandbacksNamesWhatIsMissing() throws {
        var handshake = try Self.play(.reattach, [(.vmm, .handback(.ram))])
        #expect(throws: VMMHandshakeError.reattachBeforeHandback(missing: [.pageState])) {
            try handshake.record(Self.reattach, from: .vmm)
        }
        #expect(handshake.phase == .handingBack([.ram]), "a refused message changed the phase")
        #expect(VMMHandshakeError.reattachBeforeHandback(missing: [.pageState]).description
            == "VMM_REATTACH before VMM_HANDBACK of the page-state file")
        var empty = VMMHandshake(opening: .reattach)
        #expect(throws: VMMHandshakeError.self) { try empty.record(Self.reattach, from: .vmm) }
    }

    /// A VMM reattaching meets a daemon serving a new migration: each end
    /// says so, the daemon on VMM_HANDBACK after its VMM_OFFER, the VMM on
    /// the VMM_OFFER after its VMM_HANDBACKs.
    @Test func aReattachingVMMAndANewMigrationTellEachOtherApart() throws {
        var daemon = try Self.play(.attach, [(.daemon, Self.offer)])
        #expect(throws: VMMHandshakeError.reattachToNewMigration) { try daemon.record(.handback(.ram), from: .vmm) }
        #expect(throws: VMMHandshakeError.reattachToNewMigration) { try daemon.record(Self.reattach, from: .vmm) }
        var vmm = try Self.play(.reattach, [(.vmm, .handback(.ram)), (.vmm, .handback(.pageState)), (.vmm, Self.reattach)])
        #expect(throws: VMMHandshakeError.reattachToNewMigration) { try vmm.record(Self.offer, from: .daemon) }
        #expect(VMMHandshakeError.reattachToNewMigration.code == .unexpectedMessage)
    }

    /// Each end records its own order: postcopyd may send VMM_COMPLETE
    /// before the VMM_RESUMED the VMM sent first has arrived.
    @Test func theDaemonMayCompleteBeforeVMMResumedArrives() throws {
        var daemon = try Self.play(.reattach, [(.vmm, .handback(.ram)), (.vmm, .handback(.pageState)),
                                               (.vmm, Self.reattach), (.daemon, .resume),
                                               (.daemon, .complete(imageDigest: Self.digest))])
        #expect(daemon.phase == .completing(resumed: false))
        // The VMM's order holds: its answer to VMM_COMPLETE follows its VMM_RESUMED.
        #expect(throws: VMMHandshakeError.self) { try daemon.record(.complete(imageDigest: nil), from: .vmm) }
        try daemon.record(.resumed, from: .vmm)
        try daemon.record(.complete(imageDigest: nil), from: .vmm)
        #expect(daemon.phase == .completed)
    }

    @Test func outOfTurnMessagesSayWhatWasExpected() throws {
        var handshake = VMMHandshake(opening: .attach)
        #expect(throws: VMMHandshakeError.outOfTurn(.vmmAttach, from: .vmm, phase: .opening(.attach))) {
            try handshake.record(Self.attach, from: .vmm)
        }
        #expect(VMMHandshakeError.outOfTurn(.vmmAttach, from: .vmm, phase: .opening(.attach)).description
            == "expected VMM_OFFER from postcopyd, got VMM_ATTACH from the VMM")
        // The right type from the wrong end.
        #expect(throws: VMMHandshakeError.self) { try handshake.record(Self.offer, from: .vmm) }
        try handshake.record(Self.offer, from: .daemon)
        #expect(throws: VMMHandshakeError.self) { try handshake.record(.resume, from: .daemon) }
        try handshake.record(Self.attach, from: .vmm)
        // Which VMM_COMPLETE is which: the daemon's carries the digest, the VMM's does not.
        var running = try Self.play(.attach, Array(Self.attachScript.prefix(4)))
        #expect(throws: VMMHandshakeError.self) { try running.record(.complete(imageDigest: nil), from: .daemon) }
        #expect(throws: VMMHandshakeError.self) { try running.record(.complete(imageDigest: Self.digest), from: .vmm) }
        #expect(VMMHandshakeError.outOfTurn(.vmmResumed, from: .vmm, phase: .running).description
            == "expected VMM_COMPLETE from postcopyd, got VMM_RESUMED from the VMM")
    }

    @Test func anErrorEndsTheConversation() throws {
        var handshake = try Self.play(.attach, [(.daemon, Self.offer), (.vmm, Self.attach)])
        try handshake.record(.error(code: .cancelled, message: "stopped"), from: .daemon)
        #expect(handshake.phase == .ended(by: .daemon, code: .cancelled, message: "stopped"))
        #expect(throws: VMMHandshakeError.self) { try handshake.record(.heartbeat, from: .vmm) }
        #expect(VMMHandshakeError.afterEnd(.heartbeat, from: .vmm, phase: handshake.phase).description
            == "HEARTBEAT from the VMM after postcopyd ended the VMM socket's conversation with ERROR cancelled")
        var completed = try Self.play(.attach, Self.attachScript)
        #expect(throws: VMMHandshakeError.self) { try completed.record(.resumed, from: .vmm) }
    }

    /// Over every phase either opening reaches and every message from
    /// either end: a refused message leaves the phase as it was, and one
    /// taken moves it only where the expectations said.
    @Test func aRefusedMessageNeverChangesThePhase() throws {
        let messages: [VMMMessage] = [Self.offer, Self.attach, Self.reattach, .resume, .resumed,
                                      .complete(imageDigest: Self.digest), .complete(imageDigest: nil),
                                      .handback(.ram), .handback(.pageState), .heartbeat]
        let reattachScript: [(VMMPeer, VMMMessage)] = [(.vmm, .handback(.pageState)), (.vmm, .handback(.ram)),
                                                       (.vmm, Self.reattach), (.daemon, .resume), (.vmm, .resumed),
                                                       (.daemon, .complete(imageDigest: Self.digest)),
                                                       (.vmm, .complete(imageDigest: nil))]
        var checked = 0
        for (opening, script) in [(VMMHandshake.Opening.attach, Self.attachScript), (.reattach, reattachScript)] {
            for length in 0...script.count {
                let reached = try Self.play(opening, Array(script.prefix(length)))
                for message in messages {
                    for sender in [VMMPeer.daemon, .vmm] {
                        var handshake = reached
                        do {
                            try handshake.record(message, from: sender)
                            let expected = VMMHandshake.expected(in: reached.phase)
                            #expect(message == .heartbeat
                                || expected.contains { $0.sender == sender && $0.type == message.type },
                                    "\(message) from \(sender) taken in \(reached.phase)")
                        } catch {
                            #expect(handshake == reached, "\(message) from \(sender) refused but changed \(reached.phase)")
                        }
                        checked += 1
                    }
                }
            }
        }
        #expect(checked == 2 * 10 * (7 + 8))
    }
}
