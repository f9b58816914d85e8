import Foundation
import Glibc
import PostcopyCore
import PostcopyMigration
import PostcopyOS
import Testing

/// A postcopyd restarted to take a migration over (`postcopyd serve
/// --takeover`), as a process of its own: once it, the in-process guest and
/// the agent are done, its summary and the guest's, and its log. Its stderr goes to
/// `postcopyd2.err` in `directory`; a failure shows it.
enum RestartedDaemon {
    /// The first postcopyd, as a process: started with `arguments` plus a
    /// ready file in `directory`, its stderr in `postcopyd1.err`; returns it
    /// and the endpoint it listens on, once it does.
    static func startFirst(_ arguments: [String], directory: String) throws -> (Process, endpoint: String) {
        let first = try Program.spawn("postcopyd", arguments + ["--ready-file", directory + "/ready"],
                                      stderr: directory + "/postcopyd1.err")
        var endpoint = ""
        for _ in 0..<3000 where endpoint.isEmpty {
            endpoint = (readTextFile(directory + "/ready") ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            if endpoint.isEmpty { usleep(10_000) }
        }
        if endpoint.isEmpty { kill(first.processIdentifier, SIGKILL) }
        try #require(!endpoint.isEmpty, "postcopyd never became ready:\n\(readTextFile(directory + "/postcopyd1.err") ?? "")")
        return (first, endpoint)
    }

    static func takeOver(arguments: [String], directory: String, guestRun: Background<GuestSummary>,
                         agent: Process) throws -> (daemon: DestinationSummary, guest: GuestSummary, log: String) {
        let second = Process()
        second.executableURL = URL(fileURLWithPath: Program.path("postcopyd"))
        second.arguments = arguments + ["--takeover"]
        let stdout = Pipe()
        second.standardOutput = stdout
        _ = FileManager.default.createFile(atPath: directory + "/postcopyd2.err", contents: nil)
        second.standardError = FileHandle(forWritingAtPath: directory + "/postcopyd2.err")
        try second.run()
        defer { if second.isRunning { kill(second.processIdentifier, SIGKILL) } }
        let summaryJSON = stdout.fileHandleForReading.readDataToEndOfFile()
        let guestResult = guestRun.wait("the guest")
        second.waitUntilExit()
        agent.waitUntilExit()
        let log = readTextFile(directory + "/postcopyd2.err") ?? ""
        try #require(second.terminationStatus == 0, "the restarted postcopyd failed:\n\(log)")
        #expect(agent.terminationStatus == 0, "the agent failed:\n\(readTextFile(directory + "/push.err") ?? "")")
        return (try JSONDecoder().decode(DestinationSummary.self, from: summaryJSON), try guestResult.get(), log)
    }
}
