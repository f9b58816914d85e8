import Glibc
import PostcopyCore
import PostcopyOS
import Testing

/// `GuestMemory.write` and `.writeThroughAlias`, the one way page bytes
/// enter guest RAM: with pwrite(2) into the file on shmem (precopy), through
/// the alias on hugetlbfs and in postcopy. A memfd needs no privilege, so
/// the shmem cases run without root.
@Suite struct GuestMemoryWriteTests {
    /// Bytes land at the run's pages, zeroes clear them, and nothing
    /// outside the run changes.
    @Test func writesExactlyTheRun() throws {
        let memory = try GuestMemory(backing: .memfd, size: 64 * 4096)
        let run = PageRun(first: 5, count: 3)
        let bytes = (0..<(3 * 4096)).map { UInt8(truncatingIfNeeded: $0 / 4096 + 1) }
        try bytes.withUnsafeBytes { try memory.write($0, to: run) }
        func page(_ index: UInt64) -> [UInt8] {
            memory.withAliasPage(PageIndex(index)) { Array($0) } ?? []
        }
        #expect(page(4).allSatisfy { $0 == 0 })
        #expect(page(5).allSatisfy { $0 == 1 } && page(6).allSatisfy { $0 == 2 } && page(7).allSatisfy { $0 == 3 })
        #expect(page(8).allSatisfy { $0 == 0 })
        try memory.write(nil, to: PageRun(first: 6, count: 1))
        #expect(page(5).allSatisfy { $0 == 1 } && page(6).allSatisfy { $0 == 0 } && page(7).allSatisfy { $0 == 3 })
    }

    /// What is written, however it went in, is what a second mapping of the
    /// file (the guest's view) reads, on either kind of memory; a page
    /// written over keeps only the new bytes.
    @Test(arguments: [MemoryKind.shmem, .hugetlbfs], [false, true])
    func aGuestViewReadsWhatWasWritten(kind: MemoryKind, throughAlias: Bool) throws {
        try #require(kind == .shmem || Host.hasHugepages(2), Comment(rawValue: Host.needsHugepages(2)))
        let memory = try GuestMemory(backing: kind == .shmem ? .memfd : .hugetlbMemfd, size: 4 << 20)
        let guest = try memory.mapGuestView()
        let run = PageRun(first: 510, count: 4)  // across the 2 MiB boundary
        for fill: UInt8 in [0x5a, 0xc3] {
            let bytes = (0..<(4 * 4096)).map { UInt8(truncatingIfNeeded: $0) ^ fill }
            if throughAlias {
                bytes.withUnsafeBytes { memory.writeThroughAlias($0, to: run) }
            } else {
                try bytes.withUnsafeBytes { try memory.write($0, to: run) }
            }
            let seen = guest.withUnsafeBytes { Array($0[(510 * 4096)..<(514 * 4096)]) }
            #expect(seen == bytes)
        }
        #expect(guest.withUnsafeBytes { $0[(509 * 4096)..<(510 * 4096)].allSatisfy { $0 == 0 } })
    }

    /// A shmem file with no room for the pages: the write throws, naming
    /// what it wrote and why, instead of a SIGBUS from a store through the
    /// alias. Root: it mounts a 1 MiB tmpfs.
    @Test(.enabled(if: Host.isRoot, "needs root to mount a small tmpfs (run 'make test' as root)"))
    func aWriteWithNoRoomThrows() throws {
        let directory = "/tmp/postcopy-write-enospc.\(getpid())"
        try #require(mkdir(directory, 0o700) == 0)
        defer { rmdir(directory) }
        try #require(mount("tmpfs", directory, "tmpfs", 0, "size=1m") == 0, "mount a 1 MiB tmpfs: errno \(errno)")
        defer { umount2(directory, Int32(MNT_DETACH)) }
        let memory = try GuestMemory(backing: .namedFile(path: "\(directory)/ram", kind: .shmem), size: 4 << 20)
        let bytes = [UInt8](repeating: 0xab, count: 512 * 4096)
        let error = #expect(throws: SystemCallError.self) {
            try bytes.withUnsafeBytes { try memory.write($0, to: PageRun(first: 0, count: 512)) }
        }
        #expect(error?.errno == Errno(ENOSPC))
        #expect(error?.description.contains("into guest RAM") == true)
    }

    /// The region's last page is inside; one past it is a broken invariant
    /// that stops the process rather than writing past the alias.
    @Test func aRunPastTheRegionTraps() async throws {
        await #expect(processExitsWith: .failure) {
            let memory = try GuestMemory(backing: .memfd, size: 64 * 4096)
            try memory.write(nil, to: PageRun(first: 63, count: 1))
            try memory.write(nil, to: PageRun(first: 63, count: 2))
        }
    }
}
