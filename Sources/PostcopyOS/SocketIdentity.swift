import Glibc
import PostcopyCore

/// What a descriptor someone else made is, as a socket: for the sockets
/// systemd passes (socket activation), which the daemon did not open.
public enum SocketIdentity {
    /// The address a socket is bound to.
    public enum LocalAddress: Equatable, Sendable {
        case inet(host: String, port: UInt16)
        /// A path, or "@name" for an abstract socket; "" when unbound.
        case unix(String)
        case other

        /// "127.0.0.1:7070", "[::]:7070", the path.
        public var text: String {
            switch self {
            case let .inet(host, port): SocketEndpoint(host: host, port: port).description
            case let .unix(path): path
            case .other: ""
            }
        }
    }

    /// Family, type, whether it listens, and its address; nil when `fd` is
    /// not a socket.
    /// Kernel: `fstat(2)`, `getsockopt(2)` (`SO_DOMAIN`, `SO_TYPE`, `SO_ACCEPTCONN`)
    public static func shape(of fd: Int32) -> SocketShape? {
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else { return nil }
        let domain = option(fd, SO_DOMAIN) ?? -1
        let type = option(fd, SO_TYPE) ?? -1
        let family: SocketShape.Family = switch domain {
        case AF_INET: .inet
        case AF_INET6: .inet6
        case AF_UNIX: .unix
        default: .other(domain)
        }
        let kind: SocketShape.Kind = switch type {
        case Int32(SOCK_STREAM.rawValue): .stream
        case Int32(SOCK_DGRAM.rawValue): .datagram
        case Int32(SOCK_SEQPACKET.rawValue): .sequencedPacket
        default: .other(type)
        }
        return SocketShape(family: family, kind: kind, listening: option(fd, SO_ACCEPTCONN) == 1,
                           address: localAddress(fd).text)
    }

    /// The address `fd` is bound to (`.other` when it cannot be read).
    /// Kernel: `getsockname(2)`
    public static func localAddress(_ fd: Int32) -> LocalAddress {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let named = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0 else { return .other }
        switch Int32(storage.ss_family) {
        case AF_INET:
            // SAFETY: the kernel wrote a sockaddr_in, smaller than the storage.
            var address = withUnsafeBytes(of: &storage) { $0.load(as: sockaddr_in.self) }
            return .inet(host: numericHost(AF_INET, &address.sin_addr), port: UInt16(bigEndian: address.sin_port))
        case AF_INET6:
            // SAFETY: as above, a sockaddr_in6.
            var address = withUnsafeBytes(of: &storage) { $0.load(as: sockaddr_in6.self) }
            return .inet(host: numericHost(AF_INET6, &address.sin6_addr), port: UInt16(bigEndian: address.sin6_port))
        case AF_UNIX:
            // sun_path follows sun_family; `length` says how much of it is there.
            let offset = MemoryLayout<sockaddr_un>.offset(of: \.sun_path)!
            guard Int(length) > offset else { return .unix("") }
            let path = withUnsafeBytes(of: &storage) { Array($0[offset..<Int(length)]) }
            if path.first == 0 {
                return .unix("@" + String(decoding: path.dropFirst(), as: UTF8.self))
            }
            return .unix(String(decoding: path.prefix { $0 != 0 }, as: UTF8.self))
        default:
            return .other
        }
    }

    private static func option(_ fd: Int32, _ name: Int32) -> Int32? {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        return getsockopt(fd, SOL_SOCKET, name, &value, &length) == 0 ? value : nil
    }

    private static func numericHost<Address>(_ family: Int32, _ address: inout Address) -> String {
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        guard inet_ntop(family, &address, &text, socklen_t(text.count)) != nil else { return "?" }
        return text.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }
}
