#!/usr/bin/env bash
# postcopyd against QEMU's own postcopy, on the same guest and workload:
# RUNS migrations of each kind, then a table of medians (and every run's
# figures as JSON lines in OUT/runs.jsonl). A run that fails is counted,
# not fatal: the table says how many runs of each kind the guest verified,
# and how many ended with the guest's kernel oopsing. The kinds:
#   postcopyd-shmem      qemu/migrate.sh MEMORY=shmem
#   postcopyd-hugetlbfs  qemu/migrate.sh MEMORY=hugetlbfs
#   qemu-postcopy        qemu/compare-qemu-postcopy.sh PREEMPT=0 RAM=anonymous
#   qemu-preempt         qemu/compare-qemu-postcopy.sh PREEMPT=1 RAM=anonymous
#   qemu-postcopy-file   the same with guest RAM a shared file in /dev/shm, as
#   qemu-preempt-file    postcopyd's runs have it
#
#   RUNS=3 SIZE=512M PRECOPY_SECONDS=5 BIN=.build/release OUT=qemu-bench bash qemu/bench.sh
#
# Root; needs make build preload and qemu/build-guest.sh .build/qemu-guest.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
OUT=${OUT:-qemu-bench}
KINDS=${KINDS:-postcopyd-shmem postcopyd-hugetlbfs qemu-postcopy qemu-preempt qemu-postcopy-file qemu-preempt-file}
export SIZE=${SIZE:-512M} PRECOPY_SECONDS=${PRECOPY_SECONDS:-5} BIN=${BIN:-.build/release}
mkdir -p "$OUT"
: >"$OUT/runs.jsonl"

for run in $(seq 1 "$RUNS"); do
    for kind in $KINDS; do  # interleaved, so that drift hits every kind alike
        result="$OUT/$kind-$run.json"
        rm -f "$result"
        case $kind in
            postcopyd-shmem) MEMORY=shmem RESULT=$result bash qemu/migrate.sh >"$OUT/$kind-$run.log" 2>&1 ;;
            postcopyd-hugetlbfs) MEMORY=hugetlbfs RESULT=$result bash qemu/migrate.sh >"$OUT/$kind-$run.log" 2>&1 ;;
            qemu-postcopy | qemu-preempt | qemu-postcopy-file | qemu-preempt-file)
                preempt=0; [[ $kind == qemu-preempt* ]] && preempt=1
                ram=anonymous; [[ $kind == *-file ]] && ram=file
                PREEMPT=$preempt RAM=$ram RESULT=$result bash qemu/compare-qemu-postcopy.sh >"$OUT/$kind-$run.log" 2>&1 ;;
            *) echo "bench: unknown kind $kind" >&2; exit 2 ;;
        esac || echo "bench: $kind run $run failed; see $OUT/$kind-$run.log" >&2
        # A run that failed before its figures counts as not verified.
        [[ -s $result ]] || echo '{"verified": false, "failed": true}' >"$result"
        jq -c --arg kind "$kind" '{kind: $kind} + del(.daemon)' "$result" | tee -a "$OUT/runs.jsonl"
    done
done

# Medians per kind. postcopyd's downtime is the guest's whole pause (source
# stopped → destination QEMU running); QEMU's is its own 'downtime'.
jq -rs '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def m(f): map(f | select(. != null)) | if length == 0 then "–" else (median * 10 | round / 10 | tostring) end;
  group_by(.kind)[] |
  [.[0].kind, (length | tostring), m(.guestDowntimeMs // .downtimeMs), m(.postcopySeconds),
   m(.longestStallUs / 1000), m(.stallsOver10ms), m(.staleFaults // .postcopyRequests),
   m(.vcpuBlocktimeMs[0]?), "\(map(select(.verified)) | length) of \(length)\(if any(.crashed) then " (\(map(select(.crashed)) | length) oopsed)" else "" end)",
   .[0].accel // "–"] | join(" | ") | "| " + . + " |"
' "$OUT/runs.jsonl" | {
    echo "| kind | runs | downtime ms | postcopy s | longest guest stall ms | stalls > 10 ms | stale faults (QEMU: postcopy requests) | vCPU blocktime ms (QEMU) | guest verified | accel |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    cat
} | tee "$OUT/table.md"
