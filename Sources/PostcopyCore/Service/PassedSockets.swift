/// What a socket passed to the daemon is, as the kernel describes it
/// (`getsockopt` SO_DOMAIN, SO_TYPE, SO_ACCEPTCONN and `getsockname`, read
/// by the OS layer).
public struct SocketShape: Equatable, Sendable, CustomStringConvertible {
    public enum Family: Equatable, Sendable, CustomStringConvertible {
        case inet, inet6, unix
        /// Another address family, by number.
        case other(Int32)

        public var description: String {
            switch self {
            case .inet: "AF_INET"
            case .inet6: "AF_INET6"
            case .unix: "AF_UNIX"
            case let .other(number): "address family \(number)"
            }
        }
    }

    public enum Kind: Equatable, Sendable, CustomStringConvertible {
        case stream, datagram, sequencedPacket
        /// Another socket type, by number.
        case other(Int32)

        public var description: String {
            switch self {
            case .stream: "stream"
            case .datagram: "datagram"
            case .sequencedPacket: "seqpacket"
            case let .other(number): "type \(number)"
            }
        }
    }

    public let family: Family
    public let kind: Kind
    /// Whether it listens (`listen(2)` was called on it), rather than being
    /// connected or unconnected.
    public let listening: Bool
    /// Its own address: "127.0.0.1:7070", "[::]:7070", a path, "@name" for
    /// an abstract unix socket, "" when unbound.
    public let address: String

    public init(family: Family, kind: Kind, listening: Bool, address: String) {
        self.family = family
        self.kind = kind
        self.listening = listening
        self.address = address
    }

    /// "a listening AF_INET stream socket on 127.0.0.1:7070".
    public var description: String {
        "a \(listening ? "listening" : "non-listening") \(family) \(kind) socket\(address.isEmpty ? "" : " on \(address)")"
    }
}

/// One descriptor the service manager passed at start-up
/// (`sd_listen_fds_with_names`): a socket of `postcopyd@NAME.socket`, or
/// what the fd store kept for a takeover.
public struct PassedDescriptor: Equatable, Sendable, CustomStringConvertible {
    public let fd: Int32
    /// Its name: FDNAME= for the fd store, FileDescriptorName= for a socket
    /// (by default the socket unit's name, e.g. "postcopyd@vm42.socket").
    public let name: String
    /// nil when it is not a socket (a memfd, a userfaultfd).
    public let socket: SocketShape?

    public init(fd: Int32, name: String, socket: SocketShape?) {
        self.fd = fd
        self.name = name
        self.socket = socket
    }

    /// "descriptor 3 ('postcopyd@vm42.socket', a listening AF_INET stream socket on 0.0.0.0:7070)".
    public var description: String {
        "descriptor \(fd) ('\(name)', \(socket.map { "\($0)" } ?? "not a socket"))"
    }
}

/// The daemon's share of what systemd passed, each descriptor given its
/// role:
///
/// - a name the daemon stores in the fd store (`ram`, `page-state`,
///   `uffd`) is kept for a takeover, whatever it is;
/// - the name `agent` or `control` (FileDescriptorName=, for a socket unit
///   of its own) says the role, and the socket must fit it;
/// - any other name (a socket unit's default, its own name) says nothing,
///   and the socket's family and type decide: a listening AF_INET or
///   AF_INET6 stream socket is the agent's port, a listening AF_UNIX stream
///   socket is postcopyctl's control socket.
///
/// Anything else is an error that names the descriptor: a datagram socket,
/// a connected socket (Accept=yes), an unnamed non-socket, or a second
/// socket for a role that has one.
public struct PassedSockets: Equatable, Sendable {
    /// The names of a socket unit's descriptors that say their role.
    public static let agentName = "agent"
    public static let controlName = "control"

    /// The agent's listening TCP socket.
    public var agent: PassedDescriptor?
    /// postcopyctl's listening unix socket.
    public var control: PassedDescriptor?
    /// The fd store's descriptors, by name.
    public var stored: [String: Int32] = [:]

    public init(agent: PassedDescriptor? = nil, control: PassedDescriptor? = nil, stored: [String: Int32] = [:]) {
        self.agent = agent
        self.control = control
        self.stored = stored
    }

    /// Gives every descriptor in `passed` its role; `storedNames` are the
    /// FDNAMEs the daemon keeps in the fd store.
    public init(classifying passed: [PassedDescriptor], storedNames: Set<String>) throws(PassedDescriptorError) {
        for descriptor in passed {
            if storedNames.contains(descriptor.name) {
                // As before socket activation: a name stored twice keeps
                // the later descriptor (Recovered checks what it gets).
                stored[descriptor.name] = descriptor.fd
                continue
            }
            switch try Self.role(of: descriptor) {
            case .agent:
                if let first = agent { throw .twice(role: "agent socket", first: first.fd, second: descriptor) }
                agent = descriptor
            case .control:
                if let first = control { throw .twice(role: "control socket", first: first.fd, second: descriptor) }
                control = descriptor
            }
        }
    }

    enum Role { case agent, control }

    private static func role(of descriptor: PassedDescriptor) throws(PassedDescriptorError) -> Role {
        guard let socket = descriptor.socket else { throw .notASocket(descriptor) }
        let isTCP = socket.kind == .stream && (socket.family == .inet || socket.family == .inet6)
        let isUnixStream = socket.kind == .stream && socket.family == .unix
        let role: Role
        switch descriptor.name {
        case agentName:
            guard isTCP else { throw .doesNotFitItsName(descriptor, needs: "a listening TCP (AF_INET or AF_INET6 stream) socket") }
            role = .agent
        case controlName:
            guard isUnixStream else { throw .doesNotFitItsName(descriptor, needs: "a listening AF_UNIX stream socket") }
            role = .control
        default:
            if isTCP {
                role = .agent
            } else if isUnixStream {
                role = .control
            } else {
                throw .unusable(descriptor)
            }
        }
        guard socket.listening else { throw .notListening(descriptor) }
        return role
    }

    /// What the journal should say about the sockets used, and about
    /// settings they override: `listen` and `controlSocket` are the
    /// settings' values when given (nil when left to their defaults).
    public func notes(listen: String?, controlSocket: String?) -> [String] {
        var notes: [String] = []
        if let agent, let socket = agent.socket {
            notes.append("listening for the agent on \(socket.address), the socket systemd passed (\(Self.origin(agent)))")
            if let listen, listen != socket.address {
                notes.append("the settings' listen = \(listen) is not used: the agent's socket systemd passed (\(socket.address)) wins")
            }
        }
        if let control, let socket = control.socket {
            notes.append("listening for postcopyctl on \(socket.address), the socket systemd passed (\(Self.origin(control)))")
            if let controlSocket, controlSocket != socket.address {
                notes.append("the settings' control-socket = \(controlSocket) is not used: the control socket systemd passed (\(socket.address)) wins")
            }
        }
        return notes
    }

    private static func origin(_ descriptor: PassedDescriptor) -> String {
        "descriptor \(descriptor.fd), '\(descriptor.name)'"
    }
}

/// A descriptor systemd passed that the daemon cannot use; it does not
/// start.
public enum PassedDescriptorError: Error, Equatable, Sendable, CustomStringConvertible {
    case notASocket(PassedDescriptor)
    case notListening(PassedDescriptor)
    case unusable(PassedDescriptor)
    case doesNotFitItsName(PassedDescriptor, needs: String)
    case twice(role: String, first: Int32, second: PassedDescriptor)

    private static let takes = "postcopyd takes one listening TCP stream socket (the agent's port) and one listening AF_UNIX stream socket (postcopyctl's), from ListenStream= lines of postcopyd@NAME.socket and its drop-ins"

    public var description: String {
        switch self {
        case let .notASocket(descriptor):
            "systemd passed \(descriptor), which is neither a socket nor one of the descriptors postcopyd keeps in the fd store"
        case let .notListening(descriptor):
            "systemd passed \(descriptor): a connection, not a listening socket; the socket unit must keep Accept=no"
        case let .unusable(descriptor):
            "systemd passed \(descriptor), which postcopyd cannot use: \(Self.takes)"
        case let .doesNotFitItsName(descriptor, needs):
            "systemd passed \(descriptor): its name says it is the \(descriptor.name) socket, which must be \(needs)"
        case let .twice(role, first, second):
            "systemd passed a second \(role), \(second), beside descriptor \(first): \(Self.takes); for IPv4 and IPv6 on one port, one ListenStream=[::]:PORT (BindIPv6Only=both) takes both"
        }
    }
}
