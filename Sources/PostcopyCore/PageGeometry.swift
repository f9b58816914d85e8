/// The size of the pages backing a guest RAM region.
///
/// shmem (memfd, tmpfs) backs RAM with 4 KiB pages; hugetlbfs with 2 MiB pages.
/// The dirty bitmap is always kept at 4 KiB granularity, so a 2 MiB page is
/// made of 512 small pages.
public enum PageSize: UInt64, Sendable, CaseIterable, CustomStringConvertible {
    case small = 4096
    case huge2M = 2_097_152

    public var bytes: UInt64 { rawValue }

    /// 4 KiB pieces per page: 1 for small pages, 512 for 2 MiB pages.
    public var smallPagesPerPage: UInt64 { rawValue / PageSize.small.rawValue }

    public init?(bytes: UInt64) { self.init(rawValue: bytes) }

    public var description: String { self == .small ? "4 KiB" : "2 MiB" }
}

/// The index of a page within a region, counted in the region's own page size.
public struct PageIndex: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (a: PageIndex, b: PageIndex) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "page \(rawValue)" }
}

/// A byte offset from the start of a region (or of the file backing it).
///
/// Deliberately has no `+`: offsets are produced only by `PageGeometry`,
/// which checks them against the region's size.
public struct RegionOffset: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (a: RegionOffset, b: RegionOffset) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "offset 0x" + String(rawValue, radix: 16) }
}

/// Why a region's shape was refused.
public enum GeometryError: Error, Equatable, CustomStringConvertible {
    case emptyRegion
    case sizeNotPageAligned(size: UInt64, pageSize: PageSize)

    public var description: String {
        switch self {
        case .emptyRegion:
            return "region size is zero"
        case let .sizeNotPageAligned(size, pageSize):
            return "region size \(size) bytes is not a multiple of the \(pageSize) page size"
        }
    }
}

/// The shape of a guest RAM region: its size and page size, and the only
/// place where page indexes become byte offsets.
public struct PageGeometry: Hashable, Sendable, CustomStringConvertible {
    public let regionSize: UInt64
    public let pageSize: PageSize

    public init(regionSize: UInt64, pageSize: PageSize) throws(GeometryError) {
        guard regionSize > 0 else { throw .emptyRegion }
        guard regionSize % pageSize.bytes == 0 else {
            throw .sizeNotPageAligned(size: regionSize, pageSize: pageSize)
        }
        self.regionSize = regionSize
        self.pageSize = pageSize
    }

    /// Pages in the region, in the region's page size.
    public var pageCount: UInt64 { regionSize / pageSize.bytes }

    /// 4 KiB pieces in the region: the length of a dirty bitmap for it.
    public var smallPageCount: UInt64 { regionSize / PageSize.small.bytes }

    public func contains(_ page: PageIndex) -> Bool { page.rawValue < pageCount }

    /// The offset of the first byte of `page`, or nil when it lies outside.
    public func offset(of page: PageIndex) -> RegionOffset? {
        guard contains(page) else { return nil }
        return RegionOffset(page.rawValue * pageSize.bytes)
    }

    /// The page holding byte `offset`, or nil when it lies outside.
    public func page(containing offset: RegionOffset) -> PageIndex? {
        guard offset.rawValue < regionSize else { return nil }
        return PageIndex(offset.rawValue / pageSize.bytes)
    }

    /// The page holding the host address `address` of a mapping of this region
    /// that starts at `base`, or nil when the address lies outside it.
    public func page(atAddress address: UInt64, mappingBase base: UInt64) -> PageIndex? {
        guard address >= base else { return nil }
        return page(containing: RegionOffset(address - base))
    }

    /// The range of 4 KiB pieces that make up `page` (one piece for small pages).
    public func smallPages(of page: PageIndex) -> Range<UInt64> {
        let first = page.rawValue * pageSize.smallPagesPerPage
        return first..<(first + pageSize.smallPagesPerPage)
    }

    public var description: String {
        "\(regionSize) bytes in \(pageCount) pages of \(pageSize)"
    }
}
