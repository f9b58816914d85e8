# The parts of the QEMU flows that qemu/migrate.sh (postcopyd) and
# qemu/compare-qemu-postcopy.sh (QEMU's own postcopy) share: settings,
# logs, the guest consoles, QMP, and the choice of accelerator. Sourced,
# with `name` set to the script's name for its messages.

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SIZE=${SIZE:-512M}
ACCEL=${ACCEL:-auto}
GUEST=${GUEST:-.build/qemu-guest}
PRECOPY_SECONDS=${PRECOPY_SECONDS:-30}
# Precopy's bandwidth in MiB/s, the same cap on both flows (postcopy-push
# --max-bandwidth, QEMU's max-bandwidth); 0 is none. A small cap leaves
# nearly all RAM to postcopy: how the flows compare on pure postcopy where
# this host's QEMU cannot start postcopy with no precopy at all.
PRECOPY_MBPS=${PRECOPY_MBPS:-0}
RESULT=${RESULT:-}
QEMU=${QEMU:-qemu-system-x86_64}
# The QMP steps at switchover count as downtime: a bare interpreter starts
# in ~10 ms, where a version manager's shim takes ~150.
PYTHON=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}

require() {  # file…: each must exist
    for needed in "$@"; do
        [[ -e $needed ]] || { echo "$name: $needed is missing (make build preload; qemu/build-guest.sh $GUEST)" >&2; exit 2; }
    done
    command -v "$QEMU" >/dev/null || { echo "$name: $QEMU is not installed (apt-get install qemu-system-x86)" >&2; exit 2; }
}

work=$(mktemp -d /tmp/postcopy-qemu.XXXXXX)
pids=()
removals=()
cleanup() {
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -f "${removals[@]}"
    if [[ ${KEEP:-0} == 1 ]]; then echo "$name: logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
say() { echo "== $*"; }
fail() {
    echo "$name: FAIL: $*" >&2
    for log in "$work"/*.log "$work"/*.err; do
        [[ -s $log ]] && { echo "--- $log (last lines)" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}
qmp() { "$PYTHON" -S "$here/qmp.py" "$@"; }
qmp_command="$PYTHON -S $here/qmp.py"

# Waits until `file` has a line matching `pattern`; prints that line.
wait_line() {  # file pattern seconds what
    local deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        if grep -m1 -a -E "$2" "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    fail "timed out after $3 s waiting for $4"
}

# A guest console: a pipe chardev (NAME.in, NAME.out) whose output is
# logged to NAME.log, and whose input takes the workload's commands.
console() {  # name → the QEMU arguments, in console_args
    mkfifo "$work/$1.in" "$work/$1.out"
    cat "$work/$1.out" >"$work/$1.log" &
    pids+=($!)
    console_args=(-chardev "pipe,id=console,path=$work/$1" -serial chardev:console)
}

# Waits for a QEMU's QMP socket.
wait_qmp() {  # path
    for _ in $(seq 1 100); do [[ -S $1 ]] && return 0; sleep 0.1; done
    fail "no QMP socket at $1"
}

# The guest's verdict after migration: sends 'v' to the destination's
# console; sets verdict and stalls to the workload's two answer lines. A
# guest kernel that oopsed or panicked (its memory came back wrong in a
# way that killed it before it could check) is a verdict too: verdict is
# then that line, and stalls is empty.
verify_guest() {  # console name
    echo v >"$work/$1.in"
    verdict=$(wait_line "$work/$1.log" "POSTCOPY-GUEST VERIFY|Kernel panic|BUG: |Oops" 300 "the guest's verdict")
    stalls=""
    if [[ $verdict == *POSTCOPY-GUEST* ]]; then
        stalls=$(wait_line "$work/$1.log" "POSTCOPY-GUEST STALLS" 30 "the guest's stall figures")
    else
        verdict="GUEST KERNEL CRASHED: $verdict"
    fi
    echo "$verdict"
    [[ -z $stalls ]] || echo "$stalls"
}

# The guest's half of a run's figures, as JSON, from verify_guest's lines.
guest_figures() {
    jq -n --arg verdict "$verdict" --arg stalls "$stalls" '{
      verified: ($verdict | test("VERIFY PASS")),
      crashed: ($verdict | test("CRASHED")),
      longestStallUs: ([$stalls | capture("longest-stall-us=(?<v>[0-9]+)") | .v | tonumber] | first),
      stallsOver10ms: ([$stalls | capture("over-10ms=(?<v>[0-9]+)") | .v | tonumber] | first),
      clockBack: ([$stalls | capture("clock-back=(?<v>[0-9]+)") | .v | tonumber] | first)}'
}

# A TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
    "$PYTHON" -S -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

mem_mib=$(($(numfmt --from=iec "$SIZE") >> 20))
# Guest RAM is the memory backend "ram" each QEMU names; the rest is the
# same on both sides.
guest_args=(-nodefaults -no-user-config -display none -machine "pc,memory-backend=ram"
            -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initrd.gz"
            -append "console=ttyS0 quiet panic=-1")

accel=$ACCEL
# The probe's answer is kept beside the guest it booted ($GUEST/accel-probe),
# so that a series of runs probes once.
if [[ $accel == auto && -s $GUEST/accel-probe && $GUEST/accel-probe -nt $GUEST/initrd.gz ]]; then
    accel=$(cat "$GUEST/accel-probe")
elif [[ $accel == auto ]]; then
    accel=tcg
    if [[ -w /dev/kvm ]]; then
        # KVM under nested virtualisation may exist but not run a guest:
        # take it only if a small guest boots to the workload with it.
        console probe
        "$QEMU" -accel kvm -m 256M -object memory-backend-ram,id=ram,size=256M "${guest_args[@]}" \
            "${console_args[@]}" >"$work/kvm-probe.err" 2>&1 &
        probe=$!
        for _ in $(seq 1 200); do
            grep -q "POSTCOPY-GUEST READY" "$work/probe.log" && { accel=kvm; break; }
            kill -0 "$probe" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$probe" 2>/dev/null || true
        wait "$probe" 2>/dev/null || true
    fi
    echo "$accel" >"$GUEST/accel-probe" 2>/dev/null || true
fi
