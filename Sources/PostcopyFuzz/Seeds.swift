import PostcopyCore

/// The seed inputs of each target, built with the real encoders (see
/// `FuzzTarget.seeds()`). Each target's input format is documented on its
/// fuzzer.
typealias Seed = (name: String, bytes: [UInt8])

/// Values the seeds share.
enum SeedValues {
    static let migrationID = HandshakeFuzzer.migrationID
    static let otherMigrationID = MigrationID(high: 0xFEED_FACE_CAFE_BEEF, low: 1)
    static let digest = ImageDigest(bytes: (0..<32).map { UInt8(truncatingIfNeeded: $0 * 37 + 11) })!
    /// The secret HELLO seeds carry (the handshake fuzzer binds to it).
    static let secret = MigrationSecret(bytes: (0..<32).map { UInt8(truncatingIfNeeded: $0 * 13 + 5) })!
    static let otherSecret = MigrationSecret(bytes: Array(repeating: 0x5A, count: 32))!

    /// `pages` pages of bytes that differ from page to page.
    static func pageData(pages: Int, seed: UInt64) -> ArraySlice<UInt8> {
        var generator = SplitMix64(seed: seed)
        return (0..<(pages * Message.pageBytes / 8)).flatMap { _ in
            let word = generator.next()
            return (0..<8).map { UInt8(truncatingIfNeeded: word >> (8 * $0)) }
        }[...]
    }

    /// `value`'s bytes, least significant first.
    static func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.appendLittleEndian(value)
        return bytes
    }

    /// Frames for `messages`, one after another.
    static func frames<M: WireMessage>(_ messages: [M]) -> [UInt8] {
        var out: [UInt8] = []
        for message in messages { message.encode(into: &out) }
        return out
    }
}

// MARK: frames

extension FrameFuzzer {
    /// A frame of every message type, and streams that mix them.
    static func seeds() -> [Seed] {
        let regionPages = SeedValues.le(UInt64(1 << 20))
        func seed(_ name: String, options: UInt8 = 0, split: UInt8 = 7, _ stream: [UInt8]) -> Seed {
            (name, [options, split] + regionPages + stream)
        }
        var seeds = MessageType.allCases.map { type in
            let name = type.description.lowercased().replacingUnderscores
            return switch type.socket {
            case .vmm: seed(name, options: vmmSocket, SeedValues.frames([sample(ofVMM: type)]))
            case .agent, .either: seed(name, SeedValues.frames([sample(of: type)]))
            }
        }
        let bulk = SeedValues.frames(agentBulkStream)
        seeds += [
            seed("hello-resume", SeedValues.frames([
                Message.hello(migrationID: SeedValues.migrationID, role: .urgent, sourcePageSize: .huge2M,
                              regionSize: 4 << 30, secret: SeedValues.secret, resume: true),
            ])),
            seed("hello-bulk-stream", SeedValues.frames([
                Message.hello(migrationID: SeedValues.migrationID, role: .bulk, sourcePageSize: .small,
                              regionSize: 4 << 30, secret: SeedValues.secret, bulkStreams: 3, streamIndex: 2),
            ])),
            seed("agent-bulk-stream", split: 3, bulk),
            seed("agent-bulk-stream-cut", split: 200, Array(bulk.dropLast(5))),
            seed("vmm-stream", options: vmmSocket, split: 1, SeedValues.frames(vmmStream)),
            seed("checksum-repaired", options: repairChecksums,
                 Array(SeedValues.frames([sample(of: .roundEnd)]).enumerated().map { $0 >= 12 && $0 < 16 ? 0 : $1 })),
        ]
        return seeds
    }

    /// An agent connection's message of `type` with every field filled.
    static func sample(of type: MessageType) -> Message {
        switch type {
        case .hello:
            return .hello(migrationID: SeedValues.migrationID, role: .bulk, sourcePageSize: .small, regionSize: 1 << 30,
                          secret: SeedValues.secret)
        case .welcome: return .welcome(regionSize: 1 << 30, destinationPageSize: .huge2M)
        case .pages: return .pages(requestID: 7, firstPage: 5, data: SeedValues.pageData(pages: 1, seed: 1))
        case .zeroPages: return .zeroPages(firstPage: 100, count: 28)
        case .roundEnd: return .roundEnd(round: 2, pagesSent: 4096, dirtyPages: 77)
        case .dirtyBitmap: return .dirtyBitmap(totalBits: 1 << 20, firstWord: 3, words: [0x8001, 0, .max])
        case .switchover: return .switchover(stalePages: 1234, sourcePausedAtNanos: 1_700_000_000_000_000_000, handOver: true)
        case .resumed: return .resumed(destinationResumedAtNanos: 1_700_000_000_050_000_000)
        case .pageRequest: return .pageRequest(requestID: 9, firstPage: 512, count: 512)
        case .complete: return .complete(pagesReceived: 262_144, faultsClean: 1000, faultsStale: 12)
        case .error: return .error(code: .outOfRange, message: "page range 5..<9 outside the region's 4 pages")
        case .heartbeat: return .heartbeat
        case .resync: return .resync(stalePages: 321)
        case .imageDigest: return .imageDigest(SeedValues.digest)
        case .handedOver: return .handedOver
        case .discard: return .discard(reason: "QMP: the source QEMU's migration failed")
        case .vmmOffer, .vmmAttach, .vmmResume, .vmmResumed, .vmmComplete, .vmmHandback, .vmmReattach:
            preconditionFailure("\(type) travels on the VMM socket: sample(ofVMM:)")
        }
    }

    /// A VMM socket's message of `type` (a VMM_* type) with every field filled.
    static func sample(ofVMM type: MessageType) -> VMMMessage {
        switch type {
        case .vmmOffer: return .offer(regionSize: 1 << 30, pageSize: .small, fileOffset: 0)
        case .vmmAttach:
            return .attach(guestBase: 0x7F00_0000_0000, features: UffdFeatures(rawValue: 0x2D8), registerMode: 5)
        case .vmmResume: return .resume
        case .vmmResumed: return .resumed
        case .vmmComplete: return .complete(imageDigest: SeedValues.digest)
        case .vmmHandback: return .handback(.pageState)
        case .vmmReattach:
            return .reattach(guestBase: 0x7F00_0000_0000, features: UffdFeatures(rawValue: 0x2D8), registerMode: 5)
        default:
            preconditionFailure("\(type) does not travel on the VMM socket alone: sample(of:)")
        }
    }

    /// What the bulk connection carries up to switchover, and the digest after it.
    static var agentBulkStream: [Message] {
        [
            sample(of: .hello), .pages(requestID: 0, firstPage: 0, data: SeedValues.pageData(pages: 1, seed: 2)),
            .zeroPages(firstPage: 1, count: 3), .roundEnd(round: 1, pagesSent: 4, dirtyPages: 4), .heartbeat,
            .dirtyBitmap(totalBits: 1 << 20, firstWord: 0, words: [0b1011]),
            .dirtyBitmap(totalBits: 1 << 20, firstWord: 1, words: [1 << 63]),
            .switchover(stalePages: 4, sourcePausedAtNanos: 1_700_000_000_000_000_000, handOver: true),
            .imageDigest(SeedValues.digest), .handedOver,
        ]
    }

    /// What a VMM and postcopyd say to each other, both ways.
    static var vmmStream: [VMMMessage] {
        [sample(ofVMM: .vmmOffer), sample(ofVMM: .vmmAttach), sample(ofVMM: .vmmResume), .resumed, .heartbeat,
         sample(ofVMM: .vmmHandback), .handback(.ram), sample(ofVMM: .vmmReattach), sample(ofVMM: .vmmComplete),
         .complete(imageDigest: nil), .error(code: .peerLost, message: "the VMM's device state failed to load")]
    }
}

extension String {
    fileprivate var replacingUnderscores: String { String(map { $0 == "_" ? "-" : $0 }) }
}

// MARK: handshake

/// The events of a `handshake` input, written the way the target reads them.
struct HandshakeScript {
    private(set) var bytes: [UInt8]

    init(pages: UInt64, huge: Bool = false, options: UInt8 = 0) {
        bytes = [HandshakeFuzzer.regionByte(pages: pages, huge: huge), options]
    }

    mutating func connect(_ slot: UInt8) { bytes.append(slot << 2) }
    mutating func close(_ slot: UInt8) { bytes.append(slot << 2 | 2) }
    mutating func complete() { bytes.append(3) }

    /// Sends `messages` as one chunk of frames on `slot`.
    mutating func send(_ messages: [Message], on slot: UInt8) {
        let frames = SeedValues.frames(messages)
        precondition(frames.count <= Int(UInt16.max), "a chunk of \(frames.count) bytes")
        bytes.append(slot << 2 | 1)
        bytes.appendLittleEndian(UInt16(frames.count))
        bytes += frames
    }
}

extension HandshakeFuzzer {
    /// Whole migrations, a rejoin, a takeover and refused connections.
    static func seeds() -> [Seed] {
        [
            ("migration", migration(rejoining: false).bytes),
            ("rejoin", migration(rejoining: true).bytes),
            ("takeover", takeover().bytes),
            ("huge-pages", hugePages().bytes),
            ("refused", refused().bytes),
            ("bulk-streams", bulkStreams().bytes),
        ]
    }

    private static func hello(_ role: StreamRole, regionSize: UInt64, resume: Bool = false,
                              id: MigrationID = SeedValues.migrationID,
                              secret: MigrationSecret = SeedValues.secret, streams: Int = 1, index: Int = 0) -> Message {
        .hello(migrationID: id, role: role, sourcePageSize: .small, regionSize: regionSize, secret: secret,
               resume: resume, bulkStreams: streams, streamIndex: index)
    }

    /// Two bulk streams over two 2 MiB pages, one chunk each: each stream's
    /// round, the bitmap once both ended it, the back-fill on each, a lost
    /// generation and a rejoin of all three connections.
    private static func bulkStreams() -> HandshakeScript {
        let size: UInt64 = 2 << 21
        var script = HandshakeScript(pages: 2, huge: true)
        for slot: UInt8 in 0...2 { script.connect(slot) }
        script.send([hello(.bulk, regionSize: size, streams: 2, index: 1)], on: 1)
        script.send([hello(.bulk, regionSize: size, streams: 2, index: 0)], on: 0)
        script.send([hello(.urgent, regionSize: size, streams: 2)], on: 2)
        script.send([.zeroPages(firstPage: 0, count: 4), .roundEnd(round: 1, pagesSent: 0, dirtyPages: 4)], on: 0)
        script.send([.pages(requestID: 0, firstPage: 600, data: SeedValues.pageData(pages: 1, seed: 6)),
                     .roundEnd(round: 1, pagesSent: 1, dirtyPages: 1)], on: 1)
        script.send([.dirtyBitmap(totalBits: 1024, firstWord: 0, words: [1] + Array(repeating: 0, count: 8) + [1 << 8]
                        + Array(repeating: 0, count: 6)),
                     .switchover(stalePages: 2, sourcePausedAtNanos: 3), .imageDigest(SeedValues.digest)], on: 0)
        script.send([.zeroPages(firstPage: 0, count: 1)], on: 0)
        for slot: UInt8 in 0...2 { script.close(slot) }
        for slot: UInt8 in 0...2 { script.connect(slot) }
        script.send([hello(.urgent, regionSize: size, resume: true, streams: 2)], on: 2)
        script.send([hello(.bulk, regionSize: size, resume: true, streams: 2, index: 1)], on: 1)
        script.send([hello(.bulk, regionSize: size, resume: true, streams: 2, index: 0)], on: 0)
        script.send([.zeroPages(firstPage: 584, count: 1)], on: 1)
        script.complete()
        return script
    }

    /// A region of 16 pages: precopy, a bitmap of pages 3, 4 and 9,
    /// switchover, the image digest, postcopy (optionally lost and rejoined,
    /// the digest sent again), complete.
    private static func migration(rejoining: Bool) -> HandshakeScript {
        let size: UInt64 = 16 << 12
        var script = HandshakeScript(pages: 16)
        script.connect(0)
        script.connect(1)
        script.send([hello(.bulk, regionSize: size)], on: 0)
        script.send([hello(.urgent, regionSize: size)], on: 1)
        script.send([.pages(requestID: 0, firstPage: 0, data: SeedValues.pageData(pages: 2, seed: 3)),
                     .zeroPages(firstPage: 2, count: 1), .roundEnd(round: 1, pagesSent: 3, dirtyPages: 3), .heartbeat,
                     .dirtyBitmap(totalBits: 16, firstWord: 0, words: [1 << 3 | 1 << 4 | 1 << 9]),
                     .switchover(stalePages: 3, sourcePausedAtNanos: 1), .imageDigest(SeedValues.digest)], on: 0)
        script.send([.pages(requestID: 1, firstPage: 3, data: SeedValues.pageData(pages: 1, seed: 4))], on: 1)
        if rejoining {
            script.close(0)
            script.close(1)
            script.connect(2)
            script.connect(3)
            script.send([hello(.urgent, regionSize: size, resume: true)], on: 3)
            script.send([hello(.bulk, regionSize: size, resume: true), .imageDigest(SeedValues.digest)], on: 2)
            script.send([.zeroPages(firstPage: 4, count: 1)], on: 3)
            script.send([.pages(requestID: 0, firstPage: 9, data: SeedValues.pageData(pages: 1, seed: 5))], on: 2)
        } else {
            script.send([.zeroPages(firstPage: 4, count: 1),
                         .pages(requestID: 0, firstPage: 9, data: SeedValues.pageData(pages: 1, seed: 5))], on: 0)
        }
        script.complete()
        return script
    }

    /// A restarted daemon: the agent rejoins with resuming HELLOs. Every
    /// page is in before the digest, which completes the migration.
    private static func takeover() -> HandshakeScript {
        let size: UInt64 = 8 << 12
        var script = HandshakeScript(pages: 8, options: takeOver)
        script.connect(0)
        script.connect(1)
        script.send([hello(.bulk, regionSize: size, resume: true), .zeroPages(firstPage: 0, count: 8)], on: 0)
        script.send([hello(.urgent, regionSize: size, resume: true)], on: 1)
        script.send([.zeroPages(firstPage: 0, count: 8)], on: 0)
        script.complete()
        script.send([.imageDigest(SeedValues.digest)], on: 0)
        return script
    }

    /// 2 MiB pages (1024 bitmap bits) and a bitmap in two frames.
    private static func hugePages() -> HandshakeScript {
        let size: UInt64 = 2 << 21
        var script = HandshakeScript(pages: 2, huge: true, options: configuredMigration | repairChecksums)
        script.connect(0)
        script.connect(1)
        script.send([hello(.bulk, regionSize: size)], on: 0)
        script.send([hello(.urgent, regionSize: size)], on: 1)
        script.send([.dirtyBitmap(totalBits: 1024, firstWord: 0, words: Array(repeating: 0, count: 8)),
                     .dirtyBitmap(totalBits: 1024, firstWord: 8, words: [0, 0, 0, 0, 0, 0, 0, 1 << 63]),
                     .switchover(stalePages: 1, sourcePausedAtNanos: 2), .imageDigest(SeedValues.digest)], on: 0)
        script.send([.zeroPages(firstPage: 1023, count: 1)], on: 1)
        script.complete()
        return script
    }

    /// Connections the session turns away: another migration, another
    /// secret, a region of the wrong size, a resume with nothing to resume,
    /// a second bulk connection, an agent that reports an error, and an
    /// image digest before switchover.
    private static func refused() -> HandshakeScript {
        let size: UInt64 = 4 << 12
        var script = HandshakeScript(pages: 4, options: configuredMigration)
        for (slot, message) in [hello(.bulk, regionSize: size, id: SeedValues.otherMigrationID),
                                hello(.bulk, regionSize: size, secret: SeedValues.otherSecret),
                                hello(.bulk, regionSize: size + 4096), hello(.bulk, regionSize: size, resume: true)]
            .enumerated() {
            script.connect(UInt8(slot))
            script.send([message], on: UInt8(slot))
        }
        script.connect(0)
        script.send([hello(.bulk, regionSize: size)], on: 0)
        script.connect(1)
        script.send([hello(.bulk, regionSize: size)], on: 1)
        script.connect(2)
        script.send([hello(.urgent, regionSize: size), .error(code: .internalFailure, message: "source read failed")],
                    on: 2)
        script.send([.imageDigest(SeedValues.digest)], on: 0)
        return script
    }
}

// MARK: bitmap

extension BitmapFuzzer {
    /// Each path: the wire, a dirty log, page-state records.
    static func seeds() -> [Seed] {
        [
            ("wire-1000-bits", wireSeed(count: 1000, wordsPerFrame: 4)),
            ("wire-64-bits", wireSeed(count: 64, wordsPerFrame: 1)),
            ("wire-empty", wireSeed(count: 0, wordsPerFrame: 1)),
            ("dirty-log", [1] + SeedValues.le(UInt64(200)) + PageBitmap(words: pattern(words: 4, count: 200),
                                                                       count: 200)!.littleEndianBytes),
            ("page-state-small", pageStateSeed(pages: 1000, huge: false, wholeFile: true)),
            ("page-state-huge-header", pageStateSeed(pages: 1024, huge: true, wholeFile: false)),
            ("page-state-repaired", pageStateSeed(pages: 70, huge: false, wholeFile: true, repaired: true)),
        ]
    }

    /// Words with bits set here and there, none past `count`.
    private static func pattern(words: Int, count: UInt64) -> [UInt64] {
        var generator = SplitMix64(seed: count)
        var result = (0..<words).map { _ in generator.next() & generator.next() }
        if count % 64 != 0, !result.isEmpty { result[words - 1] &= (1 << (count % 64)) - 1 }
        return result
    }

    /// A bitmap, then the same words offered again as frames in order.
    private static func wireSeed(count: UInt64, wordsPerFrame: Int) -> [UInt8] {
        let words = pattern(words: Int((count + 63) / 64), count: count)
        var bytes: [UInt8] = [0] + SeedValues.le(UInt16(count)) + [UInt8(wordsPerFrame - 1)]
        for word in words { bytes.appendLittleEndian(word) }
        for first in stride(from: 0, to: words.count, by: wordsPerFrame) {
            let frame = words[first..<min(first + wordsPerFrame, words.count)]
            bytes += SeedValues.le(UInt16(first)) + [UInt8(frame.count - 1)]
            for word in frame { bytes.appendLittleEndian(word) }
        }
        return bytes
    }

    /// A page-state record: the header alone, or the whole file with a
    /// bitmap; `repaired` zeroes the checksum and asks the target to redo it.
    private static func pageStateSeed(pages: UInt64, huge: Bool, wholeFile: Bool, repaired: Bool = false) -> [UInt8] {
        let pageSize: PageSize = huge ? .huge2M : .small
        let geometry = try! PageGeometry(regionSize: pages * 4096, pageSize: pageSize)
        let header = PageStateHeader(migrationID: SeedValues.migrationID, geometry: geometry,
                                     guestBase: 0x7F00_0000_0000, features: UffdFeatures(rawValue: 0x2D8),
                                     registerMode: 5, stalePagesAtSwitchover: 17,
                                     sourcePausedAtNanos: 1_700_000_000_000_000_000, downtimeMicros: 900,
                                     secretDigest: SeedValues.secret.digest)
        var file = header.encoded
        if repaired { file.replaceSubrange((file.count - 4)..., with: [0, 0, 0, 0]) }
        if wholeFile {
            file += repeatElement(0, count: PageStateLayout.bitmapOffset - file.count)
            for word in pattern(words: Int((pages + 63) / 64), count: pages) { file.appendLittleEndian(word) }
            file += repeatElement(0, count: Int(PageStateLayout.fileBytes(for: geometry)) - file.count)
        }
        return [2 | (repaired ? repairChecksum : 0)] + SeedValues.le(UInt16(pages / 3)) + SeedValues.le(UInt16(41))
            + file
    }
}

// MARK: config

extension ConfigFuzzer {
    /// A settings file like systemd/example.conf, and each small parser.
    static func seeds() -> [Seed] {
        func text(_ selector: UInt8, _ text: String) -> [UInt8] { [selector] + Array(text.utf8) }
        return [
            ("settings-file", text(0, settingsFile)),
            ("size-1G", text(1, "1G")),
            ("size-64MiB", text(1, " 64MiB ")),
            ("size-4096", text(1, "4096")),
            ("migration-id", text(2, SeedValues.migrationID.description.uppercased())),
            ("image-digest", text(2, SeedValues.digest.description)),
            ("control-status", text(3, "status\n")),
            ("control-cancel", text(3, "cancel\r\n")),
        ]
    }

    /// Every key of the daemon's schema once, comments, blank lines, CRLF, a quoted value.
    static let settingsFile = """
        # /etc/postcopyd/vm42.conf
        listen = 0.0.0.0:7070
        size = 1G\r
        memory = hugetlbfs
        hugetlbfs-dir = "/dev/hugepages"
        ram-file = /dev/hugepages/vm42.ram

        vmm-uid = 64055
        vmm-socket = /run/postcopyd/vm42/vmm.sock
        control-socket = /run/postcopyd/vm42/control.sock
        migration-id = \(SeedValues.migrationID)
        vmm-timeout = 30
        stall-warning-ms = 100
        ready-file = /run/postcopyd/vm42/ready
        trace = " /run/postcopyd/vm42/trace.csv "
        background-scheduling = idle
        dead-peer-timeout = 5
        reconnect-timeout = 600
        tls-ca = /etc/postcopyd/ca.pem
        tls-cert = /etc/postcopyd/vm42.pem
        tls-key = /etc/postcopyd/vm42.key
        tls-client-name = source.example
        migration-secret-file = /etc/postcopyd/vm42.secret
        # insecure-plaintext
        json
        takeover

        """
}
