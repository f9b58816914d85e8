#!/usr/bin/env bash
# make fuzz: builds postcopy-fuzz with libFuzzer and AddressSanitizer (release,
# in .build-fuzz), then fuzzes each target for FUZZ_SECONDS, one after
# another, on fuzz-results/<target>/corpus: a copy of the seed corpus plus
# whatever earlier runs added to it (rm -rf fuzz-results to start afresh).
# fuzz-results/<target>/ also holds libFuzzer's log and any crash input.
# Exits 1 when a target crashed (or libFuzzer failed), after running them all.
#
# The target `adapter` is the preload adapter's C codec (preload/fuzz/
# codec-fuzz.c), built with the clang beside swift (or CLANG) and
# -fsanitize=fuzzer,address,undefined; its seeds are the `frames` corpus.
# Without a clang that has libFuzzer it fails, saying so; with
# FUZZ_ADAPTER_OPTIONAL=1 (make test) it says so and is skipped instead.
#
#   FUZZ_SECONDS=60 FUZZ_TARGETS="frames config adapter" SWIFT=swift scripts/fuzz.sh
#
# docs/fuzzing.md says what each target covers and how to turn a crash into
# a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."

SWIFT=${SWIFT:-swift}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_TARGETS=${FUZZ_TARGETS:-}
RESULTS=fuzz-results
SCRATCH=.build-fuzz
BIN=$SCRATCH/release/postcopy-fuzz
ADAPTER_BIN=$SCRATCH/adapter-fuzz
# Swift's backtracer off: a trap's stack comes from libFuzzer. The
# backtracer reads memory from a helper thread, which sets off ASan.
export SWIFT_BACKTRACE=${SWIFT_BACKTRACE:-enable=no}

build() {
    echo "fuzz: building postcopy-fuzz with -sanitize=fuzzer,address in $SCRATCH"
    local status=0
    # gold warns once per ASan assembly stub that it cannot export it: noise.
    "$SWIFT" build -c release --scratch-path "$SCRATCH" --product postcopy-fuzz \
        -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library -Xswiftc -DLIBFUZZER \
        2>&1 | { grep -v "Cannot export local symbol" || true; } || status=$?
    [[ $status -eq 0 ]] || { echo "fuzz: build failed" >&2; exit 1; }
}

# The clang that comes with swift (it has libFuzzer), else CLANG, else clang.
find_clang() {
    if [[ -n ${CLANG:-} ]]; then echo "$CLANG"; return; fi
    local swift_path
    swift_path=$(command -v "$SWIFT" 2>/dev/null) || true
    if [[ -n $swift_path && -x $(dirname "$(readlink -f "$swift_path")")/clang ]]; then
        echo "$(dirname "$(readlink -f "$swift_path")")/clang"
    else
        echo clang
    fi
}

ADAPTER_FLAGS=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
    -Wall -Wextra -Werror -I Sources/CPostcopy/include)

# Builds the adapter's target; returns 2 when there is no clang with
# libFuzzer (after saying so), 1 when the target does not compile.
build_adapter() {
    local clang probe
    clang=$(find_clang)
    probe=$(mktemp -d)
    echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }' \
        >"$probe/probe.c"
    if ! "$clang" "${ADAPTER_FLAGS[@]}" -o "$probe/probe" "$probe/probe.c" >"$probe/log" 2>&1; then
        echo "fuzz: adapter: no clang with libFuzzer, ASan and UBSan: '$clang ${ADAPTER_FLAGS[*]}' fails:" >&2
        grep -v "Cannot export local symbol" "$probe/log" | head -n 3 | sed 's/^/    /' >&2
        echo "fuzz: adapter: the Swift toolchain's clang has them; set CLANG=/path/to/clang" >&2
        rm -rf "$probe"
        return 2
    fi
    rm -rf "$probe"
    echo "fuzz: building the adapter's codec target with $clang -fsanitize=fuzzer,address,undefined"
    mkdir -p "$SCRATCH"
    local status=0
    "$clang" "${ADAPTER_FLAGS[@]}" -o "$ADAPTER_BIN" preload/fuzz/codec-fuzz.c 2>&1 \
        | { grep -v "Cannot export local symbol" || true; } || status=$?
    [[ $status -eq 0 && -x $ADAPTER_BIN ]] || { echo "fuzz: adapter: build failed" >&2; return 1; }
}

# Swift symbol names made readable, when the toolchain can.
demangle() {
    "$SWIFT" demangle --simplified 2>/dev/null || cat
}

# The last value libFuzzer's -print_final_stats gave for `name` in `log`.
final_stat() {  # log, name
    sed -n "s/^stat::$2: *//p" "$1" | tail -n 1
}

# Fuzzes one target; prints one line, and the crash report on a crash.
fuzz_target() {  # target
    local target=$1 work=$RESULTS/$1 status=0 seeds=$1 program=("$BIN" "$1")
    if [[ $target == adapter ]]; then
        seeds=frames # the same input layout
        program=("$ADAPTER_BIN")
    fi
    mkdir -p "$work/corpus"
    cp fuzz/corpus/"$seeds"/* "$work/corpus/" 2>/dev/null || true
    # Artifacts newer than this are this run's.
    touch "$work/started"
    local inputs=("$work/corpus")
    # Read-only: libFuzzer runs the regressions first, and adds new finds
    # to the first directory only.
    [[ -d fuzz/regressions/$target ]] && inputs+=("fuzz/regressions/$target")
    "${program[@]}" -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -timeout=25 \
        -artifact_prefix="$work/" -print_final_stats=1 "${inputs[@]}" >"$work/log" 2>&1 || status=$?
    local runs rate artifacts
    runs=$(final_stat "$work/log" number_of_executed_units)
    rate=$(final_stat "$work/log" average_exec_per_sec)
    artifacts=$(find "$work" -maxdepth 1 -type f -newer "$work/started" \( -name 'crash-*' -o -name 'leak-*' \
        -o -name 'timeout-*' -o -name 'oom-*' -o -name 'slow-unit-*' \) | sort)
    if [[ $status -eq 0 && -z $artifacts ]]; then
        printf 'fuzz: %-9s %10s executions in %ss (%s/s), corpus %s inputs, no crash\n' \
            "$target" "${runs:-?}" "$FUZZ_SECONDS" "${rate:-?}" "$(find "$work/corpus" -type f | wc -l)"
        return 0
    fi
    printf 'fuzz: %-9s FAILED (libFuzzer exit %s) after %s executions; log %s\n' \
        "$target" "$status" "${runs:-?}" "$work/log"
    for artifact in $artifacts; do echo "fuzz: $target crash input: $artifact"; done
    grep -E "Fatal error|fuzz property broken|ERROR: AddressSanitizer|ERROR: libFuzzer|runtime error|Swift runtime failure|#[0-9]+ .* in .*(Postcopy|codec-fuzz|vmm-codec)" \
        "$work/log" | head -n 8 | demangle | sed 's/^/    /'
    return 1
}

# The Swift targets need postcopy-fuzz; the adapter's, clang.
targets=${FUZZ_TARGETS:-}
if [[ -z $targets || " $targets " != " adapter " ]]; then
    build
    [[ -n $targets ]] || targets="$("$BIN" list | cut -f1 | tr '\n' ' ')adapter"
fi
if [[ " $targets " == *" adapter "* ]]; then
    status=0
    build_adapter || status=$?
    if [[ $status -eq 2 && ${FUZZ_ADAPTER_OPTIONAL:-0} == 1 ]]; then
        echo "fuzz: adapter SKIPPED: no clang with libFuzzer (above)"
        targets=$(sed 's/\<adapter\>//' <<<"$targets")
        [[ -n ${targets// /} ]] || exit 0
    elif [[ $status -ne 0 ]]; then
        exit 1
    fi
fi
mkdir -p "$RESULTS"
failed=()
for target in $targets; do
    fuzz_target "$target" || failed+=("$target")
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz: FAILED: ${failed[*]}; reproduce with $BIN TARGET FILE, or $ADAPTER_BIN FILE (docs/fuzzing.md)" >&2
    exit 1
fi
echo "fuzz: every target ran ${FUZZ_SECONDS}s without a crash"
