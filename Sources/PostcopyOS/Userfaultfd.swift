import CPostcopy
import Glibc
import PostcopyCore

/// Modes a range can be registered in, as a flag word.
/// Kernel: `UFFDIO_REGISTER_MODE_*`
public struct RegisterMode: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let missing = RegisterMode(rawValue: UInt64(CPC_UFFDIO_REGISTER_MODE_MISSING))
    public static let writeProtect = RegisterMode(rawValue: UInt64(CPC_UFFDIO_REGISTER_MODE_WP))
    public static let minor = RegisterMode(rawValue: UInt64(CPC_UFFDIO_REGISTER_MODE_MINOR))
}

/// The ioctls the kernel says a registered range supports.
public struct RangeIoctls: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let wake = RangeIoctls(rawValue: 1 << UInt64(CPC_UFFDIO_IOCTL_BIT_WAKE))
    public static let copy = RangeIoctls(rawValue: 1 << UInt64(CPC_UFFDIO_IOCTL_BIT_COPY))
    public static let `continue` = RangeIoctls(rawValue: 1 << UInt64(CPC_UFFDIO_IOCTL_BIT_CONTINUE))
}

/// What UFFDIO_CONTINUE did. The fault path branches on these, so they are
/// values, not errors.
public enum ContinueOutcome: Equatable, Sendable {
    /// The range is now mapped and its waiters woken.
    case mapped
    /// Something already mapped it (EEXIST): the waiters still need a wake.
    case alreadyMapped
    /// The address space was changing (EAGAIN): try again.
    case retry
    /// The page is not in the page cache (EFAULT): there is nothing to map
    /// until it is made to exist.
    case hole
}

/// How a userfaultfd was obtained.
public enum UffdOpenMethod: String, Sendable {
    /// /dev/userfaultfd with USERFAULTFD_IOC_NEW (Linux 6.1): access is
    /// governed by the device node's permissions.
    case device = "/dev/userfaultfd"
    /// The userfaultfd(2) system call: needs CAP_SYS_PTRACE, or
    /// vm.unprivileged_userfaultfd=1, to see kernel-originated faults.
    case syscall = "userfaultfd(2)"
    /// Created and negotiated by another process, received over a socket.
    case received = "received from another process"
}

/// A userfaultfd: one Swift method per kernel operation, no decisions.
///
/// The descriptor is non-blocking and close-on-exec, and is closed when the
/// object goes away.
public final class Userfaultfd: Sendable {
    public let fd: Int32
    /// Features enabled by UFFDIO_API on this descriptor.
    public let features: UffdFeatures
    public let openMethod: UffdOpenMethod

    private static let openFlags = O_CLOEXEC | O_NONBLOCK

    private init(fd: Int32, features: UffdFeatures, openMethod: UffdOpenMethod) {
        self.fd = fd
        self.features = features
        self.openMethod = openMethod
    }

    /// Takes ownership of a userfaultfd another process created and already
    /// negotiated (e.g. received from a VMM over SCM_RIGHTS).
    public static func adopting(fd: Int32, features: UffdFeatures) -> Userfaultfd {
        Userfaultfd(fd: fd, features: features, openMethod: .received)
    }

    deinit { close(fd) }

    /// Sets O_NONBLOCK on the descriptor when it is not set (a VMM may hand
    /// over a userfaultfd it opened blocking); returns whether it had to.
    /// The fault loop reads only after poll, but a blocking read there could
    /// still hang the fault thread on a spurious wake-up. O_NONBLOCK belongs
    /// to the open file, so the VMM's copy becomes non-blocking too.
    /// Kernel: `fcntl(2)` F_GETFL / F_SETFL
    @discardableResult
    public func makeNonBlocking() throws(SystemCallError) -> Bool {
        let flags = try checkLibc("fcntl(F_GETFL) on the userfaultfd") { fcntl(fd, F_GETFL) }
        guard flags & O_NONBLOCK == 0 else { return false }
        _ = try checkLibc("fcntl(F_SETFL, O_NONBLOCK) on the userfaultfd") { fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
        return true
    }

    /// Whether O_NONBLOCK is set on the descriptor.
    public var isNonBlocking: Bool { fcntl(fd, F_GETFL) & O_NONBLOCK != 0 }

    /// Opens a raw descriptor: /dev/userfaultfd first, then the system call
    /// when the device is absent or not accessible.
    /// Kernel: `USERFAULTFD_IOC_NEW`, `userfaultfd(2)`
    static func openDescriptor() throws(SystemCallError) -> (Int32, UffdOpenMethod) {
        let fd = cpc_uffd_open_device(openFlags)
        if fd >= 0 { return (fd, .device) }
        let deviceError = Errno(-fd)
        guard [.noEntry, .accessDenied, .notPermitted].contains(deviceError) else {
            throw SystemCallError("open /dev/userfaultfd", deviceError)
        }
        let viaSyscall = try check("userfaultfd(2) (after /dev/userfaultfd: \(deviceError.name))") {
            cpc_uffd_open_syscall(openFlags)
        }
        return (viaSyscall, .syscall)
    }

    /// Tries one way of opening a userfaultfd, for the capability report.
    public static func tryOpen(_ method: UffdOpenMethod) -> AccessResult {
        let fd = method == .device ? cpc_uffd_open_device(openFlags) : cpc_uffd_open_syscall(openFlags)
        guard fd >= 0 else { return .unusable(Errno(-fd).description) }
        close(fd)
        return .usable
    }

    /// The features this kernel offers. Uses a descriptor of its own and
    /// closes it: UFFDIO_API may succeed only once per descriptor, so the
    /// one that enables features must be a fresh one.
    /// Kernel: `UFFDIO_API` with no features requested
    public static func offeredFeatures() throws -> UffdFeatures {
        let (fd, _) = try inStep("open userfaultfd") { try openDescriptor() }
        defer { close(fd) }
        var features: UInt64 = 0
        var ioctls: UInt64 = 0
        try check("UFFDIO_API") { cpc_uffdio_api(fd, &features, &ioctls) }
        return UffdFeatures(rawValue: features)
    }

    /// Opens a userfaultfd with `features` enabled, after probing that the
    /// kernel offers all of them; the error names those it lacks, with
    /// `hint` (which kernel brings them). `pretendingAbsent` masks features
    /// off the probe's answer, for testing the paths of an older kernel.
    /// Kernel: `UFFDIO_API`
    public static func open(enabling features: UffdFeatures, hint: String = UffdFeatureError.minorFaultsHint,
                            pretendingAbsent: UffdFeatures = []) throws -> Userfaultfd {
        let offered = try inStep("probe userfaultfd features") { try offeredFeatures() }.subtracting(pretendingAbsent)
        let absent = features.subtracting(offered)
        guard absent.isEmpty else { throw UffdFeatureError(missing: absent, offered: offered, hint: hint) }
        let (fd, method) = try inStep("open userfaultfd") { try openDescriptor() }
        var enabled = features.rawValue
        var ioctls: UInt64 = 0
        do {
            try check("UFFDIO_API enabling \(features)") { cpc_uffdio_api(fd, &enabled, &ioctls) }
        } catch {
            close(fd)
            throw error
        }
        return Userfaultfd(fd: fd, features: features, openMethod: method)
    }

    /// Registers [start, start+length) for `mode`; returns the ioctls the
    /// kernel will accept on it.
    /// Kernel: `UFFDIO_REGISTER`
    @discardableResult
    public func register(start: UInt64, length: UInt64, mode: RegisterMode) throws(SystemCallError) -> RangeIoctls {
        var ioctls: UInt64 = 0
        try check("UFFDIO_REGISTER 0x\(String(start, radix: 16))+\(length)") {
            cpc_uffdio_register(fd, start, length, mode.rawValue, &ioctls)
        }
        return RangeIoctls(rawValue: ioctls)
    }

    /// Drops registration of [start, start+length), waking its waiters.
    /// Kernel: `UFFDIO_UNREGISTER`
    public func unregister(start: UInt64, length: UInt64) throws(SystemCallError) {
        try check("UFFDIO_UNREGISTER 0x\(String(start, radix: 16))+\(length)") {
            cpc_uffdio_unregister(fd, start, length)
        }
    }

    /// Unregisters [start, start+length) and then wakes every thread still
    /// waiting on a fault in it. UNREGISTER wakes the waiters it finds, but
    /// a fault taken under the per-VMA lock can queue itself just after that
    /// wake-up (seen on 6.18) and would then sleep until the descriptor is
    /// closed; the second wake-up finds it. After this the range faults as
    /// ordinary memory.
    /// Kernel: `UFFDIO_UNREGISTER`, then `UFFDIO_WAKE`
    public func release(start: UInt64, length: UInt64) throws(SystemCallError) {
        try unregister(start: start, length: length)
        try wake(start: start, length: length)
    }

    /// Maps the page-cache pages of [start, start+length) into the registered
    /// range and, unless `wake` is false, wakes the threads waiting on it.
    /// Errors other than the outcomes the fault path branches on are thrown.
    /// Kernel: `UFFDIO_CONTINUE`
    @inline(__always)
    public func `continue`(start: UInt64, length: UInt64, wake: Bool = true) throws(SystemCallError) -> ContinueOutcome {
        var mapped: Int64 = 0
        let mode = wake ? 0 : UInt64(CPC_UFFDIO_CONTINUE_MODE_DONTWAKE)
        while true {
            let rc = cpc_uffdio_continue(fd, start, length, mode, &mapped)
            switch rc {
            case 0: return .mapped
            case -EINTR: continue
            case -EEXIST: return .alreadyMapped
            case -EAGAIN: return .retry
            case -EFAULT, -ENOENT: return .hole
            default:
                throw SystemCallError("UFFDIO_CONTINUE 0x\(String(start, radix: 16))+\(length)", Errno(-rc))
            }
        }
    }

    /// Wakes threads waiting on faults in [start, start+length).
    /// Kernel: `UFFDIO_WAKE`
    public func wake(start: UInt64, length: UInt64) throws(SystemCallError) {
        try check("UFFDIO_WAKE 0x\(String(start, radix: 16))+\(length)") { cpc_uffdio_wake(fd, start, length) }
    }

    /// Reads as many queued events as fit in `buffer` without blocking;
    /// returns how many were read (0 when none was queued).
    /// Kernel: `read(2)` of `struct uffd_msg`
    @inline(__always)
    public func readEvents(into buffer: UffdEventBuffer) throws(SystemCallError) -> Int {
        while true {
            let bytes = read(fd, buffer.storage, buffer.capacity * Int(CPC_UFFD_MSG_SIZE))
            if bytes >= 0 { return bytes / Int(CPC_UFFD_MSG_SIZE) }
            switch errno {
            case EINTR: continue
            case EAGAIN: return 0
            case let error: throw SystemCallError("read userfaultfd events", Errno(error))
            }
        }
    }
}

/// UFFDIO_API does not offer what postcopy needs.
public struct UffdFeatureError: Error, CustomStringConvertible {
    public let missing: UffdFeatures
    public let offered: UffdFeatures
    /// Which kernel brings what was asked for.
    public var hint = UffdFeatureError.minorFaultsHint

    public static let minorFaultsHint = "minor faults need Linux ≥ 5.13 for hugetlbfs and ≥ 5.14 for shmem"

    public var description: String {
        "the kernel's userfaultfd lacks \(missing) (it offers: \(offered)); \(hint)"
    }
}

/// A preallocated buffer for a batch of `struct uffd_msg`, decoded in place
/// so that reading faults allocates nothing.
public final class UffdEventBuffer: @unchecked Sendable {
    // SAFETY: owned raw storage, used by one reader thread at a time.
    let storage: UnsafeMutableRawPointer
    public let capacity: Int

    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
        storage = .allocate(byteCount: capacity * Int(CPC_UFFD_MSG_SIZE), alignment: 8)
    }

    deinit { storage.deallocate() }

    /// The raw fields of message `index`, as the kernel wrote them.
    @inline(__always)
    public func message(_ index: Int) -> (event: UInt8, flags: UInt64, address: UInt64, threadID: UInt32) {
        precondition(index >= 0 && index < capacity)
        // SAFETY: index is within the buffer; the offsets are checked against
        // struct uffd_msg by _Static_assert in the C shim.
        let message = storage + index * Int(CPC_UFFD_MSG_SIZE)
        return (message.load(fromByteOffset: Int(CPC_UFFD_MSG_OFF_EVENT), as: UInt8.self),
                message.load(fromByteOffset: Int(CPC_UFFD_MSG_OFF_FLAGS), as: UInt64.self),
                message.load(fromByteOffset: Int(CPC_UFFD_MSG_OFF_ADDRESS), as: UInt64.self),
                message.load(fromByteOffset: Int(CPC_UFFD_MSG_OFF_PTID), as: UInt32.self))
    }
}
