#!/usr/bin/env bash
# Disk backend restart latency under load: a test-guest VM streams writes to a disk served
# by bulkhead-blk through bulkheadd; the backend is SIGKILLed N times (default 100) and the
# time from the kill to the new backend being connected to the runner (bulkheadd records the
# restart once the runner has replayed the setup and kicked the queues) is measured.
# Prints median and max. Root; uses its own temp state dir and socket.
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-100}
cargo build --release --workspace --bins >&2
cargo build --release -p bulkhead-tests >&2
bin=$PWD/target/release
guest=$PWD/target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest
work=$(mktemp -d /tmp/bulkhead-bench-restart.XXXXXX)
sock=$work/bh.sock
"$bin/bulkheadd" --socket "$sock" --state-dir "$work/state" --policy "$work/none.toml" >"$work/d.log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; pkill -f "$work" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do "$bin/bulkhead" --socket "$sock" list >/dev/null 2>&1 && break; sleep 0.05; done
truncate -s 8M "$work/disk.img"
cat >"$work/vm.toml" <<TOML
name = "bench"
vcpus = 2
memory = "256M"
kernel = "$guest"
cmdline = "blk blk-queues=2 blk-stream=1:0:2048:100000000 ticks=1000"
[[disks]]
path = "$work/disk.img"
queues = 2
TOML
"$bin/bulkhead" --socket "$sock" create "$work/vm.toml" >&2
python3 - "$work/state/vms/bench.toml" "$kills" <<'PY'
import os, signal, statistics, sys, time, tomllib
state, kills = sys.argv[1], int(sys.argv[2])
def backend():
    with open(state, "rb") as f:
        b = tomllib.load(f)["backends"][0]
    return b["pid"], b.get("restarts", 0)
lat = []
time.sleep(0.5)
for i in range(kills):
    pid, restarts = backend()
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while True:
        try:
            p, r = backend()
        except Exception:
            p, r = pid, restarts
        if r > restarts:
            break
        if time.monotonic() - t0 > 30:
            sys.exit(f"kill {i}: no restart within 30 s")
        time.sleep(0.0005)
    lat.append((time.monotonic() - t0) * 1000)
    time.sleep(0.3)
print(f"{kills} kills under a write stream: SIGKILL -> new backend connected: "
      f"median {statistics.median(lat):.1f} ms, max {max(lat):.1f} ms, min {min(lat):.1f} ms")
PY
grep -c "restarted" "$work/d.log" | xargs -I{} echo "(bulkheadd logged {} restarts; goal: median <= 20 ms)"
