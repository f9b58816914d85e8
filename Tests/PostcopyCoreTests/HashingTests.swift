import PostcopyCore
import Testing

/// Helpers shared by the hashing tests.
enum Hashing {
    /// `bytes` as lowercase hex digits.
    static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef")
        return String(bytes.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 0xF)]] })
    }

    /// `count` bytes following a fixed pattern: byte `i` is `7 * i + 3` mod 256.
    static func pattern(_ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
    }

    /// A page of pseudo-random bytes.
    static func randomPage(seed: UInt64) -> [UInt8] {
        var generator = SplitMix64(seed: seed)
        return (0..<512).flatMap { _ in
            withUnsafeBytes(of: generator.next().littleEndian) { Array($0) }
        }
    }

    /// `PageHash.of` for bytes in an array.
    static func pageHash(_ bytes: [UInt8]) -> (hash: UInt64, isZero: Bool) {
        bytes.withUnsafeBytes { PageHash.of($0) }
    }

    /// `page` with bit `bit` (counting from bit 0 of byte 0) inverted.
    static func flipping(_ page: [UInt8], bit: Int) -> [UInt8] {
        var copy = page
        copy[bit / 8] ^= 1 << UInt8(bit % 8)
        return copy
    }

    /// `page` with 8-byte words `first` and `second` exchanged.
    static func swapping(_ page: [UInt8], words first: Int, _ second: Int) -> [UInt8] {
        var copy = page
        for offset in 0..<8 { copy.swapAt(first * 8 + offset, second * 8 + offset) }
        return copy
    }
}

@Suite struct SHA256Tests {
    @Test func fipsVectors() {
        #expect(Hashing.hex(SHA256.hash([]))
            == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(Hashing.hex(SHA256.hash(Array("abc".utf8)))
            == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(Hashing.hex(SHA256.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)))
            == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        let long = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"
        #expect(Hashing.hex(SHA256.hash(Array(long.utf8)))
            == "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1")
    }

    @Test func oneMillionAsInUnevenChunks() {
        let source = [UInt8](repeating: UInt8(ascii: "a"), count: 5000)
        let sizes = [1, 7, 63, 64, 65, 1000, 4093, 0, 127, 55, 56]
        var hasher = SHA256()
        var fed = 0, turn = 0
        while fed < 1_000_000 {
            let size = min(sizes[turn % sizes.count], 1_000_000 - fed)
            source.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<size])) }
            fed += size
            turn += 1
        }
        #expect(Hashing.hex(hasher.finalize())
            == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    /// Digests of `Hashing.pattern(n)` at lengths around the padding and block
    /// boundaries, from an independent implementation.
    static let patternDigests: [(Int, String)] = [
        (55, "e7313d333c272e639f790978283f9eb392e843d0f29b7016828bb1daa4aac70b"),
        (56, "4324d65f3c103567f5589c710bc08f8523f929a9272e3af36fc968e52abc6c27"),
        (63, "81c80242132f230c3bd41b3e63bbcff16107339549214a99614ff26664625055"),
        (64, "39e3d7b6b5d075d37d053ad89b24b41bef4f3c29760c84447cab3f3be1882241"),
        (65, "aacca6ff74fdbb296d165a45cecfa04e5127bc008770fbbdd48006f2d2fae95e"),
        (119, "9ce7368e4daf32341631b492e80359dc9f594b48453cd0dd5bf0b19279cc177e"),
        (120, "7836b787757e95e58b3ca5aec90b1b004e8deba1e50e9675af9cabf1a13a04b5"),
    ]

    @Test func paddingBoundaries() {
        for (length, digest) in Self.patternDigests {
            #expect(Hashing.hex(SHA256.hash(Hashing.pattern(length))) == digest, "length \(length)")
        }
    }

    @Test func chunkedEqualsOneShotAcrossBlockBoundaries() {
        for length in [55, 56, 63, 64, 65, 119, 120, 128, 200] {
            let bytes = Hashing.pattern(length)
            let whole = SHA256.hash(bytes)
            for split in 0...length {
                var hasher = SHA256()
                hasher.update(Array(bytes[..<split]))
                hasher.update(Array(bytes[split...]))
                #expect(hasher.finalize() == whole, "length \(length) split at \(split)")
            }
            var bytewise = SHA256()
            for byte in bytes { bytewise.update([byte]) }
            #expect(bytewise.finalize() == whole, "length \(length) byte by byte")
        }
    }

    @Test func emptyUpdatesChangeNothing() {
        var hasher = SHA256()
        hasher.update([])
        hasher.update(Array("abc".utf8))
        hasher.update(UnsafeRawBufferPointer(start: nil, count: 0))
        #expect(hasher.finalize() == SHA256.hash(Array("abc".utf8)))
    }
}

@Suite struct PageHashTests {
    static let zeros = [UInt8](repeating: 0, count: 4096)

    @Test func zeroPage() {
        let (hash, isZero) = Hashing.pageHash(Self.zeros)
        #expect(isZero)
        #expect(hash == PageHash.zeroPage)
        #expect(!Hashing.pageHash(Hashing.randomPage(seed: 1)).isZero)
    }

    @Test func lengthIsPartOfTheHash() {
        let lengths = [0, 32, 64, 4064, 4096, 8192]
        let hashes = lengths.map { Hashing.pageHash([UInt8](repeating: 0, count: $0)) }
        #expect(hashes.allSatisfy { $0.isZero })
        #expect(Set(hashes.map(\.hash)).count == lengths.count)
    }

    /// Pins the function: hashes are compared between hosts and builds.
    @Test func knownValues() {
        #expect(PageHash.zeroPage == 0x1957_13A3_2962_232F)
        #expect(Hashing.pageHash(Hashing.pattern(4096)).hash == 0x889F_AABD_469F_ED40)
    }

    @Test(arguments: [UInt64(0), 1, 2])
    func everySingleBitFlipChangesTheHash(seed: UInt64) {
        // Seed 0 flips bits of the zero page; the others, of random pages.
        let page = seed == 0 ? Self.zeros : Hashing.randomPage(seed: seed)
        let original = Hashing.pageHash(page).hash
        var seen: Set<UInt64> = [original]
        // Word w, bit w % 64: every word, and every bit position within a word.
        for word in 0..<512 {
            let flipped = Hashing.pageHash(Hashing.flipping(page, bit: word * 64 + word % 64))
            #expect(flipped.hash != original, "bit \(word * 64 + word % 64)")
            #expect(!flipped.isZero || seed != 0)
            seen.insert(flipped.hash)
        }
        #expect(seen.count == 513, "every flip gives a distinct hash")
    }

    @Test func everyBitOfOneStripe() {
        // All 256 bits of the first and last 32-byte stripes, one at a time.
        let original = PageHash.zeroPage
        var seen: Set<UInt64> = [original]
        for bit in Array(0..<256) + Array((4096 * 8 - 256)..<(4096 * 8)) {
            let flipped = Hashing.pageHash(Hashing.flipping(Self.zeros, bit: bit))
            #expect(!flipped.isZero)
            seen.insert(flipped.hash)
        }
        #expect(seen.count == 513)
    }

    @Test func swappingWordsChangesTheHash() {
        let page = Hashing.randomPage(seed: 7)
        let original = Hashing.pageHash(page).hash
        // Same stripe, other lane; same lane, next stripe; other lane and stripe; far apart.
        for (first, second) in [(0, 1), (1, 3), (0, 4), (2, 6), (1, 510), (0, 511), (3, 508)] {
            let swapped = Hashing.pageHash(Hashing.swapping(page, words: first, second))
            #expect(swapped.hash != original, "words \(first) and \(second)")
        }
        // Stripes exchanged whole: the lanes see the same words in another order.
        var stripes = page
        stripes.replaceSubrange(0..<32, with: page[32..<64])
        stripes.replaceSubrange(32..<64, with: page[0..<32])
        #expect(Hashing.pageHash(stripes).hash != original)
    }

    @Test func independentOfAlignment() {
        let page = Hashing.randomPage(seed: 3)
        let expected = Hashing.pageHash(page).hash
        for shift in 1..<8 {
            let padded = [UInt8](repeating: 0xAA, count: shift) + page
            let hash = padded.withUnsafeBytes { PageHash.of(UnsafeRawBufferPointer(rebasing: $0[shift...])).hash }
            #expect(hash == expected, "shifted by \(shift)")
        }
    }
}

@Suite struct ImageDigestTests {
    /// `hashes` as the bytes the image digest is defined over.
    static func serialized(_ hashes: [UInt64]) -> [UInt8] {
        hashes.flatMap { hash in (0..<8).map { UInt8(truncatingIfNeeded: hash >> (8 * $0)) } }
    }

    @Test(arguments: [0, 1, 2, 511, 512, 513, 1500])
    func isSHA256OfTheLittleEndianHashes(count: Int) {
        var generator = SplitMix64(seed: UInt64(count))
        let hashes = (0..<count).map { _ in generator.next() }
        let expected = ImageDigest(bytes: SHA256.hash(Self.serialized(hashes)))
        #expect(ImageDigest(pageHashes: hashes) == expected)
        #expect(hashes.withUnsafeBufferPointer { ImageDigest(pageHashes: $0) } == expected)
    }

    @Test func knownImage() {
        let digest = ImageDigest(pageHashes: [0x0102_0304_0506_0708])
        #expect(digest.bytes == SHA256.hash([8, 7, 6, 5, 4, 3, 2, 1]))
    }

    /// Pins the digest's bytes: source and destination may be built with
    /// different SHA-256 implementations, and must agree. The expected
    /// values are from Python's hashlib over the same bytes.
    @Test func pinnedBytes() {
        let digest = ImageDigest(pageHashes: [PageHash.zeroPage, 1, 0xFFFF_FFFF_FFFF_FFFF, 0x0123_4567_89AB_CDEF])
        #expect(Hashing.hex(digest.bytes) == "0b3444daec0371c9da081b29e6301710dce9e20158dc07f5200291cd99836ce3")
        // A 1 GiB guest's worth of pages, more than one chunk of the digest's scratch buffer.
        let pages = (0..<262_144).map { UInt64($0) &* 0x9E37_79B9_7F4A_7C15 }
        #expect(Hashing.hex(ImageDigest(pageHashes: pages).bytes)
            == "064e2a2c26b9acbd4d77c91fe887dc3dfa31b6fa6e87a5b6700621459d7f42e4")
    }

    @Test func dependsOnPageOrder() {
        let hashes: [UInt64] = [PageHash.zeroPage, 1, 2, 3, 0xFFFF_FFFF_FFFF_FFFF]
        let original = ImageDigest(pageHashes: hashes)
        for (first, second) in [(0, 1), (1, 2), (0, 4), (3, 4)] {
            var swapped = hashes
            swapped.swapAt(first, second)
            #expect(ImageDigest(pageHashes: swapped) != original, "pages \(first) and \(second)")
        }
    }
}
