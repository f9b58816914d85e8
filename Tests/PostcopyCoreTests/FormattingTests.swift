import PostcopyCore
import Testing

@Suite struct FormattingTests {
    @Test func fixedDecimals() {
        #expect(fixed(3.14159, 2) == "3.14")
        #expect(fixed(46.5, 1) == "46.5")
        #expect(fixed(0.05, 1) == "0.1")
        #expect(fixed(2, 2) == "2.00")
        #expect(fixed(-1.25, 1) == "-1.3")
        #expect(fixed(1.999, 2) == "2.00")
        #expect(fixed(0, 0) == "0")
    }

    @Test func latencySummary() throws {
        let summary = try #require(LatencySummary([58567, 39739, 46509, 72288, 35803]))
        #expect(summary.median == 46509)
        #expect(summary.min == 35803)
        #expect(summary.max == 72288)
        #expect(summary.p99 == 72288)
        let even = try #require(LatencySummary([4, 1, 3, 2]))
        #expect(even.median == 2.5)
        #expect(LatencySummary([]) == nil)
        let thousand = try #require(LatencySummary((1...1000).map(Double.init)))
        #expect(thousand.p99 == 990)
        #expect(thousand.p999 == 999)
    }

    @Test func byteSizes() {
        #expect(ByteSize.parse("4096") == 4096)
        #expect(ByteSize.parse("256M") == 256 << 20)
        #expect(ByteSize.parse("1G") == 1 << 30)
        #expect(ByteSize.parse("64MiB") == 64 << 20)
        #expect(ByteSize.parse("2k") == 2048)
        #expect(ByteSize.parse(" 8MB ") == 8 << 20)
        #expect(ByteSize.parse("") == nil)
        #expect(ByteSize.parse("M") == nil)
        #expect(ByteSize.parse("-1") == nil)
        #expect(ByteSize.parse("1.5G") == nil)
        #expect(ByteSize.parse("99999999999T") == nil)
        #expect(ByteSize.format(1 << 30) == "1 GiB")
        #expect(ByteSize.format(1536 << 20) == "1.5 GiB")
        #expect(ByteSize.format(17) == "17 B")
    }
}
