import PostcopyCore
import Testing

@Suite struct TaskStateTests {
    /// A stat line as the kernel writes it, with the fields after the state elided.
    func line(pid: Int = 4242, comm: String = "qemu-system-x86", state: String) -> String {
        "\(pid) (\(comm)) \(state) 1 4242 4242 0 -1 4194560 1234 0 0 0 10 5 0 0 20 0 3 0 100 0 0\n"
    }

    @Test func everyStateLetter() {
        #expect(TaskState(statLine: line(state: "R")) == .running)
        #expect(TaskState(statLine: line(state: "S")) == .sleeping)
        #expect(TaskState(statLine: line(state: "D")) == .diskSleep)
        #expect(TaskState(statLine: line(state: "T")) == .stopped)
        #expect(TaskState(statLine: line(state: "t")) == .tracingStop)
        #expect(TaskState(statLine: line(state: "Z")) == .zombie)
        #expect(TaskState(statLine: line(state: "X")) == .dead)
        #expect(TaskState(statLine: line(state: "I")) == .other("I"))
        #expect(TaskState(statLine: line(state: "P")) == .other("P"))
    }

    @Test func haltedStates() {
        #expect(TaskState.stopped.isHalted && TaskState.tracingStop.isHalted)
        #expect(TaskState.zombie.isHalted && TaskState.dead.isHalted)
        #expect(!TaskState.running.isHalted && !TaskState.sleeping.isHalted && !TaskState.diskSleep.isHalted)
        #expect(!TaskState.other("I").isHalted)
    }

    @Test func commWithSpacesAndParentheses() {
        #expect(TaskState(statLine: line(comm: "Web Content", state: "S")) == .sleeping)
        #expect(TaskState(statLine: line(comm: "a) R (b", state: "T")) == .stopped)
        #expect(TaskState(statLine: line(comm: ") Z ) Z", state: "R")) == .running)
        #expect(TaskState(statLine: line(comm: "((", state: "t")) == .tracingStop)
        #expect(TaskState(statLine: line(comm: "", state: "D")) == .diskSleep)
        #expect(TaskState(statLine: line(comm: "tab\there", state: "Z")) == .zombie)
        #expect(TaskState(statLine: "1 (init) S") == .sleeping)
    }

    @Test func garbageIsNotAStatLine() {
        #expect(TaskState(statLine: "") == nil)
        #expect(TaskState(statLine: "\n") == nil)
        #expect(TaskState(statLine: "hello world") == nil)
        #expect(TaskState(statLine: "(bash) S 1 2 3") == nil)           // no pid
        #expect(TaskState(statLine: "12 bash S 1 2 3") == nil)          // no parentheses
        #expect(TaskState(statLine: "12 (bash S 1 2 3") == nil)         // unclosed comm
        #expect(TaskState(statLine: "12 (bash)") == nil)                // no state
        #expect(TaskState(statLine: "12 (bash) ") == nil)
        #expect(TaskState(statLine: "12 (bash)S 1") == nil)             // no separator
        #expect(TaskState(statLine: "12 (bash) 7 1 2") == nil)          // not a letter
        #expect(TaskState(statLine: "12 (bash) Sx 1 2") == nil)         // not a single letter
        #expect(TaskState(statLine: "-12 (bash) S 1") == nil)
    }
}
