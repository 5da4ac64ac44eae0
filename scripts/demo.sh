#!/usr/bin/env bash
# The main job: a Linux VM under Bulkhead. Builds Bulkhead, the guest kernel
# (scripts/guest-kernel.sh) and the ext4 root image (scripts/guest-rootfs.sh) — the first run
# builds the kernel for several minutes and says so, later runs use the cache — starts the
# control domain (bulkheadd) and creates the VM `demo` through the `bulkhead` CLI: 1 vCPU,
# 512 MiB, root=/dev/vda on a disk served by a sandboxed bulkhead-blk, one NIC served by a
# sandboxed bulkhead-net on a tap in bridge bhdemo0 (host 10.77.200.1/24, guest 10.77.200.2).
# It shows the console as the guest boots, runs a few commands in the guest's shell through
# `bulkhead console` (uname -a, mount, ip addr, writes a file), pings the guest from the host,
# then `bulkhead shutdown` (Ctrl-Alt-Del: busybox init shuts down) and removes the bridge.
# Runs as root (bulkheadd creates namespaces, taps and bridges and switches runners to their
# own uid).
#   KEEP=1 bash scripts/demo.sh        leave the daemon, the VM and the bridge up, then
#                                      `bulkhead console demo` (Ctrl-] detaches)
#   bash scripts/demo.sh --test-guest  the fast path: the bare-metal test guest instead of
#                                      Linux (boots in milliseconds)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=linux
case "${1:-}" in
  --test-guest) mode=test-guest ;;
  "") ;;
  *) echo "usage: $0 [--test-guest]   (KEEP=1 leaves the VM running)" >&2; exit 2 ;;
esac

bash scripts/install-deps.sh >&2
cargo build --release --workspace --bins >&2
bin=target/release
work=${BULKHEAD_DEMO_DIR:-/tmp/bulkhead-demo}
sock=$work/bulkhead.sock
mkdir -p "$work"
bh() { "$bin/bulkhead" --socket "$sock" "$@"; }
say() { echo "== $* ==" >&2; }
failed=0   # set when a step fails; the exit status (CI runs the demo)

# The policy: root acts (no [admins] needed), and the demo VM may join network "demo".
cat >"$work/policy.toml" <<TOML
[networks.demo]
bridge = "bhdemo0"
address = "10.77.200.1/24"
vms = ["demo"]
TOML

start_daemon() {
  if ! bh list >/dev/null 2>&1; then
    say "starting bulkheadd (state in $work/state, log in $work/bulkheadd.log)"
    "$bin/bulkheadd" --socket "$sock" --state-dir "$work/state" --policy "$work/policy.toml" \
      >"$work/bulkheadd.log" 2>&1 &
    for _ in $(seq 100); do bh list >/dev/null 2>&1 && break; sleep 0.05; done
  fi
  bh destroy demo >/dev/null 2>&1 || true
}

stop_daemon() {
  bh destroy demo >/dev/null 2>&1 || true
  pkill -TERM -f "bulkheadd --socket $sock" || true
  ip link del bhdemo0 2>/dev/null || true
}

# ---------------------------------------------------------------- the test guest (fast path)
if [ "$mode" = test-guest ]; then
  cargo build --release -p bulkhead-tests >&2     # builds the test guest
  guest=$PWD/target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest
  start_daemon
  rm -f "$work/demo-disk.img"
  truncate -s 64M "$work/demo-disk.img"
  cat >"$work/demo.toml" <<TOML
name = "demo"
vcpus = 2
memory = "256M"
kernel = "$guest"
# The test guest finds its virtio-blk disk (served by a sandboxed bulkhead-blk), writes a
# pattern over 2048 sectors and verifies it; brings up its virtio-net NIC (a sandboxed
# bulkhead-net on a tap) as 10.77.200.2 and pings the host; then ticks, answering pings,
# until asked to shut down.
cmdline = "blk blk-id blk-queues=2 blk-write=1:0:2048 blk-verify=1:0:2048 net ip=10.77.200.2/24 peer=10.77.200.1 ping=10.77.200.1:3 ticks=500"
[[disks]]
path = "$work/demo-disk.img"
serial = "demo-disk"
[[nics]]
network = "demo"
TOML
  say "bulkhead create $work/demo.toml"
  bh create "$work/demo.toml"
  bh list
  bh info demo
  say "bulkhead console demo (3 seconds)"
  timeout 3 "$bin/bulkhead" --socket "$sock" console demo </dev/null || true
  echo
  say "ping -c 3 10.77.200.2 (the guest, from the host)"
  ping -c 3 -W 2 10.77.200.2 || { say "no answer from the guest"; failed=1; }
  if [ "${KEEP:-0}" = 1 ]; then
    say "left running: $bin/bulkhead --socket $sock console demo (Ctrl-] detaches)"
    exit 0
  fi
  say "bulkhead shutdown demo"
  bh shutdown demo --timeout 20 || failed=1
  bh list
  stop_daemon
  exit "$failed"
fi

# ---------------------------------------------------------------- Linux (the main job)
kcache=${BULKHEAD_CACHE:-/var/cache/bulkhead}/guest-kernel
say "guest kernel (scripts/guest-kernel.sh; the first run builds Linux 6.1 for several minutes, progress below)"
kernel=$(bash scripts/guest-kernel.sh)
say "guest root file system (scripts/guest-rootfs.sh: ext4 from Debian's busybox, cached)"
pristine=$(bash scripts/guest-rootfs.sh)
echo "kernel $kernel (cache $kcache)" >&2
echo "root image $pristine" >&2

start_daemon
# The VM writes to its root disk: it gets its own copy of the pristine image.
rm -f "$work/demo-root.ext4"
cp --sparse=always "$pristine" "$work/demo-root.ext4"
cat >"$work/demo.toml" <<TOML
name = "demo"
vcpus = 1
memory = "512M"
kernel = "$kernel"
# root=/dev/vda: the ext4 image below, served by a sandboxed bulkhead-blk. bh.ip= is read by
# the image's /etc/init.d/rcS. The i8042 options: the emulated controller has only the
# keyboard that \`bulkhead shutdown\` presses Ctrl-Alt-Del on.
cmdline = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rootfstype=ext4 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd bh.ip=10.77.200.2/24,10.77.200.1"
on_reboot = "restart"     # an in-guest \`reboot\` starts the VM again in place
[[disks]]
path = "$work/demo-root.ext4"
serial = "demo-root"
[[nics]]
network = "demo"
TOML
say "bulkhead create $work/demo.toml"
t0=$(date +%s)
bh create "$work/demo.toml"
bh list

# The console: a client whose input is a FIFO this script writes to, its output shown here
# and kept in console.log to wait on.
log=$work/console.log
rm -f "$log" "$work/console.in"
mkfifo "$work/console.in"
"$bin/bulkhead" --socket "$sock" console demo <"$work/console.in" >"$log" 2>&1 &
console_pid=$!
exec 7>"$work/console.in"
tail -n +1 -f "$log" --pid="$console_pid" &
tail_pid=$!
cleanup() {
  local rc=$?
  exec 7>&- 2>/dev/null || true
  kill "$tail_pid" 2>/dev/null || true
  # A step that gave up (set -e) leaves nothing running unless KEEP=1.
  if [ "$rc" -ne 0 ] && [ "${KEEP:-0}" != 1 ]; then stop_daemon; fi
}
trap cleanup EXIT

# Waits until console.log holds $2 occurrences of $1, at most $3 seconds.
wait_console() {
  local needle=$1 count=$2 limit=$3 start=$SECONDS
  while [ "$(grep -aoF -- "$needle" "$log" 2>/dev/null | wc -l)" -lt "$count" ]; do
    if [ $((SECONDS - start)) -ge "$limit" ]; then
      say "gave up waiting for '$needle' on the console after ${limit}s"
      return 1
    fi
    sleep 0.2
  done
}
# Types a command line into the guest's shell; waits for the marker the line ends printing.
n=0
guest() {
  n=$((n + 1))
  printf '%s; echo DEMO-STEP-$((%d))-DONE\r' "$1" "$n" >&7
  wait_console "DEMO-STEP-$n-DONE" 1 120
}

say "the guest boots (its kernel runs under emulation on PVM hosts: ~30-60 s)"
wait_console 'root@bulkhead:~# ' 1 300
echo >&2
say "shell prompt $(( $(date +%s) - t0 )) s after create; running commands in the guest"
guest "uname -a"
guest "mount"
guest "ip addr"
guest "echo 'written by the demo guest' > /root/demo.txt && sync && cat /root/demo.txt"
echo >&2
say "ping -c 3 10.77.200.2 (the guest, from the host)"
ping -c 3 -W 5 10.77.200.2 || { say "no answer from the guest"; failed=1; }

if [ "${KEEP:-0}" = 1 ]; then
  exec 7>&-
  kill "$console_pid" 2>/dev/null || true
  say "left running: $bin/bulkhead --socket $sock console demo (Ctrl-] detaches);" \
    "$bin/bulkhead --socket $sock shutdown demo ends it"
  exit 0
fi
say "bulkhead shutdown demo (Ctrl-Alt-Del: busybox init runs its shutdown)"
bh shutdown demo --timeout 120 || failed=1
bh list
wait "$console_pid" 2>/dev/null || true
if command -v debugfs >/dev/null || [ -x /sbin/debugfs ]; then
  say "the file the guest wrote, read from the host's image"
  PATH=$PATH:/sbin debugfs -R "cat /root/demo.txt" "$work/demo-root.ext4" 2>/dev/null
fi
stop_daemon
[ "$failed" = 0 ] || say "the demo did not go as it should (see above)"
exit "$failed"
