import Foundation
import Glibc
import PostcopyCore
import PostcopyOS

/// Where the programs a benchmark runs are, and where it keeps its files.
public struct BenchEnvironment: Sendable {
    /// postcopyd, postcopy-push, postcopy-guest (a release build).
    public var binDirectory: String
    /// The C baselines (benchmarks/baseline).
    public var baselineDirectory: String
    /// The repository's scripts (make-test-certs.sh for the TLS runs).
    public var scriptsDirectory: String
    /// Scratch space for one run's files; removed by nobody (kept for a look).
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

/// A child process with its output in files.
final class Child: @unchecked Sendable {
    // SAFETY (@unchecked): used from the thread that made it only.
    let name: String
    let process = Process()
    let stdoutPath: String
    let stderrPath: String

    init(_ name: String, _ executable: String, _ arguments: [String], stdout: String, stderr: String,
         environment: [String: String] = [:]) throws {
        self.name = name
        stdoutPath = stdout
        stderrPath = stderr
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        _ = FileManager.default.createFile(atPath: stdout, contents: nil)
        _ = FileManager.default.createFile(atPath: stderr, contents: nil)
        process.standardOutput = FileHandle(forWritingAtPath: stdout)
        process.standardError = FileHandle(forWritingAtPath: stderr)
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }

    /// Waits up to `seconds` for the exit; kills the process if it has not.
    func wait(seconds: Double) throws -> Int32 {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        if process.isRunning {
            kill()
            throw BenchmarkError("\(name) did not finish within \(Int(seconds)) s; its log: \(stderrPath)")
        }
        return process.terminationStatus
    }

    /// Waits and requires exit status 0.
    func succeed(seconds: Double) throws {
        let status = try wait(seconds: seconds)
        guard status == 0 else {
            let tail = (try? String(contentsOfFile: stderrPath, encoding: .utf8))?.split(separator: "\n").suffix(5)
                .joined(separator: "\n") ?? ""
            throw BenchmarkError("\(name) exited \(status); the end of its log (\(stderrPath)):\n\(tail)")
        }
    }

    func kill() {
        if process.isRunning {
            Glibc.kill(pid, SIGKILL)
            process.waitUntilExit()
        }
    }

    var output: String { (try? String(contentsOfFile: stdoutPath, encoding: .utf8)) ?? "" }
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
            throw BenchmarkError("\(child.name) exited \(child.process.terminationStatus) before \(what); its log: \(child.stderrPath)")
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
