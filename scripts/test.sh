#!/usr/bin/env bash
# Runs every Bulkhead test suite. In order, each step once, before any test starts:
#   1. host packages (scripts/install-deps.sh; as root, or --check only as another user),
#   2. the guest artifacts the suites boot, built or fetched into their caches under a lock
#      (the Linux guest kernel takes minutes on the first run; later runs hit the cache;
#      the initramfs, the ext4 root image and Debian's kernel take seconds),
#   3. the binaries the end-to-end suites start,
#   4. every suite with --no-fail-fast, so one failing suite never hides the rest; the
#      closing `total:` line counts every suite and names a suite that ended without results.
# No test installs or fetches anything itself. Tests that need /dev/kvm fail (not skip) when
# it exists here: REQUIRE_KVM=1.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "== test.sh: $* ==" >&2; }

step "host packages"
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/install-deps.sh
else
  bash scripts/install-deps.sh --check || echo "test.sh: suites that need those packages will fail" >&2
fi
if [ -e /dev/kvm ] && [ -z "${REQUIRE_KVM:-}" ]; then
  export REQUIRE_KVM=1
fi

step "guest kernel (scripts/guest-kernel.sh; a cold cache builds for minutes)"
kernel=$(bash scripts/guest-kernel.sh)
step "guest initramfs (scripts/guest-image.sh)"
image=$(bash scripts/guest-image.sh)
step "guest root file system (scripts/guest-rootfs.sh)"
rootfs=$(bash scripts/guest-rootfs.sh)
step "Debian's cloud kernel for the loader tests (scripts/debian-kernel.sh)"
debian=$(bash scripts/debian-kernel.sh)
echo "test.sh: guest kernel $kernel, initramfs $image, root image $rootfs, Debian kernel $debian" >&2

step "build"
cargo build --workspace --bins
# A second, different build of the disk backend: the live-upgrade test moves a running
# guest's disk between the two.
cargo build --release -p bulkhead-backends --bin bulkhead-blk
# The test binaries themselves, so that compile time is not counted against any test.
cargo test --workspace --all-targets --no-run

step "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary. A binary that died
# without its "test result:" line (a crash, a signal) is counted as one failure.
awk '/^ *Running / { suites++ }
     /^test result:/ { results++; for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { if (suites > results) { printf "test.sh: %d suite(s) ended without a result line\n", suites - results; f += suites - results }
           printf "total: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
