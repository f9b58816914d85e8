import Foundation
import Glibc
import PostcopyCore
import PostcopyHarness
import PostcopyMigration
import PostcopyOS
import Synchronization
import Testing

/// Issue 18: from VMM_RESUME until VMM_COMPLETE guest RAM stays registered
/// and the guest's faults wait, whatever happens. ERROR from postcopyd
/// during postcopy is a lost postcopyd: the reference VMM keeps the range,
/// the RAM file, the record and the userfaultfd, and a restarted postcopyd
/// takes the guest over.
@Suite(.serialized, .enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct FailSafeVMMTests {
    static let size: UInt64 = 48 << 20

    /// A relay between the VMM and postcopyd's VMM socket, frame by frame
    /// with the real codec (descriptors passed on), so that the test can
    /// stand in for postcopyd's end: here, to send the VMM the ERROR a
    /// postcopyd stopped during postcopy sends.
    final class VMMRelay: Sendable {
        let vmm: VMMChannel
        let daemon: VMMChannel
        /// VMM_ATTACH's guest base, once it went by.
        let guestBase = Locked<UInt64>(0)
        private let toVMM: Background<Void>
        private let toDaemon: Background<Void>

        init(vmm: VMMChannel, daemon: VMMChannel) throws {
            self.vmm = vmm
            self.daemon = daemon
            let guestBase = self.guestBase
            toVMM = try Background("test-relay-vmm") { Self.relay(from: daemon, to: vmm) { _ in } }
            toDaemon = try Background("test-relay-daemon") {
                Self.relay(from: vmm, to: daemon) { message in
                    if case let .attach(base, _, _) = message { guestBase.withLock { $0 = base } }
                }
            }
        }

        private static func relay(from: VMMChannel, to: VMMChannel, seen: (VMMMessage) -> Void) {
            while true {
                guard let received = (try? from.receive()) ?? nil else { return }
                let (message, descriptor) = received
                seen(message)
                defer { if let descriptor { close(descriptor) } }
                do { try to.send(message, passing: descriptor) } catch { return }
            }
        }

        /// postcopyd's end is gone (killed): what it would have said on
        /// the way out goes to the VMM, and the VMM's socket is closed.
        func endWithError(_ code: ErrorCode, _ text: String) throws {
            _ = toVMM.wait("the relay to the VMM")
            try vmm.send(.error(code: code, message: text))
            vmm.shutdown()
            daemon.shutdown()
            _ = toDaemon.wait("the relay to postcopyd")
        }
    }

    /// The VmFlags of the mapping at `base` in this process, or "".
    static func vmFlags(at base: UInt64) -> String {
        let smaps = readTextFile("/proc/self/smaps") ?? ""
        var inside = false
        for line in smaps.split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), let start = UInt64(line[..<dash], radix: 16),
               line[line.index(after: dash)...].first?.isHexDigit == true {
                inside = start == base
            } else if inside, line.hasPrefix("VmFlags:") {
                return String(line)
            }
        }
        return ""
    }

    @Test func anErrorDuringPostcopyKeepsTheGuestWaitingForATakeover() throws {
        let source = try SourceFile(size: Self.size, seed: 18) { _ in false }
        let directory = try TemporaryDirectory()
        // The VMM talks to `vmmSocket`: first the relay, later the restarted
        // postcopyd itself. The first postcopyd listens behind the relay.
        let vmmSocket = directory.path + "/vmm.sock"
        let control = directory.path + "/control.sock"
        let common = ["serve", "--control-socket", control, "--dead-peer-timeout", TestTiming.seconds(1),
                      "--reconnect-timeout", "60", "--json"] + TestCertificates.daemonFlags
        let (first, endpoint) = try RestartedDaemon.startFirst(common + ["--vmm-socket", directory.path + "/vmm1.sock",
                                                             "--listen", "127.0.0.1:0", "--size", "\(Self.size)"], directory: directory.path)
        defer { if first.isRunning { kill(first.processIdentifier, SIGKILL) } }

        var listener: UnixListener? = try UnixListener(path: vmmSocket)
        var guestConfig = GuestConfig(socketPath: vmmSocket)
        guestConfig.scribble = true
        // A tenth of RAM touched, 2 ms of work between touches: the guest
        // still faults on stale pages when postcopyd has failed.
        guestConfig.touchShare = 0.1
        guestConfig.thinkNanos = 2_000_000
        guestConfig.reattachTimeoutNanos = 60_000_000_000
        let guest = GuestVMM(config: guestConfig, logger: testLogger("guest"))
        let guestDone = Locked<Bool>(false)
        let guestRun = try Background("test-guest") { () throws -> GuestSummary in
            defer { guestDone.withLock { $0 = true } }
            return try guest.run()
        }
        let vmmSide = try #require(try listener?.accept(timeoutNanos: 10_000_000_000), "the VMM never connected")
        let relay = try VMMRelay(vmm: VMMChannel(vmmSide, side: .daemon, opening: .attach),
                                 daemon: VMMChannel(try UnixConnection.connect(path: directory.path + "/vmm1.sock"),
                                                    side: .vmm, opening: .attach))

        let rewrite = "dd if=/dev/urandom of=\(source.path) bs=1M count=40 conv=notrunc status=none"
        let agent = try Program.spawn("postcopy-push", [
            "--ram", source.path, "--to", endpoint, "--migration-id", "00000000000000180000000000000018", "--quiet",
            "--postcopy-bandwidth", "8", "--dead-peer-timeout", TestTiming.seconds(1), "--reconnect-timeout", "60",
            "--pause-cmd", rewrite, "--max-rounds", "1",
        ] + TestCertificates.agentFlags, stderr: directory.path + "/push.err")
        defer { if agent.isRunning { kill(agent.processIdentifier, SIGKILL) } }

        let serving = TakeoverTests.waitFor(control, seconds: 60 * Double(TestTiming.scale)) {
            $0.phase == "postcopy" && $0.faultsStale > 0
        }
        try #require(serving != nil, "postcopy never served a stale fault:\n\(readTextFile(directory.path + "/postcopyd1.err") ?? "")")
        usleep(200_000)
        let before = try #require(TakeoverTests.status(control))
        // postcopyd fails during postcopy: it is gone, and the VMM gets the
        // ERROR a stopped postcopyd sends (the agent just loses its
        // connections, and retries).
        kill(first.processIdentifier, SIGKILL)
        first.waitUntilExit()
        try relay.endWithError(.cancelled, "stopped by SIGTERM during postcopy")
        listener = nil  // no postcopyd at all for a while
        let base = relay.guestBase.withLock { $0 }
        try #require(base != 0, "no VMM_ATTACH went by")

        // Whatever the VMM does now, it must not release the range: the
        // guest threads on stale pages stay blocked, and the run goes on.
        usleep(1_500_000)
        let flags = Self.vmFlags(at: base)
        #expect(flags.contains(" ui") && flags.contains(" um"), "guest RAM is no longer registered: '\(flags)'")
        let gaveUp = guestDone.withLock { $0 }
        #expect(!gaveUp, "the guest gave up on ERROR instead of waiting")

        let (summary, guestSummary, _) = try RestartedDaemon.takeOver(arguments: common + ["--vmm-socket", vmmSocket, "--listen", endpoint], directory: directory.path,
                                                                   guestRun: guestRun, agent: agent)
        #expect(before.stalePagesLeft > 0, "failed after every page had arrived")
        #expect(summary.tookOver)
        #expect(guestSummary.reattachments == 1)
        // Every page the guest read is the source's, and every marker it
        // wrote survived: no thread read a page that was not there.
        #expect(guestSummary.verified, "guest digest \(guestSummary.actualDigest) vs \(guestSummary.expectedDigest)")
        #expect(guestSummary.scribblesLost == 0)
    }
}
