import PostcopyCore
import PostcopyOS
import Testing

/// `GuestMemory.write`, the one way page bytes enter guest RAM. A memfd
/// needs no privilege, so this runs without root.
@Suite struct GuestMemoryWriteTests {
    /// Bytes land at the run's pages, zeroes clear them, and nothing
    /// outside the run changes.
    @Test func writesExactlyTheRun() throws {
        let memory = try GuestMemory(backing: .memfd, size: 64 * 4096)
        let run = PageRun(first: 5, count: 3)
        let bytes = (0..<(3 * 4096)).map { UInt8(truncatingIfNeeded: $0 / 4096 + 1) }
        bytes.withUnsafeBytes { memory.write($0, to: run) }
        func page(_ index: UInt64) -> [UInt8] {
            memory.withAliasPage(PageIndex(index)) { Array($0) } ?? []
        }
        #expect(page(4).allSatisfy { $0 == 0 })
        #expect(page(5).allSatisfy { $0 == 1 } && page(6).allSatisfy { $0 == 2 } && page(7).allSatisfy { $0 == 3 })
        #expect(page(8).allSatisfy { $0 == 0 })
        memory.write(nil, to: PageRun(first: 6, count: 1))
        #expect(page(5).allSatisfy { $0 == 1 } && page(6).allSatisfy { $0 == 0 } && page(7).allSatisfy { $0 == 3 })
    }

    /// The region's last page is inside; one past it is a broken invariant
    /// that stops the process rather than writing past the alias.
    @Test func aRunPastTheRegionTraps() async throws {
        await #expect(processExitsWith: .failure) {
            let memory = try GuestMemory(backing: .memfd, size: 64 * 4096)
            memory.write(nil, to: PageRun(first: 63, count: 1))
            memory.write(nil, to: PageRun(first: 63, count: 2))
        }
    }
}
