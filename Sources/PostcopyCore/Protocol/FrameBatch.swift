/// PAGES and ZERO_PAGES frames gathered in one buffer, to go out in one
/// send. Each page is copied once, by the caller, from the source straight
/// into its place in a frame (`slot(for:)`); each PAGES frame's head is
/// written into the room left before its pages once the run ends. A guest
/// whose zero pages cut its data into runs of a few pages so costs one send
/// per buffer, not one (or, with TLS, one record) per run.
///
/// Pages are added in ascending order. A run of data pages becomes one
/// PAGES frame of at most `maxPagesPerFrame` pages; a run of zero pages one
/// ZERO_PAGES frame. Holds no socket: the caller sends `frames()` and then
/// `reset()`s.
public struct FrameBatch: ~Copyable {
    private let buffer: UnsafeMutableRawBufferPointer
    public let maxPagesPerFrame: Int
    /// Bytes of the buffer taken, the heads reserved for open runs included.
    private var used = 0
    /// The open PAGES run: where its head goes, its first page, its length.
    private var data: (head: Int, first: UInt64, count: Int)?
    /// The open ZERO_PAGES run, not yet in the buffer.
    private var zeros: (first: UInt64, count: UInt64)?
    private var head: [UInt8] = []
    /// What the frames closed since the last reset carry.
    public private(set) var pages: UInt64 = 0
    public private(set) var zeroPages: UInt64 = 0

    static let pagesHeadSize = FrameHeader.size + pagesFieldsSize
    static let zeroFrameSize = Message.zeroPages(firstPage: 0, count: 1).encoded().count

    /// A buffer of `capacity` bytes, at least one full frame's worth.
    public init(maxPagesPerFrame: Int, capacity: Int? = nil) {
        precondition(maxPagesPerFrame >= 1, "a frame holds at least one page")
        let least = maxPagesPerFrame * Message.pageBytes + Self.pagesHeadSize + Self.zeroFrameSize
        let capacity = max(capacity ?? least, least)
        buffer = .allocate(byteCount: capacity, alignment: Message.pageBytes)
        self.maxPagesPerFrame = maxPagesPerFrame
        head.reserveCapacity(Self.pagesHeadSize)
    }

    deinit { buffer.deallocate() }

    public var isEmpty: Bool { used == 0 && zeros == nil }

    /// Where `page`'s bytes go if it is added as data next (they may be
    /// written there before deciding, and are left unused if it is not);
    /// nil when the batch has no room for it: send, reset, ask again.
    public func slot(for page: UInt64) -> UnsafeMutableRawBufferPointer? {
        let offset = slotOffset(for: page)
        guard offset + Message.pageBytes <= buffer.count else { return nil }
        return UnsafeMutableRawBufferPointer(rebasing: buffer[offset..<(offset + Message.pageBytes)])
    }

    /// Adds `page` as data: its bytes are in `slot(for: page)`, which
    /// must have been given (not nil) since the last change to the batch.
    public mutating func addData(_ page: UInt64) {
        let offset = slotOffset(for: page)
        precondition(offset + Message.pageBytes <= buffer.count, "page \(page) added to a full batch")
        if !extendsData(page) {
            closeData()
            closeZeros()
            data = (head: used, first: page, count: 0)
            used += Self.pagesHeadSize
        }
        used += Message.pageBytes
        data?.count += 1
    }

    /// Adds `page` as a zero page; false when the batch has no room for a
    /// ZERO_PAGES frame: send, reset, add again.
    public mutating func addZero(_ page: UInt64) -> Bool {
        closeData()
        if let zeros, zeros.first + zeros.count == page, zeros.count < UInt64(UInt32.max) {
            self.zeros?.count += 1
            return true
        }
        guard used + (zeros == nil ? 0 : Self.zeroFrameSize) + Self.zeroFrameSize <= buffer.count else { return false }
        closeZeros()
        zeros = (first: page, count: 1)
        return true
    }

    /// Closes the open runs and lends the whole frames to `body`.
    public mutating func frames<T>(_ body: (UnsafeRawBufferPointer) throws -> T) rethrows -> T {
        closeData()
        closeZeros()
        return try body(UnsafeRawBufferPointer(rebasing: buffer[..<used]))
    }

    /// Empties the batch and its counts.
    public mutating func reset() {
        precondition(data == nil && zeros == nil, "reset with a run still open")
        used = 0
        pages = 0
        zeroPages = 0
    }

    private func extendsData(_ page: UInt64) -> Bool {
        guard let data else { return false }
        return data.first + UInt64(data.count) == page && data.count < maxPagesPerFrame
    }

    /// A new run needs room for its head, after the open zero run's frame.
    private func slotOffset(for page: UInt64) -> Int {
        if extendsData(page) { return used }
        return used + (zeros == nil ? 0 : Self.zeroFrameSize) + Self.pagesHeadSize
    }

    private mutating func closeData() {
        guard let run = data else { return }
        data = nil
        let pageBytes = UnsafeRawBufferPointer(rebasing: buffer[(run.head + Self.pagesHeadSize)..<used])
        head.removeAll(keepingCapacity: true)
        Message.encodePagesHead(requestID: Message.backgroundRequestID, firstPage: run.first, pageData: pageBytes,
                                into: &head)
        head.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: buffer[run.head..<(run.head + $0.count)]).copyMemory(from: $0) }
        pages += UInt64(run.count)
    }

    private mutating func closeZeros() {
        guard let run = zeros else { return }
        zeros = nil
        let frame = Message.zeroPages(firstPage: run.first, count: UInt32(run.count)).encoded()
        frame.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: buffer[used..<(used + $0.count)]).copyMemory(from: $0) }
        used += frame.count
        zeroPages += run.count
    }
}
