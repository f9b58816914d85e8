import PostcopyCore
import Testing

@Suite struct PacerTests {
    @Test func holdsTheRate() {
        // 1 MiB/s: 256 KiB sent at once is due 250 ms after the start.
        var pacer = Pacer(bytesPerSecond: 1 << 20, now: 1_000)
        #expect(pacer.sent(256 << 10, now: 1_000) == 250_000_000)
        // On schedule after waiting: the next 256 KiB is due 250 ms later.
        #expect(pacer.sent(256 << 10, now: 250_001_000) == 250_000_000)
    }

    @Test func aSlowLinkNeverWaits() {
        var pacer = Pacer(bytesPerSecond: 1 << 20, now: 0)
        #expect(pacer.sent(1 << 20, now: 2_000_000_000) == 0)
    }

    @Test func aStallIsNotFollowedByAFlood() {
        var pacer = Pacer(bytesPerSecond: 1 << 20, burstBytes: 1 << 20, now: 0)
        // Ten seconds idle, then: at most one burst (1 MiB) goes without waiting.
        #expect(pacer.sent(1 << 20, now: 10_000_000_000) == 0)
        #expect(pacer.sent(1 << 20, now: 10_000_000_000) > 900_000_000)
    }
}

@Suite struct PostcopyTraceTests {
    @Test func csvRoundTrips() throws {
        var trace = PostcopyTrace(stalePages: 3)
        trace.record(.init(kind: .staleFault, atNanos: 2_500, page: 7, pages: 1, waitedNanos: 1_200))
        trace.record(.init(kind: .urgentFill, atNanos: 2_000, page: 7, pages: 1))
        trace.record(.init(kind: .backgroundFill, atNanos: 9_000, page: 8, pages: 2))
        let text = trace.csv
        #expect(text.split(separator: "\n")[1] == "kind,t_us,page,pages,waited_us")
        #expect(text.split(separator: "\n")[2] == "fill-urgent,2.0,7,1,0", "events in time order")
        let parsed = try #require(PostcopyTrace(csv: text))
        #expect(parsed.stalePages == 3)
        #expect(parsed.events.map(\.kind) == [.urgentFill, .staleFault, .backgroundFill])
        #expect(parsed.events[1].waitedNanos == 1_200)
    }

    @Test(arguments: ["", "kind,t_us,page,pages,waited_us\n", "# postcopyd trace: 3 stale pages\nfill-urgent,1.0,x,1,0\n",
                      "# postcopyd trace: 3 stale pages\nflood,1.0,1,1,0\n"])
    func unreadableTracesAreRefused(_ text: String) {
        #expect(PostcopyTrace(csv: text) == nil)
    }
}

@Suite struct ProcessMemoryTests {
    @Test func readsStatus() throws {
        let status = """
            Name:\tpostcopyd
            VmHWM:\t  1050000 kB
            VmRSS:\t  1049600 kB
            RssAnon:\t    3000 kB
            RssFile:\t    9000 kB
            RssShmem:\t 1037600 kB
            """
        let memory = try #require(ProcessMemory(status: status))
        #expect(memory.peakResident == 1_050_000 * 1024)
        #expect(memory.shmem == 1_037_600 * 1024)
        #expect(memory.overhead == 12_000 * 1024)
        #expect(ProcessMemory(status: "Name:\tx\n") == nil)
    }
}
