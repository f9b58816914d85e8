import Glibc

/// A few lines on stdout kept current: redrawn in place on a terminal;
/// elsewhere (a pipe, a log) one line when the phase changes, at the end,
/// and every `logInterval`, never the same line twice in a row.
public final class LiveView {
    private let isTerminal: Bool
    private let logInterval: UInt64
    private var shownLines = 0
    private var lastLogged: (at: UInt64, key: String, text: String)?

    public init(logIntervalNanos: UInt64 = 5_000_000_000) {
        isTerminal = isatty(STDOUT_FILENO) == 1
        logInterval = logIntervalNanos
    }

    /// Shows `lines`; `final`: the last view, always shown.
    public func show(_ lines: [String], at now: UInt64, final: Bool = false) {
        if isTerminal {
            // Back to the first line drawn last time, and clear below it.
            var text = shownLines > 0 ? "\u{1B}[\(shownLines)F\u{1B}[J" : ""
            text += lines.joined(separator: "\n") + "\n"
            shownLines = lines.count
            print(text, terminator: "")
        } else {
            let key = lines.first ?? ""
            let text = lines.joined(separator: " | ")
            let phaseChanged = lastLogged.map { Self.phase(of: $0.key) != Self.phase(of: key) } ?? true
            guard final || phaseChanged || now &- (lastLogged?.at ?? 0) >= logInterval,
                  text != lastLogged?.text else { return }
            lastLogged = (now, key, text)
            print(text)
        }
        fflush(nil)  // stdout, without naming the global
    }

    /// The third " · " field of a `DaemonStatus.watchLines` head: the phase.
    private static func phase(of head: String) -> Substring {
        let fields = head.split(separator: " · ", omittingEmptySubsequences: false)
        return fields.count > 2 ? fields[2] : Substring(head)
    }
}
