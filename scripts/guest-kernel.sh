#!/usr/bin/env bash
# Builds the Bulkhead Linux guest kernel: a minimal 6.1 PVH `vmlinux` from Debian's
# linux-source-6.1, `make tinyconfig` + scripts/guest/config-fragment, with the project's
# patches in scripts/guest/patches/ for the PVM build hosts' quirks (guest ring-0 code is
# emulated there; see /work/shared/linux-guest/RECIPE.md and scripts/guest/README.md).
#
# Output: ${BULKHEAD_CACHE:-/var/cache/bulkhead}/guest-kernel/<hash>/vmlinux (+ config,
# build.log), hash = sha256 of the linux-source-6.1 package version, the config fragment,
# the patches and this script. A cached kernel is reused ("cache hit"). The vmlinux path is
# the last (only) line on stdout, everything else goes to stderr:
#   k=$(scripts/guest-kernel.sh)
# Environment: BULKHEAD_CACHE (cache root), BULKHEAD_GUEST_KEEP_BUILD=1 (keep the build
# tree <cache>/guest-kernel/build-<hash> after a successful build; it is removed otherwise),
# BULKHEAD_JOBS (make -j, default nproc).
# Installs nothing: a missing package is named, with scripts/install-deps.sh as the fix.
# Concurrent callers on a cold cache wait for one build (flock) and all print the same path.
set -euo pipefail

self=$(readlink -f "$0")
guest=$(cd "$(dirname "$self")" && pwd)/guest
cache=${BULKHEAD_CACHE:-/var/cache/bulkhead}/guest-kernel
jobs=${BULKHEAD_JOBS:-$(nproc)}
t0=$(date +%s)

log() { echo "guest-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }

# ---- build dependencies (installed by scripts/install-deps.sh, never here) ----
deps=(linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils)
missing=()
for p in "${deps[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] ||
  die "missing packages: ${missing[*]}; install them with: sudo bash scripts/install-deps.sh"
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || die "$tarball not found (package linux-source-6.1)"
version=$(dpkg-query -W -f='${Version}' linux-source-6.1)

# ---- cache key ----
shopt -s nullglob
patches=("$guest"/patches/*.patch)
shopt -u nullglob
[ ${#patches[@]} -gt 0 ] || die "no patches in $guest/patches"
hash=$(
  {
    echo "linux-source-6.1 $version"
    echo "== config-fragment"; cat "$guest/config-fragment"
    for p in "${patches[@]}"; do echo "== patch $(basename "$p")"; cat "$p"; done
    echo "== script"; cat "$self"
  } | sha256sum | cut -d' ' -f1
)
out=$cache/$hash
if [ -s "$out/vmlinux" ]; then
  log "cache hit: $out/vmlinux (linux-source-6.1 $version)"
  echo "$out/vmlinux"
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
  log "waiting for another build (lock $cache/.lock)"
  flock 9
fi
if [ -s "$out/vmlinux" ]; then   # built by whoever held the lock
  log "cache hit: $out/vmlinux (built concurrently)"
  echo "$out/vmlinux"
  exit 0
fi

log "cache miss: building linux-source-6.1 $version -> $out"
build=$cache/build-$hash
rm -rf "$build" "$out.tmp"
mkdir -p "$build" "$out.tmp"

# ---- source + patches ----
log "[$(elapsed)] unpacking $tarball"
tar -xJf "$tarball" -C "$build" --strip-components=1
for p in "${patches[@]}"; do
  log "[$(elapsed)] applying $(basename "$p")"
  patch -d "$build" -p1 --forward --batch --silent <"$p" >&2 || die "patch $(basename "$p") does not apply"
done

# ---- config ----
export KBUILD_BUILD_USER=bulkhead KBUILD_BUILD_HOST=bulkhead
# Reproducible: the build date shown by `uname -v` is the source tarball's mtime.
export KBUILD_BUILD_TIMESTAMP="$(LC_ALL=C date -u -r "$tarball" '+%a %b %e %T UTC %Y')"
log "[$(elapsed)] config: tinyconfig + $(basename "$guest")/config-fragment"
make -C "$build" -s tinyconfig >&2
(cd "$build" && scripts/kconfig/merge_config.sh -m .config "$guest/config-fragment") >"$out.tmp/merge.log" 2>&1 ||
  { cat "$out.tmp/merge.log" >&2; die "merge_config.sh failed"; }
make -C "$build" -s olddefconfig 2>&1 | grep -v 'changes choice state' >&2 || true
# Every line of the fragment must have survived olddefconfig (an unmet dependency silently
# drops a symbol): CONFIG_X=v must be in .config verbatim, "# CONFIG_X is not set" must not
# be set to anything.
bad=0
while IFS= read -r line; do
  case $line in
    CONFIG_*=*)
      grep -qxF "$line" "$build/.config" || {
        log "config: wanted $line, got: $(grep -E "^${line%%=*}=|^# ${line%%=*} is not set" "$build/.config" || echo absent)"
        bad=1
      } ;;
    "# CONFIG_"*" is not set")
      sym=${line#\# }; sym=${sym%% *}
      ! grep -q "^$sym=" "$build/.config" || { log "config: wanted $sym off, got: $(grep "^$sym=" "$build/.config")"; bad=1; } ;;
  esac
done <"$guest/config-fragment"
[ $bad -eq 0 ] || die "the merged .config does not have the fragment's settings (missing dependencies?)"
log "[$(elapsed)] config ok ($(grep -c '=y$' "$build/.config") symbols =y)"

# ---- build ----
log "[$(elapsed)] make -j$jobs vmlinux (a few minutes from scratch; full output in $out.tmp/build.log)"
# Progress: one line per 100 compiled files, with the time taken so far.
set +e
make -C "$build" -j"$jobs" vmlinux 2>&1 | tee "$out.tmp/build.log" |
  awk -v t0="$t0" '/^  CC / { n++; if (n % 100 == 0) { printf "guest-kernel: [%ds] %d files compiled\n", systime() - t0, n; fflush() } }' >&2
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  tail -n 40 "$out.tmp/build.log" >&2
  die "kernel build failed (make exit $status), see $out.tmp/build.log"
fi

# ---- check + install ----
# The PVH entry: an ELF note "Xen" of type XEN_ELFNOTE_PHYS32_ENTRY (18 = 0x12).
readelf -n "$build/vmlinux" | grep -A1 -E '^\s+Xen\s' | grep -qiE '0x00000012|PHYS32_ENTRY' ||
  die "$build/vmlinux has no Xen PHYS32_ENTRY note (is CONFIG_PVH set?)"
cp "$build/vmlinux" "$out.tmp/vmlinux"
cp "$build/.config" "$out.tmp/config"
{
  echo "linux-source-6.1 $version"
  echo "patches: $(for p in "${patches[@]}"; do basename "$p"; done | tr '\n' ' ')"
  echo "built: $(date -u +%FT%TZ) in $(elapsed)"
} >"$out.tmp/info"
rm -rf "$out"
mv "$out.tmp" "$out"
if [ "${BULKHEAD_GUEST_KEEP_BUILD:-0}" = 1 ]; then
  log "build tree kept: $build"
else
  rm -rf "$build"
fi
log "[$(elapsed)] done: $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes)"
echo "$out/vmlinux"
