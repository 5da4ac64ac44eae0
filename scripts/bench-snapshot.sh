#!/usr/bin/env bash
# `bulkhead save` and `bulkhead restore` of the test guest (2 vCPUs, 256 MiB, one disk)
# after it touched 20 MiB of its RAM (`fill=20`): wall time of each verb, the snapshot's
# size and the guest RAM in it; N rounds (default 5), medians. BUILD=debug uses the debug
# binaries (no release build).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
build=${BUILD:-release}
if [ "$build" = release ]; then
  cargo build --release --workspace --bins >&2
  cargo build --release -p bulkhead-tests >&2
else
  cargo build --workspace --bins >&2
  cargo build -p bulkhead-tests >&2
fi
bin=$PWD/target/$build
guest=$PWD/target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest
work=$(mktemp -d /tmp/bulkhead-bench-snap.XXXXXX)
sock=$work/bh.sock
"$bin/bulkheadd" --socket "$sock" --state-dir "$work/state" --policy "$work/none.toml" >"$work/d.log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; rm -rf "$work"' EXIT
bh() { "$bin/bulkhead" --socket "$sock" "$@"; }
for _ in $(seq 100); do bh list >/dev/null 2>&1 && break; sleep 0.05; done
truncate -s 64M "$work/disk.img"
printf 'name = "snapbench"\nvcpus = 2\nmemory = "256M"\nkernel = "%s"\ncmdline = "fill=20 blk echo"\n[[disks]]\npath = "%s"\n' \
  "$guest" "$work/disk.img" >"$work/vm.toml"
bh create "$work/vm.toml" >/dev/null
# The guest is ready once it echoes.
for _ in $(seq 200); do
  { timeout 1 "$bin/bulkhead" --socket "$sock" console snapbench </dev/null 2>/dev/null || true; } |
    grep -q "echo: ready" && break
done
now() { date +%s.%N; }
: >"$work/save.t"; : >"$work/restore.t"; : >"$work/size"
for i in $(seq "$runs"); do
  t0=$(now); bh save snapbench "$work/vm.snap" >"$work/save.out"; t1=$(now)
  echo "$t1 - $t0" | bc -l >>"$work/save.t"
  stat -c %s "$work/vm.snap" >>"$work/size"
  t0=$(now); bh restore "$work/vm.snap" >"$work/restore.out"; t1=$(now)
  echo "$t1 - $t0" | bc -l >>"$work/restore.t"
done
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
bh destroy snapbench >/dev/null 2>&1 || true
printf '%-32s %10.1f ms\n' "save (median)" "$(echo "$(median <"$work/save.t") * 1000" | bc -l)"
printf '%-32s %10.1f ms\n' "restore (median)" "$(echo "$(median <"$work/restore.t") * 1000" | bc -l)"
printf '%-32s %10.1f MiB\n' "snapshot size (median)" "$(echo "$(median <"$work/size") / 1048576" | bc -l)"
echo "last save:    $(cat "$work/save.out")"
echo "last restore: $(cat "$work/restore.out")"
echo "($runs rounds of save+restore; test guest fill=20, 2 vCPUs, 256 MiB, one 64 MiB disk; $build build)"
