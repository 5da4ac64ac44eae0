#!/usr/bin/env bash
# create→guest-exit wall time of the test guest through bulkheadd (`bulkhead create -c`)
# vs the standalone runner, interleaved, N runs each (default 10), medians and the ratio;
# then how many VMs per second bulkheadd creates when asked in parallel (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
par=${2:-8}
cargo build --release --workspace --bins >&2
cargo build --release -p bulkhead-tests >&2
bin=$PWD/target/release
guest=$PWD/target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest
work=$(mktemp -d /tmp/bulkhead-bench.XXXXXX)
sock=$work/bh.sock
"$bin/bulkheadd" --socket "$sock" --state-dir "$work/state" --policy "$work/none.toml" >"$work/d.log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; rm -rf "$work"' EXIT
bh() { "$bin/bulkhead" --socket "$sock" "$@"; }
for _ in $(seq 100); do bh list >/dev/null 2>&1 && break; sleep 0.05; done

vmcfg() { printf 'name = "%s"\nvcpus = 1\nmemory = "256M"\nkernel = "%s"\ncmdline = "%s"\n' "$1" "$guest" "$2" >"$work/$1.toml"; }
now() { date +%s.%N; }
: >"$work/d.t"; : >"$work/s.t"
for i in $(seq "$runs"); do
  vmcfg "b$i" "exit=0"
  t0=$(now); bh create -c "$work/b$i.toml" </dev/null >/dev/null 2>&1 || true; t1=$(now)
  echo "$t1 - $t0" | bc -l >>"$work/d.t"
  bh destroy "b$i" >/dev/null 2>&1 || true
  t0=$(now); "$bin/bulkhead-runner" --kernel "$guest" --memory 256M --cmdline "exit=0" </dev/null >/dev/null 2>&1 || true; t1=$(now)
  echo "$t1 - $t0" | bc -l >>"$work/s.t"
done
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
d=$(median <"$work/d.t"); s=$(median <"$work/s.t")

for i in $(seq "$par"); do vmcfg "p$i" "ticks=1000"; done
t0=$(now)
pids=()
for i in $(seq "$par"); do bh create "$work/p$i.toml" >/dev/null & pids+=($!); done
wait "${pids[@]}"   # not a bare `wait`: bulkheadd is a background job too
t1=$(now)
rate=$(echo "$par / ($t1 - $t0)" | bc -l)
running=$(bh list | grep -c ' running ' || true)
for i in $(seq "$par"); do bh destroy "p$i" >/dev/null 2>&1 || true; done

printf '%-28s %12s %12s %8s\n' "" "bulkheadd" "standalone" "ratio"
printf '%-28s %11.4fs %11.4fs %8.3f\n' "create→guest exit (median)" "$d" "$s" "$(echo "$d / $s" | bc -l)"
printf '%-28s %8.1f VMs/s (%d created in parallel, %d running)\n' "parallel create" "$rate" "$par" "$running"
echo "($runs runs each, interleaved; test guest, 1 vCPU, 256 MiB)"
