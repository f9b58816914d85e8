import PostcopyCore
import PostcopyOS
import Testing
@testable import PostcopyMigration

/// The final scan splits the pages among threads: whatever the split, it
/// must find the same stale pages and the same digest
/// as one thread does. Needs only /dev/shm, no root.
@Suite struct FinalScanTests {
    @Test(arguments: [2, 3, 7, 8])
    func everySplitFindsWhatOneThreadFinds(threads: Int) throws {
        // 4099 pages, every 11th zero: no thread count here divides it.
        let source = try SourceFile(size: 4099 * 4096, seed: 5) { $0 % 11 == 0 }
        // Nothing sent yet: every non-zero page is stale, and so are the
        // pages a dirty log names, one of them zero.
        let scanner = PageScanner(image: try SourceImage(path: source.path))
        var alsoDirty = PageBitmap(count: 4099)
        alsoDirty.insert(22)
        alsoDirty.insert(4098)

        let one = scanner.finalScan(alsoDirty: alsoDirty, threads: 1)
        let split = scanner.finalScan(alsoDirty: alsoDirty, threads: threads)
        let nonZero = (0..<UInt64(4099)).filter { $0 % 11 != 0 }
        #expect(one.stale.setIndices == (nonZero + [22]).sorted())
        #expect(split.stale.setIndices == one.stale.setIndices)
        #expect(split.digest == one.digest)
        #expect(scanner.changedPages(threads: threads).setIndices == nonZero)
    }
}
