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

extension ProcessUsage {
    /// User + system CPU seconds of the calling thread.
    /// Kernel: `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`
    public static func threadCPUSeconds() -> Double {
        var now = timespec()
        guard clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now) == 0 else { return 0 }
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }
}
