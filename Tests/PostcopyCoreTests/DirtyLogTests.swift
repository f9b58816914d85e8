import PostcopyCore
import Testing

/// The pure parts of uffd-wp dirty tracking: the source VMM's offer, the
/// arithmetic from scanned address ranges to pages, the /proc/PID/maps
/// line, and the audit behind --verify-dirty-log.
@Suite struct DirtyLogTests {
    @Test func offersRoundTrip() throws {
        for offer in [SourceTrackingOffer.armed(address: 0x7f00_0000_0000, length: 1 << 30),
                      .unavailable(reason: "the kernel's userfaultfd lacks WP_ASYNC"),
                      .unavailable(reason: "")] {
            #expect(try SourceTrackingOffer(decoding: offer.encoded) == offer)
        }
        #expect(SourceTrackingOffer.armed(address: 0x1000, length: 0x2000).encoded.count == SourceTrackingOffer.headerSize)
    }

    @Test func aLongReasonIsCutToTheLimit() throws {
        let long = String(repeating: "x", count: 5000)
        guard case let .unavailable(reason) = try SourceTrackingOffer(decoding: SourceTrackingOffer.unavailable(reason: long).encoded) else {
            Issue.record("not unavailable")
            return
        }
        #expect(reason.utf8.count == SourceTrackingOffer.maxReasonBytes)
    }

    @Test func malformedOffersAreRefused() {
        let good = SourceTrackingOffer.armed(address: 0x1000, length: 0x2000).encoded
        func with(_ offset: Int, _ bytes: [UInt8], in base: [UInt8] = good) -> [UInt8] {
            var copy = base
            copy.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
            return copy
        }
        let cases: [([UInt8], SourceTrackingOfferError)] = [
            (Array(good.prefix(25)), .truncated(25)),
            (with(0, Array("PCWQ".utf8)), .badMagic),
            (with(4, [2, 0]), .unsupportedVersion(2)),
            (with(6, [7, 0]), .unknownStatus(7)),
            (good + [0], .badLength(27, reasonLength: 0)),
            (with(24, [1, 0]) + [65], .badLength(27, reasonLength: 1)),
            (with(8, [1, 0x10]), .badRange(address: 0x1001, length: 0x2000)),
            (with(16, [0, 0, 0, 0]), .badRange(address: 0x1000, length: 0)),
            (with(16, [0xff, 0x0f, 0, 0, 0, 0, 0, 0]), .badRange(address: 0x1000, length: 0xfff)),
            (with(8, [0, 0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), .badRange(address: 0xffff_ffff_ffff_f000, length: 0x2000)),
            (with(8, [0, 0x10], in: SourceTrackingOffer.unavailable(reason: "").encoded), .badRange(address: 0x1000, length: 0)),
        ]
        for (bytes, expected) in cases {
            #expect(throws: expected) { try SourceTrackingOffer(decoding: bytes) }
        }
    }

    @Test func scannedRangesBecomePagesOfTheFile() {
        let mapping = TrackedMapping(address: 0x10_0000, length: 16 * 4096)
        #expect(mapping.pages(start: 0x10_0000, end: 0x10_1000) == PageRun(first: 0, count: 1))
        #expect(mapping.pages(start: 0x10_3000, end: 0x11_0000) == PageRun(first: 3, count: 13))
        // Outside, empty, reversed or unaligned: not to be trusted.
        #expect(mapping.pages(start: 0xF_F000, end: 0x10_1000) == nil)
        #expect(mapping.pages(start: 0x10_F000, end: 0x11_1000) == nil)
        #expect(mapping.pages(start: 0x10_1000, end: 0x10_1000) == nil)
        #expect(mapping.pages(start: 0x10_2000, end: 0x10_1000) == nil)
        #expect(mapping.pages(start: 0x10_0800, end: 0x10_1000) == nil)
    }

    @Test func procMapsLinesParse() throws {
        let maps = """
            55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 1311 /usr/bin/postcopy-guest
            7f2a40000000-7f2a80000000 rw-s 00000000 00:1a 4242 /dev/shm/source-ram
            7f2a80000000-7f2a80200000 rw-s 00200000 00:2f 17 /dev/hugepages/ram (deleted)
            7ffd1c3f1000-7ffd1c412000 rw-p 00000000 00:00 0                          [stack]
            """
        let ram = try #require(ProcMapsEntry.entry(at: 0x7f2a_4000_0000, in: maps))
        #expect(ram.end == 0x7f2a_8000_0000 && ram.shared && ram.offset == 0 && ram.inode == 4242)
        #expect(ram.device == ProcMapsEntry.deviceNumber(major: 0, minor: 0x1a))
        let huge = try #require(ProcMapsEntry.entry(at: 0x7f2a_8000_0000, in: maps))
        #expect(huge.offset == 0x20_0000 && huge.inode == 17)
        #expect(ProcMapsEntry.entry(at: 0x55d0_c0a0_0000, in: maps)?.shared == false)
        #expect(ProcMapsEntry.entry(at: 0x1000, in: maps) == nil)
        // glibc's makedev, e.g. 8:1 → 0x801 and a large minor.
        #expect(ProcMapsEntry.deviceNumber(major: 8, minor: 1) == 0x801)
        #expect(ProcMapsEntry.deviceNumber(major: 0x103, minor: 0x12345) == 0x1231_0345)
        #expect(ProcMapsEntry(line: "garbage") == nil)
        #expect(ProcMapsEntry(line: "2000-1000 rw-s 0 00:01 5") == nil)
    }

    @Test func bitmapRangesAndUnions() {
        var bitmap = PageBitmap(count: 200)
        bitmap.insert(first: 60, count: 70)
        #expect(bitmap.setIndices == Array(60..<130))
        bitmap.insert(first: 0, count: 64)
        bitmap.insert(first: 199, count: 1)
        #expect(bitmap.popCount == 131)
        var other = PageBitmap(count: 200)
        other.insert(first: 128, count: 72)
        bitmap.formUnion(other)
        #expect(bitmap == PageBitmap.full(count: 200))
        var empty = PageBitmap(count: 64)
        empty.insert(first: 64, count: 0)
        #expect(empty.isEmpty)
    }

    @Test func theAuditFindsOnlyRealMisses() {
        func bits(_ pages: [UInt64]) -> PageBitmap {
            var bitmap = PageBitmap(count: 16)
            pages.forEach { bitmap.insert($0) }
            return bitmap
        }
        var audit = DirtyLogAudit(pageCount: 16)
        // Round 2: page 3 changed after the scan, page 5 was reported.
        audit.record(written: bits([5]), changed: bits([3, 5]), paused: false)
        #expect(audit.missed == 0)
        // Round 3: the scan reports page 3, as it must; 7 is new.
        audit.record(written: bits([3]), changed: bits([7]), paused: false)
        #expect(audit.missed == 0)
        // Round 4: page 7 is not reported: the log missed it.
        audit.record(written: bits([1]), changed: bits([]), paused: false)
        #expect(audit.missed == 1 && audit.firstMissed == [7])
        // Paused: a change the final scan does not report is a miss at once.
        audit.record(written: bits([2]), changed: bits([2, 9]), paused: true)
        #expect(audit.missed == 2 && audit.firstMissed == [7, 9])
    }
}
