import Glibc
import PostcopyCore

/// Why pausing the workload, or a switchover hook, failed (failed system
/// calls are reported as `SystemCallError`).
public enum ProcessPauseError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `stop` gave up: `running` of the process's `tasks` threads were still
    /// not halted when the timeout passed.
    case notStopped(pid: Int32, running: Int, tasks: Int, timeoutNanoseconds: UInt64)
    /// A hook exited with a non-zero status.
    case exited(command: String, status: Int32)
    /// A hook was killed by a signal it did not handle.
    case killed(command: String, signal: Int32)
    /// A hook ran longer than its timeout and was killed.
    case timedOut(command: String, timeoutNanoseconds: UInt64)

    public var description: String {
        switch self {
        case let .notStopped(pid, running, tasks, timeout):
            return "stop pid \(pid): \(running) of \(tasks) tasks still running after \(milliseconds(timeout)) (SIGSTOP sent)"
        case let .exited(command, status):
            return "command '\(command)' failed with exit status \(status)"
        case let .killed(command, signal):
            return "command '\(command)' was killed by signal \(signal) (\(String(cString: strsignal(signal))))"
        case let .timedOut(command, timeout):
            return "command '\(command)' timed out after \(milliseconds(timeout)) and was killed"
        }
    }

    private func milliseconds(_ nanoseconds: UInt64) -> String {
        let tenths = nanoseconds / 100_000
        return tenths % 10 == 0 ? "\(tenths / 10) ms" : "\(tenths / 10).\(tenths % 10) ms"
    }
}

/// Pausing the source workload at switchover, and running the hooks around it.
public enum ProcessPause {
    private static let stopPollNanoseconds: UInt64 = 200_000
    private static let waitPollNanoseconds: UInt64 = 1_000_000

    /// Sends SIGSTOP to `pid` and waits until every task (thread) of it is
    /// halted (stopped, traced-stopped, zombie or dead, per
    /// /proc/PID/task/*/stat), polling every 200 µs, up to
    /// `timeoutNanoseconds`. Fails with ESRCH when the process does not
    /// exist, and with `ProcessPauseError.notStopped` (naming how many tasks
    /// were still running) when it is not fully stopped in time.
    public static func stop(pid: Int32, timeoutNanoseconds: UInt64) throws {
        try signal(pid, SIGSTOP, "SIGSTOP")
        let deadline = monotonicNanoseconds() &+ timeoutNanoseconds
        while true {
            let (running, tasks) = try runningTasks(of: pid)
            if running == 0 { return }
            if monotonicNanoseconds() >= deadline {
                throw ProcessPauseError.notStopped(pid: pid, running: running, tasks: tasks,
                                                   timeoutNanoseconds: timeoutNanoseconds)
            }
            sleepNanoseconds(stopPollNanoseconds)
        }
    }

    /// Sends SIGCONT to `pid`: the workload runs again.
    public static func resume(pid: Int32) throws {
        try signal(pid, SIGCONT, "SIGCONT")
    }

    /// Runs `command` with `/bin/sh -c` (stdin from /dev/null, stdout and
    /// stderr inherited, in a process group of its own), and waits for it.
    /// Fails unless it exits 0, naming the exit status or the signal; when it
    /// runs longer than `timeoutNanoseconds`, kills its process group with
    /// SIGKILL and fails with `ProcessPauseError.timedOut`.
    public static func run(command: String, timeoutNanoseconds: UInt64) throws {
        let pid = try spawnShell(command)
        let deadline = monotonicNanoseconds() &+ timeoutNanoseconds
        var status: Int32 = 0
        while try checkLibc("wait for '\(command)' (pid \(pid))", { waitpid(pid, &status, WNOHANG) }) == 0 {
            if monotonicNanoseconds() >= deadline {
                kill(-pid, SIGKILL)
                _ = try checkLibc("reap '\(command)' (pid \(pid))") { waitpid(pid, &status, 0) }
                throw ProcessPauseError.timedOut(command: command, timeoutNanoseconds: timeoutNanoseconds)
            }
            sleepNanoseconds(waitPollNanoseconds)
        }
        // The wait status, decoded as <sys/wait.h>'s macros do.
        let signal = status & 0x7f
        if signal == 0 {
            let exitStatus = (status >> 8) & 0xff
            guard exitStatus == 0 else { throw ProcessPauseError.exited(command: command, status: exitStatus) }
        } else {
            throw ProcessPauseError.killed(command: command, signal: signal)
        }
    }

    /// Starts `/bin/sh -c command` as the leader of a new process group,
    /// with default signal dispositions and an empty signal mask (whatever
    /// the daemon blocks or ignores), stdin from /dev/null. Returns its pid.
    static func spawnShell(_ command: String) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        var attributes = posix_spawnattr_t()
        try spawnCheck("posix_spawn_file_actions_init") { posix_spawn_file_actions_init(&actions) }
        defer { posix_spawn_file_actions_destroy(&actions) }
        try spawnCheck("posix_spawnattr_init") { posix_spawnattr_init(&attributes) }
        defer { posix_spawnattr_destroy(&attributes) }

        try spawnCheck("redirect stdin to /dev/null") {
            posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0)
        }
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        var allSignals = sigset_t()
        sigfillset(&allSignals)
        try spawnCheck("posix_spawnattr_setsigmask") { posix_spawnattr_setsigmask(&attributes, &noSignals) }
        try spawnCheck("posix_spawnattr_setsigdefault") { posix_spawnattr_setsigdefault(&attributes, &allSignals) }
        try spawnCheck("posix_spawnattr_setpgroup") { posix_spawnattr_setpgroup(&attributes, 0) }
        let flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP
        try spawnCheck("posix_spawnattr_setflags") { posix_spawnattr_setflags(&attributes, Int16(flags)) }

        let words: [String] = ["sh", "-c", command]
        let arguments = words.map { strdup($0) }
        defer { arguments.forEach { free($0) } }
        var pid: pid_t = 0
        try spawnCheck("spawn /bin/sh -c '\(command)'") {
            // SAFETY: argv is a nil-terminated array of C strings that
            // outlive the call (freed by the defer above).
            (arguments + [nil]).withUnsafeBufferPointer { argv in
                posix_spawn(&pid, "/bin/sh", &actions, &attributes, argv.baseAddress!, environ)
            }
        }
        return pid
    }

    /// posix_spawn and its helpers return the error number instead of
    /// setting errno.
    private static func spawnCheck(_ operation: @autoclosure () -> String, _ call: () -> Int32) throws(SystemCallError) {
        let result = call()
        guard result == 0 else { throw SystemCallError(operation(), Errno(result)) }
    }

    private static func signal(_ pid: Int32, _ signal: Int32, _ name: String) throws {
        // kill(2) with 0 or a negative pid signals whole process groups, or
        // every process: never what a pid from configuration means.
        guard pid > 0 else { throw SystemCallError("send \(name) to pid \(pid): not a single process", .invalid) }
        try checkLibc("send \(name) to pid \(pid)") { kill(pid, signal) }
    }

    /// How many of the tasks in /proc/PID/task are not halted, and how many
    /// there are. A task that exits while being read counts as halted.
    private static func runningTasks(of pid: Int32) throws -> (running: Int, tasks: Int) {
        let directory = "/proc/\(pid)/task"
        guard let stream = opendir(directory) else {
            // ENOENT: the process exited (and was reaped) since it was signalled.
            let error = Errno.current
            throw SystemCallError("list the tasks of pid \(pid) (\(directory))", error == .noEntry ? Errno(ESRCH) : error)
        }
        defer { closedir(stream) }
        var running = 0
        var tasks = 0
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let tid = Int32(name) else { continue } // "." and ".."
            tasks += 1
            // Unreadable or empty: the task exited since the listing.
            guard let text = readTextFile("\(directory)/\(tid)/stat"), !text.isEmpty else { continue }
            if let state = TaskState(statLine: text), state.isHalted { continue }
            running += 1
        }
        return (running, tasks)
    }

}
