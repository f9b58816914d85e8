import Foundation
import Glibc
import PostcopyCore
import PostcopyHarness
import PostcopyMigration
import PostcopyOS
import Testing

/// postcopyd dies during postcopy, and a restarted one takes the migration
/// over: the VMM hands back guest RAM, the page-state record and its
/// userfaultfd, the agent rejoins, and the guest verifies every page and
/// every write it made.
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct TakeoverTests {
    static let size: UInt64 = 48 << 20

    /// The daemon's status over its control socket; nil while it cannot answer.
    static func status(_ path: String) -> DaemonStatus? {
        guard let reply = try? ControlClient.request(ControlRequest.status.rawValue, at: path) else { return nil }
        return try? JSONDecoder().decode(DaemonStatus.self, from: Data(reply))
    }

    static func waitFor(_ path: String, seconds: Double, _ condition: (DaemonStatus) -> Bool) -> DaemonStatus? {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while monotonicNanoseconds() < deadline {
            if let status = status(path), condition(status) { return status }
            usleep(20_000)
        }
        return nil
    }

    /// With one bulk stream and with two: the agent rejoins the restarted
    /// daemon on every connection, and the daemon learns the count from its
    /// HELLOs.
    @Test(arguments: [1, 2])
    func theDaemonKilledAndRestarted(streams: Int) throws {
        let source = try SourceFile(size: Self.size, seed: 17) { _ in false }
        let directory = try TemporaryDirectory()
        let vmmSocket = directory.path + "/vmm.sock"
        let control = directory.path + "/control.sock"
        let common = ["serve", "--vmm-socket", vmmSocket, "--control-socket", control, "--dead-peer-timeout", TestTiming.seconds(1),
                      "--reconnect-timeout", "60", "--json"] + TestCertificates.daemonFlags
        let (first, endpoint) = try RestartedDaemon.startFirst(common + ["--listen", "127.0.0.1:0", "--size", "\(Self.size)"], directory: directory.path)
        defer { if first.isRunning { kill(first.processIdentifier, SIGKILL) } }

        var guestConfig = GuestConfig(socketPath: vmmSocket)
        guestConfig.scribble = true
        // Most pages come in the background, paced: postcopy lasts seconds.
        // The guest's threads touch a tenth of RAM, working 2 ms between
        // touches, so that they still fault when the daemon has been replaced.
        guestConfig.touchShare = 0.1
        guestConfig.thinkNanos = 2_000_000
        guestConfig.reattachTimeoutNanos = 60_000_000_000
        let guest = GuestVMM(config: guestConfig, logger: testLogger("guest"))
        let guestRun = try Background("test-guest") { try guest.run() }
        // The agent's "pause" rewrites 40 MiB of the source: those pages are stale.
        let rewrite = "dd if=/dev/urandom of=\(source.path) bs=1M count=40 conv=notrunc status=none"
        let agent = try Program.spawn("postcopy-push", [
            "--ram", source.path, "--to", endpoint, "--migration-id", "00000000000000170000000000000017", "--quiet",
            "--postcopy-bandwidth", "8", "--dead-peer-timeout", TestTiming.seconds(1), "--reconnect-timeout", "60",
            "--pause-cmd", rewrite, "--max-rounds", "1", "--streams", "\(streams)",
        ] + TestCertificates.agentFlags, stderr: directory.path + "/push.err")
        defer { if agent.isRunning { kill(agent.processIdentifier, SIGKILL) } }

        // Let it serve a while, then kill it where it stands.
        let serving = Self.waitFor(control, seconds: 60 * Double(TestTiming.scale)) { $0.phase == "postcopy" && $0.faultsStale > 0 }
        try #require(serving != nil, "postcopy never served a stale fault:\n\(readTextFile(directory.path + "/postcopyd1.err") ?? "")\npostcopy-push:\n\(readTextFile(directory.path + "/push.err") ?? "")")
        usleep(200_000)
        let before = try #require(Self.status(control))
        kill(first.processIdentifier, SIGKILL)
        first.waitUntilExit()
        let killedAt = monotonicNanoseconds()

        // No --size: the record says how big guest RAM is.
        let (summary, guestSummary, log) = try RestartedDaemon.takeOver(arguments: common + ["--listen", endpoint], directory: directory.path,
                                                                   guestRun: guestRun, agent: agent)
        print("resilience daemon kill -9 (\(streams) bulk streams): \(before.stalePagesLeft) of \(before.stalePagesAtSwitchover) pages stale when killed "
            + "(\(before.faultsStale) stale faults served by the first daemon, \(summary.faultsStale) by the second); "
            + "paused \(fixed(summary.pausedSeconds, 2)) s; rejoin → first stale fault served (ms): "
            + "\(summary.rejoinToFirstFaultMs.map { fixed($0, 1) }); guest verified "
            + "\(fixed(Double(monotonicNanoseconds() - killedAt) / 1e9, 2)) s after the kill, "
            + "reattached \(guestSummary.reattachments) times")
        #expect(before.stalePagesLeft > 0 && before.stalePagesLeft < before.stalePagesAtSwitchover,
                "killed outside postcopy's middle")
        #expect(log.contains("took migration"), "no takeover in the log:\n\(log)")
        #expect(summary.tookOver)
        #expect(summary.streams == streams, "the restarted daemon learned the count from the rejoin")
        // The guest went on faulting on stale pages, which the second daemon served.
        #expect(summary.faultsStale > 0)
        #expect(guestSummary.reattachments == 1)
        #expect(guestSummary.verified, "guest digest \(guestSummary.actualDigest) vs \(guestSummary.expectedDigest)")
        #expect(guestSummary.scribblesLost == 0)
        // The record holds no digest: the second daemon learned it from the
        // rejoining agent (IMAGE_DIGEST), and passed it on in VMM_COMPLETE.
        #expect(summary.imageDigest == guestSummary.expectedDigest)
    }
}

extension TakeoverTests {
    /// A record whose header does not check out leaves it unknown which
    /// pages the guest may have written: the takeover is refused, loudly,
    /// rather than guessed, and the VMM is told why.
    @Test func aDamagedRecordIsRefusedNotGuessed() throws {
        let directory = try TemporaryDirectory()
        let size: UInt64 = 4 << 20
        let geometry = try PageGeometry(regionSize: size, pageSize: .small)
        var config = DestinationConfig(listen: SocketEndpoint(host: "127.0.0.1", port: 0),
                                       transport: TestCertificates.daemon,
                                       vmmSocketPath: directory.path + "/vmm.sock", memory: .shmem,
                                       regionSize: 0, vmmUID: geteuid())
        config.vmmAttachTimeoutNanos = 20_000_000_000
        let ram = try MemoryFile(backing: .memfd, size: size)
        let header = PageStateHeader(migrationID: MigrationID(high: 7, low: 7), geometry: geometry, guestBase: 1 << 30,
                                     features: MemoryKind.shmem.requiredFeatures, registerMode: 0b101,
                                     stalePagesAtSwitchover: 10, sourcePausedAtNanos: 1,
                                     secretDigest: MigrationSecret.test.digest)
        let record = try PageStateFile(header: header, stale: PageBitmap(count: geometry.smallPageCount))
        // One flipped bit in the header's region size.
        var byte: UInt8 = 0
        #expect(pread(record.fd, &byte, 1, 18) == 1)
        byte ^= 0x01
        #expect(pwrite(record.fd, &byte, 1, 18) == 1)
        let uffd = try Userfaultfd.open(enabling: MemoryKind.shmem.requiredFeatures)

        // The VMM: hands back what it kept, then reads the answer.
        let socket = config.vmmSocketPath
        let vmm = try Background("test-vmm") { () throws -> String in
            var connection: UnixConnection?
            for _ in 0..<2000 where connection == nil {
                connection = try? UnixConnection.connect(path: socket)
                if connection == nil { usleep(10_000) }
            }
            let channel = VMMChannel(try #require(connection), side: .vmm, opening: .reattach)
            try channel.send(.handback(.ram), passing: ram.fd)
            try channel.send(.handback(.pageState), passing: record.fd)
            try channel.send(.reattach(guestBase: 1 << 30, features: uffd.features, registerMode: 0b101),
                             passing: uffd.fd)
            guard let (answer, descriptor) = try channel.receive() else { return "closed" }
            if let descriptor { close(descriptor) }
            return "\(answer)"
        }
        do {
            _ = try DestinationDaemon(config: config, logger: testLogger("postcopyd"), takeover: .vmm)
            Issue.record("a damaged page-state record was taken over")
        } catch {
            #expect("\(error)".contains("which pages the guest may have written is unknown"), "\(error)")
            #expect("\(error)".contains("checksum"), "\(error)")
        }
        let answer = try vmm.wait("the VMM").get()
        #expect(answer.hasPrefix("ERROR"), "\(answer)")
        #expect(answer.contains("not taking over"), "\(answer)")
    }
}
