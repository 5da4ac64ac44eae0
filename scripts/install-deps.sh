#!/usr/bin/env bash
# Installs the host packages Bulkhead's tests and demo need (run as root; idempotent).
# qemu-system-x86 comes from bookworm-backports so it matches the machine's qemu-utils 10.0
# (plain bookworm's 7.2 conflicts with it and would remove qemu-storage-daemon).
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null 2>&1 || need+=(qemu-utils)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
if [ ${#need[@]} -eq 0 ]; then
  echo "install-deps: everything present"
  exit 0
fi

src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ] && ! grep -q 'bookworm-backports' "$src"; then
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
apt-get update -qq
echo "install-deps: installing ${need[*]}"
apt-get install -y -qq -t bookworm-backports --no-install-recommends "${need[@]}"
