import Glibc
import PostcopyCore
@testable import PostcopyOS
import Synchronization
import Testing

/// The fault loop tells its owner the moment it dies, not at completion.
@Suite(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct FaultLoopFailureTests {
    final class NeverCalled: FaultResolver {
        let calls = Atomic<Int>(0)
        func decide(_ fault: PageFault) -> FaultDecision {
            calls.add(1, ordering: .relaxed)
            return .deferred
        }
        func installFailed(_ fault: PageFault, _ error: InstallError) {}
    }

    /// A userfaultfd that never had UFFDIO_API polls POLLERR: the loop ends
    /// on its own, and `onFailure` hears why at once, on the fault thread.
    @Test func aDeadLoopReportsAtOnce() throws {
        let memory = try GuestMemory(backing: .memfd, size: 1 << 20)
        let (raw, _) = try Userfaultfd.openDescriptor()
        let uffd = Userfaultfd.adopting(fd: raw, features: [])
        let installer = PageInstaller(uffd: uffd, file: memory.file, guestBase: 0x1000_0000)
        let heard = Locked<[String]>([])
        let latch = Latch()
        let loop = try FaultLoop(installer: installer, resolver: NeverCalled()) { reason in
            heard.withLock { $0.append(reason) }
            latch.open()
        }
        try loop.start()
        defer { loop.stop() }
        #expect(latch.wait(timeoutNanos: 5_000_000_000), "the loop's death was not reported")
        let reasons = heard.withLock { $0 }
        #expect(reasons.count == 1)
        #expect(reasons.first?.contains("userfaultfd reported poll events") == true, "\(reasons)")
        #expect(loop.failureReason == reasons.first)
    }

    /// O_NONBLOCK is set on a userfaultfd that lacks it, once.
    @Test func aBlockingUserfaultfdIsMadeNonBlocking() throws {
        let uffd = try Userfaultfd.open(enabling: MemoryKind.shmem.requiredFeatures)
        #expect(uffd.isNonBlocking)
        #expect(try uffd.makeNonBlocking() == false)
        #expect(fcntl(uffd.fd, F_SETFL, fcntl(uffd.fd, F_GETFL) & ~O_NONBLOCK) == 0)
        #expect(!uffd.isNonBlocking)
        #expect(try uffd.makeNonBlocking() == true)
        #expect(uffd.isNonBlocking)
    }
}
