#!/usr/bin/env bash
# libpostcopy-vmm.so against a real postcopyd, without QEMU: what it leaves
# alone and what it refuses. Each case runs preload/test/map-file (a VMM's
# guest-RAM mapping, QEMU-style) with the adapter preloaded and checks what
# the program saw and what the adapter said. Root only (postcopyd's
# userfaultfd checks, and a case run as another uid).
#
#   BIN=.build/debug PRELOAD=.build/preload/libpostcopy-vmm.so bash preload/test/adapter-test.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

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
daemon=
cleanup() {
    [[ -n $daemon ]] && kill -KILL "$daemon" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work" "$ram" "$other"
}
trap cleanup EXIT
$CC -O2 -Wall -Wextra -Werror -o "$work/map-file" preload/test/map-file.c
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
# A whole migration through the adapter: a VMM that maps guest RAM and
# runs on while postcopy-push migrates a source of zeros. The adapter takes
# VMM_RESUME (no payload: the page-state record's descriptor), then
# VMM_COMPLETE (the source's image digest, which postcopyd waits for),
# releases the range and answers; postcopyd completes.
start_daemon
truncate -s "$size" "$work/source"
"${preloaded[@]}" "$work/map-file" "$ram" "$size" no-touch hold >/dev/null 2>"$work/vmm.err" &
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
kill "$vmm" 2>/dev/null || true
wait "$vmm" 2>/dev/null || true
if ((push == 0 && served == 0)) && grep -q "postcopyd serves guest RAM now (VMM_RESUME)" "$work/vmm.err" &&
    grep -q "guest RAM released: postcopy is complete" "$work/vmm.err"; then
    say "ok: a whole migration: VMM_RESUME, then VMM_COMPLETE with the digest, answered"
else
    say "FAIL: a whole migration through the adapter (postcopy-push exit $push, postcopyd exit: $served)"
    tail -n 5 "$work/push.err" "$work/daemon.log" "$work/vmm.err" >&2
    failures=$((failures + 1))
fi
if ((failures)); then
    say "FAIL: $failures case(s)"
    exit 1
fi
say "PASS"
