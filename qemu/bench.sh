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
# PRECOPY_MBPS=N caps precopy at N MiB/s in every kind alike: with a small
# cap (PRECOPY_SECONDS=1 PRECOPY_MBPS=1) nearly all of RAM is left to
# postcopy, the pure-postcopy comparison.
#
# Root; needs make build preload and qemu/build-guest.sh .build/qemu-guest.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
OUT=${OUT:-qemu-bench}
KINDS=${KINDS:-postcopyd-shmem postcopyd-hugetlbfs qemu-postcopy qemu-preempt qemu-postcopy-file qemu-preempt-file}
export SIZE=${SIZE:-512M} PRECOPY_SECONDS=${PRECOPY_SECONDS:-5} PRECOPY_MBPS=${PRECOPY_MBPS:-0} BIN=${BIN:-.build/release}
mkdir -p "$OUT"
# RUNS=0 only prints the table again from OUT/runs.jsonl.
((RUNS == 0)) || : >"$OUT/runs.jsonl"

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

# Medians per kind, over the runs whose guest verified and that really were
# postcopy migrations (a QEMU run whose precopy finished on its own, or whose
# guest crashed, is counted in the first columns only). postcopyd's
# downtime is the guest's whole pause (source stopped → destination QEMU
# running); QEMU's is its own 'downtime'. Guest stalls are the guest's own
# clock, which QEMU's migrations were seen to step back (clock-back).
jq -rs '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def m(f; digits): map(f | select(. != null)) | if length == 0 then "–"
      else (median * pow(10; digits) | round / pow(10; digits) | tostring) end;
  group_by(.kind)[] | . as $all | map(select(.verified and .enteredPostcopy != false)) as $runs |
  [$all[0].kind, ($all | length | tostring),
   "\($all | map(select(.verified)) | length) of \($all | length)"
     + (if any($all[]; .crashed) then ", \($all | map(select(.crashed)) | length) oopsed" else "" end)
     + (if any($all[]; .enteredPostcopy == false) then ", \($all | map(select(.enteredPostcopy == false)) | length) ended in precopy" else "" end),
   ($runs | m(.guestDowntimeMs // .downtimeMs; 0)), ($runs | m(.postcopySeconds; 2)),
   ($runs | m(.longestStallUs / 1000; 1)), ($runs | m(.stallsOver10ms; 1)),
   ($runs | m(.staleFaults // .postcopyRequests; 0)), ($runs | m(.vcpuBlocktimeMs[0]?; 0)),
   ($runs | map(.clockBack // 0) | add // 0 | tostring), ($all[0].accel // "–")] | join(" | ") | "| " + . + " |"
' "$OUT/runs.jsonl" | {
    echo "| kind | runs | guest verified | downtime ms | postcopy s | longest guest stall ms | stalls > 10 ms | stale faults (QEMU: postcopy requests) | vCPU blocktime ms (QEMU) | clock steps back | accel |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    cat
} | tee "$OUT/table.md"
