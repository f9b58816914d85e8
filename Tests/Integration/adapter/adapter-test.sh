#!/usr/bin/env bash
# libpostcopy-vmm.so against a real postcopyd, without QEMU: what it leaves
# alone and what it refuses. Each case runs Tests/Integration/adapter/map-file (a VMM's
# guest-RAM mapping, QEMU-style) with the adapter preloaded and checks what
# the program saw and what the adapter said. Root only (postcopyd's
# userfaultfd checks, and a case run as another uid).
#
# Source mode (POSTCOPY_SOURCE_RAM, POSTCOPY_SOURCE_SOCKET) runs
# Tests/Integration/adapter/write-pages (a source VMM that keeps writing its RAM) and
# reads the offer with Tests/Integration/adapter/read-offer; two whole migrations use
# its write log (--dirty-log uffd-wp --verify-dirty-log) and fall back to
# hashing when it has none.
#
#   BIN=.build/debug PRELOAD=.build/preload/libpostcopy-vmm.so bash Tests/Integration/adapter/adapter-test.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."

BIN=${BIN:-.build/debug}
PRELOAD=$(realpath "${PRELOAD:-.build/preload/libpostcopy-vmm.so}")
CC=${CC:-cc}
say() { echo "test-preload: $*"; }
if [[ $(id -u) -ne 0 ]]; then
    say "SKIPPED: needs root (a case runs as another uid; postcopyd's RAM file is root's)"
    exit 0
fi

work=$(mktemp -d /tmp/postcopy-preload.XXXXXX)
ram=/dev/shm/postcopy-preload-ram.$$
other=/dev/shm/postcopy-preload-other.$$
src=/dev/shm/postcopy-preload-source.$$
fake_ram=/dev/shm/postcopy-preload-fake.$$
nobody_dir=$(mktemp -d /tmp/postcopy-preload-nobody.XXXXXX)
daemon=
background=()
cleanup() {
    [[ -n $daemon ]] && kill -KILL "$daemon" 2>/dev/null || true
    for pid in "${background[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work" "$ram" "$other" "$src" "$src.new" "$fake_ram" "$nobody_dir"
}
trap cleanup EXIT
# The case run as another uid, and the daemon socket served by one.
if command -v setpriv >/dev/null; then
    as_nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups)
elif command -v runuser >/dev/null; then
    as_nobody=(runuser -u nobody --)
else
    as_nobody=()
fi
for helper in map-file write-pages read-offer; do
    $CC -O2 -Wall -Wextra -Werror -o "$work/$helper" "Tests/Integration/adapter/$helper.c"
done
chmod 0755 "$work"  # the case run as another uid executes map-file
size=$((64 << 20))
truncate -s "$size" "$other"
chmod 0666 "$other"

# A fresh postcopyd for each case that talks to one: a VMM that takes the
# offer and leaves without attaching fails the daemon's migration.
start_daemon() {  # extra postcopyd options…
    if [[ -n $daemon ]]; then kill -KILL "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
    rm -f "$ram" "$work/ready"
    "$BIN/postcopyd" serve --instance preload-test --listen 127.0.0.1:0 --insecure-plaintext --size 64M \
        --ram-file "$ram" --vmm-socket "$work/vmm.sock" --control-socket "$work/control.sock" \
        --ready-file "$work/ready" "$@" 2>"$work/daemon.log" &
    daemon=$!
    for _ in $(seq 1 100); do [[ -s $work/ready ]] && return 0; sleep 0.1; done
    cat "$work/daemon.log" >&2
    say "FAIL: postcopyd did not start"
    exit 1
}

failures=0
# case NAME EXPECT-STDOUT EXPECT-STDERR(regex, or '^$' for silence) -- command…
case_() {
    local name=$1 out=$2 err=$3
    shift 4
    local got_out got_err
    got_out=$("$@" 2>"$work/stderr" | tr '\n' ' ' | sed 's/ $//') || true
    got_err=$(cat "$work/stderr")
    if [[ $got_out == "$out" ]] && grep -Eq "$err" <<<"${got_err:-}" ; then
        say "ok: $name"
    else
        say "FAIL: $name"
        echo "  stdout: '$got_out' (wanted '$out')" >&2
        echo "  stderr: '$got_err' (wanted /$err/)" >&2
        failures=$((failures + 1))
    fi
}
preloaded=(env LD_PRELOAD="$PRELOAD" POSTCOPY_VMM_SOCKET="$work/vmm.sock")

case_ "without POSTCOPY_VMM_SOCKET the adapter does nothing" "mapped wrote" '^$' -- \
    env LD_PRELOAD="$PRELOAD" "$work/map-file" "$other" "$size"
case_ "no postcopyd at the socket: said, and the mapping left alone" "mapped wrote" \
    "postcopy-vmm: cannot connect to postcopyd's VMM socket" -- \
    env LD_PRELOAD="$PRELOAD" POSTCOPY_VMM_SOCKET="$work/nothing.sock" "$work/map-file" "$other" "$size"
# A socket that never answers: the VMM starts after 10 s, untouched.
python3 -S -c 'import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); time.sleep(60)' "$work/silent.sock" &
silent=$!
for _ in $(seq 1 50); do [[ -S $work/silent.sock ]] && break; sleep 0.1; done
case_ "a socket that never offers: the VMM goes on after 10 s, the mapping left alone" "mapped wrote" \
    "no VMM_OFFER from postcopyd's VMM socket .*: none within 10 s" -- \
    env LD_PRELOAD="$PRELOAD" POSTCOPY_VMM_SOCKET="$work/silent.sock" "$work/map-file" "$other" "$size"
kill "$silent" 2>/dev/null || true
start_daemon --vmm-uid 65534
case_ "postcopyd's refusal (not --vmm-uid) is reported, the mapping left alone" "mapped wrote" \
    "postcopy-vmm: postcopyd sent ERROR 5 \(unexpectedMessage\) instead of VMM_OFFER: VMM socket peer uid 0 is not the allowed uid 65534" -- \
    "${preloaded[@]}" "$work/map-file" "$other" "$size"
start_daemon
case_ "another file is left alone" "mapped wrote" "postcopyd offered guest RAM: 64 MiB in 4 KiB pages" -- \
    "${preloaded[@]}" "$work/map-file" "$other" "$size"
if grep -q "registered" "$work/stderr"; then say "FAIL: the other file was registered"; failures=$((failures + 1)); fi
start_daemon
case_ "the offered file at another size is refused (ENOTSUP, alias EOPNOTSUPP)" "mmap failed: EOPNOTSUPP" \
    "the VMM maps 33554432 bytes of guest RAM at file offset 0, but postcopyd serves 67108864 bytes" -- \
    "${preloaded[@]}" "$work/map-file" "$ram" "$((32 << 20))"
start_daemon
case_ "a refused mapping keeps the offer: the next one is checked again, then registered" "mmap failed: EOPNOTSUPP mapped" \
    "guest RAM at 0x[0-9a-f]+ registered" -- \
    "${preloaded[@]}" "$work/map-file" "$ram" "$((32 << 20)),$size" no-touch
start_daemon
case_ "a second mapping of guest RAM while postcopy runs is refused (it would not be tracked)" "mapped mmap failed: EOPNOTSUPP" \
    "the VMM maps guest RAM a second time while postcopy runs" -- \
    "${preloaded[@]}" "$work/map-file" "$ram" "$size,$size" no-touch
start_daemon
case_ "the offered file is registered and handed over" "mapped" \
    "guest RAM at 0x[0-9a-f]+ registered \(minor\|missing\) and handed to postcopyd" -- \
    "${preloaded[@]}" "$work/map-file" "$ram" "$size" no-touch
for _ in $(seq 1 50); do grep -q "VMM attached" "$work/daemon.log" && break; sleep 0.1; done
if ! grep -q "VMM attached" "$work/daemon.log"; then
    say "FAIL: postcopyd never logged the attachment"
    tail -n 5 "$work/daemon.log" >&2
    failures=$((failures + 1))
fi
wait_line() {  # FILE REGEX [tenths of a second]
    for _ in $(seq 1 "${3:-100}"); do grep -Eq "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    return 1
}
check() {  # NAME CONDITION-STATUS FILES-TO-SHOW…
    local name=$1 status=$2
    shift 2
    if ((status == 0)); then
        say "ok: $name"
    else
        say "FAIL: $name"
        for file in "$@"; do [[ -f $file ]] && tail -n 8 "$file" >&2; done
        failures=$((failures + 1))
    fi
}
# A whole migration through the adapter: a VMM that maps guest RAM and
# runs on while postcopy-push migrates a source of (mostly) zeros. The adapter takes
# VMM_RESUME (no payload: the page-state record's descriptor), then
# VMM_COMPLETE (the source's image digest, which postcopyd waits for),
# releases the range and answers; postcopyd completes. The VMM asks
# MADV_HUGEPAGE on guest RAM as QEMU does: ignored during postcopy, it is
# re-applied after, and the adapter collapses guest RAM into 2 MiB pages
# (issue 22), unless POSTCOPY_VMM_COLLAPSE=0. Sets $vmm_smaps_pmd to the
# VMM's ShmemPmdMapped total in kB once the adapter is done.
whole_migration() {  # extra environment for the VMM (NAME=VALUE…)
    start_daemon
    # Data in the even 2 MiB extents, holes in the odd ones: a collapse
    # makes the first 2 MiB pages and leaves the holes alone.
    truncate -s "$size" "$work/source"
    for ((extent = 0; extent < size >> 21; extent += 2)); do
        printf 'extent %d' "$extent" | dd of="$work/source" bs=1 seek=$((extent << 21)) conv=notrunc status=none
    done
    env "$@" "${preloaded[@]}" "$work/map-file" "$ram" "$size" no-touch hold thp >/dev/null 2>"$work/vmm.err" &
    vmm=$!
    for _ in $(seq 1 50); do grep -q "VMM attached" "$work/daemon.log" && break; sleep 0.1; done
    push=0
    timeout 60 "$BIN/postcopy-push" --ram "$work/source" --to "$(cat "$work/ready")" --insecure-plaintext \
        --no-pause --max-rounds 1 --quiet >/dev/null 2>"$work/push.err" || push=$?
    served=0
    if timeout 30 tail --pid="$daemon" -f /dev/null; then
        wait "$daemon" || served=$?
        daemon=
    else
        served="none within 30 s"
    fi
    # The collapse runs after the release, on the adapter's own thread.
    wait_line "$work/vmm.err" 'collapsed into 2 MiB pages|stays in 4 KiB pages' 100 || true
    vmm_smaps_pmd=$(awk '/^ShmemPmdMapped:/ { kb += $2 } END { print kb + 0 }' "/proc/$vmm/smaps" 2>/dev/null || echo none)
    kill "$vmm" 2>/dev/null || true
    wait "$vmm" 2>/dev/null || true
    if ((push == 0 && served == 0)) && grep -q "postcopyd serves guest RAM now (VMM_RESUME)" "$work/vmm.err" &&
        grep -q "guest RAM released: postcopy is complete" "$work/vmm.err"; then
        return 0
    fi
    say "FAIL: a whole migration through the adapter (postcopy-push exit $push, postcopyd exit: $served)"
    tail -n 5 "$work/push.err" "$work/daemon.log" "$work/vmm.err" >&2
    failures=$((failures + 1))
    return 1
}
extents=$((size >> 21)) half=$((size >> 22))
# What the shmem THP settings allow (docs/kernel.md, "Huge pages after
# postcopy"): 'deny', or 'never' for 2 MiB pages alone, refuse MADV_COLLAPSE.
thp=/sys/kernel/mm/transparent_hugepage
thp_refused=$(grep -qF '[deny]' $thp/shmem_enabled 2>/dev/null && echo shmem_enabled ||
    { grep -qF '[never]' $thp/hugepages-2048kB/shmem_enabled 2>/dev/null && echo hugepages-2048kB/shmem_enabled; } || true)
if whole_migration; then
    if [[ -n $thp_refused ]]; then
        ok=1
        grep -q "guest RAM stays in 4 KiB pages: .*$thp_refused is '" "$work/vmm.err" && ok=0
        check "a whole migration: completed; the collapse skipped, naming $thp_refused, which refuses it" $ok "$work/vmm.err"
    else
        ok=1
        grep -q "ignoring MADV_HUGEPAGE on guest RAM while postcopy runs; it is applied once postcopy is complete" "$work/vmm.err" &&
            grep -q "guest RAM collapsed into 2 MiB pages: $half of $extents extents mapped huge (0 before; $half collapsed, $half empty, 0 failed, .*MADV_HUGEPAGE re-applied, as the VMM asked" "$work/vmm.err" &&
            [[ $vmm_smaps_pmd == $((size >> 11)) ]] && ok=0
        check "a whole migration: VMM_RESUME, VMM_COMPLETE answered, then the $half extents with data collapsed into 2 MiB pages, the $half holes left alone (smaps: $vmm_smaps_pmd kB PMD-mapped)" $ok "$work/vmm.err"
    fi
fi
if [[ -z $thp_refused ]] && whole_migration MAP_FILE_MISALIGN=1; then
    ok=1
    grep -q "guest RAM stays in 4 KiB pages: the VMM mapped it at 0x[0-9a-f]*, not at a multiple of 2 MiB" "$work/vmm.err" &&
        [[ $vmm_smaps_pmd == 0 ]] && ok=0
    check "a whole migration into a mapping 4 KiB off 2 MiB (QEMU without align=2M): completed, the collapse skipped, saying why (smaps: $vmm_smaps_pmd kB PMD-mapped)" $ok "$work/vmm.err"
fi
if whole_migration POSTCOPY_VMM_COLLAPSE=0; then
    ok=1
    grep -q "POSTCOPY_VMM_COLLAPSE=0: guest RAM stays in 4 KiB pages" "$work/vmm.err" &&
        ! grep -q "collapsed into 2 MiB pages" "$work/vmm.err" && [[ $vmm_smaps_pmd == 0 ]] && ok=0
    check "a whole migration with POSTCOPY_VMM_COLLAPSE=0: completed, guest RAM left in 4 KiB pages (smaps: $vmm_smaps_pmd kB PMD-mapped)" $ok "$work/vmm.err"
fi

# ---- issue 18: from VMM_RESUME to VMM_COMPLETE the range stays registered ----
# postcopyd's end driven by hand (Tests/Integration/adapter/fake-daemon.py): ERROR
# (cancelled) during postcopy. The adapter must not release guest RAM: a
# read of a page postcopyd never served waits, through the ERROR and while
# no postcopyd is there, until a restarted one takes the guest over and
# completes; only then does the read return.
small=$((4 << 20))
printf '\007' >"$fake_ram"
truncate -s "$small" "$fake_ram"
start_fake() {  # MODE: fake-daemon.py on $work/fake.sock, as $fake
    rm -f "$work/fake.log" "$work/go-"* "$work/fake.sock"
    python3 Tests/Integration/adapter/fake-daemon.py "$work/fake.sock" "$fake_ram" "$small" "$work" "$1" \
        2>"$work/fake.err" &
    fake=$!
    background+=("$fake")
    wait_line "$work/fake.log" '^listening$' || true
}
start_fake_vmm() {  # map-file on the fake's RAM, reading at SIGUSR1, as $fv
    : >"$work/fv.out"  # emptied before the fork, as in start_writer
    : >"$work/fv.err"
    env LD_PRELOAD="$PRELOAD" POSTCOPY_VMM_SOCKET="$work/fake.sock" POSTCOPY_VMM_REATTACH_SECONDS=1 \
        "$work/map-file" "$fake_ram" "$small" no-touch read-on-usr1 >"$work/fv.out" 2>"$work/fv.err" &
    fv=$!
    background+=("$fv")
}
# The flags of the registered range in /proc/$fv/smaps (" ui" minor, " um" missing).
range_flags() {
    local address
    address=$(grep -Eo 'guest RAM at 0x[0-9a-f]+ registered' "$work/fv.err" | grep -Eo '0x[0-9a-f]+' || true)
    [[ -n $address ]] || return 0
    awk -v a="${address#0x}" '$1 ~ "^0*" a "-" { found = 1 } found && /^VmFlags:/ { print; exit }' \
        "/proc/$fv/smaps" 2>/dev/null || true
}
# postcopyd waits for VMM_RESUMED after each VMM_RESUME: so does the fake.
check_acks() {  # NAME COUNT
    local acks
    acks=$(grep -cx 'resumed-acked' "$work/fake.log" || true)
    if ((acks == $2)) && ! grep -q '^no-resumed-ack' "$work/fake.log"; then
        say "ok: $1"
    else
        say "FAIL: $1: $acks of $2 VMM_RESUME acknowledged with VMM_RESUMED"
        grep '^no-resumed-ack' "$work/fake.log" | sed 's/^/  fake postcopyd: /' >&2 || true
        tail -n 8 "$work/fv.err" >&2
        failures=$((failures + 1))
    fi
}
start_fake error-in-postcopy
start_fake_vmm
wait_line "$work/fv.err" 'VMM_RESUME' || true
touch "$work/go-error"
wait_line "$work/fake.log" '^error-sent$' || true
wait_line "$work/fv.err" 'guest RAM is incomplete' 50 || true
kill -USR1 "$fv" 2>/dev/null || true  # a vCPU reads a page postcopyd never served
sleep 2.5                             # no postcopyd at all: fake-daemon waits for go-reattach
flags=$(range_flags)
ok=1
! grep -q '^read' "$work/fv.out" && ! grep -q 'released' "$work/fv.err" &&
    grep -q "postcopyd sent ERROR 7 (cancelled) during postcopy: stopped by SIGTERM during postcopy; guest RAM is incomplete: the guest waits (its faults stay unresolved); restart postcopyd to take it over (postcopyd serve --takeover, or systemctl restart postcopyd@NAME), or stop this VM" "$work/fv.err" &&
    grep -q "still no postcopyd took the guest over, 1 s on; guest RAM is incomplete" "$work/fv.err" &&
    [[ $flags == *" ui"* && $flags == *" um"* ]] && ok=0
check "ERROR during postcopy: nothing released, the range still registered ($flags), the stale read waits" $ok \
    "$work/fv.out" "$work/fv.err" "$work/fake.log"
touch "$work/go-reattach"
wait_line "$work/fake.log" '^handed-back$' || true
read_early=0
grep -q '^read' "$work/fv.out" && read_early=1
touch "$work/go-complete"
wait_line "$work/fv.out" '^read 7$' || true
ok=1
((read_early == 0)) && grep -q '^handed-back$' "$work/fake.log" && grep -qx 'read 7' "$work/fv.out" &&
    wait_line "$work/fake.log" '^complete-answered$' &&
    grep -q "guest RAM released: postcopy is complete" "$work/fv.err" && ok=0
check "after the ERROR: reattached to a restarted postcopyd, and the read returned only at VMM_COMPLETE" $ok \
    "$work/fv.out" "$work/fv.err" "$work/fake.log" "$work/fake.err"
check_acks "both VMM_RESUMEs (the first, and the restarted postcopyd's) acknowledged with VMM_RESUMED" 2
kill -KILL "$fv" "$fake" 2>/dev/null || true
wait "$fv" "$fake" 2>/dev/null || true

# ERROR discarded after VMM_RESUME: the device-state hand-over failed and
# the source runs the guest again. The range stays registered (a vCPU's
# read of a page never served waits: this guest must never run here on
# incomplete RAM), the adapter says to stop this QEMU, and it does not
# reattach, even with POSTCOPY_VMM_REATTACH_SECONDS=1: no postcopyd will
# take this migration over. Someone listens on the socket all along.
discarded_line="postcopy-vmm: postcopyd discarded the migration before this guest ran here (the hand-over failed: the destination QEMU did not load the device state): the source runs it again; stop this QEMU, its guest must not run here"
start_fake discarded-in-postcopy
start_fake_vmm
wait_line "$work/fv.err" 'VMM_RESUME' || true
touch "$work/go-discard"
wait_line "$work/fake.log" '^discard-sent$' || true
wait_line "$work/fv.err" 'discarded the migration' 50 || true
kill -USR1 "$fv" 2>/dev/null || true  # a vCPU reads a page postcopyd never served
sleep 3                               # 3 reattach periods, and then some backoff steps
flags=$(range_flags)
check_acks "discarded: VMM_RESUME acknowledged with VMM_RESUMED" 1
ok=1
[[ $(grep -cF "$discarded_line" "$work/fv.err") == 1 ]] && ok=0
check "discarded after VMM_RESUME: one line says the source runs the guest and to stop this QEMU" $ok \
    "$work/fv.err"
ok=1
! grep -q '^read' "$work/fv.out" && ! grep -q 'released' "$work/fv.err" &&
    [[ $flags == *" ui"* && $flags == *" um"* ]] && ok=0
check "discarded after VMM_RESUME: nothing released, the range still registered ($flags), the stale read waits" \
    $ok "$work/fv.out" "$work/fv.err"
ok=1
grep -q '^discard-sent$' "$work/fake.log" && ! grep -q '^connected$' "$work/fake.log" &&
    ! grep -Eq 'reattach|guest RAM is incomplete' "$work/fv.err" && ok=0
check "discarded after VMM_RESUME: no reattachment within 3 s (POSTCOPY_VMM_REATTACH_SECONDS=1)" $ok \
    "$work/fake.log" "$work/fv.err"
kill -KILL "$fv" "$fake" 2>/dev/null || true
wait "$fv" "$fake" 2>/dev/null || true

# ERROR discarded before VMM_RESUME: the guest never ran here, so the
# range is released as for any ERROR then, with the same explanation.
start_fake discarded-before-resume
start_fake_vmm
wait_line "$work/fake.log" '^discard-sent$' || true
wait_line "$work/fv.err" 'guest RAM released' 50 || true
kill -USR1 "$fv" 2>/dev/null || true
wait_line "$work/fv.out" '^read 7$' 50 || true
ok=1
grep -qF "$discarded_line" "$work/fv.err" &&
    grep -q "guest RAM released: the migration failed before the guest ran here" "$work/fv.err" &&
    grep -qx 'read 7' "$work/fv.out" && ! grep -q '^connected$' "$work/fake.log" && ok=0
check "discarded before VMM_RESUME: said, and the range released as for any ERROR then" $ok \
    "$work/fv.out" "$work/fv.err" "$work/fake.log"
kill -KILL "$fv" "$fake" 2>/dev/null || true
wait "$fv" "$fake" 2>/dev/null || true

# The daemon's socket served by another uid: not postcopyd, whatever it
# offers. Had the adapter taken the offer, the write into the offered
# (sparse) file would wait forever for pages nobody serves.
# python3 may be root's own (pyenv): the system's runs as another uid.
nobody_python=
for candidate in /usr/bin/python3 /usr/local/bin/python3; do
    [[ -x $candidate ]] && { nobody_python=$candidate; break; }
done
if ((${#as_nobody[@]})) && [[ -n $nobody_python ]]; then
    chmod 0777 "$nobody_dir"
    cp Tests/Integration/adapter/fake-daemon.py Sources/CPostcopy/include/postcopy_wire.h "$work/"
    "${as_nobody[@]}" "$nobody_python" "$work/fake-daemon.py" "$nobody_dir/vmm.sock" "$other" "$size" "$nobody_dir" offer \
        2>"$work/nobody.err" &
    background+=("$!")
    wait_line "$nobody_dir/fake.log" '^listening$' || true
    case_ "a VMM socket served by another uid is refused (SO_PEERCRED), treated as no postcopyd" "mapped wrote" \
        "refusing postcopyd's VMM socket .*: it is served by pid [0-9]+ uid 65534, but only root or this VMM's uid 0 may serve it; treating it as no postcopyd" -- \
        timeout 20 env LD_PRELOAD="$PRELOAD" POSTCOPY_VMM_SOCKET="$nobody_dir/vmm.sock" "$work/map-file" "$other" "$size"
    grep -q '^connected$' "$nobody_dir/fake.log" ||
        { say "FAIL: the adapter never connected to the other uid's socket"; failures=$((failures + 1)); }
else
    say "SKIPPED: a VMM socket served by another uid (no setpriv or runuser, or no system python3)"
fi

# ---- source mode ----
fail() {  # what, files to show…
    say "FAIL: $1"
    shift
    for file in "$@"; do [[ -f $file ]] && tail -n 8 "$file" >&2; done
    failures=$((failures + 1))
}
# The source RAM: half random, half zeros, as a guest's is.
truncate -s 0 "$src"
head -c "$((size / 2))" /dev/urandom >"$src"
truncate -s "$size" "$src"
wp_sock=$work/dirty-log.sock
source_env=(env LD_PRELOAD="$PRELOAD" POSTCOPY_SOURCE_RAM="$src" POSTCOPY_SOURCE_SOCKET="$wp_sock")

# Starts write-pages with the adapter in source mode and waits until it
# printed WAIT_FOR (ready|waiting); sets $writer, its stdout in $work/writer.out.
start_writer() {  # WAIT_FOR write-pages arguments…
    local wait_for=$1
    shift
    # Emptied here, not by the child's redirection: that happens after the
    # fork, and the loop below could meet the last writer's "ready" first
    # (then read its stale socket, or no "mapped" line at all).
    : >"$work/writer.out"
    : >"$work/writer.err"
    "${source_env[@]}" "$work/write-pages" "$src" "$@" >"$work/writer.out" 2>"$work/writer.err" &
    writer=$!
    background+=("$writer")
    for _ in $(seq 1 100); do grep -qx "$wait_for" "$work/writer.out" && return 0; sleep 0.05; done
    fail "write-pages never said '$wait_for'" "$work/writer.out" "$work/writer.err"
    return 1
}
stop_writer() {
    kill -KILL "$writer" 2>/dev/null || true
    wait "$writer" 2>/dev/null || true
}
# expect_offer NAME WANTED(exact line, or a regex with ~ in front)
expect_offer() {
    local got
    got=$("$work/read-offer" "$wp_sock" 2>&1) || true
    if [[ ${2:0:1} == "~" ]] && grep -Eq "${2:1}" <<<"$got" || [[ $got == "$2" ]]; then
        say "ok: $1"
    else
        fail "$1"
        echo "  offer: '$got' (wanted '$2')" >&2
        tail -n 5 "$work/writer.err" >&2 2>/dev/null || true
    fi
}

case_ "source mode needs both variables: said, the mapping left alone" "mapped wrote" \
    "postcopy-vmm: POSTCOPY_SOURCE_RAM is set but POSTCOPY_SOURCE_SOCKET is not" -- \
    env LD_PRELOAD="$PRELOAD" POSTCOPY_SOURCE_RAM="$src" "$work/map-file" "$src" "$size"
case_ "source and destination mode at once: source mode refused, destination as before" "mapped wrote" \
    "refusing source mode .*destination mode goes on" -- \
    "${source_env[@]}" POSTCOPY_VMM_SOCKET="$work/nothing.sock" "$work/map-file" "$src" "$size"
if ! grep -q "cannot connect to postcopyd's VMM socket" "$work/stderr" || [[ -e $wp_sock ]]; then
    fail "with both modes configured, destination mode did not go on alone" "$work/stderr"
fi
touch "$work/not-a-socket"
case_ "a file at POSTCOPY_SOURCE_SOCKET that is not a socket is left alone" "mapped wrote" \
    "not-a-socket exists and is not a socket; leaving it alone" -- \
    env LD_PRELOAD="$PRELOAD" POSTCOPY_SOURCE_RAM="$src" POSTCOPY_SOURCE_SOCKET="$work/not-a-socket" \
    "$work/map-file" "$src" "$size"
[[ -f $work/not-a-socket ]] || fail "the file at POSTCOPY_SOURCE_SOCKET was deleted"
case_ "another file is left alone in source mode, and the socket goes at exit" "mapped wrote" \
    "source mode: writes to .* will be tracked once the VMM maps it" -- \
    "${source_env[@]}" "$work/map-file" "$other" "$size"
if grep -q "registered\|no write log" "$work/stderr" || [[ -e $wp_sock ]]; then
    fail "the other file was tracked, or the socket outlived the process" "$work/stderr"
fi

# A stale socket (its listener died) is replaced; the offer before and
# after the VMM maps its RAM.
python3 -S -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$wp_sock"
if start_writer waiting whole later; then
    mode=$(stat -c %a "$wp_sock")
    [[ $mode == 600 ]] && say "ok: a stale socket is replaced; the dirty-log socket is mode 0600" ||
        fail "the dirty-log socket is mode $mode, not 0600"
    expect_offer "before the VMM maps its RAM: unavailable, and why" \
        "unavailable: the source QEMU has not mapped $src yet"
    kill -USR1 "$writer"
    for _ in $(seq 1 100); do grep -qx ready "$work/writer.out" && break; sleep 0.05; done
    read -r _ address length < <(grep '^mapped' "$work/writer.out")
    expect_offer "armed: the mapping's address and length (the whole file, $size bytes)" \
        "armed $address $size"
    [[ $length == "$size" ]] || fail "write-pages mapped $length bytes, not $size"
    case_ "a second source VMM on the same socket is refused, the first keeps it" "mapped wrote" \
        "another process listens on POSTCOPY_SOURCE_SOCKET" -- \
        "${source_env[@]}" "$work/map-file" "$other" "$size"
    expect_offer "the first still answers" "armed $address $size"
    # Another uid: a socket made reachable on purpose, so that the
    # adapter's own check (SO_PEERCRED) is what refuses it.
    if ((${#as_nobody[@]})); then
        chmod 0666 "$wp_sock"
        got=$("${as_nobody[@]}" "$work/read-offer" "$wp_sock" 2>&1) || true
        chmod 0600 "$wp_sock"
        if [[ $got == "no offer: closed without a word" ]] &&
            grep -q "refused a dirty-log request from pid [0-9]* uid 65534: only root and uid 0 may ask" \
                "$work/writer.err"; then
            say "ok: a request from another uid is refused and logged"
        else
            fail "a request from uid 65534 was not refused (got '$got')" "$work/writer.err"
        fi
    else
        say "SKIPPED: another uid's request (neither setpriv nor runuser)"
    fi
    stop_writer
fi

# QEMU creates a mem-path that is not there yet: the adapter finds it at
# the mapping.
rm -f "$src.new"
src_was=$src
src=$src.new
source_env=(env LD_PRELOAD="$PRELOAD" POSTCOPY_SOURCE_RAM="$src" POSTCOPY_SOURCE_SOCKET="$wp_sock")
if start_writer ready whole create; then
    read -r _ address _ < <(grep '^mapped' "$work/writer.out")
    expect_offer "a RAM file the VMM creates after the adapter loaded: armed" "armed $address $((16 << 20))"
    stop_writer
fi
rm -f "$src"
src=$src_was
source_env=(env LD_PRELOAD="$PRELOAD" POSTCOPY_SOURCE_RAM="$src" POSTCOPY_SOURCE_SOCKET="$wp_sock")

if start_writer ready offset; then
    expect_offer "a mapping not from offset 0: unavailable, and why" \
        "~^unavailable: the source VMM maps $((size - 4096)) bytes of $src from file offset 4096 at 0x[0-9a-f]+, but the write log needs one mapping of the whole file \($size bytes\) from offset 0$"
    stop_writer
fi

# A whole migration from a preloaded source VMM that keeps writing, onto a
# real postcopyd and the reference guest (which verifies the image against
# the source's digest). Sets $summary (postcopy-push --json).
migrate_source() {  # NAME postcopy-push options…
    local name=$1 status=0
    shift
    rm -f "$work/dest.ready"
    "$BIN/postcopyd" serve --instance preload-source-test --listen 127.0.0.1:0 --insecure-plaintext \
        --size "$size" --vmm-socket "$work/dest-vmm.sock" --control-socket "$work/dest-control.sock" \
        --ready-file "$work/dest.ready" --json >"$work/dest.json" 2>"$work/dest.log" &
    local dest=$!
    background+=("$dest")
    for _ in $(seq 1 100); do [[ -s $work/dest.ready ]] && break; sleep 0.1; done
    "$BIN/postcopy-guest" vmm --socket "$work/dest-vmm.sock" --json >"$work/guest.json" 2>"$work/guest.log" &
    local guest=$!
    background+=("$guest")
    timeout 120 "$BIN/postcopy-push" --ram "$src" --to "$(cat "$work/dest.ready")" --insecure-plaintext \
        --pause-pid "$writer" --dirty-log-socket "$wp_sock" --quiet --json "$@" \
        >"$work/push.json" 2>"$work/push.err" || status=$?
    timeout 60 tail --pid="$dest" -f /dev/null || true
    wait "$dest" || status=$((status ? status : 100))
    timeout 60 tail --pid="$guest" -f /dev/null || true
    wait "$guest" || status=$((status ? status : 101))
    summary=$(cat "$work/push.json")
    grep -q '"verified":true' "$work/guest.json" || { ((status)) || status=102; }
    if ((status)); then
        fail "$name: exit status $status" "$work/push.err" "$work/dest.log" "$work/guest.log" "$work/writer.err"
        return 1
    fi
}

if start_writer ready whole write; then
    if migrate_source "a whole migration on the adapter's write log" \
        --dirty-log uffd-wp --verify-dirty-log; then
        if grep -q '"dirtyLog":"uffd-wp"' <<<"$summary" && grep -q '"missedByDirtyLog":0[,}]' <<<"$summary"; then
            [[ -n ${VERBOSE:-} ]] && echo "$summary"
            say "ok: a whole migration on the adapter's write log: uffd-wp, nothing missed, the guest verified"
        else
            fail "the migration did not use the write log, or it missed pages: $summary" "$work/writer.err"
        fi
    fi
    stop_writer
fi

if start_writer ready twice write; then
    expect_offer "a second mapping of the RAM file: unavailable, and why" \
        "~^unavailable: the source VMM maps $src a second time .*would not be in the write log"
    if migrate_source "--dirty-log auto without a write log" --dirty-log auto; then
        if grep -q '"dirtyLog":"hash"' <<<"$summary" &&
            grep -q '"dirtyLogFallback":"[^"]*a second time' <<<"$summary"; then
            say "ok: --dirty-log auto falls back to hashing, saying why; the guest verified"
        else
            fail "--dirty-log auto did not fall back to hash with the reason: $summary"
        fi
    fi
    stop_writer
fi

if ((failures)); then
    say "FAIL: $failures case(s)"
    exit 1
fi
say "PASS"
