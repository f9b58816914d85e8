// SVGChart.swift — standalone SVG line and marker charts for the benchmark reports.
//
// Standard library only (plus libm for log10, pow and floor): numbers are formatted here,
// not by Foundation. Every number written to the document is finite; degenerate data
// (no points, one point, constant values, non-positive values on a log axis) still gives
// a well-formed chart.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// How an axis maps values to positions.
public enum AxisScale: Sendable {
    /// Values evenly spaced; ticks at 1-2-5 steps.
    case linear
    /// Decades evenly spaced; ticks at powers of ten, minor grid lines at 2…9.
    /// Non-positive values are ignored.
    case log10
}

/// One point of a series, in data coordinates.
public struct ChartPoint: Sendable, Hashable {
    public var x: Double
    public var y: Double
    public init(x: Double, y: Double) { self.x = x; self.y = y }
}

/// A named set of points, drawn as a connected line or as separate markers.
public struct ChartSeries: Sendable {
    public enum Style: Sendable {
        /// One polyline through the points in their order.
        case line
        /// A small filled circle per point.
        case markers
    }
    public var name: String
    public var points: [ChartPoint]
    public var style: Style
    public init(name: String, points: [ChartPoint], style: Style = .line) {
        self.name = name; self.points = points; self.style = style
    }
}

/// A two-axis chart with a title, notes and a legend, rendered as a standalone SVG 1.1 document.
public struct Chart: Sendable {
    public var title: String
    public var xLabel: String
    public var yLabel: String
    public var xScale: AxisScale = .linear
    public var yScale: AxisScale = .linear
    /// The x values shown; nil: the data's, rounded out to ticks (log axes: the positive data's).
    public var xRange: ClosedRange<Double>? = nil
    /// The y values shown; nil: as for `xRange`.
    public var yRange: ClosedRange<Double>? = nil
    public var series: [ChartSeries]
    /// Small text lines under the title: the command, the machine, …
    public var notes: [String] = []
    /// The document size in pixels (at least 240 × 180).
    public var width = 860, height = 520

    public init(title: String, xLabel: String, yLabel: String, series: [ChartSeries]) {
        self.title = title; self.xLabel = xLabel; self.yLabel = yLabel; self.series = series
    }

    /// The chart as a complete SVG document. Series take colours from a fixed palette in order;
    /// points outside the ranges are clipped.
    public func svg() -> String {
        let w = Double(max(width, 240))
        var xAxis = resolveAxis(scale: xScale, explicit: xRange, values: series.flatMap { $0.points.map(\.x) },
                            target: min(max(Int(w / 120), 3), 10))
        var yAxis = resolveAxis(scale: yScale, explicit: yRange, values: series.flatMap { $0.points.map(\.y) },
                            target: min(max(max(height, 180) / 85, 3), 10))
        let yLabelWidth = Double(yAxis.labels.map(\.text.count).max() ?? 1) * 6.6
        let x0 = (yLabelWidth + 40).rounded(), x1 = w - max(24, 3.3 * Double(xAxis.labels.last?.text.count ?? 0) + 12)
        let y0 = Double(50 + 14 * notes.count), h = max(Double(max(height, 180)), y0 + 110)
        let y1 = h - 46
        xAxis.from = x0; xAxis.to = x1; yAxis.from = y1; yAxis.to = y0
        let clipID = "plot-" + String(fnv1a(title + "\u{0}" + xLabel + "\u{0}" + yLabel), radix: 16)

        var out = "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"\(f(w))\" height=\"\(f(h))\" "
            + "viewBox=\"0 0 \(f(w)) \(f(h))\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n"
        out += "<title>\(xmlEscaped(title))</title>\n"
        out += "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
        out += "<defs><clipPath id=\"\(clipID)\"><rect x=\"\(f(x0))\" y=\"\(f(y0))\" width=\"\(f(x1 - x0))\" "
            + "height=\"\(f(y1 - y0))\"/></clipPath></defs>\n"
        out += "<text x=\"\(f(x0))\" y=\"26\" font-size=\"16\" font-weight=\"bold\" fill=\"#222\">"
            + "\(xmlEscaped(truncated(title, maxChars: Int((w - x0) / 9.5))))</text>\n"
        for (i, note) in notes.enumerated() {
            out += "<text x=\"\(f(x0))\" y=\"\(44 + 14 * i)\" font-size=\"11\" fill=\"#555\">"
                + "\(xmlEscaped(truncated(note, maxChars: Int((w - x0 - 8) / 6.3))))</text>\n"
        }

        // Grid: minor lines, then major ones, then the frame.
        for (lines, colour) in [(xAxis.minor, "#f1f1f1"), (xAxis.major, "#dddddd")] {
            for v in lines { if let p = xAxis.position(v) { out += line(p, y0, p, y1, colour) } }
        }
        for (lines, colour) in [(yAxis.minor, "#f1f1f1"), (yAxis.major, "#dddddd")] {
            for v in lines { if let p = yAxis.position(v) { out += line(x0, p, x1, p, colour) } }
        }
        out += "<rect x=\"\(f(x0))\" y=\"\(f(y0))\" width=\"\(f(x1 - x0))\" height=\"\(f(y1 - y0))\" "
            + "fill=\"none\" stroke=\"#bbbbbb\"/>\n"

        // Series, clipped to the plot area.
        let limit = 10 * max(w, h)
        var drawn: [(x: Double, y: Double)] = []   // what the legend should avoid
        out += "<g clip-path=\"url(#\(clipID))\">\n"
        for (i, s) in series.enumerated() {
            let colour = palette[i % palette.count]
            let pixels: [(x: Double, y: Double)] = s.points.compactMap { pt in
                guard let px = xAxis.position(pt.x), let py = yAxis.position(pt.y) else { return nil }
                return (min(max(px, -limit), limit), min(max(py, -limit), limit))
            }
            switch s.style {
            case .line:
                guard !pixels.isEmpty else { continue }
                var coords: [String] = []
                for p in pixels {
                    let c = f(p.x) + "," + f(p.y)
                    if coords.last != c { coords.append(c) }
                }
                out += "<polyline fill=\"none\" stroke=\"\(colour)\" stroke-width=\"1.6\" stroke-linejoin=\"round\" "
                    + "stroke-linecap=\"round\" points=\"\(coords.joined(separator: " "))\"/>\n"
                if coords.count == 1 { out += "<path fill=\"\(colour)\" d=\"\(dot(pixels[0], r: 2.5))\"/>\n" }
                drawn += pixels
                for (a, b) in zip(pixels, pixels.dropFirst()) {   // sample long segments too
                    let n = min(Int(max(abs(b.x - a.x), abs(b.y - a.y)) / 8), 200)
                    if n > 0 {
                        for k in 1...n {
                            let t = Double(k) / Double(n + 1)
                            drawn.append((a.x + (b.x - a.x) * t, a.y + (b.y - a.y) * t))
                        }
                    }
                }
            case .markers:
                var d = "", seen = Set<String>()
                for p in pixels where p.x >= x0 - 3 && p.x <= x1 + 3 && p.y >= y0 - 3 && p.y <= y1 + 3 {
                    if seen.insert(f(p.x) + "," + f(p.y)).inserted { d += dot(p, r: 2.5); drawn.append(p) }
                }
                if !d.isEmpty { out += "<path fill=\"\(colour)\" fill-opacity=\"0.75\" d=\"\(d)\"/>\n" }
            }
        }
        out += "</g>\n"

        // Axes: lines, tick marks, tick labels, axis labels.
        out += line(x0, y1, x1, y1, "#333333") + line(x0, y0, x0, y1, "#333333")
        for (v, text) in xAxis.labels {
            guard let p = xAxis.position(v) else { continue }
            out += line(p, y1, p, y1 + 4, "#333333")
            out += "<text x=\"\(f(p))\" y=\"\(f(y1 + 17))\" font-size=\"11\" text-anchor=\"middle\" fill=\"#333\">\(text)</text>\n"
        }
        for (v, text) in yAxis.labels {
            guard let p = yAxis.position(v) else { continue }
            out += line(x0 - 4, p, x0, p, "#333333")
            out += "<text x=\"\(f(x0 - 7))\" y=\"\(f(p))\" dy=\"0.35em\" font-size=\"11\" text-anchor=\"end\" fill=\"#333\">\(text)</text>\n"
        }
        out += "<text x=\"\(f((x0 + x1) / 2))\" y=\"\(f(h - 9))\" font-size=\"12\" text-anchor=\"middle\" fill=\"#222\">"
            + "\(xmlEscaped(xLabel))</text>\n"
        out += "<text transform=\"translate(18,\(f((y0 + y1) / 2))) rotate(-90)\" font-size=\"12\" text-anchor=\"middle\" "
            + "fill=\"#222\">\(xmlEscaped(yLabel))</text>\n"

        out += legend(plot: (x0, y0, x1, y1), avoiding: drawn)
        return out + "</svg>\n"
    }

    /// The legend box, in whichever plot corner the data leaves emptiest.
    private func legend(plot: (x0: Double, y0: Double, x1: Double, y1: Double),
                        avoiding drawn: [(x: Double, y: Double)]) -> String {
        guard !series.isEmpty else { return "" }
        let names = series.map { truncated($0.name, maxChars: 48) }
        let bw = 46 + 7 * Double(names.map(\.count).max() ?? 0), bh = 8 + 17 * Double(names.count)
        let corners = [(plot.x0 + 10, plot.y0 + 10), (plot.x1 - 10 - bw, plot.y1 - 10 - bh),
                       (plot.x1 - 10 - bw, plot.y0 + 10), (plot.x0 + 10, plot.y1 - 10 - bh)]
        let crowding = corners.map { c in
            drawn.count { $0.x >= c.0 - 4 && $0.x <= c.0 + bw + 4 && $0.y >= c.1 - 4 && $0.y <= c.1 + bh + 4 }
        }
        let (lx, ly) = corners[crowding.indices.min { crowding[$0] < crowding[$1] } ?? 0]
        var out = "<g>\n<rect x=\"\(f(lx))\" y=\"\(f(ly))\" width=\"\(f(bw))\" height=\"\(f(bh))\" fill=\"#ffffff\" "
            + "fill-opacity=\"0.9\" stroke=\"#bbbbbb\"/>\n"
        for (i, s) in series.enumerated() {
            let colour = palette[i % palette.count], cy = ly + 12.5 + 17 * Double(i)
            switch s.style {
            case .line: out += "<line x1=\"\(f(lx + 8))\" y1=\"\(f(cy))\" x2=\"\(f(lx + 30))\" y2=\"\(f(cy))\" "
                + "stroke=\"\(colour)\" stroke-width=\"2.4\"/>\n"
            case .markers: out += "<path fill=\"\(colour)\" d=\"\(dot((lx + 19, cy), r: 3.5))\"/>\n"
            }
            out += "<text x=\"\(f(lx + 36))\" y=\"\(f(cy))\" dy=\"0.35em\" font-size=\"12\" fill=\"#222\">"
                + "\(xmlEscaped(names[i]))</text>\n"
        }
        return out + "</g>\n"
    }
}

/// The empirical CDF of `samples` as chart points (x = value, y = fraction of samples ≤ x),
/// one point per distinct value, thinned to at most `maxPoints` points while keeping the min,
/// the max and the tail: every point above the 99th percentile is kept while the tail fits in
/// half the limit or in what the body leaves free (beyond that the tail is thinned evenly too).
/// NaN and infinite samples are ignored. The result is strictly increasing in x and y, and its
/// last point has y = 1.
public func cdfPoints(_ samples: [Double], maxPoints: Int = 2000) -> [ChartPoint] {
    let sorted = samples.filter(\.isFinite).sorted()
    guard !sorted.isEmpty, maxPoints > 0 else { return [] }
    let n = Double(sorted.count)
    var steps: [ChartPoint] = []
    for i in sorted.indices where i == sorted.count - 1 || sorted[i + 1] != sorted[i] {
        steps.append(ChartPoint(x: sorted[i], y: Double(i + 1) / n))
    }
    guard steps.count > maxPoints else { return steps }
    let tailStart = steps.firstIndex { $0.y > 0.99 } ?? steps.count - 1
    let bodyCount = tailStart, tailCount = steps.count - tailStart
    let tailBudget = min(tailCount, maxPoints - min(bodyCount, maxPoints / 2))
    let bodyBudget = min(bodyCount, maxPoints - tailBudget)
    return (spread(0..<tailStart, bodyBudget, keepLast: false) + spread(tailStart..<steps.count, tailBudget, keepLast: true))
        .map { steps[$0] }
}

/// `k` indices of `r`, evenly spaced and including both ends (only one end when `k` is 1).
private func spread(_ r: Range<Int>, _ k: Int, keepLast: Bool) -> [Int] {
    guard k > 0, !r.isEmpty else { return [] }
    if k >= r.count { return Array(r) }
    if k == 1 { return [keepLast ? r.upperBound - 1 : r.lowerBound] }
    return (0..<k).map { r.lowerBound + ($0 * (r.count - 1) + (k - 1) / 2) / (k - 1) }
}

// MARK: - Axes and ticks

/// An axis ready to draw: its range, its grid lines, its labelled ticks, and the pixels it spans.
struct ResolvedAxis {
    var scale: AxisScale
    var range: ClosedRange<Double>
    var major: [Double], minor: [Double]
    var labels: [(value: Double, text: String)]
    var from = 0.0, to = 1.0

    /// The pixel position of `v`, nil if the axis cannot show it (not finite; not positive on a log axis).
    func position(_ v: Double) -> Double? {
        guard let t = transform(v, scale), let lo = transform(range.lowerBound, scale),
              let hi = transform(range.upperBound, scale), hi > lo else { return nil }
        let p = from + (t - lo) / (hi - lo) * (to - from)
        return p.isFinite ? p : nil
    }
}

private func transform(_ v: Double, _ scale: AxisScale) -> Double? {
    switch scale {
    case .linear: return v.isFinite ? v : nil
    case .log10: return v.isFinite && v > 0 ? log10(v) : nil
    }
}

/// Resolves an axis: the explicit range if usable (a log range's non-positive lower end is
/// replaced from the data), otherwise the data's rounded out to ticks; degenerate ranges widened.
func resolveAxis(scale: AxisScale, explicit: ClosedRange<Double>?, values: [Double], target: Int) -> ResolvedAxis {
    let usable = scale == .linear
        ? values.filter { abs($0) < 1e300 }.map { abs($0) < 1e-200 ? 0 : $0 }
        : values.filter { $0 > 1e-300 && $0 < 1e300 }
    var lo = usable.min() ?? (scale == .linear ? 0 : 1), hi = usable.max() ?? (scale == .linear ? 1 : 10)
    var auto = true
    if let r = explicit, abs(r.lowerBound) < 1e300, abs(r.upperBound) < 1e300,
       scale == .linear || r.upperBound > 1e-300 {
        auto = false
        hi = r.upperBound
        lo = scale == .linear || r.lowerBound > 1e-300
            ? r.lowerBound : usable.min().flatMap { $0 < hi ? $0 : nil } ?? hi / 1000
    }
    var labels: [(value: Double, text: String)] = []
    switch scale {
    case .linear:
        if hi - lo <= max(abs(lo), abs(hi)) * 1e-9 {
            let pad = lo == 0 ? 1 : abs(lo) * 0.1
            lo -= pad; hi += pad
        }
        let step = niceStep(hi - lo, target: target)
        let first = floor(lo / step.value), last = (hi / step.value).rounded(.up)
        if auto, abs(first) < 1e15, abs(last) < 1e15 {   // round out to ticks, exactly as linearTicks makes them
            lo = decimal(Int(first) * step.mantissa, step.exponent)
            hi = decimal(Int(last) * step.mantissa, step.exponent)
        }
        let ticks = linearTicks(lo...hi, step: step)
        let compact = (ticks.map(abs).max() ?? 0) >= 10_000
        labels = ticks.map { ($0, tickLabel($0, decimals: max(0, -step.exponent), compact: compact)) }
        return ResolvedAxis(scale: scale, range: lo...hi, major: ticks, minor: [], labels: labels)
    case .log10:
        if hi / lo <= 1 + 1e-9 { lo /= 3.1622776601683795; hi *= 3.1622776601683795 }
        if auto { lo = pow(10, floor(log10(lo))); hi = pow(10, log10(hi).rounded(.up)) }
        let ticks = logTicks(lo...hi)
        var labelled = ticks.major
        if labelled.count < 2 {   // less than a decade: label the minor ticks too, or the 1-2-5 ones
            labelled = (ticks.major + ticks.minor).sorted()
            if labelled.count > 6 { labelled = labelled.filter { [1, 2, 5].contains(leadingDigit($0)) } }
        } else if labelled.count > 10 {   // many decades: label every n-th
            let stride = (labelled.count + 9) / 10
            labelled = labelled.filter { Int(log10($0).rounded()) % stride == 0 }
        }
        if labelled.count < 2 {   // not even a factor of ten: linear steps
            let step = niceStep(hi - lo, target: target)
            labels = linearTicks(lo...hi, step: step).filter { $0 > 0 }
                .map { ($0, tickLabel($0, decimals: max(0, -step.exponent))) }
        } else {
            labels = labelled.map { ($0, tickLabel($0, decimals: max(0, -Int(floor(log10($0) + 1e-9))))) }
        }
        return ResolvedAxis(scale: scale, range: lo...hi, major: ticks.major,
                            minor: ticks.major.count > 16 ? [] : ticks.minor, labels: labels)
    }
}

/// A 1-2-5 step that divides `span` into about `target` intervals, as mantissa × 10^exponent.
func niceStep(_ span: Double, target: Int) -> (mantissa: Int, exponent: Int, value: Double) {
    let raw = span / Double(max(target, 1))
    guard raw.isFinite, raw > 1e-290 else { return (1, 0, 1) }
    var e = Int(floor(log10(raw)))
    let m = raw / pow(10, Double(e))
    var mantissa = m < 1.5 ? 1 : m < 3 ? 2 : m < 7 ? 5 : 10
    if mantissa == 10 { mantissa = 1; e += 1 }
    return (mantissa, e, decimal(mantissa, e))
}

/// The multiples of `step` within `range`, computed so that 0.1-steps give 0.3, not 0.30000000000000004.
func linearTicks(_ range: ClosedRange<Double>, step: (mantissa: Int, exponent: Int, value: Double)) -> [Double] {
    let first = (range.lowerBound / step.value - 1e-9).rounded(.up)
    let last = floor(range.upperBound / step.value + 1e-9)
    guard abs(first) < 1e15, abs(last) < 1e15, last - first < 1000 else { return [range.lowerBound, range.upperBound] }
    guard first <= last else { return [] }
    return (Int(first)...Int(last)).map { decimal($0 * step.mantissa, step.exponent) }
}

/// About `target` ticks at a 1-2-5 step within `range`.
func linearTicks(_ range: ClosedRange<Double>, target: Int) -> [Double] {
    linearTicks(range, step: niceStep(range.upperBound - range.lowerBound, target: target))
}

/// Powers of ten within `range` (major) and their 2…9 multiples (minor).
func logTicks(_ range: ClosedRange<Double>) -> (major: [Double], minor: [Double]) {
    guard range.lowerBound > 0, range.upperBound.isFinite else { return ([], []) }
    var major: [Double] = [], minor: [Double] = []
    let lo = range.lowerBound * (1 - 1e-9), hi = range.upperBound * (1 + 1e-9)
    for e in Int(floor(log10(range.lowerBound)))...Int(log10(range.upperBound).rounded(.up)) {
        for m in 1...9 {
            let v = decimal(m, e)
            if v >= lo && v <= hi { if m == 1 { major.append(v) } else { minor.append(v) } }
        }
    }
    return (major, minor)
}

/// m × 10^e, exact when it is representable (dividing by 10^-e rather than multiplying by 10^e).
private func decimal(_ m: Int, _ e: Int) -> Double {
    e >= 0 ? Double(m) * pow(10, Double(e)) : Double(m) / pow(10, Double(-e))
}

/// The leading digit of a positive `v`.
private func leadingDigit(_ v: Double) -> Int { Int((v / pow(10, floor(log10(v) + 1e-9))).rounded()) }

// MARK: - Text

/// `value` rounded to `decimals` decimals, without trailing zeros: 0.25, 10, -3.5. Not finite: "0".
func formatNumber(_ value: Double, decimals: Int) -> String {
    guard value.isFinite else { return "0" }
    let d = min(max(decimals, 0), 15)
    let scale = pow(10, Double(d)), scaled = (abs(value) * scale).rounded()
    guard scaled < 9e15 else { return value.magnitude < 1 ? "0" : value.description }
    let units = Int64(scaled), divisor = Int64(scale)
    var text = (value < 0 && units != 0 ? "-" : "") + String(units / divisor)
    if d > 0, units % divisor != 0 {
        var fraction = String(units % divisor)
        fraction = String(repeating: "0", count: d - fraction.count) + fraction
        while fraction.last == "0" { fraction.removeLast() }
        text += "." + fraction
    }
    return text
}

/// A tick label: `formatNumber`, and when `compact`, k/M/G/T suffixes from 1000 on: 1k, 2.5M.
func tickLabel(_ value: Double, decimals: Int, compact: Bool = true) -> String {
    var v = value, d = decimals
    if compact && abs(value) >= 1000 {
        for suffix in ["k", "M", "G", "T"] {
            v /= 1000; d += 3
            if abs(v) < 1000 || suffix == "T" { return formatNumber(v, decimals: d) + suffix }
        }
    }
    return formatNumber(value, decimals: decimals)
}

/// `s` with the XML special characters escaped and the characters XML 1.0 forbids dropped.
func xmlEscaped(_ s: String) -> String {
    var out = ""
    out.reserveCapacity(s.utf8.count)
    for c in s.unicodeScalars {
        switch c {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&apos;"
        case "\t", "\n", "\r": out += " "
        default: if c.value >= 0x20 && c.value != 0xFFFE && c.value != 0xFFFF { out.unicodeScalars.append(c) }
        }
    }
    return out
}

private func truncated(_ s: String, maxChars: Int) -> String {
    s.count <= max(maxChars, 4) ? s : String(s.prefix(max(maxChars, 4) - 1)) + "…"
}

/// A pixel coordinate: one decimal.
private func f(_ v: Double) -> String { formatNumber(v, decimals: 1) }

private func line(_ xa: Double, _ ya: Double, _ xb: Double, _ yb: Double, _ colour: String) -> String {
    "<line x1=\"\(f(xa))\" y1=\"\(f(ya))\" x2=\"\(f(xb))\" y2=\"\(f(yb))\" stroke=\"\(colour)\"/>\n"
}

/// A filled circle as path data (two arcs), so that thousands of markers fit in one `<path>`.
private func dot(_ p: (x: Double, y: Double), r: Double) -> String {
    "M\(f(p.x - r)),\(f(p.y))a\(f(r)),\(f(r)) 0 1 0 \(f(2 * r)),0a\(f(r)),\(f(r)) 0 1 0 \(f(-2 * r)),0"
}

private func fnv1a(_ s: String) -> UInt32 {
    s.utf8.reduce(2_166_136_261) { ($0 ^ UInt32($1)) &* 16_777_619 }
}

/// Blue, vermilion, green, orange, purple, brown: distinguishable, also in greyscale by order.
private let palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
