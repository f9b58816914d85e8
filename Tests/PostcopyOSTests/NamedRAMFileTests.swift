import Glibc
import PostcopyCore
import PostcopyOS
import Testing

/// `postcopyd serve --ram-file`: guest RAM as a named file a VMM opens by
/// name. Needs only a tmpfs (/dev/shm), no root.
@Suite struct NamedRAMFileTests {
    static func path(_ name: String) -> String { "/dev/shm/postcopy-test-\(name)-\(getpid())" }

    @Test func theFileIsThereWhileHeldAndGoneAfter() throws {
        let path = Self.path("named")
        defer { unlink(path) }
        do {
            let memory = try GuestMemory(backing: .namedFile(path: path, kind: .shmem), size: 8 << 20)
            var status = stat()
            #expect(stat(path, &status) == 0)
            #expect(status.st_size == 8 << 20)
            #expect(status.st_mode & 0o777 == 0o600)
            #expect(FileIdentity(path: path) == memory.file.identity)
            #expect(memory.file.backing.description == "file \(path) (shmem, 4 KiB pages)")
            // What the daemon writes through its alias is what a VMM opening
            // the name sees.
            _ = memory.withAliasPage(PageIndex(3)) { $0.storeBytes(of: 0xC0FFEE, as: UInt64.self) }
            let fd = open(path, O_RDONLY)
            defer { close(fd) }
            var word: UInt64 = 0
            #expect(pread(fd, &word, 8, 3 * 4096) == 8)
            #expect(word == 0xC0FFEE)
        }
        #expect(access(path, F_OK) != 0, "the RAM file outlived its owner")
    }

    /// The name is removed only while it still points at this file: one
    /// put there since (another daemon's, say) is not touched.
    @Test func aReplacedNameIsLeftAlone() throws {
        let path = Self.path("replaced")
        let moved = path + ".moved"
        defer { unlink(path); unlink(moved) }
        let memory = try GuestMemory(backing: .namedFile(path: path, kind: .shmem), size: 4 << 20)
        withExtendedLifetime(memory) {
            #expect(rename(path, moved) == 0)
            let other = open(path, O_CREAT | O_EXCL | O_WRONLY, 0o600)
            #expect(other >= 0)
            close(other)
        }
        _ = consume memory
        #expect(access(path, F_OK) == 0, "another file under the name was removed")
    }

    @Test func anExistingFileIsRefusedAndKept() throws {
        let path = Self.path("existing")
        defer { unlink(path) }
        let fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0o600)
        #expect(write(fd, "keep", 4) == 4)
        close(fd)
        #expect(throws: SystemCallError.self) {
            try GuestMemory(backing: .namedFile(path: path, kind: .shmem), size: 4 << 20)
        }
        var status = stat()
        #expect(stat(path, &status) == 0 && status.st_size == 4, "the existing file was changed")
    }

    @Test func hugetlbfsKindNeedsAHugetlbfsFile() throws {
        let path = Self.path("not-huge")
        #expect(throws: SystemCallError.self) {
            try GuestMemory(backing: .namedFile(path: path, kind: .hugetlbfs), size: 4 << 20)
        }
        #expect(access(path, F_OK) != 0, "the refused file was left behind")
    }
}
