/// What happened during one postcopy phase, event by event, for benchmarks
/// and post-mortems: when stale pages arrived (fill progress) and when guest
/// threads were released from stale faults (with how long they waited).
///
/// The daemon records it only when asked (`postcopyd serve --trace FILE`);
/// recording is an append to a preallocated array behind a lock the caller
/// holds, so it costs nothing measurable next to writing 4 KiB pages.
public struct PostcopyTrace: Sendable, Equatable {
    public enum Kind: String, Sendable {
        /// Stale pages written into guest RAM from a PAGES/ZERO_PAGES frame
        /// that answered a PAGE_REQUEST.
        case urgentFill = "fill-urgent"
        /// The same, from the background stream.
        case backgroundFill = "fill-background"
        /// A guest thread's fault on a stale page was resolved.
        case staleFault = "stale-fault"
    }

    public struct Event: Sendable, Equatable {
        public let kind: Kind
        /// Nanoseconds since the guest resumed.
        public let atNanos: UInt64
        /// The first 4 KiB page of the fill, or the faulting page.
        public let page: UInt64
        /// Pages written (fills); 1 for faults.
        public let pages: UInt64
        /// How long the guest thread waited (faults); 0 for fills.
        public let waitedNanos: UInt64

        public init(kind: Kind, atNanos: UInt64, page: UInt64, pages: UInt64, waitedNanos: UInt64 = 0) {
            self.kind = kind
            self.atNanos = atNanos
            self.page = page
            self.pages = pages
            self.waitedNanos = waitedNanos
        }
    }

    /// Stale 4 KiB pages at switchover.
    public let stalePages: UInt64
    public private(set) var events: [Event] = []

    public init(stalePages: UInt64, reserving capacity: Int = 0) {
        self.stalePages = stalePages
        events.reserveCapacity(capacity)
    }

    public mutating func record(_ event: Event) { events.append(event) }

    /// The header line of `csv`.
    public static let csvHeader = "kind,t_us,page,pages,waited_us"

    /// One comment line naming the stale-page count, the header, then one
    /// line per event in time order.
    public var csv: String {
        var text = "# postcopyd trace: \(stalePages) stale pages at switchover; t_us since the guest resumed\n"
        text += Self.csvHeader + "\n"
        for event in events.sorted(by: { $0.atNanos < $1.atNanos }) {
            text += "\(event.kind.rawValue),\(fixed(Double(event.atNanos) / 1000, 1)),\(event.page),\(event.pages),"
            text += event.kind == .staleFault ? fixed(Double(event.waitedNanos) / 1000, 1) : "0"
            text += "\n"
        }
        return text
    }

    /// Parses what `csv` wrote; nil (with no partial result) on any line it
    /// cannot read.
    public init?(csv: String) {
        var stale: UInt64?
        var events: [Event] = []
        for line in csv.split(separator: "\n", omittingEmptySubsequences: true) {
            if line.hasPrefix("#") {
                let words = line.split(separator: " ")
                if let index = words.firstIndex(of: "stale"), index > 0 {
                    stale = UInt64(words[index - 1])
                }
                continue
            }
            if line == Self.csvHeader { continue }
            let fields = line.split(separator: ",", omittingEmptySubsequences: false)
            guard fields.count == 5, let kind = Kind(rawValue: String(fields[0])),
                  let at = Double(fields[1]), let page = UInt64(fields[2]), let pages = UInt64(fields[3]),
                  let waited = Double(fields[4]), at >= 0, waited >= 0 else { return nil }
            events.append(Event(kind: kind, atNanos: UInt64((at * 1000).rounded()), page: page, pages: pages,
                                waitedNanos: UInt64((waited * 1000).rounded())))
        }
        guard let stale else { return nil }
        self.stalePages = stale
        self.events = events
    }
}
