#!/usr/bin/env bash
# Boot time of the minimal Linux guest to its /init ("bulkhead-init: started"), Bulkhead's
# runner vs QEMU (-M pc and -M microvm) on the same vmlinux, initramfs and command line,
# one run each by default (N runs with $1), medians, side by side with ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1}
cargo build --release -p bulkhead-core-vmm >&2
kernel=$(bash scripts/guest-kernel.sh)
initrd=$(bash scripts/guest-image.sh | tail -n1)/initramfs-min.cpio.gz
# The minimal CPU template's Linux words (core-vmm/src/cpu_template.rs), given to QEMU too.
cpu_words="noxsave nopcid noinvpcid nofsgsbase clearcpuid=308,288,514,515,151,158,306,150,156,293,291,296,311,312,534,59"
cmdline="console=ttyS0 reboot=k panic=-1"
qemu=(qemu-system-x86_64 -enable-kvm -cpu host,-arch-capabilities -m 512 -smp 1 -nodefaults -no-user-config
      -nographic -serial stdio -no-reboot -kernel "$kernel" -initrd "$initrd" -append "$cmdline $cpu_words")

# Seconds from launch to the marker line.
to_init() {
  python3 - "$@" <<'PY'
import subprocess, sys, time
t0 = time.monotonic()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
for raw in p.stdout:
    if b"bulkhead-init: started" in raw:
        print(f"{time.monotonic() - t0:.2f}")
        break
else:
    print("failed")
p.kill(); p.wait()
PY
}
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
: >/tmp/bl.b; : >/tmp/bl.p; : >/tmp/bl.m
for _ in $(seq "$runs"); do
  to_init target/release/bulkhead-runner --kernel "$kernel" --initrd "$initrd" --memory 512M --cmdline "$cmdline" >>/tmp/bl.b
  to_init "${qemu[@]}" -M pc >>/tmp/bl.p
  to_init "${qemu[@]}" -M microvm >>/tmp/bl.m
done
b=$(median </tmp/bl.b); p=$(median </tmp/bl.p); m=$(median </tmp/bl.m)
printf '%-34s %10s\n' "boot to /init (median of $runs)" "seconds"
printf '%-34s %10s\n' "bulkhead-runner (PVH, no firmware)" "$b"
printf '%-34s %10s   bulkhead/qemu %s\n' "QEMU -M pc" "$p" "$(echo "$b / $p" | bc -l | xargs printf '%.2f')"
printf '%-34s %10s   bulkhead/qemu %s\n' "QEMU -M microvm" "$m" "$(echo "$b / $m" | bc -l | xargs printf '%.2f')"
