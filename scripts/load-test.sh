#!/usr/bin/env bash
# N whole migrations at once on this machine over loopback. Each instance has
# its own source workload dirtying its RAM, its own postcopyd, its own
# reference guest as the VMM and its own postcopy-push; the N agents start
# together. Fails, naming the instance and showing its logs' tails, when any
# program of any instance fails or any guest does not verify; otherwise
# prints each instance's figures, a total line and the same as one JSON line.
#
#   N=8 SIZE=256M DIRTY=0.10 BIN=.build/release TIMEOUT=600 scripts/load-test.sh
#
# Environment (all optional):
#   N                  migrations at once                         (default: 8)
#   SIZE               guest RAM of each                          (default: 256M)
#   DIRTY              share of pages each source keeps rewriting (default: 0.10)
#   BIN                directory of the built binaries            (default: .build/release)
#   TIMEOUT            seconds each phase may take: filling the sources, the
#                      daemons listening, the migrations           (default: 600)
#   TLS                1: mutual TLS with certificates made for the run by
#                      scripts/make-test-certs.sh; 0: --insecure-plaintext (default: 1)
#   DAEMON_FLAGS       extra flags for every postcopyd serve (split on spaces)
#   PUSH_FLAGS         extra flags for every postcopy-push (split on spaces)
#   KEEP_WORK          1: keep the work directory (logs, summaries) on exit
#   SKIP_UNLESS_ROOT   1: not root is a skip (exit 0) instead of a refusal
#
# Needs root (userfaultfd minor faults on the VMM's behalf) and memory for
# N × SIZE twice (source file in /dev/shm and destination memfd) plus 64 MiB
# per instance for the four programs.
set -euo pipefail

N=${N:-8}
SIZE=${SIZE:-256M}
DIRTY=${DIRTY:-0.10}
BIN=${BIN:-.build/release}
TIMEOUT=${TIMEOUT:-600}
KEEP_WORK=${KEEP_WORK:-0}
TLS=${TLS:-1}
read -r -a daemon_flags <<<"${DAEMON_FLAGS:-}"
read -r -a push_flags <<<"${PUSH_FLAGS:-}"

export LC_ALL=C                        # a dot in $EPOCHREALTIME and in awk's figures
readonly PROGRAM_BYTES=$((64 << 20))   # per instance, for the programs themselves
readonly PROGRAMS=(postcopyd postcopy-push postcopy-guest)

say() { echo "load-test: $*"; }
die() { echo "load-test: $*" >&2; exit 1; }

# --- before anything starts ---------------------------------------------------

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
    die "needs bash 5.1 or later (wait -n -p), this is $BASH_VERSION"
fi
if [[ $(id -u) -ne 0 ]]; then
    if [[ ${SKIP_UNLESS_ROOT:-0} == 1 ]]; then
        say "SKIP: needs root (postcopyd resolves the VMM's faults with userfaultfd)"
        exit 0
    fi
    die "needs root: postcopyd resolves the VMM's faults with userfaultfd, which needs root here (run with sudo)"
fi
for program in "${PROGRAMS[@]}"; do
    [[ -x $BIN/$program ]] || die "$BIN/$program is missing: build first ('make build', or 'swift build' for .build/debug) or set BIN"
done
[[ $N =~ ^[1-9][0-9]*$ ]] || die "N must be a positive whole number, not '$N'"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "TIMEOUT must be a positive number of seconds, not '$TIMEOUT'"

# SIZE as the programs read it: digits, an optional K/M/G/T, an optional iB/B.
size_bytes() {
    [[ $1 =~ ^([0-9]+)([KkMmGgTt]?)(i?B)?$ ]] || return 1
    local value=${BASH_REMATCH[1]} shift=0
    case ${BASH_REMATCH[2]} in
        [Kk]) shift=10 ;; [Mm]) shift=20 ;; [Gg]) shift=30 ;; [Tt]) shift=40 ;;
    esac
    echo $((10#$value << shift))
}
size=$(size_bytes "$SIZE") || die "SIZE must be a size such as 256M or 1G, not '$SIZE'"
((size > 0)) || die "SIZE must not be 0"

mib() { echo $((($1 + (1 << 20) - 1) >> 20)); }
need=$((N * (2 * size + PROGRAM_BYTES)))
available=$(($(awk '$1 == "MemAvailable:" { print $2 }' /proc/meminfo) << 10))
if ((need > available)); then
    die "not enough memory: $N × $SIZE needs $(mib "$need") MiB ($N × (2 × $SIZE for source and destination + $(mib "$PROGRAM_BYTES") MiB for the programs)), MemAvailable is $(mib "$available") MiB; lower N or SIZE"
fi
shm_free=$(df --output=avail -B1 /dev/shm | tail -n 1)
if ((N * size > shm_free)); then
    die "not enough room in /dev/shm for the $N source RAM files: $(mib $((N * size))) MiB needed, $(mib "$shm_free") MiB free"
fi

# --- processes and clean-up ---------------------------------------------------

work=$(mktemp -d /tmp/postcopy-load.XXXXXX)
if [[ $TLS == 1 ]]; then
    bash "$(dirname "$0")/make-test-certs.sh" "$work/tls" >/dev/null
    daemon_flags+=(--tls-ca "$work/tls/ca.pem" --tls-cert "$work/tls/daemon.pem" --tls-key "$work/tls/daemon.key"
                   --tls-client-name postcopy-agent)
    push_flags+=(--tls-ca "$work/tls/ca.pem" --tls-cert "$work/tls/agent.pem" --tls-key "$work/tls/agent.key")
else
    daemon_flags+=(--insecure-plaintext)
    push_flags+=(--insecure-plaintext)
fi
shm_prefix=/dev/shm/postcopy-load-$$
pids=()                  # every process started, for clean-up
declare -A source_pid daemon_pid guest_pid push_pid
declare -A role          # pid -> "postcopyd", "postcopy-guest vmm", ...
declare -A owner         # pid -> instance number

# Kills a child and collects it, so that bash does not report it "Killed".
stop() {  # pid
    { kill -KILL "$1" && wait "$1"; } 2>/dev/null || true
}

cleanup() {
    for pid in "${pids[@]}"; do stop "$pid"; done
    rm -f "$shm_prefix".*
    if [[ $KEEP_WORK == 1 ]]; then
        echo "load-test: work directory kept: $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

name() { echo "load$1"; }
dir() { echo "$work/load$1"; }
source_ram() { echo "$shm_prefix.load$1"; }

started() {  # instance, role, pid
    pids+=("$3")
    role[$3]=$2
    owner[$3]=$1
}

# One function per program: each command line is written once, here.
start_source() {  # instance
    "$BIN/postcopy-guest" source --ram "$(source_ram "$1")" --size "$SIZE" --dirty "$DIRTY" \
        --ready-file "$(dir "$1")/source.ready" --dirty-log-socket "$(dir "$1")/dirty-log.sock" \
        >"$(dir "$1")/source.out" 2>"$(dir "$1")/source.log" &
    source_pid[$1]=$!
    started "$1" "postcopy-guest source" $!
}

start_daemon() {  # instance
    local d
    d=$(dir "$1")
    "$BIN/postcopyd" serve --instance "$(name "$1")" --listen 127.0.0.1:0 \
        --vmm-socket "$d/vmm.sock" --control-socket "$d/control.sock" --size "$SIZE" \
        --ready-file "$d/daemon.ready" --json "${daemon_flags[@]}" \
        >"$d/daemon.json" 2>"$d/daemon.log" &
    daemon_pid[$1]=$!
    started "$1" "postcopyd" $!
}

start_guest() {  # instance
    "$BIN/postcopy-guest" vmm --socket "$(dir "$1")/vmm.sock" --json \
        >"$(dir "$1")/guest.json" 2>"$(dir "$1")/guest.log" &
    guest_pid[$1]=$!
    started "$1" "postcopy-guest vmm" $!
}

start_push() {  # instance
    local d
    d=$(dir "$1")
    "$BIN/postcopy-push" --ram "$(source_ram "$1")" --to "$(<"$d/daemon.ready")" \
        --pause-pid "${source_pid[$1]}" --dirty-log-socket "$d/dirty-log.sock" \
        --quiet --json --migration-secret-file "$d/migration.secret" \
        "${push_flags[@]}" \
        >"$d/push.json" 2>"$d/push.log" &
    push_pid[$1]=$!
    started "$1" "postcopy-push" $!
}

# The last lines of every log of an instance, on stderr.
show_logs() {  # instance
    local log
    for log in daemon guest push source; do
        [[ -s $(dir "$1")/$log.log ]] || continue
        echo "--- $(name "$1") $log.log (last 15 lines)" >&2
        tail -n 15 "$(dir "$1")/$log.log" >&2
    done
}

# Waits until every instance's ready file has something in it; fails when
# the process that should write it exits first, or after TIMEOUT seconds.
wait_ready() {  # file name in each instance's directory, pid array name, what it is doing
    local -n process=$2
    local deadline=$((SECONDS + TIMEOUT)) i
    for ((i = 1; i <= N; i++)); do
        until [[ -s $(dir "$i")/$1 ]]; do
            if ! kill -0 "${process[$i]}" 2>/dev/null; then
                local status=0
                wait "${process[$i]}" || status=$?
                echo "load-test: FAIL: $(name "$i"): ${role[${process[$i]}]} exited with status $status before it was ready ($3)" >&2
                show_logs "$i"
                exit 1
            fi
            if ((SECONDS >= deadline)); then
                echo "load-test: FAIL: $(name "$i"): ${role[${process[$i]}]} not ready after $TIMEOUT s ($3)" >&2
                show_logs "$i"
                exit 1
            fi
            sleep 0.1
        done
    done
}

# --- the run --------------------------------------------------------------------

for ((i = 1; i <= N; i++)); do mkdir "$(dir "$i")"; done
export POSTCOPY_LOG=stderr
setup_start=$EPOCHREALTIME

say "$N sources: $SIZE of guest RAM each in /dev/shm, $DIRTY of pages kept dirty"
for ((i = 1; i <= N; i++)); do start_source "$i"; done
wait_ready source.ready source_pid "filling its RAM"

names=$(name 1)
((N == 1)) || names+=" … $(name "$N")"
say "$N postcopyd instances ($names), each with a reference guest as its VMM"
for ((i = 1; i <= N; i++)); do start_daemon "$i"; done
wait_ready daemon.ready daemon_pid "allocating guest RAM, then listening"
for ((i = 1; i <= N; i++)); do start_guest "$i"; done

say "$N migrations at once"
t0=$EPOCHREALTIME
for ((i = 1; i <= N; i++)); do start_push "$i"; done

# Every daemon, guest and agent is waited for as it exits. The first failure
# of an instance is its result; its other programs are then killed, as they
# can no longer succeed. Any instance not finished after TIMEOUT s fails.
sleep "$TIMEOUT" &
watchdog=$!
pids+=("$watchdog")
waiting=("$watchdog")
declare -A left=() finished=() failure=()
for ((i = 1; i <= N; i++)); do
    waiting+=("${daemon_pid[$i]}" "${guest_pid[$i]}" "${push_pid[$i]}")
    left[$i]=3
done
remaining=$N
while ((remaining > 0)); do
    unset done_pid
    status=0
    wait -n -p done_pid "${waiting[@]}" || status=$?
    next=()
    for pid in "${waiting[@]}"; do [[ $pid == "$done_pid" ]] || next+=("$pid"); done
    waiting=("${next[@]}")
    if [[ $done_pid == "$watchdog" ]]; then
        for ((i = 1; i <= N; i++)); do
            [[ -n ${finished[$i]:-} || -n ${failure[$i]:-} ]] && continue
            running=""
            for pid in "${waiting[@]}"; do
                [[ ${owner[$pid]:-} == "$i" ]] && running+="${running:+, }${role[$pid]}"
            done
            failure[$i]="not finished after $TIMEOUT s; still running: $running"
        done
        break
    fi
    i=${owner[$done_pid]}
    if ((status != 0)); then
        failure[$i]="${role[$done_pid]} exited with status $status"
        next=()
        for pid in "${waiting[@]}"; do
            if [[ ${owner[$pid]:-} == "$i" ]]; then stop "$pid"; else next+=("$pid"); fi
        done
        waiting=("${next[@]}")
        say "$(name "$i"): FAILED (${failure[$i]})"
        remaining=$((remaining - 1))
        continue
    fi
    left[$i]=$((left[$i] - 1))
    if ((left[$i] == 0)); then
        finished[$i]=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
        # The source stays stopped until killed: free its RAM now.
        stop "${source_pid[$i]}"
        rm -f "$(source_ram "$i")"
        say "$(name "$i"): all three programs exited 0 after ${finished[$i]} s"
        remaining=$((remaining - 1))
    fi
done
setup=$(awk -v a="$setup_start" -v b="$t0" 'BEGIN { printf "%.2f", b - a }')

# --- the summaries ------------------------------------------------------------

# The value of a key in a one-line JSON summary (a number, true/false, or a
# string with its quotes), into a variable. Each key read here occurs once in
# its summary; a key missing, or found twice, is an error rather than a guess.
json_value() {  # variable, file, key
    local -n into=$1
    local values
    values=$(grep -o "\"$3\":\(\"[^\"]*\"\|[^,}]*\)" "$2" | cut -d: -f2-) || true
    if [[ -z $values || $values == *$'\n'* ]]; then
        why="no single \"$3\" in $(basename "$2"): $(head -c 200 "$2")"
        return 1
    fi
    # shellcheck disable=SC2034  # into is the caller's variable (a nameref)
    into=$values
}

# Checks an instance's summaries and appends its row; sets why and returns 1
# when they say the migration did not work.
read_instance() {  # instance
    local d verified guest_digest push_digest migration_s precopy_s downtime_ms postcopy_s stale_pages stale_faults
    local peak anonymous file
    d=$(dir "$1")
    json_value verified "$d/guest.json" verified || return 1
    [[ $verified == true ]] || { why="the guest did not verify (verified: $verified)"; return 1; }
    json_value guest_digest "$d/guest.json" actualDigest || return 1
    json_value push_digest "$d/push.json" imageDigest || return 1
    [[ $guest_digest == "$push_digest" ]] ||
        { why="the guest read image $guest_digest, the source had $push_digest"; return 1; }
    json_value migration_s "$d/push.json" totalSeconds || return 1
    json_value precopy_s "$d/push.json" precopySeconds || return 1
    json_value downtime_ms "$d/daemon.json" downtimeMs || return 1
    json_value postcopy_s "$d/daemon.json" postcopySeconds || return 1
    json_value stale_pages "$d/daemon.json" stalePagesAtSwitchover || return 1
    json_value stale_faults "$d/daemon.json" faultsStale || return 1
    # The daemon's memoryUse, read from its /proc/self/status as the
    # migration ends: peakResident is VmHWM, the peak resident set over its
    # whole life (guest RAM it wrote through its alias included); anonymous +
    # file is what it holds besides guest RAM.
    json_value peak "$d/daemon.json" peakResident || return 1
    json_value anonymous "$d/daemon.json" anonymous || return 1
    json_value file "$d/daemon.json" file || return 1
    rows+=("$(name "$1") ${finished[$1]} $migration_s $precopy_s $downtime_ms $postcopy_s $stale_pages $stale_faults $peak $((anonymous + file))")
}

rows=()
for ((i = 1; i <= N; i++)); do
    [[ -n ${failure[$i]:-} ]] && continue
    why=""
    read_instance "$i" || failure[$i]=$why
done

if ((${#failure[@]} > 0)); then
    for ((i = 1; i <= N; i++)); do
        [[ -n ${failure[$i]:-} ]] || continue
        echo "load-test: FAIL: $(name "$i"): ${failure[$i]}" >&2
        show_logs "$i"
    done
    die "FAIL: ${#failure[@]} of $N migrations failed ($N × $SIZE, dirty $DIRTY)"
fi

# Columns: instance, wall s (from the agents' start to the instance's last
# program exiting), the agent's totalSeconds (connect to COMPLETE) and
# precopySeconds, the daemon's downtimeMs, postcopySeconds,
# stalePagesAtSwitchover, faultsStale, memoryUse peak and besides guest RAM.
printf '%s\n' "${rows[@]}" | awk -v n="$N" -v size="$SIZE" -v dirty="$DIRTY" -v setup="$setup" '
    function mib(bytes) { return bytes / 1048576 }
    BEGIN {
        printf "%-8s %7s %11s %9s %11s %10s %11s %12s %15s %15s\n", "instance", "wall s", "migration s", "precopy s",
            "downtime ms", "postcopy s", "stale pages", "stale faults", "daemon peak MiB", "besides RAM MiB"
    }
    {
        printf "%-8s %7.2f %11.2f %9.2f %11.1f %10.2f %11d %12d %15.1f %15.1f\n", $1, $2, $3, $4, $5, $6, $7, $8, mib($9), mib($10)
        if ($2 > wall) wall = $2
        sum += mib($9); if (mib($9) > max) max = mib($9)
        json = json sprintf("%s{\"instance\":\"%s\",\"wallSeconds\":%.2f,\"migrationSeconds\":%.3f,\"precopySeconds\":%.3f,\"downtimeMs\":%.1f,\"postcopySeconds\":%.3f,\"stalePages\":%d,\"staleFaults\":%d,\"daemonPeakResidentMiB\":%.1f,\"daemonBesidesRAMMiB\":%.1f}",
            NR > 1 ? "," : "", $1, $2, $3, $4, $5, $6, $7, $8, mib($9), mib($10))
    }
    END {
        printf "load-test: PASS — %d × %s migrations (dirty %s) at once in %.2f s wall (after %.2f s to fill the sources and start the daemons); daemon peak resident (VmHWM): sum %.1f MiB, max %.1f MiB\n",
            n, size, dirty, wall, setup, sum, max
        printf "{\"instances\":%d,\"size\":\"%s\",\"dirty\":%g,\"wallSeconds\":%.2f,\"setupSeconds\":%.2f,\"daemonPeakResidentSumMiB\":%.1f,\"daemonPeakResidentMaxMiB\":%.1f,\"perInstance\":[%s]}\n",
            n, size, dirty + 0, wall, setup, sum, max, json
    }'
