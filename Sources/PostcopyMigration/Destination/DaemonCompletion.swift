import Logging
import PostcopyCore
import PostcopyOS
import Synchronization

// How a migration ends here: complete (`finish`), or failed while the guest
// depended on this daemon.
extension DestinationDaemon {
    /// The loud line and the journal record (POSTCOPYD_GUEST_LEFT_WAITING)
    /// of a failure during postcopy: the guest was not released.
    func reportGuestLeftWaiting(_ error: MigrationError) {
        let stale = engine.withLock { $0 }?.stalePages
        let pages = stale.map { "\($0) pages still stale" } ?? "its stale pages unknown"
        let id = session.withLock { $0.migrationID?.description } ?? ""
        let kept = descriptorStore == nil ? "" : "; guest RAM, the page-state record and the userfaultfd stay in systemd's fd store"
        logger.event(.guestLeftWaiting, .critical, "postcopyd stopped during postcopy without releasing the guest (\(error.reason)): the guest waits on incomplete memory (\(pages)) and its threads block on stale pages; the VMM was not sent ERROR\(kept). Restart postcopyd to take the migration over, or stop the VM.", [
            "error_code": "\(error.code)", "reason": "\(error.reason)", "pages_stale": "\(stale.map { "\($0)" } ?? "")",
            "migration_id": "\(id)",
        ])
    }

    // MARK: completion

    /// Waits for the last stale page and the source's digest; then tells
    /// the agent and the VMM, and stops serving faults and waits for the VMM
    /// to let go of the range. Returns the figures it wrote into the summary.
    func finish() throws -> DaemonFigures {
        completion.wait()
        try failures.check()
        // Reached only through switchover, which set both.
        let postcopy = try currentEngine()
        // Stalls since postcopy-beat last logged them, before the summary.
        postcopy.reportStalls()
        // The latch opens without a failure only once the session has both.
        let digest = try session.withLock { session throws -> ImageDigest in
            guard let digest = session.imageDigest, session.pagesInPlace else {
                throw MigrationError(.internalFailure, "completing without every page or the source's digest")
            }
            session.complete()
            return digest
        }
        postcopy.stopRequests()
        let figures = figures(exactLatencies: true)
        summary.withLock { figures.complete(&$0) }
        let bulk = agent.withLock { $0.streams[.bulk] }
        // Every page is here: the agent missing this (its connection lost)
        // changes nothing for the guest. The agent closes its connections
        // once it has COMPLETE; a dead one is found by its silence.
        do {
            guard let bulk else { throw MigrationError(.peerLost, "no agent connection") }
            try bulk.send(.complete(pagesReceived: figures.filledPages, faultsClean: figures.faultsClean,
                                    faultsStale: figures.faultsStale))
        } catch {
            logger.warning("every page is in place, but the agent could not be told: \(error); its source stays paused until an operator stops it")
        }
        // Stop serving faults before the VMM unregisters the range: a CONTINUE
        // racing the unregister would fail. A guest thread that faults in
        // between waits until the unregister wakes it, then faults normally.
        let loop = faultLoop.withLock { $0 }
        loop?.stop()
        if let failure = loop?.failure { throw MigrationError(.internalFailure, "the fault loop stopped", cause: failure) }
        // A daemon that took over from systemd's fd store may finish before
        // the VMM has reattached: it must, to release the range.
        guard vmm.attached.wait(timeoutNanos: config.vmmAttachTimeoutNanos) else {
            try failures.check()
            throw MigrationError(.peerLost, "every page is in place, but the VMM did not reattach within \(config.vmmAttachTimeoutNanos / 1_000_000_000) s to release the range")
        }
        try vmm.complete(imageDigest: digest)
        guard vmm.completed.wait(timeoutNanos: config.vmmCompleteTimeoutNanos) else {
            try failures.check()
            throw MigrationError(.peerLost, "the VMM did not acknowledge VMM_COMPLETE within \(config.vmmCompleteTimeoutNanos / 1_000_000_000) s")
        }
        // The VMM unregistered the range: the guest no longer depends on
        // this daemon, and nothing is written through the alias any more.
        guestDepends.store(false, ordering: .sequentiallyConsistent)
        postcopy.halt()
        try failures.check()
        // The VMM unregistered the range. Wake it once more in case a fault
        // raced the unregister (see Userfaultfd.release), so that no guest
        // thread depends on this daemon after it exits.
        if let attachment = vmm.current {
            try? attachment.uffd.wake(start: attachment.guestBase, length: memory.geometry.regionSize)
        }
        logger.debug("VMM released guest RAM", metadata: ["pages": "\(figures.filledPages)"])
        if let path = config.tracePath, let trace = postcopy.traceSnapshot {
            do {
                try writeTextFile(path, trace.csv)
            } catch {
                logger.warning("could not write the postcopy trace to \(path): \(error)")
            }
        }
        // Let the agent close first, so that COMPLETE is read before the
        // sockets go; one that never does is dead and not waited for.
        let deadline = monotonicNanoseconds() + config.deadPeerTimeoutNanos
        while let running = receivers.withLock({ $0.first { !$0.opened } }) {
            let now = monotonicNanoseconds()
            guard now < deadline, running.wait(timeoutNanos: deadline - now) else { break }
        }
        return figures
    }
}
