#!/usr/bin/env bash
# Disk backend restart latency under load, side by side with a peer, in one invocation.
# The same test guest streams writes (2 vCPUs, 2 queues) and reports every request that
# took >= 2 ms (`blk-stall-ms=2`, a `blk-stall:` console line); the disk backend is
# SIGKILLed N times (default 100), 0.3 s apart once the guest has moved on.
#  (a) bulkheadd + bulkhead-runner + bulkhead-blk: bulkheadd hands the runner the disk's
#      standby backend (or respawns one) and the runner replays the setup. Three times per
#      kill: to the new backend being connected
#      (bulkheadd records the restart once the runner has replayed the setup and kicked the
#      queues), to the first request the new backend completes (its log line carries a
#      CLOCK_MONOTONIC reading, the clock Python's time.monotonic() reads), and the longest
#      request the guest saw complete after the kill (the guest-visible stall).
#  (b) QEMU + qemu-storage-daemon (vhost-user-blk, chardev reconnect-ms=10): this script
#      plays supervisor and starts a new qsd on the socket path as soon as the old one is
#      reaped; the guest-visible stall is measured the same way.
# Prints median and max of each, and the (a)/(b) ratio of the guest-visible stall.
# Root; uses its own temp state dir and sockets.
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-100}
cargo build --release --workspace --bins >&2
cargo build --release -p bulkhead-tests >&2
bin=$PWD/target/release
guest=$PWD/target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest
work=$(mktemp -d /tmp/bulkhead-bench-restart.XXXXXX)
sock=$work/bh.sock
cmdline="blk blk-queues=2 blk-stall-ms=2 blk-stream=1:0:2048:100000000"
"$bin/bulkheadd" --socket "$sock" --state-dir "$work/state" --policy "$work/none.toml" >"$work/d.log" 2>&1 &
daemon=$!
# Runners outlive bulkheadd by design: destroy the VM before stopping the daemon.
# (errexit holds in the trap too: every step may fail, e.g. the VM is already destroyed.)
trap '"$bin/bulkhead" --socket "$sock" destroy bench >/dev/null 2>&1 || true; kill $daemon 2>/dev/null || true
      pkill -f "qemu-storage-daemon.*$work" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do "$bin/bulkhead" --socket "$sock" list >/dev/null 2>&1 && break; sleep 0.05; done
truncate -s 8M "$work/disk.img"
cat >"$work/vm.toml" <<TOML
name = "bench"
vcpus = 2
memory = "256M"
kernel = "$guest"
cmdline = "$cmdline"
[[disks]]
path = "$work/disk.img"
queues = 2
restart_limit = 0   # the benchmark kills faster than the default 120/min allows
TOML
"$bin/bulkhead" --socket "$sock" create "$work/vm.toml" >&2
truncate -s 8M "$work/qsd.img"
python3 - "$kills" "$work" "$bin" "$guest" "$cmdline" <<'PY'
import os, re, signal, statistics, subprocess, sys, threading, time, tomllib
kills, work, bin_dir, guest, cmdline = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
STALL = re.compile(rb"blk-stall: ([0-9]+) us")
FIRST = re.compile(r"first request completed .*\(monotonic ([0-9.]+)\)")

class Console:
    """Timestamps the guest's blk-stall lines read from a process's stdout."""
    def __init__(self, proc):
        self.proc, self.stalls, self.lock = proc, [], threading.Lock()
        self.passes = 0
        threading.Thread(target=self.read, daemon=True).start()
    def read(self):
        for line in self.proc.stdout:
            now = time.monotonic()
            with self.lock:
                m = STALL.search(line)
                if m:
                    self.stalls.append((now, int(m.group(1)) / 1000))
                elif b"blk-stream: pass" in line:
                    self.passes += 1
    def since(self, t):
        with self.lock:
            return [ms for (at, ms) in self.stalls if at >= t]
    def wait_passes(self, n, what):
        deadline = time.monotonic() + 30
        while self.passes < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit(f"{what}: the guest's stream did not start")
            time.sleep(0.01)

class Lost(Exception):
    pass

def stall_after(con, t0, what):
    """The longest request the guest saw complete after t0: waits for the first stall
    line, then 0.3 s for the rest of that burst."""
    while not con.since(t0):
        if time.monotonic() - t0 > 30:
            raise Lost(f"{what}: the guest reported no stalled request within 30 s")
        time.sleep(0.001)
    time.sleep(0.3)
    return max(con.since(t0))

def show(label, xs):
    print(f"{label:<62} {statistics.median(xs):>9.1f} {max(xs):>9.1f} {min(xs):>9.1f}")

# (a) Bulkhead.
state, log = f"{work}/state/vms/bench.toml", f"{work}/state/logs/bench.disk0.log"
def completions():
    with open(log, errors="replace") as f:
        return [float(m.group(1)) for m in FIRST.finditer(f.read())]
def backend():
    with open(state, "rb") as f:
        b = tomllib.load(f)["backends"][0]
    return b["pid"], b.get("restarts", 0)
con = Console(subprocess.Popen([f"{bin_dir}/bulkhead", "--socket", f"{work}/bh.sock", "console", "bench"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
con.wait_passes(2, "bulkhead")
# A backend that dies within 250 ms of starting is restarted after a back-off: let the
# first one get older than that.
time.sleep(0.5)
connected, served, stall_a = [], [], []
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
    connected.append((time.monotonic() - t0) * 1000)
    while len(completions()) <= seen:
        if time.monotonic() - t0 > 30:
            sys.exit(f"kill {i}: the new backend completed no request within 30 s")
        time.sleep(0.001)
    served.append((completions()[seen] - t0) * 1000)
    try:
        stall_a.append(stall_after(con, t0, f"bulkhead kill {i}"))
    except Lost as e:
        sys.exit(str(e))
con.proc.kill()
subprocess.run([f"{bin_dir}/bulkhead", "--socket", f"{work}/bh.sock", "destroy", "bench"],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

# (b) QEMU + qemu-storage-daemon.
qsock = f"{work}/qsd.sock"
def start_qsd():
    try:
        os.unlink(qsock)
    except FileNotFoundError:
        pass
    p = subprocess.Popen(["qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file,filename={work}/qsd.img",
        "--blockdev", "driver=raw,node-name=disk,file=file",
        "--export", f"type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={qsock},writable=on,num-queues=2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p
qsd = start_qsd()
deadline = time.monotonic() + 10
while not os.path.exists(qsock):
    if time.monotonic() > deadline:
        sys.exit("qemu-storage-daemon made no socket")
    time.sleep(0.005)
qemu = subprocess.Popen(["qemu-system-x86_64", "-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities",
    "-m", "256", "-smp", "2", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
    "-kernel", guest, "-append", cmdline,
    "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
    "-chardev", f"socket,id=c0,path={qsock},reconnect-ms=10", "-device", "vhost-user-blk-pci,chardev=c0"],
    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(f"{work}/qemu.err", "wb"))
lost = None
try:
    con = Console(qemu)
    con.wait_passes(2, "QEMU")
    time.sleep(0.5)
    stall_b = []
    for i in range(kills):
        t0 = time.monotonic()
        qsd.send_signal(signal.SIGKILL)
        qsd.wait()
        qsd = start_qsd()
        try:
            stall_b.append(stall_after(con, t0, f"QEMU kill {i + 1}"))
        except Lost as e:
            lost = str(e)
            break
finally:
    qemu.kill()
    qsd.kill()

print(f"{kills} kills of the disk backend under a write stream (ms){'':>16} {'median':>9} {'max':>9} {'min':>9}")
show("(a) bulkhead: SIGKILL -> new backend connected", connected)
show("(a) bulkhead: SIGKILL -> first request completed by new backend", served)
show("(a) bulkhead: longest guest request after the kill", stall_a)
if stall_b:
    show("(b) QEMU + qsd: longest guest request after the kill", stall_b)
if lost:
    with open(f"{work}/qemu.err", errors="replace") as f:
        errs = sorted(set(l.strip() for l in f if l.strip()))
    print(f"(b) stopped after {len(stall_b)} kills: {lost}; QEMU said: " + " | ".join(errs[-6:]))
    if not stall_b:
        sys.exit(0)
print(f"{'guest-visible stall, (a)/(b):':<62} {statistics.median(stall_a) / statistics.median(stall_b):>8.2f}x "
      f"{max(stall_a) / max(stall_b):>8.2f}x")
PY
grep -c "restarted" "$work/d.log" | xargs -I{} echo "(bulkheadd logged {} restarts; goal: (a) first request completed, median <= 20 ms)"
