import ArgumentParser
import Glibc
import PostcopyCore
import PostcopyOS

/// The migration secret in a file: 64 hex digits, readable by its owner
/// only. postcopyd reads it (`--migration-secret-file`); the agent reads
/// it too, or creates it with a fresh secret when it does not exist yet, so
/// that a restarted agent (`--resume`) can prove it is the same migration's.
public enum SecretFile {
    /// The secret in `path`; refuses a file that is not a regular file,
    /// that others may read, or that belongs to someone other than this
    /// user or root. Everything is checked on the one open descriptor the
    /// secret is then read from, so the file cannot be swapped between the
    /// check and the read.
    public static func read(_ path: String) throws -> MigrationSecret {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY)
        guard fd >= 0 else { throw ValidationError("the migration secret file \(path): \(Errno.current)") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw ValidationError("the migration secret file \(path): fstat: \(Errno.current)") }
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw ValidationError("the migration secret file \(path) is not a regular file")
        }
        guard info.st_uid == geteuid() || info.st_uid == 0 else {
            throw ValidationError("the migration secret file \(path) belongs to uid \(info.st_uid), neither this user (\(geteuid())) nor root")
        }
        guard info.st_mode & 0o077 == 0 else {
            throw ValidationError("the migration secret file \(path) may be read by others (mode \(String(info.st_mode & 0o777, radix: 8))): chmod 600 it")
        }
        var bytes = [UInt8](repeating: 0, count: 256)
        let count = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard count >= 0 else { throw ValidationError("read the migration secret file \(path): \(Errno.current)") }
        guard let secret = MigrationSecret(hex: String(decoding: bytes.prefix(count), as: UTF8.self)) else {
            throw ValidationError("the migration secret file \(path) does not hold 64 hex digits")
        }
        return secret
    }

    /// The secret in `path`, or, when there is no such file, a fresh one
    /// written there (mode 0600); `created` says which.
    public static func readOrCreate(_ path: String) throws -> (secret: MigrationSecret, created: Bool) {
        let fresh = MigrationSecret.random()
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fd < 0 {
            guard errno == EEXIST else { throw ValidationError("create the migration secret file \(path): \(Errno.current)") }
            return (try read(path), false)
        }
        defer { close(fd) }
        let text = Array((fresh.hex + "\n").utf8)
        guard write(fd, text, text.count) == text.count, fsync(fd) == 0 else {
            let error = Errno.current
            unlink(path)
            throw ValidationError("write the migration secret file \(path): \(error)")
        }
        return (fresh, true)
    }
}
