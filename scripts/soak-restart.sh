#!/usr/bin/env bash
# Soak test of per-device restart: N abuses (default 1000) of running backends — SIGKILL,
# SIGSTOP and SIGSEGV, of disk and net backends, serving or standby, at random moments —
# while one VM streams checksummed writes to its disk and another echoes UDP for a client.
# At the end the disk image is verified sector by sector. Prints the abuses survived, data
# errors, lost datagrams and the longest guest-visible disk stall. Runs as root; builds the
# release binaries and the test guest first. Logs and state: $BULKHEAD_SOAK_DIR
# (default /tmp/bulkhead-soak).
#   bash scripts/soak-restart.sh [N] [--seed S]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "soak-restart: run as root" >&2; exit 1; }
[ -e /dev/kvm ] || { echo "soak-restart: needs /dev/kvm" >&2; exit 1; }
cargo build --release --workspace --bins >&2
cargo build --release -p bulkhead-tests >&2 # builds the test guest
exec /usr/bin/python3 scripts/soak_restart.py "$@"
