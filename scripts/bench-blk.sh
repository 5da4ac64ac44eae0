#!/usr/bin/env bash
# Sequential disk throughput seen by the same test guest, one run each, side by side:
#  (a) bulkhead-runner + bulkhead-blk        (b) QEMU + qemu-storage-daemon vhost-user-blk
#  (c) QEMU's built-in virtio-blk-pci        (d) the host writing/reading the image file
# The guest writes then reads N MiB (default 256) in 64 KiB requests; the time is taken from
# the guest's console lines (start and end of each phase), so VMM start-up is not counted.
# Random 4 KiB IOPS are not measured yet: the test guest has no random-read mode.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-256}
sectors=$((mib * 2048))
cargo build --release --workspace --bins >&2
cargo build --release -p bulkhead-tests >&2
bin=$PWD/target/release
guest=$PWD/target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest
work=$(mktemp -d /tmp/bulkhead-bench-blk.XXXXXX)
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$work"' EXIT
cmdline="blk blk-write=5:0:$sectors blk-read=0:$sectors exit=0"
qemu_common=(-M pc -enable-kvm -cpu host,-arch-capabilities -m 512 -smp 1 -nodefaults -no-user-config
  -nographic -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel "$guest" -append "$cmdline")

# Runs a command, timestamps its console lines, prints "<write MiB/s> <read MiB/s>".
phases() {
  python3 - "$mib" "$@" <<'PY'
import subprocess, sys, time
mib = float(sys.argv[1]); cmd = sys.argv[2:]
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
t = {}
for raw in p.stdout:
    line = raw.decode(errors="replace").strip()
    now = time.monotonic()
    if line.startswith("blk0:") and "init" not in t: t["init"] = now
    elif line.startswith("blk-write:"): t["wdone"] = now; ok_w = "status 0" in line
    elif line.startswith("blk-checksum:") and "wdone" in t and "rstart" not in t: t["rstart"] = now
    elif line.startswith("blk-read:"): t["rdone"] = now; ok_r = "status 0" in line
p.wait()
if not all(k in t for k in ("init", "wdone", "rstart", "rdone")) or not (ok_w and ok_r):
    print("failed failed"); sys.exit(0)
print(f"{mib / (t['wdone'] - t['init']):.1f} {mib / (t['rdone'] - t['rstart']):.1f}")
PY
}

img=$work/disk.img
truncate -s $((mib + 16))M "$img"

"$bin/bulkhead-blk" --socket "$work/blk.sock" --image "$img" 2>"$work/blk.log" &
for _ in $(seq 100); do [ -S "$work/blk.sock" ] && break; sleep 0.05; done
a=$(phases "$bin/bulkhead-runner" --kernel "$guest" --memory 512M --disk-socket "$work/blk.sock" --cmdline "$cmdline")
pkill -f "bulkhead-blk --socket $work/blk.sock" || true

qemu-storage-daemon --blockdev "driver=file,node-name=file,filename=$img" --blockdev driver=raw,node-name=disk,file=file \
  --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$work/qsd.sock,writable=on" 2>"$work/qsd.log" &
for _ in $(seq 100); do [ -S "$work/qsd.sock" ] && break; sleep 0.05; done
b=$(phases qemu-system-x86_64 "${qemu_common[@]}" -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -chardev "socket,id=c0,path=$work/qsd.sock" -device vhost-user-blk-pci,chardev=c0)
pkill -f "qemu-storage-daemon --blockdev driver=file,node-name=file,filename=$img" || true

c=$(phases qemu-system-x86_64 "${qemu_common[@]}" -drive "file=$img,if=none,format=raw,id=d0" -device virtio-blk-pci,drive=d0,disable-legacy=on)

t0=$(date +%s.%N); dd if=/dev/zero of="$img" bs=64K count=$((mib * 16)) conv=notrunc,fdatasync status=none; t1=$(date +%s.%N)
dd if="$img" of=/dev/null bs=64K count=$((mib * 16)) status=none; t2=$(date +%s.%N)
d="$(echo "$mib / ($t1 - $t0)" | bc -l | xargs printf '%.1f') $(echo "$mib / ($t2 - $t1)" | bc -l | xargs printf '%.1f')"

row() { printf '%-38s %10s %10s\n' "$1" "$2" "$3"; }
ratio() { if [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]]; then echo "$1 / $2" | bc -l | xargs printf '%.2fx'; else echo "-"; fi; }
row "sequential, $mib MiB, 64 KiB requests" "write MiB/s" "read MiB/s"
row "(a) bulkhead-runner + bulkhead-blk" $a
row "(b) QEMU + qemu-storage-daemon" $b
row "(c) QEMU virtio-blk-pci (built-in)" $c
row "(d) host dd on the image" $d
set -- $a; aw=$1 ar=$2; set -- $b; bw=$1 br=$2; set -- $c; cw=$1 cr=$2; set -- $d; dw=$1 dr=$2
row "(a)/(b)" "$(ratio "$aw" "$bw")" "$(ratio "$ar" "$br")"
row "(a)/(c)" "$(ratio "$aw" "$cw")" "$(ratio "$ar" "$cr")"
row "(a)/(d)" "$(ratio "$aw" "$dw")" "$(ratio "$ar" "$dr")"
