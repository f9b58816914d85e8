#!/usr/bin/env bash
# Runs the real postcopyd@.service under a real systemd (PID 1 of a
# systemd-nspawn container) and migrates a guest into it, to prove that the
# unit works as written: Type=notify and READY=1, the status text, the
# control socket (postcopyctl), the journal records and their catalog texts,
# socket activation by postcopyd@.socket, and that the unit's hardening (DevicePolicy=closed with DeviceAllow=
# /dev/userfaultfd, SystemCallFilter=, ProtectSystem=strict, ...) does not
# break the daemon.
#
#   bash Tests/Integration/systemd/test-systemd-nspawn.sh          (as root; `make test-systemd`)
#
# What it does, in order:
#   1. installs systemd-container (systemd-nspawn) and debootstrap if missing;
#   2. builds a minimal Debian bookworm root with systemd and dbus once and
#      caches it in $CACHE_DIR (a stamp file, written last, marks it whole);
#   3. renders the repository's units (@BINDIR@, @DOCDIR@) and a config into
#      a temporary directory;
#   4. boots the cached root with systemd-nspawn on a throw-away overlay
#      (--volatile=overlay: the cache is never written), with the built
#      binaries, the Swift runtime, /dev/userfaultfd, the units, the catalog
#      and the in-container test bound in, and pulls in the test unit with
#      systemd.wants=postcopyd-nspawn-test.service;
#   5. the test unit runs Tests/Integration/systemd/run-test.sh, which ends with
#      `systemctl exit N`: the container's exit status is the test result;
#   6. removes what the run left behind on the host.
#
# Environment (all optional):
#   BIN        directory of the built binaries       (default: .build/release)
#   MIRROR     Debian mirror for debootstrap         (default: from the apt sources)
#   CACHE_DIR  where the root is cached              (default: /var/cache/postcopyd-test)
#   PORT       TCP port of the migration             (default: 7171; the container
#              shares the host's network namespace)
#   SIZE       guest RAM migrated                    (default: 64M)
#   TIMEOUT    seconds for the whole container run   (default: 300)
#   KEEP_WORK  1: keep the temporary directory (logs, journal) even on success
set -euo pipefail

readonly NAME=test-systemd-nspawn
readonly SUITE=bookworm
readonly INCLUDE=systemd,dbus
readonly MACHINE=postcopyd-test
readonly TEST_UNIT=postcopyd-nspawn-test.service

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
BIN=${BIN:-$repo/.build/release}
CACHE_DIR=${CACHE_DIR:-/var/cache/postcopyd-test}
PORT=${PORT:-7171}
SIZE=${SIZE:-64M}
TIMEOUT=${TIMEOUT:-300}
KEEP_WORK=${KEEP_WORK:-0}
ROOT=$CACHE_DIR/$SUITE-systemd
STAMP=$ROOT.stamp

# Paths inside the container.
readonly C_BINDIR=/opt/postcopyd/bin
readonly C_DOCDIR=/usr/local/share/doc/postcopyd
readonly C_SWIFTLIB=/opt/swift/usr/lib/swift/linux
readonly C_TESTDIR=/opt/postcopyd-test
readonly C_RESULTS=/srv/postcopyd-test-results
readonly PROGRAMS=(postcopyd postcopy-push postcopy-guest postcopyctl)

say() { echo "$NAME: $*"; }
die() { echo "$NAME: FAIL: $*" >&2; exit 1; }

# 1. Root or nothing: debootstrap, nspawn and /dev/userfaultfd all need it.
if [[ $(id -u) -ne 0 ]]; then
    echo "$NAME: SKIP: needs root (debootstrap, systemd-nspawn and /dev/userfaultfd)"
    exit 0
fi

# One run at a time: runs share the cache, the port and the machine name.
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.lock"
flock -w 900 9 || die "another $NAME run holds $CACHE_DIR/.lock"

# --- prerequisites -----------------------------------------------------------

ensure_packages() {
    local missing=()
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    say "installing ${missing[*]}"
    local log
    log=$(mktemp /tmp/postcopyd-nspawn-apt.XXXXXX)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        die "could not install ${missing[*]}"
    fi
    rm -f "$log"
}

# The Debian mirror this machine's apt already uses for $SUITE: one-line
# entries in /etc/apt/sources.list(.d/*.list) and deb822 stanzas in
# /etc/apt/sources.list.d/*.sources. No host name lives in the repository.
find_mirror() {
    local uri
    shopt -s nullglob
    # deb822: a stanza is a paragraph; take URIs of an enabled "deb" stanza
    # whose Suites name the suite itself (not bookworm-security & co.).
    uri=$(awk -v suite="$SUITE" '
        function flush() {
            if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && enabled != "no" && uris != "")
                { split(uris, u, " "); print u[1]; found = 1; exit }
            types = suites = uris = enabled = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        { key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
          if (key == "types") types = $0; else if (key == "suites") suites = $0
          else if (key == "uris") uris = $0; else if (key == "enabled") enabled = tolower($0) }
        END { if (!found) flush() }
    ' /etc/apt/sources.list.d/*.sources /dev/null)
    if [[ -z $uri ]]; then
        # One-line form: deb [options] URI SUITE COMPONENT...
        uri=$(awk -v suite="$SUITE" '
            $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                          if ($(i + 1) == suite) { print $i; exit } }
        ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /dev/null 2>/dev/null)
    fi
    shopt -u nullglob
    echo "${uri%/}"
}

# --- the cached root -----------------------------------------------------------

# The stamp holds the debootstrap command that made the root; it is written
# only after debootstrap succeeded, so a root without it (interrupted run) or
# with another command (the include list changed) is made again.
ensure_root() {
    local mirror=$1 want
    want="debootstrap --variant=minbase --include=$INCLUDE $SUITE"
    if [[ -f $STAMP && $(cat "$STAMP") == "$want" && -x $ROOT/lib/systemd/systemd ]]; then
        say "cached root $ROOT"
        return 0
    fi
    say "building the $SUITE root in $ROOT from $mirror (once; about 30 s, 250 MB)"
    rm -f "$STAMP"
    rm -rf --one-file-system "$ROOT" "$ROOT.new"
    if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOT.new" "$mirror" \
            >"$CACHE_DIR/debootstrap.log" 2>&1; then
        tail -n 30 "$CACHE_DIR/debootstrap.log" >&2
        rm -rf --one-file-system "$ROOT.new"
        die "debootstrap failed (log: $CACHE_DIR/debootstrap.log)"
    fi
    # What a booted image needs and debootstrap leaves out: a machine id is
    # made on each boot (the overlay keeps none), and a hostname.
    : >"$ROOT.new/etc/machine-id"
    echo "$MACHINE" >"$ROOT.new/etc/hostname"
    mv "$ROOT.new" "$ROOT"
    echo "$want" >"$STAMP"
}

# --- files bound into the container -------------------------------------------

# The units as `make install` would render them, with the binaries where the
# container sees them; the config of the instance `test`; the test unit and
# its script.
stage_files() {
    local stage=$1 unit
    mkdir -p "$stage/units"
    for unit in "$repo"/systemd/*.service "$repo"/systemd/*.socket; do
        sed -e "s|@BINDIR@|$C_BINDIR|g" -e "s|@DOCDIR@|$C_DOCDIR|g" "$unit" \
            >"$stage/units/$(basename "$unit")"
    done
    sed -e "s|@TESTDIR@|$C_TESTDIR|g" "$repo/Tests/Integration/systemd/$TEST_UNIT" >"$stage/units/$TEST_UNIT"
    cat >"$stage/test.conf" <<EOF
# /etc/postcopyd/test.conf, written by Tests/Integration/systemd/test-systemd-nspawn.sh
listen = 127.0.0.1:$PORT
size = $SIZE
memory = shmem
# A named RAM file, as a QEMU on postcopyd needs: created under the unit's
# hardening (ProtectSystem=strict leaves /dev/shm writable).
ram-file = /dev/shm/postcopyd-test.ram
vmm-uid = 0
vmm-timeout = 60
tls-ca = /etc/postcopyd/tls/ca.pem
tls-cert = /etc/postcopyd/tls/daemon.pem
tls-key = /etc/postcopyd/tls/daemon.key
tls-client-name = postcopy-agent
EOF
    # The instance run-test.sh starts by socket activation (postcopyd@activated.socket,
    # the agent's port PORT in its drop-in). Its listen names another port,
    # which the daemon must not use: the socket systemd passes wins.
    sed -e "s|^listen = .*|listen = 127.0.0.1:$((PORT + 1))|" \
        -e "s|^ram-file = .*|ram-file = /dev/shm/postcopyd-activated.ram|" \
        -e "s|^# /etc/postcopyd/test.conf|# /etc/postcopyd/activated.conf|" "$stage/test.conf" >"$stage/activated.conf"
    # Read by run-test.sh: what the host asked for.
    cat >"$stage/test.env" <<EOF
PORT=$PORT
ACTIVATED_CONFIG_PORT=$((PORT + 1))
SIZE=$SIZE
BINDIR=$C_BINDIR
RESULTS=$C_RESULTS
EOF
    chmod -R a+rX "$stage"
    # Made after the chmod: the private keys stay 0600.
    bash "$repo/scripts/make-test-certs.sh" "$stage/tls" >/dev/null
}

# --- cgroups -------------------------------------------------------------------

# With systemd as PID 1 on the host, the container runs in a transient scope
# with delegation and systemd removes it afterwards. Without it (this CI
# machine), nspawn --keep-unit would run the container in whatever cgroup the
# caller sits in (often the root), and the container's systemd would create
# init.scope, system.slice, ... right there. So give the run its own cgroup in
# every hierarchy nspawn touches (the cgroup2 one, and the named v1 "systemd"
# one of a hybrid host) and remove them afterwards.
cgroup_dirs=()
make_cgroups() {
    local mnt stale
    cgroup_dirs=()
    [[ $(cat /proc/1/comm 2>/dev/null) == systemd ]] && return 0
    while read -r mnt; do
        # A run killed before its cleanup left its cgroup: we hold the lock,
        # so no other run is using one.
        for stale in "$mnt/$MACHINE".*; do
            [[ -d $stale ]] && remove_cgroup_tree "$stale"
        done
        cgroup_dirs+=("$mnt/$MACHINE.$$")
    done < <(findmnt -rn -t cgroup2 -o TARGET; findmnt -rn -t cgroup -O name=systemd -o TARGET)
    for mnt in "${cgroup_dirs[@]}"; do mkdir -p "$mnt"; done
}

remove_cgroup_tree() {  # dir
    local pid left
    # Anything still in there is what is left of this test's container.
    left=$(find "$1" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
    if [[ -n $left ]]; then
        say "killing leftover container processes: ${left//$'\n'/ }"
        for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
        sleep 1
    fi
    find "$1" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ ! -d $1 ]] || say "warning: could not remove cgroup $1"
}

remove_cgroups() {
    local dir
    for dir in "${cgroup_dirs[@]}"; do
        [[ -d $dir ]] && remove_cgroup_tree "$dir"
    done
    return 0
}

# Runs "$@" inside the run's own cgroups (or a delegated scope under systemd).
in_own_cgroup() {
    if [[ $(cat /proc/1/comm 2>/dev/null) == systemd ]]; then
        systemd-run --scope --quiet --collect -p Delegate=yes --unit="$MACHINE-$$" -- "$@"
        return
    fi
    (
        for dir in "${cgroup_dirs[@]}"; do echo "$BASHPID" >"$dir/cgroup.procs"; done
        exec "$@"
    )
}

# --- the run -------------------------------------------------------------------

# What systemd-nspawn leaves on the host: its per-machine mount-propagation
# directory (nspawn refuses to remove it itself when /run is not a tmpfs:
# "Attempted to remove disk file system under /run/systemd/nspawn/propagate/…")
# and, empty, the directories it made for it and for the image lock. Shared
# directories are only removed when empty, so another container's stay.
remove_nspawn_leftovers() {
    rm -rf --one-file-system "/run/systemd/nspawn/propagate/$MACHINE" "/run/systemd/nspawn/unix-export/$MACHINE"
    rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn/unix-export /run/systemd/nspawn/locks \
        /run/systemd/nspawn 2>/dev/null || true
    rm -f "$CACHE_DIR/.#$(basename "$ROOT").lck"
}

work=
cleanup() {
    local rc=$?
    remove_cgroups
    remove_nspawn_leftovers
    if [[ -n $work ]]; then
        if [[ $rc -eq 0 && $KEEP_WORK != 1 ]]; then
            rm -rf "$work"
        else
            say "logs kept in $work"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_packages
command -v findmnt >/dev/null || die "findmnt (util-linux) is missing"
[[ -c /dev/userfaultfd ]] || die "/dev/userfaultfd is missing (Linux >= 6.1 with CONFIG_USERFAULTFD)"
[[ -d $C_SWIFTLIB ]] || die "the Swift runtime is not in $C_SWIFTLIB"
for program in "${PROGRAMS[@]}"; do
    [[ -x $BIN/$program ]] || die "$BIN/$program is missing: build first (swift build -c release)"
done
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "port $PORT is in use on this host (the container shares its network): set PORT="
fi

# Leftovers of a run killed before its cleanup (we hold the lock).
remove_nspawn_leftovers

if [[ -n ${MIRROR:-} ]]; then
    mirror=$MIRROR
else
    mirror=$(find_mirror)
    [[ -n $mirror ]] || die "no '$SUITE' source in /etc/apt/sources.list{,.d/*}: set MIRROR="
fi
ensure_root "$mirror"

work=$(mktemp -d "/tmp/postcopyd-nspawn.XXXXXX")
mkdir -p "$work/stage" "$work/results"
stage_files "$work/stage"

binds=(
    --bind=/dev/userfaultfd
    --bind-ro="$C_SWIFTLIB"
    --bind-ro="$work/stage/test.conf:/etc/postcopyd/test.conf"
    --bind-ro="$work/stage/activated.conf:/etc/postcopyd/activated.conf"
    --bind-ro="$work/stage/tls:/etc/postcopyd/tls"
    --bind-ro="$work/stage/test.env:$C_TESTDIR/test.env"
    --bind-ro="$repo/Tests/Integration/systemd/run-test.sh:$C_TESTDIR/run-test.sh"
    --bind-ro="$repo/systemd/postcopyd.catalog:/usr/local/lib/systemd/catalog/postcopyd.catalog"
    --bind-ro="$repo/docs:$C_DOCDIR"
    --bind="$work/results:$C_RESULTS"
)
for program in "${PROGRAMS[@]}"; do
    binds+=(--bind-ro="$(readlink -f "$BIN/$program"):$C_BINDIR/$program")
done
for unit in "$work"/stage/units/*.service "$work"/stage/units/*.socket; do
    binds+=(--bind-ro="$unit:/etc/systemd/system/$(basename "$unit")")
done

# The flags, and why:
#   SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1  the container's systemd gets a cgroup2
#       hierarchy, where DevicePolicy=/DeviceAllow= are BPF programs
#       (BPF_PROG_TYPE_CGROUP_DEVICE) attached to the unit's cgroup.
#   --system-call-filter=bpf  nspawn's seccomp allow list leaves out bpf(2);
#       without it the container's systemd cannot load those programs, logs
#       that device access control is unsupported and runs the unit with no
#       device restrictions at all (DevicePolicy= silently not enforced).
#       run-test.sh checks that a closed policy really denies the device.
#   --register=no --keep-unit  no machined, no scope from a host systemd.
#   --volatile=overlay  the cached root stays pristine: writes go to a tmpfs.
#   --console=read-only  the container's console (the test's progress, and
#       its failure report) goes to this script's stdout.
#   --bind=/dev/userfaultfd  the device the VMM opens (DeviceAllow= of the unit).
#   systemd.show_status=error, SYSTEMD_COLORS=0  a console with the test's
#       lines and systemd's errors only, no escape sequences.
#   systemd.wants=  arguments after the options go to the container's
#       systemd, which reads them like a kernel command line.
nspawn=(
    env SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn
    --quiet
    --boot
    --directory="$ROOT"
    --machine="$MACHINE"
    --register=no
    --keep-unit
    --console=read-only
    --volatile=overlay
    --system-call-filter=bpf
    --setenv=SYSTEMD_COLORS=0
    "${binds[@]}"
    systemd.show_status=error
    systemd.wants="$TEST_UNIT"
)

make_cgroups
say "booting $ROOT ($SIZE migration on 127.0.0.1:$PORT, timeout ${TIMEOUT}s)"
started=$SECONDS
rc=0
in_own_cgroup \
    timeout --kill-after=30 "$TIMEOUT" "${nspawn[@]}" </dev/null 2>&1 | tee "$work/console.log" || rc=$?
say "container exited with status $rc after $((SECONDS - started)) s"

if [[ $rc -ne 0 ]]; then
    [[ $rc -eq 124 ]] && say "the container run timed out after ${TIMEOUT}s"
    # The console above has the test's progress and its failure report; when
    # the test never got to say anything, show what there is.
    if ! grep -q 'run-test:' "$work/console.log" && [[ -s $work/results/test.log ]]; then
        echo "----- the test's log -----"
        cat "$work/results/test.log"
    fi
    if [[ -s $work/results/journal.txt ]]; then
        echo "----- the container's journal (last 60 lines; all of it in $work/results/journal.txt) -----"
        tail -n 60 "$work/results/journal.txt"
    fi
    die "postcopyd under systemd in systemd-nspawn (exit status $rc; console above)"
fi
grep -q '^PASS$' "$work/results/result" 2>/dev/null ||
    die "the container exited 0 but the test did not record PASS"
say "PASS"
