import CPostcopy
import Foundation
import PostcopyCore
import Testing

/// Sources/CPostcopy/include/postcopy_wire.h is the wire's definition for C:
/// the preload adapter includes it instead of numbers of its own. These
/// tests pin the Swift codec to it, as swift-nio's CNIOLinux asserts what it
/// mirrors: every constant there equals its Swift counterpart (compiled in,
/// through CPostcopy's umbrella header), bytes laid out by the header's
/// offsets decode in Swift and Swift's bytes read back by them, every Swift
/// message type, ERROR code and handback kind has a constant there, and
/// every constant there is checked here (the header's text is read for
/// that), so that a change to either side alone fails.
@Suite struct WireDefinitionTests {
    // MARK: - the enums, both ways

    @Test func everyMessageTypeIsTheHeadersAndTheHeaderHasNoOther() {
        for type in MessageType.allCases {
            let (name, value) = Self.constant(for: type)
            #expect(Int(value) == Int(type.rawValue), "\(type): C \(value), Swift \(type.rawValue)")
            #expect(name == "TYPE_" + type.description, "the C name of \(type) is the protocol's")
            Self.expectCompiledAsWritten(name, value)
        }
        let swiftNames = Set(MessageType.allCases.map { Self.constant(for: $0).name })
        #expect(Self.header.names(prefix: "TYPE_") == swiftNames)
    }

    @Test func everyErrorCodeIsTheHeadersAndTheHeaderHasNoOther() throws {
        // The codes Swift knows: every wire value that does not decode to `unknown`.
        let known = (0...UInt16.max).map(ErrorCode.init(rawValue:)).filter { Self.constant(for: $0) != nil }
        #expect(known.count == 10)
        for code in known {
            let (name, value) = try #require(Self.constant(for: code))
            #expect(Int(value) == Int(code.rawValue), "\(code): C \(value), Swift \(code.rawValue)")
            #expect(name == "CODE_" + code.description.uppercased().replacingOccurrences(of: "-", with: "_"))
            Self.expectCompiledAsWritten(name, value)
        }
        #expect(Self.header.names(prefix: "CODE_") == Set(known.compactMap { Self.constant(for: $0)?.name }))
    }

    @Test func everyHandbackKindIsTheHeadersAndTheHeaderHasNoOther() {
        for kind in HandbackKind.allCases {
            let (name, value) = Self.constant(for: kind)
            #expect(Int(value) == Int(kind.rawValue), "\(kind): C \(value), Swift \(kind.rawValue)")
            Self.expectCompiledAsWritten(name, value)
        }
        #expect(Self.header.names(prefix: "HANDBACK_") == Set(HandbackKind.allCases.map { Self.constant(for: $0).name }))
    }

    // MARK: - values

    @Test(arguments: WireDefinitionTests.valuePins)
    func valueIsSwifts(_ pin: Pin) {
        #expect(pin.c == pin.swift, "CPC_WIRE_\(pin.name): C \(pin.c), Swift \(pin.swift)")
        Self.expectCompiledAsWritten(pin.name, pin.c)
    }

    @Test func theLayoutConstantsAreCompiledAsWritten() {
        for (name, value) in Self.layoutConstants { Self.expectCompiledAsWritten(name, value) }
    }

    /// The header's text gives `name` the value Swift compiled. They differ
    /// when the header changed and SwiftPM did not rebuild this target: it
    /// does not notice a changed C header (delete
    /// .build/*/debug/PostcopyOSTests.build, or the whole .build, and build again).
    static func expectCompiledAsWritten(_ name: String, _ compiled: some BinaryInteger,
                                        sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(header.values[name] == UInt64(compiled),
                "CPC_WIRE_\(name): the header says \(header.values[name].map(String.init) ?? "nothing"), this build compiled \(compiled)",
                sourceLocation: sourceLocation)
    }

    /// The decoder admits exactly the lengths the header gives for each
    /// message the VMM socket carries (and IMAGE_DIGEST, for the digest).
    @Test func payloadLengthsAreTheDecodersRule() {
        let lengths: [(MessageType, [Int32])] = [
            (.vmmOffer, [CPC_WIRE_VMM_OFFER_BYTES]),
            (.vmmAttach, [CPC_WIRE_VMM_ATTACH_BYTES]),
            (.vmmReattach, [CPC_WIRE_VMM_REATTACH_BYTES]),
            (.vmmResume, [CPC_WIRE_VMM_RESUME_BYTES]),
            (.vmmResumed, [CPC_WIRE_VMM_RESUMED_BYTES]),
            (.vmmComplete, [CPC_WIRE_VMM_COMPLETE_ANSWER_BYTES, CPC_WIRE_VMM_COMPLETE_BYTES]),
            (.vmmHandback, [CPC_WIRE_VMM_HANDBACK_BYTES]),
            (.heartbeat, [CPC_WIRE_HEARTBEAT_BYTES]),
            (.imageDigest, [CPC_WIRE_DIGEST_BYTES]),
        ]
        for (type, expected) in lengths {
            let admitted = (0...VMMMessage.maxPayload).filter(type.allowedPayloadLength.admits)
            #expect(admitted == expected.map(Int.init).sorted(), "\(type)")
        }
        let errors = (0...VMMMessage.maxPayload).filter(MessageType.error.allowedPayloadLength.admits)
        #expect(errors == Array(Int(CPC_WIRE_ERROR_TEXT_OFFSET)...Int(CPC_WIRE_ERROR_TEXT_OFFSET + CPC_WIRE_ERROR_MAX_TEXT)))
        // And the encoder writes those lengths.
        #expect(payload(VMMMessage.complete(imageDigest: nil)).count == Int(CPC_WIRE_VMM_COMPLETE_ANSWER_BYTES))
        #expect(payload(VMMMessage.complete(imageDigest: Self.digest)).count == Int(CPC_WIRE_VMM_COMPLETE_BYTES))
    }

    /// CRC-32C as the header defines it, bit by bit, against Swift's.
    @Test func checksumIsSwifts() {
        let inputs: [[UInt8]] = [[], Array("123456789".utf8), [0x80], Array(0...255), Array(repeating: 0xFF, count: 37)]
        for bytes in inputs {
            #expect(Self.crc32c(bytes) == CRC32C.checksum(bytes), "\(bytes.count) bytes")
        }
        #expect(Self.crc32c(Array("123456789".utf8)) == 0xE306_9283)
    }

    // MARK: - layouts, both ways

    @Test func swiftsFrameReadsByTheHeadersOffsets() {
        let frame = VMMMessage.offer(regionSize: 1 << 30, pageSize: .small, fileOffset: 0).encoded()
        #expect(read(frame, at: CPC_WIRE_HEADER_MAGIC_OFFSET, width: 4) == UInt64(CPC_WIRE_MAGIC))
        #expect(read(frame, at: CPC_WIRE_HEADER_VERSION_OFFSET, width: 1) == UInt64(CPC_WIRE_VERSION))
        #expect(read(frame, at: CPC_WIRE_HEADER_TYPE_OFFSET, width: 1) == UInt64(CPC_WIRE_TYPE_VMM_OFFER))
        #expect(read(frame, at: CPC_WIRE_HEADER_FLAGS_OFFSET, width: 2) == 0)
        #expect(read(frame, at: CPC_WIRE_HEADER_LENGTH_OFFSET, width: 4) == UInt64(frame.count) - UInt64(CPC_WIRE_HEADER_BYTES))
        #expect(read(frame, at: CPC_WIRE_HEADER_CHECKSUM_OFFSET, width: 4) == UInt64(Self.checksum(frame)))
    }

    @Test func aFrameLaidOutByTheHeaderDecodesInSwift() throws {
        let text = Array("gone".utf8)
        var error = [UInt8](repeating: 0, count: Int(CPC_WIRE_ERROR_TEXT_OFFSET))
        write(&error, UInt64(CPC_WIRE_CODE_CANCELLED), at: CPC_WIRE_ERROR_CODE_OFFSET, width: 2)
        let frame = Self.frame(type: CPC_WIRE_TYPE_ERROR, payload: error + text)
        #expect(try decode(frame) == .error(code: .cancelled, message: "gone"))

        // Flags where the header puts them: Swift refuses them.
        var flagged = frame
        write(&flagged, 0x0201, at: CPC_WIRE_HEADER_FLAGS_OFFSET, width: 2)
        #expect(throws: ProtocolError.nonzeroFlags(0x0201)) { try decode(flagged) }
    }

    @Test func vmmPayloadsReadAndDecodeByTheHeadersOffsets() throws {
        let offer = payload(VMMMessage.offer(regionSize: 0x1_2340_0000, pageSize: .huge2M, fileOffset: 0x40_0000))
        #expect(read(offer, at: CPC_WIRE_VMM_OFFER_REGION_SIZE_OFFSET, width: 8) == 0x1_2340_0000)
        #expect(read(offer, at: CPC_WIRE_VMM_OFFER_PAGE_SIZE_OFFSET, width: 4) == UInt64(CPC_WIRE_HUGE_PAGE_BYTES))
        #expect(read(offer, at: CPC_WIRE_VMM_OFFER_FILE_OFFSET_OFFSET, width: 8) == 0x40_0000)

        var laidOut = [UInt8](repeating: 0, count: Int(CPC_WIRE_VMM_OFFER_BYTES))
        write(&laidOut, 1 << 30, at: CPC_WIRE_VMM_OFFER_REGION_SIZE_OFFSET, width: 8)
        write(&laidOut, UInt64(CPC_WIRE_PAGE_BYTES), at: CPC_WIRE_VMM_OFFER_PAGE_SIZE_OFFSET, width: 4)
        write(&laidOut, 0x1000, at: CPC_WIRE_VMM_OFFER_FILE_OFFSET_OFFSET, width: 8)
        #expect(try decode(Self.frame(type: CPC_WIRE_TYPE_VMM_OFFER, payload: laidOut))
            == .offer(regionSize: 1 << 30, pageSize: .small, fileOffset: 0x1000))

        let attachments: [(Int32, (UInt64, UffdFeatures, UInt64) -> VMMMessage)] = [
            (CPC_WIRE_TYPE_VMM_ATTACH, VMMMessage.attach), (CPC_WIRE_TYPE_VMM_REATTACH, VMMMessage.reattach),
        ]
        for (type, message) in attachments {
            let sent = message(0x7F12_3456_7000, UffdFeatures(rawValue: 0x2D8), 5)
            let bytes = payload(sent)
            #expect(read(bytes, at: CPC_WIRE_VMM_ATTACH_GUEST_BASE_OFFSET, width: 8) == 0x7F12_3456_7000)
            #expect(read(bytes, at: CPC_WIRE_VMM_ATTACH_FEATURES_OFFSET, width: 8) == 0x2D8)
            #expect(read(bytes, at: CPC_WIRE_VMM_ATTACH_REGISTER_MODE_OFFSET, width: 8) == 5)

            var attach = [UInt8](repeating: 0, count: Int(CPC_WIRE_VMM_ATTACH_BYTES))
            write(&attach, 0x7F12_3456_7000, at: CPC_WIRE_VMM_ATTACH_GUEST_BASE_OFFSET, width: 8)
            write(&attach, 0x2D8, at: CPC_WIRE_VMM_ATTACH_FEATURES_OFFSET, width: 8)
            write(&attach, 5, at: CPC_WIRE_VMM_ATTACH_REGISTER_MODE_OFFSET, width: 8)
            #expect(try decode(Self.frame(type: type, payload: attach)) == sent)
        }

        let handback = payload(VMMMessage.handback(.pageState))
        #expect(read(handback, at: CPC_WIRE_VMM_HANDBACK_KIND_OFFSET, width: 4) == UInt64(CPC_WIRE_HANDBACK_PAGE_STATE))
        var kind = [UInt8](repeating: 0, count: Int(CPC_WIRE_VMM_HANDBACK_BYTES))
        write(&kind, UInt64(CPC_WIRE_HANDBACK_RAM), at: CPC_WIRE_VMM_HANDBACK_KIND_OFFSET, width: 4)
        #expect(try decode(Self.frame(type: CPC_WIRE_TYPE_VMM_HANDBACK, payload: kind)) == .handback(.ram))

        let error = payload(VMMMessage.error(code: .discarded, message: "x"))
        #expect(read(error, at: CPC_WIRE_ERROR_CODE_OFFSET, width: 2) == UInt64(CPC_WIRE_CODE_DISCARDED))
        #expect(Array(error[Int(CPC_WIRE_ERROR_TEXT_OFFSET)...]) == Array("x".utf8))
    }

    /// HELLO's bulk stream fields (version 5), both ways.
    @Test func helloStreamsReadAndDecodeByTheHeadersOffsets() throws {
        let sent = Self.hello(streams: 5, index: 3)
        let bytes = payload(sent)
        #expect(read(bytes, at: CPC_WIRE_HELLO_BULK_STREAMS_OFFSET, width: 1) == 5)
        #expect(read(bytes, at: CPC_WIRE_HELLO_STREAM_INDEX_OFFSET, width: 1) == 3)
        var laidOut = payload(Self.hello(streams: 1, index: 0))
        write(&laidOut, UInt64(CPC_WIRE_MAX_BULK_STREAMS), at: CPC_WIRE_HELLO_BULK_STREAMS_OFFSET, width: 1)
        write(&laidOut, UInt64(CPC_WIRE_MAX_BULK_STREAMS - 1), at: CPC_WIRE_HELLO_STREAM_INDEX_OFFSET, width: 1)
        #expect(try decodeAgent(Self.frame(type: CPC_WIRE_TYPE_HELLO, payload: laidOut))
            == Self.hello(streams: AgentStream.maxBulkStreams, index: AgentStream.maxBulkStreams - 1))
    }

    @Test func theSourceOfferReadsAndDecodesByTheHeadersOffsets() throws {
        let armed = SourceTrackingOffer.armed(address: 0x7F00_0000_0000, length: 1 << 30).encoded
        #expect(armed.count == Int(CPC_WIRE_SOURCE_OFFER_HEADER_BYTES))
        #expect(read(armed, at: CPC_WIRE_SOURCE_OFFER_MAGIC_OFFSET, width: 4) == UInt64(CPC_WIRE_SOURCE_OFFER_MAGIC))
        #expect(read(armed, at: CPC_WIRE_SOURCE_OFFER_VERSION_OFFSET, width: 2) == UInt64(CPC_WIRE_SOURCE_OFFER_VERSION))
        #expect(read(armed, at: CPC_WIRE_SOURCE_OFFER_STATUS_OFFSET, width: 2) == UInt64(CPC_WIRE_SOURCE_OFFER_ARMED))
        #expect(read(armed, at: CPC_WIRE_SOURCE_OFFER_ADDRESS_OFFSET, width: 8) == 0x7F00_0000_0000)
        #expect(read(armed, at: CPC_WIRE_SOURCE_OFFER_LENGTH_OFFSET, width: 8) == 1 << 30)
        #expect(read(armed, at: CPC_WIRE_SOURCE_OFFER_REASON_LENGTH_OFFSET, width: 2) == 0)

        let reason = "no WP_ASYNC"
        let unavailable = SourceTrackingOffer.unavailable(reason: reason).encoded
        #expect(read(unavailable, at: CPC_WIRE_SOURCE_OFFER_STATUS_OFFSET, width: 2)
            == UInt64(CPC_WIRE_SOURCE_OFFER_UNAVAILABLE))
        #expect(read(unavailable, at: CPC_WIRE_SOURCE_OFFER_REASON_LENGTH_OFFSET, width: 2) == UInt64(reason.utf8.count))
        #expect(Array(unavailable[Int(CPC_WIRE_SOURCE_OFFER_HEADER_BYTES)...]) == Array(reason.utf8))

        func laidOut(status: Int32, address: UInt64, length: UInt64, reason: String) -> [UInt8] {
            var bytes = [UInt8](repeating: 0, count: Int(CPC_WIRE_SOURCE_OFFER_HEADER_BYTES))
            write(&bytes, UInt64(CPC_WIRE_SOURCE_OFFER_MAGIC), at: CPC_WIRE_SOURCE_OFFER_MAGIC_OFFSET, width: 4)
            write(&bytes, UInt64(CPC_WIRE_SOURCE_OFFER_VERSION), at: CPC_WIRE_SOURCE_OFFER_VERSION_OFFSET, width: 2)
            write(&bytes, UInt64(status), at: CPC_WIRE_SOURCE_OFFER_STATUS_OFFSET, width: 2)
            write(&bytes, address, at: CPC_WIRE_SOURCE_OFFER_ADDRESS_OFFSET, width: 8)
            write(&bytes, length, at: CPC_WIRE_SOURCE_OFFER_LENGTH_OFFSET, width: 8)
            write(&bytes, UInt64(reason.utf8.count), at: CPC_WIRE_SOURCE_OFFER_REASON_LENGTH_OFFSET, width: 2)
            return bytes + Array(reason.utf8)
        }
        #expect(try SourceTrackingOffer(decoding: laidOut(status: CPC_WIRE_SOURCE_OFFER_ARMED, address: 0x10_0000,
                                                          length: 0x2000, reason: ""))
            == .armed(address: 0x10_0000, length: 0x2000))
        #expect(try SourceTrackingOffer(decoding: laidOut(status: CPC_WIRE_SOURCE_OFFER_UNAVAILABLE, address: 0,
                                                          length: 0, reason: reason))
            == .unavailable(reason: reason))
    }

    // MARK: - nothing in the header goes unchecked

    @Test func everyConstantOfTheHeaderIsCheckedHere() {
        var checked = Set(Self.valuePins.map(\.name)).union(Self.layoutConstants.keys)
        checked.formUnion(Self.header.names(prefix: "TYPE_").filter { name in
            MessageType.allCases.contains { Self.constant(for: $0).name == name }
        })
        checked.formUnion(Self.header.names(prefix: "CODE_").filter { name in
            (0...UInt16.max).contains { Self.constant(for: ErrorCode(rawValue: $0))?.name == name }
        })
        checked.formUnion(HandbackKind.allCases.map { Self.constant(for: $0).name })
        let unchecked = Set(Self.header.values.keys).subtracting(checked)
        #expect(unchecked.isEmpty, "constants of postcopy_wire.h no test pins to Swift: \(unchecked.sorted())")
        #expect(Self.header.values.count > 60, "the header was read: \(Self.header.values.count) constants")
    }
}

// MARK: - the pins

extension WireDefinitionTests {
    /// A constant of the header (its name without `CPC_WIRE_`), as Swift
    /// compiled it, and what the Swift codec says it is.
    struct Pin: Sendable, CustomTestStringConvertible {
        let name: String
        let c: UInt64
        let swift: UInt64

        init(_ name: String, _ c: some BinaryInteger, _ swift: some BinaryInteger) {
            self.name = name
            self.c = UInt64(c)
            self.swift = UInt64(swift)
        }

        var testDescription: String { name }
    }

    static let digest = ImageDigest(bytes: Array(0..<32))!

    /// A HELLO for bulk stream `index` of `streams`.
    static func hello(streams: Int, index: Int) -> Message {
        .hello(migrationID: MigrationID(high: 1, low: 2), role: .bulk, sourcePageSize: .small, regionSize: 1 << 30,
               secret: MigrationSecret(bytes: Array(0..<32))!, bulkStreams: streams, streamIndex: index)
    }

    static let valuePins: [Pin] = [
        Pin("MAGIC", CPC_WIRE_MAGIC, FrameHeader.magic),
        Pin("VERSION", CPC_WIRE_VERSION, FrameHeader.version),
        Pin("HEADER_BYTES", CPC_WIRE_HEADER_BYTES, FrameHeader.size),
        Pin("CHECKSUMMED_BYTES", CPC_WIRE_CHECKSUMMED_BYTES, FrameHeader.checksummedSize),
        Pin("ERROR_MAX_TEXT", CPC_WIRE_ERROR_MAX_TEXT, Message.maxErrorMessageBytes),
        Pin("PAGE_BYTES", CPC_WIRE_PAGE_BYTES, Message.pageBytes),
        Pin("HUGE_PAGE_BYTES", CPC_WIRE_HUGE_PAGE_BYTES, PageSize.huge2M.bytes),
        Pin("MAX_PAYLOAD", CPC_WIRE_MAX_PAYLOAD, FrameDecoder.defaultMaxPayload),
        Pin("VMM_MAX_PAYLOAD", CPC_WIRE_VMM_MAX_PAYLOAD, VMMMessage.maxPayload),
        Pin("DIGEST_BYTES", CPC_WIRE_DIGEST_BYTES, payload(Message.imageDigest(digest)).count),
        Pin("MAX_BULK_STREAMS", CPC_WIRE_MAX_BULK_STREAMS, AgentStream.maxBulkStreams),
        Pin("HELLO_BYTES", CPC_WIRE_HELLO_BYTES, payload(hello(streams: 1, index: 0)).count),
        Pin("VMM_OFFER_BYTES", CPC_WIRE_VMM_OFFER_BYTES,
            payload(VMMMessage.offer(regionSize: 1 << 30, pageSize: .small, fileOffset: 0)).count),
        Pin("VMM_ATTACH_BYTES", CPC_WIRE_VMM_ATTACH_BYTES,
            payload(VMMMessage.attach(guestBase: 0, features: UffdFeatures(rawValue: 0), registerMode: 0)).count),
        Pin("VMM_REATTACH_BYTES", CPC_WIRE_VMM_REATTACH_BYTES,
            payload(VMMMessage.reattach(guestBase: 0, features: UffdFeatures(rawValue: 0), registerMode: 0)).count),
        Pin("VMM_RESUME_BYTES", CPC_WIRE_VMM_RESUME_BYTES, payload(VMMMessage.resume).count),
        Pin("VMM_RESUMED_BYTES", CPC_WIRE_VMM_RESUMED_BYTES, payload(VMMMessage.resumed).count),
        Pin("VMM_COMPLETE_BYTES", CPC_WIRE_VMM_COMPLETE_BYTES, payload(VMMMessage.complete(imageDigest: digest)).count),
        Pin("VMM_COMPLETE_ANSWER_BYTES", CPC_WIRE_VMM_COMPLETE_ANSWER_BYTES,
            payload(VMMMessage.complete(imageDigest: nil)).count),
        Pin("VMM_HANDBACK_BYTES", CPC_WIRE_VMM_HANDBACK_BYTES, payload(VMMMessage.handback(.ram)).count),
        Pin("HEARTBEAT_BYTES", CPC_WIRE_HEARTBEAT_BYTES, payload(VMMMessage.heartbeat).count),
        Pin("SOURCE_OFFER_MAGIC", CPC_WIRE_SOURCE_OFFER_MAGIC, read(SourceTrackingOffer.magic, at: 0, width: 4)),
        Pin("SOURCE_OFFER_VERSION", CPC_WIRE_SOURCE_OFFER_VERSION, SourceTrackingOffer.version),
        Pin("SOURCE_OFFER_HEADER_BYTES", CPC_WIRE_SOURCE_OFFER_HEADER_BYTES, SourceTrackingOffer.headerSize),
        Pin("SOURCE_OFFER_MAX_REASON", CPC_WIRE_SOURCE_OFFER_MAX_REASON, SourceTrackingOffer.maxReasonBytes),
    ]

    /// The constants the layout and checksum tests above use, as compiled.
    static let layoutConstants: [String: UInt64] = [
        "HEADER_MAGIC_OFFSET": UInt64(CPC_WIRE_HEADER_MAGIC_OFFSET),
        "HEADER_VERSION_OFFSET": UInt64(CPC_WIRE_HEADER_VERSION_OFFSET),
        "HEADER_TYPE_OFFSET": UInt64(CPC_WIRE_HEADER_TYPE_OFFSET),
        "HEADER_FLAGS_OFFSET": UInt64(CPC_WIRE_HEADER_FLAGS_OFFSET),
        "HEADER_LENGTH_OFFSET": UInt64(CPC_WIRE_HEADER_LENGTH_OFFSET),
        "HEADER_CHECKSUM_OFFSET": UInt64(CPC_WIRE_HEADER_CHECKSUM_OFFSET),
        "CRC32C_POLYNOMIAL": UInt64(CPC_WIRE_CRC32C_POLYNOMIAL),
        "CRC32C_INITIAL": UInt64(CPC_WIRE_CRC32C_INITIAL),
        "ERROR_CODE_OFFSET": UInt64(CPC_WIRE_ERROR_CODE_OFFSET),
        "ERROR_TEXT_OFFSET": UInt64(CPC_WIRE_ERROR_TEXT_OFFSET),
        "VMM_OFFER_REGION_SIZE_OFFSET": UInt64(CPC_WIRE_VMM_OFFER_REGION_SIZE_OFFSET),
        "VMM_OFFER_PAGE_SIZE_OFFSET": UInt64(CPC_WIRE_VMM_OFFER_PAGE_SIZE_OFFSET),
        "VMM_OFFER_FILE_OFFSET_OFFSET": UInt64(CPC_WIRE_VMM_OFFER_FILE_OFFSET_OFFSET),
        "VMM_ATTACH_GUEST_BASE_OFFSET": UInt64(CPC_WIRE_VMM_ATTACH_GUEST_BASE_OFFSET),
        "VMM_ATTACH_FEATURES_OFFSET": UInt64(CPC_WIRE_VMM_ATTACH_FEATURES_OFFSET),
        "VMM_ATTACH_REGISTER_MODE_OFFSET": UInt64(CPC_WIRE_VMM_ATTACH_REGISTER_MODE_OFFSET),
        "VMM_HANDBACK_KIND_OFFSET": UInt64(CPC_WIRE_VMM_HANDBACK_KIND_OFFSET),
        "HELLO_BULK_STREAMS_OFFSET": UInt64(CPC_WIRE_HELLO_BULK_STREAMS_OFFSET),
        "HELLO_STREAM_INDEX_OFFSET": UInt64(CPC_WIRE_HELLO_STREAM_INDEX_OFFSET),
        "SOURCE_OFFER_MAGIC_OFFSET": UInt64(CPC_WIRE_SOURCE_OFFER_MAGIC_OFFSET),
        "SOURCE_OFFER_VERSION_OFFSET": UInt64(CPC_WIRE_SOURCE_OFFER_VERSION_OFFSET),
        "SOURCE_OFFER_STATUS_OFFSET": UInt64(CPC_WIRE_SOURCE_OFFER_STATUS_OFFSET),
        "SOURCE_OFFER_ADDRESS_OFFSET": UInt64(CPC_WIRE_SOURCE_OFFER_ADDRESS_OFFSET),
        "SOURCE_OFFER_LENGTH_OFFSET": UInt64(CPC_WIRE_SOURCE_OFFER_LENGTH_OFFSET),
        "SOURCE_OFFER_REASON_LENGTH_OFFSET": UInt64(CPC_WIRE_SOURCE_OFFER_REASON_LENGTH_OFFSET),
        "SOURCE_OFFER_ARMED": UInt64(CPC_WIRE_SOURCE_OFFER_ARMED),
        "SOURCE_OFFER_UNAVAILABLE": UInt64(CPC_WIRE_SOURCE_OFFER_UNAVAILABLE),
    ]

    /// The header's constant for each message type: a switch, so that a
    /// Swift type without one does not compile.
    static func constant(for type: MessageType) -> (name: String, value: Int32) {
        switch type {
        case .hello: ("TYPE_HELLO", CPC_WIRE_TYPE_HELLO)
        case .welcome: ("TYPE_WELCOME", CPC_WIRE_TYPE_WELCOME)
        case .pages: ("TYPE_PAGES", CPC_WIRE_TYPE_PAGES)
        case .zeroPages: ("TYPE_ZERO_PAGES", CPC_WIRE_TYPE_ZERO_PAGES)
        case .roundEnd: ("TYPE_ROUND_END", CPC_WIRE_TYPE_ROUND_END)
        case .dirtyBitmap: ("TYPE_DIRTY_BITMAP", CPC_WIRE_TYPE_DIRTY_BITMAP)
        case .switchover: ("TYPE_SWITCHOVER", CPC_WIRE_TYPE_SWITCHOVER)
        case .resumed: ("TYPE_RESUMED", CPC_WIRE_TYPE_RESUMED)
        case .pageRequest: ("TYPE_PAGE_REQUEST", CPC_WIRE_TYPE_PAGE_REQUEST)
        case .complete: ("TYPE_COMPLETE", CPC_WIRE_TYPE_COMPLETE)
        case .error: ("TYPE_ERROR", CPC_WIRE_TYPE_ERROR)
        case .heartbeat: ("TYPE_HEARTBEAT", CPC_WIRE_TYPE_HEARTBEAT)
        case .resync: ("TYPE_RESYNC", CPC_WIRE_TYPE_RESYNC)
        case .imageDigest: ("TYPE_IMAGE_DIGEST", CPC_WIRE_TYPE_IMAGE_DIGEST)
        case .handedOver: ("TYPE_HANDED_OVER", CPC_WIRE_TYPE_HANDED_OVER)
        case .discard: ("TYPE_DISCARD", CPC_WIRE_TYPE_DISCARD)
        case .vmmOffer: ("TYPE_VMM_OFFER", CPC_WIRE_TYPE_VMM_OFFER)
        case .vmmAttach: ("TYPE_VMM_ATTACH", CPC_WIRE_TYPE_VMM_ATTACH)
        case .vmmResume: ("TYPE_VMM_RESUME", CPC_WIRE_TYPE_VMM_RESUME)
        case .vmmComplete: ("TYPE_VMM_COMPLETE", CPC_WIRE_TYPE_VMM_COMPLETE)
        case .vmmHandback: ("TYPE_VMM_HANDBACK", CPC_WIRE_TYPE_VMM_HANDBACK)
        case .vmmReattach: ("TYPE_VMM_REATTACH", CPC_WIRE_TYPE_VMM_REATTACH)
        case .vmmResumed: ("TYPE_VMM_RESUMED", CPC_WIRE_TYPE_VMM_RESUMED)
        }
    }

    /// The header's constant for each ERROR code Swift knows; nil for `unknown`.
    static func constant(for code: ErrorCode) -> (name: String, value: Int32)? {
        switch code {
        case .protocolViolation: ("CODE_PROTOCOL", CPC_WIRE_CODE_PROTOCOL)
        case .incompatible: ("CODE_INCOMPATIBLE", CPC_WIRE_CODE_INCOMPATIBLE)
        case .outOfRange: ("CODE_OUT_OF_RANGE", CPC_WIRE_CODE_OUT_OF_RANGE)
        case .checksum: ("CODE_CHECKSUM", CPC_WIRE_CODE_CHECKSUM)
        case .unexpectedMessage: ("CODE_UNEXPECTED_MESSAGE", CPC_WIRE_CODE_UNEXPECTED_MESSAGE)
        case .internalFailure: ("CODE_INTERNAL", CPC_WIRE_CODE_INTERNAL)
        case .cancelled: ("CODE_CANCELLED", CPC_WIRE_CODE_CANCELLED)
        case .peerLost: ("CODE_PEER_LOST", CPC_WIRE_CODE_PEER_LOST)
        case .refused: ("CODE_REFUSED", CPC_WIRE_CODE_REFUSED)
        case .discarded: ("CODE_DISCARDED", CPC_WIRE_CODE_DISCARDED)
        case .unknown: nil
        }
    }

    static func constant(for kind: HandbackKind) -> (name: String, value: Int32) {
        switch kind {
        case .ram: ("HANDBACK_RAM", CPC_WIRE_HANDBACK_RAM)
        case .pageState: ("HANDBACK_PAGE_STATE", CPC_WIRE_HANDBACK_PAGE_STATE)
        }
    }
}

// MARK: - the header's text, and bytes laid out by it

extension WireDefinitionTests {
    /// The `#define CPC_WIRE_NAME value` lines of postcopy_wire.h.
    struct HeaderText {
        /// Name without the prefix → value.
        let values: [String: UInt64]

        func names(prefix: String) -> Set<String> { Set(values.keys.filter { $0.hasPrefix(prefix) }) }
    }

    static let header: HeaderText = {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Sources/CPostcopy/include/postcopy_wire.h").path
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        var values: [String: UInt64] = [:]
        for line in text.split(separator: "\n") {
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            guard words.count >= 3, words[0] == "#define", words[1].hasPrefix("CPC_WIRE_") else { continue }
            var literal = words[2].lowercased()
            if literal.hasSuffix("u") { literal.removeLast() }
            let value = literal.hasPrefix("0x") ? UInt64(literal.dropFirst(2), radix: 16) : UInt64(literal)
            values[String(words[1].dropFirst("CPC_WIRE_".count))] = value ?? .max
        }
        return HeaderText(values: values)
    }()

    /// CRC-32C as the header defines it.
    static func crc32c(_ bytes: [UInt8]) -> UInt32 {
        var crc = CPC_WIRE_CRC32C_INITIAL
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = (crc >> 1) ^ (crc & 1 == 0 ? 0 : CPC_WIRE_CRC32C_POLYNOMIAL) }
        }
        return crc ^ CPC_WIRE_CRC32C_INITIAL
    }

    /// The checksum of a whole frame, by the header's layout.
    static func checksum(_ frame: [UInt8]) -> UInt32 {
        crc32c(Array(frame[..<Int(CPC_WIRE_CHECKSUMMED_BYTES)]) + Array(frame[Int(CPC_WIRE_HEADER_BYTES)...]))
    }

    /// A whole frame laid out by the header.
    static func frame(type: Int32, payload: [UInt8]) -> [UInt8] {
        var frame = [UInt8](repeating: 0, count: Int(CPC_WIRE_HEADER_BYTES)) + payload
        write(&frame, UInt64(CPC_WIRE_MAGIC), at: CPC_WIRE_HEADER_MAGIC_OFFSET, width: 4)
        write(&frame, UInt64(CPC_WIRE_VERSION), at: CPC_WIRE_HEADER_VERSION_OFFSET, width: 1)
        write(&frame, UInt64(type), at: CPC_WIRE_HEADER_TYPE_OFFSET, width: 1)
        write(&frame, UInt64(payload.count), at: CPC_WIRE_HEADER_LENGTH_OFFSET, width: 4)
        write(&frame, UInt64(checksum(frame)), at: CPC_WIRE_HEADER_CHECKSUM_OFFSET, width: 4)
        return frame
    }
}

/// The one message in `frame`, as the VMM socket's decoder reads it.
private func decode(_ frame: [UInt8]) throws -> VMMMessage? {
    var decoder = VMMFrameDecoder()
    frame.withUnsafeBytes { decoder.append($0) }
    return try decoder.next()
}

/// The one message in `frame`, as an agent connection's decoder reads it.
private func decodeAgent(_ frame: [UInt8]) throws -> Message? {
    var decoder = FrameDecoder()
    frame.withUnsafeBytes { decoder.append($0) }
    return try decoder.next()
}

/// The payload of `message`'s frame, as Swift encodes it.
private func payload(_ message: some WireMessage) -> [UInt8] { Array(message.encoded().dropFirst(FrameHeader.size)) }

/// The little-endian integer of `width` bytes at `offset`.
private func read(_ bytes: [UInt8], at offset: Int32, width: Int) -> UInt64 {
    (0..<width).reduce(0) { value, index in value | UInt64(bytes[Int(offset) + index]) << (8 * index) }
}

private func write(_ bytes: inout [UInt8], _ value: UInt64, at offset: Int32, width: Int) {
    for index in 0..<width { bytes[Int(offset) + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
}
