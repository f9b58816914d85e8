/// One message on the unix socket between postcopyd and the VMM: a frame's
/// type (VMM_*, ERROR, HEARTBEAT) and its decoded payload. Five of them
/// travel with a file descriptor (`MessageType.carriesFileDescriptor`).
/// Which may come next, from which side, is `VMMHandshake`'s to say.
public enum VMMMessage: WireMessage, Equatable {
    /// Daemon → VMM, with the RAM file's descriptor.
    case offer(regionSize: UInt64, pageSize: PageSize, fileOffset: UInt64)
    /// VMM → daemon, with the userfaultfd's descriptor. `registerMode` is the
    /// `UFFDIO_REGISTER_MODE_*` word the VMM registered the range with.
    case attach(guestBase: UInt64, features: UffdFeatures, registerMode: UInt64)
    /// Daemon → VMM, with the page-state file's descriptor, which the VMM
    /// keeps for a restarted postcopyd: run the guest (or, answering
    /// VMM_REATTACH, go on running it).
    case resume
    /// VMM → daemon, the answer to VMM_RESUME (no descriptor): the VMM keeps
    /// the page-state file and the range registered, and runs the guest (or
    /// starts it once its device state is loaded).
    case resumed
    /// Daemon → VMM, with `imageDigest`: every page is in place, and this is
    /// the source's digest of the image (IMAGE_DIGEST), which a verifying
    /// VMM can check. The VMM unregisters the range and answers with an
    /// empty VMM_COMPLETE (`imageDigest` nil), after which the daemon stops
    /// serving. The payload's length (32 or 0) tells the two apart.
    case complete(imageDigest: ImageDigest?)
    /// VMM → a restarted daemon, with a descriptor the VMM kept for it:
    /// the RAM file of VMM_OFFER, or the page-state file of VMM_RESUME.
    case handback(HandbackKind)
    /// VMM → a restarted daemon, after both VMM_HANDBACKs, with the
    /// userfaultfd: the fields are those of the VMM's first VMM_ATTACH.
    case reattach(guestBase: UInt64, features: UffdFeatures, registerMode: UInt64)
    /// Either way: the sender closes the socket, for this reason.
    case error(code: ErrorCode, message: String)
    /// Either way, at any time: nothing but "still here".
    case heartbeat

    public static var socket: WireSocket { .vmm }
    /// Its largest frame is an ERROR of 1026 bytes.
    public static var maxPayload: Int { 4096 }

    public var type: MessageType {
        switch self {
        case .offer: return .vmmOffer
        case .attach: return .vmmAttach
        case .resume: return .vmmResume
        case .resumed: return .vmmResumed
        case .complete: return .vmmComplete
        case .handback: return .vmmHandback
        case .reattach: return .vmmReattach
        case .error: return .error
        case .heartbeat: return .heartbeat
        }
    }

    public func appendPayload(to out: inout [UInt8]) {
        switch self {
        case let .offer(regionSize, pageSize, fileOffset):
            out.appendLittleEndian(regionSize)
            out.appendLittleEndian(UInt32(pageSize.bytes))
            out.appendLittleEndian(fileOffset)
        case let .attach(guestBase, features, registerMode), let .reattach(guestBase, features, registerMode):
            out.appendLittleEndian(guestBase)
            out.appendLittleEndian(features.rawValue)
            out.appendLittleEndian(registerMode)
        case let .complete(digest?):
            out.append(contentsOf: digest.bytes)
        case let .handback(kind):
            out.appendLittleEndian(kind.rawValue)
        case let .error(code, message):
            appendErrorPayload(code, message, to: &out)
        case .resume, .resumed, .complete(nil), .heartbeat:
            return
        }
    }

    /// Decodes the payload of a frame of `type`, whose checksum has been
    /// checked; refuses an agent connection's type, a length that does not
    /// fit the type, and values the protocol does not define.
    public static func decode(type: MessageType, payload: ArraySlice<UInt8>) throws(ProtocolError) -> VMMMessage {
        guard type.socket.admits(.vmm) else { throw .wrongSocket(type: type, received: .vmm) }
        guard type.allowedPayloadLength.admits(payload.count) else {
            throw .payloadLength(type: type, actual: payload.count, expected: type.allowedPayloadLength)
        }
        func u32(_ offset: Int) -> UInt32 { payload.loadLittleEndian(at: offset) }
        func u64(_ offset: Int) -> UInt64 { payload.loadLittleEndian(at: offset) }

        switch type {
        case .vmmOffer:
            let raw = u32(8)
            guard let pageSize = PageSize(bytes: UInt64(raw)) else { throw .unsupportedPageSize(type: type, bytes: raw) }
            return .offer(regionSize: u64(0), pageSize: pageSize, fileOffset: u64(12))
        case .vmmAttach:
            return .attach(guestBase: u64(0), features: UffdFeatures(rawValue: u64(8)), registerMode: u64(16))
        case .vmmReattach:
            return .reattach(guestBase: u64(0), features: UffdFeatures(rawValue: u64(8)), registerMode: u64(16))
        case .vmmResume:
            return .resume
        case .vmmResumed:
            return .resumed
        case .vmmComplete:
            // The length rule leaves 0 bytes (the VMM's answer) or the 32 of the digest.
            let start = payload.startIndex
            return .complete(imageDigest: payload.isEmpty ? nil : ImageDigest(bytes: Array(payload[start..<(start + 32)]))!)
        case .vmmHandback:
            guard let kind = HandbackKind(rawValue: u32(0)) else {
                throw .invalidField(type: type, field: "kind", value: UInt64(u32(0)))
            }
            return .handback(kind)
        case .error:
            let (code, text) = try decodeErrorPayload(payload)
            return .error(code: code, message: text)
        case .heartbeat:
            return .heartbeat
        default:
            throw .wrongSocket(type: type, received: .vmm)
        }
    }
}

extension VMMMessage: CustomStringConvertible {
    /// One line for logs: the type and its fields.
    public var description: String {
        switch self {
        case let .offer(regionSize, pageSize, fileOffset):
            return "VMM_OFFER region \(regionSize) bytes page size \(pageSize) file offset \(fileOffset)"
        case let .attach(guestBase, features, registerMode):
            return "VMM_ATTACH guest base \(hex64(guestBase)) features \(features) mode \(hex64(registerMode))"
        case let .reattach(guestBase, features, registerMode):
            return "VMM_REATTACH guest base \(hex64(guestBase)) features \(features) mode \(hex64(registerMode))"
        case let .handback(kind):
            return "VMM_HANDBACK \(kind)"
        case let .complete(imageDigest?):
            return "VMM_COMPLETE digest \(imageDigest)"
        case let .error(code, message):
            return "ERROR \(code): \(message)"
        case .resume, .resumed, .complete(nil), .heartbeat:
            return type.description
        }
    }
}

/// What a VMM_HANDBACK gives back.
public enum HandbackKind: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// The guest RAM file VMM_OFFER passed.
    case ram = 1
    /// The page-state file VMM_RESUME passed.
    case pageState = 2

    public var description: String { self == .ram ? "guest RAM file" : "page-state file" }
}
