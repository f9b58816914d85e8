import ArgumentParser
import Logging
import PostcopyOS

/// The TLS options both ends of a migration share, and the explicit
/// opt-out. The name the peer's certificate must carry is each side's own
/// option (`--tls-client-name` on postcopyd, `--tls-server-name` on the agent).
public struct TransportOptions: ParsableArguments {
    @Option(help: ArgumentHelp("PEM file: the certificate authority the peer's certificate must chain to.", valueName: "path"))
    public var tlsCa: String?

    @Option(help: ArgumentHelp("PEM file: this side's certificate.", valueName: "path"))
    public var tlsCert: String?

    @Option(help: ArgumentHelp("PEM file: this side's private key.", valueName: "path"))
    public var tlsKey: String?

    @Flag(help: "Carry guest RAM without TLS and without authenticating the peer: only for tests on a trusted loopback. Logs a warning.")
    public var insecurePlaintext = false

    public init() {}

    /// What `--tls-*` and `--insecure-plaintext` ask for: TLS for `side`,
    /// insisting on a peer certificate that names `peerName`, or plaintext
    /// (with a warning). Neither, or both, is an error saying what to give.
    public func transport(_ side: TLSContext.Side, peerName: String?, peerNameOption: String,
                          logger: Logger) throws -> TransportSecurity {
        let files = [tlsCa, tlsCert, tlsKey]
        if insecurePlaintext {
            // The agent's server name defaults to its --to host, so only
            // postcopyd's client name is a contradiction here.
            guard files.allSatisfy({ $0 == nil }), side == .client || peerName == nil else {
                throw ValidationError("--insecure-plaintext turns TLS off: give it without --tls-ca, --tls-cert, --tls-key and \(peerNameOption)")
            }
            logger.warning("--insecure-plaintext: guest RAM crosses the network unencrypted, and the peer is not authenticated; use it only on a trusted loopback")
            return .plaintext
        }
        guard let ca = tlsCa, let certificate = tlsCert, let key = tlsKey else {
            throw ValidationError("the agent's connections need TLS: give --tls-ca, --tls-cert and --tls-key\(side == .server ? " and \(peerNameOption)" : ""), or --insecure-plaintext for a test on a trusted loopback")
        }
        guard let peerName, !peerName.isEmpty else {
            throw ValidationError("TLS needs \(peerNameOption): the identity the peer's certificate must name")
        }
        let configuration = TLSConfiguration(caFile: ca, certificateFile: certificate, privateKeyFile: key, peerName: peerName)
        do {
            return .tls(try TLSContext(side, configuration))
        } catch {
            throw ValidationError("TLS: \(error)")
        }
    }
}
