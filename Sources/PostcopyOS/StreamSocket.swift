import Glibc

/// What unix and TCP stream sockets share: opening one, and connecting it.
enum StreamSocket {
    /// A new close-on-exec stream socket of `family`.
    /// Kernel: `socket(2)`
    static func open(family: Int32, for purpose: @autoclosure () -> String) throws(SystemCallError) -> Int32 {
        try checkLibc("socket for \(purpose())") {
            socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
    }

    /// Connects `fd` to `address`. A connect interrupted by a signal goes on
    /// in the kernel and must not be issued again (that would answer
    /// EALREADY): wait for the socket to become writable and read the
    /// outcome from SO_ERROR instead.
    /// Kernel: `connect(2)`
    static func connect(_ fd: Int32, _ address: UnsafePointer<sockaddr>, _ length: socklen_t,
                        to peer: @autoclosure () -> String) throws(SystemCallError) {
        guard Glibc.connect(fd, address, length) < 0 else { return }
        var error = errno
        if error == EINTR {
            var waiter = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            while poll(&waiter, 1, -1) < 0 && errno == EINTR {}
            var length = socklen_t(MemoryLayout<Int32>.size)
            error = 0
            if getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) < 0 { error = errno }
            if error == 0 { return }
        }
        throw SystemCallError("connect to \(peer())", Errno(error))
    }

    /// Makes a blocking receive on `fd` fail with EAGAIN after `nanoseconds`
    /// without data (nil: wait forever).
    /// Kernel: `SO_RCVTIMEO`
    static func setReceiveTimeout(_ fd: Int32, _ nanoseconds: UInt64?) throws(SystemCallError) {
        try setTimeout(fd, SO_RCVTIMEO, nanoseconds)
    }

    /// Sets `SO_RCVTIMEO` or `SO_SNDTIMEO` (nil: no timeout).
    static func setTimeout(_ fd: Int32, _ option: Int32, _ nanoseconds: UInt64?) throws(SystemCallError) {
        let value = nanoseconds ?? 0
        var timeout = timeval(tv_sec: Int(value / 1_000_000_000), tv_usec: Int(value % 1_000_000_000 / 1000))
        try checkLibc(option == SO_RCVTIMEO ? "SO_RCVTIMEO" : "SO_SNDTIMEO") {
            setsockopt(fd, SOL_SOCKET, option, &timeout, socklen_t(MemoryLayout<timeval>.size))
        }
    }
}
