#!/usr/bin/python3
"""The soak test behind scripts/soak-restart.sh (run that: it builds first).

Two VMs under one bulkheadd, inside a network namespace of their own:
  soakdisk  streams checksummed, sequence-numbered writes over a two-queue disk
            (blk-stream, reporting stalls of 100 ms and more: blk-stall-ms);
  soaknet   echoes UDP for a client in the namespace that sends one datagram at a time.
Then N abuses, one after the other at random moments: SIGKILL, SIGSTOP or SIGSEGV of the
disk or the net backend, the serving one (mostly) or its standby. After each, the abused
process must be replaced (a stopped one after the device's hang timeout) and the device
must not be failed. At the end the image is verified sector by sector.

usage: soak_restart.py [N] [--seed S]
"""
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
GUEST = os.path.join(ROOT, "target", "guest", "x86_64-unknown-linux-gnu", "release",
                     "bulkhead-test-guest")
WORK = os.environ.get("BULKHEAD_SOAK_DIR", "/tmp/bulkhead-soak")
NS = "bhsoak"
SOCK = os.path.join(WORK, "bulkhead.sock")
STATE = os.path.join(WORK, "state")
IMG = os.path.join(WORK, "disk.img")
SEED_STREAM = 77
SECTORS = 2048
HANG_S = 2.0  # the devices' hang_timeout_ms / 1000 (the default)

ECHO_CLIENT = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.5)
sent = ok = 0
stop = float(sys.argv[3])
while time.time() < stop:
    payload = struct.pack("<Q", sent) + bytes(range(56))
    s.send(payload)
    sent += 1
    deadline = time.time() + 0.5
    while time.time() < deadline:
        try:
            back = s.recv(2048)
        except (socket.timeout, ConnectionRefusedError):
            break
        if back == payload:
            ok += 1
            break
    if sent % 500 == 0:
        print("progress", sent, ok, flush=True)
print("sent", sent, "ok", ok, flush=True)
"""


def log(msg):
    print(f"soak: {msg}", file=sys.stderr, flush=True)


def run(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def bh(*args, check=True):
    r = run(os.path.join(REL, "bulkhead"), "--socket", SOCK, *args, check=False)
    if check and r.returncode != 0:
        raise SystemExit(f"soak: bulkhead {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def record(vm):
    """The daemon's state record of `vm` (pid of each device's serving backend and standby)."""
    with open(os.path.join(STATE, "vms", f"{vm}.toml"), "rb") as f:
        rec = tomllib.load(f)
    return {b["device"]: b for b in rec.get("backends", [])}


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond, timeout, step=0.02):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def stream_sector_ok(data, n, seed):
    words = struct.unpack("<64Q", data)
    if words[0] != n or words[2] != seed or words[1] == 0 or words[3] == 0:
        return None
    p = words[1]
    mask = (1 << 64) - 1
    x = (seed ^ ((n * 0x9E3779B97F4A7C15) & mask) ^ ((p << 32) & mask)) & mask
    if x == 0:
        x = 0x9E3779B97F4A7C15
    for i in range(4, 64):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        if words[i] != x:
            return None
    return p


def verify_image():
    """Sectors that are not an intact stream write, and the passes found."""
    bad, passes = [], set()
    with open(IMG, "rb") as f:
        data = f.read(SECTORS * 512)
    for n in range(SECTORS):
        p = stream_sector_ok(data[n * 512:(n + 1) * 512], n, SEED_STREAM)
        if p is None:
            bad.append(n)
        else:
            passes.add(p)
    return bad, passes


def echo_totals(out):
    """(sent, echoed) from the echo client's output (its last complete progress line when
    it was cut short)."""
    sent = ok = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "progress" and parts[1].isdigit() and parts[2].isdigit():
            sent, ok = int(parts[1]), int(parts[2])
        if len(parts) == 4 and parts[0] == "sent" and parts[1].isdigit() and parts[3].isdigit():
            sent, ok = int(parts[1]), int(parts[3])
    return sent, ok


def setup():
    run("rm", "-rf", WORK, check=False)
    os.makedirs(WORK)
    run("ip", "netns", "del", NS, check=False)
    run("ip", "netns", "add", NS)
    run("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
    with open(os.path.join(WORK, "policy.toml"), "w") as f:
        f.write('[networks.soak]\nbridge = "bhsoak0"\naddress = "10.77.9.1/24"\n'
                'vms = ["soaknet"]\n')
    daemon_log = open(os.path.join(WORK, "bulkheadd.log"), "w")
    daemon = subprocess.Popen(
        ["ip", "netns", "exec", NS, os.path.join(REL, "bulkheadd"), "--socket", SOCK,
         "--state-dir", STATE, "--policy", os.path.join(WORK, "policy.toml")],
        stdout=daemon_log, stderr=subprocess.STDOUT)
    if not wait_until(lambda: bh("list", check=False).returncode == 0, 10):
        raise SystemExit("soak: bulkheadd did not come up (see bulkheadd.log)")
    with open(IMG, "wb") as f:
        f.truncate(8 << 20)
    with open(os.path.join(WORK, "soakdisk.toml"), "w") as f:
        f.write(f'name = "soakdisk"\nvcpus = 2\nmemory = "256M"\nkernel = "{GUEST}"\n'
                f'cmdline = "blk blk-queues=2 blk-stall-ms=100 '
                f'blk-stream={SEED_STREAM}:0:{SECTORS}:100000000 echo"\n'
                f'[[disks]]\npath = "{IMG}"\nqueues = 2\nrestart_limit = 0\n')
    with open(os.path.join(WORK, "soaknet.toml"), "w") as f:
        f.write(f'name = "soaknet"\nvcpus = 1\nmemory = "128M"\nkernel = "{GUEST}"\n'
                'cmdline = "net ip=10.77.9.2/24 peer=10.77.9.1 udp-echo=7000:2000000000 '
                'net-idle=100000000"\n'
                '[[nics]]\nnetwork = "soak"\nrestart_limit = 0\n')
    bh("create", os.path.join(WORK, "soakdisk.toml"))
    bh("create", os.path.join(WORK, "soaknet.toml"))
    console = open(os.path.join(WORK, "soakdisk.console"), "w")
    con = subprocess.Popen([os.path.join(REL, "bulkhead"), "--socket", SOCK, "console",
                            "soakdisk"], stdin=subprocess.PIPE, stdout=console,
                           stderr=subprocess.STDOUT)
    return daemon, con


def standby_ready(vm, dev):
    b = record(vm).get(dev, {})
    return b.get("standby_pid") and alive(b["standby_pid"])


def abuse(rng, stats):
    vm, dev = rng.choice([("soakdisk", "disk0"), ("soaknet", "nic0")])
    sig = rng.choice([signal.SIGKILL, signal.SIGSTOP, signal.SIGSEGV])
    wait_until(lambda: standby_ready(vm, dev), 10)
    b = record(vm)[dev]
    target = "serving"
    pid = b["pid"]
    if rng.random() < 0.2 and b.get("standby_pid"):
        target, pid = "standby", b["standby_pid"]
    if not alive(pid):
        stats["skipped"] += 1
        return
    os.kill(pid, sig)
    t = time.time()
    limit = {signal.SIGSTOP: HANG_S + 10, signal.SIGSEGV: 2}.get(sig, 10)
    if target == "serving":
        ok = wait_until(lambda: record(vm)[dev]["pid"] != pid and alive(record(vm)[dev]["pid"]),
                        limit)
    else:
        ok = wait_until(lambda: not alive(pid), limit)
    took = time.time() - t
    failed = record(vm)[dev].get("failed")
    key = f"{dev} {target} {signal.Signals(sig).name}"
    stats["by"][key] = stats["by"].get(key, 0) + 1
    if sig == signal.SIGSEGV and not ok and alive(pid) and not failed:
        # A SIGSEGV sent with kill() is no fault: Rust's handler (there for stack
        # overflows) returns and the process goes on serving. Nothing to replace.
        stats["absorbed"] += 1
        stats["survived"] += 1
        return
    if ok and not failed:
        stats["survived"] += 1
        stats["max_replace_s"] = max(stats["max_replace_s"], took)
    else:
        stats["lost"].append(f"{key} pid {pid}: {'failed: ' + failed if failed else 'not replaced'}")
        if failed:
            bh("device-restart", vm, dev, check=False)
    if sig == signal.SIGSTOP and alive(pid):
        os.kill(pid, signal.SIGKILL)  # one that was not replaced yet must not linger


def main():
    args = sys.argv[1:]
    n, seed = 1000, int(time.time())
    if "--seed" in args:
        i = args.index("--seed")
        seed = int(args[i + 1])
        del args[i:i + 2]
    if args:
        n = int(args[0])
    rng = random.Random(seed)
    log(f"{n} abuses, seed {seed}, work dir {WORK}")
    daemon, con = setup()
    client = None
    try:
        time.sleep(1)
        client = subprocess.Popen(
            ["ip", "netns", "exec", NS, "/usr/bin/python3", "-c", ECHO_CLIENT, "10.77.9.2",
             "7000", str(time.time() + 100000)],
            stdout=open(os.path.join(WORK, "echo-client.out"), "w"), text=True)
        stats = {"survived": 0, "skipped": 0, "absorbed": 0, "lost": [], "by": {},
                 "max_replace_s": 0.0}
        t0 = time.time()
        for i in range(n):
            time.sleep(rng.uniform(0.02, 0.3))
            abuse(rng, stats)
            if (i + 1) % 50 == 0:
                log(f"{i + 1}/{n} abuses, {stats['survived']} survived, "
                    f"{len(stats['lost'])} not, {time.time() - t0:.0f} s")
        time.sleep(1)
        client.send_signal(signal.SIGTERM)
        try:
            client.wait(timeout=5)
        except subprocess.TimeoutExpired:
            client.kill()
        with open(os.path.join(WORK, "echo-client.out")) as f:
            client_out = f.read()
        # The echo client's totals: from its last progress line when SIGTERM cut it.
        sent, ok = echo_totals(client_out)
        bh("destroy", "soakdisk")
        bh("destroy", "soaknet")
        con.wait(timeout=10)
        with open(os.path.join(WORK, "soakdisk.console")) as f:
            console = f.read()
        stalls = [int(l.split()[1]) for l in console.splitlines()
                  if l.startswith("blk-stall:") and len(l.split()) > 1 and l.split()[1].isdigit()]
        io_errors = [l for l in console.splitlines()
                     if l.startswith("blk-stream: pass") and "status" in l]
        bad, passes = verify_image()
        spread = (max(passes) - min(passes)) if passes else 0
        print(f"abuses: {n} ({stats['skipped']} skipped: the process was already gone), "
              f"seed {seed}, {time.time() - t0:.0f} s")
        for k in sorted(stats["by"]):
            print(f"  {k}: {stats['by'][k]}")
        print(f"survived: {stats['survived']} ({stats['absorbed']} of them SIGSEGVs the "
              f"process absorbed and kept serving); not survived: {len(stats['lost'])}")
        for l in stats["lost"][:10]:
            print(f"  {l}")
        print(f"slowest replacement: {stats['max_replace_s'] * 1000:.0f} ms")
        print(f"disk: guest I/O errors {len(io_errors)}; data errors {len(bad) + (spread > 1)} "
              f"(sectors not an intact stream write: {len(bad)}; passes on disk "
              f"{min(passes) if passes else 0}..{max(passes) if passes else 0})")
        print(f"disk: max guest-visible stall {max(stalls) / 1000 if stalls else 0:.0f} ms "
              f"over {len(stalls)} stalls of 100 ms or more")
        print(f"net: {sent} datagrams sent, {ok} echoed, {sent - ok} lost")
        good = not stats["lost"] and not io_errors and not bad and spread <= 1
        print("soak: PASS" if good else "soak: FAIL")
        return 0 if good else 1
    finally:
        if client and client.poll() is None:
            client.kill()
        if con.poll() is None:
            con.kill()
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
        run("ip", "netns", "del", NS, check=False)


if __name__ == "__main__":
    sys.exit(main())
