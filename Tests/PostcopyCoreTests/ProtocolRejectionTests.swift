import PostcopyCore
import Testing

@Suite struct ProtocolRejectionTests {
    /// Feeds `bytes` to an agent connection's decoder and expects `error` from `next()`.
    func expectRejected(_ bytes: [UInt8], _ error: ProtocolError, maxPayload: Int = FrameDecoder.defaultMaxPayload,
                        sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(throws: error, sourceLocation: sourceLocation) { try Wire.decodeAll(bytes, maxPayload: maxPayload) }
    }

    /// Feeds `bytes` to the VMM socket's decoder and expects `error` from `next()`.
    func expectVMMRejected(_ bytes: [UInt8], _ error: ProtocolError, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(throws: error, sourceLocation: sourceLocation) { try Wire.decodeAll(bytes, as: VMMMessage.self) }
    }

    /// Each conversation refuses the other's types from the header, before
    /// any payload: a VMM_* frame on an agent connection, an agent's frame
    /// on the VMM socket. ERROR and HEARTBEAT travel on both.
    @Test func eachSocketRefusesTheOthersTypes() throws {
        for type in MessageType.allCases {
            let header = Array(Wire.frame(type: type.rawValue, payload: [], length: 8)[..<16])
            switch type.socket {
            case .vmm:
                expectRejected(header, .wrongSocket(type: type, received: .agent))
            case .agent:
                expectVMMRejected(header, .wrongSocket(type: type, received: .vmm))
            case .either:
                #expect(try Wire.decodeAll(Message.heartbeat.encoded()) == [.heartbeat])
                #expect(try Wire.decodeAll(VMMMessage.heartbeat.encoded(), as: VMMMessage.self) == [.heartbeat])
            }
        }
        #expect(ProtocolError.wrongSocket(type: .vmmOffer, received: .agent).description
            == "VMM_OFFER travels on the VMM socket, not on an agent connection")
        #expect(ProtocolError.wrongSocket(type: .pages, received: .vmm).code == .protocolViolation)
        // Decoding a payload directly refuses the other socket's type too.
        #expect(throws: ProtocolError.wrongSocket(type: .vmmResume, received: .agent)) {
            try Message.decode(type: .vmmResume, payload: [])
        }
        #expect(throws: ProtocolError.wrongSocket(type: .handedOver, received: .vmm)) {
            try VMMMessage.decode(type: .handedOver, payload: [])
        }
    }

    @Test func badMagic() {
        expectRejected(Wire.frame(type: 12, payload: [], magic: 0x1234_5678), .badMagic(0x1234_5678))
        expectRejected(Array("GET / HTTP/1.1\r\n\r\n".utf8), .badMagic(0x2054_4547))
        #expect(ProtocolError.badMagic(0x1234_5678).description == "bad magic 0x12345678 (expected PCPY)")
    }

    @Test func badVersion() {
        expectRejected(Wire.frame(type: 12, payload: [], version: 1), .unsupportedVersion(1))
        // Version 2 carried the image digest in SWITCHOVER and VMM_RESUME.
        expectRejected(Wire.frame(type: 12, payload: [], version: 2), .unsupportedVersion(2))
        // Version 3 had no point of no return (SWITCHOVER of 16 bytes).
        expectRejected(Wire.frame(type: 12, payload: [], version: 3), .unsupportedVersion(3))
        // Version 4 had one bulk stream (HELLO of 62 bytes).
        expectRejected(Wire.frame(type: 12, payload: [], version: 4), .unsupportedVersion(4))
        expectRejected(Wire.frame(type: 12, payload: [], version: 6), .unsupportedVersion(6))
        expectRejected(Wire.frame(type: 12, payload: [], version: 0), .unsupportedVersion(0))
        #expect(ProtocolError.unsupportedVersion(4).description
            == "unsupported protocol version 4 (this build speaks 5)")
    }

    @Test func nonzeroFlags() {
        expectRejected(Wire.frame(type: 12, payload: [], flags: 1), .nonzeroFlags(1))
        expectRejected(Wire.frame(type: 12, payload: [], flags: 0x8000), .nonzeroFlags(0x8000))
    }

    @Test(arguments: [0, 17, 31, 39, 99, 255] as [UInt8])
    func unknownType(_ type: UInt8) {
        expectRejected(Wire.frame(type: type, payload: []), .unknownType(type))
        #expect(ProtocolError.unknownType(99).description == "unknown message type 99")
    }

    @Test func oversizeLengthIsRefusedBeforeThePayloadArrives() throws {
        var decoder = FrameDecoder()
        let header = Array(Wire.frame(type: MessageType.pages.rawValue, payload: [], length: 9_000_000)[..<16])
        decoder.append(Array(header[..<15]))
        #expect(try decoder.next() == nil)
        decoder.append([header[15]])
        #expect(throws: ProtocolError.payloadTooLarge(announced: 9_000_000, limit: 4_259_840)) { try decoder.next() }
        #expect(decoder.bufferedByteCount == 0)
        #expect(ProtocolError.payloadTooLarge(announced: 9_000_000, limit: 4_259_840).description
            == "frame announces 9000000 bytes, limit 4259840")
    }

    @Test func maxPayloadIsTheDecodersChoice() throws {
        let twoPages = Message.pages(requestID: 0, firstPage: 0, data: Wire.pageData(pages: 2, seed: 1)[...])
        expectRejected(twoPages.encoded(), .payloadTooLarge(announced: 8208, limit: 8207), maxPayload: 8207)
        #expect(try Wire.decodeAll(twoPages.encoded(), maxPayload: 8208) == [twoPages])
        var decoder = FrameDecoder()
        decoder.append(Array(Wire.frame(type: 3, payload: [], length: 16 + 1024 * 4096)[..<16]))
        #expect(try decoder.next() == nil, "a header announcing 1024 pages passes the default limit")
        #expect(decoder.failure == nil)
    }

    /// Every fixed-length type, one byte short and one byte long: refused from the header alone.
    @Test(arguments: MessageType.allCases)
    func wrongFixedLengthIsRefusedFromTheHeader(_ type: MessageType) throws {
        guard case let .exactly(length) = type.allowedPayloadLength else { return }
        for wrong in [length - 1, length + 1] where wrong >= 0 {
            let header = Array(Wire.frame(type: type.rawValue, payload: [], length: UInt32(wrong))[..<16])
            let error = ProtocolError.payloadLength(type: type, actual: wrong, expected: .exactly(length))
            if type.socket == .vmm { expectVMMRejected(header, error) } else { expectRejected(header, error) }
        }
    }

    @Test func wrongVariableLengths() {
        let oneLongPage = Wire.le(UInt32(0)) + Wire.le(UInt64(0)) + Wire.le(UInt32(1)) + [UInt8](repeating: 0, count: 4084)
        expectRejected(Wire.frame(type: 3, payload: oneLongPage),
                       .payloadLength(type: .pages, actual: 4100, expected: .pages(count: 1)))
        #expect(ProtocolError.payloadLength(type: .pages, actual: 4100, expected: .pages(count: 1)).description
            == "PAGES payload is 4100 bytes, expected 16 + 1 × 4096 = 4112")
        let twoPagesAnnounced = Wire.le(UInt32(0)) + Wire.le(UInt64(0)) + Wire.le(UInt32(2)) + [UInt8](repeating: 0, count: 4096)
        expectRejected(Wire.frame(type: 3, payload: twoPagesAnnounced),
                       .payloadLength(type: .pages, actual: 4112, expected: .pages(count: 2)))
        expectRejected(Array(Wire.frame(type: 3, payload: [], length: 15)[..<16]),
                       .payloadLength(type: .pages, actual: 15, expected: .atLeast(16)))

        let threeWordsAnnounced = Wire.le(UInt64(64 * 3)) + Wire.le(UInt64(0)) + Wire.le(UInt32(3)) + [UInt8](repeating: 0, count: 16)
        expectRejected(Wire.frame(type: 6, payload: threeWordsAnnounced),
                       .payloadLength(type: .dirtyBitmap, actual: 36, expected: .bitmapWords(count: 3)))
        #expect(ProtocolError.payloadLength(type: .dirtyBitmap, actual: 36, expected: .bitmapWords(count: 3)).description
            == "DIRTY_BITMAP payload is 36 bytes, expected 20 + 3 × 8 = 44")
        expectRejected(Array(Wire.frame(type: 6, payload: [], length: 19)[..<16]),
                       .payloadLength(type: .dirtyBitmap, actual: 19, expected: .atLeast(20)))

        expectRejected(Wire.frame(type: 11, payload: [1]), .payloadLength(type: .error, actual: 1, expected: .between(2, 1026)))
        #expect(ProtocolError.payloadLength(type: .hello, actual: 29, expected: .exactly(30)).description
            == "HELLO payload is 29 bytes, expected 30")
    }

    /// VMM_COMPLETE is 32 bytes from the daemon (the digest) and 0 from the
    /// VMM: any other length is refused from the header.
    @Test func vmmCompleteIsEmptyOrADigest() throws {
        #expect(MessageType.vmmComplete.allowedPayloadLength == .either(0, 32))
        for wrong in [1, 16, 31, 33, 48] {
            let header = Array(Wire.frame(type: 35, payload: [], length: UInt32(wrong))[..<16])
            expectVMMRejected(header, .payloadLength(type: .vmmComplete, actual: wrong, expected: .either(0, 32)))
        }
        #expect(ProtocolError.payloadLength(type: .vmmComplete, actual: 31, expected: .either(0, 32)).description
            == "VMM_COMPLETE payload is 31 bytes, expected 0 or 32")
    }

    /// Version 4: a SWITCHOVER of version 3's 16 bytes, one with a flag
    /// this version does not define, a HANDED_OVER or VMM_RESUMED with a
    /// payload, and a DISCARD that is not UTF-8 are refused.
    @Test func pointOfNoReturnFramesAreChecked() throws {
        expectRejected(Wire.frame(type: 7, payload: [UInt8](repeating: 0, count: 16)),
                       .payloadLength(type: .switchover, actual: 16, expected: .exactly(20)))
        expectRejected(Wire.frame(type: 7, payload: [UInt8](repeating: 0, count: 16) + Wire.le(UInt32(2))),
                       .invalidField(type: .switchover, field: "flags", value: 2))
        expectRejected(Wire.frame(type: 15, payload: [0]), .payloadLength(type: .handedOver, actual: 1, expected: .exactly(0)))
        expectVMMRejected(Wire.frame(type: 38, payload: [0]), .payloadLength(type: .vmmResumed, actual: 1, expected: .exactly(0)))
        expectRejected(Wire.frame(type: 16, payload: [0xC3]), .invalidUTF8)
        expectRejected(Wire.frame(type: 16, payload: [UInt8](repeating: 0x41, count: Message.maxErrorMessageBytes + 1)),
                       .payloadLength(type: .discard, actual: Message.maxErrorMessageBytes + 1,
                                      expected: .between(0, Message.maxErrorMessageBytes)))
    }

    /// The digest moved out of SWITCHOVER and VMM_RESUME: a version 2
    /// sender's lengths are refused, and IMAGE_DIGEST is exactly 32 bytes.
    @Test func theDigestsOldAndNewPlaces() throws {
        expectRejected(Wire.frame(type: 7, payload: [UInt8](repeating: 0, count: 48)),
                       .payloadLength(type: .switchover, actual: 48, expected: .exactly(20)))
        expectVMMRejected(Wire.frame(type: 34, payload: Wire.digest.bytes),
                          .payloadLength(type: .vmmResume, actual: 32, expected: .exactly(0)))
        for wrong in [0, 31, 33, 64] {
            expectRejected(Wire.frame(type: 14, payload: [UInt8](repeating: 7, count: wrong)),
                           .payloadLength(type: .imageDigest, actual: wrong, expected: .exactly(32)))
        }
        #expect(try Wire.decodeAll(Wire.frame(type: 14, payload: Wire.digest.bytes)) == [.imageDigest(Wire.digest)])
    }

    @Test func errorMessageLongerThan1024BytesIsRefused() throws {
        let payload = Wire.le(UInt16(6)) + [UInt8](repeating: UInt8(ascii: "x"), count: 1025)
        expectRejected(Wire.frame(type: 11, payload: payload),
                       .payloadLength(type: .error, actual: 1027, expected: .between(2, 1026)))
        let longest = Wire.le(UInt16(6)) + [UInt8](repeating: UInt8(ascii: "x"), count: 1024)
        #expect(try Wire.decodeAll(Wire.frame(type: 11, payload: longest))
            == [.error(code: .internalFailure, message: String(repeating: "x", count: 1024))])
    }

    @Test(arguments: [[0xFF], [0x61, 0xC3], [0xC0, 0x80], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80]] as [[UInt8]])
    func errorMessageThatIsNotUTF8IsRefused(_ text: [UInt8]) {
        expectRejected(Wire.frame(type: 11, payload: Wire.le(UInt16(1)) + text), .invalidUTF8)
    }

    @Test func badChecksum() throws {
        var pages = Message.pages(requestID: 1, firstPage: 2, data: Wire.pageData(pages: 1, seed: 4)[...]).encoded()
        let good: UInt32 = pages[12..<16].enumerated().reduce(0) { $0 | UInt32($1.element) << (8 * $1.offset) }
        pages[16 + 16 + 2000] ^= 0x10
        let computed = CRC32C.checksum(Array(pages[16...]), seed: CRC32C.checksum(Array(pages[..<12])))
        expectRejected(pages, .checksumMismatch(type: .pages, computed: computed, announced: good))

        // COMPLETE (10) and ERROR (11) differ in one bit, and COMPLETE's 24
        // bytes are a length ERROR admits: only the checksum can catch it.
        var resume = Message.complete(pagesReceived: 1, faultsClean: 2, faultsStale: 3).encoded()
        resume[5] ^= 0x01
        #expect(throws: ProtocolError.self) { try Wire.decodeAll(resume) }
        do {
            _ = try Wire.decodeAll(resume)
        } catch {
            guard case let .checksumMismatch(type, _, _) = error else {
                Issue.record("expected a checksum mismatch, got \(error)")
                return
            }
            #expect(type == .error)
            #expect(error.code == .checksum)
            #expect(error.description.hasPrefix("checksum mismatch on ERROR frame (computed 0x"))
        }

        var heartbeat = Message.heartbeat.encoded()
        heartbeat[13] ^= 0x80
        #expect(throws: ProtocolError.self) { try Wire.decodeAll(heartbeat) }
    }

    @Test func truncatedInputIsNotAnError() throws {
        let frames = [Message.hello(migrationID: Wire.migrationID, role: .bulk, sourcePageSize: .small, regionSize: 1 << 20, secret: .test),
                      .pages(requestID: 0, firstPage: 1, data: Wire.pageData(pages: 1, seed: 8)[...]),
                      .heartbeat]
        for frame in frames {
            let bytes = frame.encoded()
            for length in 0..<bytes.count {
                var decoder = FrameDecoder()
                decoder.append(Array(bytes[..<length]))
                #expect(try decoder.next() == nil)
                #expect(decoder.failure == nil)
            }
        }
    }

    @Test func theDecoderStaysFailed() throws {
        var decoder = FrameDecoder()
        decoder.append(Message.heartbeat.encoded() + Wire.frame(type: 99, payload: []))
        #expect(try decoder.next() == .heartbeat)
        #expect(throws: ProtocolError.unknownType(99)) { try decoder.next() }
        decoder.append(Message.heartbeat.encoded())
        for _ in 0..<3 {
            #expect(throws: ProtocolError.unknownType(99)) { try decoder.next() }
        }
        #expect(decoder.failure == .unknownType(99))
        #expect(decoder.bufferedByteCount == 0)
    }

    @Test func zeroCounts() {
        let fields = Wire.le(UInt32(5)) + Wire.le(UInt64(10)) + Wire.le(UInt32(0))
        expectRejected(Wire.frame(type: 3, payload: fields), .zeroCount(type: .pages))
        expectRejected(Wire.frame(type: 9, payload: fields), .zeroCount(type: .pageRequest))
        expectRejected(Wire.frame(type: 4, payload: Wire.le(UInt64(10)) + Wire.le(UInt32(0))), .zeroCount(type: .zeroPages))
        let bitmap = Wire.le(UInt64(64)) + Wire.le(UInt64(0)) + Wire.le(UInt32(0))
        expectRejected(Wire.frame(type: 6, payload: bitmap), .zeroCount(type: .dirtyBitmap))
        #expect(ProtocolError.zeroCount(type: .zeroPages).code == .protocolViolation)
    }

    @Test func undefinedFieldValues() {
        func hello(role: UInt8 = 0, reserved: UInt8 = 0, pageSize: UInt32 = 4096, streams: UInt8 = 1, index: UInt8 = 0) -> [UInt8] {
            Wire.frame(type: 1, payload: Wire.migrationID.bytes + [role, reserved] + Wire.le(pageSize) + Wire.le(UInt64(1 << 20))
                + MigrationSecret.test.bytes + [streams, index])
        }
        #expect(throws: Never.self) { try Wire.decodeAll(hello()) }
        #expect(throws: Never.self) { try Wire.decodeAll(hello(streams: 8, index: 7)) }
        expectRejected(hello(role: 2), .invalidField(type: .hello, field: "role", value: 2))
        expectRejected(hello(reserved: 2), .invalidField(type: .hello, field: "flags", value: 2))
        expectRejected(hello(pageSize: 8192), .unsupportedPageSize(type: .hello, bytes: 8192))
        // 1 … 8 bulk streams; a bulk stream's index below their count; the
        // urgent connection's 0.
        expectRejected(hello(streams: 0), .bulkStreamCount(0))
        expectRejected(hello(streams: 9, index: 0), .bulkStreamCount(9))
        expectRejected(hello(streams: 2, index: 2), .streamIndexOutOfRange(role: .bulk, index: 2, bulkStreams: 2))
        expectRejected(hello(role: 1, streams: 2, index: 1), .streamIndexOutOfRange(role: .urgent, index: 1, bulkStreams: 2))
        #expect(ProtocolError.bulkStreamCount(9).description == "HELLO says the migration has 9 bulk streams; it may have 1 to 8")
        #expect(ProtocolError.streamIndexOutOfRange(role: .bulk, index: 2, bulkStreams: 2).description
            == "HELLO for bulk stream 2, but says the migration has 2 (0 to 1)")
        #expect(ProtocolError.streamIndexOutOfRange(role: .urgent, index: 1, bulkStreams: 2).description
            == "HELLO for the urgent connection names stream 1; it must be 0")
        #expect(ProtocolError.streamIndexOutOfRange(role: .bulk, index: 2, bulkStreams: 2).code == .protocolViolation)
        expectRejected(Wire.frame(type: 2, payload: Wire.le(UInt64(1 << 20)) + Wire.le(UInt32(0))),
                       .unsupportedPageSize(type: .welcome, bytes: 0))
        expectVMMRejected(Wire.frame(type: 32, payload: Wire.le(UInt64(1 << 20)) + Wire.le(UInt32(65536)) + Wire.le(UInt64(0))),
                          .unsupportedPageSize(type: .vmmOffer, bytes: 65536))
        expectVMMRejected(Wire.frame(type: 36, payload: Wire.le(UInt32(3))), .invalidField(type: .vmmHandback, field: "kind", value: 3))
        #expect(ProtocolError.unsupportedPageSize(type: .hello, bytes: 8192).code == .incompatible)
    }

    @Test func errorsMapToTheCodeSentBack() {
        #expect(ProtocolError.badMagic(0).code == .protocolViolation)
        #expect(ProtocolError.unsupportedVersion(2).code == .incompatible)
        #expect(ProtocolError.checksumMismatch(type: .pages, computed: 1, announced: 2).code == .checksum)
        #expect(ProtocolError.pageRangeOutOfBounds(type: .pages, firstPage: 0, count: 1, regionPages: 0).code == .outOfRange)
        #expect(Message.reporting(.unknownType(99)) == .error(code: .protocolViolation, message: "unknown message type 99"))
    }
}

@Suite struct ProtocolValidationTests {
    let limits = RegionLimits(smallPageCount: 110)

    func page(_ count: Int) -> ArraySlice<UInt8> { [UInt8](repeating: 0, count: count * 4096)[...] }

    @Test func rangesInsideTheRegionPass() throws {
        try Message.pages(requestID: 0, firstPage: 0, data: page(1)).validate(against: limits)
        try Message.pages(requestID: 0, firstPage: 100, data: page(10)).validate(against: limits)
        try Message.zeroPages(firstPage: 109, count: 1).validate(against: limits)
        try Message.pageRequest(requestID: 1, firstPage: 0, count: 110).validate(against: limits)
        for message in Wire.samples where ![.pages, .zeroPages, .pageRequest, .dirtyBitmap].contains(message.type) {
            try message.validate(against: limits)
        }
    }

    @Test func rangesOutsideTheRegionFail() {
        #expect(throws: ProtocolError.pageRangeOutOfBounds(type: .pages, firstPage: 100, count: 20, regionPages: 110)) {
            try Message.pages(requestID: 0, firstPage: 100, data: page(20)).validate(against: limits)
        }
        #expect(ProtocolError.pageRangeOutOfBounds(type: .pages, firstPage: 100, count: 20, regionPages: 110).description
            == "page range 100..<120 outside the region's 110 pages")
        #expect(throws: ProtocolError.pageRangeOutOfBounds(type: .zeroPages, firstPage: 110, count: 1, regionPages: 110)) {
            try Message.zeroPages(firstPage: 110, count: 1).validate(against: limits)
        }
        #expect(throws: ProtocolError.pageRangeOutOfBounds(type: .pageRequest, firstPage: 1, count: 110, regionPages: 110)) {
            try Message.pageRequest(requestID: 1, firstPage: 1, count: 110).validate(against: limits)
        }
        #expect(throws: ProtocolError.self) {
            try Message.pages(requestID: 0, firstPage: 0, data: page(1)).validate(against: RegionLimits(smallPageCount: 0))
        }
    }

    @Test func rangesWhoseEndOverflowsFail() {
        let huge = RegionLimits(smallPageCount: .max)
        #expect(throws: ProtocolError.pageRangeOutOfBounds(type: .zeroPages, firstPage: .max, count: 2, regionPages: .max)) {
            try Message.zeroPages(firstPage: .max, count: 2).validate(against: huge)
        }
        #expect(throws: ProtocolError.self) {
            try Message.pageRequest(requestID: 3, firstPage: .max - 5, count: .max).validate(against: huge)
        }
        #expect(throws: ProtocolError.self) {
            try Message.pages(requestID: 0, firstPage: .max, data: page(1)).validate(against: huge)
        }
        #expect(ProtocolError.pageRangeOutOfBounds(type: .zeroPages, firstPage: .max, count: 2, regionPages: .max).description
            == "page range 18446744073709551615..<(18446744073709551615 + 2, past 2^64) outside the region's 18446744073709551615 pages")
    }

    @Test func bitmaps() throws {
        // 110 pages: two words, the second with 46 valid bits.
        try Message.dirtyBitmap(totalBits: 110, firstWord: 0, words: [.max, (1 << 46) - 1]).validate(against: limits)
        try Message.dirtyBitmap(totalBits: 110, firstWord: 1, words: [1 << 45]).validate(against: limits)
        try Message.dirtyBitmap(totalBits: 110, firstWord: 0, words: [.max]).validate(against: limits)
        try Message.dirtyBitmap(totalBits: 128, firstWord: 1, words: [.max])
            .validate(against: RegionLimits(smallPageCount: 128))

        #expect(throws: ProtocolError.bitmapSizeMismatch(totalBits: 128, regionPages: 110)) {
            try Message.dirtyBitmap(totalBits: 128, firstWord: 0, words: [0]).validate(against: limits)
        }
        #expect(throws: ProtocolError.bitmapWordsOutOfBounds(firstWord: 1, wordCount: 2, totalBits: 110)) {
            try Message.dirtyBitmap(totalBits: 110, firstWord: 1, words: [0, 0]).validate(against: limits)
        }
        #expect(throws: ProtocolError.bitmapWordsOutOfBounds(firstWord: .max, wordCount: 2, totalBits: 110)) {
            try Message.dirtyBitmap(totalBits: 110, firstWord: .max, words: [0, 0]).validate(against: limits)
        }
        #expect(throws: ProtocolError.bitmapStrayBits(totalBits: 110, lastWord: 1 << 46)) {
            try Message.dirtyBitmap(totalBits: 110, firstWord: 1, words: [1 << 46]).validate(against: limits)
        }
        #expect(ProtocolError.bitmapWordsOutOfBounds(firstWord: 1, wordCount: 2, totalBits: 110).description
            == "dirty bitmap words 1..<3 outside the 2 words of a 110-page bitmap")
        #expect(ProtocolError.bitmapSizeMismatch(totalBits: 128, regionPages: 110).code == .incompatible)
        #expect(ProtocolError.bitmapStrayBits(totalBits: 110, lastWord: 1 << 46).code == .outOfRange)
    }

    @Test func limitsFromAGeometry() throws {
        let geometry = try PageGeometry(regionSize: 64 << 20, pageSize: .huge2M)
        #expect(RegionLimits(geometry).smallPageCount == 16384)
    }
}
