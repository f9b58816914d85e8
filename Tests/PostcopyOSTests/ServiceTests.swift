import Foundation
import Glibc
import PostcopyCore
import Testing

/// postcopyd as systemd runs it, without systemd: a real migration into
/// `postcopyd serve --config`, with NOTIFY_SOCKET pointed at a datagram
/// socket owned by the test, and records sent to a real journald.
@Suite(.serialized) struct ServiceTests {
    static let needsJournald = "needs root and a systemd-journald answering on /run/systemd/journal/socket; 'make test' starts one"
    static var hasJournald: Bool { Host.isRoot && Host.journaldAnswers }

    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func notifiesReadyStatusWatchdogAndStopping() throws {
        let run = try ServiceRun.migrate(environment: ["WATCHDOG_USEC": "400000", "POSTCOPY_LOG": "stderr"])
        let messages = run.notifications
        try #require(!messages.isEmpty, "no sd_notify datagram arrived")
        #expect(messages[0] == "EXTEND_TIMEOUT_USEC=120000000", "\(messages)")
        let ready = try #require(messages.firstIndex { $0.hasPrefix("READY=1\nSTATUS=waiting for the agent on 127.0.0.1:") },
                                 "no READY=1 in \(messages)")
        #expect(ready == 1, "READY=1 comes once RAM and sockets are up, before anything else: \(messages)")
        let after = messages[(ready + 1)...]
        let watchdogs = after.filter { $0 == "WATCHDOG=1" }.count
        #expect(watchdogs >= 2, "WATCHDOG=1 pings every 200 ms with WATCHDOG_USEC=400000: \(messages)")
        let statuses = after.filter { $0.hasPrefix("STATUS=") }
        #expect(statuses.contains { $0.hasPrefix("STATUS=postcopy: ") || $0.hasPrefix("STATUS=precopy round ") },
                "STATUS follows the migration: \(statuses)")
        let last = try #require(messages.last)
        #expect(last.hasPrefix("STOPPING=1\nSTATUS=complete: \(run.summary["stalePagesAtSwitchover"] as? Int ?? -1) stale pages fetched"),
                "\(messages)")
        #expect(!messages.dropLast().contains { $0.hasPrefix("STOPPING=1") }, "STOPPING=1 only at the end: \(messages)")
    }

    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func noWatchdogPingsUnlessAsked() throws {
        let run = try ServiceRun.migrate(environment: ["POSTCOPY_LOG": "stderr"])
        #expect(run.notifications.contains { $0.hasPrefix("READY=1") })
        #expect(!run.notifications.contains("WATCHDOG=1"), "\(run.notifications)")
    }

    @Test(.enabled(if: ServiceTests.hasJournald, Comment(rawValue: ServiceTests.needsJournald)))
    func journalHasTheEventsWithTheirFields() throws {
        let run = try ServiceRun.migrate(environment: ["POSTCOPY_LOG": "journal"])
        let id = try #require(run.summary["migrationID"] as? String)
        let records = try JournalReader.records(pid: run.daemonPID, until: DaemonEvent.postcopyComplete)
        try #require(!records.isEmpty)
        // The id is known from the agent's HELLO on (the VMM may attach before).
        let accepted = try #require(records.firstIndex { $0["MESSAGE_ID"] == DaemonEvent.migrationAccepted.messageID })
        for (index, record) in records.enumerated() {
            if index >= accepted {
                #expect(record["MIGRATION_ID"] == id, "every record from the agent's HELLO on carries MIGRATION_ID: \(record)")
            } else {
                #expect(record["MIGRATION_ID"] == nil || record["MIGRATION_ID"] == id, "\(record)")
            }
            for field in ["PHASE", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "POSTCOPYD_INSTANCE"] {
                #expect(record[field] != nil, "\(field) missing in \(record)")
            }
            #expect(record["SYSLOG_IDENTIFIER"] == "postcopyd")
        }
        func event(_ event: DaemonEvent) throws -> [String: String] {
            try #require(records.first { $0["MESSAGE_ID"] == event.messageID }, "no \(event) record in \(records)")
        }
        let ready = try event(.ready)
        #expect(ready["REGION_BYTES"] == "\(64 << 20)")
        #expect(ready["PHASE"] == "handshake")
        let acceptance = try event(.migrationAccepted)
        #expect(acceptance["AGENT_ADDRESS"]?.hasPrefix("127.0.0.1:") == true)
        #expect(acceptance["PHASE"] == "precopy")
        let vmm = try event(.vmmAttached)
        #expect(vmm["VMM_PID"] == "\(run.guestPID)")
        #expect(vmm["VMM_UID"] == "0")
        let switchover = try event(.switchover)
        #expect(switchover["PHASE"] == "postcopy")
        #expect(switchover["PRIORITY"] == "5")
        #expect(switchover["PAGES_STALE"] == "\(run.summary["stalePagesAtSwitchover"] as? Int ?? -1)")
        let stalled = try event(.faultStalled)
        #expect(stalled["PRIORITY"] == "4")
        #expect(stalled["STALL_MS"].flatMap(Double.init) != nil, "\(stalled)")
        #expect(stalled["PAGE"].flatMap(UInt64.init).map { $0 < 16384 } == true, "\(stalled)")
        let complete = try event(.postcopyComplete)
        #expect(complete["PHASE"] == "complete")
        #expect(complete["PRIORITY"] == "6")
        for (field, key) in [("PAGES_STALE", "stalePagesAtSwitchover"), ("FAULTS_STALE", "faultsStale"),
                             ("FAULTS_CLEAN", "faultsClean"), ("BYTES_RECEIVED", "bytesReceived"),
                             ("PAGES_DUPLICATE", "duplicatePages")] {
            #expect(complete[field] == "\(run.summary[key] as? Int ?? -1)", "\(field) vs summary \(key)")
        }
        let downtime = try #require(run.summary["downtimeMs"] as? Double)
        #expect(complete["DOWNTIME_MS"] == String(format: "%.1f", downtime))
        let latency = try #require(run.summary["staleFaultLatency"] as? [String: Any])
        #expect(complete["FAULT_P99_US"] == String(format: "%.1f", latency["p99Us"] as? Double ?? -1))
        #expect(!records.contains { $0["MESSAGE_ID"] == DaemonEvent.migrationFailed.messageID })

        // The catalog explains the records (journalctl -x).
        let explained = try JournalReader.run(["-x", "--no-pager", "_PID=\(run.daemonPID)",
                                         "MESSAGE_ID=\(DaemonEvent.postcopyComplete.messageID)"])
        #expect(explained.contains("Subject: Postcopy complete: migration \(id) done"),
                "no catalog text (is systemd/postcopyd.catalog installed? 'make test' installs it):\n\(explained)")
        #expect(explained.contains("Every stale page arrived and is in place"))
    }

    @Test(.enabled(if: ServiceTests.hasJournald, Comment(rawValue: ServiceTests.needsJournald)))
    func aStoppedMigrationIsLoggedAsFailedWithItsReason() throws {
        let run = try ServiceRun.start(environment: ["POSTCOPY_LOG": "journal"])
        defer { run.cleanUp() }
        kill(run.daemon.processIdentifier, SIGTERM)
        run.daemon.waitUntilExit()
        #expect(run.daemon.terminationStatus == 1)
        let records = try JournalReader.records(pid: run.daemonPID, until: DaemonEvent.migrationFailed)
        let failed = try #require(records.first { $0["MESSAGE_ID"] == DaemonEvent.migrationFailed.messageID })
        #expect(failed["ERROR_CODE"] == "cancelled")
        #expect(failed["REASON"] == "stopped by SIGTERM during handshake")
        #expect(failed["PHASE"] == "handshake")
        #expect(failed["PRIORITY"] == "3")
        #expect(run.notifications.last == "STOPPING=1\nSTATUS=failed: stopped by SIGTERM during handshake (QEMU: failed)")
    }
}

extension ServiceTests {
    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func postcopyctlShowsTheStatus() throws {
        let run = try ServiceRun.start(environment: ["POSTCOPY_LOG": "stderr"])
        defer { run.cleanUp() }
        let socket = "\(run.directory)/control.sock"
        let json = try CommandLineTests().run("postcopyctl", ["status", "--socket", socket, "--json"])
        #expect(json.status == 0, "\(json.stderr)")
        let status = try JSONDecoder().decode(DaemonStatus.self, from: Data(json.stdout.utf8))
        #expect(status.instance == "service-test")
        #expect(status.phase == "handshake")
        #expect(status.pid == run.daemonPID)
        #expect(status.regionBytes == 64 << 20)
        #expect(status.statusLine.hasPrefix("waiting for the agent on 127.0.0.1:"))
        let text = try CommandLineTests().run("postcopyctl", ["status", "--socket", socket])
        #expect(text.stdout.split(separator: "\n").contains { $0.hasPrefix("phase:         handshake ") && $0.hasSuffix("│ QEMU setup") },
                "\(text.stdout)")
        #expect(status.qemu?.status == .setup && status.libvirt?.memoryTotal == 64 << 20)
        #expect(text.stdout.hasPrefix("instance:      service-test (pid \(run.daemonPID), up "), "\(text.stdout)")
        var mode = stat()
        #expect(stat(socket, &mode) == 0 && mode.st_mode & 0o777 == 0o600, "the control socket is 0600")
        let absent = try CommandLineTests().run("postcopyctl", ["status", "--socket", socket + ".absent"])
        #expect(absent.status == 1)
        #expect(absent.stderr == """
            postcopyctl: cannot ask postcopyd on \(socket).absent
              caused by: connect to \(socket).absent: ENOENT (No such file or directory)

            """)
    }

    /// `postcopyctl watch` follows the migration to its end and says how it
    /// ended, even when the daemon exits right after: the daemon sends the
    /// final status before it closes the control socket.
    @Test(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
    func postcopyctlWatchFollowsToTheEnd() throws {
        let run = try ServiceRun.start(environment: ["POSTCOPY_LOG": "stderr"])
        defer { run.cleanUp() }
        let socket = "\(run.directory)/control.sock"
        let json = try ServiceRun.spawn("postcopyctl", ["watch", "--socket", socket, "--json"],
                                        stdout: "\(run.directory)/watch.json", stderr: "\(run.directory)/watch-json.err")
        let view = try ServiceRun.spawn("postcopyctl", ["watch", "--socket", socket],
                                        stdout: "\(run.directory)/watch.txt", stderr: "\(run.directory)/watch.err")
        defer { [json, view].filter(\.isRunning).forEach { kill($0.processIdentifier, SIGKILL) } }
        // Each has its first status: the daemon has both watchers.
        for path in ["watch.json", "watch.txt"] {
            #expect(FailSafeWait.until { ((try? String(contentsOfFile: "\(run.directory)/\(path)", encoding: .utf8)) ?? "").contains("handshake") })
        }
        kill(run.daemon.processIdentifier, SIGTERM)
        json.waitUntilExit()
        view.waitUntilExit()
        run.daemon.waitUntilExit()
        #expect(json.terminationStatus == 1 && view.terminationStatus == 1)
        let lines = try String(contentsOfFile: "\(run.directory)/watch.json", encoding: .utf8).split(separator: "\n")
        let statuses = try lines.map { try JSONDecoder().decode(DaemonStatus.self, from: Data($0.utf8)) }
        #expect(statuses.first?.phase == "handshake" && statuses.first?.qemu?.status == .setup)
        let last = try #require(statuses.last)
        #expect(last.phase == "failed" && last.qemu?.status == .failed)
        #expect(last.failure == "stopped by SIGTERM during handshake")
        let text = try String(contentsOfFile: "\(run.directory)/watch.txt", encoding: .utf8)
        #expect(text.hasPrefix("postcopyd@service-test · no agent yet · handshake (QEMU setup) · "), "\(text)")
        #expect(text.hasSuffix(" | failed: stopped by SIGTERM during handshake\n"), "\(text)")
    }
}

/// Polls a condition every 20 ms for up to 30 s.
enum FailSafeWait {
    static func until(_ condition: () -> Bool) -> Bool {
        for _ in 0..<1500 {
            if condition() { return true }
            usleep(20_000)
        }
        return condition()
    }
}

/// journalctl, run and parsed.
enum JournalReader {
    static func run(_ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/journalctl")
        process.arguments = arguments
        let out = Pipe()
        process.standardOutput = out
        try process.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: data, as: UTF8.self)
    }

    /// The records of process `pid` (-o json, string fields), waiting up to
    /// 30 s (a loaded journald is slow to index) for the one with `event`'s MESSAGE_ID to be there.
    static func records(pid: Int32, until event: DaemonEvent) throws -> [[String: String]] {
        let deadline = Date().addingTimeInterval(30)
        while true {
            let lines = try run(["-o", "json", "--no-pager", "_PID=\(pid)"]).split(separator: "\n")
            let records = lines.compactMap { line -> [String: String]? in
                guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { return nil }
                return object.compactMapValues { $0 as? String }
            }
            if records.contains(where: { $0["MESSAGE_ID"] == event.messageID }) || Date() > deadline { return records }
            usleep(100_000)
        }
    }
}

/// A migration into `postcopyd serve`, each program a child process as an
/// operator would run them.
final class ServiceRun: @unchecked Sendable {
    let directory: String
    let daemon: Process
    let notify: NotifyListener
    var guestPID: Int32 = 0
    var summary: [String: Any] = [:]
    private var children: [Process] = []
    private let sourceRAM: String

    var daemonPID: Int32 { daemon.processIdentifier }
    var notifications: [String] { notify.messages }

    private init(directory: String, daemon: Process, notify: NotifyListener, sourceRAM: String) {
        self.directory = directory
        self.daemon = daemon
        self.notify = notify
        self.sourceRAM = sourceRAM
    }

    /// Starts the daemon from a config file and waits until it listens.
    static func start(environment: [String: String]) throws -> ServiceRun {
        let directory = try makeTemporaryDirectory()
        try makeCertificates(in: "\(directory)/tls")
        let config = """
            # written by ServiceTests
            listen = 127.0.0.1:0
            size = 64M
            memory = shmem
            vmm-socket = \(directory)/vmm.sock
            control-socket = \(directory)/control.sock
            ready-file = \(directory)/daemon.ready
            stall-warning-ms = 0
            tls-ca = \(directory)/tls/ca.pem
            tls-cert = \(directory)/tls/daemon.pem
            tls-key = \(directory)/tls/daemon.key
            tls-client-name = postcopy-agent
            json
            """
        try config.write(toFile: "\(directory)/test.conf", atomically: true, encoding: .utf8)
        let notify = try NotifyListener(path: "\(directory)/notify.sock")
        let daemon = try spawn("postcopyd", ["serve", "--instance", "service-test", "--config", "\(directory)/test.conf"],
                               environment: environment.merging(["NOTIFY_SOCKET": notify.path]) { $1 },
                               stdout: "\(directory)/daemon.json", stderr: "\(directory)/daemon.err")
        let run = ServiceRun(directory: directory, daemon: daemon, notify: notify,
                             sourceRAM: "/dev/shm/postcopy-test-service-\(getpid())")
        run.children.append(daemon)
        try run.waitFor("\(directory)/daemon.ready", "postcopyd to listen")
        return run
    }

    /// A whole 64 MiB migration, 10% of pages kept dirty, verified by the guest.
    static func migrate(environment: [String: String]) throws -> ServiceRun {
        let run = try start(environment: environment)
        defer { run.cleanUp() }
        try run.migrate()
        return run
    }

    private func migrate() throws {
        let source = try Self.spawn("postcopy-guest", ["source", "--ram", sourceRAM, "--size", "64M", "--dirty", "0.10",
                                                       "--ready-file", "\(directory)/source.ready"],
                                    stderr: "\(directory)/source.err")
        children.append(source)
        try waitFor("\(directory)/source.ready", "the source workload")
        let guest = try Self.spawn("postcopy-guest", ["vmm", "--socket", "\(directory)/vmm.sock", "--json"],
                                   stdout: "\(directory)/guest.json", stderr: "\(directory)/guest.err")
        children.append(guest)
        guestPID = guest.processIdentifier
        let endpoint = try String(contentsOfFile: "\(directory)/daemon.ready", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let push = try Self.spawn("postcopy-push", ["--ram", sourceRAM, "--to", endpoint,
                                                    "--pause-pid", "\(source.processIdentifier)", "--quiet",
                                                    "--tls-ca", "\(directory)/tls/ca.pem",
                                                    "--tls-cert", "\(directory)/tls/agent.pem",
                                                    "--tls-key", "\(directory)/tls/agent.key"],
                                  stderr: "\(directory)/push.err")
        children.append(push)
        let programs = [(push, "push"), (daemon, "daemon"), (guest, "guest")]
        for (process, _) in programs { process.waitUntilExit() }
        // One failure usually fails the others: show every program's log.
        if programs.contains(where: { $0.0.terminationStatus != 0 }) {
            let logs = programs.map { process, name in
                let errors = (try? String(contentsOfFile: "\(directory)/\(name).err", encoding: .utf8)) ?? ""
                return "\(name) exited \(process.terminationStatus):\n\(errors)"
            }
            try #require(Bool(false), "the migration failed\n\(logs.joined(separator: "\n"))")
        }
        let json = try Data(contentsOf: URL(fileURLWithPath: "\(directory)/daemon.json"))
        summary = try #require(try JSONSerialization.jsonObject(with: json) as? [String: Any])
        notify.finish()
    }

    func cleanUp() {
        for child in children where child.isRunning { kill(child.processIdentifier, SIGKILL) }
        for child in children { child.waitUntilExit() }
        notify.finish()
        unlink(sourceRAM)
        try? FileManager.default.removeItem(atPath: directory)
    }

    private func waitFor(_ path: String, _ what: String) throws {
        for _ in 0..<300 {
            if let size = try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int, size > 0 { return }
            usleep(50_000)
        }
        let errors = (try? String(contentsOfFile: "\(directory)/daemon.err", encoding: .utf8)) ?? ""
        Issue.record("timed out waiting for \(what); daemon said:\n\(errors)")
        throw CancellationError()
    }

    static func spawn(_ program: String, _ arguments: [String], environment: [String: String] = [:],
                      stdout: String? = nil, stderr: String? = nil) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: CommandLineTests.binary(program))
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        if let stdout {
            _ = FileManager.default.createFile(atPath: stdout, contents: nil)
            process.standardOutput = FileHandle(forWritingAtPath: stdout)
        }
        if let stderr {
            _ = FileManager.default.createFile(atPath: stderr, contents: nil)
            process.standardError = FileHandle(forWritingAtPath: stderr)
        }
        try process.run()
        return process
    }

    /// The test CA and both ends' certificates, by scripts/make-test-certs.sh.
    static func makeCertificates(in directory: String) throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("scripts/make-test-certs.sh").path
        // Not spawn(stdout:): creating the file would replace /dev/null.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [script, directory]
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw CancellationError() }
    }

    static func makeTemporaryDirectory() throws -> String {
        var template = Array("/tmp/postcopy-service-test.XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw POSIXError(.EIO) }
        return String(cString: made)
    }
}

/// A datagram socket standing in for systemd's notify socket: collects
/// what sd_notify sends, in order.
final class NotifyListener: @unchecked Sendable {
    let path: String
    private let fd: Int32
    private let lock = NSLock()
    private var received: [String] = []
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)

    init(path: String) throws {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.EIO) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else { throw POSIXError(.EADDRINUSE) }
        var timeout = timeval(tv_sec: 0, tv_usec: 100_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let thread = Thread { [self] in receiveLoop() }
        self.thread = thread
        thread.start()
    }

    private var stopping = false

    private func receiveLoop() {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count > 0 {
                let message = String(decoding: buffer[..<count], as: UTF8.self)
                lock.withLock { received.append(message) }
            } else if lock.withLock({ stopping }) {
                break
            }
        }
        done.signal()
    }

    /// Stops listening once every datagram already sent is read.
    func finish() {
        let first = lock.withLock { () -> Bool in
            defer { stopping = true }
            return !stopping
        }
        guard first else { return }
        done.wait()
        thread = nil  // it held this listener through its closure
        close(fd)
    }

    var messages: [String] { lock.withLock { received } }
}
