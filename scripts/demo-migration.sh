#!/usr/bin/env bash
# A whole migration on this machine over loopback: a source workload
# dirtying its RAM, postcopyd, the reference guest as the VMM, and
# postcopy-push; then each program's summary and the verification result.
#
#   SIZE=1G MEMORY=shmem|hugetlbfs DIRTY=0.10 BIN=.build/release scripts/demo-migration.sh
#
# GUEST_FLAGS adds options to the reference guest (postcopy-guest vmm),
# e.g. GUEST_FLAGS="--measure-tlb 10" to time random reads across guest
# RAM before and after its collapse into 2 MiB pages, or "--no-collapse".
#
# Both connections use TLS 1.3 with certificates made for the run by
# scripts/make-test-certs.sh, and a migration secret; TLS=0 runs them in
# plaintext (--insecure-plaintext) instead, to compare.
set -euo pipefail

SIZE=${SIZE:-1G}
MEMORY=${MEMORY:-shmem}
DIRTY=${DIRTY:-0.10}
BIN=${BIN:-.build/release}
TIMEOUT=${TIMEOUT:-300}
TLS=${TLS:-1}
read -r -a guest_flags <<<"${GUEST_FLAGS:-}"

work=$(mktemp -d /tmp/postcopy-demo.XXXXXX)
source_ram=/dev/shm/postcopy-demo-source.$$
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -f "$source_ram"
    rm -rf "$work"
}
trap cleanup EXIT

wait_for() {  # file, what
    for _ in $(seq 1 600); do
        [[ -s $1 ]] && return 0
        sleep 0.1
    done
    echo "demo: timed out waiting for $2" >&2
    return 1
}

echo "== source: $SIZE of guest RAM in $source_ram, ${DIRTY} of pages kept dirty"
"$BIN/postcopy-guest" source --ram "$source_ram" --size "$SIZE" --dirty "$DIRTY" --ready-file "$work/source.ready" \
    --dirty-log-socket "$work/dirty-log.sock" &
source_pid=$!
pids+=("$source_pid")
wait_for "$work/source.ready" "the source workload"

if [[ $TLS == 1 ]]; then
    echo "== TLS: a test CA and certificates for both ends (scripts/make-test-certs.sh)"
    bash "$(dirname "$0")/make-test-certs.sh" "$work/tls" >/dev/null
    daemon_tls=(--tls-ca "$work/tls/ca.pem" --tls-cert "$work/tls/daemon.pem" --tls-key "$work/tls/daemon.key"
                --tls-client-name postcopy-agent)
    agent_tls=(--tls-ca "$work/tls/ca.pem" --tls-cert "$work/tls/agent.pem" --tls-key "$work/tls/agent.key")
else
    echo "== plaintext (TLS=0): guest RAM crosses loopback unencrypted"
    daemon_tls=(--insecure-plaintext)
    agent_tls=(--insecure-plaintext)
fi

echo "== destination: postcopyd on $MEMORY, the reference guest as its VMM"
"$BIN/postcopyd" serve --listen 127.0.0.1:0 --vmm-socket "$work/vmm.sock" --control-socket "$work/control.sock" \
    --memory "$MEMORY" --size "$SIZE" \
    "${daemon_tls[@]}" \
    --ready-file "$work/daemon.ready" --json >"$work/daemon.json" &
daemon_pid=$!
pids+=("$daemon_pid")
wait_for "$work/daemon.ready" "postcopyd to listen"
# What an operator would watch: postcopyctl's live view, one line per phase here.
"$BIN/postcopyctl" watch --socket "$work/control.sock" >"$work/watch.txt" 2>&1 &
watch_pid=$!
pids+=("$watch_pid")
"$BIN/postcopy-guest" vmm --socket "$work/vmm.sock" "${guest_flags[@]}" --json >"$work/guest.json" &
guest_pid=$!
pids+=("$guest_pid")

echo "== migrate"
timeout "$TIMEOUT" "$BIN/postcopy-push" --ram "$source_ram" --to "$(cat "$work/daemon.ready")" \
    --pause-pid "$source_pid" --dirty-log-socket "$work/dirty-log.sock" --json >"$work/push.json" \
    "${agent_tls[@]}" \
    --migration-secret-file "$work/migration.secret"
status=0
wait "$daemon_pid" || status=$?
wait "$guest_pid" || status=$?
wait "$watch_pid" || status=$?
echo "== postcopyctl watch"
cat "$work/watch.txt"
echo "== summaries (JSON)"
for side in push daemon guest; do
    echo "$side: $(cat "$work/$side.json")"
done
if [[ $status -ne 0 ]]; then
    echo "demo: FAILED (exit status $status)" >&2
    exit 1
fi
echo "demo: PASS — the destination image matches the source's digest"
