import COpenSSL
import Glibc
import PostcopyCore
import Synchronization

/// A byte stream a `MessageStream` carries frames over: a TCP connection,
/// plain or inside TLS.
public protocol ByteStream: AnyObject, Sendable {
    /// Sends all of `bytes`.
    func send(_ bytes: UnsafeRawBufferPointer) throws
    /// Receives whatever is available, up to `buffer.count` bytes; 0 is the
    /// end of the stream. Silence for longer than the receive timeout
    /// throws `SystemCallError` with EAGAIN, as a plain socket does.
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// Makes `receive` give up (EAGAIN) after `nanoseconds` without data;
    /// nil waits forever.
    func setReceiveTimeout(_ nanoseconds: UInt64?) throws
    /// Makes `send` give up (EAGAIN) after `nanoseconds` in which the peer
    /// took nothing; nil waits forever.
    func setSendTimeout(_ nanoseconds: UInt64?) throws
    var peerEndpoint: SocketEndpoint? { get }
    /// Who the peer's certificate says it is; nil without TLS.
    var peerIdentity: String? { get }
    /// Stops both directions, waking a thread blocked in `receive`.
    func shutdown()
    /// Stops sending only (the peer reads the end of the stream), waking a
    /// thread blocked in `send`; what the peer sent can still be received.
    func shutdownSending()
}

extension TCPConnection: ByteStream {
    public var peerIdentity: String? { nil }
}

/// The files one side of a mutually authenticated TLS connection needs.
public struct TLSConfiguration: Sendable, Equatable {
    /// PEM: the certificate authority the peer's certificate must chain to.
    public var caFile: String
    /// PEM: this side's certificate (intermediates after it).
    public var certificateFile: String
    /// PEM: this side's private key.
    public var privateKeyFile: String
    /// The identity the peer's certificate must carry: a DNS name or an IP
    /// address in its subjectAltName (or its CN when it has no DNS names).
    public var peerName: String

    public init(caFile: String, certificateFile: String, privateKeyFile: String, peerName: String) {
        self.caFile = caFile
        self.certificateFile = certificateFile
        self.privateKeyFile = privateKeyFile
        self.peerName = peerName
    }
}

/// Why a TLS set-up or connection failed, in words an operator can act on.
public struct TLSError: Error, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// How the agent's connections are protected: TLS 1.3 with certificates
/// checked both ways, or nothing (an explicit opt-in for tests on a trusted
/// loopback).
public enum TransportSecurity: Sendable, CustomStringConvertible {
    case plaintext
    case tls(TLSContext)

    /// Runs the TLS handshake on `connection` (as the context's side) within
    /// `timeoutNanos`; without TLS, `connection` itself.
    public func secure(_ connection: TCPConnection, timeoutNanos: UInt64) throws -> any ByteStream {
        switch self {
        case .plaintext: return connection
        case let .tls(context): return try context.handshake(connection, timeoutNanos: timeoutNanos)
        }
    }

    public var isPlaintext: Bool {
        if case .plaintext = self { return true }
        return false
    }

    public var description: String {
        switch self {
        case .plaintext: return "plaintext (no TLS)"
        case let .tls(context): return "TLS 1.3, peer must be '\(context.configuration.peerName)'"
        }
    }
}

/// An OpenSSL context for one side: TLS 1.3 only, this side's certificate
/// and key, the CA peers must chain to, and the peer identity to insist on.
/// Shared by every connection of that side.
public final class TLSContext: @unchecked Sendable {
    // SAFETY (@unchecked): an SSL_CTX is only read once configured, which
    // OpenSSL allows from any number of threads.
    public enum Side: Sendable { case server, client }

    public let side: Side
    public let configuration: TLSConfiguration
    private let context: OpaquePointer

    /// Loads and checks the files: each must exist and parse, the key must
    /// match the certificate, and the certificate must be valid now (unless
    /// `checkingOwnValidity` is false: only tests that play a peer with an
    /// expired certificate want that).
    public init(_ side: Side, _ configuration: TLSConfiguration, checkingOwnValidity: Bool = true) throws(TLSError) {
        // OpenSSL writes to sockets with write(2): a peer that went away
        // must be an EPIPE error, not a signal that kills the process.
        signal(SIGPIPE, SIG_IGN)
        guard let context = SSL_CTX_new(side == .server ? TLS_server_method() : TLS_client_method()) else {
            throw TLSError("cannot create a TLS context: \(Self.queuedErrors())")
        }
        self.side = side
        self.configuration = configuration
        self.context = context
        try Self.configure(context, side, configuration, checkingOwnValidity)
    }

    deinit { SSL_CTX_free(context) }

    private static func configure(_ context: OpaquePointer, _ side: Side, _ files: TLSConfiguration,
                                  _ checkingOwnValidity: Bool) throws(TLSError) {
        guard copenssl_require_tls13(context) == 1 else { throw TLSError("cannot require TLS 1.3: \(queuedErrors())") }
        guard SSL_CTX_load_verify_locations(context, files.caFile, nil) == 1 else {
            throw TLSError("cannot read the CA certificate \(files.caFile): \(queuedErrors())")
        }
        guard SSL_CTX_use_certificate_chain_file(context, files.certificateFile) == 1 else {
            throw TLSError("cannot read the certificate \(files.certificateFile): \(queuedErrors())")
        }
        guard SSL_CTX_use_PrivateKey_file(context, files.privateKeyFile, SSL_FILETYPE_PEM) == 1 else {
            throw TLSError("cannot read the private key \(files.privateKeyFile): \(queuedErrors())")
        }
        guard SSL_CTX_check_private_key(context) == 1 else {
            throw TLSError("the private key \(files.privateKeyFile) does not belong to the certificate \(files.certificateFile)")
        }
        if checkingOwnValidity, let certificate = SSL_CTX_get0_certificate(context) {
            if X509_cmp_current_time(X509_get0_notAfter(certificate)) < 0 {
                throw TLSError("the certificate \(files.certificateFile) has expired")
            }
            if X509_cmp_current_time(X509_get0_notBefore(certificate)) > 0 {
                throw TLSError("the certificate \(files.certificateFile) is not valid yet")
            }
        }
        SSL_CTX_set_verify(context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nil)
        // No session tickets: nothing is resumed, and after the handshake
        // neither side has anything to say but application data. A peer
        // that closes without close_notify ends the stream as a plain
        // socket's end does; the frame decoder catches a cut frame.
        _ = SSL_CTX_set_num_tickets(context, 0)
        copenssl_set_stream_options(context)
    }

    /// Runs the handshake on `connection` within `timeoutNanos` and checks
    /// the peer's certificate: it must chain to the CA, be valid now, and
    /// name `configuration.peerName`.
    public func handshake(_ connection: TCPConnection, timeoutNanos: UInt64) throws -> TLSConnection {
        let deadline = monotonicNanoseconds() &+ timeoutNanos
        if side == .server { try Self.refusePlaintext(connection, deadline: deadline) }
        guard let ssl = SSL_new(context) else { throw TLSError("cannot create a TLS connection: \(Self.queuedErrors())") }
        var handedOver = false
        defer { if !handedOver { SSL_free(ssl) } }
        let flags = fcntl(connection.fd, F_GETFL)
        guard flags >= 0, fcntl(connection.fd, F_SETFL, flags | O_NONBLOCK) == 0 else {
            throw SystemCallError("make the connection non-blocking", Errno.current)
        }
        guard SSL_set_fd(ssl, connection.fd) == 1 else { throw TLSError("SSL_set_fd: \(Self.queuedErrors())") }
        try expectPeer(ssl)
        while true {
            ERR_clear_error()
            let result = side == .server ? SSL_accept(ssl) : SSL_connect(ssl)
            if result == 1 { break }
            let code = SSL_get_error(ssl, result)
            let savedErrno = errno
            switch code {
            case SSL_ERROR_WANT_READ:
                try TLSConnection.wait(connection.fd, for: POLLIN, until: deadline, "the TLS handshake")
            case SSL_ERROR_WANT_WRITE:
                try TLSConnection.wait(connection.fd, for: POLLOUT, until: deadline, "the TLS handshake")
            default:
                throw TLSError("TLS handshake failed: \(handshakeFailure(ssl, code, savedErrno))")
            }
        }
        handedOver = true
        return TLSConnection(connection, ssl: ssl, side: side, peerIdentity: Self.subject(ssl))
    }

    /// Makes the handshake check that the peer's certificate names
    /// `configuration.peerName` (an IP address is matched against IP
    /// subjectAltNames, a name against DNS ones).
    private func expectPeer(_ ssl: OpaquePointer) throws(TLSError) {
        let name = configuration.peerName
        let parameters = SSL_get0_param(ssl)
        var v4 = in_addr()
        var v6 = in6_addr()
        let isAddress = inet_pton(AF_INET, name, &v4) == 1 || inet_pton(AF_INET6, name, &v6) == 1
        let set = isAddress ? X509_VERIFY_PARAM_set1_ip_asc(parameters, name) : SSL_set1_host(ssl, name)
        guard set == 1 else { throw TLSError("cannot expect the peer name '\(name)': \(Self.queuedErrors())") }
        if side == .client && !isAddress { _ = copenssl_set_server_name(ssl, name) }
    }

    /// A server refuses, with a reason worth logging, a peer whose first
    /// bytes are not a TLS handshake record — most often an agent started
    /// without TLS, whose HELLO frame starts with "PCPY".
    private static func refusePlaintext(_ connection: TCPConnection, deadline: UInt64) throws {
        var first = [UInt8](repeating: 0, count: 4)
        while true {
            try TLSConnection.wait(connection.fd, for: POLLIN, until: deadline, "the TLS handshake")
            let count = recv(connection.fd, &first, first.count, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT))
            if count > 0 {
                guard first[0] != 0x16 else { return }
                if first.prefix(count).elementsEqual(Array("PCPY".utf8).prefix(count)) {
                    let reason = "the peer speaks the postcopy protocol without TLS; this postcopyd requires TLS (give postcopy-push --tls-ca, --tls-cert and --tls-key, or run both sides with --insecure-plaintext on a trusted network)"
                    tellPlaintextPeer(connection, reason)
                    throw TLSError(reason)
                }
                throw TLSError("the peer did not start a TLS handshake (first byte 0x\(String(first[0], radix: 16)))")
            }
            if count == 0 { throw TLSError("the peer closed the connection before the TLS handshake") }
            if errno != EAGAIN && errno != EINTR { throw SystemCallError("receive", Errno.current) }
        }
    }

    /// Answers a plaintext agent in its own terms, an ERROR frame, so that
    /// it can say why it was refused. Its HELLO is read first: closing a
    /// socket with unread data would reset the connection, and the ERROR
    /// with it.
    private static func tellPlaintextPeer(_ connection: TCPConnection, _ reason: String) {
        var hello = [UInt8](repeating: 0, count: 4096)
        _ = recv(connection.fd, &hello, hello.count, Int32(MSG_DONTWAIT))
        let frame = Message.error(code: .refused, message: reason).encoded()
        _ = frame.withUnsafeBytes { send(connection.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)) }
        _ = Glibc.shutdown(connection.fd, Int32(SHUT_WR))
    }

    /// What went wrong in a handshake, most specific first: the certificate
    /// check's verdict, then OpenSSL's error queue (which carries the
    /// peer's alert when it refused ours), then the socket's errno.
    private func handshakeFailure(_ ssl: OpaquePointer, _ code: Int32, _ savedErrno: Int32) -> String {
        var reasons: [String] = []
        let verdict = SSL_get_verify_result(ssl)
        if verdict != X509_V_OK {
            let whose = side == .server ? "the client's" : "postcopyd's"
            var reason = String(cString: X509_verify_cert_error_string(verdict))
            if verdict == X509_V_ERR_HOSTNAME_MISMATCH || verdict == X509_V_ERR_IP_ADDRESS_MISMATCH {
                reason = "it does not name '\(configuration.peerName)'"
            }
            reasons.append("\(whose) certificate is refused: \(reason)")
        }
        let queued = Self.queuedErrors()
        if !queued.isEmpty && reasons.isEmpty { reasons.append(Self.explain(queued, side: side)) }
        if reasons.isEmpty {
            if code == SSL_ERROR_SYSCALL && savedErrno != 0 {
                reasons.append("\(Errno(savedErrno))")
            } else {
                reasons.append(side == .server
                    ? "the peer closed the connection (it may have refused this postcopyd's certificate)"
                    : "postcopyd closed the connection (it may have refused this agent's certificate, or not speak TLS)")
            }
        }
        return reasons.joined(separator: "; ")
    }

    /// OpenSSL's reasons, with what they usually mean here.
    static func explain(_ reasons: String, side: Side) -> String {
        let peer = side == .server ? "the agent" : "postcopyd"
        if reasons.contains("alert") {
            return "\(peer) refused the handshake (\(reasons))"
        }
        if reasons.contains("wrong version number") || reasons.contains("packet length too long")
            || reasons.contains("record layer failure") {
            return "\(reasons): \(peer) does not speak TLS (is it running with --insecure-plaintext?)"
        }
        return reasons
    }

    /// The reasons in OpenSSL's error queue for this thread, emptied.
    static func queuedErrors() -> String {
        var reasons: [String] = []
        while true {
            let code = ERR_get_error()
            if code == 0 { break }
            if let reason = ERR_reason_error_string(code) {
                reasons.append(String(cString: reason))
            } else {
                reasons.append("OpenSSL error \(code)")
            }
        }
        return reasons.joined(separator: ", ")
    }

    /// The peer certificate's subject, "/O=…/CN=postcopy-agent".
    private static func subject(_ ssl: OpaquePointer) -> String {
        guard let certificate = SSL_get1_peer_certificate(ssl) else { return "" }
        defer { X509_free(certificate) }
        var text = [CChar](repeating: 0, count: 512)
        guard X509_NAME_oneline(X509_get_subject_name(certificate), &text, Int32(text.count)) != nil else { return "" }
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// A TCP connection inside TLS. Like `TCPConnection`, one thread may
/// receive while others send: every call into OpenSSL holds `lock`, and
/// waiting for the socket happens outside it (the socket is non-blocking).
public final class TLSConnection: ByteStream, @unchecked Sendable {
    // SAFETY (@unchecked): `ssl` is touched only under `lock`; the timeouts
    // are atomics.
    public let tcp: TCPConnection
    public let peerIdentity: String?
    private let ssl: OpaquePointer
    private let side: TLSContext.Side
    private let lock = Lock()
    /// 0: wait forever.
    private let receiveTimeout = Atomic<UInt64>(0)
    private let sendTimeout = Atomic<UInt64>(0)

    init(_ tcp: TCPConnection, ssl: OpaquePointer, side: TLSContext.Side, peerIdentity: String) {
        self.tcp = tcp
        self.ssl = ssl
        self.side = side
        self.peerIdentity = peerIdentity
    }

    deinit { SSL_free(ssl) }

    /// What one call into OpenSSL did, read before another thread can make
    /// a call: its result, and after success whether OpenSSL holds more
    /// received data; after failure SSL_get_error's code, errno and the
    /// queued reasons.
    private struct Outcome {
        var result: Int32
        var pending = false
        var code = SSL_ERROR_NONE
        var errno: Int32 = 0
        var reasons = ""
    }

    /// One call into OpenSSL under the lock.
    private func call(_ body: (OpaquePointer) -> Int32) -> Outcome {
        lock.withLock {
            ERR_clear_error()
            let result = body(ssl)
            guard result <= 0 else { return Outcome(result: result, pending: SSL_has_pending(ssl) == 1) }
            let code = SSL_get_error(ssl, result)
            let savedErrno = errno
            return Outcome(result: result, code: code, errno: savedErrno,
                           reasons: code == SSL_ERROR_SSL ? TLSContext.queuedErrors() : "")
        }
    }

    public func send(_ bytes: UnsafeRawBufferPointer) throws {
        var offset = 0
        while offset < bytes.count {
            let chunk = Int32(clamping: bytes.count - offset)
            let outcome = call { SSL_write($0, bytes.baseAddress! + offset, chunk) }
            if outcome.result > 0 {
                offset += Int(outcome.result)
                continue
            }
            try settle(outcome, "send", timeout: sendTimeout.load(ordering: .relaxed))
        }
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        var count = 0
        while count < buffer.count {
            let room = Int32(clamping: buffer.count - count)
            let outcome = call { SSL_read($0, buffer.baseAddress! + count, room) }
            if outcome.result > 0 {
                count += Int(outcome.result)
                // More only while OpenSSL holds it already: no system call
                // just to learn that the socket is empty.
                guard outcome.pending else { return count }
                continue
            }
            let ended = outcome.code == SSL_ERROR_ZERO_RETURN || (outcome.code == SSL_ERROR_SYSCALL && outcome.errno == 0)
            if count > 0 || ended { return count }
            try settle(outcome, "receive", timeout: receiveTimeout.load(ordering: .relaxed))
        }
        return count
    }

    /// After a call that moved no data: waits for the socket when OpenSSL
    /// asks to, else throws what went wrong (a socket error as
    /// `SystemCallError`, a TLS error as `TLSError`).
    private func settle(_ outcome: Outcome, _ operation: String, timeout: UInt64) throws {
        let deadline = timeout == 0 ? UInt64.max : monotonicNanoseconds() &+ timeout
        switch outcome.code {
        case SSL_ERROR_WANT_READ:
            try Self.wait(tcp.fd, for: POLLIN, until: deadline, operation)
        case SSL_ERROR_WANT_WRITE:
            try Self.wait(tcp.fd, for: POLLOUT, until: deadline, operation)
        case SSL_ERROR_SYSCALL where outcome.errno != 0:
            throw SystemCallError(operation, Errno(outcome.errno))
        case SSL_ERROR_SYSCALL, SSL_ERROR_ZERO_RETURN:
            throw SystemCallError(operation, Errno(EPIPE))
        default:
            // In TLS 1.3 the server checks the client's certificate after the
            // client's handshake is done: its refusal arrives here, as an alert.
            let reasons = outcome.reasons.isEmpty ? "error \(outcome.code)" : TLSContext.explain(outcome.reasons, side: side)
            throw TLSError("TLS \(operation) failed: \(reasons)")
        }
    }

    /// Waits until `fd` is ready for `events` or `deadline` (monotonic ns)
    /// passes, which throws EAGAIN like a socket timeout.
    static func wait(_ fd: Int32, for events: Int32, until deadline: UInt64, _ operation: String) throws(SystemCallError) {
        var waiter = pollfd(fd: fd, events: Int16(events), revents: 0)
        while true {
            let now = monotonicNanoseconds()
            guard now < deadline else { throw SystemCallError(operation, .again) }
            let left = deadline == UInt64.max ? -1 : Int32(min((deadline - now + 999_999) / 1_000_000, UInt64(Int32.max)))
            let ready = poll(&waiter, 1, left)
            if ready > 0 { return }
            if ready < 0 && errno != EINTR { throw SystemCallError("poll for \(operation)", Errno.current) }
        }
    }

    public func setReceiveTimeout(_ nanoseconds: UInt64?) throws {
        receiveTimeout.store(nanoseconds ?? 0, ordering: .relaxed)
    }

    public func setSendTimeout(_ nanoseconds: UInt64?) throws {
        sendTimeout.store(nanoseconds ?? 0, ordering: .relaxed)
    }

    public var peerEndpoint: SocketEndpoint? { tcp.peerEndpoint }

    public func shutdown() { tcp.shutdown() }

    public func shutdownSending() { tcp.shutdownSending() }
}
