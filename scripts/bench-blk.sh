#!/usr/bin/env bash
# Disk data path, side by side, in one run: the same test guest and the same image under
#  (a) bulkhead-runner + bulkhead-blk            (b) QEMU + qemu-storage-daemon (vhost-user-blk)
#  (c) QEMU's built-in virtio-blk-pci            (d) fio on the host, same pattern on the image
# Patterns: sequential write and read in 64 KiB and 1 MiB requests (4 in flight, as the
# guest's blk-write=/blk-read= keep), 4 KiB random read and write at queue depth 1 and 32
# (blk-rand=/blk-rand-write=). The sequential patterns skip the guest's checksum
# (blk-nohash): its byte-wise FNV-1a capped every VMM at ~650 MiB/s from a RAM-backed image
# (the tests verify the data; this measures the path), and the writes fill each guest
# buffer once (blk-nogen), as fio fills its buffers, rather than make each sector's
# pattern. Every number comes from the guest's own `blk-perf:` line (TSC-timed, tsc-khz=
# from the host), so VMM start-up is not counted. Runs are interleaved: for each
# repetition, for each pattern, each system in turn (each repetition starting with the next
# system, so none always follows the previous pattern); the table shows medians of REPS
# repetitions and the ratios of (a) to the others.
#
# CPU: for each run, the CPU time the VMM process (minus its vCPU threads, which spin in the
# polling guest) and the backend process used between the guest's disk init and the end of
# the pattern, per GiB moved ("I/O CPU s/GiB"); fio: its own user+system time.
#
# Usage: bash scripts/bench-blk.sh [MiB]      env: REPS=3 CACHE=none|writeback ENGINE=auto
#   ONLY=REGEX (run only the patterns whose name matches, e.g. ONLY='rand')
#   POLL=US (bulkhead-blk --poll-us: the adaptive polling limit; default: the backend's own,
#   as bulkheadd uses it; 0 never polls. qsd polls by itself, adaptively up to 32 us)
#   PIN=1 (for (a) and (b) alike: the VMM process on CPU 0, the backend process on CPU 1)
#   HUGEPAGES=1 (guest RAM of (a)-(c) in 2 MiB hugetlb pages: bulkhead-runner --hugepages,
#   QEMU's memory-backend-memfd hugetlb=on; fio's buffers --iomem=shmhuge. As root, the host
#   pool is raised to what the run needs and put back after. Default: 4 KiB pages, as each
#   system has them out of the box: shared memfd RAM for (a) and (b), and QEMU's own
#   anonymous RAM for (c), which gets transparent huge pages where the host allows madvise)
#   MiB: image size and sequential amount (default 256). CACHE: host caching for all of
#   (a)-(d) (none = O_DIRECT everywhere; default). The machine is shared: numbers are noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-256}
reps=${REPS:-3}
cache=${CACHE:-none}
engine=${ENGINE:-auto}
only=${ONLY:-}
poll=${POLL:-}
pin=${PIN:-0}
huge=${HUGEPAGES:-0}
case "$cache" in none|writeback) ;; *) echo "CACHE must be none or writeback" >&2; exit 2 ;; esac
for t in qemu-system-x86_64 qemu-storage-daemon fio python3; do
  command -v "$t" >/dev/null || { echo "bench-blk: $t is missing: run scripts/install-deps.sh" >&2; exit 1; }
done
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
cargo build --release -p bulkhead-backends -p bulkhead-core-vmm --bins >&2
cargo build --release -p bulkhead-tests >&2
work=$(mktemp -d /var/tmp/bulkhead-bench-blk.XXXXXX)
pool=/proc/sys/vm/nr_hugepages
pool_was=
cleanup() {
  rm -rf "$work"
  if [ -n "$pool_was" ]; then echo "$pool_was" > "$pool"; fi
}
trap cleanup EXIT
# 2 MiB pages free in the host's pool and not yet promised to a mapping.
pool_free() {
  local p=/sys/kernel/mm/hugepages/hugepages-2048kB
  echo $(( $(cat "$p/free_hugepages") - $(cat "$p/resv_hugepages") ))
}
if [ "$huge" = 1 ]; then
  # 512 MiB of guest RAM, plus fio's buffers (at most 4 MiB in flight) and slack.
  need=264
  free=$(pool_free)
  if [ "$free" -lt "$need" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "bench-blk: HUGEPAGES=1 needs $need free 2 MiB pages ($free free): reserve them (sysctl vm.nr_hugepages) or run as root" >&2; exit 1; }
    pool_was=$(cat "$pool")
    echo $(( pool_was + need - free )) > "$pool"
    free=$(pool_free)
    [ "$free" -ge "$need" ] || { echo "bench-blk: the kernel gave only $free of $need huge pages (memory fragmented?)" >&2; exit 1; }
  fi
fi
khz=$(awk -F: '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo)
python3 - "$PWD" "$work" "$mib" "$reps" "$cache" "$engine" "$khz" "$only" "$poll" "$pin" "$huge" <<'PY'
import json, os, re, signal, socket, statistics, subprocess, sys, time

root, work, mib, reps, cache, engine, khz, only, poll, pin, huge = sys.argv[1:12]
huge = huge == "1"
hugetlb = ",hugetlb=on,hugetlbsize=2M" if huge else ""
# (a) and (b) are a VMM process plus a backend process: with PIN=1 each gets a CPU of its own.
vmm_cpu, backend_cpu = (["taskset", "-c", "0"], ["taskset", "-c", "1"]) if pin == "1" else ([], [])
mib, reps = int(mib), int(reps)
bin_ = f"{root}/target/release"
guest = f"{root}/target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest"
img = f"{work}/disk.img"
# Written through once (not sparse), so no system pays for allocating blocks in rep 1.
subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={mib}", "conv=fsync",
                "status=none"], check=True)
sectors = mib * 2048
TICK = os.sysconf("SC_CLK_TCK")
direct = cache == "none"

# name, guest tokens, fio options, bytes moved
PATTERNS = [
    ("seq write 64K", f"blk-nogen blk-req=64 blk-write=5:0:{sectors}", "--rw=write --bs=64k --iodepth=4 --end_fsync=1", mib << 20),
    ("seq read 64K", f"blk-nohash blk-req=64 blk-read=0:{sectors}", "--rw=read --bs=64k --iodepth=4", mib << 20),
    ("seq write 1M", f"blk-nogen blk-req=1024 blk-write=6:0:{sectors}", "--rw=write --bs=1m --iodepth=4 --end_fsync=1", mib << 20),
    ("seq read 1M", f"blk-nohash blk-req=1024 blk-read=0:{sectors}", "--rw=read --bs=1m --iodepth=4", mib << 20),
    ("rand read 4K QD1", "blk-rand=7:10000:1:4k", "--rw=randread --bs=4k --iodepth=1 --number_ios=10000", 10000 * 4096),
    ("rand read 4K QD32", "blk-rand=8:100000:32:4k", "--rw=randread --bs=4k --iodepth=32 --number_ios=100000", 100000 * 4096),
    ("rand write 4K QD1", "blk-rand-write=9:10000:1:4k", "--rw=randwrite --bs=4k --iodepth=1 --number_ios=10000", 10000 * 4096),
    ("rand write 4K QD32", "blk-rand-write=10:100000:32:4k", "--rw=randwrite --bs=4k --iodepth=32 --number_ios=100000", 100000 * 4096),
]
PATTERNS = [p for p in PATTERNS if re.search(only, p[0])]
if not PATTERNS:
    sys.exit(f"bench-blk: no pattern matches ONLY={only!r}")
SYSTEMS = ["bulkhead", "qemu+qsd", "qemu virtio-blk", "host fio"]

def cpu_of(pid, skip=None):
    """CPU seconds of pid's threads (skipping those whose name matches skip)."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/stat") as f:
                    s = f.read()
            except OSError:
                continue
            comm = s[s.index("(") + 1:s.rindex(")")]
            if skip and re.match(skip, comm):
                continue
            fields = s[s.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    except OSError:
        pass
    return total / TICK

def wait_socket(path, proc, what):
    for _ in range(200):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit(f"bench-blk: {what} exited with status {proc.returncode} (see {work}/*.log)")
        time.sleep(0.05)
    sys.exit(f"bench-blk: {what} never listened on {path}")

def guest_run(system, tokens):
    """Boots the guest under `system` with `tokens`; returns (perf dict, cpu seconds)."""
    cmdline = f"tsc-khz={khz} blk {tokens} exit=0"
    backend = None
    qemu = ["qemu-system-x86_64", "-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", guest, "-append", cmdline]
    if system == "bulkhead":
        sock = f"{work}/blk.sock"
        backend = subprocess.Popen(backend_cpu + [f"{bin_}/bulkhead-blk", "--socket", sock, "--image", img,
                                    "--cache", cache, "--io-engine", engine] + (["--poll-us", poll] if poll else []),
                                   stdout=subprocess.DEVNULL, stderr=open(f"{work}/blk.log", "a"))
        wait_socket(sock, backend, "bulkhead-blk")
        cmd = vmm_cpu + [f"{bin_}/bulkhead-runner", "--kernel", guest, "--memory", "512M",
               "--disk-socket", sock, "--cmdline", cmdline] + (["--hugepages"] if huge else [])
        vcpu = r"vcpu\d+"
    elif system == "qemu+qsd":
        sock = f"{work}/qsd.sock"
        backend = subprocess.Popen(backend_cpu + ["qemu-storage-daemon", "--blockdev",
            f"driver=file,node-name=file,filename={img},cache.direct={'on' if direct else 'off'},aio=io_uring",
            "--blockdev", "driver=raw,node-name=disk,file=file", "--export",
            f"type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={sock},writable=on"],
            stdout=subprocess.DEVNULL, stderr=open(f"{work}/qsd.log", "a"))
        wait_socket(sock, backend, "qemu-storage-daemon")
        cmd = vmm_cpu + qemu + ["-object", f"memory-backend-memfd,id=mem,size=512M,share=on{hugetlb}", "-numa", "node,memdev=mem",
                      "-chardev", f"socket,id=c0,path={sock}", "-device", "vhost-user-blk-pci,chardev=c0"]
        vcpu = r"CPU \d+/KVM"
    else:
        cmd = qemu + ["-drive", f"file={img},if=none,format=raw,id=d0,cache={cache},aio=io_uring",
                      "-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]
        if huge:
            cmd += ["-object", f"memory-backend-memfd,id=mem,size=512M{hugetlb}", "-numa", "node,memdev=mem"]
        vcpu = r"CPU \d+/KVM"
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    snap = lambda: cpu_of(p.pid, vcpu) + (cpu_of(backend.pid) if backend else 0)
    c0 = c1 = None
    perf = None
    for raw in p.stdout:
        line = raw.decode(errors="replace").strip()
        if line.startswith("blk0:") and c0 is None:
            c0 = snap()
        elif line.startswith("blk-perf:"):
            c1 = snap()
            perf = dict(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv)
        elif ("status" in line and line.startswith(("blk-write:", "blk-read:", "blk-rand:"))
              and not line.endswith("status 0")):
            perf = None
            print(f"bench-blk: {system}: {line}", file=sys.stderr)
            break
    p.wait()
    if backend:
        backend.send_signal(signal.SIGTERM)
        try:
            backend.wait(5)
        except subprocess.TimeoutExpired:
            backend.kill()
            backend.wait()
        for s in ("blk.sock", "qsd.sock"):
            try:
                os.unlink(f"{work}/{s}")
            except FileNotFoundError:
                pass
    if perf is None or c0 is None:
        return None
    return perf, c1 - c0

def fio_run(opts, nbytes):
    args = ["fio", "--name=bench", f"--filename={img}", "--ioengine=io_uring",
            f"--direct={1 if direct else 0}", f"--size={mib}m", "--output-format=json",
            "--randrepeat=0"] + (["--iomem=shmhuge"] if huge else []) + opts.split()
    if not direct:
        # fio drops the file's page cache before it starts by default: the system run next
        # would then read from the disk what the others read from the cache.
        args.append("--invalidate=0")
    if "number_ios" not in opts:
        args.append(f"--io_size={nbytes}")
    t0 = os.times()
    out = subprocess.run(args, capture_output=True, text=True)
    t1 = os.times()
    if out.returncode != 0:
        print(f"bench-blk: fio: {out.stderr.strip()}", file=sys.stderr)
        return None
    j = json.loads(out.stdout)["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    secs = side["runtime"] / 1000 or 1e-9
    pct = side.get("clat_ns", {}).get("percentile", {})
    perf = {"iops": side["iops"], "mibps": side["io_bytes"] / secs / (1 << 20),
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000}
    cpu = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
    return perf, cpu

results = {(p[0], s): [] for p in PATTERNS for s in SYSTEMS}
for rep in range(reps):
    for name, tokens, fio_opts, nbytes in PATTERNS:
        # Each repetition starts with another system: the first after a pattern change may
        # meet the disk still busy with what came before (a write's flush, say). With a
        # fixed order, (a) read 1M after the 1M writes and trailed qsd in two huge-page
        # runs, though it led in alternating pairs run alone.
        for system in SYSTEMS[rep % len(SYSTEMS):] + SYSTEMS[:rep % len(SYSTEMS)]:
            r = fio_run(fio_opts, nbytes) if system == "host fio" else guest_run(system, tokens)
            if r is None:
                print(f"bench-blk: rep {rep + 1} {name} {system}: failed", file=sys.stderr)
                continue
            perf, cpu = r
            results[(name, system)].append({
                "iops": float(perf["iops"]), "mibps": float(perf["mibps"]),
                "p50": float(perf["p50_us"]), "p99": float(perf["p99_us"]),
                "cpu_gib": cpu / (nbytes / (1 << 30))})
            print(f"  rep {rep + 1} {name:<20} {system:<16} {float(perf['mibps']):9.1f} MiB/s "
                  f"{float(perf['iops']):9.0f} IOPS  p50 {float(perf['p50_us']):7.1f} us "
                  f"p99 {float(perf['p99_us']):8.1f} us  cpu {cpu:6.2f} s", file=sys.stderr)

def med(name, system, key):
    v = [r[key] for r in results[(name, system)]]
    return statistics.median(v) if v else None

def fmt(v, d=1):
    return "-" if v is None else f"{v:.{d}f}"

def ratio(a, b):
    return "-" if a is None or b in (None, 0) else f"{a / b:.2f}x"

print(f"\nbench-blk: {mib} MiB image, cache={cache}, bulkhead-blk --io-engine {engine} --poll-us {poll or 'default'}, "
      f"{'(a),(b) pinned: VMM CPU 0, backend CPU 1, ' if pin == '1' else ''}"
      f"median of {reps} interleaved runs; tsc-khz={khz}")
print("guest RAM: " + ("2 MiB hugetlb pages for (a)-(c), fio --iomem=shmhuge" if huge else
      "4 KiB shared pages for (a) and (b); (c) QEMU's anonymous RAM (THP if the host allows)"))
print("\nthroughput: MiB/s (sequential) or IOPS (random); (a) bulkhead, (b) QEMU+qsd, "
      "(c) QEMU virtio-blk, (d) host fio")
print(f"{'pattern':<20} {'(a)':>10} {'(b)':>10} {'(c)':>10} {'(d)':>10} {'a/b':>7} {'a/c':>7} {'a/d':>7}")
for name, *_ in PATTERNS:
    key = "mibps" if name.startswith("seq") else "iops"
    v = [med(name, s, key) for s in SYSTEMS]
    d = 1 if key == "mibps" else 0
    print(f"{name:<20} {fmt(v[0], d):>10} {fmt(v[1], d):>10} {fmt(v[2], d):>10} {fmt(v[3], d):>10} "
          f"{ratio(v[0], v[1]):>7} {ratio(v[0], v[2]):>7} {ratio(v[0], v[3]):>7}")
print("\nlatency, random 4K: p50 / p99 in us (guest-measured; fio: completion latency)")
print(f"{'pattern':<20} {'(a)':>16} {'(b)':>16} {'(c)':>16} {'(d)':>16}")
for name, *_ in PATTERNS:
    if name.startswith("rand"):
        cells = [f"{fmt(med(name, s, 'p50'))} / {fmt(med(name, s, 'p99'))}" for s in SYSTEMS]
        print(f"{name:<20} " + " ".join(f"{c:>16}" for c in cells))
print("\nI/O CPU seconds per GiB moved: VMM without its vCPU threads + backend; fio: fio's own")
print(f"{'pattern':<20} {'(a)':>8} {'(b)':>8} {'(c)':>8} {'(d)':>8}")
for name, *_ in PATTERNS:
    v = [med(name, s, "cpu_gib") for s in SYSTEMS]
    print(f"{name:<20} " + " ".join(f"{fmt(x, 2):>8}" for x in v))
PY
