#!/usr/bin/env bash
# The same guest and workload as qemu/migrate.sh, migrated by QEMU's own
# postcopy instead of postcopyd: capabilities postcopy-ram and (on the
# destination) postcopy-blocktime, and postcopy-preempt with PREEMPT=1.
# Precopy runs for PRECOPY_SECONDS, then migrate-start-postcopy. The
# figures are the ones qemu/migrate.sh reports, for docs/benchmarks.md.
#
#   PREEMPT=0|1 SIZE=512M PRECOPY_SECONDS=5 RESULT=out.json qemu/compare-qemu-postcopy.sh
#
# PRECOPY_MBPS=N caps precopy at N MiB/s (max-bandwidth; postcopy is not
# capped), as it caps postcopy-push in qemu/migrate.sh.
#
# RAM=file (the default) puts guest RAM in a shared file in /dev/shm on
# both sides, as migrate.sh does; RAM=anonymous gives QEMU its usual
# memory-backend-ram. On these machines QEMU 7.2's own migration of a TCG
# guest on shared-file RAM was seen to oops the guest (docs/benchmarks.md). QEMU's bandwidth limits
# are lifted so that the link, not a setting, bounds both.
#
# Fails unless the guest verified and QEMU really switched to postcopy
# (postcopy-bytes > 0); the figures are written either way.
set -euo pipefail

name=compare
PREEMPT=${PREEMPT:-0}
RAM=${RAM:-file}
source "$(dirname "$0")/common.sh"
require "$GUEST/vmlinuz" "$GUEST/initrd.gz"

# Called as $(backend side), in a subshell: the files are listed for
# removal here, in the script's own shell.
removals+=("/dev/shm/postcopy-compare-source.$$" "/dev/shm/postcopy-compare-destination.$$")
backend() {  # side → the memory backend's arguments
    if [[ $RAM == anonymous ]]; then
        echo "memory-backend-ram,id=ram,size=$SIZE"
    else
        echo "memory-backend-file,id=ram,size=$SIZE,mem-path=/dev/shm/postcopy-compare-$1.$$,share=on"
    fi
}
say "accelerator: $accel; QEMU's own postcopy$( ((PREEMPT)) && echo ' with postcopy-preempt')"

console source
"$QEMU" -accel "$accel" -m "${mem_mib}M" -object "$(backend source)" "${guest_args[@]}" "${console_args[@]}" \
    -qmp "unix:$work/source.qmp,server=on,wait=off" >"$work/source-qemu.log" 2>&1 &
pids+=($!)
wait_line "$work/source.log" "POSTCOPY-GUEST READY" 180 "the guest to fill its memory" >/dev/null

console destination
"$QEMU" -accel "$accel" -m "${mem_mib}M" -object "$(backend destination)" "${guest_args[@]}" "${console_args[@]}" \
    -incoming defer -qmp "unix:$work/destination.qmp,server=on,wait=off" >"$work/destination-qemu.log" 2>&1 &
pids+=($!)

capabilities='{"capability":"postcopy-ram","state":true}'
((PREEMPT)) && capabilities+=',{"capability":"postcopy-preempt","state":true}'
for side in source destination; do
    wait_qmp "$work/$side.qmp"
    extra=""
    [[ $side == destination ]] && extra=',{"capability":"postcopy-blocktime","state":true}'
    qmp "$work/$side.qmp" migrate-set-capabilities "{\"capabilities\":[$capabilities$extra]}" >/dev/null
    # A 1 ms downtime limit keeps precopy from finishing on its own, so
    # that postcopy starts after PRECOPY_SECONDS as postcopyd's does.
    # max-postcopy-bandwidth 0: postcopy is not capped, whatever precopy's cap.
    bandwidth=$((PRECOPY_MBPS > 0 ? PRECOPY_MBPS << 20 : 107374182400))
    qmp "$work/$side.qmp" migrate-set-parameters "{\"max-bandwidth\":$bandwidth,\"max-postcopy-bandwidth\":0,\"downtime-limit\":1}" >/dev/null
done
port=$(free_port)
qmp "$work/destination.qmp" migrate-incoming "{\"uri\":\"tcp:127.0.0.1:$port\"}" >/dev/null

say "precopy for ${PRECOPY_SECONDS} s while the guest runs, then migrate-start-postcopy"
echo r >"$work/source.in"
wait_line "$work/source.log" "POSTCOPY-GUEST RESET" 30 "the guest to reset its stall figures" >/dev/null
qmp "$work/source.qmp" migrate "{\"uri\":\"tcp:127.0.0.1:$port\"}" >/dev/null
sleep "$PRECOPY_SECONDS"
started=$(date +%s.%N)
qmp "$work/source.qmp" migrate-start-postcopy >/dev/null
qmp "$work/source.qmp" wait-migration 600 >"$work/source-migrate.json" || fail "QEMU's migration failed"
ended=$(date +%s.%N)
qmp "$work/destination.qmp" wait-status running 60 >/dev/null || fail "the destination guest is not running"
qmp "$work/destination.qmp" query-migrate >"$work/destination-migrate.json"
source_status=$(qmp "$work/source.qmp" query-status | jq -r .status)

say "migration complete: the guest verifies its memory on the destination"
verify_guest destination

figures=$(jq -n --arg accel "$accel" --arg size "$SIZE" --argjson preempt "$PREEMPT" --arg ram "$RAM" \
    --arg sourceStatus "$source_status" --argjson guest "$(guest_figures)" \
    --argjson postcopySeconds "$(awk "BEGIN { print $ended - $started }")" \
    --slurpfile source "$work/source-migrate.json" --slurpfile destination "$work/destination-migrate.json" \
    '{accel: $accel, size: $size, preempt: ($preempt == 1), ram: $ram, sourceStatus: $sourceStatus} + $guest + {
      # With almost no precopy, this QEMU sometimes reports a downtime of
      # about the uptime of the host (59745740 ms): one longer than the whole
      # migration is no figure, and is left out.
      downtimeMs: (if $source[0].downtime <= $source[0]["total-time"] then $source[0].downtime else null end),
      totalMs: $source[0]["total-time"],
      postcopySeconds: $postcopySeconds,
      postcopyRequests: $source[0].ram["postcopy-requests"], postcopyBytes: $source[0].ram["postcopy-bytes"],
      enteredPostcopy: ($source[0].ram["postcopy-bytes"] > 0),
      pagesSent: $source[0].ram.normal, dirtySyncCount: $source[0].ram["dirty-sync-count"],
      blocktimeMs: $destination[0]["postcopy-blocktime"],
      vcpuBlocktimeMs: $destination[0]["postcopy-vcpu-blocktime"]}')
[[ -n $RESULT ]] && echo "$figures" >"$RESULT"
echo "$figures" | jq -c .
[[ $verdict == *"VERIFY PASS"* ]] || fail "the guest found its memory wrong: $verdict"
(($(echo "$figures" | jq .postcopyBytes) > 0)) || fail "QEMU finished in precopy: nothing was sent in postcopy"
say "PASS: QEMU's own postcopy; guest verified"
