# Shared by scripts/guest-image.sh and scripts/guest-rootfs.sh (sourced; the caller defines
# `die`). Part of both scripts' cache keys.

# need_packages PKG...: dies naming the missing ones, with install-deps.sh as the fix.
need_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] ||
    die "missing packages: ${missing[*]}; install them with: sudo bash scripts/install-deps.sh"
}

# install_busybox BUSYBOX ROOT: puts BUSYBOX at ROOT/bin/busybox with a link for each of its
# applets; prints how many links.
install_busybox() {
  local busybox=$1 root=$2 applet n=0
  mkdir -p "$root/bin"
  install -m 0755 "$busybox" "$root/bin/busybox"
  while IFS= read -r applet; do
    applet=${applet#/}
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
    n=$((n + 1))
  done < <("$busybox" --list-full)
  echo "$n"
}
