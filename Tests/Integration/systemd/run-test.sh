#!/bin/bash
# Runs inside the systemd-nspawn container of Tests/Integration/systemd/test-systemd-nspawn.sh,
# started by postcopyd-nspawn-test.service once the container's systemd
# (PID 1) is up. It drives the real postcopyd@test unit through a whole
# migration and checks what systemd sees of it: READY=1, the status text,
# the control socket, the hardening in force, the journal records and their
# catalog texts, and a clean exit. Then a second migration whose daemon is
# killed (SIGKILL) during postcopy: systemd restarts it, it takes the
# migration over from the fd store, and the guest still verifies. Then
# socket activation: postcopyd@activated.socket (the agent's port from a
# drop-in) starts postcopyd@activated.service when the agent connects, the
# daemon serves the migration on the sockets systemd passed, and a second
# activation survives a SIGKILL the same way. It ends the container with
# `systemctl exit 0` on a pass and `systemctl exit 1` on a failure, the
# reason printed first.
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
# The socket-activated instance: its socket unit, its service, the service's
# runtime directory and the socket unit's control socket.
readonly ACTIVATED_INSTANCE=activated
readonly SOCKET_UNIT=postcopyd@$ACTIVATED_INSTANCE.socket
readonly ACTIVATED_UNIT=postcopyd@$ACTIVATED_INSTANCE.service
readonly ACTIVATED_DIR=/run/postcopyd/$ACTIVATED_INSTANCE
readonly ACTIVATED_CONTROL=/run/postcopyd-socket/$ACTIVATED_INSTANCE/control.sock
readonly WORK=/run/postcopyd-nspawn-test
readonly SOURCE_RAM=/dev/shm/postcopyd-nspawn-source
# The agent's side of the TLS the instance's config asks for.
readonly TLS=(--tls-ca /etc/postcopyd/tls/ca.pem --tls-cert /etc/postcopyd/tls/agent.pem --tls-key /etc/postcopyd/tls/agent.key)
# The journal catalog, as the host installed it: the MESSAGE_IDs of the
# daemon's records are read from it (catalog_id, in step catalog).
readonly CATALOG=/usr/local/lib/systemd/catalog/postcopyd.catalog

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
        local unit
        for unit in "$UNIT" "$SOCKET_UNIT" "$ACTIVATED_UNIT"; do
            [[ $unit == "$UNIT" || $step == socket* ]] || continue
            say "---- systemctl status $unit"
            systemctl status --no-pager --full "$unit" 2>&1 || true
            say "---- journalctl -u $unit"
            journalctl --no-pager -o short-monotonic -u "$unit" 2>&1 | tail -n 80 || true
        done
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
# The MESSAGE_ID of an event: the catalog names each entry's event (a case
# of DaemonEvent, Sources/PostcopyCore/Service/DaemonEvent.swift) in the
# comment "# event: NAME" before it, which a unit test keeps so.
catalog_id() {  # event
    local id
    id=$(awk -v event="$1" '$1 == "#" && $2 == "event:" { name = $3; next }
        /^-- / { if (name == event) print $2; name = "" }' "$CATALOG")
    [[ $id =~ ^[0-9a-f]{32}$ ]] || fail "$CATALOG has no '# event: $1' entry (found '$id')" >&2
    echo "$id"
}
ID_READY=$(catalog_id ready)
ID_ACCEPTED=$(catalog_id migrationAccepted)
ID_ATTACHED=$(catalog_id vmmAttached)
ID_SWITCHOVER=$(catalog_id switchover)
ID_COMPLETE=$(catalog_id postcopyComplete)
ID_FAILED=$(catalog_id migrationFailed)
ID_TAKEN_OVER=$(catalog_id migrationTakenOver)
readonly ID_READY ID_ACCEPTED ID_ATTACHED ID_SWITCHOVER ID_COMPLETE ID_FAILED ID_TAKEN_OVER
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
# QEMU's and libvirt's names beside postcopyd's, in the JSON, the text and the unit's STATUS.
grep -q '"qemu":{"status":"setup"}' "$WORK/ctl-start.json" ||
    fail "postcopyctl status --json has no QEMU state setup: $(cat "$WORK/ctl-start.json")"
grep -q '"memory_total":' "$WORK/ctl-start.json" || fail "postcopyctl status --json has no libvirt figures"
grep -q '^phase: *handshake *│ QEMU setup$' "$WORK/ctl-start.txt" ||
    fail "postcopyctl status does not show QEMU's state beside the phase: $(cat "$WORK/ctl-start.txt")"
[[ $(systemctl show -P StatusText "$UNIT") == *"(QEMU: setup)" ]] ||
    fail "the unit's STATUS does not end with QEMU's state: $(systemctl show -P StatusText "$UNIT")"
ok "postcopyctl status: phase $phase (QEMU setup), libvirt's figures; STATUS ends with (QEMU: setup)"
# postcopyctl watch follows the migration below to its end.
postcopyctl watch "$INSTANCE" >"$WORK/watch.txt" 2>"$WORK/watch.err" &
watch_pid=$!
pids+=("$watch_pid")

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
watch_rc=0
wait "$watch_pid" || watch_rc=$?
[[ $watch_rc -eq 0 ]] || fail "postcopyctl watch exited $watch_rc: $(cat "$WORK/watch.err") $(tail -n 3 "$WORK/watch.txt")"
tail -n 1 "$WORK/watch.txt" | grep -q "^postcopyd@$INSTANCE · migration ${migration_id:0:8}… · complete (QEMU completed) · " ||
    fail "postcopyctl watch did not end on the completed migration: $(tail -n 3 "$WORK/watch.txt")"
grep -q '"libvirt":{' "$WORK/push.json" && grep -q '"expectedDowntimeMs":' "$WORK/push.json" ||
    fail "postcopy-push --json has no libvirt figures or expected downtime: $(cat "$WORK/push.json")"
ok "postcopyctl watch exit 0, last line: $(tail -n 1 "$WORK/watch.txt" | cut -c1-120)"
# The workload is stopped (SIGSTOP at switchover): it has served its purpose.
{ kill -KILL "$source_pid" && wait "$source_pid"; } 2>/dev/null || true

# --- the unit ends by itself, successfully ------------------------------------------
step="unit exit"
unit_done() { [[ $(systemctl show -P ActiveState "${1:-$UNIT}") =~ ^(inactive|failed)$ ]]; }
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
serving() {  # instance: postcopyctl says postcopy has served a stale fault
    postcopyctl status "$1" --json >"$WORK/ctl-crash.json" 2>/dev/null || return 1
    [[ $(json_string phase "$WORK/ctl-crash.json") == postcopy && $(json_number faultsStale "$WORK/ctl-crash.json") -gt 0 ]]
}
wait_until 120 "postcopy to serve a stale fault" serving "$INSTANCE"
sleep 0.2
first_pid=$(systemctl show -P MainPID "$UNIT")
step="crash: kill -9 pid $first_pid"
systemctl kill --kill-whom=main -s SIGKILL "$UNIT"
restarted() {  # unit: systemd restarted it, as another pid than $first_pid
    local pid
    pid=$(systemctl show -P MainPID "$1")
    [[ $pid -gt 0 && $pid != "$first_pid" && $(systemctl show -P NRestarts "$1") -ge 1 ]]
}
wait_until 30 "systemd to restart $UNIT" restarted "$UNIT"
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
# The daemon that took over found its RAM file under the config's ram-file name, and removed that name at the end.
[[ ! -e /dev/shm/postcopyd-test.ram ]] || fail "the RAM file /dev/shm/postcopyd-test.ram outlived the postcopyd that took the migration over"
ok "the RAM file's name went with the daemon that took the migration over"

step="crash: journal"
journalctl --sync
taken=$(journalctl --no-pager -o json "MESSAGE_ID=$ID_TAKEN_OVER")
[[ $(grep -c . <<<"$taken") -eq 1 ]] || fail "expected one MESSAGE_ID=$ID_TAKEN_OVER record, found: $taken"
grep -q '"TAKEOVER_SOURCE":"systemd' <<<"$taken" || fail "the takeover did not come from the fd store: $taken"
journalctl --no-pager -x "MESSAGE_ID=$ID_TAKEN_OVER" | grep -q 'Subject: Migration .* taken over' ||
    fail "journalctl -x does not explain the takeover record"
ok "MESSAGE_ID=$ID_TAKEN_OVER: $(grep -o '"MESSAGE":"[^"]*"' <<<"$taken" | head -c 200)"

# --- socket activation: postcopyd@activated.socket starts the service -------------
# The agent's port comes from the instance's drop-in, as docs/operations.md
# shows; activated.conf names another listen (ACTIVATED_CONFIG_PORT), which
# the passed socket must win over. Nothing here starts the service: the
# agent's connection does.
step="socket: drop-in"
dropin=/etc/systemd/system/$SOCKET_UNIT.d
mkdir -p "$dropin"
printf '[Socket]\nListenStream=127.0.0.1:%s\n' "$PORT" >"$dropin/listen.conf"
systemctl daemon-reload
systemd-analyze verify --man=no "$SOCKET_UNIT" >"$WORK/verify-socket.err" 2>&1 ||
    fail "systemd-analyze verify $SOCKET_UNIT: $(cat "$WORK/verify-socket.err")"
if grep -q 'postcopyd@' "$WORK/verify-socket.err"; then
    fail "systemd-analyze verify $SOCKET_UNIT complains: $(cat "$WORK/verify-socket.err")"
fi
ok "systemd-analyze verify $SOCKET_UNIT, with $dropin/listen.conf: ListenStream=127.0.0.1:$PORT"

step="socket: systemctl start $SOCKET_UNIT"
systemctl start "$SOCKET_UNIT" || fail "systemctl start $SOCKET_UNIT failed"
[[ $(systemctl is-active "$SOCKET_UNIT") == active ]] || fail "$SOCKET_UNIT is $(systemctl is-active "$SOCKET_UNIT")"
listens=$(systemctl show -P Listen "$SOCKET_UNIT" | paste -sd , -)
[[ $listens == *"$ACTIVATED_CONTROL (Stream)"* && $listens == *"127.0.0.1:$PORT (Stream)"* ]] ||
    fail "$SOCKET_UNIT listens on: $listens"
[[ -S $ACTIVATED_CONTROL && $(stat -c %a "$ACTIVATED_CONTROL") == 600 ]] ||
    fail "no control socket $ACTIVATED_CONTROL of mode 0600: $(ls -l "$ACTIVATED_CONTROL" 2>&1)"
[[ $(systemctl show -P ActiveState "$ACTIVATED_UNIT") == inactive ]] ||
    fail "$ACTIVATED_UNIT started before any connection"
# postcopyctl does not start an idle instance by asking for its status.
if postcopyctl status "$ACTIVATED_INSTANCE" >"$WORK/ctl-idle.out" 2>"$WORK/ctl-idle.err"; then
    fail "postcopyctl status $ACTIVATED_INSTANCE answered for an idle instance: $(cat "$WORK/ctl-idle.out")"
fi
grep -q "postcopyd@$ACTIVATED_INSTANCE is not running: its socket unit listens on $ACTIVATED_CONTROL" "$WORK/ctl-idle.err" ||
    fail "postcopyctl status of an idle instance: $(cat "$WORK/ctl-idle.err")"
sleep 0.5
[[ $(systemctl show -P ActiveState "$ACTIVATED_UNIT") == inactive ]] ||
    fail "postcopyctl status started $ACTIVATED_UNIT"
ok "$SOCKET_UNIT listens ($listens); $ACTIVATED_UNIT inactive, and postcopyctl leaves it so"

# Starts the agent (stdout, stderr to $1.json, $1.err; extra flags after)
# against the socket unit's port, and the reference VMM (flags in
# guest_flags; to $2.json, $2.err) once the agent's connection has started
# the service; sets push_pid, guest_pid.
activate_and_migrate() {
    local push=$1 guest=$2
    shift 2
    postcopy-push --ram "$SOURCE_RAM" --to "127.0.0.1:$PORT" --pause-pid "$source_pid" --quiet --json "${TLS[@]}" \
        "$@" >"$WORK/$push.json" 2>"$WORK/$push.err" &
    push_pid=$!
    pids+=("$push_pid")
    activated() { [[ $(systemctl show -P ActiveState "$ACTIVATED_UNIT") == active && -S $ACTIVATED_DIR/vmm.sock ]]; }
    wait_until 60 "the agent's connection to start $ACTIVATED_UNIT" activated
    postcopy-guest vmm --socket "$ACTIVATED_DIR/vmm.sock" --json "${guest_flags[@]}" \
        >"$WORK/$guest.json" 2>"$WORK/$guest.err" &
    guest_pid=$!
    pids+=("$guest_pid")
}

# Waits for the agent and the VMM; both exit 0 and the guest verifies.
finish_migration() {  # push, guest (as for activate_and_migrate)
    local rc=0
    wait "$push_pid" || rc=$?
    [[ $rc -eq 0 ]] || fail "postcopy-push exited $rc: $(tail -n 20 "$WORK/$1.err")"
    rc=0
    wait "$guest_pid" || rc=$?
    [[ $rc -eq 0 ]] || fail "the reference VMM exited $rc: $(tail -n 20 "$WORK/$2.err")"
    grep -q 'verify: PASS' "$WORK/$2.err" || fail "the reference VMM did not verify the image"
    { kill -KILL "$source_pid" && wait "$source_pid"; } 2>/dev/null || true
    wait_until 60 "$ACTIVATED_UNIT to exit after the migration" unit_done "$ACTIVATED_UNIT"
    local result exit_status
    result=$(systemctl show -P Result "$ACTIVATED_UNIT")
    exit_status=$(systemctl show -P ExecMainStatus "$ACTIVATED_UNIT")
    [[ $result == success && $exit_status == 0 ]] ||
        fail "$ACTIVATED_UNIT ended with Result=$result, exit status $exit_status"
    # systemd listens on: the daemon left the sockets working.
    [[ $(systemctl is-active "$SOCKET_UNIT") == active ]] || fail "$SOCKET_UNIT is $(systemctl is-active "$SOCKET_UNIT") after the migration"
    [[ -S $ACTIVATED_CONTROL ]] || fail "the control socket $ACTIVATED_CONTROL is gone after the migration"
    [[ ! -e $ACTIVATED_DIR ]] || fail "RuntimeDirectory $ACTIVATED_DIR left behind"
}

step="socket: migration"
start_source "$WORK/source3.err"
guest_flags=()
activate_and_migrate push3 guest3
step="socket: postcopyctl status"
main_pid=$(systemctl show -P MainPID "$ACTIVATED_UNIT")
postcopyctl status "$ACTIVATED_INSTANCE" --json >"$WORK/ctl-activated.json" 2>"$WORK/ctl.err" ||
    fail "postcopyctl status $ACTIVATED_INSTANCE --json: $(cat "$WORK/ctl.err")"
[[ $(json_number pid "$WORK/ctl-activated.json") == "$main_pid" ]] ||
    fail "postcopyctl status $ACTIVATED_INSTANCE did not reach pid $main_pid: $(cat "$WORK/ctl-activated.json")"
[[ $(json_string listen "$WORK/ctl-activated.json") == "127.0.0.1:$PORT" ]] ||
    fail "the daemon does not report the passed socket's address: $(cat "$WORK/ctl-activated.json")"
[[ ! -e $ACTIVATED_DIR/control.sock ]] || fail "the daemon bound a control socket of its own in $ACTIVATED_DIR"
ok "postcopyctl status $ACTIVATED_INSTANCE through $ACTIVATED_CONTROL: pid $main_pid, phase $(json_string phase "$WORK/ctl-activated.json"), listen 127.0.0.1:$PORT"
step="socket: migration"
finish_migration push3 guest3
[[ $(systemctl show -P NRestarts "$ACTIVATED_UNIT") == 0 ]] || fail "$ACTIVATED_UNIT was restarted"
ok "socket-activated migration: postcopy-push exit 0, reference VMM $(grep -o 'verify: PASS' "$WORK/guest3.err"), $ACTIVATED_UNIT Result=success; $SOCKET_UNIT still listens"

step="socket: journal"
journalctl --sync
activated_log=$(journalctl --no-pager -o cat _SYSTEMD_UNIT="$ACTIVATED_UNIT" _PID="$main_pid")
for line in "listening for the agent on 127.0.0.1:$PORT, the socket systemd passed" \
            "the settings' listen = 127.0.0.1:$ACTIVATED_CONFIG_PORT is not used: the agent's socket systemd passed (127.0.0.1:$PORT) wins" \
            "listening for postcopyctl on $ACTIVATED_CONTROL, the socket systemd passed"; do
    grep -qF "$line" <<<"$activated_log" || fail "journalctl -u $ACTIVATED_UNIT lacks '$line'"
done
ready=$(journalctl --no-pager -o json _SYSTEMD_UNIT="$ACTIVATED_UNIT" _PID="$main_pid" "MESSAGE_ID=$ID_READY")
grep -q "\"LISTEN\":\"127.0.0.1:$PORT\"" <<<"$ready" || fail "the ready record does not name the passed socket: $ready"
grep -q "\"CONTROL_SOCKET\":\"$ACTIVATED_CONTROL\"" <<<"$ready" || fail "the ready record does not name the passed control socket: $ready"
ok "journalctl -u $ACTIVATED_UNIT: the daemon used the passed sockets (ready record LISTEN=127.0.0.1:$PORT, CONTROL_SOCKET=$ACTIVATED_CONTROL), not listen = 127.0.0.1:$ACTIVATED_CONFIG_PORT"

# Started by hand while the socket unit listens (as before a QEMU that maps
# the RAM file first), the service gets the socket unit's sockets all the same.
step="socket: systemctl start $ACTIVATED_UNIT"
timeout 120 systemctl start "$ACTIVATED_UNIT" || fail "systemctl start $ACTIVATED_UNIT failed"
by_hand_pid=$(systemctl show -P MainPID "$ACTIVATED_UNIT")
postcopyctl status "$ACTIVATED_INSTANCE" --json >"$WORK/ctl-by-hand.json" 2>"$WORK/ctl.err" ||
    fail "postcopyctl status $ACTIVATED_INSTANCE: $(cat "$WORK/ctl.err")"
[[ $(json_string listen "$WORK/ctl-by-hand.json") == "127.0.0.1:$PORT" ]] ||
    fail "started by hand, the daemon does not use the passed socket: $(cat "$WORK/ctl-by-hand.json")"
systemctl stop "$ACTIVATED_UNIT"
journalctl --sync
journalctl --no-pager -o cat _SYSTEMD_UNIT="$ACTIVATED_UNIT" _PID="$by_hand_pid" |
    grep -qF "listening for the agent on 127.0.0.1:$PORT, the socket systemd passed" ||
    fail "started by hand, the daemon did not log the passed agent socket"
[[ -S $ACTIVATED_CONTROL ]] || fail "the control socket $ACTIVATED_CONTROL is gone after a stop"
ok "$ACTIVATED_UNIT started by hand (pid $by_hand_pid) listened on the passed sockets; stopped, the socket unit's control socket stays"

# That daemon failed (SIGTERM: exit 1); the socket unit still starts the next
# one, here from a connection to the control socket.
step="socket: activation after a failure"
[[ $(systemctl show -P Result "$ACTIVATED_UNIT") == exit-code ]] ||
    fail "$ACTIVATED_UNIT stopped by SIGTERM ended with Result=$(systemctl show -P Result "$ACTIVATED_UNIT")"
[[ $(systemctl is-active "$SOCKET_UNIT") == active ]] || fail "$SOCKET_UNIT is $(systemctl is-active "$SOCKET_UNIT") after a failed service"
postcopyctl status --socket "$ACTIVATED_CONTROL" --json >"$WORK/ctl-next.json" 2>"$WORK/ctl.err" ||
    fail "postcopyctl status --socket $ACTIVATED_CONTROL did not start a new instance: $(cat "$WORK/ctl.err")"
next_pid=$(json_number pid "$WORK/ctl-next.json")
[[ $next_pid -gt 0 && $next_pid != "$by_hand_pid" && $(json_string phase "$WORK/ctl-next.json") == handshake ]] ||
    fail "the control socket's connection did not start a new instance: $(cat "$WORK/ctl-next.json")"
systemctl stop "$ACTIVATED_UNIT"
ok "after a failed run, a connection to $ACTIVATED_CONTROL started $ACTIVATED_UNIT again (pid $next_pid, phase handshake)"

# --- socket activation and a crash: the restarted daemon gets the sockets again ----------
step="socket crash: migration"
start_source "$WORK/source4.err"
guest_flags=(--touch 0.1 --think-us 2000 --reattach-timeout 60)
activate_and_migrate push4 guest4 --postcopy-bandwidth 2 --dead-peer-timeout 1 --reconnect-timeout 60
wait_until 120 "postcopy to serve a stale fault" serving "$ACTIVATED_INSTANCE"
sleep 0.2
first_pid=$(systemctl show -P MainPID "$ACTIVATED_UNIT")
step="socket crash: kill -9 pid $first_pid"
systemctl kill --kill-whom=main -s SIGKILL "$ACTIVATED_UNIT"
wait_until 30 "systemd to restart $ACTIVATED_UNIT" restarted "$ACTIVATED_UNIT"
second_pid=$(systemctl show -P MainPID "$ACTIVATED_UNIT")
ok "killed socket-activated postcopyd pid $first_pid during postcopy; systemd restarted it as pid $second_pid"
step="socket crash: migration"
finish_migration push4 guest4
grep -q 'reattached to a restarted postcopyd 1 times' "$WORK/guest4.err" ||
    fail "the reference VMM did not reattach once: $(tail -n 20 "$WORK/guest4.err")"
step="socket crash: journal"
journalctl --sync
restarted_log=$(journalctl --no-pager -o cat _SYSTEMD_UNIT="$ACTIVATED_UNIT" _PID="$second_pid")
grep -qF "listening for the agent on 127.0.0.1:$PORT, the socket systemd passed" <<<"$restarted_log" ||
    fail "the restarted daemon did not get the agent's socket again: $(head -n 20 <<<"$restarted_log")"
grep -qF "listening for postcopyctl on $ACTIVATED_CONTROL, the socket systemd passed" <<<"$restarted_log" ||
    fail "the restarted daemon did not get the control socket again"
taken=$(journalctl --no-pager -o json _SYSTEMD_UNIT="$ACTIVATED_UNIT" "MESSAGE_ID=$ID_TAKEN_OVER")
[[ $(grep -c . <<<"$taken") -eq 1 ]] || fail "expected one MESSAGE_ID=$ID_TAKEN_OVER record of $ACTIVATED_UNIT, found: $taken"
grep -q '"TAKEOVER_SOURCE":"systemd' <<<"$taken" || fail "the takeover did not come from the fd store: $taken"
if journalctl --no-pager -o cat -u "$ACTIVATED_UNIT" | grep -q EADDRINUSE; then
    fail "$ACTIVATED_UNIT met EADDRINUSE"
fi
ok "after the crash: pid $second_pid got both sockets again and took the migration over from the fd store; reference VMM $(grep -o 'verify: PASS' "$WORK/guest4.err") (reattached once), Result=success"

step="socket: systemctl stop $SOCKET_UNIT"
systemctl stop "$SOCKET_UNIT"
[[ ! -e $ACTIVATED_CONTROL ]] || fail "$ACTIVATED_CONTROL outlived $SOCKET_UNIT (RemoveOnStop=yes)"
ok "$SOCKET_UNIT stopped, $ACTIVATED_CONTROL removed"

step=finished
say "PASS"
