import Glibc
import PostcopyCore
import PostcopyFuzz

// postcopy-fuzz: the fuzz targets of PostcopyFuzz as a program.
//
// Built normally it writes the seed corpus and reruns inputs:
//
//     postcopy-fuzz list                      the targets
//     postcopy-fuzz seed DIR                  DIR/<target>/<name> for every seed
//     postcopy-fuzz run TARGET FILE...        each file through TARGET
//
// Built with `-sanitize=fuzzer,address -parse-as-library -DLIBFUZZER`
// (scripts/fuzz.sh), it is libFuzzer with a target chosen first:
//
//     postcopy-fuzz TARGET [libFuzzer options] [CORPUS_DIR...|FILE...]

#if LIBFUZZER

/// The target libFuzzer's callback runs; chosen once, before fuzzing starts.
nonisolated(unsafe) private var selectedTarget = FuzzTarget.frames

@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt
) -> CInt

/// The program's entry: SwiftPM links an executable to call `<module>_main`.
@_cdecl("postcopy_fuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    guard argc >= 2, let argv, let name = argv[1].map({ String(cString: $0) }) else {
        printError("usage: postcopy-fuzz TARGET [libFuzzer options] [corpus...]; targets: \(targetNames)")
        return 2
    }
    if name == "list" {
        for target in FuzzTarget.allCases { print("\(target.rawValue)\t\(target.summary)") }
        return 0
    }
    guard let target = FuzzTarget(rawValue: name) else {
        printError("postcopy-fuzz: unknown target '\(name)'; targets: \(targetNames)")
        return 2
    }
    selectedTarget = target
    // libFuzzer reads its own options from argv: drop the target name.
    for index in 1..<Int(argc) { argv[index] = argv[index + 1] }
    var count = argc - 1
    var arguments: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = argv
    return LLVMFuzzerRunDriver(&count, &arguments, fuzzOneInput)
}

/// libFuzzer's callback: one input through the selected target. It also
/// bears the name libFuzzer's own `main` (which `-sanitize=fuzzer` links
/// in, though `postcopy_fuzz_main` is the entry) needs to link.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    selectedTarget.run(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

#else

@main
struct PostcopyFuzzMain {
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        switch (arguments.first, arguments.count) {
        case ("list", 1):
            for target in FuzzTarget.allCases { print("\(target.rawValue)\t\(target.summary)") }
        case ("seed", 2):
            exit(writeSeeds(to: arguments[1]))
        case ("run", 3...):
            guard let target = FuzzTarget(rawValue: arguments[1]) else {
                printError("postcopy-fuzz: unknown target '\(arguments[1])'; targets: \(targetNames)")
                exit(2)
            }
            exit(run(target, files: Array(arguments.dropFirst(2))))
        default:
            printError("""
                usage: postcopy-fuzz list
                       postcopy-fuzz seed DIR
                       postcopy-fuzz run TARGET FILE...
                targets: \(targetNames)
                """)
            exit(2)
        }
    }

    /// Writes every target's seeds to DIR/<target>/<name>.
    static func writeSeeds(to directory: String) -> Int32 {
        do {
            for (target, seeds) in FuzzTarget.seeds().sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
                let targetDirectory = directory + "/" + target.rawValue
                try makeDirectories(targetDirectory)
                for seed in seeds { try writeFile(targetDirectory + "/" + seed.name, seed.bytes) }
                print("\(target.rawValue): \(seeds.count) seeds in \(targetDirectory)")
            }
            return 0
        } catch {
            printError("postcopy-fuzz seed: \(error)")
            return 1
        }
    }

    /// Runs each file through `target`; a fault stops the program there.
    static func run(_ target: FuzzTarget, files: [String]) -> Int32 {
        for file in files {
            do {
                let bytes = try readFile(file)
                target.run(bytes)
                print("\(target.rawValue) \(file): ok (\(bytes.count) bytes)")
            } catch {
                printError("postcopy-fuzz run: \(error)")
                return 1
            }
        }
        return 0
    }
}

#endif

private var targetNames: String { FuzzTarget.allCases.map(\.rawValue).joined(separator: ", ") }
