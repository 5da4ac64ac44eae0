#!/usr/bin/env bash
# Builds the Bulkhead Linux guest's root filesystem: an ext4 image (for root=/dev/vda) made
# from Debian's busybox-static, without root privileges (`mkfs.ext4 -d` copies a directory
# tree into the new file system; ownership is set to root with debugfs when not run as root).
#
# What the guest gets: busybox init (/sbin/init) with /etc/inittab:
#   - sysinit /etc/init.d/rcS: mounts /proc, /sys, /run, /tmp, remounts / read-write, sets the
#     hostname, configures the network from the kernel command line:
#       bh.ip=ADDR/PREFIX[,GATEWAY]   eth0 static (e.g. bh.ip=10.77.200.2/24,10.77.200.1)
#       bh.ip=dhcp                    eth0 by busybox udhcpc
#     then prints "bulkhead-rootfs: up <uptime>";
#   - a root shell on ttyS0 (respawned; prompt "root@bulkhead:~# ");
#   - ctrlaltdel: /sbin/reboot (what `bulkhead shutdown` and `bulkhead reboot` press, through
#     the emulated i8042 keyboard; the control domain knows which one it asked for);
#   - shutdown /etc/init.d/rcK: ends every process, syncs, remounts / read-only (so the image
#     is clean: `e2fsck -fn` passes after the VM is gone), prints "bulkhead-rootfs: / clean".
# This guest kernel has no ACPI: `poweroff` only halts the CPUs. End the VM with `reboot`
# (on_reboot = "destroy") or `bulkhead shutdown` from the host.
#
# Output: ${BULKHEAD_CACHE:-/var/cache/bulkhead}/guest-rootfs/<hash>/rootfs.ext4 (sparse,
# ${BULKHEAD_ROOTFS_SIZE:-128M}), hash = sha256 of this script, the size and the
# busybox-static and e2fsprogs versions. The image in the cache is the pristine copy: a VM
# writes to its disk, so give each VM its own copy (`cp --sparse=always`). The image path is
# the last (only) line on stdout:
#   img=$(scripts/guest-rootfs.sh); cp --sparse=always "$img" /srv/vm/root.img
# Installs nothing: a missing package is named, with scripts/install-deps.sh as the fix.
set -euo pipefail

self=$(readlink -f "$0")
cache=${BULKHEAD_CACHE:-/var/cache/bulkhead}/guest-rootfs
size=${BULKHEAD_ROOTFS_SIZE:-128M}

log() { echo "guest-rootfs: $*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=guest/lib.sh
. "$(dirname "$self")/guest/lib.sh"

need_packages busybox-static e2fsprogs
busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox not found (package busybox-static)"
PATH=$PATH:/sbin:/usr/sbin
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found (package e2fsprogs)"

hash=$(
  {
    echo "busybox-static $(dpkg-query -W -f='${Version}' busybox-static)"
    echo "e2fsprogs $(dpkg-query -W -f='${Version}' e2fsprogs)"
    echo "size $size"
    echo "== script"; cat "$self" "$(dirname "$self")/guest/lib.sh"
  } | sha256sum | cut -d' ' -f1
)
out=$cache/$hash
if [ -s "$out/rootfs.ext4" ]; then
  log "cache hit: $out/rootfs.ext4"
  echo "$out/rootfs.ext4"
  exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ -s "$out/rootfs.ext4" ]; then
  log "cache hit: $out/rootfs.ext4 (built concurrently)"
  echo "$out/rootfs.ext4"
  exit 0
fi
log "cache miss: building $out/rootfs.ext4 ($size, busybox $(dpkg-query -W -f='${Version}' busybox-static))"
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root

# ---- the tree ----
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/init.d,dev,proc,sys,run,tmp,root,var/log,mnt,usr/share/udhcpc}
n=$(install_busybox "$busybox" "$root")
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"

cat >"$root/etc/inittab" <<'EOF'
# busybox init (see scripts/guest-rootfs.sh)
::sysinit:/etc/init.d/rcS
ttyS0::respawn:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/init.d/rcK
EOF

cat >"$root/etc/init.d/rcS" <<'EOF'
#!/bin/sh
# Boot: file systems, hostname, network (bh.ip= on the kernel command line).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -o remount,rw / || echo "bulkhead-rootfs: cannot remount / read-write"
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname -F /etc/hostname
ip link set lo up
for tok in $(cat /proc/cmdline); do
  case $tok in
    bh.ip=dhcp)
      ip link set eth0 up && udhcpc -i eth0 -n -q -t 5 -s /usr/share/udhcpc/default.script ;;
    bh.ip=*)
      spec=${tok#bh.ip=}
      addr=${spec%%,*}
      gw=
      [ "$spec" != "$addr" ] && gw=${spec#*,}
      ip addr add "$addr" dev eth0 && ip link set eth0 up &&
        echo "bulkhead-rootfs: eth0 $addr"
      [ -n "$gw" ] && ip route add default via "$gw" ;;
  esac
done
echo "bulkhead-rootfs: up $(cut -d' ' -f1 /proc/uptime)"
EOF

cat >"$root/etc/init.d/rcK" <<'EOF'
#!/bin/sh
# Shutdown (busybox init runs this before it reboots): end every process, then leave / clean.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
echo "bulkhead-rootfs: shutting down"
# Processes other than init and this script (kernel threads have no exe); shell builtins
# only, no process per check (forks are slow where guest kernels run under emulation).
others() {
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = 1 ] || [ "$p" = $$ ] || { [ -e "/proc/$p/exe" ] && return 0; }
  done
  return 1
}
kill -TERM -1 2>/dev/null
kill -HUP -1 2>/dev/null    # interactive shells ignore SIGTERM
i=0
while [ $i -lt 30 ] && others; do sleep 0.1; i=$((i + 1)); done
kill -KILL -1 2>/dev/null
sync
umount -a -r -t tmpfs 2>/dev/null
i=0
while [ $i -lt 20 ] && others; do sleep 0.1; i=$((i + 1)); done
if mount -o remount,ro / || { sleep 0.5; mount -o remount,ro /; }; then
  echo "bulkhead-rootfs: / clean"
else
  echo "bulkhead-rootfs: cannot remount / read-only"
fi
sync
EOF

cat >"$root/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc: apply the lease to $interface.
case $1 in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}"
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    echo "bulkhead-rootfs: $interface $ip/${mask:-24} (dhcp)" ;;
esac
EOF
chmod 0755 "$root/etc/init.d/rcS" "$root/etc/init.d/rcK" "$root/usr/share/udhcpc/default.script"

echo bulkhead >"$root/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf '/bin/sh\n' >"$root/etc/shells"
printf '127.0.0.1 localhost\n127.0.1.1 bulkhead\n' >"$root/etc/hosts"
cat >"$root/etc/profile" <<'EOF'
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
export PS1='\u@\h:\w\$ '
cd "$HOME"
EOF
printf 'Bulkhead Linux guest (busybox). `reboot` restarts the VM (on_reboot), Ctrl-] detaches the console.\n' >"$root/etc/motd"

# ---- the image ----
# Everything initialised up front (no lazy inode-table or journal zeroing in the guest,
# whose kernel runs under emulation on the PVM build hosts).
img=$out.tmp/rootfs.ext4
truncate -s "$size" "$img"
E2FSPROGS_FAKE_TIME=0 mkfs.ext4 -q -F -L bulkhead-root -b 4096 -m 0 \
  -U 6b756c6b-6865-6164-2d72-6f6f74667330 -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 \
  -d "$root" "$img" >&2
if [ "$(id -u)" -ne 0 ]; then
  # mkfs.ext4 -d copies the builder's uid/gid: make every file root's.
  (cd "$root" && find . -mindepth 1) | sed 's|^\.||' |
    awk '{ printf "sif \"%s\" uid 0\nsif \"%s\" gid 0\n", $0, $0 }' >"$work/owners.debugfs"
  debugfs -w -f "$work/owners.debugfs" "$img" >/dev/null 2>&1 || die "debugfs could not set the owners"
fi
e2fsck -fn "$img" >&2 || die "the new image does not check clean"
rm -rf "$out"
mv "$out.tmp" "$out"
log "done: $out/rootfs.ext4 ($size, $n busybox applet links, $(du -k "$out/rootfs.ext4" | cut -f1) KiB used)"
echo "$out/rootfs.ext4"
