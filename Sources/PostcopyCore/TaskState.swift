/// The scheduler state of a process or thread, as the third field of
/// `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) reports it.
///
/// The line reads `pid (comm) S ppid ...`, where comm is the task's name:
/// up to 15 bytes that may themselves contain spaces and parentheses, so the
/// state is the first non-space character after the *last* `)`.
public enum TaskState: Equatable, Sendable {
    /// `R`: running or runnable.
    case running
    /// `S`: interruptible sleep.
    case sleeping
    /// `D`: uninterruptible sleep (usually I/O or a page fault being served).
    case diskSleep
    /// `T`: stopped by a job-control signal (SIGSTOP, SIGTSTP...).
    case stopped
    /// `t`: stopped under a tracer (ptrace).
    case tracingStop
    /// `Z`: exited, not yet reaped.
    case zombie
    /// `X` (or `x` on 3.9–3.13 kernels): dead, being torn down.
    case dead
    /// Any other letter: `I` (idle kernel thread), `P` (parked), `W`, `K`...
    case other(Character)

    /// The state in the contents of a stat file; nil when the text is not a
    /// stat line (no `pid (comm)` prefix, or no state letter after it).
    public init?(statLine: String) {
        let scalars = Array(statLine.unicodeScalars)
        // "pid (": a decimal pid, one space, the opening parenthesis.
        var index = 0
        while index < scalars.count, ("0"..."9").contains(scalars[index]) { index += 1 }
        guard index > 0, index + 1 < scalars.count, scalars[index] == " ", scalars[index + 1] == "(" else {
            return nil
        }
        let openParenthesis = index + 1
        // The comm ends at the last ')' of the line: the fields after it are
        // numbers and a letter, never a parenthesis.
        guard let closeParenthesis = scalars.lastIndex(of: ")"), closeParenthesis > openParenthesis else {
            return nil
        }
        index = closeParenthesis + 1
        guard index < scalars.count, scalars[index] == " " else { return nil }
        while index < scalars.count, scalars[index] == " " { index += 1 }
        guard index < scalars.count else { return nil }
        let letter = scalars[index]
        // The state is a single letter, followed by a space (or the end).
        guard letter.properties.isAlphabetic, letter.isASCII else { return nil }
        guard index + 1 == scalars.count || scalars[index + 1] == " " || scalars[index + 1] == "\n" else {
            return nil
        }
        switch letter {
        case "R": self = .running
        case "S": self = .sleeping
        case "D": self = .diskSleep
        case "T": self = .stopped
        case "t": self = .tracingStop
        case "Z": self = .zombie
        case "X", "x": self = .dead
        default: self = .other(Character(letter))
        }
    }

    /// Whether a task in this state cannot touch memory until resumed
    /// (stopped or traced-stopped, zombie, dead).
    public var isHalted: Bool {
        switch self {
        case .stopped, .tracingStop, .zombie, .dead: return true
        case .running, .sleeping, .diskSleep, .other: return false
        }
    }
}
