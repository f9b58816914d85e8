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

    /// benchmarks/baseline/precopy-stream: `bytes` over loopback TCP or TLS
    /// 1.3 into a fresh shmem memfd, pwrite(2) chunk by chunk as the daemon's
    /// precopy receiver writes; one run (the memfd must be fresh each time).
    func precopyStream(bytes: UInt64, transport: PrecopyTransport) throws -> PrecopyStreamRun {
        let name = "precopy-stream-\(bytes >> 20)M-\(transport.streamMode)"
        let output = try runToEnd(name, environment.baseline("precopy-stream"),
                                  ["\(bytes)", transport.streamMode, "shmem"], in: environment.workDirectory, seconds: 900)
        let run = try PrecopyStreamRun(output: output)
        guard run.bytes == bytes, run.mode == transport.streamMode else {
            throw BenchmarkError("precopy-stream ran \(run.bytes) bytes over \(run.mode), not \(bytes) over \(transport.streamMode)")
        }
        return run
    }
}

/// What one precopy-stream run printed.
struct PrecopyStreamRun: Equatable, Sendable {
    let bytes: UInt64
    /// "tcp" or "tls".
    let mode: String
    let seconds: Double
    /// bytes / seconds, MiB = 2^20.
    let mibPerSecond: Double
    /// The receiver's own CPU time (user + system) per GiB received.
    let receiverCPUSecondsPerGiB: Double
}

extension PrecopyStreamRun {
    /// From its `key=value` lines; throws naming the first key missing or unreadable.
    init(output: String) throws {
        let values = keyValues(output)
        func value<T: LosslessStringConvertible>(_ key: String, as _: T.Type) throws -> T {
            guard let text = values[key] else {
                throw BenchmarkError("precopy-stream printed no \(key)=: \(output.isEmpty ? "(nothing)" : output)")
            }
            guard let value = T(text) else { throw BenchmarkError("precopy-stream printed \(key)=\(text), not a number") }
            return value
        }
        guard let mode = values["mode"] else {
            throw BenchmarkError("precopy-stream printed no mode=: \(output.isEmpty ? "(nothing)" : output)")
        }
        self.init(bytes: try value("bytes", as: UInt64.self), mode: mode, seconds: try value("seconds", as: Double.self),
                  mibPerSecond: try value("mib_per_s", as: Double.self),
                  receiverCPUSecondsPerGiB: try value("receiver_cpu_s_per_gib", as: Double.self))
    }
}
