@testable import PostcopyBench
import Testing

/// Occurrences of `needle` in `haystack`.
private func occurrences(of needle: String, in haystack: String) -> Int {
    haystack.split(separator: needle, omittingEmptySubsequences: false).count - 1
}

private func close(_ a: [Double], _ b: [Double]) -> Bool {
    a.count == b.count && zip(a, b).allSatisfy { abs($0 - $1) <= 1e-12 * max(1, abs($1)) }
}

@Suite struct TickTests {
    @Test func linearTicksAreOneTwoFiveSteps() {
        #expect(linearTicks(0...1, target: 5) == [0, 0.2, 0.4, 0.6, 0.8, 1])
        #expect(linearTicks(0...1, target: 10) == [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1])
        #expect(linearTicks(0...100, target: 4) == [0, 20, 40, 60, 80, 100])
        #expect(linearTicks(-3...17, target: 4) == [0, 5, 10, 15])
        #expect(linearTicks(0.0003...0.0011, target: 4) == [0.0004, 0.0006, 0.0008, 0.001])
    }

    @Test(arguments: [(0.3, 1234.0), (-7.5, 7.5), (0.001, 0.0042), (999.0, 1001.0), (5.0, 5.0), (0, 0)])
    func autoLinearAxisCoversTheDataWithTicksAtItsEnds(lo: Double, hi: Double) {
        let axis = resolveAxis(scale: .linear, explicit: nil, values: [lo, hi], target: 6)
        #expect(axis.range.lowerBound <= lo && axis.range.upperBound >= hi)
        #expect(axis.range.lowerBound < axis.range.upperBound)
        #expect(axis.major.first == axis.range.lowerBound && axis.major.last == axis.range.upperBound)
        #expect((3...13).contains(axis.major.count))
        let steps = zip(axis.major, axis.major.dropFirst()).map { $1 - $0 }
        #expect(steps.allSatisfy { abs($0 - steps[0]) <= 1e-9 * abs(steps[0]) })
        #expect(isOneTwoFive(steps[0]))
    }

    @Test func explicitLinearRangeIsKept() {
        let axis = resolveAxis(scale: .linear, explicit: 0...1, values: [0.3, 0.4], target: 6)
        #expect(axis.range == 0...1)
        #expect(axis.labels.map(\.text) == ["0", "0.2", "0.4", "0.6", "0.8", "1"])
    }

    @Test func logTicksAreDecadesWithMinorMultiples() {
        let ticks = logTicks(1...1000)
        #expect(ticks.major == [1, 10, 100, 1000])
        #expect(ticks.minor.count == 24)
        #expect(close(Array(ticks.minor.prefix(8)), [2, 3, 4, 5, 6, 7, 8, 9]))
        #expect(logTicks(0.001...0.1).major == [0.001, 0.01, 0.1])
        #expect(logTicks(150...900).major == [])
    }

    @Test func autoLogAxisRoundsOutToDecadesAndIgnoresNonPositiveValues() {
        let axis = resolveAxis(scale: .log10, explicit: nil, values: [0, -4, 3.2, 870, 41_000], target: 6)
        #expect(axis.range == 1...100_000)
        #expect(axis.labels.map(\.text) == ["1", "10", "100", "1k", "10k", "100k"])
        #expect(axis.minor.count == 8 * 5)
    }

    @Test func narrowLogAxisLabelsMinorTicks() {
        let axis = resolveAxis(scale: .log10, explicit: 150...900, values: [], target: 6)
        #expect(axis.range == 150...900)
        #expect(axis.labels.map(\.text) == ["200", "500"])
        #expect(axis.minor.count == 8)
        let fewer = resolveAxis(scale: .log10, explicit: 150...450, values: [], target: 6)
        #expect(fewer.labels.map(\.text) == ["200", "300", "400"])
    }

    @Test func logAxisWithoutPositiveDataOrWithZeroLowerBound() {
        let empty = resolveAxis(scale: .log10, explicit: nil, values: [0, -1], target: 6)
        #expect(empty.range == 1...10)
        let zeroLow = resolveAxis(scale: .log10, explicit: 0...1000, values: [5, 50], target: 6)
        #expect(zeroLow.range == 5...1000)
    }
}

private func pow10(_ e: Int) -> Double { e >= 0 ? (0..<e).reduce(1) { r, _ in r * 10 } : 1 / pow10(-e) }

/// Whether `step` is 1, 2 or 5 times a power of ten.
private func isOneTwoFive(_ step: Double) -> Bool {
    (-20...20).contains { e in [1.0, 2, 5].contains { abs($0 * pow10(e) - step) <= 1e-9 * step } }
}

@Suite struct FormattingTests {
    @Test func fixedDecimalsWithoutTrailingZeros() {
        #expect(formatNumber(0.25, decimals: 2) == "0.25")
        #expect(formatNumber(0.25, decimals: 4) == "0.25")
        #expect(formatNumber(10, decimals: 3) == "10")
        #expect(formatNumber(-3.5, decimals: 1) == "-3.5")
        #expect(formatNumber(-0.04, decimals: 1) == "0")
        #expect(formatNumber(0.1 + 0.2, decimals: 6) == "0.3")
        #expect(formatNumber(2.675, decimals: 0) == "3")
        #expect(formatNumber(1.005, decimals: 2) == "1" || formatNumber(1.005, decimals: 2) == "1.01")
        #expect(formatNumber(0.000123, decimals: 6) == "0.000123")
        #expect(formatNumber(123_456_789, decimals: 1) == "123456789")
        #expect(formatNumber(.nan, decimals: 2) == "0")
        #expect(formatNumber(.infinity, decimals: 2) == "0")
        #expect(formatNumber(1e300, decimals: 1) == "1e+300")
    }

    @Test func tickLabelsUseSuffixes() {
        #expect(tickLabel(1000, decimals: 0) == "1k")
        #expect(tickLabel(2500, decimals: 0) == "2.5k")
        #expect(tickLabel(1_000_000, decimals: 0) == "1M")
        #expect(tickLabel(3e9, decimals: 0) == "3G")
        #expect(tickLabel(999, decimals: 0) == "999")
        #expect(tickLabel(0.01, decimals: 2) == "0.01")
        #expect(tickLabel(15_000, decimals: 0, compact: false) == "15000")
    }

    @Test func xmlSpecialCharactersAreEscaped() {
        #expect(xmlEscaped(#"a<b & "c" > 'd'"#) == "a&lt;b &amp; &quot;c&quot; &gt; &apos;d&apos;")
        #expect(xmlEscaped("x\u{1}y\nz") == "xy z")
        #expect(xmlEscaped("µs — ok") == "µs — ok")
    }
}

@Suite struct CDFTests {
    /// Deterministic log-normal-ish samples.
    private static func samples(_ n: Int, seed: UInt64 = 42) -> [Double] {
        var state = seed
        return (0..<n).map { _ in
            var sum = 0.0
            for _ in 0..<4 {
                state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                sum += Double(state >> 11) / Double(1 << 53)
            }
            return 1 + (sum * sum * sum * 20).rounded()
        }
    }

    @Test(arguments: [10, 100, 2000, 50_000])
    func monotoneEndsAtOneAndKeepsMinAndMax(maxPoints: Int) {
        let data = Self.samples(20_000) + [0.5, 90_000]
        let points = cdfPoints(data, maxPoints: maxPoints)
        #expect(points.count <= maxPoints)
        #expect(zip(points, points.dropFirst()).allSatisfy { $0.x < $1.x && $0.y < $1.y })
        #expect(points.last == ChartPoint(x: 90_000, y: 1))
        #expect(points.first?.x == 0.5)
    }

    @Test func tailAboveThe99thPercentileIsKept() {
        let data = (1...100_000).map(Double.init)
        let points = cdfPoints(data, maxPoints: 2000)
        #expect(points.count == 2000)
        let tail = points.filter { $0.y > 0.99 }
        #expect(tail.count == 1000)   // the tail alone would be 1000 points: it gets half
        let small = cdfPoints((1...10_000).map(Double.init), maxPoints: 2000)
        #expect(small.filter { $0.y > 0.99 }.count == 100)   // all of it
        #expect(small.count == 2000)
    }

    @Test func tiesGiveOnePointPerValue() {
        #expect(cdfPoints([3, 1, 3, 2]) == [ChartPoint(x: 1, y: 0.25), ChartPoint(x: 2, y: 0.5), ChartPoint(x: 3, y: 1)])
        #expect(cdfPoints([7, 7, 7]) == [ChartPoint(x: 7, y: 1)])
    }

    @Test func degenerateInputs() {
        #expect(cdfPoints([]) == [])
        #expect(cdfPoints([.nan, .infinity]) == [])
        #expect(cdfPoints([1, 2, 3], maxPoints: 0) == [])
        #expect(cdfPoints([1, 2, 3], maxPoints: 1) == [ChartPoint(x: 3, y: 1)])
        #expect(cdfPoints([1, 2, 3], maxPoints: 2) == [ChartPoint(x: 1, y: 1.0 / 3), ChartPoint(x: 3, y: 1)])
    }
}

@Suite struct SVGTests {
    private static func line(_ name: String, _ xy: [(Double, Double)]) -> ChartSeries {
        ChartSeries(name: name, points: xy.map { ChartPoint(x: $0.0, y: $0.1) })
    }

    @Test func documentShapeAndOnePolylinePerLineSeries() {
        var chart = Chart(title: "Fault latency", xLabel: "latency (µs)", yLabel: "fraction", series: [
            Self.line("swift", [(1, 0.1), (10, 0.5), (100, 1)]),
            Self.line("c", [(2, 0.2), (20, 1)]),
            ChartSeries(name: "stale", points: [ChartPoint(x: 5, y: 0.3), ChartPoint(x: 50, y: 0.9)], style: .markers),
        ])
        chart.xScale = .log10
        chart.notes = ["postcopy-bench clean-faults --runs 7", "host: test"]
        let svg = chart.svg()
        #expect(svg.hasPrefix("<svg "))
        #expect(svg.hasSuffix("</svg>\n"))
        #expect(svg.contains("Fault latency"))
        #expect(svg.contains("postcopy-bench clean-faults --runs 7"))
        #expect(occurrences(of: "<polyline", in: svg) == 2)
        #expect(svg.contains("clip-path=\"url(#"))
        #expect(svg.contains(">swift</text>") && svg.contains(">stale</text>"))
        #expect(occurrences(of: "<svg", in: svg) == 1 && occurrences(of: "</svg>", in: svg) == 1)
    }

    @Test func textIsEscaped() {
        var chart = Chart(title: "a <b> & \"c\"", xLabel: "x<", yLabel: "y&", series: [Self.line("s'1", [(0, 0), (1, 1)])])
        chart.notes = ["n>1"]
        let svg = chart.svg()
        #expect(svg.contains("a &lt;b&gt; &amp; &quot;c&quot;"))
        #expect(!svg.contains("<b>") && !svg.contains("& "))
        #expect(svg.contains("x&lt;") && svg.contains("y&amp;") && svg.contains("s&apos;1") && svg.contains("n&gt;1"))
    }

    @Test(arguments: [AxisScale.linear, .log10])
    func degenerateInputsGiveFiniteNumbers(scale: AxisScale) {
        let cases: [[ChartSeries]] = [
            [],
            [Self.line("empty", [])],
            [Self.line("one", [(5, 0.5)])],
            [Self.line("constant", [(3, 3), (3, 3), (3, 3)])],
            [Self.line("zeros", [(0, 0), (0, 1), (-1, 2)])],
            [Self.line("bad", [(.nan, 1), (.infinity, 2), (1, -.infinity)])],
            [Self.line("huge", [(-1e308, .leastNormalMagnitude / 1000), (1e308, .leastNonzeroMagnitude)])],
            [ChartSeries(name: "m", points: [ChartPoint(x: 0, y: 0)], style: .markers)],
        ]
        for series in cases {
            for range: ClosedRange<Double>? in [nil, 0...0, 0...1, -5...(-5)] {
                var chart = Chart(title: "t", xLabel: "x", yLabel: "y", series: series)
                chart.xScale = scale
                chart.yScale = scale
                chart.xRange = range
                chart.width = 10
                let svg = chart.svg().lowercased()
                #expect(!svg.contains("nan") && !svg.contains("inf"), "\(series.map(\.name)) \(String(describing: range))")
                #expect(svg.hasPrefix("<svg"))
            }
        }
    }

    @Test func pointsOutsideTheRangeAreLeftToTheClipAndMarkersOutsideAreDropped() {
        var chart = Chart(title: "t", xLabel: "x", yLabel: "y", series: [
            ChartSeries(name: "m", points: [ChartPoint(x: 0.5, y: 0.5), ChartPoint(x: 7, y: 0.5)], style: .markers),
        ])
        chart.xRange = 0...1
        chart.yRange = 0...1
        let svg = chart.svg()
        let markerPaths = svg.split(separator: "\n").filter { $0.contains("fill-opacity=\"0.75\"") }
        #expect(markerPaths.count == 1)
        #expect(occurrences(of: "M", in: String(markerPaths[0])) == 1)
    }
}
