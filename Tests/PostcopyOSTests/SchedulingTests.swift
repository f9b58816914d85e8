import Glibc
import PostcopyOS
import Synchronization
import Testing
import PostcopyCore

/// The background stream's thread moves to a lower scheduling class, as the
/// kernel reports it back, and only that thread does.
@Suite struct SchedulingTests {
    struct Observed: Equatable {
        let policy: Int32
        let nice: Int32
    }

    func observe(_ schedulingClass: OSThread.SchedulingClass) throws -> (thread: Observed, caller: Observed) {
        let seen = Locked<Result<Observed, SystemCallError>?>(nil)
        let thread = try OSThread.start(name: "sched-test") {
            do throws(SystemCallError) {
                try OSThread.setCurrentScheduling(schedulingClass)
                errno = 0
                let nice = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0)
                seen.withLock { $0 = .success(Observed(policy: sched_getscheduler(0), nice: nice)) }
            } catch {
                seen.withLock { $0 = .failure(error) }
            }
        }
        thread.join()
        let caller = Observed(policy: sched_getscheduler(0), nice: getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0))
        return (try seen.withLock { $0! }.get(), caller)
    }

    @Test func idleIsSchedIdle() throws {
        let (thread, caller) = try observe(.idle)
        #expect(thread.policy == 5, "SCHED_IDLE is 5")
        #expect(caller.policy == 0, "the calling thread stays SCHED_OTHER")
    }

    @Test func niceRaisesOnlyThatThreadsNice() throws {
        let (thread, caller) = try observe(.background(nice: 10))
        #expect(thread == Observed(policy: 0, nice: 10))
        #expect(caller.nice == 0)
    }

    @Test func descriptionsParseBack() {
        #expect(OSThread.SchedulingClass.idle.description == "idle")
        #expect(OSThread.SchedulingClass.background(nice: 7).description == "nice:7")
        #expect(OSThread.SchedulingClass.normal.description == "normal")
    }
}
