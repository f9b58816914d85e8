/// One page fault read from a userfaultfd, decoded and located in its region.
public struct PageFault: Equatable, Sendable {
    /// Why the kernel stopped the faulting thread.
    public enum Kind: Equatable, Sendable {
        /// The page is in the page cache but not mapped here: resolve with CONTINUE.
        case minor
        /// The page is not in the page cache at all (a hole): make it exist
        /// first, then CONTINUE.
        case missing
    }

    public let page: PageIndex
    /// The faulting address as the kernel reported it.
    public let address: UInt64
    public let kind: Kind
    public let isWrite: Bool
    /// The faulting thread's id, when THREAD_ID was negotiated; else 0.
    public let threadID: UInt32

    public init(page: PageIndex, address: UInt64, kind: Kind, isWrite: Bool, threadID: UInt32) {
        self.page = page
        self.address = address
        self.kind = kind
        self.isWrite = isWrite
        self.threadID = threadID
    }
}

/// What a resolver tells the fault loop to do with a fault.
public enum FaultDecision: Equatable, Sendable {
    /// The page's bytes are right: install it now (CONTINUE; a hole is made
    /// to exist first, reading as zeros).
    case install
    /// The resolver has taken the fault over and will install the page
    /// itself once its bytes are right (e.g. after fetching them).
    case deferred
}
