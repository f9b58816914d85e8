@testable import PostcopyCore
import Testing

/// `FrameBatch`: the frames it gathers decode, batch after batch, to exactly
/// the pages added — data with its bytes, zero pages as ZERO_PAGES — in
/// runs no longer than a frame may be.
@Suite struct FrameBatchTests {
    /// What a page holds: data (its fill byte), zero, or unchanged (its
    /// slot written, then not added).
    enum Page: Equatable { case data(UInt8), zero, unchanged }

    /// Adds `pages` (page number → what it is, ascending) as the scanner
    /// does, sending whenever the batch is full; returns every frame sent,
    /// decoded, and how many sends there were.
    static func run(_ pages: [(UInt64, Page)], maxPagesPerFrame: Int,
                    capacity: Int? = nil) throws -> (messages: [Message], sends: Int, counted: (UInt64, UInt64)) {
        var batch = FrameBatch(maxPagesPerFrame: maxPagesPerFrame, capacity: capacity)
        var decoder = FrameDecoder()
        var messages: [Message] = []
        var sends = 0
        var counted: (pages: UInt64, zeros: UInt64) = (0, 0)
        func send() throws {
            guard !batch.isEmpty else { return }
            batch.frames { decoder.append($0) }
            counted.pages += batch.pages
            counted.zeros += batch.zeroPages
            batch.reset()
            sends += 1
            while let message = try decoder.next() {
                // A PAGES message's data lives in the decoder's buffer until
                // the next call: keep a copy.
                if case let .pages(id, first, data) = message {
                    messages.append(.pages(requestID: id, firstPage: first, data: ArraySlice(Array(data))))
                } else {
                    messages.append(message)
                }
            }
        }
        for (page, kind) in pages {
            var slot = batch.slot(for: page)
            if slot == nil {
                try send()
                slot = batch.slot(for: page)
            }
            let place = try #require(slot)
            let fill: UInt8 = switch kind {
            case let .data(byte): byte
            case .zero: 0
            case .unchanged: 0xee
            }
            place.initializeMemory(as: UInt8.self, repeating: fill)
            switch kind {
            case .data: batch.addData(page)
            case .zero:
                if !batch.addZero(page) {
                    try send()
                    let added = batch.addZero(page)
                    #expect(added, "an empty batch refused zero page \(page)")
                }
            case .unchanged: continue
            }
        }
        try send()
        return (messages, sends, counted)
    }

    /// The pages the frames carry: data pages with their fill byte, zero
    /// pages; and the longest PAGES frame.
    static func decoded(_ messages: [Message]) -> (pages: [UInt64: Page], longest: Int) {
        var pages: [UInt64: Page] = [:]
        var longest = 0
        for message in messages {
            switch message {
            case let .pages(id, first, data):
                #expect(id == Message.backgroundRequestID)
                let count = data.count / Message.pageBytes
                longest = max(longest, count)
                for index in 0..<count {
                    let bytes = data.dropFirst(index * Message.pageBytes).prefix(Message.pageBytes)
                    let fill = bytes.first ?? 0
                    #expect(bytes.allSatisfy { $0 == fill }, "page \(first + UInt64(index)) is torn")
                    #expect(pages.updateValue(.data(fill), forKey: first + UInt64(index)) == nil)
                }
            case let .zeroPages(first, count):
                for page in first..<(first + UInt64(count)) {
                    #expect(pages.updateValue(.zero, forKey: page) == nil)
                }
            default:
                Issue.record("unexpected \(message.type)")
            }
        }
        return (pages, longest)
    }

    struct Case: CustomTestStringConvertible, Sendable {
        let name: String
        let pages: [(UInt64, Page)]
        let maxPagesPerFrame: Int
        let capacity: Int?
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "one long run split at the frame limit", pages: (0..<20).map { ($0, .data(UInt8($0 + 1))) },
             maxPagesPerFrame: 8, capacity: nil),
        Case(name: "every 8th page zero, many short runs in few sends",
             pages: (0..<200).map { ($0, $0 % 8 == 3 ? .zero : .data(UInt8($0 % 250 + 1))) },
             maxPagesPerFrame: 16, capacity: 64 * 4096),
        Case(name: "unchanged pages leave gaps and close runs",
             pages: (0..<60).map { ($0, $0 % 5 == 0 ? .unchanged : $0 % 7 == 0 ? .zero : .data(UInt8($0 + 1))) },
             maxPagesPerFrame: 4, capacity: nil),
        Case(name: "zeros only", pages: (10..<300).map { ($0, .zero) }, maxPagesPerFrame: 2, capacity: nil),
        Case(name: "alternating, a batch of one frame", pages: (0..<40).map { ($0 * 3, $0 % 2 == 0 ? .zero : .data(9)) },
             maxPagesPerFrame: 1, capacity: nil),
    ]

    @Test(arguments: cases)
    func framesCarryExactlyThePagesAdded(_ test: Case) throws {
        let (messages, sends, counted) = try Self.run(test.pages, maxPagesPerFrame: test.maxPagesPerFrame,
                                                      capacity: test.capacity)
        let (pages, longest) = Self.decoded(messages)
        let expected = Dictionary(uniqueKeysWithValues: test.pages.filter { $0.1 != .unchanged })
        #expect(pages == expected)
        #expect(longest <= test.maxPagesPerFrame)
        #expect(counted.0 == UInt64(expected.values.filter { $0 != .zero }.count))
        #expect(counted.1 == UInt64(expected.values.filter { $0 == .zero }.count))
        // Consecutive pages of one kind share a frame, up to the limit.
        let runs = test.pages.filter { $0.1 != .unchanged }.reduce(into: [(UInt64, Bool, Int)]()) { runs, page in
            let isZero = page.1 == .zero
            if let last = runs.last, last.0 + UInt64(last.2) == page.0, last.1 == isZero,
               isZero || last.2 < test.maxPagesPerFrame {
                runs[runs.count - 1].2 += 1
            } else {
                runs.append((page.0, isZero, 1))
            }
        }
        #expect(messages.count >= runs.count && messages.count <= runs.count + sends)
    }

    /// Short runs share one send: 200 pages in runs of 7, in a buffer of
    /// 64 pages, take a few sends, not one per run.
    @Test func shortRunsShareASend() throws {
        let pages: [(UInt64, Page)] = (0..<200).map { ($0, $0 % 8 == 3 ? .zero : .data(1)) }
        let (messages, sends, _) = try Self.run(pages, maxPagesPerFrame: 256, capacity: 64 * 4096)
        #expect(messages.count > 40)
        #expect(sends <= 4, "\(sends) sends")
    }
}
