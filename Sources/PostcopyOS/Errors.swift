import Glibc
import PostcopyCore

/// A Linux error number, with the C name operators search for.
public struct Errno: Error, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(_ rawValue: Int32) { self.rawValue = rawValue }

    /// The calling thread's errno.
    public static var current: Errno { Errno(errno) }

    public static let notPermitted = Errno(EPERM)
    public static let noEntry = Errno(ENOENT)
    public static let interrupted = Errno(EINTR)
    public static let again = Errno(EAGAIN)
    public static let badAddress = Errno(EFAULT)
    public static let exists = Errno(EEXIST)
    public static let invalid = Errno(EINVAL)
    public static let accessDenied = Errno(EACCES)

    private static let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", ESRCH: "ESRCH", EINTR: "EINTR", EIO: "EIO",
        ENXIO: "ENXIO", EBADF: "EBADF", EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES",
        EFAULT: "EFAULT", EBUSY: "EBUSY", EEXIST: "EEXIST", ENODEV: "ENODEV", EINVAL: "EINVAL",
        EMFILE: "EMFILE", ENOTTY: "ENOTTY", EFBIG: "EFBIG", ENOSPC: "ENOSPC", ESPIPE: "ESPIPE",
        ENOSYS: "ENOSYS", EOPNOTSUPP: "EOPNOTSUPP", ESHUTDOWN: "ESHUTDOWN", EPIPE: "EPIPE",
        ENAMETOOLONG: "ENAMETOOLONG", EPROTO: "EPROTO", EADDRINUSE: "EADDRINUSE", ENOTCONN: "ENOTCONN",
        ECONNREFUSED: "ECONNREFUSED", ECONNRESET: "ECONNRESET", ETIMEDOUT: "ETIMEDOUT",
        EHOSTUNREACH: "EHOSTUNREACH", ENETUNREACH: "ENETUNREACH",
    ]

    public var name: String { Self.names[rawValue] ?? "errno \(rawValue)" }

    public var description: String { "\(name) (\(String(cString: strerror(rawValue))))" }
}

/// A system call that failed: what was attempted and the errno it gave.
public struct SystemCallError: Error, Equatable, Sendable, CustomStringConvertible {
    public let operation: String
    public let errno: Errno

    public init(_ operation: String, _ errno: Errno) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String { "\(operation): \(errno)" }
}

/// An error seen through the step that was under way, so that messages read
/// from the outer step to the inner cause: "self-test shmem: register guest
/// range: EINVAL (Invalid argument)".
public struct ContextError: ChainedError, CustomStringConvertible {
    public let step: String
    public let cause: any Error

    public var description: String { "\(step): \(cause)" }
    public var link: String { step }
    public var underlying: (any Error)? { cause }
}

extension ErrorChain {
    /// The errno at the bottom of the chain: that of the innermost
    /// `SystemCallError`, or an `Errno` thrown as it is.
    public var errno: Errno? {
        for error in errors.reversed() {
            if let call = error as? SystemCallError { return call.errno }
            if let errno = error as? Errno { return errno }
        }
        return nil
    }
}

/// Runs `body`, prefixing any error it throws with `step`.
@inline(__always)
public func inStep<T>(_ step: @autoclosure () -> String, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch {
        throw ContextError(step: step(), cause: error)
    }
}

/// Calls a C function returning 0/fd or -errno (the CPostcopy convention),
/// retrying EINTR, and turns a failure into a `SystemCallError`.
@discardableResult
@inline(__always)
func check(_ operation: @autoclosure () -> String, _ call: () -> Int32) throws(SystemCallError) -> Int32 {
    while true {
        let result = call()
        if result >= 0 { return result }
        if result == -EINTR { continue }
        throw SystemCallError(operation(), Errno(-result))
    }
}

/// Calls a libc function returning -1 and setting errno, retrying EINTR.
@discardableResult
@inline(__always)
func checkLibc<T: BinaryInteger>(_ operation: @autoclosure () -> String, _ call: () -> T) throws(SystemCallError) -> T {
    while true {
        let result = call()
        if result != -1 { return result }
        let error = errno
        if error == EINTR { continue }
        throw SystemCallError(operation(), Errno(error))
    }
}
