import Glibc
import PostcopyCore
import PostcopyOS

/// Progress of a long phase on stderr: one line redrawn in place on a
/// terminal, a line every few seconds otherwise (a log, a pipe, journald).
public final class ProgressReporter: @unchecked Sendable {
    // SAFETY (@unchecked): called from one thread at a time.
    private let isTerminal: Bool
    private let interval: UInt64
    private var lastShown = monotonicNanoseconds()
    private var showing = false
    private let enabled: Bool

    /// `enabled: false` keeps it quiet (tests, --quiet).
    public init(enabled: Bool = true) {
        self.enabled = enabled
        isTerminal = isatty(STDERR_FILENO) == 1
        interval = isTerminal ? 200_000_000 : 2_000_000_000
    }

    /// Shows `line` if enough time passed since the last one (or `force`).
    public func update(_ line: @autoclosure () -> String, force: Bool = false) {
        guard enabled else { return }
        let now = monotonicNanoseconds()
        guard force || now - lastShown >= interval else { return }
        lastShown = now
        if isTerminal {
            writeStandardError("\r\u{1B}[K" + line())
            showing = true
        } else {
            writeStandardError(line() + "\n")
        }
    }

    /// Ends the line being redrawn, so that the next output starts clean.
    public func finish() {
        guard enabled, showing else { return }
        writeStandardError("\n")
        showing = false
    }

    /// "precopy round 2: 1.2 GiB sent, 812.3 MiB/s, 40% of the region scanned"
    public static func rate(bytes: UInt64, since start: UInt64) -> String {
        let seconds = max(Double(monotonicNanoseconds() - start) / 1e9, 1e-6)
        return "\(fixed(Double(bytes) / seconds / 1_048_576, 1)) MiB/s"
    }

    /// A text bar of `width` cells for `fraction` done.
    public static func bar(_ fraction: Double, width: Int = 24) -> String {
        let done = Int((min(max(fraction, 0), 1) * Double(width)).rounded())
        return "[" + String(repeating: "#", count: done) + String(repeating: ".", count: width - done) + "]"
    }
}
