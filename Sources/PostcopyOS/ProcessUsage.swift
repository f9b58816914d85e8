import Glibc
import PostcopyCore

/// What this process has used so far: CPU time (getrusage) and memory
/// (/proc/self/status).
public enum ProcessUsage {
    /// User + system CPU seconds of all threads.
    public static func cpuSeconds() -> Double {
        var usage = rusage()
        guard getrusage(Int32(RUSAGE_SELF.rawValue), &usage) == 0 else { return 0 }
        func seconds(_ time: timeval) -> Double { Double(time.tv_sec) + Double(time.tv_usec) / 1e6 }
        return seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }

    public static func memory() -> ProcessMemory? {
        readTextFile("/proc/self/status").flatMap { ProcessMemory(status: $0) }
    }
}
