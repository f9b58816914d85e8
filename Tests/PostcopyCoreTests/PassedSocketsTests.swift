import PostcopyCore
import Testing

/// How the daemon gives the descriptors systemd passed their roles
/// (`PassedSockets`): the socket unit's sockets, and the fd store's.
@Suite struct PassedSocketsTests {
    static let storedNames: Set<String> = ["ram", "page-state", "uffd"]
    /// systemd's default FileDescriptorName= for a socket unit's descriptors.
    static let unitName = "postcopyd@vm42.socket"

    static let tcp = SocketShape(family: .inet, kind: .stream, listening: true, address: "0.0.0.0:7070")
    static let tcp6 = SocketShape(family: .inet6, kind: .stream, listening: true, address: "[::]:7070")
    static let unix = SocketShape(family: .unix, kind: .stream, listening: true,
                                  address: "/run/postcopyd-socket/vm42/control.sock")

    func classify(_ passed: [PassedDescriptor]) throws(PassedDescriptorError) -> PassedSockets {
        try PassedSockets(classifying: passed, storedNames: Self.storedNames)
    }

    @Test func aSocketUnitsDescriptorsAreToldApartByFamily() throws {
        // One socket unit: every descriptor has its name, so only the family says which is which.
        let agent = PassedDescriptor(fd: 4, name: Self.unitName, socket: Self.tcp)
        let control = PassedDescriptor(fd: 3, name: Self.unitName, socket: Self.unix)
        #expect(try classify([control, agent]) == PassedSockets(agent: agent, control: control))
        let agent6 = PassedDescriptor(fd: 3, name: "unknown", socket: Self.tcp6)
        #expect(try classify([agent6]) == PassedSockets(agent: agent6))
        #expect(try classify([]) == PassedSockets())
    }

    @Test func theFdStoresDescriptorsGoToTheTakeoverBesideTheSockets() throws {
        // A daemon restarted after a crash gets the socket unit's sockets again, and the fd store's.
        let passed = [
            PassedDescriptor(fd: 3, name: Self.unitName, socket: Self.unix),
            PassedDescriptor(fd: 4, name: Self.unitName, socket: Self.tcp),
            PassedDescriptor(fd: 5, name: "ram", socket: nil),
            PassedDescriptor(fd: 6, name: "page-state", socket: nil),
            PassedDescriptor(fd: 7, name: "uffd", socket: nil),
        ]
        let sockets = try classify(passed)
        #expect(sockets.control?.fd == 3)
        #expect(sockets.agent?.fd == 4)
        #expect(sockets.stored == ["ram": 5, "page-state": 6, "uffd": 7])
    }

    @Test func aNameSaysTheRoleAndTheSocketMustFitIt() throws {
        // FileDescriptorName=agent on a unix socket is a mistake, not a control socket.
        let misnamed = PassedDescriptor(fd: 3, name: "agent", socket: Self.unix)
        #expect(throws: PassedDescriptorError.doesNotFitItsName(misnamed, needs: "a listening TCP (AF_INET or AF_INET6 stream) socket")) {
            try classify([misnamed])
        }
        let control = PassedDescriptor(fd: 4, name: "control", socket: Self.tcp)
        #expect(throws: PassedDescriptorError.doesNotFitItsName(control, needs: "a listening AF_UNIX stream socket")) {
            try classify([control])
        }
        let agent = PassedDescriptor(fd: 3, name: "agent", socket: Self.tcp6)
        let named = PassedDescriptor(fd: 4, name: "control", socket: Self.unix)
        #expect(try classify([agent, named]) == PassedSockets(agent: agent, control: named))
    }

    @Test func anythingElseIsAnErrorNamingTheDescriptor() {
        let udp = PassedDescriptor(fd: 5, name: Self.unitName,
                                   socket: SocketShape(family: .inet, kind: .datagram, listening: false, address: "0.0.0.0:7070"))
        #expect(throws: PassedDescriptorError.unusable(udp)) { try classify([udp]) }
        // A name does not make a datagram socket fit.
        let namedUDP = PassedDescriptor(fd: 5, name: "agent", socket: udp.socket)
        #expect(throws: PassedDescriptorError.doesNotFitItsName(namedUDP, needs: "a listening TCP (AF_INET or AF_INET6 stream) socket")) {
            try classify([namedUDP])
        }
        let seqpacket = PassedDescriptor(fd: 3, name: Self.unitName,
                                         socket: SocketShape(family: .unix, kind: .sequencedPacket, listening: true, address: "/run/x"))
        #expect(throws: PassedDescriptorError.unusable(seqpacket)) { try classify([seqpacket]) }
        let netlink = PassedDescriptor(fd: 3, name: Self.unitName,
                                       socket: SocketShape(family: .other(16), kind: .stream, listening: true, address: ""))
        #expect(throws: PassedDescriptorError.unusable(netlink)) { try classify([netlink]) }
        // Accept=yes passes a connection.
        let connection = PassedDescriptor(fd: 3, name: Self.unitName,
                                          socket: SocketShape(family: .inet, kind: .stream, listening: false, address: "192.0.2.1:7070"))
        #expect(throws: PassedDescriptorError.notListening(connection)) { try classify([connection]) }
        let file = PassedDescriptor(fd: 6, name: "stored", socket: nil)
        #expect(throws: PassedDescriptorError.notASocket(file)) { try classify([file]) }
    }

    @Test func aSecondSocketForOneRoleIsRefused() {
        let first = PassedDescriptor(fd: 3, name: Self.unitName, socket: Self.tcp)
        let second = PassedDescriptor(fd: 4, name: Self.unitName, socket: Self.tcp6)
        #expect(throws: PassedDescriptorError.twice(role: "agent socket", first: 3, second: second)) {
            try classify([first, second])
        }
        let control = PassedDescriptor(fd: 5, name: Self.unitName, socket: Self.unix)
        let another = PassedDescriptor(fd: 6, name: "control", socket: Self.unix)
        #expect(throws: PassedDescriptorError.twice(role: "control socket", first: 5, second: another)) {
            try classify([control, another])
        }
    }

    @Test func errorsReadAsTheOperatorNeedsThem() {
        let udp = PassedDescriptor(fd: 5, name: Self.unitName,
                                   socket: SocketShape(family: .inet, kind: .datagram, listening: false, address: "0.0.0.0:7070"))
        #expect("\(PassedDescriptorError.unusable(udp))" == "systemd passed descriptor 5 ('postcopyd@vm42.socket', a non-listening AF_INET datagram socket on 0.0.0.0:7070), which postcopyd cannot use: postcopyd takes one listening TCP stream socket (the agent's port) and one listening AF_UNIX stream socket (postcopyctl's), from ListenStream= lines of postcopyd@NAME.socket and its drop-ins")
        let connection = PassedDescriptor(fd: 3, name: "postcopyd@vm42.socket",
                                          socket: SocketShape(family: .inet6, kind: .stream, listening: false, address: "[2001:db8::1]:7070"))
        #expect("\(PassedDescriptorError.notListening(connection))" == "systemd passed descriptor 3 ('postcopyd@vm42.socket', a non-listening AF_INET6 stream socket on [2001:db8::1]:7070): a connection, not a listening socket; the socket unit must keep Accept=no")
        let file = PassedDescriptor(fd: 6, name: "stored", socket: nil)
        #expect("\(PassedDescriptorError.notASocket(file))" == "systemd passed descriptor 6 ('stored', not a socket), which is neither a socket nor one of the descriptors postcopyd keeps in the fd store")
        let second = PassedDescriptor(fd: 4, name: Self.unitName, socket: Self.tcp6)
        #expect("\(PassedDescriptorError.twice(role: "agent socket", first: 3, second: second))".hasPrefix("systemd passed a second agent socket, descriptor 4 ('postcopyd@vm42.socket', a listening AF_INET6 stream socket on [::]:7070), beside descriptor 3: "))
    }

    @Test func theNotesSayWhichSocketWins() throws {
        let sockets = PassedSockets(agent: PassedDescriptor(fd: 4, name: Self.unitName, socket: Self.tcp),
                                    control: PassedDescriptor(fd: 3, name: Self.unitName, socket: Self.unix))
        #expect(sockets.notes(listen: "127.0.0.1:7171", controlSocket: nil) == [
            "listening for the agent on 0.0.0.0:7070, the socket systemd passed (descriptor 4, 'postcopyd@vm42.socket')",
            "the settings' listen = 127.0.0.1:7171 is not used: the agent's socket systemd passed (0.0.0.0:7070) wins",
            "listening for postcopyctl on /run/postcopyd-socket/vm42/control.sock, the socket systemd passed (descriptor 3, 'postcopyd@vm42.socket')",
        ])
        // The same address in the settings overrides nothing.
        #expect(sockets.notes(listen: "0.0.0.0:7070", controlSocket: "/run/other.sock").count == 3)
        #expect(sockets.notes(listen: "0.0.0.0:7070", controlSocket: "/run/other.sock")[2]
                == "the settings' control-socket = /run/other.sock is not used: the control socket systemd passed (/run/postcopyd-socket/vm42/control.sock) wins")
        #expect(PassedSockets(stored: ["ram": 3]).notes(listen: "0.0.0.0:7070", controlSocket: nil).isEmpty)
    }
}
