import Glibc
import PostcopyOS
import Synchronization
import Testing

/// Real TCP on loopback; no root needed.
@Suite struct TCPSocketTests {
    @Test func endpointsParse() {
        #expect(SocketEndpoint("127.0.0.1:7410") == SocketEndpoint(host: "127.0.0.1", port: 7410))
        #expect(SocketEndpoint("[::1]:80") == SocketEndpoint(host: "::1", port: 80))
        #expect(SocketEndpoint("[::1]:80")?.description == "[::1]:80")
        #expect(SocketEndpoint("localhost") == nil)
        #expect(SocketEndpoint(":80") == nil)
        #expect(SocketEndpoint("1.2.3.4:70000") == nil)
    }

    @Test(arguments: ["127.0.0.1", "::1"])
    func bytesCrossLoopback(host: String) throws {
        let listener = try TCPListener(endpoint: SocketEndpoint(host: host, port: 0))
        #expect(listener.endpoint.port != 0, "the kernel's chosen port is reported")
        let client = try TCPConnection.connect(to: listener.endpoint)
        let server = try listener.accept()
        let payload = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let sender = try OSThread.start(name: "tcp-send") {
            try? client.send(payload)
            client.shutdown()
        }
        var received: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = try chunk.withUnsafeMutableBytes { try server.receive(into: $0) }
            if count == 0 { break }
            received += chunk[0..<count]
        }
        sender.join()
        #expect(received == payload)
    }

    @Test func nonNumericHostsAreRefused() {
        let error = #expect(throws: SystemCallError.self) {
            try TCPConnection.connect(to: SocketEndpoint(host: "example.invalid", port: 1))
        }
        #expect(error?.description == "'example.invalid' is not a numeric IPv4 or IPv6 address: EINVAL (Invalid argument)")
    }

    @Test func refusedConnectionNamesTheEndpoint() throws {
        // Bind a port, then close it, so nothing listens there.
        let port = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0)).endpoint.port
        let error = #expect(throws: SystemCallError.self) {
            try TCPConnection.connect(to: SocketEndpoint(host: "127.0.0.1", port: port))
        }
        #expect(error?.description == "connect to 127.0.0.1:\(port): ECONNREFUSED (Connection refused)")
    }

    @Test func shutdownWakesABlockedReceiver() throws {
        let listener = try TCPListener(endpoint: SocketEndpoint(host: "127.0.0.1", port: 0))
        let client = try TCPConnection.connect(to: listener.endpoint)
        let server = try listener.accept()
        let result = Atomic<Int>(-1)
        let reader = try OSThread.start(name: "tcp-recv") {
            var byte: UInt8 = 0
            let count = (try? withUnsafeMutableBytes(of: &byte) { try server.receive(into: $0) }) ?? -2
            result.store(count, ordering: .relaxed)
        }
        usleep(20_000)
        server.shutdown()
        reader.join()
        #expect(result.load(ordering: .relaxed) == 0)
        _ = client
    }
}
