import PostcopyCore

/// The C baselines, run in the same session as the benchmarks they frame.
struct Baselines {
    let environment: BenchEnvironment

    /// benchmarks/baseline/tcp-pingpong: request / `responseBytes` response
    /// over loopback TCP, µs.
    func pingPong(responseBytes: UInt64, iterations: Int) throws -> Distribution {
        let output = try runToEnd("tcp-pingpong-\(responseBytes)", environment.baseline("tcp-pingpong"),
                                  ["\(responseBytes)", "\(iterations)"], in: environment.workDirectory, seconds: 300)
        let values = keyValues(output)
        func micros(_ key: String) throws -> Double {
            guard let value = values[key].flatMap(Double.init) else {
                throw BenchmarkError("tcp-pingpong printed no \(key): \(output)")
            }
            return value / 1000
        }
        return Distribution(count: iterations, p50: try micros("p50_ns"), p99: try micros("p99_ns"),
                            p999: try micros("p999_ns"), max: try micros("max_ns"), mean: try micros("mean_ns"))
    }

    /// The median of `runs` ping-pong runs, figure by figure.
    func pingPong(responseBytes: UInt64, iterations: Int, runs: Int) throws -> Distribution {
        try Distribution.medianOf((0..<runs).map { _ in try pingPong(responseBytes: responseBytes, iterations: iterations) })!
    }

    /// benchmarks/baseline/tcp-stream: `bytes` into a shared mapping by raw
    /// loopback TCP and by memcpy, GiB/s (medians of its own 3 runs).
    func stream(bytes: UInt64, memory: MemoryKind) throws -> (tcp: Double, memcpy: Double) {
        let output = try runToEnd("tcp-stream", environment.baseline("tcp-stream"),
                                  ["\(bytes)", memory == .shmem ? "shmem" : "hugetlb"], in: environment.workDirectory,
                                  seconds: 300)
        let values = keyValues(output)
        guard let tcp = values["tcp_gib_per_s"].flatMap(Double.init),
              let memcpy = values["memcpy_gib_per_s"].flatMap(Double.init) else {
            throw BenchmarkError("tcp-stream printed no throughput: \(output)")
        }
        return (tcp, memcpy)
    }
}
