#!/usr/bin/env bash
# Fetches Debian's cloud kernel package (apt-get download, no install) and extracts its
# bzImage (vmlinuz) and the ELF vmlinux inside it, cached under target/debian-kernel/.
# Prints the cache directory; safe to run repeatedly. scripts/test.sh runs it once before
# the tests; the loader tests call it with --no-fetch, which only prints a complete cache
# (exit 3 and a message when there is none), so no test ever runs apt-get.
set -euo pipefail
fetch=1
[ "${1:-}" = --no-fetch ] && fetch=0

root=$(cd "$(dirname "$0")/.." && pwd)
out=${BULKHEAD_DEBIAN_KERNEL_DIR:-"${CARGO_TARGET_DIR:-$root/target}/debian-kernel"}
if [ -s "$out/vmlinuz" ] && [ -s "$out/vmlinux" ]; then
  echo "$out"
  exit 0
fi
if [ $fetch -eq 0 ]; then
  echo "debian-kernel: no cached kernel in $out; fetch it with: bash scripts/debian-kernel.sh" >&2
  exit 3
fi
mkdir -p "$out"
# Callers may run this concurrently: one fetches while the others wait, and the files appear
# whole (renamed into place), never half-copied.
exec 9>"$out/.lock"
flock 9
if [ -s "$out/vmlinuz" ] && [ -s "$out/vmlinux" ]; then
  echo "$out"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -qq >&2
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "debian-kernel: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
echo "debian-kernel: downloading $pkg" >&2
(cd "$work" && chmod 777 . && apt-get download -qq "$pkg" >&2)
dpkg -x "$work"/*.deb "$work/x"
vmlinuz=$(ls "$work"/x/boot/vmlinuz-* | head -n1)

# The vmlinux is the bzImage's compressed payload: its place is in the setup header
# (setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c), its format in its magic.
u8() { od -An -tu1 -j "$1" -N1 "$vmlinuz" | tr -d ' '; }
u32() { od -An -tu4 -j "$1" -N4 "$vmlinuz" | tr -d ' '; }
setup_sects=$(u8 $((0x1f1))); [ "$setup_sects" -ne 0 ] || setup_sects=4
start=$(( (setup_sects + 1) * 512 + $(u32 $((0x248))) ))
len=$(u32 $((0x24c)))
dd if="$vmlinuz" of="$work/payload" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$len" status=none
case $(head -c4 "$work/payload" | od -An -tx1 | tr -d ' \n') in
  02214c18) unpack="lz4 -dc" ;;
  fd377a58) unpack="xz -dc" ;;
  28b52ffd) unpack="zstd -dc" ;;
  1f8b*) unpack="gzip -dc" ;;
  *) echo "debian-kernel: unknown payload compression in $vmlinuz" >&2; exit 1 ;;
esac
$unpack <"$work/payload" >"$work/vmlinux" 2>/dev/null || true
if [ "$(head -c4 "$work/vmlinux" | od -An -tx1 | tr -d ' \n')" != 7f454c46 ]; then
  echo "debian-kernel: the payload of $vmlinuz did not unpack to an ELF" >&2
  exit 1
fi

cp "$vmlinuz" "$out/.vmlinuz.tmp" && mv -f "$out/.vmlinuz.tmp" "$out/vmlinuz"
cp "$work/vmlinux" "$out/.vmlinux.tmp" && mv -f "$out/.vmlinux.tmp" "$out/vmlinux"
echo "$pkg" >"$out/package"
echo "$out"
