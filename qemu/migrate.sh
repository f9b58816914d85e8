#!/usr/bin/env bash
# Migrates a running QEMU guest with postcopyd serving its memory on the
# destination: unmodified QEMU, guest RAM in a shared file on both sides,
# libpostcopy-vmm.so preloaded into both QEMUs (on the source it registers
# guest RAM for uffd-wp dirty tracking, on the destination it hands the
# guest's faults to postcopyd). postcopy-push drives the source QEMU over
# QMP (--qmp): no process starts at switchover. Both ends run on this
# machine over loopback; docs/operations.md ("Migrating a QEMU guest") walks
# through the same steps by hand.
#
#   qemu/migrate.sh                  one migration, then the guest's verdict
#
# Settings (environment):
#   SIZE=512M        guest RAM
#   MEMORY=shmem     destination memory: shmem (a file in /dev/shm) or
#                    hugetlbfs (a file in HUGETLBFS_DIR, 2 MiB pages)
#   ACCEL=auto       kvm, tcg, or auto: KVM when a guest boots with it here
#   BIN=.build/debug postcopyd and postcopy-push
#   PRELOAD=…        libpostcopy-vmm.so (default .build/preload/, make preload)
#   GUEST=…          where qemu/build-guest.sh put vmlinuz and initrd.gz
#   PRECOPY_SECONDS  precopy runs this long (default 30), unless a round
#                    resends fewer than 256 pages first
#   PRECOPY_MBPS=N   cap precopy at N MiB/s (postcopy-push --max-bandwidth;
#                    default 0, none)
#   BACKGROUND_SCHEDULING=idle|normal|nice:N  --background-scheduling for
#                    postcopyd and postcopy-push (default: theirs, idle)
#   RESULT=path      write the figures as JSON here
#   KEEP=1           keep the work directory (logs) after the run
#   DIRTY_LOG=uffd-wp  the agent's dirty log: uffd-wp (the preloaded adapter
#                    registers the source QEMU's RAM) or hash
#   VERIFY_DIRTY_LOG=1 also hash every page after each scan of the log and
#                    fail on a page it missed (postcopy-push --verify-dirty-log)
#   FAIL_SWITCHOVER=1  no destination QEMU: postcopyd gives up waiting for
#                    its VMM at switchover, after the source QEMU stopped its
#                    vCPUs; the source must run on and its guest verify there
#   FAIL_HANDOVER=1  the source QEMU has a device the destination lacks, so
#                    the destination cannot load the device state after
#                    RESUMED: the source QEMU must run on (before the point of
#                    no return), postcopyd must discard its copy, and the
#                    guest must verify on the source
#   KILL_DAEMON=1    kill -9 postcopyd right after VMM_RESUME, and start
#                    another with --takeover: the adapter hands it the guest,
#                    the agent rejoins it, and the guest still verifies
#
# Exit status 0 only when the guest verified every page on the destination,
# postcopyd served stale faults, and the source QEMU stayed paused (with
# FAIL_SWITCHOVER or FAIL_HANDOVER: when the guest verified on the source,
# which runs on).
set -euo pipefail

name=migrate
MEMORY=${MEMORY:-shmem}
BIN=${BIN:-.build/debug}
PRELOAD=${PRELOAD:-.build/preload/libpostcopy-vmm.so}
HUGETLBFS_DIR=${HUGETLBFS_DIR:-/dev/hugepages}
TLS=${TLS:-1}
KILL_DAEMON=${KILL_DAEMON:-0}
FAIL_SWITCHOVER=${FAIL_SWITCHOVER:-0}
FAIL_HANDOVER=${FAIL_HANDOVER:-0}
DIRTY_LOG=${DIRTY_LOG:-uffd-wp}
VERIFY_DIRTY_LOG=${VERIFY_DIRTY_LOG:-0}
case $MEMORY in
    shmem | hugetlbfs) ;;
    *) echo "migrate: MEMORY is shmem or hugetlbfs, not $MEMORY" >&2; exit 2 ;;
esac
source "$(dirname "$0")/common.sh"
require "$BIN/postcopyd" "$BIN/postcopy-push" "$PRELOAD" "$GUEST/vmlinuz" "$GUEST/initrd.gz"
source_ram=/dev/shm/postcopy-qemu-source.$$
case $MEMORY in
    shmem) destination_ram=/dev/shm/postcopy-qemu-destination.$$ ;;
    hugetlbfs) destination_ram=$HUGETLBFS_DIR/postcopy-qemu-destination.$$ ;;
esac
removals+=("$source_ram" "$destination_ram")

say "accelerator: $accel"

say "source QEMU: $SIZE guest in $source_ram (dirty log: $DIRTY_LOG)"
console source
source_env=()
# A device only the source has: its section in the device state is unknown
# to the destination, whose load then fails after postcopyd resumed.
source_extra=()
((FAIL_HANDOVER)) && source_extra=(-device virtio-rng-pci,id=only-on-the-source)
[[ $DIRTY_LOG == uffd-wp ]] && source_env=(LD_PRELOAD="$(realpath "$PRELOAD")" POSTCOPY_SOURCE_RAM="$source_ram"
                                           POSTCOPY_SOURCE_SOCKET="$work/dirty-log.sock")
env "${source_env[@]}" "$QEMU" -accel "$accel" -m "${mem_mib}M" -object "memory-backend-file,id=ram,size=$SIZE,mem-path=$source_ram,share=on" \
    "${guest_args[@]}" "${source_extra[@]}" "${console_args[@]}" \
    -qmp "unix:$work/source.qmp,server=on,wait=off" >"$work/source-qemu.log" 2>&1 &
pids+=($!)
wait_line "$work/source.log" "POSTCOPY-GUEST READY" 180 "the guest to fill its memory" >/dev/null

if [[ $TLS == 1 ]]; then
    bash "$here/../scripts/make-test-certs.sh" "$work/tls" >/dev/null
    daemon_tls=(--tls-ca "$work/tls/ca.pem" --tls-cert "$work/tls/daemon.pem" --tls-key "$work/tls/daemon.key"
                --tls-client-name postcopy-agent)
    agent_tls=(--tls-ca "$work/tls/ca.pem" --tls-cert "$work/tls/agent.pem" --tls-key "$work/tls/agent.key")
else
    daemon_tls=(--insecure-plaintext)
    agent_tls=(--insecure-plaintext)
fi

# A daemon restarted after KILL_DAEMON must listen where the agent rejoins.
port=0
((KILL_DAEMON)) && port=$(free_port)
daemon_args=(--instance qemu --listen "127.0.0.1:$port" --vmm-socket "$work/vmm.sock" --control-socket "$work/control.sock"
             "${daemon_tls[@]}" --json)
if [[ -n ${BACKGROUND_SCHEDULING:-} ]]; then daemon_args+=(--background-scheduling "$BACKGROUND_SCHEDULING"); fi
say "destination: postcopyd owns $destination_ram ($MEMORY)"
fail_args=()
((FAIL_SWITCHOVER)) && fail_args=(--vmm-timeout 2)
"$BIN/postcopyd" serve "${daemon_args[@]}" --memory "$MEMORY" --size "$SIZE" --ram-file "$destination_ram" \
    "${fail_args[@]}" --ready-file "$work/daemon.ready" >"$work/daemon.json" 2>"$work/daemon.log" &
daemon_pid=$!
pids+=("$daemon_pid")
for _ in $(seq 1 300); do [[ -s $work/daemon.ready ]] && break; sleep 0.1; done
[[ -s $work/daemon.ready ]] || fail "postcopyd did not start"

# After a failure before the point of no return: the source QEMU must be
# running again, not merely still there (QEMU restarts the vCPUs when the
# failed or cancelled migration is cleaned up), and its guest verify there.
source_runs_on() {  # what failed
    local status
    status=$(qmp "$work/source.qmp" query-status | jq -r .status)
    [[ $status == running ]] || fail "the source QEMU is '$status' after the failed $1, not running"
    verify_guest source
    [[ $verdict == *"VERIFY PASS"* ]] || fail "the source guest found its memory wrong after the failed $1: $verdict"
}

if ((FAIL_SWITCHOVER)); then
    # The switchover fails after the source QEMU stopped its vCPUs and
    # before postcopyd resumed anything: postcopy-push must cancel the
    # source's migration, so that the guest runs on where it was.
    say "no destination QEMU: postcopyd will give up at switchover; the source must run on"
    wait_qmp "$work/source.qmp"
    set +e
    "$BIN/postcopy-push" --ram "$source_ram" --to "$(cat "$work/daemon.ready")" "${agent_tls[@]}" \
        --migration-secret-file "$work/migration.secret" --quiet --json --max-rounds 2 \
        --qmp "$work/source.qmp" --qmp-migrate-uri "unix:$work/device-state.sock" \
        --dirty-log "$DIRTY_LOG" $([[ $DIRTY_LOG == uffd-wp ]] && echo --dirty-log-socket "$work/dirty-log.sock") \
        >"$work/push.json" 2>"$work/push.log"
    push_status=$?
    wait "$daemon_pid"
    set -e
    ((push_status != 0)) || fail "postcopy-push succeeded although no VMM ever attached"
    grep -q "switchover failed before the destination resumed: resuming the source" "$work/push.log" ||
        fail "postcopy-push did not resume the source: $(tail -3 "$work/push.log")"
    source_runs_on "switchover"
    say "PASS: the switchover failed before RESUMED; the source QEMU runs on and its guest verified there"
    exit 0
fi

say "destination QEMU: maps $destination_ram with libpostcopy-vmm.so preloaded, waits for the device state"
console destination
LD_PRELOAD=$(realpath "$PRELOAD") POSTCOPY_VMM_SOCKET="$work/vmm.sock" \
    "$QEMU" -accel "$accel" -m "${mem_mib}M" -object "memory-backend-file,id=ram,size=$SIZE,mem-path=$destination_ram,share=on,align=2M" \
    "${guest_args[@]}" "${console_args[@]}" -incoming defer \
    -qmp "unix:$work/destination.qmp,server=on,wait=off" >"$work/destination-qemu.log" 2>&1 &
pids+=($!)
wait_line "$work/destination-qemu.log" "handed to postcopyd|postcopy-vmm: .*(cannot|refus|lacks)" 60 \
    "the destination QEMU to attach" | grep -q "handed to postcopyd" || fail "the adapter did not attach"
# The destination takes the device state alone (x-ignore-shared) and,
# started without -S, runs the guest by itself once it has loaded it.
# postcopy-push sets the source's capabilities itself (--qmp).
wait_qmp "$work/source.qmp"
wait_qmp "$work/destination.qmp"
qmp "$work/destination.qmp" migrate-set-capabilities '{"capabilities":[{"capability":"x-ignore-shared","state":true}]}' >/dev/null
qmp "$work/destination.qmp" migrate-incoming "{\"uri\":\"unix:$work/device-state.sock\"}" >/dev/null

push_extra=(--dirty-log "$DIRTY_LOG")
if [[ -n ${BACKGROUND_SCHEDULING:-} ]]; then push_extra+=(--background-scheduling "$BACKGROUND_SCHEDULING"); fi
[[ $DIRTY_LOG == uffd-wp ]] && push_extra+=(--dirty-log-socket "$work/dirty-log.sock")
((VERIFY_DIRTY_LOG)) && push_extra+=(--verify-dirty-log)
((PRECOPY_MBPS > 0)) && push_extra+=(--max-bandwidth "$PRECOPY_MBPS")
# Slow back-fill leaves the guest's own faults to the restarted postcopyd.
((KILL_DAEMON)) && push_extra+=(--postcopy-bandwidth 1)
say "precopy for ${PRECOPY_SECONDS} s while the guest runs, then switchover"
echo r >"$work/source.in"
wait_line "$work/source.log" "POSTCOPY-GUEST RESET" 30 "the guest to reset its stall figures" >/dev/null
set +e
"$BIN/postcopy-push" --ram "$source_ram" --to "$(cat "$work/daemon.ready")" "${agent_tls[@]}" \
    --migration-secret-file "$work/migration.secret" --quiet --json \
    --max-precopy-seconds "$PRECOPY_SECONDS" --max-rounds 1000 \
    --qmp "$work/source.qmp" --qmp-migrate-uri "unix:$work/device-state.sock" \
    "${push_extra[@]}" >"$work/push.json" 2>"$work/push.log" &
push_pid=$!
pids+=("$push_pid")
if ((KILL_DAEMON)); then
    # postcopyd dies right after VMM_RESUME, while the hand-over starts the
    # guest: every stale fault then waits for a restarted postcopyd, which
    # takes the migration over from what the adapter hands back; the agent
    # rejoins it.
    wait_line "$work/destination-qemu.log" "VMM_RESUME" 600 "VMM_RESUME" >/dev/null
    say "killing postcopyd (SIGKILL) at the start of postcopy; a new one takes over (--takeover)"
    kill -KILL "$daemon_pid"
    wait "$daemon_pid" 2>/dev/null
    mv "$work/daemon.log" "$work/daemon-killed.err"
    "$BIN/postcopyd" serve "${daemon_args[@]}" --takeover >"$work/daemon.json" 2>"$work/daemon.log" &
    daemon_pid=$!
    pids+=("$daemon_pid")
fi
wait "$push_pid"
push_status=$?
wait "$daemon_pid"
daemon_status=$?
set -e
if ((FAIL_HANDOVER)); then
    # The destination QEMU could not load the device state, so the guest
    # never ran there: the source QEMU runs it again, postcopy-push says so
    # and fails, and postcopyd discards its copy (DISCARD).
    ((push_status != 0)) || fail "postcopy-push succeeded although the destination could not load the device state"
    grep -q "the hand-over failed before the guest ran on the destination" "$work/push.log" ||
        fail "postcopy-push did not report the failed hand-over: $(tail -3 "$work/push.log")"
    grep -q "postcopyd discarded its copy" "$work/push.log" ||
        fail "postcopy-push did not have postcopyd discard its copy: $(tail -3 "$work/push.log")"
    ((daemon_status != 0)) || fail "postcopyd completed a migration whose guest went back to the source"
    grep -q "migration discarded" "$work/daemon.log" || fail "postcopyd did not discard its copy: $(tail -3 "$work/daemon.log")"
    source_runs_on "hand-over"
    say "PASS: the hand-over failed before the point of no return; the source QEMU runs on, its guest verified there, postcopyd discarded its copy"
    exit 0
fi
((push_status == 0)) || fail "postcopy-push failed (status $push_status)"
((daemon_status == 0)) || fail "postcopyd failed (status $daemon_status)"

say "postcopy complete: the guest verifies its memory on the destination"
source_status=$(qmp "$work/source.qmp" query-status | jq -r .status)
destination_status=$(qmp "$work/destination.qmp" query-status | jq -r .status)
verify_guest destination

figures=$(jq -n --arg accel "$accel" --arg memory "$MEMORY" --arg size "$SIZE" --arg sourceStatus "$source_status" \
    --arg destinationStatus "$destination_status" --argjson guest "$(guest_figures)" \
    --slurpfile push "$work/push.json" --slurpfile daemon "$work/daemon.json" \
    '{accel: $accel, memory: $memory, size: $size, sourceStatus: $sourceStatus, destinationStatus: $destinationStatus} + $guest + {
      dirtyLog: $push[0].dirtyLog, missedByDirtyLog: $push[0].missedByDirtyLog,
      precopySeconds: $push[0].precopySeconds, stalePages: $push[0].stalePages, finalScanMs: $push[0].finalScanMs,
      downtimeToResumedMs: $push[0].downtimeMs, guestDowntimeMs: $push[0].guestDowntimeMs,
      guestPauseMs: $push[0].guestPauseMs, handOverMs: $push[0].handOverMs, postcopySeconds: $push[0].postcopySeconds,
      staleFaults: $push[0].destinationFaultsStale, cleanFaults: $push[0].destinationFaultsClean,
      pageRequests: $push[0].pageRequests, daemon: $daemon[0]}')
[[ -n $RESULT ]] && echo "$figures" >"$RESULT"
echo "$figures" | jq -c 'del(.daemon)'

[[ $verdict == *"VERIFY PASS"* ]] || fail "the guest found its memory wrong: $verdict"
[[ $source_status == postmigrate || $source_status == paused ]] || fail "the source QEMU is '$source_status', not paused"
[[ $destination_status == running ]] || fail "the destination QEMU is '$destination_status', not running"
[[ $(echo "$figures" | jq -r .dirtyLog) == "$DIRTY_LOG" ]] || fail "postcopy-push used the $(echo "$figures" | jq -r .dirtyLog) dirty log, not $DIRTY_LOG"
if ((VERIFY_DIRTY_LOG)) && [[ $DIRTY_LOG == uffd-wp ]]; then
    (($(echo "$figures" | jq .missedByDirtyLog) == 0)) || fail "the uffd-wp log missed pages the guest wrote"
fi
(($(echo "$figures" | jq .staleFaults) > 0)) || fail "postcopyd served no stale fault"
if [[ $MEMORY == shmem ]]; then
    # The adapter puts guest RAM back into 2 MiB pages (align=2M above lets
    # QEMU's mapping hold them), at nice 19 beside the running guest.
    collapsed=$(wait_line "$work/destination-qemu.log" "postcopy-vmm: guest RAM (collapsed|stays in 4 KiB)" 120 \
        "the adapter to collapse guest RAM into 2 MiB pages")
    say "${collapsed#*postcopy-vmm: }"
    # Every extent with data mapped huge again; the holes (RAM the guest never touched) stay holes.
    [[ $collapsed =~ pages:\ ([0-9]+)\ of\ ([0-9]+)\ extents\ mapped\ huge\ \([0-9]+\ before\;\ [0-9]+\ collapsed,\ ([0-9]+)\ empty,\ 0\ failed ]] &&
        ((BASH_REMATCH[1] > 0 && BASH_REMATCH[1] + BASH_REMATCH[3] == BASH_REMATCH[2])) ||
        fail "the adapter did not map every extent of guest RAM with data huge again: $collapsed"
fi
if ((KILL_DAEMON)); then
    grep -q "postcopy-vmm: reattached to a restarted postcopyd" "$work/destination-qemu.log" ||
        fail "the adapter never reattached to the restarted postcopyd"
    say "the adapter handed the guest to the restarted postcopyd, which completed postcopy"
fi
say "PASS: $accel guest verified on the destination after postcopy; source QEMU $source_status"
