// swift-tools-version:6.0
//
// postcopyd — destination-side postcopy for VM live migration on Linux,
// built on userfaultfd minor mode.
//
// Layers (each depends only on those above it):
//   CPostcopy      C shims: variadic syscall/ioctl, uapi constants and structs.
//   CSystemd       libsystemd, found through pkg-config.
//   COpenSSL       OpenSSL's libssl (TLS 1.3 for the agent's connections),
//                  found through pkg-config.
//   CCRC32C        the CPU's CRC-32C instruction (pure computation).
//   swift-crypto   SHA-256 for PostcopyCore (BoringSSL's: pure computation).
//   PostcopyCore   pure logic: page geometry, bitmaps, fault policy, probe
//                  evaluation. No syscalls; tests run without root.
//   PostcopyOS     one Swift method per kernel operation (Userfaultfd,
//                  GuestMemory), the fault-resolution thread, the probe.
//   PostcopyMigration  the two roles of a migration on a host, built from
//                  the layers above: the destination daemon and the source
//                  agent.
//   PostcopyHarness    what tests, benchmarks and demos run against them and
//                  production never links: the reference guest (a VMM
//                  stand-in) and the source workload (postcopy-guest).
//   PostcopyBench  the benchmarks of `make bench`: scenarios run as processes,
//                  baselines, the report and its plots.
//   executables    parse arguments and wire the layers together.
import PackageDescription

let package = Package(
    name: "postcopyd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "postcopyd", targets: ["postcopyd"]),
        .executable(name: "postcopy-push", targets: ["postcopy-push"]),
        .executable(name: "postcopy-guest", targets: ["postcopy-guest"]),
        .executable(name: "postcopy-bench", targets: ["postcopy-bench"]),
        .executable(name: "postcopyctl", targets: ["postcopyctl"]),
        .executable(name: "postcopy-fuzz", targets: ["postcopy-fuzz"]),
        .library(name: "PostcopyCore", targets: ["PostcopyCore"]),
        .library(name: "PostcopyOS", targets: ["PostcopyOS"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
    ],
    targets: [
        .target(
            name: "CPostcopy",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        .systemLibrary(
            name: "CSystemd",
            pkgConfig: "libsystemd",
            providers: [.apt(["libsystemd-dev"])]
        ),
        .systemLibrary(
            name: "COpenSSL",
            pkgConfig: "openssl",
            providers: [.apt(["libssl-dev"])]
        ),
        .target(name: "CCRC32C"),
        .target(name: "PostcopyCore", dependencies: ["CCRC32C", .product(name: "Crypto", package: "swift-crypto")]),
        .target(
            name: "PostcopyOS",
            dependencies: ["PostcopyCore", "CPostcopy", "CSystemd", "COpenSSL"]
        ),
        .target(
            name: "PostcopyMigration",
            dependencies: [
                "PostcopyCore", "PostcopyOS",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "PostcopyHarness",
            dependencies: [
                "PostcopyCore", "PostcopyOS", "PostcopyMigration",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "PostcopyCLI",
            dependencies: [
                "PostcopyCore", "PostcopyOS", "PostcopyMigration",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "postcopyd",
            dependencies: [
                "PostcopyCore", "PostcopyOS", "PostcopyMigration", "PostcopyCLI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "postcopy-push",
            dependencies: [
                "PostcopyCore", "PostcopyOS", "PostcopyMigration", "PostcopyCLI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "postcopy-guest",
            dependencies: [
                "PostcopyCore", "PostcopyOS", "PostcopyMigration", "PostcopyHarness", "PostcopyCLI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "postcopyctl",
            dependencies: [
                "PostcopyCore", "PostcopyOS", "PostcopyCLI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .target(
            name: "PostcopyBench",
            dependencies: ["PostcopyCore", "PostcopyOS"]
        ),
        .executableTarget(
            name: "postcopy-bench",
            dependencies: [
                "PostcopyCore", "PostcopyOS", "PostcopyCLI", "PostcopyBench",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Fuzzing (docs/fuzzing.md): the targets, the program that runs them
        // (libFuzzer when built with -DLIBFUZZER by scripts/fuzz.sh), and the
        // corpus and regressions run as tests.
        .target(name: "PostcopyFuzz", dependencies: ["PostcopyCore"]),
        .executableTarget(name: "postcopy-fuzz", dependencies: ["PostcopyFuzz", "PostcopyCore"]),
        .testTarget(name: "PostcopyFuzzTests", dependencies: ["PostcopyFuzz", "PostcopyCore"]),
        .testTarget(name: "PostcopyCoreTests", dependencies: ["PostcopyCore", "PostcopyOS"]),
        .testTarget(name: "PostcopyOSTests", dependencies: ["PostcopyCore", "PostcopyOS"]),
        .testTarget(name: "PostcopyBenchTests", dependencies: ["PostcopyBench", "PostcopyCore", "PostcopyOS"]),
        .testTarget(
            name: "PostcopyMigrationTests",
            dependencies: [
                "PostcopyCore", "PostcopyOS", "PostcopyMigration", "PostcopyHarness",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
