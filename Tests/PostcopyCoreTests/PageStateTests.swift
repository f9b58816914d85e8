import PostcopyCore
import Testing

/// The page-state record a restarted postcopyd takes a migration over from.
@Suite struct PageStateTests {
    static let id = MigrationID(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210)

    static func header(pages: UInt64 = 1000, pageSize: PageSize = .small) throws -> PageStateHeader {
        let bytes = pageSize == .small ? pages * 4096 : (pages * 4096 + (2 << 20) - 1) / (2 << 20) * (2 << 20)
        return PageStateHeader(migrationID: id, geometry: try PageGeometry(regionSize: bytes, pageSize: pageSize),
                               guestBase: 0x7F12_3400_0000, features: [.minorShmem, .missingShmem],
                               registerMode: 0b101, stalePagesAtSwitchover: 321,
                               sourcePausedAtNanos: 1_700_000_000_000_000_123, downtimeMicros: 4567,
                               secretDigest: MigrationSecret.test.digest)
    }

    @Test func aHeaderSurvivesItsBytes() throws {
        for header in [try Self.header(), try Self.header(pages: 1 << 20, pageSize: .huge2M)] {
            let bytes = header.encoded
            #expect(bytes.count == PageStateHeader.bytes)
            #expect(bytes.count == 124)
            #expect(try PageStateHeader(decoding: bytes[...]) == header)
            // Trailing bytes (the rest of the header page) are not the header's.
            #expect(try PageStateHeader(decoding: (bytes + [UInt8](repeating: 0xAA, count: 100))[...]) == header)
        }
    }

    /// Version 4 (3's fields; the milestones word after the header is new):
    /// no image digest (the source sends it after the guest resumed); the
    /// secret's digest follows the migration id, then the checksum of
    /// everything before it.
    @Test func theHeaderLayout() throws {
        let header = try Self.header()
        let bytes = header.encoded
        #expect(Array(bytes[0..<8]) == Array("PCDPAGES".utf8))
        #expect(Array(bytes[8..<12]) == [4, 0, 0, 0])
        #expect(PageStateLayout.milestonesOffset >= PageStateHeader.bytes && PageStateLayout.milestonesOffset % 8 == 0)
        #expect(PageStateLayout.milestonesOffset + 8 <= PageStateLayout.bitmapOffset)
        #expect(Array(bytes[72..<88]) == Self.id.bytes)
        #expect(Array(bytes[88..<120]) == MigrationSecret.test.digest.bytes)
        let checksum = CRC32C.checksum(Array(bytes[0..<120]))
        #expect(Array(bytes[120..<124]) == (0..<4).map { UInt8(truncatingIfNeeded: checksum >> (8 * $0)) })
    }

    @Test func aDamagedHeaderIsRefusedNotGuessed() throws {
        let bytes = try Self.header().encoded
        for index in [0, 8, 12, 20, 30, 75, 90, 119, 121] {
            var damaged = bytes
            damaged[index] ^= 0x10
            #expect(throws: PageStateError.self, "byte \(index)") { try PageStateHeader(decoding: damaged[...]) }
        }
        var foreign = bytes
        foreign[0] = UInt8(ascii: "X")
        #expect(throws: PageStateError.notAPageStateRecord) { try PageStateHeader(decoding: foreign[...]) }
        #expect(throws: PageStateError.truncated(bytes: 100)) { try PageStateHeader(decoding: bytes.prefix(100)) }
        // Another version is refused even with a valid checksum: a newer
        // one, version 3, which kept no milestones, and version 2, whose
        // header held the image digest.
        for version: UInt8 in [2, 3, 5] {
            var other = Array(bytes.prefix(120))
            other[8] = version
            other += withUnsafeBytes(of: CRC32C.checksum(other).littleEndian) { Array($0) }
            #expect(throws: PageStateError.unsupportedVersion(UInt32(version))) { try PageStateHeader(decoding: other[...]) }
        }
    }

    @Test func theFileHoldsTheHeaderPageAndTheBitmapInWholePages() throws {
        #expect(PageStateLayout.fileBytes(for: try PageGeometry(regionSize: 4096, pageSize: .small)) == 8192)
        // 1 GiB: 262144 pages, 32 KiB of bitmap.
        #expect(PageStateLayout.fileBytes(for: try PageGeometry(regionSize: 1 << 30, pageSize: .small)) == 4096 + 32768)
        #expect(PageStateLayout.fileBytes(for: try PageGeometry(regionSize: 1 << 30, pageSize: .huge2M)) == 4096 + 32768)
    }

    /// The record's bitmap, in a buffer standing in for the shared file.
    private func withRecord(pages: UInt64, _ body: (PageStateBitmap) throws -> Void) rethrows {
        let words = UnsafeMutablePointer<UInt64>.allocate(capacity: Int((pages + 63) / 64))
        words.initialize(repeating: 0xDEAD_BEEF, count: Int((pages + 63) / 64))
        defer { words.deallocate() }
        try body(PageStateBitmap(words: UnsafeMutableRawPointer(words), count: pages))
    }

    @Test func markingFreshClearsExactlyTheRun() throws {
        try withRecord(pages: 300) { record in
            let full = PageBitmap.full(count: 300)
            record.store(full)
            #expect(record.load() == full)
            var expected = full
            for run in [PageRun(first: 0, count: 1), PageRun(first: 63, count: 2), PageRun(first: 100, count: 156),
                        PageRun(first: 299, count: 1), PageRun(first: 64, count: 1)] {
                record.markFresh(run)
                for page in run.pages { expected.remove(page) }
                #expect(record.load() == expected, "after \(run)")
            }
            // Unwrapped first: #expect on a UInt64? comparison trips a false
            // stack-buffer-overflow in the Testing macro's thunk under ASan.
            let left = try #require(record.load()).popCount
            #expect(left == 300 - 1 - 2 - 156 - 1)
            // Marking a fresh page fresh again changes nothing.
            record.markFresh(PageRun(first: 100, count: 10))
            #expect(record.load() == expected)
        }
    }

    @Test func aRecordWithBitsPastTheRegionIsNotLoaded() throws {
        withRecord(pages: 70) { record in
            record.store(PageBitmap(count: 70))
            record.words.storeWord(1, 1 << 10)
            #expect(record.load() == nil)
        }
    }

    @Test func aTakenOverSessionIsPausedUntilBothConnectionsRejoin() throws {
        let geometry = try PageGeometry(regionSize: 64 * 4096, pageSize: .small)
        var session = DestinationSession(takingOver: Self.id, geometry: geometry, secretDigest: MigrationSecret.test.digest)
        #expect(session.phase == .paused)
        #expect(session.migrationID == Self.id)
        func hello(_ role: StreamRole, resume: Bool, id: MigrationID = Self.id) -> Message {
            .hello(migrationID: id, role: role, sourcePageSize: .small, regionSize: geometry.regionSize, secret: .test, resume: resume)
        }
        #expect(throws: SessionError.postcopyInProgress) { try session.hello(hello(.bulk, resume: false)) }
        #expect(throws: SessionError.self) { try session.hello(hello(.bulk, resume: true, id: MigrationID(high: 1, low: 2))) }
        _ = try session.hello(hello(.bulk, resume: true))
        #expect(session.phase == .paused)
        _ = try session.hello(hello(.urgent, resume: true))
        #expect(session.phase == .postcopy)
    }
}
