#!/usr/bin/env bash
# Launch-to-exit wall time of the test guest: bulkhead-runner vs QEMU -M microvm, interleaved,
# N runs each (default 10), medians and the ratio, plus peak RSS of each.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
cargo build --release -p bulkhead-core-vmm -p bulkhead-tests >&2
guest=target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 missing: run scripts/install-deps.sh" >&2; exit 1; }

ours=(target/release/bulkhead-runner --kernel "$guest" --memory 256M --vcpus 1 --cmdline "exit=0")
qemu=(qemu-system-x86_64 -M microvm -enable-kvm -cpu host,-arch-capabilities -m 256 -smp 1
      -nodefaults -no-user-config -nographic -serial stdio
      -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel "$guest" -append "exit=0")

# Prints "<seconds> <peak RSS KiB>" for one run of the command given.
rssfile=$(mktemp)
trap 'rm -f "$rssfile"' EXIT
measure() {
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$rssfile" "$@" >/dev/null 2>&1 || true
  t1=$(date +%s.%N)
  echo "$(echo "$t1 - $t0" | bc -l) $(tail -n1 "$rssfile")"
}
if ! [ -x /usr/bin/time ]; then
  echo "bench-boot: /usr/bin/time (package time) is missing: run scripts/install-deps.sh" >&2
  exit 1
fi

: >/tmp/bench-boot.ours; : >/tmp/bench-boot.qemu
for i in $(seq "$runs"); do
  measure "${ours[@]}" >>/tmp/bench-boot.ours
  measure "${qemu[@]}" >>/tmp/bench-boot.qemu
  echo "run $i/$runs done" >&2
done

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
ot=$(cut -d' ' -f1 /tmp/bench-boot.ours | median); qt=$(cut -d' ' -f1 /tmp/bench-boot.qemu | median)
orss=$(cut -d' ' -f2 /tmp/bench-boot.ours | sort -g | tail -n1); qrss=$(cut -d' ' -f2 /tmp/bench-boot.qemu | sort -g | tail -n1)
printf '%-22s %12s %12s %10s\n' "" "bulkhead" "qemu-microvm" "ratio"
printf '%-22s %11.4fs %11.4fs %10.4f\n' "launch→exit (median)" "$ot" "$qt" "$(echo "$ot / $qt" | bc -l)"
printf '%-22s %9s KiB %9s KiB %10.4f\n' "peak RSS (max)" "$orss" "$qrss" "$(echo "$orss / $qrss" | bc -l)"
echo "($runs runs each, interleaved; test guest, 1 vCPU, 256 MiB)"
