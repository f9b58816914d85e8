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
        let heard = Locked<[any Error]>([])
        let latch = Latch()
        let loop = try FaultLoop(installer: installer, resolver: NeverCalled()) { error in
            heard.withLock { $0.append(error) }
            latch.open()
        }
        try loop.start()
        defer { loop.stop() }
        #expect(latch.wait(timeoutNanos: 5_000_000_000), "the loop's death was not reported")
        let errors = heard.withLock { $0 }
        #expect(errors.count == 1)
        let failure = try #require(errors.first as? UserfaultfdPollFailure, "\(errors)")
        #expect(failure.events & Int16(POLLERR) != 0, "\(failure)")
        #expect(loop.failureReason?.hasPrefix("userfaultfd reported poll events 0x") == true, "\(errors)")
        #expect(loop.failure is UserfaultfdPollFailure)
    }

    /// A fault outside the region is not the loop's to resolve, but its
    /// thread is woken. Here the other range's owner (the test, in
    /// `onStray`) maps the page without waking anyone: only the loop's wake
    /// lets the thread go on.
    @Test func aFaultOutsideTheRegionIsWoken() throws {
        let memory = try GuestMemory(backing: .memfd, size: 1 << 20)
        let guest = try memory.mapGuestView()
        let uffd = try Userfaultfd.open(enabling: MemoryKind.shmem.requiredFeatures)
        try uffd.register(start: guest.address, length: guest.length, mode: [.minor, .missing])
        // Another shared mapping on the same userfaultfd: not guest RAM.
        let other = try GuestMemory(backing: .memfd, size: 1 << 20)
        other.alias.pointer(toSmallPage: 0).storeBytes(of: 0x5A, as: UInt8.self)
        let otherView = try other.mapGuestView()
        try uffd.register(start: otherView.address, length: otherView.length, mode: [.minor, .missing])
        defer { try? uffd.unregister(start: otherView.address, length: otherView.length) }
        let installer = PageInstaller(uffd: uffd, file: memory.file, guestBase: guest.address)
        let strays = Locked<[UInt64]>([])
        let loop = try FaultLoop(installer: installer, resolver: NeverCalled(), onStray: { address in
            strays.withLock { $0.append(address) }
            _ = try? uffd.continue(start: address & ~4095, length: 4096, wake: false)
        })
        try loop.start()
        defer { loop.stop() }
        let read = Locked<UInt8?>(nil)
        let woken = Latch()
        let address = otherView.address
        let reader = try OSThread.start(name: "test-stray") {
            let byte = UnsafePointer<UInt8>(bitPattern: UInt(address))!.pointee
            read.withLock { $0 = byte }
            woken.open()
        }
        let wasWoken = woken.wait(timeoutNanos: 5_000_000_000)
        if !wasWoken { try? uffd.unregister(start: otherView.address, length: otherView.length) }
        reader.join()
        #expect(wasWoken, "the thread that faulted outside guest RAM slept until the range was unregistered")
        #expect(read.withLock { $0 } == 0x5A)
        #expect(strays.withLock { $0 } == [address])
        #expect(loop.counters.strayFaults.load(ordering: .relaxed) == 1)
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
