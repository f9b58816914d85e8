import Logging
import PostcopyCore
import PostcopyOS
import Synchronization

// Where postcopy starts: at switchover, or in a daemon that takes over a
// migration whose daemon died; and how a hand-over that does not happen
// ends it.
extension DestinationDaemon {
    // MARK: switchover

    /// SWITCHOVER with the `stale` pages: once the VMM has attached, writes
    /// the page-state record and starts postcopy, has the VMM resume the
    /// guest (VMM_RESUME, then its VMM_RESUMED), and tells the agent
    /// (RESUMED, on bulk stream 0, `control`). The guest's downtime ends here.
    func switchover(stale: PageBitmap, sourcePausedAt pausedAt: UInt64, handOver: Bool,
                    control bulk: MessageStream) throws {
        guard let urgent = agent.withLock({ $0.streams[.urgent] }) else {
            throw MigrationError(.internalFailure, "switchover without the agent's urgent connection")
        }
        summary.withLock { $0.stalePagesAtSwitchover = stale.popCount }
        logger.info("switchover: \(stale.popCount) stale pages")
        guard vmm.attached.wait(timeoutNanos: config.vmmAttachTimeoutNanos), let attachment = vmm.current else {
            try failures.check()
            let refused = vmm.lastRefusal.map { " (last VMM connection refused: \($0))" } ?? ""
            throw MigrationError(.peerLost, "no VMM attached to \(config.vmmSocketPath) within \(config.vmmAttachTimeoutNanos / 1_000_000_000) s of switchover\(refused)")
        }
        // The record a restarted daemon would take over from: written whole
        // before the guest runs, kept by the VMM (VMM_RESUME passes it) and
        // by systemd's fd store.
        let (id, secretDigest) = try session.withLock { session in
            guard let id = session.migrationID, let secretDigest = session.secretDigest else {
                throw MigrationError(.internalFailure, "switchover before HELLO")
            }
            return (id, secretDigest)
        }
        let recordedAt = realtimeNanoseconds()
        let downtimeSoFar = recordedAt >= pausedAt ? (recordedAt - pausedAt) / 1000 : 0
        let record = prepared.withLock { prepared in
            defer { prepared.record = nil }
            return prepared.record
        }
        let pageState = try inStep("write the page-state record") {
            try PageStateFile(prepared: record, header: PageStateHeader(
                migrationID: id, geometry: memory.geometry, guestBase: attachment.guestBase,
                features: attachment.uffd.features, registerMode: attachment.registerMode,
                stalePagesAtSwitchover: stale.popCount, sourcePausedAtNanos: pausedAt, downtimeMicros: downtimeSoFar,
                secretDigest: secretDigest),
                stale: stale)
        }
        if handOver { pageState.record(.handOverPending) }
        storeDescriptors(pageState: pageState, uffd: attachment.uffd)
        let postcopy = try startPostcopy(uffd: attachment.uffd, guestBase: attachment.guestBase, stale: stale,
                                         urgent: urgent, pageState: pageState)
        // From the moment VMM_RESUME may reach the VMM, the guest depends on
        // this daemon: a failure no longer releases it.
        guestDepends.store(true, ordering: .sequentiallyConsistent)
        try vmm.resume(pageState: pageState)
        try awaitResumeAcknowledged()
        let resumedAt = realtimeNanoseconds()
        markResumed(postcopy, at: monotonicNanoseconds())
        let downtimeMs = resumedAt >= pausedAt ? Double(resumedAt - pausedAt) / 1e6 : 0
        summary.withLock { $0.downtimeMs = downtimeMs }
        // The guest runs here now, or will once the hand-over is done. An
        // agent that misses RESUMED (its connection lost) finds the
        // migration in postcopy (or hand-over) when it rejoins.
        do {
            try bulk.send(.resumed(destinationResumedAtNanos: resumedAt))
        } catch {
            bulk.shutdown()
        }
        let phase = session.withLock { $0.phase }
        if phase == .postcopy || phase == .handover { entered(phase) }
        let starts = handOver ? "guest memory resumed here; the guest starts once the source's hand-over is done (the source may still resume it until then)" : "guest resumed here"
        logger.event(.switchover, .notice, "switchover: \(starts) after \(fixed(downtimeMs, 1)) ms, \(stale.popCount) pages stale", [
            "pages_stale": "\(stale.popCount)", "downtime_ms": "\(fixed(downtimeMs, 1))",
            "hand_over": handOver ? "1" : "0",
        ])
        postcopy.signalCompleteIfDone()
    }

    /// Waits for the VMM's VMM_RESUMED, which the record now says too. The
    /// VMM may run the guest from VMM_RESUME on, so this never gives up: a
    /// VMM that goes away fails the migration (which wakes this), one that
    /// stays silent is reported every `vmmHandshakeTimeoutNanos` while the
    /// source stays paused.
    private func awaitResumeAcknowledged() throws {
        var waited: UInt64 = 0
        while !vmm.resumed.wait(timeoutNanos: config.vmmHandshakeTimeoutNanos) {
            try failures.check()
            waited += config.vmmHandshakeTimeoutNanos
            logger.warning("the VMM has not acknowledged VMM_RESUME (VMM_RESUMED) in \(waited / 1_000_000_000) s; still waiting, and the source stays paused")
        }
        try failures.check()
    }

    // MARK: starting postcopy

    /// Starts serving the guest's faults, for both ways postcopy starts (the
    /// switchover, the takeover): the engine, fed `stale` and clearing
    /// `pageState`'s bits, and the fault loop that asks it about each fault
    /// on `uffd`, whose guest RAM starts at `guestBase`.
    ///
    /// With no `urgent` stream (a takeover: the guest has run all along, the
    /// agent is away) postcopy starts paused (the session's pause began when
    /// it was made) and its clock starts now. Otherwise `urgent` is the
    /// urgent connection of generation 0 (no pause can come before
    /// switchover), and the clock starts once the VMM has acknowledged
    /// VMM_RESUME (`markResumed`).
    func startPostcopy(uffd: Userfaultfd, guestBase: UInt64, stale: PageBitmap, urgent: MessageStream?,
                       pageState: PageStateFile) throws -> PostcopyEngine {
        let installer = PageInstaller(uffd: uffd, file: memory.file, guestBase: guestBase)
        let postcopy = try makeEngine(installer: installer, stale: stale, urgent: urgent, pageState: pageState)
        engine.withLock { $0 = postcopy }
        engineReady.open()
        if urgent == nil { markResumed(postcopy, at: monotonicNanoseconds()) }
        let loop = try makeFaultLoop(installer: installer, resolver: postcopy)
        try loop.start()
        faultLoop.withLock { $0 = loop }
        return postcopy
    }

    /// Postcopy's clock starts at `now`, the guest resumed here: the
    /// summary's postcopy time and CPU time count from it.
    private func markResumed(_ postcopy: PostcopyEngine, at now: UInt64) {
        postcopy.postcopyStartedAt.store(now, ordering: .relaxed)
        postcopy.cpuMicrosAtResume.store(UInt64(ProcessUsage.cpuSeconds() * 1e6), ordering: .relaxed)
    }

    /// The engine of postcopy, fed `stale`; with no `urgent` stream it
    /// starts paused.
    private func makeEngine(installer: PageInstaller, stale: PageBitmap, urgent: MessageStream?,
                            pageState: PageStateFile) throws -> PostcopyEngine {
        let (completion, logger, session) = (self.completion, self.logger, self.session)
        let scratch = prepared.withLock { prepared in
            defer { prepared.scratch = nil }
            return prepared.scratch
        }
        return try PostcopyEngine(
            memory: memory, installer: installer, stale: stale, urgent: urgent, pageState: pageState,
            failures: failures, stalls: StallLimiter(thresholdNanos: config.stallWarningNanos),
            tracing: config.tracePath != nil, scratch: scratch,
            onStall: { stall in
                let ms = fixed(Double(stall.stallNanos) / 1e6, 1)
                let more = stall.suppressed > 0 ? " (\(stall.suppressed) more stalls since the last report)" : ""
                logger.event(.faultStalled, .warning, "a guest thread waited \(ms) ms for page \(stall.page)\(more)", [
                    "page": "\(stall.page)", "stall_ms": "\(ms)", "stalls_suppressed": "\(stall.suppressed)",
                ])
            },
            onComplete: {
                // Complete once the source's digest is known too; until
                // IMAGE_DIGEST comes, the daemon waits as it waits for pages.
                if session.withLock({ $0.pagesComplete() }) {
                    completion.open()
                } else {
                    logger.info("every page is in place; waiting for the source's image digest (IMAGE_DIGEST) to complete")
                }
            })
    }

    /// The fault loop, which fails the migration the moment it dies (its
    /// userfaultfd erred or hung up): no fault would be served after that.
    private func makeFaultLoop(installer: PageInstaller, resolver: PostcopyEngine) throws -> FaultLoop {
        let (failures, logger) = (self.failures, self.logger)
        let region = "0x\(String(installer.guestBase, radix: 16))+\(ByteSize.format(memory.geometry.regionSize))"
        let strays = Locked(ReportLimiter())
        return try FaultLoop(installer: installer, resolver: resolver, onFailure: { error in
            failures.fail(MigrationError(.internalFailure, cause: error) { cause in
                "the fault loop stopped\(cause.map { ": \($0)" } ?? ""); no guest fault is served any more"
            })
        }, onStray: { address in
            guard let unreported = strays.withLock({ $0.record(at: monotonicNanoseconds()) }) else { return }
            let more = unreported > 0 ? " (\(unreported) more since the last report)" : ""
            logger.warning("a guest thread faulted at 0x\(String(address, radix: 16)), outside guest RAM (\(region)), on the VMM's userfaultfd: woken, not resolved\(more); the VMM registered more than guest RAM with it")
        })
    }

    /// Hands the RAM file, the page-state record and the userfaultfd to
    /// systemd's fd store, when there is one.
    private func storeDescriptors(pageState: PageStateFile, uffd: Userfaultfd) {
        guard let descriptorStore else { return }
        let kept = [(StoredDescriptor.ram, memory.file.fd), (StoredDescriptor.pageState, pageState.fd),
                    (StoredDescriptor.uffd, uffd.fd)].filter { descriptorStore.store($0.1, name: $0.0) }
        if kept.count < 3 {
            logger.warning("systemd's fd store did not take all of guest RAM, the page-state record and the userfaultfd (FileDescriptorStoreMax=?): a restarted postcopyd can take this migration over only if the VMM reattaches")
        }
    }

    // MARK: taking over

    /// Serves the migration taken over: postcopy from the record's stale
    /// pages, paused until the agent rejoins. Guest threads the dead daemon
    /// read faults from (and never answered) are woken, so they fault again.
    func resumeTakenOver(_ taken: Recovered) throws {
        let header = taken.header
        try confirmVMMHoldsGuest(taken)
        let stale = try inStep("read the page-state record") { try taken.pageState.stalePages() }
        summary.withLock {
            $0.migrationID = header.migrationID.description
            $0.stalePagesAtSwitchover = header.stalePagesAtSwitchover
            $0.downtimeMs = Double(header.downtimeMicros) / 1e3
            $0.tookOver = true
        }
        let postcopy = try startPostcopy(uffd: taken.uffd, guestBase: header.guestBase, stale: stale, urgent: nil,
                                         pageState: taken.pageState)
        try inStep("wake the guest threads the dead daemon left waiting") {
            try taken.uffd.wake(start: header.guestBase, length: header.geometry.regionSize)
        }
        // A VMM that handed the migration back is told to go on (or to start
        // the guest, if the dead daemon never told it to).
        if taken.vmm != nil {
            try vmm.resume(pageState: taken.pageState)
            // Taken from the VMM: keep them for a daemon restarted after this
            // one too (taken from the store, they are there already).
            storeDescriptors(pageState: taken.pageState, uffd: taken.uffd)
        }
        let source = taken.vmm != nil ? "the VMM's reattachment" : "systemd's file-descriptor store"
        logger.event(.migrationTakenOver, .notice, "took migration \(header.migrationID) over from \(source): \(stale.popCount) of \(header.stalePagesAtSwitchover) pages still stale; paused until the agent rejoins", [
            "takeover_source": "\(source)", "pages_stale": "\(stale.popCount)",
            "pages_stale_at_switchover": "\(header.stalePagesAtSwitchover)",
            "reconnect_timeout_s": "\(config.reconnectTimeoutNanos / 1_000_000_000)",
        ])
        postcopy.signalCompleteIfDone()
    }

    /// A takeover goes on only if the VMM holds the range: it handed the
    /// migration back, or the record says it acknowledged VMM_RESUME, or it
    /// reattaches within `vmmAttachTimeoutNanos`. Otherwise the dead daemon
    /// died before VMM_RESUME reached the VMM: the guest never ran here,
    /// and the migration is discarded rather than served to nobody.
    private func confirmVMMHoldsGuest(_ taken: Recovered) throws {
        let milestones = taken.pageState.milestones
        guard taken.vmm == nil, !milestones.contains(.vmmResumed) else { return }
        let seconds = config.vmmAttachTimeoutNanos / 1_000_000_000
        logger.notice("the page-state record does not show that the VMM acknowledged VMM_RESUME: waiting up to \(seconds) s for the VMM to reattach, which would show that it holds the guest")
        if vmm.attached.wait(timeoutNanos: config.vmmAttachTimeoutNanos), vmm.current != nil { return }
        try failures.check()
        guestDepends.store(false, ordering: .sequentiallyConsistent)
        throw MigrationError(.discarded, "the page-state record shows that the VMM never acknowledged VMM_RESUME, and no VMM reattached within \(seconds) s: the guest never ran here, so there is nothing to take over. The source still holds the guest (paused) and may resume it")
    }

    // MARK: hand-over

    /// DISCARD: the hand-over failed and the source runs the guest again.
    /// This copy must never run: the guest no longer depends on this daemon
    /// (nothing is kept for a takeover), no page is written any more, and
    /// the VMM is told (ERROR discarded) — it keeps the range registered,
    /// so a guest it started anyway blocks on its first stale page.
    func discard(_ reason: String) {
        guestDepends.store(false, ordering: .sequentiallyConsistent)
        failures.fail(.discarded, "the source's hand-over failed and the source runs the guest again (\(reason)): this copy is discarded and must never run; stop the destination VMM")
    }

    /// A VMM that goes away while the hand-over that starts its guest is
    /// still pending never ran the guest, and no other VMM can take its
    /// place: the copy here is discarded (the source's hand-over fails too,
    /// and its QEMU runs the guest again). The agent is told (ERROR
    /// discarded). Returns false outside a pending hand-over.
    func vmmGoneBeforeHandOver(_ reason: String) -> Bool {
        let pending = session.withLock { $0.handOverPending && $0.phase.servesPostcopy }
        guard pending else { return false }
        guestDepends.store(false, ordering: .sequentiallyConsistent)
        failures.fail(.discarded, "\(reason), before the hand-over started the guest: the guest never ran here, so this copy is discarded (the source keeps the guest)")
        return true
    }
}
