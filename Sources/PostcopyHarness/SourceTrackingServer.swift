import Glibc
import Logging
import PostcopyCore
import PostcopyMigration
import PostcopyOS

/// The reference source VMM's end of uffd-wp dirty tracking: it answers
/// each connection to its dirty-log socket with its offer (the tracked
/// mapping, or why there is none) and closes it. Only root and this
/// process's own user may ask; anyone else is refused and logged.
public final class SourceTrackingServer: Sendable {
    private let listener: UnixListener
    private let thread: OSThread

    /// Listens on `path` (mode 0600) and answers with `offer` from a thread
    /// of its own (`guest-dirty-log`) for as long as the object lives.
    public init(path: String, offer: SourceTrackingOffer, logger: Logger) throws {
        let listener = try inStep("listen on the dirty-log socket \(path)") { try UnixListener(path: path) }
        self.listener = listener
        let bytes = offer.encoded
        thread = try OSThread.start(name: "guest-dirty-log") {
            while let connection = try? listener.accept() {
                guard let peer = try? connection.peerCredentials() else { continue }
                guard peer.uid == 0 || peer.uid == geteuid() else {
                    logger.warning("refused a dirty-log request from \(peer): only root and uid \(geteuid()) may ask")
                    continue
                }
                do {
                    try connection.send(bytes)
                    logger.info("told the agent (\(peer)) about write tracking: \(offer)")
                } catch {
                    logger.warning("could not answer the agent (\(peer)) on the dirty-log socket: \(error)")
                }
            }
        }
    }

    deinit {
        _ = shutdown(listener.fd, Int32(SHUT_RDWR))
        thread.join()
    }
}
