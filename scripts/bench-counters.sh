#!/bin/bash
# Counter overhead: bench-blk's "rand read 4K QD32" (guest-timed, tsc-khz from the host)
# against a standalone release bulkhead-blk with and without a counters page (--stats-fd),
# runs interleaved; prints the median IOPS of each and the difference.
# Usage: bash scripts/bench-counters.sh [REPS] [IMAGE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-5}
mib=${2:-256}
cargo build --release -p bulkhead-backends -p bulkhead-core-vmm --bins >&2
cargo build -p bulkhead-tests >&2    # builds the test guest (target/guest/.../release)
work=$(mktemp -d /var/tmp/bulkhead-bench-counters.XXXXXX)
trap 'rm -rf "$work"' EXIT
khz=$(awk -F: '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo)
python3 - "$PWD" "$work" "$mib" "$reps" "$khz" <<'PY'
import fcntl, os, re, statistics, subprocess, sys, time

root, work, mib, reps, khz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
bin_ = f"{root}/target/release"
guest = f"{root}/target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest"
img = f"{work}/disk.img"
subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={mib}", "conv=fsync",
                "status=none"], check=True)
F_ADD_SEALS, SEALS = 1033, 1 | 2 | 4  # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW

def run(with_stats):
    sock = f"{work}/blk.sock"
    args = [f"{bin_}/bulkhead-blk", "--socket", sock, "--image", img]
    fds = ()
    if with_stats:
        fd = os.memfd_create("bulkhead-stats-bench", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 3 * 4096)
        fcntl.fcntl(fd, F_ADD_SEALS, SEALS)
        args += ["--stats-fd", str(fd)]
        fds = (fd,)
    blk = subprocess.Popen(args, pass_fds=fds, stdout=subprocess.DEVNULL,
                           stderr=open(f"{work}/blk.log", "a"))
    for fd in fds:
        os.close(fd)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    cmdline = f"tsc-khz={khz} blk blk-rand=8:100000:32:4k exit=0"
    out = subprocess.run([f"{bin_}/bulkhead-runner", "--kernel", guest, "--memory", "512M",
                          "--disk-socket", sock, "--cmdline", cmdline],
                         capture_output=True, text=True, timeout=600).stdout
    blk.terminate()
    blk.wait()
    os.unlink(sock)
    m = re.search(r"blk-perf: .* iops=(\d+)", out)
    if not m:
        sys.exit(f"no blk-perf line:\n{out}")
    return int(m.group(1))

res = {False: [], True: []}
for i in range(reps):
    for w in (False, True) if i % 2 == 0 else (True, False):
        res[w].append(run(w))
        print(f"rep {i + 1} {'with' if w else 'without'} counters: {res[w][-1]} IOPS", flush=True)
a, b = statistics.median(res[False]), statistics.median(res[True])
# Each rep's two runs are back to back: their ratio cancels slow drifts of the host's load.
pairs = statistics.median(w / wo for w, wo in zip(res[True], res[False]))
print(f"rand read 4K QD32, median of {reps}: without counters {a:.0f} IOPS, with {b:.0f} IOPS "
      f"({(b - a) / a * 100:+.1f}%); median of the per-rep ratios {(pairs - 1) * 100:+.1f}%")
PY
