#!/usr/bin/env bash
# Proves that a fresh machine passes CI on the first try: removes the packages that
# scripts/install-deps.sh adds on top of the base machine (the kernel build's, busybox,
# QEMU), empties the guest caches (/var/cache/bulkhead), clones the committed HEAD into a new
# directory and runs its `.ci/run` there with CI=true, as CI does. Destructive for this
# machine's caches; run as root. The whole run is logged to $LOG (default
# /tmp/bulkhead-check-fresh.log); the last lines (the `total:` line) are printed at the end.
#   KEEP_PACKAGES=1   skip the package removal (only the caches and the clone are fresh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
log=${LOG:-/tmp/bulkhead-check-fresh.log}
[ "$(id -u)" -eq 0 ] || { echo "check-fresh: run as root" >&2; exit 1; }

# What install-deps.sh adds that the base machine lacks. The compiler, libc headers and
# qemu-utils stay: cargo itself needs the first two, and the machine image ships the third.
remove=(linux-source-6.1 bison flex libelf-dev busybox-static qemu-system-x86 cpio iputils-ping lz4 zstd time python3-fusepy)

{
  echo "check-fresh: $(date -u +%FT%TZ) on $(git -C "$root" rev-parse --short HEAD)"
  if [ "${KEEP_PACKAGES:-0}" != 1 ]; then
    present=()
    for p in "${remove[@]}"; do
      dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' && present+=("$p")
    done
    if [ ${#present[@]} -gt 0 ]; then
      echo "check-fresh: removing ${present[*]}"
      DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq "${present[@]}"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get autoremove -y -qq
  fi
  echo "check-fresh: emptying /var/cache/bulkhead"
  rm -rf /var/cache/bulkhead
  clone=$(mktemp -d /tmp/bulkhead-fresh.XXXXXX)
  echo "check-fresh: cloning $root into $clone"
  git clone -q "$root" "$clone"
  # mktemp makes it 0700; the tests run the CLI as other uids, which must reach the build.
  chmod 755 "$clone"
  echo "check-fresh: CI=true bash .ci/run"
  set +e
  (cd "$clone" && CI=true bash .ci/run </dev/null)
  status=$?
  set -e
  echo "check-fresh: .ci/run exited $status ($(date -u +%FT%TZ))"
  exit $status
} 2>&1 | tee "$log" | tail -n 25
exit "${PIPESTATUS[0]}"
