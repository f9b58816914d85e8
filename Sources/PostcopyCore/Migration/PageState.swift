/// The page-state record: what a restarted postcopyd needs to take a
/// migration over from one that died during postcopy.
///
/// It lives in a small shared file (a memfd) that outlives the daemon,
/// because the VMM and systemd's file-descriptor store keep it open. It has
/// two parts:
///
/// - a header of `PageStateHeader.bytes`, written once at switchover, before
///   the guest is resumed. It holds what the agent and the VMM agreed on:
///   the migration, the geometry, where the guest maps RAM, the digest of
///   the migration secret, and the switchover figures. A CRC32C makes a torn
///   or foreign header unusable. (The image digest is not in it: the source
///   sends it after the guest resumed, and again to a restarted daemon when
///   it rejoins.)
/// - from `PageStateLayout.bitmapOffset`, the stale bitmap: one bit per
///   4 KiB page, stored as 64-bit words in native byte order. It is shared
///   memory only processes on this host read.
/// - at `PageStateLayout.milestonesOffset`, outside the checksum, one
///   64-bit word of `PageStateMilestones`: how far the migration got past
///   switchover (the VMM acknowledged VMM_RESUME; the hand-over is done).
///   Bits are only ever added, each with one aligned 8-byte store.
///
/// **The invariant.** A page the guest may already have written is never
/// overwritten. The daemon writes a stale page's bytes through the alias,
/// then clears its bit here, and only then CONTINUEs it into the guest.
/// Clearing a bit is one aligned 8-byte store, which a process's death
/// cannot tear. So a bit that is clear means the page's bytes are complete.
/// A bit that is set means the guest has never mapped the page, so fetching
/// it again is safe. A record whose header does not check out is "unknown"
/// as a whole. The only conservative path then is to refuse to take over:
/// guessing could either CONTINUE an old page or overwrite a guest write.
public struct PageStateHeader: Equatable, Sendable {
    public static let magic: [UInt8] = Array("PCDPAGES".utf8)
    /// 4: the milestones word (3: no image digest; 2 added the digest of
    /// the migration secret).
    public static let version: UInt32 = 4
    /// Bytes the header's fields and checksum take; the rest of the header
    /// page is zero.
    public static let bytes = 124
    /// Where the checksum is: it covers every byte before it.
    static let checksumOffset = bytes - 4

    public var migrationID: MigrationID
    public var geometry: PageGeometry
    /// Where the guest's mapping of RAM starts, in the VMM's address space.
    public var guestBase: UInt64
    /// The VMM's userfaultfd features and register mode (VMM_ATTACH).
    public var features: UffdFeatures
    public var registerMode: UInt64
    public var stalePagesAtSwitchover: UInt64
    /// The source's clock when it paused the guest (SWITCHOVER).
    public var sourcePausedAtNanos: UInt64
    /// How long the guest was paused at switchover, in microseconds.
    public var downtimeMicros: UInt64
    /// The digest of the migration's secret: a restarted daemon admits only
    /// the agent that holds it.
    public var secretDigest: SecretDigest

    public init(migrationID: MigrationID, geometry: PageGeometry, guestBase: UInt64, features: UffdFeatures,
                registerMode: UInt64, stalePagesAtSwitchover: UInt64,
                sourcePausedAtNanos: UInt64, downtimeMicros: UInt64 = 0, secretDigest: SecretDigest) {
        self.migrationID = migrationID
        self.geometry = geometry
        self.guestBase = guestBase
        self.features = features
        self.registerMode = registerMode
        self.stalePagesAtSwitchover = stalePagesAtSwitchover
        self.sourcePausedAtNanos = sourcePausedAtNanos
        self.downtimeMicros = downtimeMicros
        self.secretDigest = secretDigest
    }

    /// The header's bytes, checksum last.
    public var encoded: [UInt8] {
        var out = PageStateHeader.magic
        out.appendLittleEndian(PageStateHeader.version)
        out.appendLittleEndian(UInt32(geometry.pageSize.bytes))
        out.appendLittleEndian(geometry.regionSize)
        out.appendLittleEndian(guestBase)
        out.appendLittleEndian(features.rawValue)
        out.appendLittleEndian(registerMode)
        out.appendLittleEndian(stalePagesAtSwitchover)
        out.appendLittleEndian(sourcePausedAtNanos)
        out.appendLittleEndian(downtimeMicros)
        out.append(contentsOf: migrationID.bytes)
        out.append(contentsOf: secretDigest.bytes)
        out.appendLittleEndian(CRC32C.checksum(out))
        return out
    }

    /// Reads a header; refuses anything that is not one this version wrote
    /// whole.
    public init(decoding bytes: ArraySlice<UInt8>) throws(PageStateError) {
        guard bytes.count >= PageStateHeader.bytes else { throw .truncated(bytes: bytes.count) }
        let header = Array(bytes.prefix(PageStateHeader.bytes))
        guard Array(header[0..<8]) == PageStateHeader.magic else { throw .notAPageStateRecord }
        let fields = header[...]
        let version: UInt32 = fields.loadLittleEndian(at: 8)
        guard version == PageStateHeader.version else { throw .unsupportedVersion(version) }
        let stored: UInt32 = fields.loadLittleEndian(at: PageStateHeader.checksumOffset)
        let computed = CRC32C.checksum(Array(header[0..<PageStateHeader.checksumOffset]))
        guard stored == computed else { throw .checksumMismatch(stored: stored, computed: computed) }
        let pageBytes: UInt32 = fields.loadLittleEndian(at: 12)
        guard let pageSize = PageSize(bytes: UInt64(pageBytes)) else { throw .invalidGeometry("page size \(pageBytes)") }
        do {
            geometry = try PageGeometry(regionSize: fields.loadLittleEndian(at: 16), pageSize: pageSize)
        } catch {
            throw .invalidGeometry("\(error)")
        }
        guestBase = fields.loadLittleEndian(at: 24)
        features = UffdFeatures(rawValue: fields.loadLittleEndian(at: 32))
        registerMode = fields.loadLittleEndian(at: 40)
        stalePagesAtSwitchover = fields.loadLittleEndian(at: 48)
        sourcePausedAtNanos = fields.loadLittleEndian(at: 56)
        downtimeMicros = fields.loadLittleEndian(at: 64)
        // The checksum covers them: they are exactly 16 and 32 bytes here.
        migrationID = MigrationID(bytes: Array(header[72..<88]))!
        secretDigest = SecretDigest(bytes: Array(header[88..<120]))!
    }
}

/// Why a page-state record cannot be used.
public enum PageStateError: Error, Equatable, CustomStringConvertible {
    case truncated(bytes: Int)
    case notAPageStateRecord
    case unsupportedVersion(UInt32)
    case checksumMismatch(stored: UInt32, computed: UInt32)
    case invalidGeometry(String)
    case sizeMismatch(fileBytes: UInt64, expected: UInt64)

    public var description: String {
        switch self {
        case let .truncated(bytes): return "the page-state record is \(bytes) bytes, shorter than its header"
        case .notAPageStateRecord: return "not a postcopyd page-state record (wrong magic)"
        case let .unsupportedVersion(version): return "page-state record version \(version); this postcopyd reads \(PageStateHeader.version)"
        case let .checksumMismatch(stored, computed):
            return "the page-state header's checksum is 0x\(String(stored, radix: 16)), its bytes give 0x\(String(computed, radix: 16))"
        case let .invalidGeometry(reason): return "the page-state header names no valid guest RAM: \(reason)"
        case let .sizeMismatch(fileBytes, expected):
            return "the page-state file is \(fileBytes) bytes; its header's region needs \(expected)"
        }
    }
}

/// How far a migration got past switchover, as its page-state record keeps
/// it for a restarted daemon: which side may run the guest.
public struct PageStateMilestones: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// The switchover said a hand-over starts the guest (SWITCHOVER's
    /// `handOver`): until `handedOver`, the source may still resume.
    public static let handOverPending = PageStateMilestones(rawValue: 1 << 0)
    /// The VMM acknowledged VMM_RESUME (VMM_RESUMED): it holds the range and
    /// the record, and runs the guest or will.
    public static let vmmResumed = PageStateMilestones(rawValue: 1 << 1)
    /// The agent said HANDED_OVER: the point of no return has passed.
    public static let handedOver = PageStateMilestones(rawValue: 1 << 2)

    /// Bits this version defines.
    public static let known: PageStateMilestones = [.handOverPending, .vmmResumed, .handedOver]

    /// Whether the guest may already run on the destination: the VMM holds
    /// it, with no hand-over left that could still fail.
    public var pointOfNoReturnPassed: Bool {
        contains(.vmmResumed) && (!contains(.handOverPending) || contains(.handedOver))
    }

    public var description: String {
        var names: [String] = []
        if contains(.handOverPending) { names.append("hand-over pending") }
        if contains(.vmmResumed) { names.append("VMM resumed") }
        if contains(.handedOver) { names.append("handed over") }
        return names.isEmpty ? "none" : names.joined(separator: ", ")
    }
}

/// Where things are in the page-state file.
public enum PageStateLayout {
    /// The milestones word: in the header page, after the header.
    public static let milestonesOffset = 128
    /// The bitmap starts on the second 4 KiB page: the header has a page of its own.
    public static let bitmapOffset = 4096

    /// The file's size for `geometry`: the header page and the bitmap,
    /// rounded up to whole 4 KiB pages.
    public static func fileBytes(for geometry: PageGeometry) -> UInt64 {
        let bitmapBytes = (geometry.smallPageCount + 63) / 64 * 8
        return UInt64(bitmapOffset) + (bitmapBytes + 4095) / 4096 * 4096
    }
}

/// The stale bitmap of a page-state record, in place: a view of its words
/// in memory the caller keeps mapped. `markFresh` may be called from any
/// number of threads at once (each word changes with one atomic
/// operation); `store` and `load` only while no thread changes it.
public struct PageStateBitmap: @unchecked Sendable {
    // SAFETY (@unchecked): the words are shared memory, touched only by
    // atomic operations; `store` and `load` run before and after postcopy
    // changes them. Readers are later processes.
    /// The words, every access atomic.
    public let words: AtomicPageBitmap
    public var count: UInt64 { words.count }

    /// A view of `count` bits at `words`, which must hold (count+63)/64
    /// 8-byte aligned words and stay mapped while the view is used.
    public init(words: UnsafeMutableRawPointer, count: UInt64) {
        self.words = AtomicPageBitmap(viewing: words, count: count)
    }

    /// Writes `bitmap` over the record.
    public func store(_ bitmap: PageBitmap) {
        precondition(bitmap.count == count, "a bitmap of \(bitmap.count) bits for a record of \(count)")
        words.store(bitmap)
    }

    /// The record's bitmap, copied out; nil when bits past `count` are set
    /// (the record is not one this version wrote).
    public func load() -> PageBitmap? {
        PageBitmap(words: words.wordValues(), count: count)
    }

    /// Clears the bits of `run`: its pages are written and may be installed.
    /// Each word changes with one atomic operation, so receivers clearing
    /// neighbouring runs at once lose none of each other's bits.
    public func markFresh(_ run: PageRun) {
        precondition(run.end <= count, "\(run) outside a record of \(count) pages")
        words.remove(run)
    }
}
