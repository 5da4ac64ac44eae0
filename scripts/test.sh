#!/usr/bin/env bash
# Runs every Bulkhead test suite: installs host packages if missing (as root), builds the
# binaries the end-to-end suites start, then runs the unit and end-to-end tests.
# Tests that need /dev/kvm fail (not skip) when it exists here: REQUIRE_KVM=1.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
  bash scripts/install-deps.sh
fi
if [ -e /dev/kvm ] && [ -z "${REQUIRE_KVM:-}" ]; then
  export REQUIRE_KVM=1
fi
cargo build --workspace --bins
# A second, different build of the disk backend: the live-upgrade test moves a running
# guest's disk between the two.
cargo build --release -p bulkhead-backends --bin bulkhead-blk
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
