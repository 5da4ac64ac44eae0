#!/usr/bin/env bash
# Disk backend restart latency under load: a test-guest VM streams writes to a disk served
# by bulkhead-blk through bulkheadd; the backend is SIGKILLed N times (default 100) and two
# times are measured for each kill: to the new backend being connected to the runner
# (bulkheadd records the restart once the runner has replayed the setup and kicked the
# queues), and to the first request the new backend completes (its log line carries a
# CLOCK_MONOTONIC reading, the clock Python's time.monotonic() reads). Prints median and
# max of both. Root; uses its own temp state dir and socket.
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
# Runners outlive bulkheadd by design: destroy the VM before stopping the daemon.
trap '"$bin/bulkhead" --socket "$sock" destroy bench >/dev/null 2>&1; kill $daemon 2>/dev/null; rm -rf "$work"' EXIT
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
restart_limit = 0   # the benchmark kills faster than the default 120/min allows
TOML
"$bin/bulkhead" --socket "$sock" create "$work/vm.toml" >&2
python3 - "$work/state/vms/bench.toml" "$kills" "$work/state/logs/bench.disk0.log" <<'PY'
import os, re, signal, statistics, sys, time, tomllib
state, kills, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
FIRST = re.compile(r"first request completed .*\(monotonic ([0-9.]+)\)")
def completions():
    with open(log, errors="replace") as f:
        return [float(m.group(1)) for m in FIRST.finditer(f.read())]
def backend():
    with open(state, "rb") as f:
        b = tomllib.load(f)["backends"][0]
    return b["pid"], b.get("restarts", 0)
lat, served = [], []
deadline = time.monotonic() + 30
while not completions():
    if time.monotonic() > deadline:
        sys.exit("the first backend never completed a request")
    time.sleep(0.01)
time.sleep(0.5)
for i in range(kills):
    pid, restarts = backend()
    seen = len(completions())
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
    while len(completions()) <= seen:
        if time.monotonic() - t0 > 30:
            sys.exit(f"kill {i}: the new backend completed no request within 30 s")
        time.sleep(0.001)
    served.append((completions()[seen] - t0) * 1000)
    time.sleep(0.3)
def show(what, xs):
    print(f"{kills} kills under a write stream: SIGKILL -> {what}: "
          f"median {statistics.median(xs):.1f} ms, max {max(xs):.1f} ms, min {min(xs):.1f} ms")
show("new backend connected", lat)
show("first request completed by the new backend", served)
PY
grep -c "restarted" "$work/d.log" | xargs -I{} echo "(bulkheadd logged {} restarts; goal: median <= 20 ms)"
