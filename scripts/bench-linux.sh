#!/usr/bin/env bash
# The Linux guest from its ext4 root disk, Bulkhead vs QEMU, same vmlinux
# (scripts/guest-kernel.sh), same root image (scripts/guest-rootfs.sh, a fresh copy per run)
# and the same kernel command line:
#   boot      launch (`bulkhead create` through bulkheadd; QEMU's process start) until the
#             shell prompt "root@bulkhead:~# " is on the console;
#   shutdown  the request until the VM is gone: `bulkhead shutdown` (Ctrl-Alt-Del on the
#             emulated i8042) until it returns; QEMU -M pc: `sendkey ctrl-alt-delete` on its
#             monitor until QEMU exits (-no-reboot); QEMU -M microvm has no keyboard
#             controller, so `reboot` is typed on its serial console instead (and its
#             guest gets reboot=t instead of reboot=k, see below).
# Both guests then run busybox init's shutdown and reset the machine. Median of N runs
# (default 5, or $1) each, and the ratios Bulkhead/QEMU (goal: <= 0.8). This is a benchmark,
# not a test: it prints numbers and fails only when a run does not complete.
# QEMU -M pc gets virtio-blk-pci (as Bulkhead's runner offers), -M microvm virtio-blk over
# virtio-mmio (acpi=off: QEMU puts the devices on the command line). Runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
export PATH=$PATH:/sbin:/usr/sbin
command -v qemu-system-x86_64 >/dev/null ||
  { echo "bench-linux: qemu-system-x86_64 missing; install it with: sudo bash scripts/install-deps.sh" >&2; exit 1; }
cargo build --release --workspace --bins >&2
kernel=$(bash scripts/guest-kernel.sh)
pristine=$(bash scripts/guest-rootfs.sh)
bin=$PWD/target/release
work=$(mktemp -d /tmp/bench-linux.XXXXXX)
sock=$work/bh.sock
daemon_pid=
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

base="console=ttyS0 reboot=k panic=-1 root=/dev/vda rootfstype=ext4 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
# The minimal CPU template's Linux words (core-vmm/src/cpu_template.rs), given to QEMU too
# (Bulkhead's runner appends them itself on hosts that need them).
cpu_words="noxsave nopcid noinvpcid nofsgsbase clearcpuid=308,288,514,515,151,158,306,150,156,293,291,296,311,312,534,59"

"$bin/bulkheadd" --socket "$sock" --state-dir "$work/state" --policy "$work/none.toml" >"$work/bulkheadd.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do "$bin/bulkhead" --socket "$sock" list >/dev/null 2>&1 && break; sleep 0.05; done

# One measured run; prints "BOOT SHUTDOWN" in seconds, or "failed ...".
#   run_one bulkhead | pc | microvm
run_one() {
  WORK=$work SOCK=$sock BIN=$bin KERNEL=$kernel BASE=$base CPU_WORDS=$cpu_words PRISTINE=$pristine \
    python3 - "$1" <<'PY'
import os, shutil, socket, subprocess, sys, time
kind = sys.argv[1]
work, sock, bindir = os.environ["WORK"], os.environ["SOCK"], os.environ["BIN"]
kernel, base, cpu = os.environ["KERNEL"], os.environ["BASE"], os.environ["CPU_WORDS"]
img = os.path.join(work, "root.ext4")
subprocess.run(["cp", "--sparse=always", os.environ["PRISTINE"], img], check=True)
PROMPT = b"root@bulkhead:~# "
LIMIT = 600

def read_until(stream, needle, deadline):
    buf = b""
    while time.monotonic() < deadline:
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            return False
        buf = (buf + chunk)[-4096:]
        if needle in buf:
            return True
    return False

if kind == "bulkhead":
    bh = [os.path.join(bindir, "bulkhead"), "--socket", sock]
    cfg = os.path.join(work, "vm.toml")
    with open(cfg, "w") as f:
        f.write(f'name = "bench"\nvcpus = 1\nmemory = "512M"\nkernel = "{kernel}"\n'
                f'cmdline = "{base}"\n[[disks]]\npath = "{img}"\n')
    subprocess.run(bh + ["destroy", "bench"], capture_output=True)
    t0 = time.monotonic()
    subprocess.run(bh + ["create", cfg], check=True, capture_output=True)
    con = subprocess.Popen(bh + ["console", "bench"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    ok = read_until(con.stdout, PROMPT, t0 + LIMIT)
    boot = time.monotonic() - t0
    if not ok:
        print("failed: no prompt"); sys.exit(0)
    t1 = time.monotonic()
    r = subprocess.run(bh + ["shutdown", "bench", "--timeout", "300"], capture_output=True)
    down = time.monotonic() - t1
    con.kill(); con.wait()
    subprocess.run(bh + ["destroy", "bench"], capture_output=True)
    print(f"{boot:.2f} {down:.2f}" if r.returncode == 0 else f"failed: {r.stderr.decode().strip()}")
else:
    mon = os.path.join(work, "qemu.mon")
    cmd = ["qemu-system-x86_64", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "512",
           "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
           "-no-reboot", "-kernel", kernel, "-append", f"{base} {cpu}",
           "-drive", f"file={img},if=none,format=raw,id=d0"]
    if kind == "pc":
        cmd += ["-M", "pc", "-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
                "-monitor", f"unix:{mon},server=on,wait=off"]
    else:
        # No i8042 on microvm: reboot=k would spin on a missing keyboard controller (tens
        # of seconds measured) before falling back to a triple fault; ask for that at once.
        cmd[cmd.index("-append") + 1] = cmd[cmd.index("-append") + 1].replace("reboot=k", "reboot=t")
        cmd += ["-M", "microvm,acpi=off", "-device", "virtio-blk-device,drive=d0"]
    t0 = time.monotonic()
    q = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    ok = read_until(q.stdout, PROMPT, t0 + LIMIT)
    boot = time.monotonic() - t0
    if not ok:
        q.kill(); q.wait(); print("failed: no prompt"); sys.exit(0)
    t1 = time.monotonic()
    if kind == "pc":
        s = socket.socket(socket.AF_UNIX); s.connect(mon)
        s.sendall(b"sendkey ctrl-alt-delete\n")
    else:
        q.stdin.write(b"reboot\r"); q.stdin.flush()
    # Drain the console until QEMU exits.
    while os.read(q.stdout.fileno(), 4096):
        if time.monotonic() > t1 + LIMIT:
            q.kill(); break
    code = q.wait()
    down = time.monotonic() - t1
    print(f"{boot:.2f} {down:.2f}" if code == 0 else f"failed: qemu exit {code}")
PY
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
for k in bulkhead pc microvm; do : >"$work/$k"; done
for i in $(seq "$runs"); do
  for k in bulkhead pc microvm; do
    r=$(run_one "$k")
    echo "bench-linux: run $i $k: $r" >&2
    case $r in failed*) echo "bench-linux: $k run $i $r" >&2; exit 1 ;; esac
    echo "$r" >>"$work/$k"
  done
done
ratio() { echo "$1 / $2" | bc -l | xargs printf '%.2f'; }
bb=$(cut -d' ' -f1 "$work/bulkhead" | median); bs=$(cut -d' ' -f2 "$work/bulkhead" | median)
pb=$(cut -d' ' -f1 "$work/pc" | median); ps=$(cut -d' ' -f2 "$work/pc" | median)
mb=$(cut -d' ' -f1 "$work/microvm" | median); ms=$(cut -d' ' -f2 "$work/microvm" | median)
printf '%-40s %9s %10s\n' "Linux from its root disk (median of $runs)" "boot s" "shutdown s"
printf '%-40s %9s %10s\n' "Bulkhead (bulkheadd, bulkhead-blk)" "$bb" "$bs"
printf '%-40s %9s %10s   bulkhead/qemu: boot %s, shutdown %s\n' "QEMU -M pc (virtio-blk-pci)" "$pb" "$ps" "$(ratio "$bb" "$pb")" "$(ratio "$bs" "$ps")"
printf '%-40s %9s %10s   bulkhead/qemu: boot %s, shutdown %s\n' "QEMU -M microvm (virtio-mmio)" "$mb" "$ms" "$(ratio "$bb" "$mb")" "$(ratio "$bs" "$ms")"
echo "goal: <= 0.80 for both (boot = launch to shell prompt; shutdown = request to VM gone)"
