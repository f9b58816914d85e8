#!/usr/bin/env bash
# make test-qemu: a real QEMU guest (Debian's kernel, the self-verifying
# workload) migrated with postcopyd serving its faults, through
# libpostcopy-vmm.so: once onto shmem, once onto hugetlbfs when enough 2 MiB
# pages are free, and once onto shmem with postcopyd killed (SIGKILL) right
# after VMM_RESUME and a new one taking over from what the adapter hands back,
# and once with the switchover failing after the source QEMU stopped its
# vCPUs (no destination QEMU): the source must run on, its guest verified.
# postcopy-push reads the source QEMU's uffd-wp write log (the adapter
# preloaded there registers its RAM) and checks it against a hash of every
# page (--verify-dirty-log), and switches over through QMP. Root only: QEMU's process opens the userfaultfd, and the
# flow reads and writes /dev/shm and hugetlbfs files. Installs QEMU, jq and
# cpio when missing.
#
#   BIN=.build/debug SIZE=512M bash qemu/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.build/debug}
SIZE=${SIZE:-512M}
GUEST=${GUEST:-.build/qemu-guest}
HUGETLBFS_DIR=${HUGETLBFS_DIR:-$(awk '$3 == "hugetlbfs" { print $2; exit }' /proc/mounts)}
say() { echo "test-qemu: $*"; }

if [[ $(id -u) -ne 0 ]]; then
    say "SKIPPED: needs root (the QEMU process opens a userfaultfd; /dev/userfaultfd is root's here)"
    exit 0
fi
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v jq >/dev/null || missing+=(jq)
command -v cpio >/dev/null || missing+=(cpio)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null
        apt-get install -y -qq "${missing[@]}" >/dev/null
    }
fi
bash qemu/build-guest.sh "$GUEST"

results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
run() {  # memory [kill] [fail the switchover] [fail the hand-over]
    local kill=${2:-0} fail=${3:-0} failHandOver=${4:-0}
    say "migrating a $SIZE QEMU guest onto $1$( ((kill)) && echo ', postcopyd killed and taken over')$( ((fail)) && echo ', the switchover failing')$( ((failHandOver)) && echo ', the hand-over failing')"
    MEMORY=$1 KILL_DAEMON=$kill FAIL_SWITCHOVER=$fail FAIL_HANDOVER=$failHandOver VERIFY_DIRTY_LOG=1 SIZE=$SIZE BIN=$BIN GUEST=$GUEST HUGETLBFS_DIR=$HUGETLBFS_DIR \
        PRECOPY_SECONDS=${PRECOPY_SECONDS:-5} RESULT="$results/$1$( ((kill)) && echo -takeover).json" bash qemu/migrate.sh
}
run shmem
run shmem 1
run shmem 0 1
run shmem 0 0 1

size_pages=$(($(numfmt --from=iec "$SIZE") / 2097152))
free_pages=$(awk '/HugePages_Free/ { print $2 }' /proc/meminfo)
if [[ -z $HUGETLBFS_DIR ]]; then
    say "SKIPPED the hugetlbfs run: no hugetlbfs mount (make prepare mounts one)"
elif ((free_pages < size_pages)); then
    say "SKIPPED the hugetlbfs run: $free_pages free 2 MiB pages, $size_pages needed (make prepare HUGEPAGES=N)"
else
    run hugetlbfs
fi
say "PASS"
for result in "$results"/*.json; do
    [[ -s $result ]] || continue
    jq -c '{accel, memory, verified, dirtyLog, missedByDirtyLog, finalScanMs, staleFaults, guestPauseMs, guestDowntimeMs, postcopySeconds, longestStallUs, sourceStatus}' "$result"
done
