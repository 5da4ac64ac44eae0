#!/usr/bin/env bash
# The main job: build Bulkhead, start the control domain (bulkheadd), create a demo VM (the
# bare-metal test guest, 2 vCPUs, one disk served by bulkhead-blk, one NIC served by
# bulkhead-net on a tap in bridge bhdemo0, 10.77.200.1/24 on the host side) through the
# `bulkhead` CLI, show its console, ping it from the host, then shut it down and remove the
# bridge. Runs as root (bulkheadd creates namespaces, taps and bridges and switches runners
# to their own uid). Set KEEP=1 to leave the daemon, the VM and the bridge up and attach to
# the console yourself.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh >&2
cargo build --release --workspace --bins >&2
cargo build --release -p bulkhead-tests >&2     # builds the test guest
bin=target/release
guest=$PWD/target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest
work=${BULKHEAD_DEMO_DIR:-/tmp/bulkhead-demo}
sock=$work/bulkhead.sock
mkdir -p "$work"
bh() { "$bin/bulkhead" --socket "$sock" "$@"; }

# The policy: root acts (no [admins] needed), and the demo VM may join network "demo".
cat >"$work/policy.toml" <<TOML
[networks.demo]
bridge = "bhdemo0"
address = "10.77.200.1/24"
vms = ["demo"]
TOML

if ! bh list >/dev/null 2>&1; then
  echo "== starting bulkheadd (state in $work/state, log in $work/bulkheadd.log) ==" >&2
  "$bin/bulkheadd" --socket "$sock" --state-dir "$work/state" --policy "$work/policy.toml" \
    >"$work/bulkheadd.log" 2>&1 &
  for _ in $(seq 100); do bh list >/dev/null 2>&1 && break; sleep 0.05; done
fi
bh destroy demo >/dev/null 2>&1 || true
rm -f "$work/demo-disk.img"
truncate -s 64M "$work/demo-disk.img"

cat >"$work/demo.toml" <<TOML
name = "demo"
vcpus = 2
memory = "256M"
kernel = "$guest"
# The test guest finds its virtio-blk disk (served by a sandboxed bulkhead-blk), writes a
# pattern over 2048 sectors and verifies it; brings up its virtio-net NIC (a sandboxed
# bulkhead-net on a tap) as 10.77.200.2 and pings the host; then ticks, answering pings,
# until asked to shut down.
cmdline = "blk blk-id blk-queues=2 blk-write=1:0:2048 blk-verify=1:0:2048 net ip=10.77.200.2/24 peer=10.77.200.1 ping=10.77.200.1:3 ticks=500"
[[disks]]
path = "$work/demo-disk.img"
serial = "demo-disk"
[[nics]]
network = "demo"
TOML
echo "== bulkhead create $work/demo.toml ==" >&2
bh create "$work/demo.toml"
bh list
bh info demo
echo "== bulkhead console demo (3 seconds) ==" >&2
timeout 3 "$bin/bulkhead" --socket "$sock" console demo </dev/null || true
echo
echo "== ping -c 3 10.77.200.2 (the guest, from the host) ==" >&2
ping -c 3 -W 2 10.77.200.2 || echo "(no answer from the guest)" >&2
if [ "${KEEP:-0}" = 1 ]; then
  echo "== left running: $bin/bulkhead --socket $sock console demo (Ctrl-] detaches) ==" >&2
  exit 0
fi
echo "== bulkhead shutdown demo ==" >&2
bh shutdown demo --timeout 20
bh list
bh destroy demo
pkill -TERM -f "bulkheadd --socket $sock" || true
ip link del bhdemo0 2>/dev/null || true
