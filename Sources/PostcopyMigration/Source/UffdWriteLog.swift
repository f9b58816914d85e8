import Glibc
import PostcopyCore
import PostcopyOS

/// The source VMM's write log as the agent reads it: the VMM registered its
/// RAM mapping for asynchronous write-protect (`WriteTracking`), and the
/// agent scans that mapping through `/proc/PID/pagemap` (`PagemapScan`).
/// Each scan reports the pages written since the one before and protects
/// them again in the same walk.
///
/// Why no write is lost: a scan protects a page before the agent reads it.
/// A write that lands after the protection lifts it again, so the next scan
/// reports the page, whether or not the read saw the write. A write before
/// the protection is in this scan's report. See docs/architecture.md,
/// "Dirty tracking on the source".
final class UffdWriteLog: @unchecked Sendable {
    // SAFETY (@unchecked): used by the agent's caller thread only.
    let scan: PagemapScan
    let pageCount: UInt64

    private init(scan: PagemapScan, pageCount: UInt64) {
        self.scan = scan
        self.pageCount = pageCount
    }

    /// Asks the source VMM on `socketPath` for its tracked mapping, checks
    /// that it maps `image`'s file whole, and arms the log with a first scan
    /// (which protects every page). Throws `DirtyLogUnavailable` with the
    /// reason when any step says no.
    static func connect(socketPath: String, image: SourceImage) throws(DirtyLogUnavailable) -> UffdWriteLog {
        let connection: UnixConnection
        do {
            connection = try UnixConnection.connect(path: socketPath)
        } catch {
            throw DirtyLogUnavailable("the source VMM's dirty-log socket \(socketPath) does not answer", cause: error)
        }
        let peer: PeerCredentials
        do { peer = try connection.peerCredentials() } catch { throw DirtyLogUnavailable(cause: error) }
        guard peer.uid == 0 || peer.uid == geteuid() || peer.uid == image.owner else {
            throw DirtyLogUnavailable("the process on \(socketPath) (\(peer)) is neither root, nor this user, nor the owner of \(image.path)")
        }
        let offer: SourceTrackingOffer
        do {
            try connection.setReceiveTimeout(5_000_000_000)
            var bytes: [UInt8] = []
            while bytes.count <= SourceTrackingOffer.maxSize {
                let part = try connection.receive(capacity: SourceTrackingOffer.maxSize + 1 - bytes.count).bytes
                if part.isEmpty { break }
                bytes += part
            }
            offer = try SourceTrackingOffer(decoding: bytes)
        } catch {
            throw DirtyLogUnavailable("no offer from the source VMM on \(socketPath)", cause: error)
        }
        guard case let .armed(address, length) = offer else {
            if case let .unavailable(reason) = offer { throw DirtyLogUnavailable("the source VMM (pid \(peer.pid)) did not register its RAM: \(reason)") }
            throw DirtyLogUnavailable("\(offer)")
        }
        guard length == image.size else {
            throw DirtyLogUnavailable("the source VMM (pid \(peer.pid)) tracks \(length) bytes; \(image.path) has \(image.size)")
        }
        let mapping = TrackedMapping(address: address, length: length)
        let maps = readTextFile("/proc/\(peer.pid)/maps") ?? ""
        guard let entry = ProcMapsEntry.entry(at: address, in: maps), entry.end == mapping.end,
              entry.shared, entry.offset == 0, entry.device == image.device, entry.inode == image.inode else {
            throw DirtyLogUnavailable("pid \(peer.pid) has no shared mapping of \(image.path) (inode \(image.inode)) at \(mapping), whole and from offset 0, in /proc/\(peer.pid)/maps")
        }
        let log: UffdWriteLog
        do {
            log = UffdWriteLog(scan: try PagemapScan(pid: peer.pid, mapping: mapping), pageCount: image.smallPageCount)
        } catch {
            throw DirtyLogUnavailable("no permission to read the source VMM's page tables", cause: error)
        }
        do {
            _ = try log.written()
        } catch {
            let why = [Errno.invalid, Errno(ENOTTY)].contains(error.errno)
                ? "this kernel has no PAGEMAP_SCAN (Linux ≥ 6.7)"
                : error.errno == Errno(EPERM) ? "the mapping is not registered for asynchronous write-protect" : ""
            throw DirtyLogUnavailable(cause: error) { cause in
                ["the first scan failed", cause, why.isEmpty ? nil : why].compactMap { $0 }.joined(separator: ": ")
            }
        }
        return log
    }

    /// The pages written since the last scan, protected again unless this
    /// is the last scan (`protect` false: the source is paused for good).
    func written(protect: Bool = true) throws(SystemCallError) -> PageBitmap {
        try scan.scanWritten(pageCount: pageCount, protect: protect)
    }

    var description: String { "uffd-wp (pid \(scan.pid), \(scan.mapping))" }
}

/// Why the agent cannot use the source's write log; the error that showed
/// it, if any, is its cause.
struct DirtyLogUnavailable: ExplainedError {
    let explanation: Explanation
    init(_ explanation: Explanation) { self.explanation = explanation }
}
