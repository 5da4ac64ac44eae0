#!/usr/bin/env bash
# Builds the Bulkhead Linux guest's initramfs images around our own /init
# (scripts/guest/init.c, a freestanding static program; see its header for the command-line
# tokens bh.disk-test=, bh.net=, bh.shell, bh.poweroff/bh.halt and its output lines).
#
# Output directory: ${BULKHEAD_CACHE:-/var/cache/bulkhead}/guest-image/<hash>/ with
#   initramfs.cpio.gz      /init + busybox (Debian busybox-static) with its applet links,
#                          for bh.shell and interactive use (~1 MB; unpacking it costs
#                          several seconds of emulated guest kernel time on the PVM hosts)
#   initramfs.cpio         the same, uncompressed (~2 MB): boots much faster on the PVM
#                          hosts, where the kernel's gunzip runs in the ring-0 emulator
#                          (measured under QEMU: ~55 s to unpack the .gz, see README)
#   initramfs-min.cpio.gz  /init and /dev/console only (~3 KB): fastest boot, for tests
#   init                   the /init binary
# hash = sha256 of init.c, this script and the busybox-static package version. A cached
# build is reused ("cache hit"). The directory is the last (only) line on stdout:
#   d=$(scripts/guest-image.sh); initrd=$d/initramfs.cpio.gz
# Test disks are left to the tests (e.g. `truncate -s 64M /tmp/disk.img`).
# Installs nothing: a missing package is named, with scripts/install-deps.sh as the fix.
set -euo pipefail

self=$(readlink -f "$0")
guest=$(cd "$(dirname "$self")" && pwd)/guest
cache=${BULKHEAD_CACHE:-/var/cache/bulkhead}/guest-image

log() { echo "guest-image: $*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=guest/lib.sh
. "$(dirname "$self")/guest/lib.sh"

need_packages gcc libc6-dev cpio gzip busybox-static
bbver=$(dpkg-query -W -f='${Version}' busybox-static)
busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox not found (package busybox-static)"

hash=$(
  {
    echo "busybox-static $bbver"
    echo "== init.c"; cat "$guest/init.c"
    echo "== script"; cat "$self" "$(dirname "$self")/guest/lib.sh"
  } | sha256sum | cut -d' ' -f1
)
out=$cache/$hash
if [ -s "$out/initramfs.cpio.gz" ] && [ -s "$out/initramfs.cpio" ] && [ -s "$out/initramfs-min.cpio.gz" ]; then
  log "cache hit: $out"
  echo "$out"
  exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ -s "$out/initramfs.cpio.gz" ] && [ -s "$out/initramfs.cpio" ] && [ -s "$out/initramfs-min.cpio.gz" ]; then
  log "cache hit: $out (built concurrently)"
  echo "$out"
  exit 0
fi
log "cache miss: building $out"
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# /init: freestanding, no libc (see init.c).
gcc -static -Os -nostdlib -ffreestanding -fno-stack-protector -fno-tree-loop-distribute-patterns \
  -fno-asynchronous-unwind-tables -fno-pie -no-pie -Wall -Wextra -Werror \
  -Wl,--build-id=none -s -o "$out.tmp/init" "$guest/init.c" >&2
log "init: $(stat -c %s "$out.tmp/init") bytes"

# The cpio archives are written with the kernel's newc format, owner root, fixed mtimes.
# /dev/console must exist in the archive for the kernel to give /init its console fds;
# without root (no mknod) /init opens it itself from devtmpfs.
mkroot() {
  local root=$1
  mkdir -p "$root"/{dev,proc,sys,tmp,bin,sbin,usr/bin,usr/sbin,root}
  install -m 0755 "$out.tmp/init" "$root/init"
  if [ "$(id -u)" -eq 0 ]; then
    mknod -m 0600 "$root/dev/console" c 5 1
  fi
}
pack() {
  local root=$1 dst=$2
  (cd "$root" && find . -mindepth 1 -exec touch -h -d @0 {} + && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) >"${dst%.gz}"
  gzip -9n <"${dst%.gz}" >"$dst"
}

mkroot "$work/min"
rmdir "$work/min"/{bin,sbin,usr/bin,usr/sbin,usr,root}
pack "$work/min" "$out.tmp/initramfs-min.cpio.gz"
rm "$out.tmp/initramfs-min.cpio"

mkroot "$work/full"
n=$(install_busybox "$busybox" "$work/full")
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$work/full/etc-passwd"
mkdir -p "$work/full/etc" && mv "$work/full/etc-passwd" "$work/full/etc/passwd"
pack "$work/full" "$out.tmp/initramfs.cpio.gz"
log "busybox $bbver: $n applet links"

rm -rf "$out"
mv "$out.tmp" "$out"
log "done: $out/initramfs.cpio.gz ($(stat -c %s "$out/initramfs.cpio.gz") bytes)," \
  "$out/initramfs-min.cpio.gz ($(stat -c %s "$out/initramfs-min.cpio.gz") bytes)"
echo "$out"
