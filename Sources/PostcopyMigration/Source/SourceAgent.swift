import Glibc
import Logging
import PostcopyCore
import PostcopyOS
import Synchronization

/// How the agent stops the source guest at switchover, and lets it run again
/// if the migration fails before the destination resumed.
public struct SourceControl: Sendable {
    public let description: String
    public let pause: @Sendable () throws -> Void
    public let resume: @Sendable () throws -> Void
    /// Run once postcopyd has resumed the guest's memory (RESUMED): what
    /// makes the guest run on the destination when postcopyd's RESUMED alone
    /// does not, such as moving a VMM's device state and starting it
    /// (`postcopy-push --resumed-cmd`). Its time counts as downtime.
    public let handOver: (description: String, run: @Sendable () throws -> Void)?
    /// The destination's guest starts only once `handOver` is done (QEMU
    /// loads its device state, then runs): until then the source may still
    /// resume, and `handOver` throws `SourceRunsAgain` when it fails in a
    /// way that leaves the source running. Without it the guest runs on the
    /// destination from RESUMED on, and the source never resumes after.
    public let handOverStartsGuest: Bool

    public init(_ description: String, pause: @escaping @Sendable () throws -> Void,
                resume: @escaping @Sendable () throws -> Void,
                handOver: (description: String, run: @Sendable () throws -> Void)? = nil,
                handOverStartsGuest: Bool = false) {
        self.description = description
        self.pause = pause
        self.resume = resume
        self.handOver = handOver
        self.handOverStartsGuest = handOver != nil && handOverStartsGuest
    }
}

/// A hand-over that failed before the destination's guest started, and left
/// the source running the guest again: the destination must discard its
/// copy (DISCARD). It keeps the error that showed it, if any, as its cause.
public struct SourceRunsAgain: ExplainedError {
    public let explanation: Explanation
    public init(_ explanation: Explanation) { self.explanation = explanation }
}

public struct AgentConfig: Sendable {
    /// The source's guest RAM file.
    public var ramPath: String
    public var daemon: SocketEndpoint
    /// How the connections to postcopyd are protected: TLS with postcopyd's
    /// certificate checked, or plaintext (an explicit choice).
    public var transport: TransportSecurity
    public var migrationID: MigrationID
    /// Carried by every HELLO: postcopyd admits only the agent that holds
    /// it. A restarted agent (`resume`) needs the first one's.
    public var secret: MigrationSecret
    public var policy = PrecopyPolicy()
    public var control: SourceControl
    /// Read at switchover: a dirty log the caller kept (one bit per 4 KiB
    /// page, little-endian 64-bit words), merged with the final scan.
    public var dirtyBitmapPath: String?
    /// How precopy finds changed pages: the source VMM's uffd-wp write log
    /// (`dirtyLogSocket` names where the VMM offers it) or hashing.
    public var dirtyLog = DirtyLogChoice.auto
    public var dirtyLogSocket: String?
    /// Also hash every page after each scan of the write log, and fail the
    /// migration, naming them, if the log missed a changed page.
    public var verifyDirtyLog = false
    /// Pages per PAGES frame.
    public var batchPages = 256
    /// Bulk streams to postcopyd, 1 … `AgentStream.maxBulkStreams`: each a
    /// connection of its own, with a thread on each side, carrying its
    /// share of precopy's pages and of the back-fill's (`StreamPartition`).
    /// The urgent connection is one more.
    public var streams = 1
    /// Precopy's limit, bytes per second, over all its rounds and bulk
    /// streams (nil: as fast as the link goes): QEMU's `max-bandwidth`. The
    /// pause and postcopy are not held back by it.
    public var precopyBytesPerSecond: UInt64?
    /// The background stream's limit during postcopy, bytes per second over
    /// all bulk streams (nil: as fast as the link goes). Pages a fault
    /// waits for are never held back by it.
    public var postcopyBytesPerSecond: UInt64?
    /// How the thread that sends the background stream competes for a CPU
    /// during postcopy; precopy runs at normal priority.
    public var backgroundScheduling = OSThread.SchedulingClass.backgroundDefault
    public var keepAlive = KeepAlive()
    /// A connection to postcopyd that carries nothing for this long (the
    /// daemon sends HEARTBEAT every quarter of it) is dead.
    public var deadPeerTimeoutNanos: UInt64 = 5_000_000_000
    /// After losing postcopyd during postcopy: how long to keep trying to
    /// rejoin, with backoff from `reconnectInitialDelayNanos` doubling up to
    /// `reconnectMaxDelayNanos`, before giving up (the source stays paused).
    public var reconnectTimeoutNanos: UInt64 = 600_000_000_000
    public var reconnectInitialDelayNanos: UInt64 = 100_000_000
    public var reconnectMaxDelayNanos: UInt64 = 2_000_000_000
    /// Rejoin a postcopy phase another agent started (one that died or was
    /// killed): no precopy, no pause; the destination says which pages it
    /// still lacks.
    public var resume = false

    public init(ramPath: String, daemon: SocketEndpoint, transport: TransportSecurity, migrationID: MigrationID,
                control: SourceControl) {
        self.ramPath = ramPath
        self.daemon = daemon
        self.transport = transport
        self.migrationID = migrationID
        secret = MigrationSecret.random()
        self.control = control
    }
}

/// The source side of one migration: precopy rounds driven by a hash scan,
/// switchover, then postcopy serving requests and pushing the rest —
/// rejoining postcopyd whenever the connections are lost during postcopy.
public final class SourceAgent: @unchecked Sendable {
    // SAFETY (@unchecked): `summary` is written by the calling thread only,
    // before the urgent thread starts and after it is joined; counters the
    // urgent thread updates are atomics.
    public let config: AgentConfig
    private let logger: Logger
    let progress: ProgressReporter
    private let image: SourceImage
    private var summary = AgentSummary()
    private let urgentPages = Atomic<UInt64>(0)
    private let resentPages = Atomic<UInt64>(0)
    private let requests = Atomic<UInt64>(0)
    private let urgentBytes = Atomic<UInt64>(0)
    /// The latest connection of each stream, for the heartbeat thread and the end.
    private let links = Locked<[AgentStream: MessageStream]>([:])
    /// Why the hand-over command failed, reported once postcopy has put
    /// every page in place (or the destination discarded its copy).
    private var handOverFailure: (any Error)?
    /// When switchover paused the source.
    private var pausedAt: UInt64 = 0
    /// The image digest, for the destination: known after the final scan
    /// (hash) or once the stale pages are hashed after RESUMED (uffd-wp);
    /// and how the hand-over ended.
    private let notices = ResumedNotices()
    /// What `--verify-dirty-log` has found; carried from precopy to the
    /// final scan.
    private var audit = DirtyLogAudit(pageCount: 0)
    /// The pages a precopy round cut short at the time limit never looked
    /// at: stale at switchover, whatever the dirty log says then (the log
    /// was re-armed on them before the round).
    private var leftByPrecopy: PageBitmap?

    public init(config: AgentConfig, logger: Logger, progress: ProgressReporter) throws {
        precondition(config.streams >= 1 && config.streams <= AgentStream.maxBulkStreams,
                     "\(config.streams) bulk streams")
        self.config = config
        self.logger = logger
        self.progress = progress
        image = try inStep("open the source RAM file") { try SourceImage(path: config.ramPath) }
        summary.migrationID = config.migrationID.description
        summary.regionBytes = image.size
        summary.streams = config.streams
    }

    public func run() throws -> AgentSummary {
        let started = monotonicNanoseconds()
        let heartbeat = try StoppableThread()
        try heartbeat.start(name: "push-beat") { [self] in
            let interval = max(config.deadPeerTimeoutNanos / 4, 10_000_000)
            while !heartbeat.waitForStop(timeoutNanos: interval) {
                for stream in links.withLock({ Array($0.values) }) {
                    do { try stream.send(.heartbeat) } catch { stream.shutdown() }
                }
            }
        }
        defer {
            heartbeat.stop()
            for stream in links.withLock({ Array($0.values) }) { stream.shutdown() }
        }
        if config.resume {
            // A restarted agent: the source was paused by the one before it,
            // and the destination says what it still lacks.
            summary.resumedOnly = true
            let (connections, stale) = try rejoin()
            // A restarted agent has no per-page hashes: it hashes the whole
            // paused image, on the final scan's threads.
            let scanner = PageScanner(image: image, batchPages: 1)
            let digester = try startDigest { scanner.imageDigest() }
            defer { digester.join() }
            // The hand-over the agent before it began, when it is what
            // starts the guest (QMP): finished from wherever the source QEMU
            // is, and its outcome told. A command is not run twice.
            let handOver = config.control.handOverStartsGuest ? try startHandOver() : nil
            do {
                try postcopy(stale: stale, connections: connections)
            } catch {
                throw settled(handOver, error)
            }
            handOverFailure = handOver?.finish(into: &summary)
            summary.idealBytes = stale.popCount * 4096
        } else {
            // The dirty log first: asked for by name and not to be had, it
            // fails the migration before postcopyd hears of it.
            var log = try openDirtyLog()
            let connections = try connectAll()
            summary.setupSeconds = Double(monotonicNanoseconds() - started) / 1e9
            let scanner = PageScanner(image: image, batchPages: config.batchPages)
            do {
                try precopy(scanner, connections.bulk, log: &log)
            } catch {
                throw Self.reasonGiven(on: connections.control) ?? error
            }
            let (stale, postcopyConnections) = try switchover(scanner, connections, log: log)
            // With uffd-wp the stale pages were not hashed in the pause:
            // the digest is finished now, while postcopy serves the guest.
            let digester = try startDigest { scanner.digest(hashingStale: stale) }
            defer { digester.join() }
            let handOver = try startHandOver()
            do {
                try postcopy(stale: stale, connections: postcopyConnections)
            } catch {
                throw settled(handOver, error)
            }
            handOverFailure = handOver?.finish(into: &summary)
            summary.idealBytes = (scanner.nonZeroPages() + stale.popCount) * 4096
        }
        summary.totalSeconds = Double(monotonicNanoseconds() - started) / 1e9
        summary.bytesSent += urgentBytes.load(ordering: .relaxed)
        summary.imageDigest = notices.digest?.description ?? ""
        summary.addManagementNames()
        if let handOverFailure {
            throw MigrationError(.internalFailure, cause: handOverFailure) { cause in
                "every page reached the destination, but the hand-over command failed\(cause.map { ": \($0)" } ?? ""). The guest may not be running on the destination; the source stays paused"
            }
        }
        return summary
    }

    /// What postcopy's `error` means once the hand-over is settled: a
    /// hand-over that left the source running (the destination discarded
    /// its copy, which ended postcopy) is the migration's outcome.
    private func settled(_ handOver: HandOver?, _ error: any Error) -> any Error {
        guard let failure = handOver?.finish(into: &summary) else { return error }
        guard let runsAgain = failure as? SourceRunsAgain else { return error }
        let told = (error as? MigrationError)?.code == .discarded
            ? "postcopyd discarded its copy"
            : "postcopyd could not be told to discard its copy (\(error)): stop postcopyd and the VMM on the destination, whose guest must never run"
        return MigrationError(.discarded, cause: runsAgain) { why in
            "the hand-over failed before the guest ran on the destination\(why.map { " (\($0))" } ?? ""): the source runs the guest again, and \(told)"
        }
    }

    /// Starts the hand-over once the destination owns the guest, on a
    /// thread of its own: the VMM it starts may touch stale pages on the way
    /// (QEMU reads guest RAM while it loads device state), and those are
    /// served by the postcopy this thread goes on to run. A failure does not
    /// stop postcopy: the destination's memory still has to be completed,
    /// and the source must stay paused either way.
    ///
    /// When the hand-over is what starts the destination's guest, its end
    /// settles the point of no return: HANDED_OVER once it is done; DISCARD
    /// when it failed and left the source running (`SourceRunsAgain`),
    /// which ends the migration. Any other failure leaves it in doubt: the
    /// source stays paused.
    private func startHandOver() throws -> HandOver? {
        guard let command = config.control.handOver else { return nil }
        let startsGuest = config.control.handOverStartsGuest
        let pausedAt = self.pausedAt
        let notices = self.notices
        let outcome = Locked<Result<(handOverMs: Double, guestDowntimeMs: Double), any Error>?>(nil)
        let thread = try OSThread.start(name: "push-hand-over") { [logger] in
            let started = monotonicNanoseconds()
            do {
                try command.run()
                let now = monotonicNanoseconds()
                let figures = (handOverMs: Double(now - started) / 1e6, guestDowntimeMs: Double(now - pausedAt) / 1e6)
                logger.info("hand-over: \(fixed(figures.handOverMs, 1)) ms; the guest was paused for \(fixed(figures.guestDowntimeMs, 1)) ms")
                if startsGuest {
                    logger.notice("the guest runs on the destination: past the point of no return, the source never resumes it")
                    notices.handedOver()
                }
                outcome.withLock { $0 = .success(figures) }
            } catch let runsAgain as SourceRunsAgain where startsGuest {
                logger.error("the hand-over failed before the guest ran on the destination: \(runsAgain.reason). The source runs the guest again; telling postcopyd to discard its copy")
                notices.discard(runsAgain.reason)
                outcome.withLock { $0 = .failure(runsAgain) }
            } catch {
                logger.error("the hand-over (\(command.description)) failed: \(error). Postcopy goes on so that the destination gets every page; the source stays paused")
                outcome.withLock { $0 = .failure(error) }
            }
        }
        return HandOver(thread: thread, outcome: outcome)
    }

    private struct HandOver {
        let thread: OSThread
        let outcome: Locked<Result<(handOverMs: Double, guestDowntimeMs: Double), any Error>?>

        /// Waits for the command; its figures go into `summary`.
        func finish(into summary: inout AgentSummary) -> (any Error)? {
            thread.join()
            switch outcome.withLock({ $0 }) {
            case let .success(figures)?:
                summary.handOverMs = figures.handOverMs
                summary.guestDowntimeMs = figures.guestDowntimeMs
                return nil
            case let .failure(error)?: return error
            case nil: return nil
            }
        }
    }

    /// Opens every connection of a generation, each bulk stream and then
    /// the urgent one, with HELLO (resuming, to rejoin a postcopy in
    /// progress). A failure shuts those opened down. A fresh agent whose
    /// later connection fails asks the first for the reason: postcopyd may
    /// have ended the migration (an operator's cancel) while it shook
    /// hands, and said why on bulk stream 0, admitted already.
    private func connectAll(resume: Bool = false) throws -> AgentConnections {
        var bulk: [MessageStream] = []
        do {
            for index in 0..<config.streams { bulk.append(try connect(.bulk(index), resume: resume)) }
            return AgentConnections(bulk: bulk, urgent: try connect(.urgent, resume: resume))
        } catch {
            let reason = resume ? nil : bulk.first.flatMap { Self.reasonGiven(on: $0) }
            for stream in bulk { stream.shutdown() }
            throw reason ?? error
        }
    }

    /// Opens the connection `which` names and says HELLO (resuming, to
    /// rejoin a postcopy in progress). From then on a connection that
    /// carries nothing for `deadPeerTimeoutNanos`, not even HEARTBEAT, is
    /// dead.
    private func connect(_ which: AgentStream, resume: Bool = false) throws -> MessageStream {
        let connection = try inStep("connect the \(which) connection to postcopyd at \(config.daemon)") {
            let tcp = try TCPConnection.connect(to: config.daemon, keepAlive: config.keepAlive)
            // A handshake is a round trip and some crypto: a dead-peer
            // timeout tuned for a fast network would fail it on a busy host.
            return try config.transport.secure(tcp, timeoutNanos: max(config.deadPeerTimeoutNanos, 5_000_000_000))
        }
        try connection.setReceiveTimeout(config.deadPeerTimeoutNanos)
        try connection.setSendTimeout(config.deadPeerTimeoutNanos)
        let stream = MessageStream(connection, peer: "postcopyd \(which) connection")
        try stream.send(.hello(migrationID: config.migrationID, role: which.role, sourcePageSize: image.pageSize,
                               regionSize: image.size, secret: config.secret, resume: resume,
                               bulkStreams: config.streams, streamIndex: which.index))
        switch try next(on: stream, "during the \(which) connection's handshake") {
        case let .welcome(regionSize, _) where regionSize == image.size:
            links.withLock { $0[which] = stream }
            return stream
        case let .welcome(regionSize, _):
            throw MigrationError(.incompatible, "the destination region is \(regionSize) bytes, the source's \(image.size)")
        case let other:
            throw MigrationError(.unexpectedMessage, "expected WELCOME from postcopyd, got \(other.type)")
        }
    }

    /// The next message from postcopyd other than HEARTBEAT, which must be
    /// neither ERROR nor the end of the stream; `when` says where the
    /// migration stands, for errors. The end of the stream or silence
    /// throws `ConnectionLost`; ERROR throws the daemon's reason.
    private func next(on stream: MessageStream, _ when: String) throws -> Message {
        while true {
            let message: Message?
            do {
                message = try stream.receive()
            } catch let error as SystemCallError where error.errno == .again {
                throw ConnectionLost(cause: error) { _ in
                    "nothing from postcopyd \(when) for \(fixed(Double(config.deadPeerTimeoutNanos) / 1e9, 1)) s, not even HEARTBEAT"
                }
            }
            switch message {
            case .heartbeat?:
                continue
            case let .error(code, text)?:
                throw MigrationError(code, "postcopyd failed \(when) (\(code)): \(text)")
            case let message?:
                return message
            case nil:
                throw ConnectionLost("postcopyd closed the connection \(when)")
            }
        }
    }

    /// The ERROR postcopyd sent before closing `stream`, if it did: during
    /// precopy the agent only writes, so a failed send is all it sees of
    /// the daemon's reason (a cancel, a refused frame) until it looks.
    static func reasonGiven(on stream: MessageStream) -> MigrationError? {
        try? stream.connection.setReceiveTimeout(200_000_000)
        let deadline = monotonicNanoseconds() + 500_000_000
        while monotonicNanoseconds() < deadline, let message = try? stream.receive() {
            if case let .error(code, text) = message {
                return MigrationError(code, "postcopyd ended the migration (\(code)): \(text)")
            }
        }
        return nil
    }

    /// Whether `error` means the connection to postcopyd is gone (rejoin)
    /// rather than that postcopyd or this agent failed the migration.
    static func connectionLoss(_ error: any Error) -> ConnectionLost? {
        switch error {
        case let lost as ConnectionLost: return lost
        case is MigrationError: return nil
        case let error as SystemCallError where error.errno == .again:
            return ConnectionLost("postcopyd took nothing for the send timeout", cause: error)
        default: return ConnectionLost(cause: error)
        }
    }

    // MARK: precopy

    /// The dirty log precopy will use: uffd-wp when the source VMM offers
    /// it (armed: every page protected), or nil for hashing, with the reason
    /// in the summary and one log line.
    private func openDirtyLog() throws -> UffdWriteLog? {
        let why: String
        switch (config.dirtyLog, config.dirtyLogSocket) {
        case (.hash, _):
            why = "--dirty-log hash"
        case (_, nil):
            why = "no --dirty-log-socket: the source VMM offers no write log"
            if config.dirtyLog == .uffdWP { throw MigrationError(.incompatible, "--dirty-log uffd-wp: \(why)") }
        case let (_, socket?):
            do {
                let log = try UffdWriteLog.connect(socketPath: socket, image: image)
                summary.dirtyLog = "uffd-wp"
                logger.info("dirty log: \(log.description)")
                return log
            } catch {
                if config.dirtyLog == .uffdWP {
                    throw MigrationError(.incompatible, "--dirty-log uffd-wp", cause: error)
                }
                why = error.reason
            }
        }
        summary.dirtyLog = "hash"
        if config.dirtyLog != .hash {
            summary.dirtyLogFallback = why
            logger.notice("dirty log: hashing every page each round, because \(why)")
        } else {
            logger.info("dirty log: hash (--dirty-log hash)")
        }
        return nil
    }

    /// The pages written since the last scan of `log`, re-protected; and,
    /// with `--verify-dirty-log`, the audit of the log against a hash of
    /// every page. A scan that fails drops the log (nil): hashing takes
    /// over, which is always right, because the scanner's per-page hashes
    /// are those of what was sent.
    private func scanWritten(_ log: inout UffdWriteLog?, _ scanner: PageScanner, paused: Bool) -> PageBitmap? {
        guard let current = log else { return nil }
        do {
            // The last scan, in the pause, re-arms nothing: no round follows
            // it, and if the migration fails the agent is done with the log.
            var written = try current.written(protect: !paused)
            // Pages precopy left are stale as much as written ones (and
            // differ from what was sent: the audit must not count them as
            // changes the log missed).
            if paused, let left = leftByPrecopy { written.formUnion(left) }
            if config.verifyDirtyLog {
                audit.record(written: written, changed: scanner.changedPages(), paused: paused)
                summary.missedByDirtyLog = audit.missed
            }
            return written
        } catch {
            logger.warning("the uffd-wp scan failed: \(error); hashing every page from here on")
            summary.dirtyLog = "hash"
            summary.dirtyLogFallback = "the uffd-wp scan failed: \(error)"
            log = nil
            return nil
        }
    }

    /// Fails the migration when `--verify-dirty-log` found pages the log missed.
    private func checkAudit() throws {
        guard audit.missed > 0 else { return }
        throw MigrationError(.internalFailure, "--verify-dirty-log: the uffd-wp log missed \(audit.missed) changed pages (first: \(audit.firstMissed.map(String.init).joined(separator: ", "))); use --dirty-log hash for this source")
    }

    /// Precopy's rounds, each over every bulk stream in `streams`, until
    /// `config.policy` says stop.
    private func precopy(_ scanner: PageScanner, _ streams: [MessageStream], log: inout UffdWriteLog?) throws {
        let started = monotonicNanoseconds()
        audit = DirtyLogAudit(pageCount: scanner.pageCount)
        var round: UInt32 = 0
        var reason = PrecopyPolicy.Reason.roundLimit
        let lanes = precopyLanes(batchPages: scanner.batchPages, startedAt: started)
        leftByPrecopy = nil
        // The time limit holds within a round too: a round still under way
        // then stops, and what it did not send is left to postcopy.
        let (deadline, overflow) = started.addingReportingOverflow(config.policy.maxDurationNanos)
        let cutAt = overflow ? nil : deadline
        // For the dirty rate: when the scan before the last round ran. For
        // the expected downtime: what the last scan of the log took.
        var previousScanAt: UInt64 = 0
        var lastScanMs: Double?
        while true {
            if let limit = config.policy.limitReached(roundsDone: Int(round), elapsedNanos: monotonicNanoseconds() - started) {
                reason = limit
                break
            }
            round += 1
            let roundStarted = monotonicNanoseconds()
            let cpuStarted = ProcessUsage.cpuSeconds()
            // Round 1 sends every page that is not zero, and the log was
            // armed before it; each later round sends what the log reports.
            let candidates = round == 1 ? nil : scanWritten(&log, scanner, paused: false)
            if candidates != nil { lastScanMs = Double(monotonicNanoseconds() - roundStarted) / 1e6 }
            try checkAudit()
            let total = Double(max(candidates?.popCount ?? scanner.pageCount, 1))
            let shown = Locked((looked: UInt64(0), bytes: UInt64(0)))
            let (progress, current) = (self.progress, round)
            let result = try sendRound(round, among: candidates, scanner, lanes: lanes, on: streams,
                                       until: cutAt) { looked, sent in
                // The lanes report in turn, so the line has one writer at a time.
                shown.withLock { sofar in
                    sofar.looked += looked
                    sofar.bytes += sent.bytesSent
                    let (fraction, bytes) = (Double(sofar.looked) / total, sofar.bytes)
                    progress.update("precopy round \(current) \(ProgressReporter.bar(fraction)) \(ByteSize.format(bytes)) sent, \(ProgressReporter.rate(bytes: bytes, since: roundStarted))")
                }
            }
            let changed = result.pagesSent + result.zeroPagesSent
            let seconds = Double(monotonicNanoseconds() - roundStarted) / 1e9
            // Round 1 sends what is there; later rounds what was dirtied
            // since the scan before the previous round.
            let dirtyRate = round == 1 ? nil
                : Double(candidates?.popCount ?? changed) / (Double(roundStarted - previousScanAt) / 1e9)
            previousScanAt = roundStarted
            summary.rounds.append(PrecopyRound(round: round, pagesSent: result.pagesSent,
                                               zeroPagesSent: result.zeroPagesSent, bytesSent: result.bytesSent,
                                               seconds: seconds, pagesWritten: candidates?.popCount,
                                               cpuSeconds: ProcessUsage.cpuSeconds() - cpuStarted,
                                               dirtyPagesPerSecond: dirtyRate, pagesLeft: result.leftOver?.popCount))
            summary.bytesSent += result.bytesSent
            progress.finish()
            logger.info("precopy round \(round): \(result.pagesSent) pages sent, \(result.zeroPagesSent) zeroed, \(fixed(seconds, 2)) s")
            if let left = result.leftOver {
                leftByPrecopy = left
                reason = .timeLimit
                logger.info("precopy round \(round) stopped at the time limit (\(fixed(Double(config.policy.maxDurationNanos) / 1e9, 1)) s): \(left.popCount) pages it did not reach are left to postcopy")
                break
            }
            if round > 1 && config.policy.converged(dirtyPages: changed) {
                reason = .converged
                break
            }
        }
        summary.precopyEndReason = reason.rawValue
        summary.precopySeconds = Double(monotonicNanoseconds() - started) / 1e9
        // The final scan costs what the last scan of the log did; hashing,
        // what the last round did (it hashed every page: an upper bound).
        // The bitmap goes at the best rate a round of some size reached.
        let rate = summary.rounds.filter { $0.bytesSent >= 1 << 20 }
            .map { Double($0.bytesSent) / $0.seconds }.max() ?? 0
        if let scanMs = log == nil ? summary.rounds.last.map({ $0.seconds * 1000 }) : lastScanMs {
            summary.expectedDowntimeMs = AgentSummary.expectedDowntimeMs(scanMs: scanMs, pageCount: scanner.pageCount,
                                                                         bytesPerSecond: rate)
        }
    }

    // MARK: switchover

    /// Pauses the source, scans it a last time and sends the stale pages
    /// (DIRTY_BITMAP, then SWITCHOVER) on bulk stream 0, which follows
    /// every stream's last ROUND_END; returns them and the connections
    /// postcopy runs on (a rejoin's, when these were lost).
    private func switchover(_ scanner: PageScanner, _ connections: AgentConnections,
                            log: UffdWriteLog?) throws -> (stale: PageBitmap, connections: AgentConnections) {
        let bulk = connections.control
        let pausedAt = monotonicNanoseconds()
        self.pausedAt = pausedAt
        let pausedAtWall = realtimeNanoseconds()
        // Who runs the guest decides what a failure does to the source:
        // before SWITCHOVER went out only the source can (resume it); once
        // postcopyd answered, the destination does (never resume it); in
        // between, and when the connection is lost, it is not known until
        // the agent rejoins (never resume it either: two running copies of
        // one guest are worse than a paused one).
        var owner = GuestOwner.source
        // Set up before pausing: a pause that fails half-way (the process
        // stopped, then a hook failed) must let the source run again too.
        defer {
            switch owner {
            case .source:
                logger.warning("switchover failed before the destination resumed: resuming the source")
                do { try config.control.resume() } catch { logger.error("could not resume the source: \(error)") }
            case .unknown:
                logger.error("switchover was interrupted after SWITCHOVER went out and postcopyd could not be reached again: the guest may be running on the destination, so the source stays paused. Check the destination (postcopyctl status, journalctl -u postcopyd@...) before resuming or discarding the source.")
            case .destination:
                break
            }
        }
        try inStep("pause the source (\(config.control.description))") { try config.control.pause() }
        let alsoDirty = try config.dirtyBitmapPath.map { try readDirtyBitmap($0, pages: scanner.pageCount) }
        let stale = try finalScan(scanner, log: log, alsoDirty: alsoDirty)
        summary.stalePages = stale.popCount
        for frame in stale.dirtyBitmapMessages() {
            try bulk.send(frame)
            if case let .dirtyBitmap(_, _, words) = frame { summary.bytesSent += UInt64(36 + 8 * words.count) }
        }
        owner = .unknown
        do {
            try bulk.send(.switchover(stalePages: stale.popCount, sourcePausedAtNanos: pausedAtWall,
                                      handOver: config.control.handOverStartsGuest))
            switch try next(on: bulk, "at switchover") {
            case let .resumed(resumedAtWall):
                owner = .destination
                summary.downtimeMs = Double(monotonicNanoseconds() - pausedAt) / 1e6
                summary.downtimeByClocksMs = resumedAtWall >= pausedAtWall ? Double(resumedAtWall - pausedAtWall) / 1e6 : 0
            case let other:
                owner = .source
                throw MigrationError(.unexpectedMessage, "expected RESUMED from postcopyd, got \(other.type)")
            }
        } catch let error as MigrationError {
            // postcopyd refused switchover (ERROR): it did not resume the guest.
            owner = .source
            throw error
        } catch {
            guard let lost = Self.connectionLoss(error) else { throw error }
            logger.warning("lost postcopyd at switchover: \(lost.reason); rejoining to learn whether the guest runs there")
            connections.shutdown()
            let (rejoined, stillStale) = try rejoin()
            owner = .destination
            summary.downtimeMs = Double(monotonicNanoseconds() - pausedAt) / 1e6
            logger.info("switchover: \(stale.popCount) stale pages, downtime \(fixed(summary.downtimeMs, 1)) ms (by this host's clock, including the rejoin)")
            return (stillStale, rejoined)
        }
        logger.info("switchover: \(stale.popCount) stale pages, downtime \(fixed(summary.downtimeMs, 1)) ms (final scan \(fixed(summary.finalScanMs, 1)) ms, \(summary.dirtyLog))")
        return (stale, connections)
    }

    /// The final scan, with the source paused: the pages the destination
    /// must fetch. With uffd-wp one scan of the log; with hashing, a hash
    /// of every page, which also gives the digest. With
    /// `--verify-dirty-log`, a change the log missed fails the switchover
    /// here, before SWITCHOVER, so the source resumes.
    private func finalScan(_ scanner: PageScanner, log: UffdWriteLog?, alsoDirty: PageBitmap?) throws -> PageBitmap {
        var log = log
        let scanStarted = monotonicNanoseconds()
        if var written = scanWritten(&log, scanner, paused: true) {
            summary.finalScanMs = Double(monotonicNanoseconds() - scanStarted) / 1e6
            try checkAudit()
            if let alsoDirty { written.formUnion(alsoDirty) }
            return written
        }
        // Hashing finds the pages precopy left by itself (their hashes are
        // not those sent); one that holds what was last sent, though never
        // looked at again, is as good as sent.
        let (stale, digest) = scanner.finalScan(alsoDirty: alsoDirty)
        summary.finalScanMs = Double(monotonicNanoseconds() - scanStarted) / 1e6
        notices.known(digest)
        return stale
    }

    /// Who runs the guest while switchover is under way (see `switchover`).
    private enum GuestOwner { case source, unknown, destination }

    private func readDirtyBitmap(_ path: String, pages: UInt64) throws -> PageBitmap {
        let words = Int((pages + 63) / 64)
        let bytes = try inStep("read the dirty bitmap \(path)") { try readFileBytes(path) }
        guard bytes.count == words * 8 else {
            throw MigrationError(.incompatible, "dirty bitmap \(path) is \(bytes.count) bytes; \(pages) pages need \(words * 8)")
        }
        guard let bitmap = PageBitmap(littleEndianBytes: bytes, count: pages) else {
            throw MigrationError(.incompatible, "dirty bitmap \(path) sets bits past page \(pages)")
        }
        return bitmap
    }

    // MARK: postcopy

    /// Serves postcopy until postcopyd says COMPLETE, rejoining it each time
    /// the connections are lost; `stale` is what the destination lacks.
    private func postcopy(stale: PageBitmap, connections: AgentConnections) throws {
        let started = monotonicNanoseconds()
        notices.use(connections.control)
        var connections = connections
        var pending = stale
        let lanes = BackgroundLane.lanes(config.streams, bytesPerSecond: config.postcopyBytesPerSecond, now: started)
        while true {
            do {
                try serve(pending, connections, started: started, lanes: lanes)
                break
            } catch {
                guard let lost = Self.connectionLoss(error) else { throw error }
                progress.finish()
                // postcopyd may have discarded its copy on its own (its VMM
                // left before the hand-over started the guest), said so and
                // closed: a send then fails before the ERROR is read, and a
                // daemon that has exited cannot be asked again. Any other
                // ERROR (a refused frame pauses postcopy) is for a rejoin.
                if let reason = Self.reasonGiven(on: connections.control), reason.code == .discarded { throw reason }
                logger.warning("lost postcopyd during postcopy: \(lost.reason); rejoining")
                connections.shutdown()
                let (rejoined, stillStale) = try rejoin()
                connections = rejoined
                notices.use(rejoined.control)
                pending = stillStale
            }
        }
        let (pages, bytes) = lanes.reduce((UInt64(0), UInt64(0))) {
            ($0.0 + $1.pages.load(ordering: .relaxed), $0.1 + $1.bytes.load(ordering: .relaxed))
        }
        summary.postcopySeconds = Double(monotonicNanoseconds() - started) / 1e9
        summary.postcopyPagesBackground = pages
        summary.postcopyPagesUrgent = urgentPages.load(ordering: .relaxed)
        summary.postcopyPagesResent = resentPages.load(ordering: .relaxed)
        summary.pageRequests = requests.load(ordering: .relaxed)
        summary.bytesSent += bytes
        summary.backgroundMiBPerSecond = Double(pages * 4096) / max(summary.postcopySeconds, 1e-9) / 1_048_576
    }

    /// One connection generation's postcopy: requests answered on the
    /// urgent connection at normal priority, `pending` pushed over the bulk
    /// streams, each stream's share (`StreamPartition`) by a thread of its
    /// own at `backgroundScheduling` (`push-background` for bulk stream 0,
    /// `push-bulk-N` for the others), then COMPLETE awaited on bulk stream
    /// 0. Threads are made per generation, from this thread (normal
    /// priority): a thread inherits its creator's scheduling, and one moved
    /// to SCHED_IDLE may not come back. The first sender to fail shuts
    /// every bulk stream down, so that the others stop too, and the urgent
    /// connection for sending: postcopyd sends its ERROR on every
    /// connection before it closes them (when it discards its copy, say),
    /// and the urgent thread, still reading, is given a moment to read it
    /// (`urgentGraceNanos`). A reason postcopyd gave outranks the lost
    /// connection that showed it first.
    private func serve(_ pending: PageBitmap, _ connections: AgentConnections, started: UInt64,
                       lanes: [BackgroundLane]) throws {
        let queue = PostcopySendQueue(stale: pending, partition: StreamPartition(streams: config.streams))
        let failure = Locked<(any Error)?>(nil)
        let failed: @Sendable (any Error) -> Void = { error in
            failure.withLock { first in
                if first == nil || (Self.connectionLoss(first!) != nil && Self.connectionLoss(error) == nil) {
                    first = error
                }
            }
            connections.shutdown(keepingReadable: true)
        }
        let urgentEnded = Atomic<Bool>(false)
        let urgentThread = try OSThread.start(name: "push-urgent") { [self] in
            do {
                try serveRequests(connections.urgent, queue: queue)
            } catch {
                failed(error)
            }
            urgentEnded.store(true, ordering: .sequentiallyConsistent)
        }
        defer {
            connections.urgent.shutdown()
            urgentThread.join()
        }
        var senders: [OSThread] = []
        defer { for sender in senders { sender.join() } }
        for (index, stream) in connections.bulk.enumerated() {
            let name = index == 0 ? "push-background" : "push-bulk-\(index)"
            do {
                senders.append(try OSThread.start(name: name) { [self] in
                    do {
                        try sendBackground(queue, stream: index, on: stream, lanes: lanes, started: started)
                    } catch {
                        failed(error)
                    }
                })
            } catch {
                failed(error)
                break
            }
        }
        for sender in senders { sender.join() }
        senders = []
        // After a failure, the urgent thread's moment to read postcopyd's
        // reason before its connection is shut; then the failure to throw.
        func settled() -> (any Error)? {
            guard failure.withLock({ $0 }) != nil else { return nil }
            let deadline = monotonicNanoseconds() + Self.urgentGraceNanos
            while !urgentEnded.load(ordering: .sequentiallyConsistent) && monotonicNanoseconds() < deadline {
                sleepNanoseconds(10_000_000)
            }
            return failure.withLock { $0 }
        }
        if let first = settled() { throw first }
        do {
            try awaitComplete(connections.control)
        } catch {
            failed(error)
            throw settled() ?? error
        }
    }

    /// Bulk stream `stream`'s share of the back-fill, on `bulk`, at
    /// `backgroundScheduling` and at most its share of the postcopy
    /// bandwidth. Bulk stream 0's sender keeps the progress line.
    private func sendBackground(_ queue: PostcopySendQueue, stream: Int, on bulk: MessageStream,
                                lanes: [BackgroundLane], started: UInt64) throws {
        do {
            try OSThread.setCurrentScheduling(config.backgroundScheduling)
        } catch {
            logger.warning("the background stream keeps its scheduling: \(error)")
        }
        let lane = lanes[stream]
        let total = Double(max(queue.remaining, 1))
        while let run = queue.takeNext(maxPages: UInt64(config.batchPages), stream: stream) {
            let bytes = try send(run, requestID: Message.backgroundRequestID, on: bulk)
            lane.bytes.add(bytes, ordering: .relaxed)
            lane.pages.add(run.count, ordering: .relaxed)
            if let wait = lane.pacer?.sent(bytes, now: monotonicNanoseconds()), wait > 0 {
                sleepNanoseconds(wait)
            }
            guard stream == 0 else { continue }
            let left = queue.remaining
            let sent = lanes.reduce(0) { $0 + $1.bytes.load(ordering: .relaxed) }
            progress.update("postcopy \(ProgressReporter.bar(1 - Double(left) / total)) \(left) stale pages left, \(ProgressReporter.rate(bytes: sent, since: started)), \(requests.load(ordering: .relaxed)) requests")
        }
        if stream == 0 { progress.finish() }
    }

    private func awaitComplete(_ bulk: MessageStream) throws {
        switch try next(on: bulk, "during postcopy") {
        case let .complete(_, clean, staleFaults):
            summary.destinationFaultsClean = clean
            summary.destinationFaultsStale = staleFaults
            logger.info("postcopyd reports the migration complete")
        case let other:
            throw MigrationError(.unexpectedMessage, "expected COMPLETE from postcopyd, got \(other.type)")
        }
    }

    /// Answers each PAGE_REQUEST with every stale page it names, those a
    /// background sender took already included (`PostcopySendQueue.answer`).
    private func serveRequests(_ urgent: MessageStream, queue: PostcopySendQueue) throws {
        let limits = RegionLimits(smallPageCount: image.smallPageCount)
        while true {
            let message = try next(on: urgent, "on the urgent connection during postcopy")
            switch message {
            case let .pageRequest(requestID, firstPage, count):
                do throws(ProtocolError) {
                    try message.validate(against: limits)
                } catch {
                    urgent.fail(error.code, error.description)
                    throw MigrationError(error.code, "refused a PAGE_REQUEST from postcopyd", cause: error)
                }
                requests.add(1, ordering: .relaxed)
                let answer = queue.answer(PageRun(first: firstPage, count: UInt64(count)))
                // Counted when taken, before the sends: a send that fails
                // part-way (the connection shut at completion) must not
                // leave pages that went out uncounted.
                urgentPages.add(answer.takenPages, ordering: .relaxed)
                resentPages.add(answer.resentPages, ordering: .relaxed)
                for run in answer.runs {
                    urgentBytes.add(try send(run, requestID: requestID, on: urgent), ordering: .relaxed)
                }
            default:
                throw MigrationError(.unexpectedMessage, "unexpected \(message.type) on the urgent connection")
            }
        }
    }

    /// How long a failed postcopy generation waits for the urgent thread to
    /// read postcopyd's ERROR (or the end of the connection) by itself.
    static let urgentGraceNanos: UInt64 = 500_000_000

    // MARK: rejoining

    /// How long a rejoin tries to deliver DISCARD after a failed hand-over.
    static let discardRejoinNanos: UInt64 = 10_000_000_000

    /// Connects again, every connection with a resuming HELLO, retrying
    /// with backoff until `reconnectTimeoutNanos`; returns them and the
    /// pages postcopyd still lacks (its resync, on bulk stream 0). An ERROR
    /// from postcopyd (the migration failed, or there is nothing to
    /// resume) ends it.
    private func rejoin() throws -> (connections: AgentConnections, stale: PageBitmap) {
        let started = monotonicNanoseconds()
        let deadline = started + config.reconnectTimeoutNanos
        var delay = config.reconnectInitialDelayNanos
        var attempt = 0
        while true {
            attempt += 1
            do {
                let connections = try connectAll(resume: true)
                do {
                    let stale = try receiveResync(connections.control)
                    summary.rejoins += 1
                    logger.notice("rejoined postcopyd at \(config.daemon) after \(fixed(Double(monotonicNanoseconds() - started) / 1e6, 0)) ms (\(attempt) attempts): \(stale.popCount) pages still stale")
                    return (connections, stale)
                } catch {
                    connections.shutdown()
                    throw error
                }
            } catch {
                guard let lost = Self.connectionLoss(error) else { throw error }
                let now = monotonicNanoseconds()
                // Once the hand-over failed, the source runs the guest again
                // and a rejoin only delivers DISCARD: worth a short while,
                // not the reconnect timeout.
                if notices.discarding && now + delay >= started + Self.discardRejoinNanos {
                    throw MigrationError(.peerLost, cause: lost) { last in
                        "could not rejoin postcopyd at \(config.daemon) within \(Self.discardRejoinNanos / 1_000_000_000) s to tell it (\(attempt) attempts\(last.map { "; last: \($0)" } ?? ""))"
                    }
                }
                guard now + delay < deadline else {
                    throw MigrationError(.peerLost, cause: lost) { last in
                        "could not rejoin postcopyd at \(config.daemon) within \(config.reconnectTimeoutNanos / 1_000_000_000) s (\(attempt) attempts\(last.map { "; last: \($0)" } ?? "")). The source stays paused: the guest runs on the destination and may still need its pages"
                    }
                }
                logger.info("rejoin attempt \(attempt) failed: \(lost.reason); next in \(delay / 1_000_000) ms")
                sleepNanoseconds(delay)
                delay = min(delay * 2, config.reconnectMaxDelayNanos)
            }
        }
    }

    /// DIRTY_BITMAP frames of the pages postcopyd still lacks, then RESYNC.
    private func receiveResync(_ bulk: MessageStream) throws -> PageBitmap {
        let limits = RegionLimits(smallPageCount: image.smallPageCount)
        var assembler = BitmapAssembler(count: image.smallPageCount)
        while true {
            let message = try next(on: bulk, "while rejoining")
            do throws(ProtocolError) {
                try message.validate(against: limits)
            } catch {
                throw MigrationError(error.code, "refused postcopyd's resync", cause: error)
            }
            switch message {
            case let .dirtyBitmap(_, firstWord, words):
                guard assembler.add(firstWord: firstWord, words: words) else {
                    throw MigrationError(.unexpectedMessage, "postcopyd's resync DIRTY_BITMAP frame starts at word \(firstWord), expected word \(assembler.wordsReceived)")
                }
            case let .resync(stalePages):
                guard let stale = assembler.bitmap, stale.popCount == stalePages else {
                    throw MigrationError(.protocolViolation, "postcopyd's resync announces \(stalePages) stale pages after \(assembler.wordsReceived) of \(assembler.wordCount) bitmap words that do not add up to it")
                }
                return stale
            default:
                throw MigrationError(.unexpectedMessage, "expected DIRTY_BITMAP or RESYNC from postcopyd while rejoining, got \(message.type)")
            }
        }
    }

    /// Finishes the digest on a thread of its own (`push-digest`), unless
    /// the final scan already gave it, at `--background-scheduling` (no guest
    /// waits on it), and hands it to the courier, which
    /// sends it to postcopyd: postcopyd completes only once it has it.
    private func startDigest(_ compute: @escaping @Sendable () -> ImageDigest) throws -> OSThread {
        let courier = notices
        let (logger, scheduling) = (logger, config.backgroundScheduling)
        return try OSThread.start(name: "push-digest") {
            guard courier.digest == nil else { return }
            // Hashing is the agent's heaviest work after switchover, and no
            // guest thread waits on it: at normal priority it took the CPU
            // from the urgent path for milliseconds at a time (perf sched).
            do {
                try OSThread.setCurrentScheduling(scheduling)
            } catch {
                logger.warning("the digest thread keeps its scheduling: \(error)")
            }
            let started = monotonicNanoseconds()
            let value = compute()
            courier.known(value)
            logger.info("image digest \(value), hashed in \(fixed(Double(monotonicNanoseconds() - started) / 1e6, 1)) ms after the switchover")
        }
    }

    /// Sends `run` straight from the paused source: PAGES for data, ZERO_PAGES
    /// for pages that are zero now. Returns the bytes sent.
    private func send(_ run: PageRun, requestID: UInt32, on stream: MessageStream) throws -> UInt64 {
        var bytes: UInt64 = 0
        var page = run.first
        while page < run.end {
            let isZero = image.isZero(page)
            var end = page + 1
            while end < run.end && image.isZero(end) == isZero { end += 1 }
            if isZero {
                try stream.send(.zeroPages(firstPage: page, count: UInt32(end - page)))
                bytes += 28
            } else {
                try image.withPages(first: page, count: Int(end - page)) { data in
                    try stream.sendPages(requestID: requestID, firstPage: page, pageData: data)
                }
                bytes += (end - page) * 4096 + 32
            }
            page = end
        }
        return bytes
    }
}

/// The connection to postcopyd is gone (closed, reset, or silent past the
/// dead-peer timeout): during postcopy the agent rejoins. It keeps the
/// error that showed it (a reset, a timeout: the errno), if any, as its
/// cause.
struct ConnectionLost: ExplainedError {
    let explanation: Explanation
    init(_ explanation: Explanation) { self.explanation = explanation }
}

/// What the agent tells postcopyd on the bulk connection once the guest's
/// memory has resumed: the image digest, and how the hand-over ended
/// (HANDED_OVER or DISCARD). Each may be known before or after postcopy
/// starts, and the connections may be replaced by a rejoin in between;
/// what is known goes out on the bulk connection of the moment, and again
/// on every new one (postcopyd accepts each twice).
final class ResumedNotices: Sendable {
    private struct State {
        var digest: ImageDigest?
        var handOver: Message?
        var bulk: MessageStream?
        var messages: [Message] { [digest.map { .imageDigest($0) }, handOver].compactMap { $0 } }
    }
    private let state = Locked(State())

    var digest: ImageDigest? { state.withLock { $0.digest } }

    /// The hand-over failed: the source runs the guest again, and DISCARD
    /// is what postcopyd must hear.
    var discarding: Bool {
        state.withLock { state in
            if case .discard? = state.handOver { return true }
            return false
        }
    }

    /// The digest is known: sent at once if a connection is in use.
    func known(_ digest: ImageDigest) {
        let bulk = state.withLock { state -> MessageStream? in
            state.digest = digest
            return state.bulk
        }
        if let bulk { send([.imageDigest(digest)], on: bulk) }
    }

    /// The hand-over is done: the guest runs on the destination.
    func handedOver() { settle(.handedOver) }

    /// The hand-over failed and the source runs the guest again.
    func discard(_ reason: String) { settle(.discard(reason: reason)) }

    private func settle(_ message: Message) {
        let bulk = state.withLock { state -> MessageStream? in
            state.handOver = message
            return state.bulk
        }
        if let bulk { send([message], on: bulk) }
    }

    /// `bulk` is the connection postcopy now runs on: what is known goes
    /// there at once.
    func use(_ bulk: MessageStream) {
        let messages = state.withLock { state -> [Message] in
            state.bulk = bulk
            return state.messages
        }
        send(messages, on: bulk)
    }

    /// A send that fails may have left part of a frame behind: the
    /// connection is shut down, so that postcopy finds it lost and rejoins.
    private func send(_ messages: [Message], on bulk: MessageStream) {
        do {
            for message in messages { try bulk.send(message) }
        } catch {
            bulk.shutdown()
        }
    }
}
