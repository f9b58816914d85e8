extension ImageDigest {
    /// The digest of a guest image: SHA-256 over the per-page hashes (`PageHash.of` of each 4 KiB page, in page order), each as 8 little-endian bytes.
    public init(pageHashes: UnsafeBufferPointer<UInt64>) {
        var hasher = SHA256()
        let chunk = 512
        withUnsafeTemporaryAllocation(of: UInt64.self, capacity: chunk) { scratch in
            var start = 0
            while start < pageHashes.count {
                let end = min(start + chunk, pageHashes.count)
                for index in start..<end {
                    // SAFETY: index - start < end - start <= chunk, the scratch capacity.
                    scratch[index - start] = pageHashes[index].littleEndian
                }
                // SAFETY: the first end - start words of scratch were just written.
                hasher.update(UnsafeRawBufferPointer(UnsafeMutableBufferPointer(rebasing: scratch[0..<(end - start)])))
                start = end
            }
        }
        // SHA-256 always yields 32 bytes, the one count `init(bytes:)` accepts.
        self.init(bytes: hasher.finalize())!
    }

    /// The digest of a guest image from its per-page hashes, in page order; see `init(pageHashes:)` above.
    public init(pageHashes: [UInt64]) {
        self = pageHashes.withUnsafeBufferPointer { ImageDigest(pageHashes: $0) }
    }
}
