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

    public init(_ description: String, pause: @escaping @Sendable () throws -> Void,
                resume: @escaping @Sendable () throws -> Void) {
        self.description = description
        self.pause = pause
        self.resume = resume
    }
}

public struct AgentConfig: Sendable {
    /// The source's guest RAM file.
    public var ramPath: String
    public var daemon: SocketEndpoint
    public var migrationID: MigrationID
    public var policy = PrecopyPolicy()
    public var control: SourceControl
    /// Read at switchover: a dirty log the caller kept (one bit per 4 KiB
    /// page, little-endian 64-bit words), merged with the hash scan.
    public var dirtyBitmapPath: String?
    /// Pages per PAGES frame.
    public var batchPages = 256
    /// The background stream's limit during postcopy, bytes per second
    /// (nil: as fast as the link goes). Pages a fault waits for are never
    /// held back by it.
    public var postcopyBytesPerSecond: UInt64?
    /// How the thread that sends the background stream competes for a CPU
    /// during postcopy; precopy runs at normal priority.
    public var backgroundScheduling = OSThread.SchedulingClass.idle
    public var keepAlive = KeepAlive()

    public init(ramPath: String, daemon: SocketEndpoint, migrationID: MigrationID, control: SourceControl) {
        self.ramPath = ramPath
        self.daemon = daemon
        self.migrationID = migrationID
        self.control = control
    }
}

/// The source side of one migration: precopy rounds driven by a hash scan,
/// switchover, then postcopy serving requests and pushing the rest.
public final class SourceAgent: @unchecked Sendable {
    // SAFETY (@unchecked): `summary` is written by the calling thread only,
    // before the urgent thread starts and after it is joined; counters the
    // urgent thread updates are atomics.
    public let config: AgentConfig
    private let logger: Logger
    private let progress: ProgressReporter
    private let image: SourceImage
    private var summary = AgentSummary()
    private let urgentPages = Atomic<UInt64>(0)
    private let requests = Atomic<UInt64>(0)
    private let urgentBytes = Atomic<UInt64>(0)

    public init(config: AgentConfig, logger: Logger, progress: ProgressReporter) throws {
        self.config = config
        self.logger = logger
        self.progress = progress
        image = try inStep("open the source RAM file") { try SourceImage(path: config.ramPath) }
        summary.migrationID = config.migrationID.description
        summary.regionBytes = image.size
    }

    public func run() throws -> AgentSummary {
        let started = monotonicNanoseconds()
        let bulk = try connect(.bulk)
        let urgent = try connect(.urgent)
        defer {
            bulk.shutdown()
            urgent.shutdown()
        }
        let scanner = PageScanner(image: image, batchPages: config.batchPages)
        try precopy(scanner, bulk)
        let (stale, zero) = try switchover(scanner, bulk)
        try postcopy(stale: stale, zero: zero, bulk: bulk, urgent: urgent)
        summary.totalSeconds = Double(monotonicNanoseconds() - started) / 1e9
        summary.idealBytes = (scanner.nonZeroPages() + stale.popCount) * 4096
        summary.bytesSent += urgentBytes.load(ordering: .relaxed)
        return summary
    }

    private func connect(_ role: StreamRole) throws -> MessageStream {
        let connection = try inStep("connect the \(role) connection to postcopyd at \(config.daemon)") {
            try TCPConnection.connect(to: config.daemon, keepAlive: config.keepAlive)
        }
        let stream = MessageStream(connection, peer: "postcopyd \(role) connection")
        try stream.send(.hello(migrationID: config.migrationID, role: role, sourcePageSize: image.pageSize,
                               regionSize: image.size))
        switch try next(on: stream, "during the \(role) connection's handshake") {
        case let .welcome(regionSize, _) where regionSize == image.size:
            return stream
        case let .welcome(regionSize, _):
            throw MigrationError(.incompatible, "the destination region is \(regionSize) bytes, the source's \(image.size)")
        case let other:
            throw MigrationError(.unexpectedMessage, "expected WELCOME from postcopyd, got \(other.type)")
        }
    }

    /// The next message from postcopyd, which must be neither ERROR nor the
    /// end of the stream; `when` says where the migration stands, for errors.
    private func next(on stream: MessageStream, _ when: String) throws -> Message {
        switch try stream.receive() {
        case let .error(code, text)?:
            throw MigrationError(code, "postcopyd failed \(when) (\(code)): \(text)")
        case let message?:
            return message
        case nil:
            throw MigrationError(.peerLost, "postcopyd closed the connection \(when)")
        }
    }

    // MARK: precopy

    private func precopy(_ scanner: PageScanner, _ bulk: MessageStream) throws {
        let started = monotonicNanoseconds()
        var round: UInt32 = 0
        var reason = PrecopyPolicy.Reason.roundLimit
        while true {
            if let limit = config.policy.limitReached(roundsDone: Int(round), elapsedNanos: monotonicNanoseconds() - started) {
                reason = limit
                break
            }
            round += 1
            let roundStarted = monotonicNanoseconds()
            let result = try scanner.sendChangedPages(to: bulk) { page, sofar in
                let fraction = Double(page) / Double(scanner.pageCount)
                progress.update("precopy round \(round) \(ProgressReporter.bar(fraction)) \(ByteSize.format(sofar.bytesSent)) sent, \(ProgressReporter.rate(bytes: sofar.bytesSent, since: roundStarted))")
            }
            let changed = result.pagesSent + result.zeroPagesSent
            try bulk.send(.roundEnd(round: round, pagesSent: result.pagesSent, dirtyPages: changed))
            let seconds = Double(monotonicNanoseconds() - roundStarted) / 1e9
            summary.rounds.append(PrecopyRound(round: round, pagesSent: result.pagesSent,
                                               zeroPagesSent: result.zeroPagesSent, bytesSent: result.bytesSent,
                                               seconds: seconds))
            summary.bytesSent += result.bytesSent
            progress.finish()
            logger.info("precopy round \(round): \(result.pagesSent) pages sent, \(result.zeroPagesSent) zeroed, \(fixed(seconds, 2)) s")
            if round > 1 && config.policy.converged(dirtyPages: changed) {
                reason = .converged
                break
            }
        }
        summary.precopyEndReason = reason.rawValue
        summary.precopySeconds = Double(monotonicNanoseconds() - started) / 1e9
    }

    // MARK: switchover

    private func switchover(_ scanner: PageScanner, _ bulk: MessageStream) throws -> (PageBitmap, PageBitmap) {
        let pausedAt = monotonicNanoseconds()
        let pausedAtWall = realtimeNanoseconds()
        // Set up before pausing: a pause that fails half-way (the process
        // stopped, then a hook failed) must let the source run again too.
        var resumedDestination = false
        defer {
            if !resumedDestination {
                logger.warning("switchover failed before the destination resumed: resuming the source")
                do { try config.control.resume() } catch { logger.error("could not resume the source: \(error)") }
            }
        }
        try inStep("pause the source (\(config.control.description))") { try config.control.pause() }
        let alsoDirty = try config.dirtyBitmapPath.map { try readDirtyBitmap($0, pages: scanner.pageCount) }
        let (stale, zero, digest) = scanner.finalScan(alsoDirty: alsoDirty)
        summary.stalePages = stale.popCount
        summary.imageDigest = digest.description
        let wordsPerFrame = 65_536
        var first = 0
        while first < stale.words.count {
            let end = min(first + wordsPerFrame, stale.words.count)
            try bulk.send(.dirtyBitmap(totalBits: stale.count, firstWord: UInt64(first), words: Array(stale.words[first..<end])))
            summary.bytesSent += UInt64(36 + 8 * (end - first))
            first = end
        }
        try bulk.send(.switchover(stalePages: stale.popCount, sourcePausedAtNanos: pausedAtWall, imageDigest: digest))
        switch try next(on: bulk, "at switchover") {
        case let .resumed(resumedAtWall):
            resumedDestination = true
            summary.downtimeMs = Double(monotonicNanoseconds() - pausedAt) / 1e6
            summary.downtimeByClocksMs = resumedAtWall >= pausedAtWall ? Double(resumedAtWall - pausedAtWall) / 1e6 : 0
        case let other:
            throw MigrationError(.unexpectedMessage, "expected RESUMED from postcopyd, got \(other.type)")
        }
        logger.info("switchover: \(stale.popCount) stale pages, downtime \(fixed(summary.downtimeMs, 1)) ms",
                    metadata: ["digest": "\(digest)"])
        return (stale, zero)
    }

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

    private func postcopy(stale: PageBitmap, zero: PageBitmap, bulk: MessageStream, urgent: MessageStream) throws {
        let started = monotonicNanoseconds()
        let queue = Mutex(PostcopySendQueue(stale: stale))
        let failure = Mutex<(any Error)?>(nil)
        let urgentThread = try OSThread.start(name: "push-urgent") { [self] in
            do {
                try serveRequests(urgent, queue: queue, zero: zero)
            } catch {
                failure.withLock { $0 = $0 ?? error }
                bulk.shutdown()
            }
        }
        defer {
            urgent.shutdown()
            urgentThread.join()
        }
        var backgroundPages: UInt64 = 0
        var backgroundBytes: UInt64 = 0
        var pacer = config.postcopyBytesPerSecond.map { Pacer(bytesPerSecond: $0, now: started) }
        do {
            try OSThread.setCurrentScheduling(config.backgroundScheduling)
        } catch {
            logger.warning("the background stream keeps its scheduling: \(error)")
        }
        do {
            while let run = queue.withLock({ $0.takeNext(maxPages: UInt64(config.batchPages)) }) {
                let bytes = try send(run, requestID: Message.backgroundRequestID, zero: zero, on: bulk)
                backgroundBytes += bytes
                backgroundPages += run.count
                if let wait = pacer?.sent(bytes, now: monotonicNanoseconds()), wait > 0 {
                    sleepNanoseconds(wait)
                }
                let left = queue.withLock { $0.remaining }
                progress.update("postcopy \(ProgressReporter.bar(1 - Double(left) / Double(max(stale.popCount, 1)))) \(left) stale pages left, \(ProgressReporter.rate(bytes: backgroundBytes, since: started)), \(requests.load(ordering: .relaxed)) requests")
            }
            progress.finish()
            try awaitComplete(bulk)
        } catch {
            if let first = failure.withLock({ $0 }) { throw first }
            throw error
        }
        summary.postcopySeconds = Double(monotonicNanoseconds() - started) / 1e9
        summary.postcopyPagesBackground = backgroundPages
        summary.postcopyPagesUrgent = urgentPages.load(ordering: .relaxed)
        summary.pageRequests = requests.load(ordering: .relaxed)
        summary.bytesSent += backgroundBytes
        summary.backgroundMiBPerSecond = Double(backgroundPages * 4096) / max(summary.postcopySeconds, 1e-9) / 1_048_576
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

    /// Answers PAGE_REQUESTs with the pages no sender has taken yet.
    private func serveRequests(_ urgent: MessageStream, queue: borrowing Mutex<PostcopySendQueue>, zero: PageBitmap) throws {
        let limits = RegionLimits(smallPageCount: image.smallPageCount)
        while let message = try urgent.receive() {
            switch message {
            case let .pageRequest(requestID, firstPage, count):
                do throws(ProtocolError) {
                    try message.validate(against: limits)
                } catch {
                    urgent.fail(error.code, error.description)
                    throw MigrationError(error.code, "refused a PAGE_REQUEST from postcopyd: \(error)")
                }
                requests.add(1, ordering: .relaxed)
                let runs = queue.withLock { $0.takeRequested(PageRun(first: firstPage, count: UInt64(count))) }
                for run in runs {
                    urgentBytes.add(try send(run, requestID: requestID, zero: zero, on: urgent), ordering: .relaxed)
                    urgentPages.add(run.count, ordering: .relaxed)
                }
            case .heartbeat:
                continue
            case let .error(code, text):
                throw MigrationError(code, "postcopyd failed (\(code)): \(text)")
            default:
                throw MigrationError(.unexpectedMessage, "unexpected \(message.type) on the urgent connection")
            }
        }
    }

    /// Sends `run` straight from the paused source: PAGES for data, ZERO_PAGES
    /// for pages that are zero now. Returns the bytes sent.
    private func send(_ run: PageRun, requestID: UInt32, zero: PageBitmap, on stream: MessageStream) throws -> UInt64 {
        var bytes: UInt64 = 0
        var page = run.first
        while page < run.end {
            let isZero = zero.contains(page)
            var end = page + 1
            while end < run.end && zero.contains(end) == isZero { end += 1 }
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
