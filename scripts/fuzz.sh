#!/usr/bin/env bash
# Runs the fuzz targets (crate fuzz/, binary bulkhead-fuzz) in release mode, one after the
# other, each for N generated inputs or S seconds after replaying its corpus:
#
#   bash scripts/fuzz.sh [--cases N | --seconds S] [--seed X] [TARGET...]   # default: 10^6 each, all
#   bash scripts/fuzz.sh --list
#   bash scripts/fuzz.sh --replay TARGET FILE...
#
# Crashing inputs go to target/fuzz-crashes/ (one per distinct panic location); copy one
# into fuzz/corpus/TARGET/ once fixed, so the short pass in `cargo test` replays it for
# good. A target that dies of a signal (a stray access into the guard pages around guest
# memory) is reported too. Stable toolchain only: no nightly, no libFuzzer.
set -uo pipefail
cd "$(dirname "$0")/.."

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
cargo build --release -q -p bulkhead-fuzz || exit 2
bin=target/release/bulkhead-fuzz

case "${1:-}" in
  --list|--replay|--write-seeds|-h|--help) exec "$bin" "$@" ;;
esac

budget=(--cases 1000000)
seed=$(( $(date +%s%N) % 1000000000 ))
args=()
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cases|--seconds) budget=("$1" "$2"); shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --corpus|--crashes) args+=("$1" "$2"); shift 2 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <("$bin" --list | awk '{print $1}')
fi

echo "fuzz.sh: ${budget[*]} per target, seed $seed"
status=0
start=$(date +%s)
for t in "${targets[@]}"; do
  # The backends' rate-limited logs of malformed chains are expected; keep only ours.
  "$bin" "${budget[@]}" --seed "$seed" "${args[@]}" "$t" 2> >(grep -v -E '^bulkhead-(blk|net): ' >&2) | grep -v '^bulkhead-fuzz: seed'
  rc=${PIPESTATUS[0]}
  if [ "$rc" -gt 128 ]; then
    echo "fuzz.sh: $t died of signal $((rc - 128)); rerun with the same --seed to find the input" >&2
    status=1
  elif [ "$rc" -ne 0 ]; then
    status=1
  fi
done
echo "fuzz.sh: ${#targets[@]} target(s) in $(( $(date +%s) - start )) s, $([ $status -eq 0 ] && echo 'no crashes' || echo 'CRASHES (see above)')"
exit $status
