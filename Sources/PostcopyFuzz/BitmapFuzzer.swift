import PostcopyCore

/// The `bitmap` target: the page bitmaps that cross a process boundary.
/// Byte 0 picks one of three paths (its value mod 3), bit 7 is an option:
///
/// - **wire** (0): a bitmap split into DIRTY_BITMAP messages
///   (`PageBitmap.dirtyBitmapMessages`) and put together again
///   (`BitmapAssembler`), then frames of the input's choosing offered to an
///   assembler after `Message.validate(against:)`, as the session does.
///   Input: 2-byte bit count, 1 byte words per frame minus one, the words
///   (8 bytes each, little-endian), then frames: 2-byte first word, 1 byte
///   word count minus one (of 16), the words.
/// - **dirty log** (1): `PageBitmap(littleEndianBytes:count:)`, the file of
///   `postcopy-push --dirty-bitmap`. Input: 8-byte bit count, the bytes.
/// - **page-state record** (2): `PageStateHeader(decoding:)` and, for a
///   header that checks out, the record's bitmap through `PageStateBitmap`.
///   Bit 7 of byte 0 repairs the header's checksum first. Input: two 2-byte
///   seeds of the run to mark fresh, then the file; a file shorter or longer
///   than `PageStateLayout.fileBytes` is cut or zero-filled to it (the
///   daemon refuses other sizes before mapping), up to 64 KiB.
///
/// Properties checked besides "no trap": a bitmap survives the wire; an
/// assembler takes exactly the frames that start where the last one ended,
/// and one completed from validated frames yields a bitmap; a bitmap is
/// refused exactly when bits past its end are set; a dirty log reads back
/// to its bytes; a decoded page-state header re-encodes to its bytes;
/// `markFresh` clears exactly its run.
enum BitmapFuzzer {
    /// Selector bit: repair the page-state header's checksum.
    static let repairChecksum: UInt8 = 0x80
    /// The largest page-state file the target maps in memory.
    static let maxRecordBytes: UInt64 = 64 << 10

    static func run(_ input: inout FuzzInput) {
        let selector = input.byte()
        switch (selector & 0x7F) % 3 {
        case 0: wire(&input)
        case 1: dirtyLog(&input)
        default: pageState(&input, repairingChecksum: selector & repairChecksum != 0)
        }
    }

    // MARK: wire

    private static func wire(_ input: inout FuzzInput) {
        let count = UInt64(input.integer(UInt16.self))
        let wordsPerFrame = Int(input.byte()) + 1
        let words = (0..<Int((count + 63) / 64)).map { _ in input.integer(UInt64.self) }
        let bitmap = checkedBitmap(words: words, count: count)
        checkIndices(bitmap)

        let messages = bitmap.dirtyBitmapMessages(wordsPerFrame: wordsPerFrame)
        require(messages.count == (words.count + wordsPerFrame - 1) / wordsPerFrame,
                "\(messages.count) frames for \(words.count) words at \(wordsPerFrame) per frame")
        var assembler = BitmapAssembler(count: count)
        for message in messages {
            guard case let .dirtyBitmap(_, firstWord, frame) = roundTrip(message) else {
                fatalError("fuzz property broken: \(message) is not a DIRTY_BITMAP")
            }
            do throws(ProtocolError) { try message.validate(against: RegionLimits(smallPageCount: count)) } catch {
                fatalError("fuzz property broken: the bitmap's own \(message) fails validation: \(error)")
            }
            require(assembler.add(firstWord: firstWord, words: frame), "the assembler refused \(message)")
        }
        require(assembler.bitmap == bitmap, "the bitmap of \(count) bits did not survive the wire")
        offerFrames(&input, count: count)
    }

    /// Frames from the input, validated as the session validates them, then
    /// offered to an assembler.
    private static func offerFrames(_ input: inout FuzzInput, count: UInt64) {
        var assembler = BitmapAssembler(count: count)
        let limits = RegionLimits(smallPageCount: count)
        while !input.isEmpty {
            let firstWord = UInt64(input.integer(UInt16.self))
            let words = (0...Int(input.byte() % 16)).map { _ in input.integer(UInt64.self) }
            let message = Message.dirtyBitmap(totalBits: count, firstWord: firstWord, words: words)
            do throws(ProtocolError) { try message.validate(against: limits) } catch {
                use(error.description)
                continue
            }
            let expected = assembler.wordsReceived
            let added = assembler.add(firstWord: firstWord, words: words)
            require(added == (firstWord == expected), "add at word \(firstWord) with \(expected) received: \(added)")
            require(assembler.wordsReceived == expected + (added ? UInt64(words.count) : 0),
                    "\(assembler.wordsReceived) words received after \(added ? "adding" : "refusing") \(words.count)")
        }
        if assembler.isComplete {
            require(assembler.bitmap != nil, "a bitmap assembled from validated frames is refused")
        }
    }

    /// `PageBitmap(words:count:)`, which must refuse exactly the words with
    /// bits past `count`; those bits are cleared for what follows.
    private static func checkedBitmap(words: [UInt64], count: UInt64) -> PageBitmap {
        let tail = count % 64
        let stray = tail != 0 && words.last.map { $0 >> tail != 0 } == true
        let bitmap = PageBitmap(words: words, count: count)
        require((bitmap == nil) == stray, "words \(words.last.map { String($0, radix: 16) } ?? "-") for \(count) bits")
        if let bitmap { return bitmap }
        var masked = words
        masked[masked.count - 1] &= (1 << tail) - 1
        return PageBitmap(words: masked, count: count)!
    }

    /// `setIndices`, `nextSet`, `contains` and `popCount` tell the same story.
    private static func checkIndices(_ bitmap: PageBitmap) {
        let indices = bitmap.setIndices
        require(UInt64(indices.count) == bitmap.popCount, "\(indices.count) indices, popCount \(bitmap.popCount)")
        require(indices.allSatisfy { $0 < bitmap.count && bitmap.contains($0) }, "an index outside the set")
        require(bitmap.isEmpty == indices.isEmpty, "isEmpty is \(bitmap.isEmpty) with \(indices.count) set")
    }

    /// `message` encoded and decoded again, which must give it back.
    private static func roundTrip(_ message: Message) -> Message {
        var decoder = FrameDecoder()
        decoder.append(message.encoded())
        do throws(ProtocolError) {
            let decoded = try decoder.next()
            require(decoded == message, "\(message) decodes as \(String(describing: decoded))")
            return message
        } catch {
            fatalError("fuzz property broken: \(message) does not decode: \(error)")
        }
    }

    // MARK: dirty log

    private static func dirtyLog(_ input: inout FuzzInput) {
        let count = input.integer(UInt64.self)
        let bytes = Array(input.rest())
        guard let bitmap = PageBitmap(littleEndianBytes: bytes, count: count) else { return }
        require(bitmap.count == count, "a bitmap of \(bitmap.count) bits for \(count)")
        require(bitmap.littleEndianBytes == bytes, "a dirty log of \(bytes.count) bytes reads back otherwise")
    }

    // MARK: page-state record

    private static func pageState(_ input: inout FuzzInput, repairingChecksum repair: Bool) {
        let runSeeds = (input.integer(UInt16.self), input.integer(UInt16.self))
        var file = Array(input.rest())
        if repair, file.count >= PageStateHeader.bytes {
            let checksum = CRC32C.checksum(Array(file[0..<(PageStateHeader.bytes - 4)]))
            for index in 0..<4 {
                file[PageStateHeader.bytes - 4 + index] = UInt8(truncatingIfNeeded: checksum >> (8 * index))
            }
        }
        let header: PageStateHeader
        do throws(PageStateError) {
            header = try PageStateHeader(decoding: file[...])
        } catch {
            use(error.description)
            return
        }
        require(header.encoded[...] == file.prefix(PageStateHeader.bytes), "the header re-encodes to other bytes")
        let fileBytes = PageStateLayout.fileBytes(for: header.geometry)
        let bitmapBytes = (header.geometry.smallPageCount + 63) / 64 * 8
        require(fileBytes % 4096 == 0 && fileBytes - UInt64(PageStateLayout.bitmapOffset) >= bitmapBytes,
                "a file of \(fileBytes) bytes for \(header.geometry)")
        guard fileBytes <= maxRecordBytes else { return }
        file = Array(file.prefix(Int(fileBytes)))
        file += repeatElement(0, count: Int(fileBytes) - file.count)
        checkRecordBitmap(file[PageStateLayout.bitmapOffset...], count: header.geometry.smallPageCount,
                          runSeeds: runSeeds)
    }

    /// The record's bitmap in place: loaded, a run marked fresh, stored.
    private static func checkRecordBitmap(_ bytes: ArraySlice<UInt8>, count: UInt64, runSeeds: (UInt16, UInt16)) {
        let wordCount = Int((count + 63) / 64)
        let words = UnsafeMutablePointer<UInt64>.allocate(capacity: wordCount)
        defer { words.deallocate() }
        // SAFETY: `bytes` holds at least 8 × wordCount bytes (the file is
        // fileBytes long), and `words` has room for wordCount.
        bytes.withUnsafeBytes { UnsafeMutableRawPointer(words).copyMemory(from: $0.baseAddress!, byteCount: wordCount * 8) }
        let record = PageStateBitmap(words: UnsafeMutableRawPointer(words), count: count)
        let stored = Array(UnsafeBufferPointer(start: words, count: wordCount))
        let loaded = record.load()
        let tail = count % 64
        require((loaded == nil) == (tail != 0 && stored[wordCount - 1] >> tail != 0),
                "a record of \(count) pages loaded as \(loaded == nil ? "nil" : "a bitmap")")
        guard var expected = loaded else { return }
        let first = UInt64(runSeeds.0) % count
        let run = PageRun(first: first, count: 1 + UInt64(runSeeds.1) % (count - first))
        record.markFresh(run)
        for page in run.pages { expected.remove(page) }
        require(record.load() == expected, "markFresh(\(run)) changed other bits of a \(count)-page record")
        let full = PageBitmap.full(count: count)
        record.store(full)
        require(record.load() == full, "a stored full bitmap of \(count) pages loads otherwise")
    }
}
