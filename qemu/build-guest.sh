#!/usr/bin/env bash
# Builds what the QEMU flow boots: Debian's own kernel (the linux-image
# package, unpacked, not installed) and an initramfs whose /init is the
# self-verifying workload (qemu/guest/workload.c, linked statically).
#
#   qemu/build-guest.sh OUT_DIR     → OUT_DIR/vmlinuz, OUT_DIR/initrd.gz
#
# The kernel is downloaded once and kept in OUT_DIR; the initramfs is built
# again whenever workload.c is newer. Needs apt (for the kernel package),
# gcc with a static glibc, and cpio (installed when missing).
set -euo pipefail

mkdir -p "${1:?usage: build-guest.sh OUT_DIR}"
out=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)

if [[ ! -s $out/vmlinuz ]]; then
    package=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [[ -n $package ]] || { echo "build-guest: cannot tell which linux-image package linux-image-amd64 names (apt-get update?)" >&2; exit 1; }
    echo "build-guest: downloading $package"
    download=$(mktemp -d)
    chmod 777 "$download"  # apt's sandbox user writes there
    (cd "$download" && apt-get download -q "$package" >/dev/null)
    dpkg-deb -x "$download"/*.deb "$download/x"
    cp "$download"/x/boot/vmlinuz-* "$out/vmlinuz.tmp"
    echo "$package" >"$out/kernel-package"
    rm -rf "$download"
    mv "$out/vmlinuz.tmp" "$out/vmlinuz"
fi

if [[ ! -s $out/initrd.gz || $here/guest/workload.c -nt $out/initrd.gz ]]; then
    command -v cpio >/dev/null || apt-get install -y -q cpio >/dev/null
    root=$(mktemp -d)
    gcc -static -O2 -Wall -Wextra -Werror -o "$root/init" "$here/guest/workload.c"
    (cd "$root" && echo init | cpio -o -H newc --quiet | gzip -1 >"$out/initrd.gz.tmp")
    rm -rf "$root"
    mv "$out/initrd.gz.tmp" "$out/initrd.gz"
fi
echo "build-guest: $(cat "$out/kernel-package") and the workload initramfs in $out"
