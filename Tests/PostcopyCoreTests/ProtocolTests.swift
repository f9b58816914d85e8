import PostcopyCore
import Testing

/// Raw frames and decoding helpers shared by the protocol tests.
enum Wire {
    /// `value`'s bytes, least significant first.
    static func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.littleEndian) { Array($0) }
    }

    /// A frame assembled by hand, with a correct checksum unless `checksum`
    /// is given, so that each field can be broken on its own.
    static func frame(type: UInt8, payload: [UInt8], magic: UInt32 = FrameHeader.magic,
                      version: UInt8 = FrameHeader.version, flags: UInt16 = 0,
                      length: UInt32? = nil, checksum: UInt32? = nil) -> [UInt8] {
        var bytes = le(magic) + [version, type] + le(flags) + le(length ?? UInt32(payload.count))
        let crc = checksum ?? CRC32C.checksum(payload, seed: CRC32C.checksum(bytes))
        bytes += le(crc) + payload
        return bytes
    }

    /// Every agent connection's message `bytes` holds, fed in one piece.
    static func decodeAll(_ bytes: [UInt8], maxPayload: Int = FrameDecoder.defaultMaxPayload)
        throws(ProtocolError) -> [Message] {
        try decodeAll(bytes, as: Message.self, maxPayload: maxPayload)
    }

    /// Every message of `M`'s conversation `bytes` holds, fed in one piece.
    static func decodeAll<M: WireMessage>(_ bytes: [UInt8], as: M.Type, maxPayload: Int = M.maxPayload)
        throws(ProtocolError) -> [M] {
        var decoder = WireDecoder<M>(maxPayload: maxPayload)
        decoder.append(bytes)
        var messages: [M] = []
        while let message = try decoder.next() { messages.append(message) }
        return messages
    }

    /// Page data whose every byte depends on its page and position.
    static func pageData(pages: Int, seed: UInt64) -> [UInt8] {
        var generator = SplitMix64(seed: seed)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(pages * 4096)
        for _ in 0..<(pages * 512) {
            let word = generator.next()
            for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: word >> shift)) }
        }
        return bytes
    }

    static let migrationID = MigrationID(hex: "00112233445566778899aabbccddeeff")!
    static let digest = ImageDigest(bytes: (0..<32).map { UInt8($0 * 7) })!

    /// One message of every type, with values that fill their fields.
    static let samples: [Message] = [
        .hello(migrationID: migrationID, role: .bulk, sourcePageSize: .small, regionSize: 1 << 30, secret: .test),
        .hello(migrationID: migrationID, role: .urgent, sourcePageSize: .huge2M, regionSize: 64 << 30, secret: .test),
        .hello(migrationID: migrationID, role: .bulk, sourcePageSize: .small, regionSize: 1 << 30, secret: .test, resume: true),
        .welcome(regionSize: 1 << 30, destinationPageSize: .huge2M),
        .pages(requestID: 0, firstPage: 7, data: pageData(pages: 1, seed: 1)[...]),
        .pages(requestID: 0xDEAD_BEEF, firstPage: UInt64.max - 3, data: pageData(pages: 3, seed: 2)[...]),
        .zeroPages(firstPage: 1 << 40, count: 513),
        .roundEnd(round: 3, pagesSent: 262_144, dirtyPages: 1234),
        .dirtyBitmap(totalBits: 262_144, firstWord: 17, words: [0, 1, UInt64.max, 0x8000_0000_0000_0001]),
        .switchover(stalePages: 99, sourcePausedAtNanos: 1_700_000_000_123_456_789),
        .switchover(stalePages: 0, sourcePausedAtNanos: 1, handOver: true),
        .resumed(destinationResumedAtNanos: 1_700_000_000_223_456_789),
        .resync(stalePages: 0x0123_4567_89AB),
        .imageDigest(digest),
        .handedOver,
        .discard(reason: "QMP: the source QEMU's migration is 'failed' — zurück"),
        .discard(reason: ""),
        .pageRequest(requestID: 42, firstPage: 4096, count: 512),
        .complete(pagesReceived: 262_144, faultsClean: 1000, faultsStale: 37),
        .error(code: .outOfRange, message: "page range 100..<120 outside the region's 110 pages"),
        .error(code: .unknown(999), message: ""),
        .error(code: .peerLost, message: "zurück — 接続が切れた 🛑"),
        .heartbeat,
    ]

    /// One VMM socket message of every type, with values that fill their fields.
    static let vmmSamples: [VMMMessage] = [
        .offer(regionSize: 1 << 30, pageSize: .small, fileOffset: 1 << 21),
        .attach(guestBase: 0x7F00_0000_0000, features: [.minorShmem, .missingShmem], registerMode: 0b101),
        .resume,
        .resumed,
        .complete(imageDigest: digest),
        .complete(imageDigest: nil),
        .handback(.ram),
        .handback(.pageState),
        .reattach(guestBase: 0x7F00_0020_0000, features: [.minorHugetlbfs, .missingHugetlbfs], registerMode: 0b101),
        .error(code: .incompatible, message: "the VMM's userfaultfd lacks minor faults on shmem"),
        .heartbeat,
    ]
}

@Suite struct ProtocolChecksumTests {
    @Test func knownVectors() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum([]) == 0)
    }

    @Test func matchesTheBitwiseDefinitionAtEveryLengthAndAlignment() {
        func bitwise(_ bytes: ArraySlice<UInt8>) -> UInt32 {
            var crc: UInt32 = 0xFFFF_FFFF
            for byte in bytes {
                crc ^= UInt32(byte)
                for _ in 0..<8 { crc = crc & 1 == 1 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
            }
            return ~crc
        }
        let data = Wire.pageData(pages: 1, seed: 9)
        let available = CRC32C.Implementation.allCases.filter { $0 == .software || $0 == CRC32C.implementation }
        for start in 0..<8 {
            for length in 0..<70 {
                let slice = data[start..<(start + length)]
                let expected = bitwise(slice)
                #expect(slice.withUnsafeBytes { CRC32C.checksum($0) } == expected)
                for implementation in available {
                    #expect(slice.withUnsafeBytes { CRC32C.checksum($0, using: implementation) } == expected,
                            "\(implementation) at \(start)+\(length)")
                }
            }
        }
    }

    /// Both implementations agree on whole pages and on seeds, where the
    /// hardware one (when this CPU has it) is what frames are checked with.
    /// The hardware path runs three lanes of 8 KiB side by side on buffers of
    /// 24 KiB and more: lengths around those steps, at odd offsets.
    @Test func hardwareAndSoftwareAgree() {
        let data = Wire.pageData(pages: 260, seed: 21)
        for length in [0, 7, 12_288, 24_575, 24_576, 24_577, 49_152 + 13, 1 << 20, (1 << 20) + 7] {
            for start in [0, 3] {
                let slice = data[start..<(start + length)]
                for seed: UInt32 in [0, 0xDEAD_BEEF] {
                    let software = slice.withUnsafeBytes { CRC32C.checksum($0, seed: seed, using: .software) }
                    #expect(slice.withUnsafeBytes { CRC32C.checksum($0, seed: seed) } == software,
                            "\(length) bytes at \(start), seed \(seed)")
                }
            }
        }
    }

    @Test func continuesAcrossPieces() {
        let data = Wire.pageData(pages: 1, seed: 3)
        let whole = CRC32C.checksum(data)
        for split in [0, 1, 7, 12, 13, 100, 4095, 4096] {
            let head = Array(data[..<split]), tail = Array(data[split...])
            #expect(CRC32C.checksum(tail, seed: CRC32C.checksum(head)) == whole)
            var running = CRC32C()
            running.update(data[..<split])
            running.update(data[split...])
            #expect(running.value == whole)
        }
    }
}

@Suite struct ProtocolRoundTripTests {
    @Test func samplesCoverEveryMessageType() {
        #expect(Set(Wire.samples.map(\.type)) == Set(MessageType.allCases.filter { $0.socket.admits(.agent) }))
        #expect(Set(Wire.vmmSamples.map(\.type)) == Set(MessageType.allCases.filter { $0.socket.admits(.vmm) }))
    }

    @Test(arguments: Wire.vmmSamples)
    func everyVMMMessageSurvivesEncodeAndDecode(_ message: VMMMessage) throws {
        let bytes = message.encoded()
        var decoder = VMMFrameDecoder()
        decoder.append(bytes)
        #expect(try decoder.next() == message)
        #expect(try decoder.next() == nil)
        #expect(decoder.bufferedByteCount == 0)
    }

    @Test(arguments: Wire.samples)
    func everyMessageSurvivesEncodeAndDecode(_ message: Message) throws {
        let bytes = message.encoded()
        #expect(bytes.count == 16 + Int(bytes[8]) + Int(bytes[9]) << 8 + Int(bytes[10]) << 16)
        var decoder = FrameDecoder()
        decoder.append(bytes)
        #expect(try decoder.next() == message)
        #expect(try decoder.next() == nil)
        #expect(decoder.bufferedByteCount == 0)
    }

    @Test func headerLayout() {
        let bytes = Message.resumed(destinationResumedAtNanos: 0x0102_0304_0506_0708).encoded()
        #expect(Array(bytes[0..<4]) == Array("PCPY".utf8), "0x59504350 little-endian")
        #expect(bytes[4] == 5)
        #expect(bytes[5] == 8)
        #expect(Array(bytes[6..<8]) == [0, 0])
        #expect(Array(bytes[8..<12]) == [8, 0, 0, 0])
        #expect(Array(bytes[16...]) == [8, 7, 6, 5, 4, 3, 2, 1])
        let crc = CRC32C.checksum(Array(bytes[16...]), seed: CRC32C.checksum(Array(bytes[..<12])))
        #expect(Array(bytes[12..<16]) == Wire.le(crc))
    }

    @Test func helloPayloadLayout() {
        let hello = Message.hello(migrationID: Wire.migrationID, role: .urgent, sourcePageSize: .huge2M,
                                  regionSize: 0x0000_0010_0000_0000, secret: .test)
        let payload = Array(hello.encoded()[16...])
        #expect(payload.count == 64)
        #expect(Array(payload[0..<16]) == Wire.migrationID.bytes)
        #expect(payload[0] == 0x00 && payload[15] == 0xFF)
        #expect(payload[16] == 1 && payload[17] == 0)
        #expect(Array(payload[18..<22]) == Wire.le(UInt32(2_097_152)))
        #expect(Array(payload[22..<30]) == Wire.le(UInt64(0x0000_0010_0000_0000)))
        #expect(Array(payload[30..<62]) == MigrationSecret.test.bytes)
        // One bulk stream, and the urgent connection is stream 0.
        #expect(payload[62] == 1 && payload[63] == 0)
        #expect(!"\(hello)".contains(MigrationSecret.test.hex), "a HELLO's description shows its secret")
        let resume = Message.hello(migrationID: Wire.migrationID, role: .bulk, sourcePageSize: .small,
                                   regionSize: 1 << 20, secret: .test, resume: true)
        #expect(resume.encoded()[16 + 17] == Message.helloResumeFlag)
    }

    /// Version 5: HELLO says how many bulk streams the migration has (byte
    /// 62) and which of them the connection is (byte 63; 0 on the urgent
    /// connection), and round-trips them.
    @Test func helloNamesItsBulkStream() throws {
        let third = Message.hello(migrationID: Wire.migrationID, role: .bulk, sourcePageSize: .small,
                                  regionSize: 1 << 20, secret: .test, bulkStreams: 4, streamIndex: 2)
        let payload = Array(third.encoded()[16...])
        #expect(payload.count == 64 && payload[16] == 0 && payload[62] == 4 && payload[63] == 2)
        var decoder = FrameDecoder()
        decoder.append(third.encoded())
        #expect(try decoder.next() == third)
        #expect("\(third)".contains("role bulk stream 2 of 4"), "\(third)")
        let urgent = Message.hello(migrationID: Wire.migrationID, role: .urgent, sourcePageSize: .small,
                                   regionSize: 1 << 20, secret: .test, bulkStreams: 8)
        #expect(Array(urgent.encoded()[16...])[62...] == [8, 0])
        #expect("\(urgent)".contains("role urgent of 8 bulk streams"), "\(urgent)")
    }

    /// The image digest travels after the guest resumed: IMAGE_DIGEST from
    /// the agent, VMM_COMPLETE to the VMM; SWITCHOVER and VMM_RESUME no
    /// longer carry it.
    @Test func digestPayloadLayouts() throws {
        let digest = Array(Message.imageDigest(Wire.digest).encoded()[...])
        #expect(digest[5] == 14)
        #expect(Array(digest[16...]) == Wire.digest.bytes)
        let switchover = Message.switchover(stalePages: 0x0102, sourcePausedAtNanos: 0x0304).encoded()
        #expect(Array(switchover[16...]) == Wire.le(UInt64(0x0102)) + Wire.le(UInt64(0x0304)) + Wire.le(UInt32(0)))
        #expect(VMMMessage.resume.encoded().count == 16)
        #expect(Array(VMMMessage.complete(imageDigest: Wire.digest).encoded()[16...]) == Wire.digest.bytes)
        #expect(VMMMessage.complete(imageDigest: nil).encoded().count == 16)
        // The length tells the daemon's VMM_COMPLETE from the VMM's answer.
        #expect(try Wire.decodeAll(Wire.frame(type: 35, payload: []), as: VMMMessage.self) == [.complete(imageDigest: nil)])
        #expect(try Wire.decodeAll(Wire.frame(type: 35, payload: Wire.digest.bytes), as: VMMMessage.self)
            == [.complete(imageDigest: Wire.digest)])
        #expect("\(Message.imageDigest(Wire.digest))" == "IMAGE_DIGEST \(Wire.digest)")
        #expect("\(VMMMessage.complete(imageDigest: Wire.digest))" == "VMM_COMPLETE digest \(Wire.digest)")
        #expect("\(VMMMessage.complete(imageDigest: nil))" == "VMM_COMPLETE")
    }

    @Test func framesBackToBackFedOneByteAtATime() throws {
        let stream = Wire.samples.flatMap { $0.encoded() }
        var decoder = FrameDecoder()
        var decoded: [Message] = []
        for byte in stream {
            decoder.append([byte])
            while let message = try decoder.next() { decoded.append(message) }
        }
        #expect(decoded == Wire.samples)
        #expect(decoder.bufferedByteCount == 0)
    }

    /// As a socket feeds it: `receive` writes into the decoder's own buffer,
    /// a read may stop anywhere, and may be shorter than the room offered.
    @Test(arguments: [5, 6, 7] as [UInt64])
    func framesReceivedStraightIntoTheBuffer(seed: UInt64) throws {
        var generator = SplitMix64(seed: seed)
        let pages = Message.pages(requestID: 3, firstPage: 10, data: Wire.pageData(pages: 64, seed: seed)[...])
        let messages = (0..<40).map { index in index % 3 == 0 ? pages : Wire.samples.randomElement(using: &generator)! }
        let stream = messages.flatMap { $0.encoded() }
        var decoder = FrameDecoder()
        var decoded: [Message] = []
        var offset = 0
        while offset < stream.count {
            let room = Int.random(in: 1...300_000, using: &generator)
            let written = decoder.receive(upTo: room) { buffer in
                let count = min(buffer.count, Int.random(in: 1...room, using: &generator), stream.count - offset)
                stream[offset..<(offset + count)].withUnsafeBytes { buffer.copyMemory(from: $0) }
                return count
            }
            offset += written
            while let message = try decoder.next() { decoded.append(message) }
        }
        #expect(decoded == messages)
        #expect(decoder.bufferedByteCount == 0)
        // The end of the stream: nothing written, nothing buffered.
        #expect(decoder.receive(upTo: 4096) { _ in 0 } == 0)
        #expect(decoder.bufferedByteCount == 0)
    }

    @Test(arguments: [1, 2, 3, 0xC0FFEE] as [UInt64])
    func framesBackToBackFedInRandomChunks(seed: UInt64) throws {
        var generator = SplitMix64(seed: seed)
        let messages = (0..<60).map { _ in Wire.samples.randomElement(using: &generator)! }
        let stream = messages.flatMap { $0.encoded() }
        var decoder = FrameDecoder()
        var decoded: [Message] = []
        var offset = 0
        while offset < stream.count {
            let chunk = min(Int(generator.next() % 9000) + 1, stream.count - offset)
            stream[offset..<(offset + chunk)].withUnsafeBytes { decoder.append($0) }
            offset += chunk
            while let message = try decoder.next() { decoded.append(message) }
        }
        #expect(decoded == messages)
    }

    @Test func pagesEncodeFromRawBytesAndDecodeWithoutCopying() throws {
        let data = Wire.pageData(pages: 4, seed: 5)
        let message = Message.pages(requestID: 9, firstPage: 100, data: data[...])
        var direct: [UInt8] = [], head: [UInt8] = []
        data.withUnsafeBytes { raw in
            Message.encodePages(requestID: 9, firstPage: 100, pageData: raw, into: &direct)
            Message.encodePagesHead(requestID: 9, firstPage: 100, pageData: raw, into: &head)
        }
        #expect(direct == message.encoded())
        #expect(head.count == 32)
        #expect(head + data == direct)

        var decoder = FrameDecoder()
        decoder.append(Message.heartbeat.encoded() + direct)
        #expect(try decoder.next() == .heartbeat)
        guard case let .pages(requestID, firstPage, pages)? = try decoder.next() else {
            Issue.record("expected PAGES")
            return
        }
        #expect(requestID == 9 && firstPage == 100)
        #expect(pages.count == 4 * 4096)
        #expect(pages.startIndex == 16 + 32, "a slice of the decoder's buffer, past two headers")
        #expect(pages.elementsEqual(data))
    }

    @Test func aDecodedSliceStaysIntactWhenTheDecoderMovesOn() throws {
        let first = Wire.pageData(pages: 2, seed: 6), second = Wire.pageData(pages: 2, seed: 7)
        var decoder = FrameDecoder()
        decoder.append(Message.pages(requestID: 0, firstPage: 0, data: first[...]).encoded())
        let kept = try decoder.next()
        for _ in 0..<3 {
            decoder.append(Message.pages(requestID: 0, firstPage: 2, data: second[...]).encoded())
            #expect(try decoder.next() == .pages(requestID: 0, firstPage: 2, data: second[...]))
        }
        #expect(kept == .pages(requestID: 0, firstPage: 0, data: first[...]))
    }

    @Test func largeFramesInSmallReadsAcrossCompactions() throws {
        var generator = SplitMix64(seed: 11)
        let messages = (0..<12).map { index in
            Message.pages(requestID: UInt32(index), firstPage: UInt64(index) * 64,
                          data: Wire.pageData(pages: Int(generator.next() % 16) + 1, seed: UInt64(index))[...])
        }
        let stream = messages.flatMap { $0.encoded() }
        var decoder = FrameDecoder()
        var decoded: [Message] = []
        var offset = 0
        while offset < stream.count {
            let chunk = min(Int(generator.next() % 20000) + 1, stream.count - offset)
            decoder.append(Array(stream[offset..<(offset + chunk)]))
            offset += chunk
            while let message = try decoder.next() { decoded.append(message) }
            #expect(decoder.bufferedByteCount < 16 + 16 + 16 * 4096)
        }
        #expect(decoded == messages)
    }

    @Test func longErrorMessagesAreCutOnACharacterBoundary() throws {
        let text = "a" + String(repeating: "é", count: 600)
        let decoded = try Wire.decodeAll(Message.error(code: .internalFailure, message: text).encoded())
        guard case let .error(code, message)? = decoded.first else {
            Issue.record("expected ERROR")
            return
        }
        #expect(code == .internalFailure)
        #expect(message.utf8.count == 1023)
        #expect(message == "a" + String(repeating: "é", count: 511))
    }
}

@Suite struct ProtocolValueTests {
    @Test func migrationIDHex() {
        let id = Wire.migrationID
        #expect(id.description == "00112233445566778899aabbccddeeff")
        #expect(MigrationID(hex: "00112233445566778899AABBCCDDEEFF") == id)
        #expect(MigrationID(bytes: id.bytes) == id)
        #expect(id.high == 0x0011_2233_4455_6677 && id.low == 0x8899_AABB_CCDD_EEFF)
        #expect(MigrationID(hex: "00112233445566778899aabbccddeef") == nil, "31 digits")
        #expect(MigrationID(hex: "00112233445566778899aabbccddeeff0") == nil, "33 digits")
        #expect(MigrationID(hex: "0011223344556677-8899aabbccddeef") == nil)
        #expect(MigrationID(hex: "+0112233445566778899aabbccddeeff") == nil)
        #expect(MigrationID(hex: "g0112233445566778899aabbccddeeff") == nil)
        #expect(MigrationID(bytes: [1, 2, 3]) == nil)
        var generator = SplitMix64(seed: 1)
        let random = MigrationID(using: &generator)
        #expect(MigrationID(hex: random.description) == random)
    }

    @Test func imageDigestHex() {
        let digest = Wire.digest
        #expect(digest.description.count == 64)
        #expect(digest.description.hasPrefix("00070e151c"))
        #expect(ImageDigest(hex: digest.description) == digest)
        #expect(ImageDigest(bytes: digest.bytes) == digest)
        #expect(ImageDigest(bytes: [UInt8](repeating: 0, count: 31)) == nil)
    }

    @Test func errorCodes() {
        let known: [ErrorCode] = [.protocolViolation, .incompatible, .outOfRange, .checksum,
                                  .unexpectedMessage, .internalFailure, .cancelled, .peerLost, .refused, .discarded]
        #expect(known.map(\.rawValue) == Array(1...10))
        for code in known { #expect(ErrorCode(rawValue: code.rawValue) == code) }
        #expect(ErrorCode(rawValue: 0) == .unknown(0))
        #expect(ErrorCode(rawValue: 11).description == "code 11")
        #expect(ErrorCode.unknown(4) == .checksum)
        #expect(Set([ErrorCode.unknown(4), .checksum]).count == 1)
    }

    /// Since version 4, the point of no return: SWITCHOVER's flags word says
    /// whether a hand-over starts the guest; HANDED_OVER and VMM_RESUMED
    /// are empty; DISCARD carries its reason as UTF-8.
    @Test func pointOfNoReturnLayouts() throws {
        #expect(FrameHeader.version == 5)
        let flagged = Message.switchover(stalePages: 1, sourcePausedAtNanos: 2, handOver: true).encoded()
        #expect(Array(flagged[16...]) == Wire.le(UInt64(1)) + Wire.le(UInt64(2)) + Wire.le(UInt32(1)))
        let handedOver = Array(Message.handedOver.encoded()[...])
        #expect(handedOver.count == 16 && handedOver[5] == 15)
        let resumed = Array(VMMMessage.resumed.encoded()[...])
        #expect(resumed.count == 16 && resumed[5] == 38)
        let discard = Array(Message.discard(reason: "failed").encoded()[...])
        #expect(discard[5] == 16 && Array(discard[16...]) == Array("failed".utf8))
        #expect(Message.discard(reason: String(repeating: "x", count: 5000)).encoded().count
            == 16 + Message.maxErrorMessageBytes)
        #expect(ErrorCode(rawValue: 10) == .discarded && ErrorCode.discarded.description == "discarded")
    }

    @Test func messageTypesAndDescriptors() {
        #expect(MessageType.allCases.map(\.rawValue) == Array(1...16) + Array(32...38))
        #expect(MessageType.allCases.filter(\.carriesFileDescriptor)
            == [.vmmOffer, .vmmAttach, .vmmResume, .vmmHandback, .vmmReattach])
        #expect(MessageType.vmmHandback.description == "VMM_HANDBACK")
        #expect(MessageType.pageRequest.description == "PAGE_REQUEST")
        #expect(MessageType.vmmComplete.description == "VMM_COMPLETE")
        #expect(MessageType.imageDigest.description == "IMAGE_DIGEST")
    }
}

@Suite struct BitmapFrameTests {
    @Test func aBitmapSurvivesItsFramesInOrder() {
        var bitmap = PageBitmap(count: 64 * 5 + 3)
        for page in [0, 63, 64, 200, 322] as [UInt64] { bitmap.insert(page) }
        let frames = bitmap.dirtyBitmapMessages(wordsPerFrame: 2)
        #expect(frames.count == 3)
        var assembler = BitmapAssembler(count: bitmap.count)
        func added(_ first: UInt64, _ words: [UInt64]) -> Bool { assembler.add(firstWord: first, words: words) }
        for frame in frames {
            #expect(assembler.bitmap == nil)
            guard case let .dirtyBitmap(totalBits, first, words) = frame else { Issue.record("\(frame)"); return }
            #expect(totalBits == bitmap.count)
            #expect(added(first, words))
        }
        #expect(assembler.isComplete)
        #expect(assembler.bitmap == bitmap)
    }

    @Test func framesOutOfOrderOrPastTheEndAreRefused() {
        var assembler = BitmapAssembler(count: 128)
        func added(_ first: UInt64, _ words: [UInt64]) -> Bool { assembler.add(firstWord: first, words: words) }
        #expect(!added(1, [1]))
        #expect(added(0, [1]))
        #expect(!added(0, [1]))
        #expect(!added(1, [1, 2]))
        #expect(assembler.wordsReceived == 1 && !assembler.isComplete)
        #expect(added(1, [2]))
        #expect(assembler.bitmap?.popCount == 2)
    }
}
