import Glibc
import Logging
import PostcopyCore
import PostcopyOS

/// Where log records go.
public enum LogSink: String, CaseIterable, Sendable {
    /// The journal when stderr is connected to it (run by systemd), else stderr.
    case auto
    /// journald's native socket, with every field structured.
    case journal
    /// Text lines on stderr.
    case stderr

    /// `auto` decided for this process.
    public var resolved: LogSink {
        guard self == .auto else { return self }
        return Journal.isStandardErrorJournal ? .journal : .stderr
    }
}

/// A swift-log handler for the journal and for stderr.
///
/// To the journal, a record is MESSAGE, PRIORITY, SYSLOG_IDENTIFIER,
/// CODE_FILE/CODE_LINE/CODE_FUNC, the process's `LogContext` fields
/// (MIGRATION_ID, PHASE, ...), and each metadata key as a field of its own
/// in upper case ("pages_stale" → PAGES_STALE; "message_id" → MESSAGE_ID).
/// On stderr it is one line: time, level, label, message, metadata.
public struct PostcopyLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .info
    private let label: String
    private let sink: LogSink
    private let context: LogContext?

    public init(label: String, sink: LogSink, context: LogContext? = nil) {
        self.label = label
        self.sink = sink.resolved
        self.context = context
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let (level, message, file, function, line) = (event.level, event.message, event.file, event.function, event.line)
        let merged = event.metadata.map { metadata.merging($0) { $1 } } ?? metadata
        if sink == .journal {
            var fields: [(name: String, value: String)] = [
                ("MESSAGE", message.description),
                ("PRIORITY", String(Self.priority(level).rawValue)),
                ("SYSLOG_IDENTIFIER", label),
                ("CODE_FILE", file), ("CODE_LINE", String(line)), ("CODE_FUNC", function),
            ]
            fields += context?.snapshot ?? []
            for (key, value) in merged.sorted(by: { $0.key < $1.key }) {
                guard let name = JournalField.name(forMetadataKey: key) else { continue }
                if name == "MESSAGE_ID" || !JournalField.reserved.contains(name) {
                    fields.append((name, value.description))
                }
            }
            if Journal.send(fields) >= 0 { return }
            // journald is gone: the record still reaches stderr below.
        }
        let details = merged.sorted { $0.key < $1.key }
            .filter { $0.key != "message_id" }
            .map { "\($0.key)=\($0.value)" }
        let suffix = details.isEmpty ? "" : " [" + details.joined(separator: " ") + "]"
        writeStandardError("\(Self.timestamp()) \(level) \(label): \(message)\(suffix)\n")
    }

    static func priority(_ level: Logger.Level) -> SyslogPriority {
        switch level {
        case .trace, .debug: .debug
        case .info: .info
        case .notice: .notice
        case .warning: .warning
        case .error: .error
        case .critical: .critical
        }
    }

    /// "2026-11-22T10:04:05.123Z"
    static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var parts = tm()
        var seconds = now.tv_sec
        gmtime_r(&seconds, &parts)
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        let millis = now.tv_nsec / 1_000_000
        let fraction = millis < 10 ? "00\(millis)" : millis < 100 ? "0\(millis)" : "\(millis)"
        return "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T"
            + "\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)).\(fraction)Z"
    }
}
