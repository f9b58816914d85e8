import PostcopyCore
import Testing

@Suite struct PageGeometryTests {
    @Test func smallPages() throws {
        let geometry = try PageGeometry(regionSize: 1 << 20, pageSize: .small)
        #expect(geometry.pageCount == 256)
        #expect(geometry.smallPageCount == 256)
        #expect(geometry.offset(of: PageIndex(255)) == RegionOffset(255 * 4096))
        #expect(geometry.offset(of: PageIndex(256)) == nil)
        #expect(geometry.page(containing: RegionOffset(4095)) == PageIndex(0))
        #expect(geometry.page(containing: RegionOffset(4096)) == PageIndex(1))
        #expect(geometry.page(containing: RegionOffset(1 << 20)) == nil)
        #expect(geometry.smallPages(of: PageIndex(7)) == 7..<8)
    }

    @Test func hugePages() throws {
        let geometry = try PageGeometry(regionSize: 64 << 20, pageSize: .huge2M)
        #expect(geometry.pageCount == 32)
        #expect(geometry.smallPageCount == 32 * 512)
        #expect(geometry.smallPages(of: PageIndex(2)) == 1024..<1536)
        #expect(geometry.page(containing: RegionOffset((2 << 21) + 17)) == PageIndex(2))
    }

    @Test func addressesOutsideTheMappingAreRefused() throws {
        let geometry = try PageGeometry(regionSize: 8192, pageSize: .small)
        let base: UInt64 = 0x7f00_0000_0000
        #expect(geometry.page(atAddress: base - 1, mappingBase: base) == nil)
        #expect(geometry.page(atAddress: base, mappingBase: base) == PageIndex(0))
        #expect(geometry.page(atAddress: base + 8191, mappingBase: base) == PageIndex(1))
        #expect(geometry.page(atAddress: base + 8192, mappingBase: base) == nil)
    }

    @Test func badShapesAreRefused() {
        #expect(throws: GeometryError.emptyRegion) { try PageGeometry(regionSize: 0, pageSize: .small) }
        #expect(throws: GeometryError.sizeNotPageAligned(size: 3 << 20, pageSize: .huge2M)) {
            try PageGeometry(regionSize: 3 << 20, pageSize: .huge2M)
        }
        #expect(GeometryError.sizeNotPageAligned(size: 3000, pageSize: .small).description
            == "region size 3000 bytes is not a multiple of the 4 KiB page size")
    }
}

@Suite struct PageBitmapTests {
    /// The dirty-log file form: 8 bytes per word, least significant first.
    @Test func dirtyLogBytesRoundTrip() throws {
        var bitmap = PageBitmap(count: 70)
        for page: UInt64 in [0, 9, 63, 64, 69] { bitmap.insert(page) }
        let bytes = bitmap.littleEndianBytes
        #expect(bytes.count == 16)
        #expect(Array(bytes[0..<8]) == [0x01, 0x02, 0, 0, 0, 0, 0, 0x80])
        #expect(Array(bytes[8..<16]) == [0x21, 0, 0, 0, 0, 0, 0, 0])
        #expect(PageBitmap(littleEndianBytes: bytes, count: 70) == bitmap)
        #expect(PageBitmap(littleEndianBytes: Array(bytes.dropLast()), count: 70) == nil, "a length that is not 8 per word")
        var past = bytes
        past[8] |= 0x80
        #expect(PageBitmap(littleEndianBytes: past, count: 70) == nil, "bit 71 of a 70-page bitmap")
    }

    @Test func insertRemoveCount() {
        var bitmap = PageBitmap(count: 130)
        #expect(bitmap.isEmpty)
        let firstInserts = [bitmap.insert(0), bitmap.insert(0), bitmap.insert(64), bitmap.insert(129)]
        #expect(firstInserts == [true, false, true, true])
        #expect(bitmap.popCount == 3)
        #expect(bitmap.contains(64) && !bitmap.contains(63))
        #expect(bitmap.setIndices == [0, 64, 129])
        let removals = [bitmap.remove(64), bitmap.remove(64)]
        #expect(removals == [true, false])
        #expect(bitmap.setIndices == [0, 129])
    }

    @Test func nextSetScansAcrossWords() {
        var bitmap = PageBitmap(count: 1000)
        for index: UInt64 in [5, 63, 64, 500, 999] { bitmap.insert(index) }
        #expect(bitmap.nextSet(from: 0) == 5)
        #expect(bitmap.nextSet(from: 6) == 63)
        #expect(bitmap.nextSet(from: 64) == 64)
        #expect(bitmap.nextSet(from: 65) == 500)
        #expect(bitmap.nextSet(from: 501) == 999)
        #expect(bitmap.nextSet(from: 1000) == nil)
        #expect(PageBitmap(count: 1000).nextSet(from: 0) == nil)
    }

    @Test func fullBitmapHasNoBitsPastTheEnd() {
        let full = PageBitmap.full(count: 70)
        #expect(full.popCount == 70)
        #expect(full.words == [UInt64.max, 0b11_1111])
        #expect(PageBitmap.full(count: 128).popCount == 128)
    }

    @Test func wordsFromOutsideAreValidated() {
        #expect(PageBitmap(words: [1, 1], count: 70) != nil)
        #expect(PageBitmap(words: [1], count: 70) == nil, "too few words")
        #expect(PageBitmap(words: [1, 1, 0], count: 70) == nil, "too many words")
        #expect(PageBitmap(words: [0, 1 << 6], count: 70) == nil, "a bit past the end")
        #expect(PageBitmap(words: [0, 1 << 5], count: 70)?.setIndices == [69])
    }

    /// A count whose word count does not fit `count + 63` is refused, not a
    /// trap (found by the fuzzer: fuzz/regressions/bitmap/).
    @Test func countsNearTheTopAreRefused() {
        for count in [UInt64.max, UInt64.max - 62, UInt64.max - 63, 1 << 63] {
            #expect(PageBitmap(words: [0], count: count) == nil, "\(count)")
            #expect(PageBitmap(littleEndianBytes: [0, 0, 0, 0, 0, 0, 0, 0], count: count) == nil, "\(count)")
        }
        #expect(PageBitmap(littleEndianBytes: [], count: 0) == PageBitmap(count: 0))
    }
}

@Suite struct TouchOrderTests {
    @Test(arguments: [TouchOrder.sequential, .strided(7), .strided(1), .strided(100), .random(seed: 9)])
    func everyOrderIsAPermutation(order: TouchOrder) {
        let pages = order.pages(count: 50)
        #expect(pages.sorted() == Array(0..<50))
    }

    @Test func stridedVisitsNeighboursLate() {
        #expect(TouchOrder.strided(3).pages(count: 7) == [0, 3, 6, 1, 4, 2, 5])
    }

    @Test func randomIsReproduciblePerSeed() {
        #expect(TouchOrder.random(seed: 4).pages(count: 100) == TouchOrder.random(seed: 4).pages(count: 100))
        #expect(TouchOrder.random(seed: 4).pages(count: 100) != TouchOrder.random(seed: 5).pages(count: 100))
    }

    @Test func patternWordsDifferAcrossPagesAndWords() {
        let words = Set((0..<64).flatMap { page in (0..<64).map { patternWord(page: page, word: $0, seed: 1) } })
        #expect(words.count == 64 * 64)
        #expect(!words.contains(0), "a pattern word is never zero, so it cannot pass for a hole")
    }
}
