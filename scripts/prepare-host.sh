#!/usr/bin/env bash
# Installs what building and testing postcopyd needs on a fresh Debian host,
# and, when run as root, makes hugetlbfs usable for the 2 MiB tests, starts
# a journald when none runs (systemd is not PID 1 in containers and CI) and
# installs the journal catalog, so that the journal tests read real records.
#
#   HUGEPAGES=N   2 MiB pages to have reserved (default 600); never lowered.
#   HUGETLBFS=DIR where to mount hugetlbfs when no mount exists (default /dev/hugepages).
#
# Idempotent: each step checks before it acts, and says what it did.
set -euo pipefail

want_pages=${HUGEPAGES:-600}
mount_dir=${HUGETLBFS:-/dev/hugepages}

say() { printf 'prepare-host: %s\n' "$*"; }

# Build: libsystemd (sd_notify, the journal) and OpenSSL's libssl (TLS),
# found through pkg-config; the openssl command makes the test certificates.
missing=()
pkg-config --exists libsystemd 2>/dev/null || missing+=(libsystemd-dev)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        say "${missing[*]} missing and this is not root: install with 'apt-get install ${missing[*]}'" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "$(id -u)" -ne 0 ]; then
    say "not root: skipping hugepage reservation; root-only tests will report skips"
    exit 0
fi

have=$(cat /proc/sys/vm/nr_hugepages)
if [ "$have" -lt "$want_pages" ]; then
    echo "$want_pages" > /proc/sys/vm/nr_hugepages || true
    have=$(cat /proc/sys/vm/nr_hugepages)
    say "reserved 2 MiB hugepages: $have (wanted $want_pages)"
    if [ "$have" -lt "$want_pages" ]; then
        say "warning: the kernel reserved only $have of $want_pages hugepages (memory fragmented?); hugetlbfs tests may skip" >&2
    fi
fi

if ! awk '$3 == "hugetlbfs" { found = 1 } END { exit !found }' /proc/mounts; then
    mkdir -p "$mount_dir"
    mount -t hugetlbfs -o pagesize=2M,mode=1770 none "$mount_dir"
    say "mounted hugetlbfs at $mount_dir"
fi

# The journal tests send records to journald's native socket and read them
# back with journalctl. Where systemd is not PID 1 nothing runs journald:
# start it on its own, detached from this shell. The socket file alone proves
# nothing: a journald that was started by hand and has since been killed
# leaves it behind, refusing connections. systemd-cat connects to journald's
# stream socket, so it succeeds only when a journald answers.
journald_answers() { systemd-cat --identifier=postcopyd-prepare-host true 2>/dev/null; }
if ! journald_answers; then
    journald=/lib/systemd/systemd-journald
    [ -x "$journald" ] || journald=/usr/lib/systemd/systemd-journald
    setsid "$journald" </dev/null >/dev/null 2>&1 &
    for _ in $(seq 1 50); do
        journald_answers && break
        sleep 0.1
    done
    if journald_answers; then
        say "started systemd-journald (pid $!)"
    else
        say "warning: could not start systemd-journald; the journal tests will report skips" >&2
    fi
fi

# journalctl -x explains postcopyd's records from the catalog.
catalog_dir=/usr/local/lib/systemd/catalog
if ! cmp -s systemd/postcopyd.catalog "$catalog_dir/postcopyd.catalog"; then
    install -D -m 0644 systemd/postcopyd.catalog "$catalog_dir/postcopyd.catalog"
    journalctl --update-catalog
    say "installed the journal catalog into $catalog_dir"
fi
