/// One message between the source's agent and postcopyd, on a TCP
/// connection: a frame's type and its decoded payload. (The VMM socket has
/// its own conversation, `VMMMessage`.)
///
/// Page indexes (`firstPage`) count 4 KiB pages from the start of the
/// region, whatever page size backs it. Decoding checks each payload's shape
/// (lengths, counts, defined values); whether pages lie inside the region is
/// checked separately, by `validate(against:)`, which needs the region.
public enum Message: WireMessage, Equatable {
    /// Agent → daemon, first frame on every TCP connection. `secret` binds
    /// the connection to the migration's agent; `resume` says the agent
    /// rejoins a postcopy phase in progress (after a lost connection, or as
    /// a restarted agent) rather than starting a migration. `bulkStreams`:
    /// how many bulk streams the migration has (1 … 8, the same on every
    /// connection of it); `streamIndex`: which of them this connection is
    /// (0 on the urgent connection).
    case hello(migrationID: MigrationID, role: StreamRole, sourcePageSize: PageSize, regionSize: UInt64,
               secret: MigrationSecret, resume: Bool = false, bulkStreams: Int = 1, streamIndex: Int = 0)
    /// Daemon → agent, the answer to HELLO.
    case welcome(regionSize: UInt64, destinationPageSize: PageSize)
    /// Agent → daemon: `data.count / 4096` pages starting at `firstPage`.
    /// `requestID` is 0 for background (precopy) pages, else the id of the
    /// PAGE_REQUEST they answer. A decoded `data` is a slice of the decoder's
    /// buffer, not a copy: drop it before feeding the decoder more bytes, or
    /// the next append copies the buffer.
    case pages(requestID: UInt32, firstPage: UInt64, data: ArraySlice<UInt8>)
    /// Agent → daemon: pages that are now zero on the source.
    case zeroPages(firstPage: UInt64, count: UInt32)
    /// Agent → daemon: the end of a precopy round.
    case roundEnd(round: UInt32, pagesSent: UInt64, dirtyPages: UInt64)
    /// Agent → daemon at switchover: `words` of the stale-page bitmap, from
    /// word `firstWord`; bit `i` of word `w` is page `64 × w + i`.
    case dirtyBitmap(totalBits: UInt64, firstWord: UInt64, words: [UInt64])
    /// Agent → daemon, after the last DIRTY_BITMAP frame: the source is
    /// paused. `handOver`: the destination's guest starts only once the
    /// agent's hand-over has moved the VMM's device state (QEMU), so the
    /// source stays resumable until HANDED_OVER; without it the guest runs
    /// on the destination from RESUMED on.
    case switchover(stalePages: UInt64, sourcePausedAtNanos: UInt64, handOver: Bool = false)
    /// Daemon → agent: the guest's memory is resumed on the destination (the
    /// VMM acknowledged VMM_RESUME); the guest runs there, or, after a
    /// SWITCHOVER with `handOver`, will once the hand-over is done.
    case resumed(destinationResumedAtNanos: UInt64)
    /// Daemon → agent on the bulk connection of a resumed postcopy, after
    /// DIRTY_BITMAP frames holding the pages the destination still lacks:
    /// send those, and only those.
    case resync(stalePages: UInt64)
    /// Agent → daemon on the bulk connection, once the guest has resumed
    /// (and again after every rejoin): the digest of the source's image as
    /// paused. The daemon completes only once it has it.
    case imageDigest(ImageDigest)
    /// Agent → daemon on the bulk connection, after a SWITCHOVER with
    /// `handOver`: the hand-over is done, the destination's VMM has its
    /// device state and runs the guest. The point of no return: from here
    /// the source never resumes (sent again after every rejoin).
    case handedOver
    /// Agent → daemon on the bulk connection, before HANDED_OVER: the
    /// hand-over failed and the source runs the guest again, for `reason`;
    /// the destination discards its copy.
    case discard(reason: String)
    /// Daemon → agent, on the urgent connection: send these pages now.
    case pageRequest(requestID: UInt32, firstPage: UInt64, count: UInt32)
    /// Daemon → agent: every page is in place.
    case complete(pagesReceived: UInt64, faultsClean: UInt64, faultsStale: UInt64)
    /// Either way: the sender closes the connection, for this reason.
    case error(code: ErrorCode, message: String)
    case heartbeat

    public static var socket: WireSocket { .agent }
    /// One PAGES frame of 1024 pages (4 MiB) and then some (64 KiB).
    public static var maxPayload: Int { 4 << 20 + 64 << 10 }

    /// The size of a page on the wire, and the unit of every page index.
    public static let pageBytes = 4096
    /// The longest ERROR message, in bytes of UTF-8.
    public static let maxErrorMessageBytes = 1024
    /// HELLO's flags byte: the agent rejoins a postcopy phase in progress.
    public static let helloResumeFlag: UInt8 = 1
    /// SWITCHOVER's flags word: a hand-over starts the destination's guest.
    public static let switchoverHandOverFlag: UInt32 = 1
    /// The requestID of PAGES sent in the background rather than on request.
    public static let backgroundRequestID: UInt32 = 0

    /// The ERROR message that reports `error` to the peer.
    public static func reporting(_ error: ProtocolError) -> Message {
        .error(code: error.code, message: error.description)
    }

    /// A HELLO that rejoins a postcopy in progress.
    public var isResumingHello: Bool {
        if case .hello(_, _, _, _, _, true, _, _) = self { return true }
        return false
    }

    public var type: MessageType {
        switch self {
        case .hello: return .hello
        case .welcome: return .welcome
        case .pages: return .pages
        case .zeroPages: return .zeroPages
        case .roundEnd: return .roundEnd
        case .dirtyBitmap: return .dirtyBitmap
        case .switchover: return .switchover
        case .resumed: return .resumed
        case .resync: return .resync
        case .imageDigest: return .imageDigest
        case .handedOver: return .handedOver
        case .discard: return .discard
        case .pageRequest: return .pageRequest
        case .complete: return .complete
        case .error: return .error
        case .heartbeat: return .heartbeat
        }
    }
}

/// What a TCP connection from the agent carries, as its HELLO says.
public enum StreamRole: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// Control messages and bulk (background) pages.
    case bulk = 0
    /// PAGE_REQUESTs and the pages that answer them, never queued behind bulk data.
    case urgent = 1

    public var description: String { self == .bulk ? "bulk" : "urgent" }
}

/// The 16-byte identifier both sides of one migration share. Opaque bytes,
/// sent and shown (as 32 lower-case hex digits) in wire order.
public struct MigrationID: Hashable, Sendable, CustomStringConvertible {
    /// Bytes 0..<8 and 8..<16, each read as a big-endian integer.
    public let high: UInt64
    public let low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// The identifier made of exactly 16 bytes; nil for any other count.
    public init?(bytes: [UInt8]) {
        guard bytes.count == 16, let words = bigEndianWords(bytes[...], count: 2) else { return nil }
        self.init(high: words[0], low: words[1])
    }

    /// Parses 32 hex digits (either case); nil for anything else.
    public init?(hex: String) {
        guard let bytes = bytesFromHex(hex, count: 16) else { return nil }
        self.init(bytes: bytes)
    }

    /// A fresh identifier from `generator`.
    public init<Generator: RandomNumberGenerator>(using generator: inout Generator) {
        self.init(high: generator.next(), low: generator.next())
    }

    /// A fresh id from the system's generator (see `MigrationSecret.random()`).
    public static func random() -> MigrationID {
        MigrationID(high: .random(in: .min ... .max), low: .random(in: .min ... .max))
    }

    public var bytes: [UInt8] { bigEndianBytes([high, low]) }

    public var description: String { hexDigits(high, width: 16) + hexDigits(low, width: 16) }
}

/// A 32-byte digest of the guest image, carried by IMAGE_DIGEST and
/// VMM_COMPLETE. Opaque to the codec; shown as 64 lower-case hex digits in
/// wire order.
public struct ImageDigest: Hashable, Sendable, CustomStringConvertible {
    /// The 32 bytes as four big-endian words, in wire order.
    public let words: [UInt64]

    /// The digest made of exactly 32 bytes; nil for any other count.
    public init?(bytes: [UInt8]) {
        guard bytes.count == 32, let words = bigEndianWords(bytes[...], count: 4) else { return nil }
        self.words = words
    }

    /// Parses 64 hex digits (either case); nil for anything else.
    public init?(hex: String) {
        guard let bytes = bytesFromHex(hex, count: 32) else { return nil }
        self.init(bytes: bytes)
    }

    public var bytes: [UInt8] { bigEndianBytes(words) }

    public var description: String { words.map { hexDigits($0, width: 16) }.joined() }
}

extension Message: CustomStringConvertible {
    /// One line for logs: the type and its fields, never the page bytes.
    public var description: String {
        switch self {
        case let .hello(migrationID, role, sourcePageSize, regionSize, _, resume, bulkStreams, streamIndex):
            let stream = role == .bulk ? " stream \(streamIndex) of \(bulkStreams)" : " of \(bulkStreams) bulk streams"
            return "HELLO migration \(migrationID) role \(role)\(stream) page size \(sourcePageSize) region \(regionSize) bytes\(resume ? " resume" : "")"
        case let .welcome(regionSize, destinationPageSize):
            return "WELCOME region \(regionSize) bytes page size \(destinationPageSize)"
        case let .pages(requestID, firstPage, data):
            return "PAGES request \(requestID) pages \(firstPage) + \(data.count / Message.pageBytes)"
        case let .zeroPages(firstPage, count):
            return "ZERO_PAGES pages \(firstPage) + \(count)"
        case let .roundEnd(round, pagesSent, dirtyPages):
            return "ROUND_END round \(round) sent \(pagesSent) dirty \(dirtyPages)"
        case let .dirtyBitmap(totalBits, firstWord, words):
            return "DIRTY_BITMAP of \(totalBits) bits, words \(firstWord) + \(words.count)"
        case let .switchover(stalePages, sourcePausedAtNanos, handOver):
            return "SWITCHOVER stale \(stalePages) paused at \(sourcePausedAtNanos) ns\(handOver ? " hand-over" : "")"
        case let .resumed(destinationResumedAtNanos):
            return "RESUMED at \(destinationResumedAtNanos) ns"
        case let .resync(stalePages):
            return "RESYNC stale \(stalePages)"
        case let .imageDigest(digest):
            return "IMAGE_DIGEST \(digest)"
        case let .pageRequest(requestID, firstPage, count):
            return "PAGE_REQUEST request \(requestID) pages \(firstPage) + \(count)"
        case let .complete(pagesReceived, faultsClean, faultsStale):
            return "COMPLETE received \(pagesReceived) faults clean \(faultsClean) stale \(faultsStale)"
        case let .error(code, message):
            return "ERROR \(code): \(message)"
        case let .discard(reason):
            return "DISCARD: \(reason)"
        case .heartbeat, .handedOver:
            return type.description
        }
    }
}

/// What page ranges must fit in: the region the pages belong to.
public struct RegionLimits: Hashable, Sendable {
    /// 4 KiB pages in the region (the length of its dirty bitmap).
    public let smallPageCount: UInt64

    public init(smallPageCount: UInt64) { self.smallPageCount = smallPageCount }
    public init(_ geometry: PageGeometry) { smallPageCount = geometry.smallPageCount }
}

extension Message {
    /// Checks the pages and bitmap words a message names against the region:
    /// PAGES, ZERO_PAGES and PAGE_REQUEST must lie inside it (a range whose
    /// end overflows 64 bits does not); a DIRTY_BITMAP must be exactly as
    /// long as the region and set no bit past its end. Other messages pass
    /// (IMAGE_DIGEST among them: a digest names no page).
    public func validate(against limits: RegionLimits) throws(ProtocolError) {
        switch self {
        case let .pages(_, firstPage, data):
            try checkRange(.pages, firstPage, UInt64(data.count / Message.pageBytes), limits)
        case let .zeroPages(firstPage, count):
            try checkRange(.zeroPages, firstPage, UInt64(count), limits)
        case let .pageRequest(_, firstPage, count):
            try checkRange(.pageRequest, firstPage, UInt64(count), limits)
        case let .dirtyBitmap(totalBits, firstWord, words):
            guard totalBits == limits.smallPageCount else {
                throw .bitmapSizeMismatch(totalBits: totalBits, regionPages: limits.smallPageCount)
            }
            let wordLimit = totalBits / 64 + (totalBits % 64 == 0 ? 0 : 1)
            let (end, overflow) = firstWord.addingReportingOverflow(UInt64(words.count))
            guard !overflow, end <= wordLimit else {
                throw .bitmapWordsOutOfBounds(firstWord: firstWord, wordCount: UInt64(words.count),
                                              totalBits: totalBits)
            }
            if end == wordLimit, totalBits % 64 != 0, let last = words.last, last >> (totalBits % 64) != 0 {
                throw .bitmapStrayBits(totalBits: totalBits, lastWord: last)
            }
        default:
            return
        }
    }
}

extension Message {
    /// Appends this message's payload (no header) to `out`. Counts must be at
    /// least 1 and PAGES data a whole number of pages (a broken invariant
    /// traps); an ERROR message is cut to `maxErrorMessageBytes`.
    public func appendPayload(to out: inout [UInt8]) {
        switch self {
        case let .hello(migrationID, role, sourcePageSize, regionSize, secret, resume, bulkStreams, streamIndex):
            precondition((1...AgentStream.maxBulkStreams).contains(bulkStreams) && (0..<bulkStreams).contains(streamIndex)
                && (role == .bulk || streamIndex == 0), "HELLO for \(role) stream \(streamIndex) of \(bulkStreams)")
            out.append(contentsOf: migrationID.bytes)
            out.appendLittleEndian(role.rawValue)
            out.appendLittleEndian(resume ? Message.helloResumeFlag : 0)
            out.appendLittleEndian(UInt32(sourcePageSize.bytes))
            out.appendLittleEndian(regionSize)
            out.append(contentsOf: secret.bytes)
            out.appendLittleEndian(UInt8(bulkStreams))
            out.appendLittleEndian(UInt8(streamIndex))
        case let .welcome(regionSize, destinationPageSize):
            out.appendLittleEndian(regionSize)
            out.appendLittleEndian(UInt32(destinationPageSize.bytes))
        case let .pages(requestID, firstPage, data):
            let count = Message.checkedPageCount(byteCount: data.count)
            out.appendLittleEndian(requestID)
            out.appendLittleEndian(firstPage)
            out.appendLittleEndian(count)
            out.append(contentsOf: data)
        case let .zeroPages(firstPage, count):
            precondition(count >= 1, "ZERO_PAGES with count 0")
            out.appendLittleEndian(firstPage)
            out.appendLittleEndian(count)
        case let .roundEnd(round, pagesSent, dirtyPages):
            out.appendLittleEndian(round)
            out.appendLittleEndian(pagesSent)
            out.appendLittleEndian(dirtyPages)
        case let .dirtyBitmap(totalBits, firstWord, words):
            precondition(!words.isEmpty && words.count <= Int(UInt32.max), "DIRTY_BITMAP with \(words.count) words")
            out.appendLittleEndian(totalBits)
            out.appendLittleEndian(firstWord)
            out.appendLittleEndian(UInt32(words.count))
            out.appendLittleEndian(words: words)
        case let .switchover(stalePages, sourcePausedAtNanos, handOver):
            out.appendLittleEndian(stalePages)
            out.appendLittleEndian(sourcePausedAtNanos)
            out.appendLittleEndian(handOver ? Message.switchoverHandOverFlag : 0)
        case let .resumed(destinationResumedAtNanos):
            out.appendLittleEndian(destinationResumedAtNanos)
        case let .resync(stalePages):
            out.appendLittleEndian(stalePages)
        case let .imageDigest(digest):
            out.append(contentsOf: digest.bytes)
        case let .pageRequest(requestID, firstPage, count):
            precondition(count >= 1, "PAGE_REQUEST with count 0")
            out.appendLittleEndian(requestID)
            out.appendLittleEndian(firstPage)
            out.appendLittleEndian(count)
        case let .complete(pagesReceived, faultsClean, faultsStale):
            out.appendLittleEndian(pagesReceived)
            out.appendLittleEndian(faultsClean)
            out.appendLittleEndian(faultsStale)
        case let .error(code, message):
            appendErrorPayload(code, message, to: &out)
        case let .discard(reason):
            out.append(contentsOf: utf8Prefix(reason, maxBytes: Message.maxErrorMessageBytes))
        case .heartbeat, .handedOver:
            return
    }
    }

    /// Decodes the payload of a frame of `type`, whose checksum has been
    /// checked (a VMM_* type is refused: it belongs to the VMM socket). Refuses a length that does not fit the type, a count of 0,
    /// values v1 does not define and an ERROR message that is not UTF-8.
    /// A PAGES message's data is a slice of `payload`, not a copy.
    public static func decode(type: MessageType, payload: ArraySlice<UInt8>) throws(ProtocolError) -> Message {
        guard type.allowedPayloadLength.admits(payload.count) else {
            throw .payloadLength(type: type, actual: payload.count, expected: type.allowedPayloadLength)
        }
        func u32(_ offset: Int) -> UInt32 { payload.loadLittleEndian(at: offset) }
        func u64(_ offset: Int) -> UInt64 { payload.loadLittleEndian(at: offset) }
        func bytes(_ offset: Int, _ count: Int) -> [UInt8] {
            let start = payload.startIndex + offset
            return Array(payload[start..<(start + count)])
        }
        func pageSize(_ offset: Int) throws(ProtocolError) -> PageSize {
            let raw = u32(offset)
            guard let size = PageSize(bytes: UInt64(raw)) else { throw .unsupportedPageSize(type: type, bytes: raw) }
            return size
        }
        func count(_ offset: Int) throws(ProtocolError) -> UInt32 {
            let value = u32(offset)
            guard value >= 1 else { throw .zeroCount(type: type) }
            return value
        }

        switch type {
        case .hello:
            let role: UInt8 = payload.loadLittleEndian(at: 16)
            guard let streamRole = StreamRole(rawValue: role) else {
                throw .invalidField(type: type, field: "role", value: UInt64(role))
            }
            let flags: UInt8 = payload.loadLittleEndian(at: 17)
            guard flags & ~Message.helloResumeFlag == 0 else {
                throw .invalidField(type: type, field: "flags", value: UInt64(flags))
            }
            let bulkStreams: UInt8 = payload.loadLittleEndian(at: 62)
            guard bulkStreams >= 1, Int(bulkStreams) <= AgentStream.maxBulkStreams else {
                throw .bulkStreamCount(bulkStreams)
            }
            let streamIndex: UInt8 = payload.loadLittleEndian(at: 63)
            guard streamIndex < (streamRole == .bulk ? bulkStreams : 1) else {
                throw .streamIndexOutOfRange(role: streamRole, index: streamIndex, bulkStreams: bulkStreams)
            }
            // The length rule guarantees the 16 bytes of the identifier and
            // the 32 of the secret.
            return .hello(migrationID: MigrationID(bytes: bytes(0, 16))!, role: streamRole,
                          sourcePageSize: try pageSize(18), regionSize: u64(22),
                          secret: MigrationSecret(bytes: bytes(30, 32))!,
                          resume: flags & Message.helloResumeFlag != 0,
                          bulkStreams: Int(bulkStreams), streamIndex: Int(streamIndex))
        case .welcome:
            return .welcome(regionSize: u64(0), destinationPageSize: try pageSize(8))
        case .pages:
            let pages = try count(12)
            guard PayloadLength.pages(count: pages).admits(payload.count) else {
                throw .payloadLength(type: type, actual: payload.count, expected: .pages(count: pages))
            }
            return .pages(requestID: u32(0), firstPage: u64(4), data: payload.dropFirst(pagesFieldsSize))
        case .zeroPages:
            return .zeroPages(firstPage: u64(0), count: try count(8))
        case .roundEnd:
            return .roundEnd(round: u32(0), pagesSent: u64(4), dirtyPages: u64(12))
        case .dirtyBitmap:
            let wordCount = try count(16)
            guard PayloadLength.bitmapWords(count: wordCount).admits(payload.count) else {
                throw .payloadLength(type: type, actual: payload.count, expected: .bitmapWords(count: wordCount))
            }
            let words = payload.loadLittleEndianWords(at: bitmapFieldsSize, count: Int(wordCount))
            return .dirtyBitmap(totalBits: u64(0), firstWord: u64(8), words: words)
        case .switchover:
            let flags = u32(16)
            guard flags & ~Message.switchoverHandOverFlag == 0 else {
                throw .invalidField(type: type, field: "flags", value: UInt64(flags))
            }
            return .switchover(stalePages: u64(0), sourcePausedAtNanos: u64(8),
                               handOver: flags & Message.switchoverHandOverFlag != 0)
        case .resumed:
            return .resumed(destinationResumedAtNanos: u64(0))
        case .resync:
            return .resync(stalePages: u64(0))
        case .imageDigest:
            // The length rule guarantees the 32 bytes of the digest.
            return .imageDigest(ImageDigest(bytes: bytes(0, 32))!)
        case .handedOver:
            return .handedOver
        case .discard:
            guard let text = String(validating: payload, as: UTF8.self) else { throw .invalidUTF8 }
            return .discard(reason: text)
        case .pageRequest:
            return .pageRequest(requestID: u32(0), firstPage: u64(4), count: try count(12))
        case .complete:
            return .complete(pagesReceived: u64(0), faultsClean: u64(8), faultsStale: u64(16))
        case .error:
            let (code, text) = try decodeErrorPayload(payload)
            return .error(code: code, message: text)
        case .heartbeat:
            return .heartbeat
        case .vmmOffer, .vmmAttach, .vmmResume, .vmmResumed, .vmmComplete, .vmmReattach, .vmmHandback:
            throw .wrongSocket(type: type, received: .agent)
        }
    }
}

/// ERROR's payload: the code, then the message cut to
/// `maxErrorMessageBytes` of UTF-8.
func appendErrorPayload(_ code: ErrorCode, _ message: String, to out: inout [UInt8]) {
    out.appendLittleEndian(code.rawValue)
    out.append(contentsOf: utf8Prefix(message, maxBytes: Message.maxErrorMessageBytes))
}

/// ERROR's code and message; refuses a message that is not UTF-8.
func decodeErrorPayload(_ payload: ArraySlice<UInt8>) throws(ProtocolError) -> (ErrorCode, String) {
    let code: UInt16 = payload.loadLittleEndian(at: 0)
    guard let text = String(validating: payload.dropFirst(2), as: UTF8.self) else { throw .invalidUTF8 }
    return (ErrorCode(rawValue: code), text)
}

/// The longest prefix of `text`'s UTF-8 of at most `maxBytes` that ends on a
/// whole character (never inside a multi-byte sequence).
func utf8Prefix(_ text: String, maxBytes: Int) -> ArraySlice<UInt8> {
    let utf8 = Array(text.utf8)
    guard utf8.count > maxBytes else { return utf8[...] }
    var end = maxBytes
    while end > 0 && utf8[end] & 0xC0 == 0x80 { end -= 1 }
    return utf8[..<end]
}

private func checkRange(_ type: MessageType, _ firstPage: UInt64, _ count: UInt64,
                        _ limits: RegionLimits) throws(ProtocolError) {
    let (end, overflow) = firstPage.addingReportingOverflow(count)
    guard !overflow, end <= limits.smallPageCount else {
        throw .pageRangeOutOfBounds(type: type, firstPage: firstPage, count: count,
                                    regionPages: limits.smallPageCount)
    }
}
