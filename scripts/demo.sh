#!/usr/bin/env bash
# The main job, for now: build bulkhead-runner and the bare-metal test guest, then boot the
# guest on 2 vCPUs and show its console. (The control domain and devices come next.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p bulkhead-core-vmm -p bulkhead-tests >&2
guest=target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest
echo "== booting the test guest under bulkhead-runner (2 vCPUs, 256 MiB) ==" >&2
set +e
target/release/bulkhead-runner --kernel "$guest" --vcpus 2 --memory 256M \
  --cmdline "demo exit=0" --verbose "$@"
status=$?
set -e
echo "== bulkhead-runner exited with status $status ==" >&2
exit "$status"
