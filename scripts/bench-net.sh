#!/usr/bin/env bash
# Network benchmark: the test guest's virtio-net driver against
#   (a) bulkhead-runner + standalone bulkhead-net (vhost-user-net) on a tap, and
#   (b) QEMU's own userspace virtio-net on a tap (-netdev tap,vhost=off; this host has no
#       /dev/vhost-net),
# one run each, same guest, same workloads:
#   guest->host UDP : guest `net-stream` of MIB MiB (1472-byte datagrams) to a python sink
#                     that times first..last datagram;
#   host->guest UDP : a python sender blasts MIB MiB of the same pattern at the guest's
#                     `net-sink`; rate = bytes the guest counted (good checksums) over the
#                     time from the first send to the last frame the tap handed to the
#                     VMM (its tx_packets, sampled every ms). The blast is not paced: what
#                     the VMM has not taken when the tap's queue (txqueuelen, 1000 frames)
#                     is full is dropped by the tap ("tap drops" = its tx_dropped), so the
#                     loss says how far the VMM + guest fell behind the sender;
#   ping latency    : `ping -c 20 -i 0.05` from the host to the guest while it ticks, avg.
# Root only. Everything runs inside a network namespace created (and deleted on exit) here,
# on 10.77.8.0/24 and 10.77.9.0/24; no host interface is touched. IPv6 is off in it: the
# host's MLD reports and router solicitations on a fresh tap would otherwise land in (and
# stretch) the host->guest timing window.
# On a 2-CPU host the sender, the vCPU (which polls) and the VMM's RX thread share two CPUs,
# so results depend on where the scheduler puts them; run it a few times.
#
# Usage: sudo scripts/bench-net.sh [MIB]      (default 64)
# Env:   BIN_DIR (default target/release; built if missing), GUEST (test guest ELF),
#        QEMU (default qemu-system-x86_64).
set -euo pipefail

MIB=${1:-64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[ "$(id -u)" = 0 ] || { echo "bench-net: must run as root (taps, netns)" >&2; exit 2; }
[ -w /dev/kvm ] || { echo "bench-net: /dev/kvm is not usable" >&2; exit 2; }
QEMU=${QEMU:-qemu-system-x86_64}
command -v "$QEMU" >/dev/null || { echo "bench-net: $QEMU is not installed" >&2; exit 2; }
command -v python3 >/dev/null || { echo "bench-net: python3 is not installed" >&2; exit 2; }
command -v ping >/dev/null || { echo "bench-net: ping (iputils) is not installed" >&2; exit 2; }

BIN_DIR=${BIN_DIR:-target/release}
if [ "$BIN_DIR" = target/release ]; then
    cargo build --release -j2 -q --bin bulkhead-runner --bin bulkhead-net
fi
if [ -z "${GUEST:-}" ]; then
    # Builds the test guest (tests/build.rs) if its sources changed.
    cargo build -j2 -q -p bulkhead-tests
    GUEST=target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest
fi
for b in "$BIN_DIR/bulkhead-runner" "$BIN_DIR/bulkhead-net" "$GUEST"; do
    [ -e "$b" ] || { echo "bench-net: $b is missing" >&2; exit 2; }
done

NS=bh-bench-$$
WORK=$(mktemp -d /tmp/bh-bench-net.XXXXXX)
cleanup() {
    for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do [ -z "$(ip netns pids "$NS" 2>/dev/null)" ] && break; sleep 0.1; done
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
ip netns add "$NS"
ip netns exec "$NS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
ip -n "$NS" link set lo up

tap() { # name cidr
    ip -n "$NS" tuntap add dev "$1" mode tap vnet_hdr
    ip -n "$NS" addr add "$2" dev "$1"
    ip -n "$NS" link set dev "$1" up
}

cat > "$WORK/bench.py" <<'PY'
import json, math, os, re, socket, subprocess, sys, threading, time

mode, host, guest, mib, tap = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
vm_argv = sys.argv[6:]
IDLE_MS = 3000
N = math.ceil(mib * 2**20 / 1472)
cmdline = (f"net ip={guest}/24 peer={host} ping={host}:2 net-stream={host}:9000:{mib} "
           f"net-sink=9001:{mib} net-idle={IDLE_MS} ticks=200")
vm_argv = [a.replace("@CMDLINE@", cmdline) for a in vm_argv]

lines, cond = [], threading.Condition()
def reader(pipe):
    for raw in iter(pipe.readline, b""):
        with cond:
            lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\r\n")))
            cond.notify_all()
def wait_line(prefix, timeout):
    end = time.monotonic() + timeout
    with cond:
        while True:
            for t, l in lines:
                if l.startswith(prefix):
                    return t, l
            left = end - time.monotonic()
            if left <= 0:
                tail = "\n".join(l for _, l in lines[-30:])
                raise SystemExit(f"{mode}: no '{prefix}' from the guest\n{tail}")
            cond.wait(left)

# guest -> host sink, bound before the guest starts.
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 64 << 20)
sink.bind((host, 9000))
rx = {"bytes": 0, "n": 0, "first": None, "last": None}
def sink_loop():
    buf = bytearray(2048)
    sink.settimeout(60)
    while True:
        try:
            n = sink.recv_into(buf)
        except socket.timeout:
            return
        now = time.monotonic()
        if rx["first"] is None:
            rx["first"] = now
            sink.settimeout(1.0)
        rx["last"] = now
        rx["bytes"] += n
        rx["n"] += 1
        if rx["n"] >= N:
            return
st = threading.Thread(target=sink_loop); st.start()

vm = subprocess.Popen(vm_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=open(os.environ["VMLOG"], "wb"))
threading.Thread(target=reader, args=(vm.stdout,), daemon=True).start()
try:
    t_stream, stream_line = wait_line("net-stream: ", 300)
    # host -> guest: blast the pattern at net-sink right away (it waits net-idle).
    # One buffer per pattern, its first 4 bytes (the sequence number) rewritten per
    # datagram: no per-datagram allocation, so the sender is not the bottleneck.
    base = [bytearray((k + i) % 256 for i in range(1472)) for k in range(256)]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    tx.connect((guest, 9001))
    # The VMM drains the tap only as fast as the guest frees RX buffers: the tap's TX
    # counters, sampled every ms, time the delivery (the guest's TSC-based net-idle is
    # only a guess on some hosts, so its report is not used for timing).
    def txp(name="tx_packets"):
        with open(f"/sys/class/net/{tap}/statistics/{name}") as f:
            return int(f.read())
    drops0 = txp("tx_dropped")
    mon = {"start": txp(), "last_val": txp(), "last_t": None}
    mon_stop = threading.Event()
    def monitor():
        while not mon_stop.is_set():
            v, now = txp(), time.monotonic()
            if v != mon["last_val"]:
                mon["last_val"], mon["last_t"] = v, now
            elif mon["last_t"] and now - mon["last_t"] > 1.0 and now > t_sent_box[0]:
                return
            time.sleep(0.001)
    t_sent_box = [float("inf")]
    mt = threading.Thread(target=monitor); mt.start()
    t_send = time.monotonic()
    for seq in range(N):
        p = base[(7 * seq) % 256]
        p[0:4] = seq.to_bytes(4, "big")
        while True:
            try:
                tx.send(p)
                break
            except (BlockingIOError, OSError):
                time.sleep(0.0001)
    t_sent = time.monotonic()
    t_sent_box[0] = t_sent
    mt.join(60)
    mon_stop.set()
    delivered = mon["last_val"] - mon["start"]
    tap_drops = txp("tx_dropped") - drops0
    t_last = mon["last_t"] or t_sent
    t_sinkline, sink_line = wait_line("net-sink: ", 300)
    st.join(5)
    m = re.match(r"net-sink: (\d+) bytes in (\d+) datagrams, (\d+) missing", sink_line)
    g_bytes, g_n, g_lost = int(m.group(1)), int(m.group(2)), int(m.group(3))
    wait_line("tick 1", 30)
    p = subprocess.run(["ping", "-n", "-q", "-c", "20", "-i", "0.05", "-W", "1", guest],
                       capture_output=True, text=True, timeout=30)
    pm = re.search(r"= [\d.]+/([\d.]+)/", p.stdout)
    recv = re.search(r"(\d+) received", p.stdout)
    g2h_time = (rx["last"] - rx["first"]) if rx["n"] > 1 else float("nan")
    out = {
        "mode": mode,
        "g2h_MBps": rx["bytes"] / g2h_time / 1e6 if rx["n"] > 1 else 0.0,
        "g2h_loss_pct": 100.0 * (N - rx["n"]) / N,
        "g2h_line": stream_line,
        "h2g_MBps": g_bytes / max(t_last - t_send, 1e-6) / 1e6,
        "h2g_tap_frames": delivered,
        "h2g_tap_drops": tap_drops,
        "h2g_loss_pct": 100.0 * g_lost / N,
        "h2g_offered_MBps": N * 1472 / (t_sent - t_send) / 1e6,
        "h2g_line": sink_line,
        "ping_avg_ms": float(pm.group(1)) if pm else float("nan"),
        "ping_received": int(recv.group(1)) if recv else 0,
    }
    print(json.dumps(out), flush=True)
finally:
    vm.kill()
    vm.wait()
PY

run() { # mode host guest tap -- vm argv (with @CMDLINE@)
    local mode=$1 host=$2 guest=$3 tap=$4; shift 5
    ip netns exec "$NS" env VMLOG="$WORK/$mode.vm.log" \
        python3 "$WORK/bench.py" "$mode" "$host" "$guest" "$MIB" "$tap" "$@" | tail -1 > "$WORK/$mode.json"
}

echo "bench-net: $MIB MiB each way, netns $NS, $(nproc) CPUs, $($QEMU --version | head -1)" >&2

# (a) bulkhead-runner + standalone bulkhead-net on tap bn0.
tap bn0 10.77.9.1/24
ip netns exec "$NS" "$BIN_DIR/bulkhead-net" --socket "$WORK/net.sock" --tap bn0 \
    --mac 52:54:00:77:09:02 2> "$WORK/bulkhead-net.log" &
disown
for _ in $(seq 100); do [ -S "$WORK/net.sock" ] && break; sleep 0.05; done
run bulkhead 10.77.9.1 10.77.9.2 bn0 -- "$BIN_DIR/bulkhead-runner" --kernel "$GUEST" \
    --memory 256M --vcpus 1 --net-socket "$WORK/net.sock" --cmdline @CMDLINE@

# (b) QEMU, userspace virtio-net on tap bq0.
tap bq0 10.77.8.1/24
run qemu 10.77.8.1 10.77.8.2 bq0 -- "$QEMU" -M pc -enable-kvm -cpu host,-arch-capabilities \
    -m 256 -smp 1 -nodefaults -no-user-config -nographic -serial stdio \
    -device isa-debug-exit,iobase=0xf4,iosize=4 \
    -netdev tap,id=n0,ifname=bq0,script=no,downscript=no,vhost=off \
    -device virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:77:08:02 \
    -kernel "$GUEST" -append @CMDLINE@

python3 - "$WORK/bulkhead.json" "$WORK/qemu.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
rows = [("guest->host UDP  (MB/s)", "g2h_MBps", True),
        ("host->guest UDP  (MB/s)", "h2g_MBps", True),
        ("ping avg         (ms)  ", "ping_avg_ms", False)]
print(f"{'':26}{'(a) bulkhead':>14}{'(b) qemu':>12}{'(a)/(b)':>10}")
for name, k, _ in rows:
    r = a[k] / b[k] if b[k] else float("nan")
    print(f"{name:26}{a[k]:14.2f}{b[k]:12.2f}{r:10.2f}")
print(f"{'guest->host loss (%)':26}{a['g2h_loss_pct']:14.2f}{b['g2h_loss_pct']:12.2f}")
print(f"{'host->guest loss (%)':26}{a['h2g_loss_pct']:14.2f}{b['h2g_loss_pct']:12.2f}")
print(f"{'host->guest offered (MB/s)':26}{a['h2g_offered_MBps']:14.2f}{b['h2g_offered_MBps']:12.2f}")
print(f"{'host->guest tap frames':26}{a['h2g_tap_frames']:14d}{b['h2g_tap_frames']:12d}")
print(f"{'host->guest tap drops':26}{a['h2g_tap_drops']:14d}{b['h2g_tap_drops']:12d}")
print(f"{'pings answered (of 20)':26}{a['ping_received']:14d}{b['ping_received']:12d}")
for x in (a, b):
    print(f"{x['mode']}: {x['g2h_line']} | {x['h2g_line']}")
PY
