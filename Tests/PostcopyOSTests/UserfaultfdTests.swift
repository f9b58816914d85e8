import Glibc
import PostcopyCore
@testable import PostcopyOS
import Synchronization
import Testing

/// One kernel operation at a time, including the ones that must fail.
@Suite(.enabled(if: Host.isRoot, Comment(rawValue: Host.needsRoot)))
struct UserfaultfdTests {
    /// A small shmem region with its guest view registered MINOR | MISSING.
    struct Registered {
        let memory: GuestMemory
        let guest: Mapping
        let uffd: Userfaultfd
        let installer: PageInstaller

        init(size: UInt64 = 1 << 20) throws {
            memory = try GuestMemory(backing: .memfd, size: size)
            guest = try memory.mapGuestView()
            uffd = try Userfaultfd.open(enabling: MemoryKind.shmem.requiredFeatures)
            try uffd.register(start: guest.address, length: guest.length, mode: [.minor, .missing])
            installer = PageInstaller(uffd: uffd, file: memory.file, guestBase: guest.address)
        }

        func word(_ page: UInt64) -> UInt64 {
            guest.pointer(toSmallPage: page).load(as: UInt64.self)
        }
    }

    @Test func kernelOffersMinorFaults() throws {
        let offered = try Userfaultfd.offeredFeatures()
        #expect(offered.isSuperset(of: MemoryKind.shmem.requiredFeatures))
        let uffd = try Userfaultfd.open(enabling: MemoryKind.shmem.requiredFeatures)
        #expect(uffd.features == MemoryKind.shmem.requiredFeatures)
    }

    @Test func continueOnAHoleIsAClearError() throws {
        let region = try Registered()
        #expect(throws: InstallError.hole(PageIndex(3))) { try region.installer.install(PageIndex(3)) }
        #expect(InstallError.hole(PageIndex(3)).description
            == "install page 3: not in the page cache (a hole); it must be written or materialized through the alias before UFFDIO_CONTINUE")
        // Once the page exists, the same call maps it: the guest reads it
        // without faulting (no fault loop runs here, so a fault would hang).
        region.memory.withAliasPage(PageIndex(3)) { $0.storeBytes(of: 0xfeed, as: UInt64.self) }
        try region.installer.install(PageIndex(3))
        #expect(region.word(3) == 0xfeed)
        #expect(region.installer.counters.continued.load(ordering: .relaxed) == 1)
    }

    @Test func continueOnAMappedPageWakesInstead() throws {
        let region = try Registered()
        region.memory.withAliasPage(PageIndex(0)) { $0.storeBytes(of: 1, as: UInt64.self) }
        #expect(try region.uffd.continue(start: region.guest.address, length: 4096) == .mapped)
        #expect(try region.uffd.continue(start: region.guest.address, length: 4096) == .alreadyMapped)
        try region.installer.install(PageIndex(0))
        #expect(region.installer.counters.alreadyMapped.load(ordering: .relaxed) == 1)
    }

    @Test func materializedHoleReadsAsZeros() throws {
        let region = try Registered()
        try region.installer.materializeAndInstall(PageIndex(5))
        #expect(region.word(5) == 0)
        // Materializing leaves an existing page's bytes alone.
        region.memory.withAliasPage(PageIndex(6)) { $0.storeBytes(of: 66, as: UInt64.self) }
        try region.installer.materializeAndInstall(PageIndex(6))
        #expect(region.word(6) == 66)
    }

    @Test func pagesOutsideTheRegionAreRefused() throws {
        let region = try Registered(size: 8192)
        #expect(throws: InstallError.outOfRange(PageIndex(2))) { try region.installer.install(PageIndex(2)) }
        #expect(throws: InstallError.outOfRange(PageIndex(.max))) { try region.installer.materializeAndInstall(PageIndex(.max)) }
    }

    @Test func aSecondUserfaultfdCannotRegisterTheSameRange() throws {
        let region = try Registered()
        let other = try Userfaultfd.open(enabling: MemoryKind.shmem.requiredFeatures)
        let error = try #require(throws: SystemCallError.self) {
            try other.register(start: region.guest.address, length: region.guest.length, mode: [.minor])
        }
        #expect(error.errno == Errno(EBUSY))
        #expect(error.description == "UFFDIO_REGISTER 0x\(String(region.guest.address, radix: 16))+1048576: EBUSY (Device or resource busy)")
    }

    @Test func minorModeNeedsSharedMemory() throws {
        let length = 1 << 20
        let anonymous = try #require(mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        defer { munmap(anonymous, length) }
        let uffd = try Userfaultfd.open(enabling: MemoryKind.shmem.requiredFeatures)
        let address = UInt64(UInt(bitPattern: anonymous))
        let error = try #require(throws: SystemCallError.self) {
            try uffd.register(start: address, length: UInt64(length), mode: [.minor])
        }
        #expect(error.errno == .invalid)
    }

    @Test func untouchedRAMCostsNoMemory() throws {
        let memory = try GuestMemory(backing: .memfd, size: 256 << 20)
        var info = stat()
        #expect(fstat(memory.file.fd, &info) == 0)
        #expect(info.st_blocks == 0, "a fresh region must not be populated")
    }

    @Test func hugetlbfsBackingRefusesOtherFilesystems() throws {
        let error = try #require(throws: (any Error).self) {
            try GuestMemory(backing: .hugetlbfs(directory: "/tmp"), size: 2 << 20)
        }
        #expect("\(error)".contains("not a hugetlbfs file"))
    }

    @Test func idleFaultLoopStartsAndStops() throws {
        let region = try Registered()
        let loop = try FaultLoop(installer: region.installer, resolver: CountingResolver(pageCount: 256))
        try loop.start()
        loop.stop()
        loop.stop()
        #expect(loop.counters.faults == 0)
        #expect(loop.failureReason == nil)
    }

    /// Several threads fault the same pages at once: every one must be
    /// woken, each page mapped once, and the rest of the faults must be
    /// answered with a wake (EEXIST), not an error.
    @Test func concurrentFaultsOnTheSamePages() throws {
        let pages: UInt64 = 512
        let region = try Registered(size: pages * 4096)
        for page in 0..<pages {
            region.memory.withAliasPage(PageIndex(page)) { $0.storeBytes(of: page | 1 << 40, as: UInt64.self) }
        }
        let resolver = CountingResolver(pageCount: pages)
        let loop = try FaultLoop(installer: region.installer, resolver: resolver)
        try loop.start()
        let wrong = Atomic<Int>(0)
        let base = UInt(region.guest.address)
        let threads = try (0..<4).map { thread in
            try OSThread.start(name: "toucher-\(thread)") {
                let pointer = UnsafeRawPointer(bitPattern: base)!
                for page in TouchOrder.random(seed: UInt64(thread)).pages(count: pages)
                where (pointer + Int(page * 4096)).load(as: UInt64.self) != page | 1 << 40 {
                    wrong.add(1, ordering: .relaxed)
                }
            }
        }
        threads.forEach { $0.join() }
        loop.stop()
        #expect(wrong.load(ordering: .relaxed) == 0)
        #expect(resolver.pages(faultedTimes: 0) == 0)
        #expect(region.installer.counters.continued.load(ordering: .relaxed) == pages)
        let extraFaults = loop.counters.faults - pages
        #expect(region.installer.counters.alreadyMapped.load(ordering: .relaxed) == extraFaults)
        #expect(loop.failureReason == nil)
    }
}
