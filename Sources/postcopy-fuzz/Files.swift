import Glibc

/// A file operation that failed, with the path and errno's text.
struct FileError: Error, CustomStringConvertible {
    let operation: String
    let path: String
    let errno: Int32

    var description: String { "\(operation) \(path): \(String(cString: strerror(errno)))" }
}

/// The whole contents of the file at `path`.
func readFile(_ path: String) throws -> [UInt8] {
    guard let file = fopen(path, "rb") else { throw FileError(operation: "open", path: path, errno: errno) }
    defer { fclose(file) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let count = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, file) }
        bytes += chunk[..<count]
        if count < chunk.count { break }
    }
    guard ferror(file) == 0 else { throw FileError(operation: "read", path: path, errno: errno) }
    return bytes
}

/// Writes `bytes` to `path`, replacing what was there.
func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    guard let file = fopen(path, "wb") else { throw FileError(operation: "create", path: path, errno: errno) }
    let written = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) }
    let failed = written != bytes.count || fflush(file) != 0
    let error = errno
    fclose(file)
    if failed { throw FileError(operation: "write", path: path, errno: error) }
}

/// Creates `path` and any missing parents (mode 0755); an existing
/// directory is fine.
func makeDirectories(_ path: String) throws {
    var prefix = path.hasPrefix("/") ? "/" : ""
    for component in path.split(separator: "/") {
        prefix += component
        if mkdir(prefix, 0o755) != 0 && errno != EEXIST {
            throw FileError(operation: "create directory", path: prefix, errno: errno)
        }
        prefix += "/"
    }
}

/// A line on standard error.
func printError(_ text: String) {
    let line = Array((text + "\n").utf8)
    _ = line.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
}
