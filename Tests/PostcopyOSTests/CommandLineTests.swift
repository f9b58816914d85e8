import Foundation
import Testing
import PostcopyOS

/// The built executables, run as an operator would, their output and exit
/// status compared exactly where they are deterministic.
@Suite struct CommandLineTests {
    /// The executables sit beside the test bundle in the build folder.

    struct Run {
        let status: Int32
        let stdout: String
        let stderr: String
    }

    func run(_ program: String, _ arguments: [String], environment: [String: String] = [:]) throws -> Run {
        let path = program.hasPrefix("/") ? program : Self.binary(program)
        try #require(FileManager.default.isExecutableFile(atPath: path),
                     "\(path) is missing: build it first ('swift build'; 'make test' does)")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Run(status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
                   stderr: String(decoding: stderr, as: UTF8.self))
    }

    static func binary(_ name: String) -> String {
        var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        while directory.lastPathComponent.hasSuffix(".xctest") || directory.lastPathComponent == "Contents" {
            directory.deleteLastPathComponent()
        }
        return directory.appendingPathComponent(name).path
    }

    @Test func unparsableSizeIsAUsageError() throws {
        let result = try run("postcopyd", ["exercise", "--size", "12X"])
        #expect(result.status == 64)
        #expect(result.stderr.hasPrefix("Error: The value '12X' is invalid for '--size <size>': '12X' is not a size (examples: 4096, 64M, 1G)\n"))
        #expect(result.stdout.isEmpty)
    }

    @Test(arguments: ["postcopyd", "postcopy-push"])
    func unknownSchedulingClassIsAUsageError(program: String) throws {
        let arguments = program == "postcopyd" ? ["serve", "--size", "64M", "--background-scheduling", "nice:40"]
                                               : ["--ram", "/x", "--to", "127.0.0.1:1", "--no-pause", "--background-scheduling", "nice:40"]
        let result = try run(program, arguments)
        #expect(result.status == 64)
        #expect(result.stderr.contains("'nice:40' is not a scheduling class (idle, normal, or nice:N with N from 1 to 19)"), "\(result.stderr)")
    }

    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func misalignedSizeNamesTheWholeChain() throws {
        let result = try run("postcopyd", ["exercise", "--size", "3000"])
        #expect(result.status == 1)
        #expect(result.stderr == "Error: create guest RAM: size guest RAM: region size 3000 bytes is not a multiple of the 4 KiB page size\n")
    }

    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func hugetlbfsDirectoryMustBeHugetlbfs() throws {
        let result = try run("postcopyd", ["exercise", "--memory", "hugetlbfs", "--hugetlbfs-dir", "/tmp", "--size", "4M"])
        #expect(result.status == 1)
        #expect(result.stderr.hasPrefix("Error: create guest RAM: hugetlbfs file in /tmp (2 MiB pages): not a hugetlbfs file (filesystem magic 0x"))
    }

    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func checkPrintsTheTableAndPasses() throws {
        let result = try run("postcopyd", ["check"])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let names = result.stdout.split(separator: "\n").compactMap { $0.split(separator: " ").first.map(String.init) }
        for row in ["kernel", "/dev/userfaultfd", "userfaultfd(2)", "uffd", "hugepages", "hugetlbfs", "systemd", "shmem", "self-test"] {
            #expect(names.contains(row), "row \(row) in:\n\(result.stdout)")
        }
        #expect(result.stdout.contains("self-test shmem      pass: 4096 pages touched, 4096 faults\n"))
        #expect(result.stdout.hasSuffix("result: ready for postcopy\n"))
    }

    @Test(.enabled(if: !Host.isRoot, "only meaningful when not root"))
    func checkWithoutAccessFailsWithReasons() throws {
        let result = try run("postcopyd", ["check"])
        #expect(result.status == 1)
        #expect(result.stdout.contains("missing: no usable userfaultfd"))
    }

    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func exerciseReportsWhatItDid() throws {
        let result = try run("postcopyd", ["exercise", "--size", "8M", "--hole-every", "8"])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let lines = result.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first == "postcopyd exercise: 8 MiB of memfd (shmem, 4 KiB pages), random touch order (seed 1)")
        #expect(lines.contains("region:        8 MiB of memfd (shmem, 4 KiB pages), 2048 pages"))
        #expect(lines.contains("faults:        1792 minor (UFFDIO_CONTINUE), 256 missing (hole materialized, then CONTINUE)"))
        #expect(lines.last == "checks:        pass: 2048 pages touched, 2048 faults")
    }

    @Test func serveRefusesAMistakeInItsConfigFileWithTheLine() throws {
        let path = "/tmp/postcopy-test-config-\(getpid()).conf"
        defer { unlink(path) }
        try "size = 64M\nlisen = 0.0.0.0:7070\n".write(toFile: path, atomically: true, encoding: .utf8)
        let result = try run("postcopyd", ["serve", "--config", path])
        #expect(result.status == 64)
        #expect(result.stderr.hasPrefix("Error: \(path): line 2: unknown setting 'lisen' (known: background-scheduling, control-socket, dead-peer-timeout, hugetlbfs-dir, insecure-plaintext, json, listen, memory, migration-id, migration-secret-file, ram-file, ready-file, reconnect-timeout, size, stall-warning-ms, takeover, tls-ca, tls-cert, tls-client-name, tls-key, trace, vmm-socket, vmm-timeout, vmm-uid)\n"), "\(result.stderr)")
        let missing = try run("postcopyd", ["serve", "--config", path + ".absent"])
        #expect(missing.status == 64)
        #expect(missing.stderr.hasPrefix("Error: cannot read the settings file: open \(path).absent: "), "\(missing.stderr)")
    }

    @Test func ramFileAndHugetlbfsDirectoryAreOneChoice() throws {
        let result = try run("postcopyd", ["serve", "--size", "64M", "--insecure-plaintext", "--ram-file", "/dev/shm/x",
                                           "--hugetlbfs-dir", "/dev/hugepages"])
        #expect(result.status == 64)
        #expect(result.stderr.hasPrefix("Error: --ram-file and --hugetlbfs-dir both say where guest RAM lives: give one\n"), "\(result.stderr)")
    }

    /// A RAM file must be new, and on tmpfs for shmem: an existing file
    /// (another guest's memory, say) is left exactly as it was, and a file
    /// made on another filesystem is removed again.
    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func ramFileIsNewAndOnTmpfs() throws {
        let existing = "/dev/shm/postcopy-test-ram-file-\(getpid())"
        defer { unlink(existing) }
        try "another guest's memory".write(toFile: existing, atomically: false, encoding: .utf8)
        let sockets = ["--vmm-socket", "/tmp/postcopy-test-vmm-\(getpid()).sock",
                       "--control-socket", "/tmp/postcopy-test-control-\(getpid()).sock"]
        let taken = try run("postcopyd", ["serve", "--size", "4M", "--insecure-plaintext", "--listen", "127.0.0.1:0",
                                          "--ram-file", existing] + sockets)
        #expect(taken.status == 1)
        #expect(taken.stderr.contains("create the guest RAM file \(existing): EEXIST"), "\(taken.stderr)")
        #expect(readTextFile(existing) == "another guest's memory")

        let onDisk = "/tmp/postcopy-test-ram-file-\(getpid())"
        let disk = try run("postcopyd", ["serve", "--size", "4M", "--insecure-plaintext", "--listen", "127.0.0.1:0",
                                         "--ram-file", onDisk] + sockets)
        #expect(disk.status == 1)
        #expect(disk.stderr.contains("file \(onDisk) (shmem, 4 KiB pages): not on tmpfs (filesystem magic 0x"), "\(disk.stderr)")
        #expect(access(onDisk, F_OK) != 0, "the refused file was left behind")
    }

    @Test func serveNeedsASize() throws {
        let result = try run("postcopyd", ["serve", "--vmm-socket", "/tmp/x.sock", "--control-socket", "/tmp/y.sock"])
        #expect(result.status == 64)
        #expect(result.stderr.hasPrefix("Error: the size of guest RAM is required: --size, or 'size = ...' in --config\n"), "\(result.stderr)")
    }

    @Test func pushMustBeToldHowToPauseTheSource() throws {
        let result = try run("postcopy-push", ["--ram", "/dev/shm/none", "--to", "127.0.0.1:7070"])
        #expect(result.status == 64)
        #expect(result.stderr.hasPrefix("Error: say how to pause the source at switchover: --qmp, --pause-pid, --pause-cmd, or --no-pause\n"))
    }

    /// The migration secret is read through one descriptor whose type,
    /// owner and mode are checked first.
    @Test func aSecretFileOthersMayReadIsRefused() throws {
        let directory = "/tmp/postcopy-secret-test-\(getpid())"
        mkdir(directory, 0o700)
        defer { unlink(directory + "/open"); rmdir(directory + "/dir"); rmdir(directory) }
        let hex = String(repeating: "ab", count: 32) + "\n"
        let fd = open(directory + "/open", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        #expect(fd >= 0)
        _ = hex.withCString { write(fd, $0, strlen($0)) }
        fchmod(fd, 0o644)
        close(fd)
        mkdir(directory + "/dir", 0o700)
        let push = ["--ram", "/dev/shm/none", "--to", "127.0.0.1:9", "--no-pause", "--insecure-plaintext", "--migration-secret-file"]
        let open = try run("postcopy-push", push + [directory + "/open"])
        #expect(open.status == 64)
        #expect(open.stderr.contains("may be read by others (mode 644): chmod 600 it"), "\(open.stderr)")
        let dir = try run("postcopy-push", push + [directory + "/dir"])
        #expect(dir.status == 64)
        #expect(dir.stderr.contains("is not a regular file"), "\(dir.stderr)")
    }

    /// Combinations that cannot mean what they say are refused up front.
    @Test(arguments: [
        (["--no-pause", "--resumed-cmd", "true"], "--no-pause contradicts --resumed-cmd"),
        (["--qmp", "/run/q.qmp"], "--qmp needs --qmp-migrate-uri"),
        (["--qmp", "/run/q.qmp", "--qmp-migrate-uri", "unix:/x", "--pause-pid", "1"], "--qmp pauses, resumes and hands over by itself"),
        (["--no-pause", "--qmp-migrate-uri", "unix:/x"], "--qmp-migrate-uri goes with --qmp"),
        (["--no-pause", "--dirty-log", "uffd-wp"], "--dirty-log uffd-wp reads the source VMM's write log: give its --dirty-log-socket"),
        (["--no-pause", "--dirty-log", "bitmap"], "--dirty-log"),
        (["--no-pause", "--streams", "0"], "Error: --streams is a number of bulk connections from 1 to 8, not 0"),
        (["--no-pause", "--streams", "9"], "Error: --streams is a number of bulk connections from 1 to 8, not 9"),
    ])
    func pushRefusesContradictions(_ flags: [String], _ message: String) throws {
        let result = try run("postcopy-push", ["--ram", "/dev/shm/none", "--to", "127.0.0.1:7070", "--insecure-plaintext"] + flags)
        #expect(result.status == 64)
        #expect(result.stderr.contains(message), "\(result.stderr)")
    }

    @Test func pushNamesAMissingSourceFile() throws {
        let result = try run("postcopy-push", ["--ram", "/dev/shm/postcopy-no-such-file", "--to", "127.0.0.1:9", "--no-pause",
                                               "--insecure-plaintext"])
        #expect(result.status == 1)
        #expect(result.stderr.hasSuffix("""
            postcopy-push: migration failed: open the source RAM file
              caused by: open source RAM /dev/shm/postcopy-no-such-file: ENOENT (No such file or directory)

            """), "\(result.stderr)")
    }

    /// A daemon that cannot start says why as its last words: the step,
    /// then each cause on a line of its own, down to the errno.
    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func serveThatCannotStartPrintsTheChainDownToTheErrno() throws {
        let missing = "/tmp/postcopy-test-no-such-directory-\(getpid())"
        let result = try run("postcopyd", ["serve", "--size", "4M", "--insecure-plaintext", "--listen", "127.0.0.1:0",
                                           "--ram-file", missing + "/ram",
                                           "--vmm-socket", "/tmp/postcopy-test-vmm-\(getpid()).sock",
                                           "--control-socket", "/tmp/postcopy-test-control-\(getpid()).sock"],
                             environment: ["POSTCOPY_LOG": "stderr"])
        #expect(result.status == 1)
        #expect(result.stderr.hasSuffix("""
            postcopyd: cannot start: create guest RAM (4 MiB, file \(missing)/ram (shmem, 4 KiB pages))
              caused by: create the guest RAM file \(missing)/ram: ENOENT (No such file or directory)

            """), "\(result.stderr)")
        // The journal's record keeps the reason on one line.
        #expect(result.stderr.contains("reason=cannot start: create guest RAM (4 MiB, file \(missing)/ram (shmem, 4 KiB pages)): create the guest RAM file \(missing)/ram: ENOENT (No such file or directory)]"), "\(result.stderr)")
    }

    /// Guest RAM is not sent in clear text by accident: without TLS material
    /// or an explicit --insecure-plaintext each program refuses to start,
    /// saying what to give; so does one given both, or broken TLS files.
    @Test func transportSecurityIsAnExplicitChoice() throws {
        let push = ["--ram", "/dev/shm/none", "--to", "127.0.0.1:9", "--no-pause"]
        let none = try run("postcopy-push", push)
        #expect(none.status == 64)
        #expect(none.stderr.contains("the agent's connections need TLS: give --tls-ca, --tls-cert and --tls-key, or --insecure-plaintext"), "\(none.stderr)")
        let serve = try run("postcopyd", ["serve", "--size", "64M", "--vmm-socket", "/tmp/x.sock", "--control-socket", "/tmp/y.sock"])
        #expect(serve.status == 64)
        #expect(serve.stderr.contains("give --tls-ca, --tls-cert and --tls-key and --tls-client-name, or --insecure-plaintext"), "\(serve.stderr)")
        let both = try run("postcopy-push", push + ["--insecure-plaintext", "--tls-ca", "/x.pem"])
        #expect(both.status == 64)
        #expect(both.stderr.contains("--insecure-plaintext turns TLS off"), "\(both.stderr)")
        let missing = try run("postcopy-push", push + ["--tls-ca", "/no/ca.pem", "--tls-cert", "/no/c.pem", "--tls-key", "/no/k.pem"])
        #expect(missing.status == 64)
        #expect(missing.stderr.contains("TLS: cannot read the CA certificate /no/ca.pem"), "\(missing.stderr)")
        let resume = try run("postcopy-push", ["--ram", "/dev/shm/none", "--to", "127.0.0.1:9", "--resume", "--insecure-plaintext",
                                               "--migration-id", "0123456789abcdef0123456789abcdef"])
        #expect(resume.status == 64)
        #expect(resume.stderr.contains("--resume needs --migration-secret-file"), "\(resume.stderr)")
    }

    /// `postcopy-bench demo` refuses what it cannot run before it starts anything.
    @Test func demoRefusesBadOptionsBeforeStartingAnything() throws {
        for (arguments, message) in [(["--size", "3M"], "--size must be a positive multiple of 2 MiB, not 3M"),
                                     (["--dirty", "1.5"], "--dirty must be a share between 0 and 1, not 1.5"),
                                     (["--timeout", "0"], "--timeout must be positive")] {
            let result = try run("postcopy-bench", ["demo"] + arguments)
            #expect(result.status == 64)
            #expect(result.stderr.hasPrefix("Error: \(message)\n"), "\(result.stderr)")
            #expect(result.stdout.isEmpty)
        }
    }

    /// The first `"key":N` in `text`'s JSON.
    static func firstNumber(_ key: String, in text: String) -> UInt64? {
        guard let range = text.range(of: "\"\(key)\":") else { return nil }
        return UInt64(text[range.upperBound...].prefix { $0.isNumber })
    }

    /// `postcopy-bench demo`'s whole migration, with the three programs as
    /// separate processes and the source really stopped with SIGSTOP, on 64 MiB.
    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func aWholeMigrationWithTheThreePrograms() throws {
        let result = try run("postcopy-bench", ["demo", "--size", "64M", "--timeout", "120", "--scripts", Self.scripts])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.hasSuffix("demo: PASS — the destination image matches the source's digest\n"))
        // Each step's header, then what the programs printed.
        let lines = result.stdout.split(separator: "\n")
        #expect(lines.filter { $0.hasPrefix("== ") }.map { $0.prefix { $0 != ":" } }
                == ["== source", "== TLS 1.3", "== destination", "== migrate", "== postcopyctl watch", "== summaries (JSON)"],
                "\(result.stdout)")
        #expect(lines.filter { $0.hasPrefix("push: {") || $0.hasPrefix("daemon: {") || $0.hasPrefix("guest: {") }.count == 3)
        #expect(result.stdout.contains("\"verified\":true"))
        // A page crossed twice only if the agent resent it for a request.
        let duplicates = Self.firstNumber("duplicatePages", in: result.stdout)
        let resent = Self.firstNumber("postcopyPagesResent", in: result.stdout)
        #expect(duplicates != nil && resent != nil && duplicates! <= resent!, "duplicates \(String(describing: duplicates)), resent \(String(describing: resent))")
        // postcopyctl watch followed it to the end: its last line is the final status.
        let watched = result.stdout.components(separatedBy: "== postcopyctl watch\n").last?
            .components(separatedBy: "\n== ").first ?? ""
        #expect(watched.hasPrefix("postcopyd@demo · no agent yet · handshake (QEMU setup)"), "\(watched)")
        #expect(watched.split(separator: "\n").last?.contains(" · complete (QEMU completed) · ") == true, "\(watched)")
        // The source workload dirtied pages while round 1 ran, so round 2
        // resends some. (How many rounds follow depends on how fast they
        // go: a round shorter than the workload's 20 ms between rewrites
        // may find nothing new, and precopy then ends.)
        let push = try #require(result.stdout.split(separator: "\n").first { $0.hasPrefix("push: ") })
        let summary = try #require(try JSONSerialization.jsonObject(with: Data(push.dropFirst(6).utf8)) as? [String: Any])
        let rounds = try #require(summary["rounds"] as? [[String: Any]])
        try #require(rounds.count >= 2, "one precopy round: \(push)")
        #expect((rounds[1]["pagesSent"] as? Int ?? 0) + (rounds[1]["zeroPagesSent"] as? Int ?? 0) > 0,
                "the source workload dirtied nothing while round 1 ran: \(push)")
    }

    /// The repository's scripts directory (make-test-certs.sh).
    static var scripts: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("scripts").path
    }

    /// A demo whose guest refuses its options fails at once, naming the
    /// guest (not the agent left waiting for it), and leaves no program
    /// running and no file behind.
    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func aDemoThatFailsNamesTheProgramAndLeavesNothingBehind() throws {
        let result = try run("postcopy-bench", ["demo", "--size", "64M", "--timeout", "120", "--scripts", Self.scripts,
                                                "--", "--no-such-guest-option"])
        #expect(result.status == 1, "\(result.stdout)\(result.stderr)")
        #expect(result.stderr.hasSuffix("demo: FAILED: postcopy-guest exited 64 (its log is above)\n"), "\(result.stderr)")
        #expect(!result.stdout.contains("demo: PASS"))
        try expectNothingLeft(stdout: result.stdout, stderr: result.stderr)
    }

    /// SIGINT in the middle of the migration kills every program the demo
    /// started (the source among them, stopped by then) and removes its files.
    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func anInterruptedDemoLeavesNothingBehind() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("demo-interrupt-\(getpid())").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.binary("postcopy-bench"))
        process.arguments = ["demo", "--size", "256M", "--timeout", "120", "--scripts", Self.scripts]
        _ = FileManager.default.createFile(atPath: "\(directory)/out", contents: nil)
        _ = FileManager.default.createFile(atPath: "\(directory)/err", contents: nil)
        process.standardOutput = FileHandle(forWritingAtPath: "\(directory)/out")
        process.standardError = FileHandle(forWritingAtPath: "\(directory)/err")
        try process.run()
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        func read(_ name: String) -> String { (try? String(contentsOfFile: "\(directory)/\(name)", encoding: .utf8)) ?? "" }
        let deadline = Date().addingTimeInterval(120)
        while !read("out").contains("== migrate\n") && process.isRunning && Date() < deadline { usleep(10_000) }
        try #require(read("out").contains("== migrate\n"), "the demo did not start the migration: \(read("out"))\(read("err"))")
        kill(process.processIdentifier, SIGINT)
        process.waitUntilExit()
        #expect(process.terminationStatus == 1, "\(read("err"))")
        #expect(read("err").hasSuffix("demo: interrupted by SIGINT: every program it started killed, its files removed\n"),
                "\(read("err"))")
        try expectNothingLeft(stdout: read("out"), stderr: read("err"))
    }

    /// Neither the demo's work directory nor its source RAM exists any
    /// more, and no process has either in its command line (both read from
    /// what the demo printed: the source's header, postcopyd's log).
    private func expectNothingLeft(stdout: String, stderr: String) throws {
        let sourceRAM = String(try #require(stdout.firstMatch(of: /in (\/dev\/shm\/postcopy-bench-[0-9]+-demo),/)?.1, "\(stdout)"))
        let work = String(try #require(stderr.firstMatch(of: /\/tmp\/postcopy-demo\.[A-Za-z0-9]+/)?.0, "\(stderr)"))
        #expect(!FileManager.default.fileExists(atPath: sourceRAM), "\(sourceRAM) left behind")
        #expect(!FileManager.default.fileExists(atPath: work), "\(work) left behind")
        for pid in try FileManager.default.contentsOfDirectory(atPath: "/proc") where Int32(pid) != nil {
            guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { continue }
            let commandLine = String(decoding: data.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
            #expect(!commandLine.contains(work) && !commandLine.contains(sourceRAM), "pid \(pid) still runs: \(commandLine)")
        }
    }
}
