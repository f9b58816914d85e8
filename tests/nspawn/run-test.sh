#!/bin/bash
# Runs inside the systemd-nspawn container of scripts/test-systemd-nspawn.sh,
# started by postcopyd-nspawn-test.service once the container's systemd
# (PID 1) is up. It drives the real postcopyd@test unit through a whole
# migration and checks what systemd sees of it: READY=1, the status text,
# the control socket, the hardening in force, the journal records and their
# catalog texts, and a clean exit. Then a second migration whose daemon is
# killed (SIGKILL) during postcopy: systemd restarts it, it takes the
# migration over from the fd store, and the guest still verifies. It ends the container with `systemctl exit
# 0` on a pass and `systemctl exit 1` on a failure, the reason printed first.
#
# stdout and stderr go to the journal and to the console, which
# systemd-nspawn --console=read-only copies to the host's stdout.
set -euo pipefail

# From the host: PORT, SIZE, BINDIR, RESULTS (a directory the host reads back).
# shellcheck source=/dev/null
source /opt/postcopyd-test/test.env
export PATH=$BINDIR:$PATH

readonly INSTANCE=test
readonly UNIT=postcopyd@$INSTANCE.service
readonly SOCKDIR=/run/postcopyd/$INSTANCE
readonly WORK=/run/postcopyd-nspawn-test
readonly SOURCE_RAM=/dev/shm/postcopyd-nspawn-source
# The agent's side of the TLS the instance's config asks for.
readonly TLS=(--tls-ca /etc/postcopyd/tls/ca.pem --tls-cert /etc/postcopyd/tls/agent.pem --tls-key /etc/postcopyd/tls/agent.key)
# MESSAGE_IDs of the daemon's records (Sources/PostcopyCore/Service/DaemonEvent.swift).
readonly ID_READY=b99b2c1a1273418cb585442989372fa0
readonly ID_ACCEPTED=e2aaf165d3814a388208aabe58391c7a
readonly ID_ATTACHED=92596745fecc410095d3741bae74377a
readonly ID_SWITCHOVER=2968fddeec3244b8a51a16e2fc84e6f9
readonly ID_COMPLETE=5006448c75c84692b38c4e23125a483a
readonly ID_FAILED=3cc5a6c412d04c27a3eb3ed27442dc86
readonly ID_TAKEN_OVER=ea930c537fa5448ba7cbf921af607dd0

step=starting
pids=()
say() { echo "run-test: $*"; }
ok() { say "ok: $*"; }
fail() { say "FAIL ($step): $*"; exit 1; }

# On any exit: stop what this script started, leave the evidence where the
# host finds it, and end the container with the verdict.
finish() {
    local rc=$?
    trap - EXIT
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -f "$SOURCE_RAM"
    if [[ $rc -ne 0 ]]; then
        # Where it happened (also for a failure that fail() did not report:
        # set -e, a signal), then the evidence.
        say "FAIL: exit status $rc during: $step"
        say "---- systemctl status $UNIT"
        systemctl status --no-pager --full "$UNIT" 2>&1 || true
        say "---- journalctl -u $UNIT"
        journalctl --no-pager -o short-monotonic -u "$UNIT" 2>&1 | tail -n 80 || true
        for f in "$WORK"/*.json "$WORK"/*.err; do
            [[ -s $f ]] && { say "---- $f"; tail -n 40 "$f"; }
        done
        journalctl --no-pager -b -o short-monotonic >"$RESULTS/journal.txt" 2>&1 || true
        echo FAIL >"$RESULTS/result"
    else
        echo PASS >"$RESULTS/result"
    fi
    journalctl --no-pager -o cat -u postcopyd-nspawn-test.service >"$RESULTS/test.log" 2>&1 || true
    cp -f "$WORK"/*.json "$RESULTS/" 2>/dev/null || true
    sync
    # Asynchronous: queues exit.target, whose stop jobs send this unit a
    # SIGTERM; ignore it, to end with the verdict's own exit status.
    trap '' TERM INT
    systemctl exit "$([[ $rc -eq 0 ]] && echo 0 || echo 1)"
    exit "$rc"
}
trap finish EXIT
# Stopped from outside (the container halted, the unit timed out): still
# report where it stood.
trap 'exit 143' TERM INT

wait_until() {  # seconds, description, command...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq 1 $((seconds * 10))); do
        "$@" && return 0
        sleep 0.1
    done
    fail "timed out after ${seconds}s waiting for $what"
}

json_string() {  # key, file: the first "key":"value" of a JSON object
    grep -o "\"$1\" *: *\"[^\"]*\"" "$2" | head -n 1 | sed 's/.*: *"\(.*\)"/\1/'
}

json_number() {  # key, file: the first "key":number of a JSON object
    grep -o "\"$1\" *: *[0-9]*" "$2" | head -n 1 | sed 's/.*: *//'
}

# Starts the source workload (stderr to $1) and waits until it is ready;
# sets source_pid.
start_source() {
    rm -f "$WORK/source.ready"
    postcopy-guest source --ram "$SOURCE_RAM" --size "$SIZE" --dirty 0.10 --ready-file "$WORK/source.ready" \
        2>"$1" &
    source_pid=$!
    pids+=("$source_pid")
    wait_until 60 "the source workload" test -s "$WORK/source.ready"
}

mkdir -p "$WORK"

# --- the container is what it should be ----------------------------------------
step=environment
[[ $(cat /proc/1/comm) == systemd ]] || fail "PID 1 is $(cat /proc/1/comm), not systemd"
[[ $(systemd-detect-virt --container) == systemd-nspawn ]] || fail "not in systemd-nspawn"
[[ $(stat -fc %T /sys/fs/cgroup) == cgroup2fs ]] ||
    fail "/sys/fs/cgroup is $(stat -fc %T /sys/fs/cgroup), not cgroup2 (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1?)"
[[ $(stat -fc %T /dev/shm) == tmpfs ]] || fail "/dev/shm is not a tmpfs"
[[ -c /dev/userfaultfd ]] || fail "/dev/userfaultfd is not bound into the container"
ok "systemd $(systemctl --version | head -n 1 | cut -d' ' -f2) is PID 1 in systemd-nspawn, cgroup2, /dev/shm tmpfs, /dev/userfaultfd present"

# --- DevicePolicy= really restricts devices here ------------------------------------
# On cgroup2 the container's systemd enforces DevicePolicy=/DeviceAllow= with
# BPF programs; when it cannot load them (nspawn's seccomp filter denies
# bpf(2) unless --system-call-filter=bpf), it runs units with no device
# restrictions at all. A negative control shows the unit's policy means
# something: closed without DeviceAllow must deny /dev/userfaultfd.
step=device-policy
if systemd-run --quiet --wait --pipe -p DevicePolicy=closed \
        /bin/sh -c 'exec 3<>/dev/userfaultfd' 2>"$WORK/devpolicy.err"; then
    fail "DevicePolicy=closed did not deny /dev/userfaultfd: device access control is not enforced in this container"
fi
grep -q 'Operation not permitted' "$WORK/devpolicy.err" ||
    fail "DevicePolicy=closed: unexpected error: $(cat "$WORK/devpolicy.err")"
systemd-run --quiet --wait --pipe -p DevicePolicy=closed -p 'DeviceAllow=/dev/userfaultfd rw' \
    /bin/sh -c 'exec 3<>/dev/userfaultfd' ||
    fail "DevicePolicy=closed with DeviceAllow=/dev/userfaultfd rw denied /dev/userfaultfd"
ok "DevicePolicy=closed denies /dev/userfaultfd (EPERM) and DeviceAllow=/dev/userfaultfd rw lets it through"

# --- binaries, units and catalog ------------------------------------------------------
step=binaries
for program in postcopyd postcopy-push postcopy-guest postcopyctl; do
    "$program" --help >/dev/null 2>"$WORK/help.err" ||
        fail "$program --help failed (Swift runtime in /opt/swift?): $(cat "$WORK/help.err")"
done
ok "postcopyd, postcopy-push, postcopy-guest and postcopyctl run"

step=unit-verify
# systemd-analyze verify loads the unit as PID 1 would and complains about
# unknown keys, bad values and a missing ExecStart binary. (No man pages in
# the container: --man=no.)
systemd-analyze verify --man=no "$UNIT" >"$WORK/verify.err" 2>&1 ||
    fail "systemd-analyze verify $UNIT: $(cat "$WORK/verify.err")"
if grep -q 'postcopyd@' "$WORK/verify.err"; then
    fail "systemd-analyze verify $UNIT complains: $(cat "$WORK/verify.err")"
fi
ok "systemd-analyze verify $UNIT"

step=catalog
journalctl --update-catalog
journalctl --list-catalog "$ID_COMPLETE" | grep -q 'Postcopy complete' ||
    fail "the catalog entry $ID_COMPLETE is not installed"
ok "catalog installed ($(journalctl --list-catalog | grep -c postcopyd) postcopyd entries)"

step=postcopyd-check
systemctl start postcopyd-check.service ||
    fail "postcopyd-check.service failed: $(journalctl --no-pager -o cat -u postcopyd-check.service | tail -n 20)"
ok "postcopyd-check.service: $(journalctl -o cat -u postcopyd-check.service | grep '^result:' || echo 'done')"

# --- start the service ---------------------------------------------------------------
# Type=notify: `systemctl start` returns once the daemon sent READY=1.
step="systemctl start $UNIT"
timeout 120 systemctl start "$UNIT" || fail "systemctl start $UNIT failed"
[[ $(systemctl is-active "$UNIT") == active ]] || fail "$UNIT is $(systemctl is-active "$UNIT") after start"
status=$(systemctl show -P StatusText "$UNIT")
[[ -n $status ]] || fail "StatusText of $UNIT is empty"
[[ ${status,,} == *wait* ]] || fail "StatusText does not mention waiting: '$status'"
ok "$UNIT active after READY=1; StatusText: $status"

step=sockets
[[ -S $SOCKDIR/vmm.sock ]] || fail "no VMM socket $SOCKDIR/vmm.sock"
[[ -S $SOCKDIR/control.sock ]] || fail "no control socket $SOCKDIR/control.sock"
ok "sockets $SOCKDIR/vmm.sock and $SOCKDIR/control.sock"

step=hardening
# The hardening is in force on the running daemon, not just written down.
main_pid=$(systemctl show -P MainPID "$UNIT")
[[ $main_pid -gt 0 ]] || fail "no MainPID"
proc_status=$(cat "/proc/$main_pid/status")
field() { awk -v k="$1:" '$1 == k { print $2 }' <<<"$proc_status"; }
[[ $(field Seccomp) == 2 ]] || fail "daemon has no seccomp filter (Seccomp: $(field Seccomp))"
[[ $(field NoNewPrivs) == 1 ]] || fail "daemon runs without NoNewPrivs"
# CapabilityBoundingSet=CAP_CHOWN: bit 0 only.
[[ $((16#$(field CapBnd))) -eq 1 ]] || fail "daemon's bounding set is $(field CapBnd), not CAP_CHOWN alone"
systemctl show -P DeviceAllow "$UNIT" | grep -q '/dev/userfaultfd rw' || fail "DeviceAllow lost /dev/userfaultfd"
[[ $(systemctl show -P DevicePolicy "$UNIT") == closed ]] || fail "DevicePolicy is not closed"
ok "daemon pid $main_pid: Seccomp 2, NoNewPrivs 1, CapBnd $(field CapBnd), DevicePolicy closed"

step="postcopyctl status"
postcopyctl status "$INSTANCE" --json >"$WORK/ctl-start.json" 2>"$WORK/ctl.err" ||
    fail "postcopyctl status $INSTANCE --json: $(cat "$WORK/ctl.err")"
phase=$(json_string phase "$WORK/ctl-start.json")
[[ -n $phase ]] || fail "postcopyctl status --json has no phase: $(cat "$WORK/ctl-start.json")"
postcopyctl status "$INSTANCE" >"$WORK/ctl-start.txt" 2>"$WORK/ctl.err" ||
    fail "postcopyctl status $INSTANCE: $(cat "$WORK/ctl.err")"
ok "postcopyctl status: phase $phase"

# --- a whole migration into the service -------------------------------------------
step="source workload"
start_source "$WORK/source.err"
ok "source workload pid $source_pid: $SIZE in $SOURCE_RAM"

step="reference VMM"
postcopy-guest vmm --socket "$SOCKDIR/vmm.sock" --json >"$WORK/guest.json" 2>"$WORK/guest.err" &
guest_pid=$!
pids+=("$guest_pid")

step=migration
started_ns=$(date +%s%N)
push_rc=0
timeout 150 postcopy-push --ram "$SOURCE_RAM" --to "127.0.0.1:$PORT" --pause-pid "$source_pid" --quiet --json "${TLS[@]}" \
    >"$WORK/push.json" 2>"$WORK/push.err" || push_rc=$?
[[ $push_rc -eq 0 ]] || fail "postcopy-push exited $push_rc: $(tail -n 20 "$WORK/push.err")"
guest_rc=0
wait "$guest_pid" || guest_rc=$?
[[ $guest_rc -eq 0 ]] || fail "the reference VMM exited $guest_rc: $(tail -n 20 "$WORK/guest.err")"
grep -q 'verify: PASS' "$WORK/guest.err" || fail "the reference VMM did not verify the image"
migration_id=$(json_string migrationID "$WORK/push.json")
[[ $migration_id =~ ^[0-9a-f]{32}$ ]] || fail "no migration id in postcopy-push's summary: $(cat "$WORK/push.json")"
elapsed_ms=$(( ($(date +%s%N) - started_ns) / 1000000 ))
ok "migration $migration_id of $SIZE in ${elapsed_ms} ms: postcopy-push exit 0, reference VMM $(grep -o 'verify: PASS' "$WORK/guest.err")"
# The workload is stopped (SIGSTOP at switchover): it has served its purpose.
{ kill -KILL "$source_pid" && wait "$source_pid"; } 2>/dev/null || true

# --- the unit ends by itself, successfully ------------------------------------------
step="unit exit"
unit_done() { [[ $(systemctl show -P ActiveState "$UNIT") =~ ^(inactive|failed)$ ]]; }
wait_until 60 "$UNIT to exit after the migration" unit_done
result=$(systemctl show -P Result "$UNIT")
exit_status=$(systemctl show -P ExecMainStatus "$UNIT")
[[ $result == success && $exit_status == 0 ]] ||
    fail "$UNIT ended with Result=$result, exit status $exit_status"
[[ $(systemctl show -P ActiveState "$UNIT") == inactive ]] || fail "$UNIT is not inactive"
[[ ! -e $SOCKDIR ]] || fail "RuntimeDirectory $SOCKDIR left behind"
ok "$UNIT inactive, Result=success, exit status 0, $SOCKDIR removed"
# test.conf names a RAM file (ram-file =), as a QEMU on postcopyd needs: the
# daemon created it under the unit's hardening, and removed it at the end.
[[ ! -e /dev/shm/postcopyd-test.ram ]] || fail "the RAM file /dev/shm/postcopyd-test.ram outlived postcopyd"

# --- the journal ---------------------------------------------------------------------------
step=journal
journalctl --sync
unit_json=$(journalctl --no-pager -o json -u "$UNIT")
for id in "$ID_READY" "$ID_ACCEPTED" "$ID_ATTACHED" "$ID_SWITCHOVER" "$ID_COMPLETE"; do
    grep -q "\"MESSAGE_ID\":\"$id\"" <<<"$unit_json" ||
        fail "journalctl -u $UNIT has no record with MESSAGE_ID=$id"
done
if grep -q "\"MESSAGE_ID\":\"$ID_FAILED\"" <<<"$unit_json"; then
    fail "journalctl -u $UNIT has a failure record"
fi
ok "journalctl -u $UNIT: ready, accepted, VMM attached, switchover and complete records"
grep -q '"MEMORY":"file /dev/shm/postcopyd-test.ram (shmem, 4 KiB pages)"' <<<"$unit_json" ||
    fail "the ready record does not name the RAM file /dev/shm/postcopyd-test.ram"
ok "guest RAM was the named file /dev/shm/postcopyd-test.ram (ram-file), created and removed under the unit's hardening"

complete=$(journalctl --no-pager -o json "MESSAGE_ID=$ID_COMPLETE")
[[ $(grep -c . <<<"$complete") -eq 1 ]] || fail "expected one MESSAGE_ID=$ID_COMPLETE record, found: $complete"
grep -q "\"MIGRATION_ID\":\"$migration_id\"" <<<"$complete" ||
    fail "the complete record lacks MIGRATION_ID=$migration_id: $complete"
grep -q '"PHASE":"' <<<"$complete" || fail "the complete record has no PHASE: $complete"
grep -q "\"_SYSTEMD_UNIT\":\"$UNIT\"" <<<"$complete" || fail "the complete record is not attributed to $UNIT"
ok "MESSAGE_ID=$ID_COMPLETE: MIGRATION_ID=$migration_id, $(grep -o '"PHASE":"[^"]*"' <<<"$complete")"

journalctl --no-pager -x -u "$UNIT" >"$WORK/journal-x.txt"
grep -q 'Subject: Postcopy complete' "$WORK/journal-x.txt" ||
    fail "journalctl -x -u $UNIT does not show the catalog's 'Postcopy complete' subject"
ok "journalctl -x: $(grep -o 'Subject: Postcopy complete.*' "$WORK/journal-x.txt" | head -n 1)"

# --- a crash during postcopy: systemd restarts the daemon, which takes over -----
step="crash: systemctl start $UNIT"
timeout 120 systemctl start "$UNIT" || fail "systemctl start $UNIT (second migration) failed"
start_source "$WORK/source2.err"
# The guest's threads touch a tenth of RAM, working 2 ms between touches, so
# that they still fault when the daemon has been replaced.
postcopy-guest vmm --socket "$SOCKDIR/vmm.sock" --touch 0.1 --think-us 2000 --reattach-timeout 60 --json \
    >"$WORK/guest2.json" 2>"$WORK/guest2.err" &
guest_pid=$!
pids+=("$guest_pid")
# The background paced, so that postcopy lasts seconds.
postcopy-push --ram "$SOURCE_RAM" --to "127.0.0.1:$PORT" --pause-pid "$source_pid" --quiet --json "${TLS[@]}" \
    --postcopy-bandwidth 2 --dead-peer-timeout 1 --reconnect-timeout 60 >"$WORK/push2.json" 2>"$WORK/push2.err" &
push_pid=$!
pids+=("$push_pid")

step="crash: postcopy serving"
serving() {
    postcopyctl status "$INSTANCE" --json >"$WORK/ctl-crash.json" 2>/dev/null || return 1
    [[ $(json_string phase "$WORK/ctl-crash.json") == postcopy && $(json_number faultsStale "$WORK/ctl-crash.json") -gt 0 ]]
}
wait_until 120 "postcopy to serve a stale fault" serving
sleep 0.2
first_pid=$(systemctl show -P MainPID "$UNIT")
step="crash: kill -9 pid $first_pid"
systemctl kill --kill-whom=main -s SIGKILL "$UNIT"
restarted() {
    local pid
    pid=$(systemctl show -P MainPID "$UNIT")
    [[ $pid -gt 0 && $pid != "$first_pid" && $(systemctl show -P NRestarts "$UNIT") -ge 1 ]]
}
wait_until 30 "systemd to restart $UNIT" restarted
ok "killed postcopyd pid $first_pid during postcopy ($(json_number stalePagesLeft "$WORK/ctl-crash.json") pages stale); systemd restarted it as pid $(systemctl show -P MainPID "$UNIT")"

step="crash: migration"
push_rc=0
wait "$push_pid" || push_rc=$?
[[ $push_rc -eq 0 ]] || fail "postcopy-push exited $push_rc after the crash: $(tail -n 20 "$WORK/push2.err")"
guest_rc=0
wait "$guest_pid" || guest_rc=$?
[[ $guest_rc -eq 0 ]] || fail "the reference VMM exited $guest_rc after the crash: $(tail -n 20 "$WORK/guest2.err")"
grep -q 'verify: PASS' "$WORK/guest2.err" || fail "the reference VMM did not verify the image after the crash"
grep -q 'reattached to a restarted postcopyd 1 times' "$WORK/guest2.err" ||
    fail "the reference VMM did not reattach once: $(tail -n 20 "$WORK/guest2.err")"
{ kill -KILL "$source_pid" && wait "$source_pid"; } 2>/dev/null || true
wait_until 60 "$UNIT to exit after the migration" unit_done
result=$(systemctl show -P Result "$UNIT")
exit_status=$(systemctl show -P ExecMainStatus "$UNIT")
[[ $result == success && $exit_status == 0 ]] ||
    fail "$UNIT ended with Result=$result, exit status $exit_status after taking over"
ok "after the crash: postcopy-push exit 0, reference VMM $(grep -o 'verify: PASS' "$WORK/guest2.err") (reattached once), $UNIT Result=success"

step="crash: journal"
journalctl --sync
taken=$(journalctl --no-pager -o json "MESSAGE_ID=$ID_TAKEN_OVER")
[[ $(grep -c . <<<"$taken") -eq 1 ]] || fail "expected one MESSAGE_ID=$ID_TAKEN_OVER record, found: $taken"
grep -q '"TAKEOVER_SOURCE":"systemd' <<<"$taken" || fail "the takeover did not come from the fd store: $taken"
journalctl --no-pager -x "MESSAGE_ID=$ID_TAKEN_OVER" | grep -q 'Subject: Migration .* taken over' ||
    fail "journalctl -x does not explain the takeover record"
ok "MESSAGE_ID=$ID_TAKEN_OVER: $(grep -o '"MESSAGE":"[^"]*"' <<<"$taken" | head -c 200)"

step=finished
say "PASS"
