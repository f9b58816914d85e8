import PostcopyCore

/// The `frames` target: the wire decoder (`WireDecoder`, `FrameHeader`,
/// `Message.decode`, `VMMMessage.decode`) on an arbitrary byte stream, as a
/// TCP connection or the VMM socket would deliver it.
///
/// Input:
///
///     byte 0     options: bit 0 repairs each whole frame's checksum before
///                decoding (so mutations get past it); bit 1 decodes as the
///                VMM socket does (`VMMMessage`s, maxPayload 4096) instead
///                of as an agent connection (`Message`s)
///     byte 1     seed of the points where the stream is cut into chunks
///     bytes 2-9  region size in 4 KiB pages, for `validate(against:)`
///     the rest   the stream
///
/// Properties checked besides "no trap": decoding in chunks gives the same
/// messages and error as decoding in one piece; every decoded frame is the
/// encoder's output for its message, byte for byte, and decodes again to the
/// same message; a message that passes `validate(against:)` names no page
/// outside the region; the ERROR that reports a decoding error decodes to
/// that error's code and text; the hardware and software CRC-32C agree.
enum FrameFuzzer {
    /// Option bit: repair the checksum of every whole frame in the stream.
    static let repairChecksums: UInt8 = 1
    /// Option bit: decode as the VMM socket does.
    static let vmmSocket: UInt8 = 2

    static func run(_ input: inout FuzzInput) {
        let options = input.byte()
        let splitSeed = input.byte()
        let limits = RegionLimits(smallPageCount: input.integer(UInt64.self))
        var stream = Array(input.rest())
        if options & repairChecksums != 0 { repairFrameChecksums(&stream) }
        if options & vmmSocket != 0 {
            run(stream, as: VMMMessage.self, splitSeed: splitSeed) { use($0.description) }
        } else {
            run(stream, as: Message.self, splitSeed: splitSeed) { check($0, against: limits) }
        }
        checkChecksumImplementations(stream)
    }

    /// The properties every conversation's decoder has; `each` checks a
    /// decoded message further.
    private static func run<M: WireMessage>(_ stream: [UInt8], as: M.Type, splitSeed: UInt8, each: (M) -> Void) {
        let whole = decode(stream, as: M.self, splitSeed: nil)
        let chunked = decode(stream, as: M.self, splitSeed: splitSeed)
        require(whole == chunked, "split at seed \(splitSeed): \(chunked) differs from the one-piece \(whole)")
        checkCanonical(whole.messages, stream: stream)
        whole.messages.forEach(each)
        if let failure = whole.failure { checkReport(of: failure) }
    }

    /// What a decoder made of a stream.
    struct Outcome<M: WireMessage>: Equatable {
        var messages: [M] = []
        var failure: ProtocolError?
        /// Bytes left over in the decoder: a frame cut short.
        var buffered = 0
    }

    /// Decodes `stream` as `M`'s conversation (with its limit), in one piece
    /// (`splitSeed` nil) or in chunks of sizes drawn from `splitSeed`,
    /// alternating `append` and `receive`.
    static func decode<M: WireMessage>(_ stream: [UInt8], as: M.Type, splitSeed: UInt8?) -> Outcome<M> {
        var decoder = WireDecoder<M>()
        var outcome = Outcome<M>()
        var cuts = SplitMix64(seed: UInt64(splitSeed ?? 0))
        let largestChunk = 1 + Int(splitSeed ?? 0) * 8
        var offset = 0
        var viaReceive = false
        while offset < stream.count, outcome.failure == nil {
            let size = splitSeed == nil ? stream.count : 1 + Int(cuts.next() % UInt64(largestChunk))
            let chunk = stream[offset..<min(offset + size, stream.count)]
            if viaReceive {
                // More room than the chunk needs: a short read.
                let written = decoder.receive(upTo: chunk.count + Int(cuts.next() % 64)) { room in
                    chunk.withUnsafeBytes { room.copyMemory(from: $0) }
                    return chunk.count
                }
                require(written == chunk.count, "receive reported \(written) of \(chunk.count) bytes")
            } else {
                chunk.withUnsafeBytes { decoder.append($0) }
            }
            viaReceive.toggle()
            offset += chunk.count
            drain(&decoder, into: &outcome)
        }
        outcome.buffered = decoder.bufferedByteCount
        return outcome
    }

    private static func drain<M: WireMessage>(_ decoder: inout WireDecoder<M>, into outcome: inout Outcome<M>) {
        do throws(ProtocolError) {
            while let message = try decoder.next() { outcome.messages.append(message) }
        } catch {
            outcome.failure = error
            require(decoder.failure == error, "the decoder keeps \(String(describing: decoder.failure)), threw \(error)")
        }
    }

    /// The decoded frames are the encoder's bytes for their messages, in
    /// order from the start of the stream, and each decodes back alone.
    private static func checkCanonical<M: WireMessage>(_ messages: [M], stream: [UInt8]) {
        var offset = 0
        for message in messages {
            let frame = message.encoded()
            require(stream.count - offset >= frame.count && stream[offset..<(offset + frame.count)].elementsEqual(frame),
                    "\(message) re-encodes to other bytes than the frame it was decoded from (at \(offset))")
            var decoder = WireDecoder<M>()
            decoder.append(frame)
            let again: M?
            do throws(ProtocolError) { again = try decoder.next() } catch {
                fatalError("fuzz property broken: \(message) re-encoded fails to decode: \(error)")
            }
            require(again == message, "\(message) decodes again as \(String(describing: again))")
            if case let .pages(requestID, firstPage, data) = message as? Message {
                checkPagesEncoders(requestID, firstPage, data, frame)
            }
            offset += frame.count
        }
    }

    /// The two zero-copy PAGES encoders give the same bytes as `encoded()`.
    private static func checkPagesEncoders(_ requestID: UInt32, _ firstPage: UInt64, _ data: ArraySlice<UInt8>,
                                           _ frame: [UInt8]) {
        data.withUnsafeBytes { pages in
            var whole: [UInt8] = []
            Message.encodePages(requestID: requestID, firstPage: firstPage, pageData: pages, into: &whole)
            var head: [UInt8] = []
            Message.encodePagesHead(requestID: requestID, firstPage: firstPage, pageData: pages, into: &head)
            require(whole == frame, "encodePages differs from encoded()")
            require(head + Array(pages) == frame, "encodePagesHead + data differs from encoded()")
        }
    }

    /// A message that passes validation names only pages inside the region.
    private static func check(_ message: Message, against limits: RegionLimits) {
        use(message.description)
        do throws(ProtocolError) {
            try message.validate(against: limits)
        } catch {
            checkReport(of: error)
            return
        }
        switch message {
        case let .pages(_, first, data):
            requireInside(PageRun(first: first, count: UInt64(data.count / Message.pageBytes)), limits, message)
        case let .zeroPages(first, count), let .pageRequest(_, first, count):
            requireInside(PageRun(first: first, count: UInt64(count)), limits, message)
        case let .dirtyBitmap(totalBits, firstWord, words):
            require(totalBits == limits.smallPageCount, "\(message) passed against \(limits.smallPageCount) pages")
            let wordLimit = totalBits / 64 + (totalBits % 64 == 0 ? 0 : 1)
            require(firstWord < wordLimit && UInt64(words.count) <= wordLimit - firstWord,
                    "\(message) passed with words past the bitmap's \(wordLimit)")
        default:
            break
        }
    }

    private static func requireInside(_ run: PageRun, _ limits: RegionLimits, _ message: Message) {
        require(run.first < limits.smallPageCount && run.count <= limits.smallPageCount - run.first,
                "\(message) passed validation against \(limits.smallPageCount) pages")
    }

    /// The ERROR frame reporting `error` carries its code and its text (cut
    /// to the longest whole-character prefix that fits).
    private static func checkReport(of error: ProtocolError) {
        let report = Message.reporting(error)
        var decoder = FrameDecoder()
        decoder.append(report.encoded())
        let decoded: Message?
        do throws(ProtocolError) { decoded = try decoder.next() } catch {
            fatalError("fuzz property broken: the ERROR reporting '\(error)' does not decode: \(error)")
        }
        guard case let .error(code, text) = decoded else {
            fatalError("fuzz property broken: the ERROR reporting '\(error)' decodes as \(String(describing: decoded))")
        }
        require(code == error.code, "ERROR code \(code) for \(error), expected \(error.code)")
        require(error.description.utf8.starts(with: text.utf8) && text.utf8.count <= Message.maxErrorMessageBytes,
                "ERROR text '\(text)' is not a prefix of '\(error)'")
    }

    /// The CPU's CRC-32C and the software tables agree on the stream and on
    /// its tail (a different alignment), continuing from a seed.
    private static func checkChecksumImplementations(_ stream: [UInt8]) {
        guard CRC32C.implementation == .hardware else { return }
        stream.withUnsafeBytes { bytes in
            for start in [0, min(3, bytes.count)] {
                let tail = UnsafeRawBufferPointer(rebasing: bytes[start...])
                let seed = UInt32(truncatingIfNeeded: bytes.count)
                let hardware = CRC32C.checksum(tail, seed: seed, using: .hardware)
                let software = CRC32C.checksum(tail, seed: seed, using: .software)
                require(hardware == software, "CRC-32C of \(tail.count) bytes: hardware \(hardware), software \(software)")
            }
        }
    }
}

/// Rewrites the checksum of every whole frame in `stream`, frame after
/// frame from the start, as its header's length field delimits them; stops
/// at the first frame that is not whole.
func repairFrameChecksums(_ stream: inout [UInt8]) {
    var offset = 0
    while stream.count - offset >= FrameHeader.size {
        let length = stream[(offset + 8)..<(offset + 12)].reversed().reduce(0) { $0 << 8 | Int($1) }
        let end = offset + FrameHeader.size + length
        guard end <= stream.count else { return }
        var crc = CRC32C()
        crc.update(stream[offset..<(offset + FrameHeader.checksummedSize)])
        crc.update(stream[(offset + FrameHeader.size)..<end])
        for index in 0..<4 { stream[offset + 12 + index] = UInt8(truncatingIfNeeded: crc.value >> (8 * index)) }
        offset = end
    }
}

/// Keeps a computed value alive, so that the work to produce it (a
/// description, say) is not optimised away.
@inline(never)
func use(_ text: String) {
    if text.utf8.count == Int.max { print(text) }
}
