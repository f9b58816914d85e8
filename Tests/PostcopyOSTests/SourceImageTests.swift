import CPostcopy
import Glibc
import PostcopyCore
@testable import PostcopyOS
import Testing

/// A file made for one test and removed when the test is done with it.
private final class ScratchFile {
    let path: String

    init(in directory: String) {
        path = "\(directory)/postcopyd-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    }

    deinit { unlink(path) }

    /// Creates the file with `size` bytes, the first `contents.count` of them given.
    func create(size: UInt64, contents: [UInt8] = []) throws {
        let fd = try checkLibc("create \(path)") { open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        defer { close(fd) }
        try checkLibc("ftruncate \(path)") { ftruncate(fd, off_t(size)) }
        var written = 0
        while written < contents.count {
            written += try checkLibc("pwrite \(path)") {
                contents.withUnsafeBytes { pwrite(fd, $0.baseAddress! + written, $0.count - written, off_t(written)) }
            }
        }
    }
}

/// Bytes that differ from page to page and within a page.
private func pattern(byteCount: Int, seed: UInt8) -> [UInt8] {
    (0..<byteCount).map { UInt8(truncatingIfNeeded: $0 / 4096 &* 31 &+ $0 &* 7) ^ seed }
}

private func errorText(_ body: () throws -> Void) -> String {
    do {
        try body()
        return "no error"
    } catch {
        return "\(error)"
    }
}

@Suite struct SourceImageTests {
    @Test func shmemFileReadsBack() throws {
        let file = ScratchFile(in: "/dev/shm")
        let bytes = pattern(byteCount: 16 * 4096, seed: 0x5a)
        try file.create(size: 16 * 4096, contents: bytes)
        let image = try SourceImage(path: file.path)
        #expect(image.path == file.path)
        #expect(image.size == 16 * 4096)
        #expect(image.pageSize == .small)
        #expect(image.smallPageCount == 16)
        image.withPages(first: 0, count: 16) { #expect(Array($0) == bytes) }
        image.withPages(first: 3, count: 2) { #expect(Array($0) == Array(bytes[3 * 4096..<5 * 4096])) }
        image.withPages(first: 15, count: 1) { #expect(Array($0) == Array(bytes.suffix(4096))) }
        image.withPages(first: 16, count: 0) { #expect($0.isEmpty) }
    }

    /// The mapping is shared: a write to the file after mapping shows.
    @Test func seesLaterWrites() throws {
        let file = ScratchFile(in: "/dev/shm")
        try file.create(size: 8192)
        let image = try SourceImage(path: file.path)
        image.withPages(first: 1, count: 1) { #expect($0.allSatisfy { $0 == 0 }) }
        let fd = open(file.path, O_WRONLY | O_CLOEXEC)
        #expect(fd >= 0)
        var word: UInt64 = 0x1122_3344_5566_7788
        #expect(pwrite(fd, &word, 8, 4096) == 8)
        close(fd)
        image.withPages(first: 1, count: 1) { #expect($0.load(as: UInt64.self) == word) }
    }

    /// Holes are told from data by the file's extents, page by page in
    /// ascending order, without a page being read: the file's allocated
    /// blocks do not grow.
    @Test func holesAreFoundWithoutBeingRead() throws {
        let file = ScratchFile(in: "/dev/shm")
        try file.create(size: 64 * 4096)
        let fd = open(file.path, O_WRONLY | O_CLOEXEC)
        try #require(fd >= 0)
        let data: Set<UInt64> = [3, 4, 5, 40, 63]
        var page = [UInt8](repeating: 0xa5, count: 4096)
        for index in data { #expect(pwrite(fd, &page, 4096, off_t(index * 4096)) == 4096) }
        // Written, and punched again: a hole once more.
        #expect(pwrite(fd, &page, 4096, off_t(20 * 4096)) == 4096)
        // FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, which glibc hides.
        #expect(cpc_fallocate(fd, 0x02 | 0x01, 20 * 4096, 4096) == 0)
        close(fd)
        func allocatedBlocks() -> Int {
            var status = stat()
            return stat(file.path, &status) == 0 ? Int(status.st_blocks) : -1
        }
        let before = allocatedBlocks()
        let image = try SourceImage(path: file.path)
        var holes = image.holes()
        let found = (0..<UInt64(64)).filter { !holes.contains($0) }
        #expect(Set(found) == data)
        #expect(allocatedBlocks() == before, "asking about holes made pages exist")
        // A cursor asked about an earlier page finds it again.
        #expect(!holes.contains(4) && holes.contains(0) && !holes.contains(63))
    }

    @Test func missingFile() {
        let path = "/dev/shm/postcopyd-test-missing-\(getpid())"
        let text = errorText { _ = try SourceImage(path: path) }
        #expect(text == "open source RAM \(path): ENOENT (No such file or directory)")
    }

    @Test func emptyFile() throws {
        let file = ScratchFile(in: "/dev/shm")
        try file.create(size: 0)
        let text = errorText { _ = try SourceImage(path: file.path) }
        #expect(text.contains(file.path) && text.contains("size is 0 bytes"), "\(text)")
    }

    @Test func sizeNotAMultipleOfThePageSize() throws {
        let file = ScratchFile(in: "/dev/shm")
        try file.create(size: 4096 + 100, contents: [1, 2, 3])
        let text = errorText { _ = try SourceImage(path: file.path) }
        #expect(text.contains(file.path) && text.contains("size 4196 bytes is not a multiple of the 4 KiB page size"),
                "\(text)")
    }

    @Test func directoryIsNotARegularFile() {
        let text = errorText { _ = try SourceImage(path: "/dev/shm") }
        #expect(text.contains("/dev/shm: not a regular file"), "\(text)")
    }

    @Test(.enabled(if: Host.hasHugepages(2) && Host.hugetlbfsMount != nil,
                   Comment(rawValue: Host.needsHugepages(2) + " and a 2 MiB hugetlbfs mount (such as /dev/hugepages)")))
    func hugetlbfsFileMapsWithHugePages() throws {
        let file = ScratchFile(in: try #require(Host.hugetlbfsMount))
        let size = 4 << 20
        // hugetlbfs has no write(2): fill the file through a shared mapping.
        let fd = try checkLibc("create \(file.path)") { open(file.path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        defer { close(fd) }
        try checkLibc("ftruncate \(file.path)") { ftruncate(fd, off_t(size)) }
        let bytes = pattern(byteCount: size, seed: 0xc3)
        let writable = try #require(mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0))
        try #require(writable != MAP_FAILED)
        // SAFETY: writable..writable+size is the mapping just made.
        bytes.withUnsafeBytes { writable.copyMemory(from: $0.baseAddress!, byteCount: size) }
        munmap(writable, size)

        let image = try SourceImage(path: file.path)
        #expect(image.pageSize == .huge2M)
        #expect(image.size == UInt64(size))
        #expect(image.smallPageCount == 1024)
        image.withPages(first: 0, count: 1024) { #expect(Array($0) == bytes) }
        image.withPages(first: 511, count: 2) { #expect(Array($0) == Array(bytes[511 * 4096..<513 * 4096])) }
    }
}

@Suite struct ProcessPauseTests {
    static func state(of pid: pid_t) -> TaskState? {
        readTextFile("/proc/\(pid)/stat").flatMap { TaskState(statLine: $0) }
    }

    static func taskStates(of pid: pid_t) -> [TaskState?] {
        guard let stream = opendir("/proc/\(pid)/task") else { return [] }
        defer { closedir(stream) }
        var states: [TaskState?] = []
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let tid = Int32(name) else { continue }
            states.append(readTextFile("/proc/\(pid)/task/\(tid)/stat").flatMap { TaskState(statLine: $0) })
        }
        return states
    }

    /// Waits up to a second for `condition`.
    static func eventually(_ condition: () -> Bool) -> Bool {
        let deadline = monotonicNanoseconds() + 1_000_000_000
        while monotonicNanoseconds() < deadline {
            if condition() { return true }
            usleep(1000)
        }
        return condition()
    }

    @Test func stopsAndResumesABusyChild() throws {
        let pid = try ProcessPause.spawnShell("while :; do :; done")
        defer {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
        #expect(Self.eventually { Self.state(of: pid) == .running }, "the busy child runs")

        try ProcessPause.stop(pid: pid, timeoutNanoseconds: 1_000_000_000)
        let states = Self.taskStates(of: pid)
        #expect(!states.isEmpty)
        #expect(states.allSatisfy { $0?.isHalted == true }, "\(states)")
        #expect(Self.state(of: pid) == .stopped)

        try ProcessPause.resume(pid: pid)
        #expect(Self.eventually { Self.state(of: pid) != .stopped }, "the child leaves T once resumed")
        #expect(Self.eventually { Self.state(of: pid) == .running })
    }

    @Test func stoppingAMissingProcessNamesESRCH() {
        let text = errorText { try ProcessPause.stop(pid: Int32.max, timeoutNanoseconds: 1_000_000) }
        #expect(text == "send SIGSTOP to pid 2147483647: ESRCH (No such process)")
        #expect(errorText { try ProcessPause.resume(pid: Int32.max) }.contains("ESRCH"))
    }

    @Test func refusesPidsThatNameGroups() {
        #expect(errorText { try ProcessPause.stop(pid: 0, timeoutNanoseconds: 1) }.contains("not a single process"))
        #expect(errorText { try ProcessPause.resume(pid: -1) }.contains("not a single process"))
    }

    @Test func notStoppedErrorNamesTheRunningTasks() {
        let error = ProcessPauseError.notStopped(pid: 77, running: 2, tasks: 5, timeoutNanoseconds: 50_000_000)
        #expect(error.description == "stop pid 77: 2 of 5 tasks still running after 50 ms (SIGSTOP sent)")
    }

    @Test func runSucceeds() throws {
        try ProcessPause.run(command: "true", timeoutNanoseconds: 5_000_000_000)
        try ProcessPause.run(command: "test \"$(echo a b)\" = 'a b'", timeoutNanoseconds: 5_000_000_000)
    }

    @Test func runReportsTheExitStatus() {
        #expect(throws: ProcessPauseError.exited(command: "exit 3", status: 3)) {
            try ProcessPause.run(command: "exit 3", timeoutNanoseconds: 5_000_000_000)
        }
        #expect(ProcessPauseError.exited(command: "exit 3", status: 3).description
            == "command 'exit 3' failed with exit status 3")
    }

    @Test func runReportsASignal() {
        let text = errorText { try ProcessPause.run(command: "kill -TERM $$", timeoutNanoseconds: 5_000_000_000) }
        #expect(text == "command 'kill -TERM $$' was killed by signal 15 (Terminated)")
    }

    @Test func runKillsACommandThatTakesTooLong() {
        let start = monotonicNanoseconds()
        #expect(throws: ProcessPauseError.timedOut(command: "sleep 5", timeoutNanoseconds: 100_000_000)) {
            try ProcessPause.run(command: "sleep 5", timeoutNanoseconds: 100_000_000)
        }
        let elapsed = monotonicNanoseconds() - start
        #expect(elapsed >= 100_000_000 && elapsed < 1_000_000_000, "took \(elapsed / 1_000_000) ms")
        #expect(ProcessPauseError.timedOut(command: "sleep 5", timeoutNanoseconds: 100_000_000).description
            == "command 'sleep 5' timed out after 100 ms and was killed")
    }

    /// A background job of the shell is in its process group, and dies with it.
    @Test func timeoutKillsTheWholeCommand() throws {
        let file = ScratchFile(in: "/dev/shm")
        let start = monotonicNanoseconds()
        #expect(throws: ProcessPauseError.self) {
            try ProcessPause.run(command: "sleep 7 & echo $! > \(file.path); wait", timeoutNanoseconds: 300_000_000)
        }
        #expect(monotonicNanoseconds() - start < 1_000_000_000)
        let text = try #require(readTextFile(file.path))
        let job = try #require(Int32(text.filter { $0.isNumber }))
        #expect(Self.eventually {
            let state = Self.state(of: job)
            return state == nil || state == .zombie || state == .dead
        }, "the background sleep was killed")
    }
}
