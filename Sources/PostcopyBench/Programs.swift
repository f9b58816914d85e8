import Foundation
import Glibc
import PostcopyCore
import PostcopyOS

/// Where the programs a benchmark runs are, and where it keeps its files.
public struct BenchEnvironment: Sendable {
    /// postcopyd, postcopy-push, postcopy-guest, postcopyctl (a release build).
    public var binDirectory: String
    /// The C baselines (benchmarks/baseline).
    public var baselineDirectory: String
    /// The repository's scripts (make-test-certs.sh for the TLS runs).
    public var scriptsDirectory: String
    /// Scratch space for one run's files; kept for a look, but the demo's
    /// (a fresh directory in /tmp, removed when it ends).
    public var workDirectory: String
    /// Progress lines for the operator.
    public var say: @Sendable (String) -> Void

    public init(binDirectory: String, baselineDirectory: String, scriptsDirectory: String = "scripts",
                workDirectory: String, say: @escaping @Sendable (String) -> Void) {
        self.binDirectory = binDirectory
        self.baselineDirectory = baselineDirectory
        self.scriptsDirectory = scriptsDirectory
        self.workDirectory = workDirectory
        self.say = say
    }

    func program(_ name: String) -> String { binDirectory + "/" + name }
    func baseline(_ name: String) -> String { baselineDirectory + "/" + name }
    func script(_ name: String) -> String { scriptsDirectory + "/" + name }
}

public struct BenchmarkError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A child process with its output in files (its stderr, optionally, on
/// this process's own). Each is in `RunningChildren` from its start to its
/// end, so that an interrupted run can kill it from another thread.
final class Child: @unchecked Sendable {
    // SAFETY (@unchecked): used from the thread that made it only.
    let name: String
    let process = Process()
    let stdoutPath: String
    /// nil: its stderr is this process's.
    let stderrPath: String?

    init(_ name: String, _ executable: String, _ arguments: [String], stdout: String, stderr: String?,
         environment: [String: String] = [:]) throws {
        self.name = name
        stdoutPath = stdout
        stderrPath = stderr
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        _ = FileManager.default.createFile(atPath: stdout, contents: nil)
        process.standardOutput = FileHandle(forWritingAtPath: stdout)
        if let stderr {
            _ = FileManager.default.createFile(atPath: stderr, contents: nil)
            process.standardError = FileHandle(forWritingAtPath: stderr)
        }
        process.standardInput = FileHandle.nullDevice
        try process.run()
        RunningChildren.add(process.processIdentifier)
    }

    var pid: Int32 { process.processIdentifier }

    /// Where to read what it logged, for an error message.
    var log: String { stderrPath.map { "its log: \($0)" } ?? "its log is above" }

    /// How it ended: "exited 1", "was killed by signal 9".
    var ending: String {
        process.terminationReason == .uncaughtSignal ? "was killed by signal \(process.terminationStatus)"
                                                     : "exited \(process.terminationStatus)"
    }

    /// It has ended, other than by exiting 0.
    var hasFailed: Bool {
        !process.isRunning && !(process.terminationReason == .exit && process.terminationStatus == 0)
    }

    /// Why it failed: how it ended, and the end of its log.
    var failure: BenchmarkError {
        guard let stderrPath else { return BenchmarkError("\(name) \(ending) (\(log))") }
        let tail = (try? String(contentsOfFile: stderrPath, encoding: .utf8))?.split(separator: "\n").suffix(5)
            .joined(separator: "\n") ?? ""
        return BenchmarkError("\(name) \(ending); the end of its log (\(stderrPath)):\n\(tail)")
    }

    /// Waits up to `seconds` for it to exit 0, and kills it if it has not
    /// ended by then. Fails at once when one of `others` fails first: the
    /// first failure is the cause (a guest that refuses its options leaves
    /// postcopyd without a VMM, and the agent fails after it).
    func succeed(seconds: Double, watching others: [Child] = []) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline {
            if let failed = others.first(where: { $0 !== self && $0.hasFailed }) { throw failed.failure }
            usleep(20_000)
        }
        if process.isRunning {
            kill()
            throw BenchmarkError("\(name) did not finish within \(Int(seconds)) s; \(log)")
        }
        RunningChildren.remove(pid)
        if hasFailed { throw failure }
    }

    func kill() {
        if process.isRunning {
            Glibc.kill(pid, SIGKILL)
            process.waitUntilExit()
        }
        RunningChildren.remove(pid)
    }

    var output: String { (try? String(contentsOfFile: stdoutPath, encoding: .utf8)) ?? "" }
}

/// The children this process started and has not yet seen end. An
/// interrupted run (`postcopy-bench demo` on SIGINT) kills them all from
/// its signal thread; the run's own thread then sees its programs fail and
/// cleans up as after any failure.
public enum RunningChildren {
    private static let state = Locked<(pids: Set<Int32>, killed: Bool)>(([], false))

    static func add(_ pid: Int32) {
        let killedAlready = state.withLock { state in
            state.pids.insert(pid)
            return state.killed
        }
        // One started after `killAll` (the run had not seen it yet) goes too.
        if killedAlready { Glibc.kill(pid, SIGKILL) }
    }

    static func remove(_ pid: Int32) {
        state.withLock { _ = $0.pids.remove(pid) }
    }

    /// Sends SIGKILL to every child running, and to every child started from now on.
    public static func killAll() {
        let pids = state.withLock { state in
            state.killed = true
            return state.pids
        }
        for pid in pids { Glibc.kill(pid, SIGKILL) }
    }
}

/// Runs `executable` to its end and returns what it printed on stdout.
func runToEnd(_ name: String, _ executable: String, _ arguments: [String], in directory: String,
              seconds: Double) throws -> String {
    let child = try Child(name, executable, arguments, stdout: "\(directory)/\(name).out",
                          stderr: "\(directory)/\(name).err")
    try child.succeed(seconds: seconds)
    return child.output
}

/// The `key=value` lines of a baseline's output.
func keyValues(_ text: String) -> [String: String] {
    var values: [String: String] = [:]
    for line in text.split(separator: "\n") {
        guard let equals = line.firstIndex(of: "=") else { continue }
        values[String(line[..<equals])] = String(line[line.index(after: equals)...])
    }
    return values
}

/// Waits until `path` exists and is not empty.
func waitForFile(_ path: String, seconds: Double, _ what: String, while child: Child? = nil) throws {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if let attributes = try? FileManager.default.attributesOfItem(atPath: path),
           (attributes[.size] as? NSNumber)?.intValue ?? 0 > 0 { return }
        if let child, !child.process.isRunning {
            throw BenchmarkError("\(child.name) \(child.ending) before \(what); \(child.log)")
        }
        usleep(20_000)
    }
    throw BenchmarkError("timed out after \(Int(seconds)) s waiting for \(what)")
}

func makeDirectory(_ path: String) throws {
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
}

extension MachineFacts {
    /// This machine: /proc/cpuinfo's model name, the CPUs this process may
    /// use, MemTotal, the kernel release, and the CRC-32C implementation.
    public static func current() -> MachineFacts {
        let cpuinfo = readTextFile("/proc/cpuinfo") ?? ""
        let model = cpuinfo.split(separator: "\n").first { $0.hasPrefix("model name") }
            .map { $0.split(separator: ":", maxSplits: 1).last!.trimmingCharacters(in: .whitespaces) } ?? "unknown CPU"
        return MachineFacts(cpuModel: model, cpus: ProcessInfo.processInfo.activeProcessorCount,
                            memoryBytes: procValues(readTextFile("/proc/meminfo") ?? "")["MemTotal"] ?? 0,
                            kernel: CapabilityProbe.kernelRelease(), crc32c: CRC32C.implementation.rawValue)
    }
}
