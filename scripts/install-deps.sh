#!/usr/bin/env bash
# Installs every host package that Bulkhead's scripts, tests, demo and benchmarks need, in one
# apt run, before anything else starts (run as root; idempotent). Nothing else in the project
# runs `apt-get install`: a script that finds a package missing names it and points here.
#   --check   only report what is missing (exit 1 if anything is), install nothing
#   --list    print the package names, one a line (scripts/check-fresh.sh removes them)
# qemu-system-x86 comes from bookworm-backports so it matches the machine's qemu-utils 10.0
# (plain bookworm's 7.2 conflicts with it and would remove qemu-storage-daemon); everything
# else comes from the release itself.
set -euo pipefail

# QEMU, the peer for interop tests and benchmarks (from backports, see above).
backports=(qemu-system-x86 qemu-utils)
# Everything else. Grouped by who needs it.
packages=(
  # end-to-end tests and demo: namespaces, taps, bridges, ping
  iproute2 iputils-ping
  # scripts/guest-kernel.sh: the minimal Linux guest from Debian's kernel source
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils
  # scripts/guest-image.sh: /init and the busybox initramfs
  gcc libc6-dev cpio gzip busybox-static
  # scripts/guest-rootfs.sh and the slow suite: the ext4 root image (mkfs.ext4 -d, debugfs, e2fsck)
  e2fsprogs
  # scripts/debian-kernel.sh: unpacking Debian's cloud kernel for the loader tests
  lz4 zstd
  # scripts/bench-boot.sh: peak RSS
  time
  # the watchdog suite's slow disk (tests/tools/slowfs.py, a FUSE filesystem)
  python3-fusepy
  # scripts/bench-blk.sh: the host's own numbers for the same I/O patterns
  fio
)

mode=install
case "${1:-}" in
  --check) mode=check ;;
  --list) printf '%s\n' "${backports[@]}" "${packages[@]}"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--check|--list]" >&2; exit 2 ;;
esac

installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed$'; }
need_bp=() need=()
for p in "${backports[@]}"; do installed "$p" || need_bp+=("$p"); done
for p in "${packages[@]}"; do installed "$p" || need+=("$p"); done
if [ ${#need_bp[@]} -eq 0 ] && [ ${#need[@]} -eq 0 ]; then
  echo "install-deps: everything present"
  exit 0
fi
if [ "$mode" = check ]; then
  echo "install-deps: missing: ${need_bp[*]} ${need[*]}" >&2
  echo "install-deps: install them with: sudo bash scripts/install-deps.sh" >&2
  exit 1
fi
[ "$(id -u)" -eq 0 ] || { echo "install-deps: run as root (missing: ${need_bp[*]} ${need[*]})" >&2; exit 1; }

src=/etc/apt/sources.list.d/debian.sources
if [ ${#need_bp[@]} -gt 0 ] && [ -f "$src" ] && ! grep -q 'bookworm-backports' "$src"; then
  echo "install-deps: adding bookworm-backports to $src"
  cat >>"$src" <<'SRC'

Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-deps: apt-get update"
apt-get update -qq
if [ ${#need_bp[@]} -gt 0 ]; then
  echo "install-deps: installing ${need_bp[*]} (bookworm-backports)"
  apt-get install -y -qq -t bookworm-backports --no-install-recommends "${need_bp[@]}"
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}"
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
echo "install-deps: done"
