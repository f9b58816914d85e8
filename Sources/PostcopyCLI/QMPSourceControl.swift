import Logging
import PostcopyCore
import PostcopyMigration
import PostcopyOS

/// Switchover of a source QEMU over one QMP connection, opened before
/// precopy, with no process started at switchover (`postcopy-push --qmp`).
///
/// QEMU's `pause-before-switchover` capability does the pausing: `migrate`
/// (of the device state alone, as `x-ignore-shared` leaves the shared guest
/// RAM out) makes the source stop its own vCPUs and wait in state
/// `pre-switchover`. The agent's final scan and the switchover run in that
/// window. Once postcopyd has resumed the guest's memory, `migrate-continue`
/// sends the device state; the destination QEMU, started without `-S` and
/// with `migrate-incoming` set up ahead of time, then runs the guest by
/// itself, since the source was running when `migrate` began. A failure
/// before that cancels the migration, which restarts the source's vCPUs.
///
/// The hand-over is the point of no return. With `return-path` on, the
/// source reports `completed` only once the destination has loaded the
/// device state and said so; a migration that fails or is cancelled before
/// that leaves the source running again (QEMU restarts the vCPUs it
/// stopped), and the destination, which never ran the guest, discards its
/// copy (`SourceRunsAgain`, then DISCARD).
public final class QMPSourceControl: Sendable {
    public let qmp: QMPClient
    public let migrateURI: String
    private let logger: Logger
    /// `migrate` sent → source `completed` (the destination has the device
    /// state and runs the guest): the guest's pause, once the hand-over ran.
    private let pause = Locked<(started: UInt64, ms: Double?)>((0, nil))

    /// Connects to the source QEMU's QMP socket and sets the migration
    /// capabilities this needs; refuses a QEMU that is migrating already.
    /// `rejoining`: a restarted agent (`--resume`), which finishes the
    /// hand-over the agent before it began, and changes nothing else.
    public init(socketPath: String, migrateURI: String, logger: Logger, rejoining: Bool = false) throws {
        qmp = try QMPClient(path: socketPath)
        self.migrateURI = migrateURI
        self.logger = logger
        if rejoining { return }
        let status = try qmp.migrationStatus()
        guard ["none", "completed", "failed", "cancelled"].contains(status) else {
            throw QMPError(path: socketPath, "the source QEMU is migrating already (query-migrate: '\(status)')")
        }
        // MIGRATION events tell each state the moment QEMU enters it:
        // polling query-migrate would add its interval to the pause.
        // return-path: `completed` then means the destination has loaded
        // the device state, not merely that the source has sent it.
        _ = try inStep("set x-ignore-shared, pause-before-switchover, return-path and events on the source QEMU") {
            try qmp.execute("migrate-set-capabilities", ["capabilities": [
                ["capability": "x-ignore-shared", "state": true],
                ["capability": "pause-before-switchover", "state": true],
                ["capability": "return-path", "state": true],
                ["capability": "events", "state": true],
            ]])
        }
    }

    /// The guest's pause as QMP saw it, once the hand-over has run.
    public var guestPauseMs: Double? { pause.withLock { $0.ms } }

    /// The agent's control of the source through this connection.
    public var control: SourceControl {
        SourceControl("QMP \(qmp.path) (migrate with pause-before-switchover)", pause: { [self] in
            try stopVCPUs()
        }, resume: { [self] in
            try resumeSource()
        }, handOver: (description: "QMP migrate-continue (the device state to \(migrateURI))", run: { [self] in
            try handOver()
        }), handOverStartsGuest: true)
    }

    /// `migrate`, then wait for `pre-switchover`: the vCPUs are stopped.
    private func stopVCPUs() throws {
        qmp.discardMigrationEvents()
        pause.withLock { $0 = (monotonicNanoseconds(), nil) }
        try qmp.execute("migrate", ["uri": migrateURI])
        _ = try qmp.waitForMigration(["pre-switchover"], failing: ["failed", "cancelled", "completed"],
                                     timeoutNanos: 30_000_000_000, "waiting for the source QEMU to stop its vCPUs before switchover")
    }

    /// Before the destination resumed: cancel the device-state migration
    /// (QEMU restarts the vCPUs it stopped), and `cont` a source still paused.
    private func resumeSource() throws {
        let status = try qmp.migrationStatus()
        if !["none", "completed", "failed", "cancelled"].contains(status) {
            try qmp.execute("migrate_cancel")
            _ = try qmp.wait(for: ["cancelled", "failed"], timeoutNanos: 30_000_000_000,
                             "waiting for the source QEMU to cancel its migration") { try qmp.migrationStatus() }
        }
        let run = try qmp.wait(for: ["running", "paused", "postmigrate"], timeoutNanos: 30_000_000_000,
                               "waiting for the source QEMU to settle after the cancel") { try qmp.runStatus() }
        if run != "running" { try qmp.execute("cont") }
        logger.notice("the source QEMU runs again (QMP: migration cancelled, vCPUs restarted)")
    }

    /// After RESUMED: let the device state go, and wait until the
    /// destination has loaded it and runs the guest (`completed`). Finishes
    /// from wherever the migration is, for a restarted agent too. A
    /// migration that failed or was cancelled on the way throws
    /// `SourceRunsAgain` once the source runs; anything else (QMP lost, no
    /// answer in time) leaves it in doubt and throws as it is.
    private func handOver() throws {
        let status = try qmp.migrationStatus()
        switch status {
        case "completed":
            return
        case "failed", "cancelled", "none":
            throw try sourceRunsAgain(Explanation("the source QEMU's migration is '\(status)'"))
        case "pre-switchover":
            try qmp.execute("migrate-continue", ["state": "pre-switchover"])
        default:
            break  // under way: wait for its end
        }
        do {
            _ = try qmp.waitForMigration(["completed"], failing: ["failed", "cancelled"], timeoutNanos: 300_000_000_000,
                                         "waiting for the destination QEMU to load the device state")
        } catch let error as QMPError {
            let now = try qmp.migrationStatus()
            if now == "failed" || now == "cancelled" { throw try sourceRunsAgain(Explanation(cause: error)) }
            throw error
        }
        let now = monotonicNanoseconds()
        pause.withLock { $0.ms = $0.started > 0 ? Double(now - $0.started) / 1e6 : nil }
    }

    /// A source whose migration failed or was cancelled: QEMU restarts the
    /// vCPUs it stopped, shortly after. Waits for that (and `cont`s a
    /// source that settled paused), then says why the source runs again,
    /// keeping the error that showed it as the cause.
    private func sourceRunsAgain(_ why: Explanation) throws -> SourceRunsAgain {
        let run = (try? qmp.wait(for: ["running"], timeoutNanos: 5_000_000_000,
                                 "waiting for the source QEMU to restart its vCPUs") { try qmp.runStatus() })
        if run == nil, try qmp.runStatus() == "paused" { try qmp.execute("cont") }
        logger.notice("the source QEMU runs the guest again (\(why.reason))")
        return SourceRunsAgain(why)
    }
}
