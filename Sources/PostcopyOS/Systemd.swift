import CSystemd
import Glibc
import PostcopyCore

/// libsystemd, one method per call.
public enum Systemd {
    /// Whether the system was booted with systemd as its init.
    /// libsystemd: `sd_booted(3)`
    public static var isBooted: Bool { sd_booted() > 0 }

    /// The descriptors the service manager passed this process by name:
    /// those its fd store kept from an earlier run of the service (FDSTORE=1,
    /// FDNAME=), and the sockets of its socket unit (named by
    /// FileDescriptorName=, by default the socket unit's name). Unsets LISTEN_FDS and its
    /// kin, and marks each descriptor close-on-exec. Empty when none.
    /// libsystemd: `sd_listen_fds_with_names(3)`
    public static func passedDescriptors() -> [(name: String, fd: Int32)] {
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
        let count = sd_listen_fds_with_names(1, &names)
        guard count > 0 else { return [] }
        defer {
            if let names {
                for index in 0..<Int(count) { free(names[index]) }
                free(names)
            }
        }
        return (0..<count).map { index in
            let fd = SD_LISTEN_FDS_START + index
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            let name = names?[Int(index)].map { String(cString: $0) } ?? "unknown"
            return (name, fd)
        }
    }

    /// `passedDescriptors()`, each with what it is as a socket (nil when it
    /// is not one), for `PassedSockets` to give them their roles.
    public static func passedDescriptorsDescribed() -> [PassedDescriptor] {
        passedDescriptors().map { PassedDescriptor(fd: $0.fd, name: $0.name, socket: SocketIdentity.shape(of: $0.fd)) }
    }
}

/// Somewhere descriptors survive the process: systemd's file-descriptor
/// store, for a restarted daemon to take a migration over.
public protocol DescriptorStore: Sendable {
    /// Keeps a copy of `descriptor` as `name` (replacing one of that name);
    /// returns whether it was sent.
    @discardableResult func store(_ descriptor: Int32, name: String) -> Bool
    /// Drops what is kept as `name`.
    func remove(name: String)
}

/// Tells the service manager how the daemon is doing (`sd_notify(3)`):
/// READY=1, STATUS=, WATCHDOG=1, STOPPING=1, EXTEND_TIMEOUT_USEC=. Without
/// NOTIFY_SOCKET (not run by systemd) every call does nothing.
public struct ServiceNotifier: Sendable {
    /// Whether a service manager listens (NOTIFY_SOCKET is set).
    public let isActive: Bool
    /// How often systemd expects WATCHDOG=1, when the watchdog is on
    /// (WatchdogSec=; WATCHDOG_USEC, for this pid).
    public let watchdogIntervalNanos: UInt64?

    public init() {
        isActive = getenv("NOTIFY_SOCKET") != nil
        var usec: UInt64 = 0
        watchdogIntervalNanos = sd_watchdog_enabled(0, &usec) > 0 && usec > 0 ? usec * 1000 : nil
    }

    /// Sends `assignments` ("KEY=value" lines); returns whether they were sent.
    /// libsystemd: `sd_notify(3)`
    @discardableResult
    public func notify(_ assignments: String...) -> Bool {
        guard isActive else { return false }
        return sd_notify(0, assignments.joined(separator: "\n")) > 0
    }

    /// Start-up is done: RAM allocated, both sockets listening.
    public func ready(status: String) { notify("READY=1", "STATUS=\(Self.clean(status))") }

    public func status(_ text: String) { notify("STATUS=\(Self.clean(text))") }

    public func watchdog() { notify("WATCHDOG=1") }

    public func stopping(status: String) { notify("STOPPING=1", "STATUS=\(Self.clean(status))") }

    /// Asks for `nanoseconds` more before the start (or stop) times out.
    public func extendTimeout(nanoseconds: UInt64) { notify("EXTEND_TIMEOUT_USEC=\(nanoseconds / 1000)") }

    /// A STATUS= value is one line.
    private static func clean(_ text: String) -> String {
        String(text.map { $0 == "\n" ? " " : $0 })
    }
}

extension ServiceNotifier: DescriptorStore {
    /// FDSTORE=1 with FDNAME=`name` (the unit needs FileDescriptorStoreMax=).
    /// libsystemd: `sd_pid_notify_with_fds(3)`
    @discardableResult
    public func store(_ descriptor: Int32, name: String) -> Bool {
        guard isActive else { return false }
        var fds = [descriptor]
        return sd_pid_notify_with_fds(0, 0, "FDSTORE=1\nFDNAME=\(name)", &fds, 1) > 0
    }

    /// FDSTOREREMOVE=1 with FDNAME=`name`.
    public func remove(name: String) {
        notify("FDSTOREREMOVE=1", "FDNAME=\(name)")
    }
}

/// Structured records to journald's native socket.
public enum Journal {
    /// Sends one record: `fields` as (NAME, value) pairs; the caller includes
    /// MESSAGE and PRIORITY. Returns 0 or -errno.
    /// libsystemd: `sd_journal_sendv(3)` (the variadic sd_journal_send cannot
    /// be called from Swift; sendv takes the fields as an iovec array).
    @discardableResult
    public static func send(_ fields: [(name: String, value: String)]) -> Int32 {
        // All fields in one buffer; each iovec points at one "NAME=value".
        var bytes: [UInt8] = []
        var ranges: [Range<Int>] = []
        for field in fields {
            let start = bytes.count
            bytes.append(contentsOf: field.name.utf8)
            bytes.append(UInt8(ascii: "="))
            bytes.append(contentsOf: field.value.utf8)
            ranges.append(start..<bytes.count)
        }
        return bytes.withUnsafeMutableBytes { buffer in
            var vectors = ranges.map { iovec(iov_base: buffer.baseAddress! + $0.lowerBound, iov_len: $0.count) }
            return sd_journal_sendv(&vectors, Int32(vectors.count))
        }
    }

    /// Whether stderr is connected to journald (systemd sets JOURNAL_STREAM
    /// to the device and inode of that stream): then records should go to
    /// the journal natively, with their fields, rather than as text.
    public static var isStandardErrorJournal: Bool {
        guard let value = getenv("JOURNAL_STREAM").map({ String(cString: $0) }) else { return false }
        var status = stat()
        guard fstat(STDERR_FILENO, &status) == 0 else { return false }
        return value == "\(status.st_dev):\(status.st_ino)"
    }

    /// Whether journald's native socket is there to send to.
    public static var isAvailable: Bool { access("/run/systemd/journal/socket", F_OK) == 0 }
}
