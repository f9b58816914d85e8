import PostcopyCore

/// The fuzz targets: each feeds one input to a group of PostcopyCore's
/// decoders and checks what they make of it. A target returns normally for
/// any input it does not find a fault with (including every input the
/// decoders rightly refuse); a fault stops the process, by a trap in the
/// code under test or by a broken property (`require`).
///
/// libFuzzer runs them through `postcopy-fuzz` built with `-DLIBFUZZER`;
/// the test suite runs the checked-in corpus and regressions through them.
/// docs/fuzzing.md describes each input format.
public enum FuzzTarget: String, CaseIterable, Sendable {
    /// The wire decoder on an arbitrary byte stream, in one piece and in chunks.
    case frames
    /// The daemon's protocol state machine, fed by agent connections.
    case handshake
    /// Dirty bitmaps on the wire, dirty logs and the page-state record.
    case bitmap
    /// The settings file, sizes, migration ids and control requests.
    case config

    /// One line on what the target covers.
    public var summary: String {
        switch self {
        case .frames: return "FrameDecoder and Message decode/encode on a byte stream (agent and VMM limits)"
        case .handshake: return "DestinationSession driven by agent connections: hello, receive, lost, complete"
        case .bitmap: return "DIRTY_BITMAP split and reassembly, dirty logs, the page-state record"
        case .config: return "ConfigFile, ByteSize.parse, MigrationID/ImageDigest hex, ControlRequest"
        }
    }

    /// Runs one input through the target.
    public func run(_ bytes: UnsafeRawBufferPointer) {
        var input = FuzzInput(Array(bytes))
        switch self {
        case .frames: FrameFuzzer.run(&input)
        case .handshake: HandshakeFuzzer.run(&input)
        case .bitmap: BitmapFuzzer.run(&input)
        case .config: ConfigFuzzer.run(&input)
        }
    }

    /// Runs one input through the target.
    public func run(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { run($0) }
    }

    /// Valid inputs for every target, built with the real encoders, so that
    /// the corpus follows the protocol when it changes: `postcopy-fuzz seed`
    /// writes them to fuzz/corpus/<target>/<name>.
    public static func seeds() -> [FuzzTarget: [(name: String, bytes: [UInt8])]] {
        Dictionary(uniqueKeysWithValues: allCases.map { target in
            switch target {
            case .frames: return (target, FrameFuzzer.seeds())
            case .handshake: return (target, HandshakeFuzzer.seeds())
            case .bitmap: return (target, BitmapFuzzer.seeds())
            case .config: return (target, ConfigFuzzer.seeds())
            }
        })
    }
}
