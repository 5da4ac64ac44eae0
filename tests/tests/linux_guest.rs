//! The slow suite: a real Linux kernel (the minimal 6.1 built by scripts/guest-kernel.sh,
//! with our libc-free /init from scripts/guest-image.sh) booted through `bulkheadd`, its
//! virtio_pci and virtio_blk drivers talking to our virtio-pci transport and bulkhead-blk.
//! On hosts whose KVM emulates guest ring 0 each boot takes tens of seconds.
//! Run alone: `cargo test -p bulkhead-tests --test linux_guest`.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use daemon::*;

/// Boot to /init takes ~25-40 s here; allow for a loaded machine.
const BOOT: Duration = Duration::from_secs(240);

/// Runs one of the guest build scripts (cached; the first run on a machine builds for
/// minutes) and returns the path it prints last.
fn built(script: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("scripts").join(script))
        .output()
        .expect("run guest build script");
    assert!(
        out.status.success(),
        "scripts/{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(text.lines().last().unwrap_or_default().trim())
}

struct LinuxGuest {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn linux(test: &str) -> Option<LinuxGuest> {
    if !root_available(test) || !kvm_available(test) {
        return None;
    }
    let kernel = built("guest-kernel.sh");
    let initrd = built("guest-image.sh").join("initramfs-min.cpio.gz");
    assert!(
        kernel.is_file() && initrd.is_file(),
        "{kernel:?} {initrd:?}"
    );
    Some(LinuxGuest { kernel, initrd })
}

fn config(
    d: &Bulkheadd,
    g: &LinuxGuest,
    name: &str,
    vcpus: u32,
    cmdline: &str,
    extra: &str,
) -> PathBuf {
    let text = format!(
        "name = \"{name}\"\nvcpus = {vcpus}\nmemory = \"512M\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 reboot=k panic=-1 {cmdline}\"\n{extra}",
        g.kernel.display(),
        g.initrd.display()
    );
    let path = d.dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

/// Waits for `needle` on NAME's console, returning how long it took from `since`.
fn console_until(d: &Bulkheadd, name: &str, needle: &str, since: Instant) -> (Running, Duration) {
    let con = d.console(name);
    let seen = con.stdout.wait_for(needle, BOOT);
    assert!(
        seen,
        "'{needle}' did not appear within {BOOT:?}\n--- console ---\n{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    (con, since.elapsed())
}

fn wait_stopped(d: &Bulkheadd, name: &str, needle: &str) {
    let ok = wait_until(Duration::from_secs(60), || {
        d.row(name).is_some_and(|r| r.contains(needle))
    });
    assert!(
        ok,
        "{name} never showed '{needle}': {:?}\n{}",
        d.row(name),
        d.dump()
    );
}

fn boot_and_shutdown(vcpus: u32) {
    let test = format!("linux_boots_and_shuts_down_{vcpus}_vcpus");
    let Some(g) = linux(&test) else {
        return;
    };
    let d = Bulkheadd::start(
        &format!("lx{vcpus}"),
        Some(&runner_uids(63000 + vcpus * 100)),
        false,
    );
    let name = format!("linux{vcpus}");
    let cfg = config(&d, &g, &name, vcpus, "bh.wait", "");
    let t0 = Instant::now();
    d.create_config(&name, &cfg);
    let (con, boot) = console_until(
        &d,
        &name,
        "bulkhead-init: waiting for a shutdown request",
        t0,
    );
    eprintln!("{test}: create -> /init waiting: {boot:?}");
    let text = con.stdout.text();
    assert!(text.contains("bulkhead-init: started"), "{text}");
    if vcpus > 1 {
        assert!(
            text.contains(&format!("smp: Brought up 1 node, {vcpus} CPUs")),
            "every vCPU came up\n{text}"
        );
    }
    let out = d.cli(&["shutdown", &name, "--timeout", "120"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(con
        .stdout
        .wait_for("bulkhead-init: shutdown requested", Duration::from_secs(30)));
    wait_stopped(&d, &name, "stopped (shut down)");
}

#[test]
fn linux_boots_and_shuts_down_1_vcpu() {
    boot_and_shutdown(1);
}

#[test]
fn linux_boots_and_shuts_down_2_vcpus() {
    boot_and_shutdown(2);
}

#[test]
fn linux_virtio_blk_drives_bulkhead_blk() {
    let test = "linux_virtio_blk_drives_bulkhead_blk";
    let Some(g) = linux(test) else {
        return;
    };
    let d = Bulkheadd::start("lxblk", Some(&runner_uids(63500)), false);
    let img = d.dir.join("linux-disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 << 20))
        .expect("image");
    let extra = format!(
        "[[disks]]\npath = \"{}\"\nserial = \"LINUXDISK\"\n",
        img.display()
    );
    let cfg = config(&d, &g, "lxdisk", 1, "bh.disk-test=7:2048", &extra);
    let t0 = Instant::now();
    d.create_config("lxdisk", &cfg);
    let (con, _) = console_until(&d, "lxdisk", "bulkhead-init: done", t0);
    let text = con.stdout.text();
    assert!(
        text.contains("bulkhead-init: disk 67108864 bytes serial 'LINUXDISK'"),
        "Linux's virtio_blk sees the size and serial\n{text}"
    );
    assert!(text.contains("bulkhead-init: disk-test ok"), "{text}");
    wait_stopped(&d, "lxdisk", "stopped (shut down)");
    // What Linux wrote with O_DIRECT is on the image, exactly.
    assert_eq!(blk_image_mismatch(&img, 7, 0, 2048), None);
    let data = std::fs::read(&img).expect("image");
    assert!(
        data[2048 * 512..2049 * 512].iter().all(|b| *b == 0),
        "nothing written past the range"
    );
}

#[test]
fn linux_virtio_net_gets_a_link_and_answers_ping() {
    let test = "linux_virtio_net_gets_a_link_and_answers_ping";
    let Some(g) = linux(test) else {
        return;
    };
    // All traffic stays inside a namespace of our own.
    let ns = Netns::new("lxnet");
    let policy = format!(
        "{}[networks.lan]\naddress = \"10.77.8.1/24\"\nvms = [\"*\"]\n",
        runner_uids(63700)
    );
    let d = Bulkheadd::start_in_netns("lxnet", Some(&policy), false, &ns.name);
    let cfg = config(
        &d,
        &g,
        "lxnet",
        1,
        "bh.net=10.77.8.2/24 bh.wait",
        "[[nics]]\nnetwork = \"lan\"\n",
    );
    let t0 = Instant::now();
    d.create_config("lxnet", &cfg);
    let (con, _) = console_until(
        &d,
        "lxnet",
        "bulkhead-init: waiting for a shutdown request",
        t0,
    );
    assert!(
        con.stdout
            .text()
            .contains("bulkhead-init: eth0 10.77.8.2 link up"),
        "Linux's virtio_net has a link\n{}",
        con.stdout.text()
    );
    let mut ping = ns.exec("ping");
    ping.args(["-c", "3", "-W", "5", "10.77.8.2"]);
    let out = run(ping, Duration::from_secs(60));
    assert_eq!(
        out.code,
        Some(0),
        "the Linux guest answers ping\n{}\n{}",
        out.dump(),
        con.stdout.text()
    );
    let out = d.cli(&["shutdown", "lxnet", "--timeout", "120"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    wait_stopped(&d, "lxnet", "stopped (shut down)");
}

// ---- Linux from its own root disk: busybox init, a shell on the console, reboot ----

/// Kernel parameters of a Linux VM whose root is the ext4 image from
/// scripts/guest-rootfs.sh on its first disk; the i8042 options skip probing what the
/// emulated controller does not have (only a keyboard, for Ctrl-Alt-Del).
const ROOT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rootfstype=ext4 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The shell prompt of the root image's busybox sh.
const PROMPT: &str = "root@bulkhead:~# ";

/// A private copy of the root image for one VM (the cached one stays pristine).
fn root_image(d: &Bulkheadd, name: &str) -> PathBuf {
    let pristine = built("guest-rootfs.sh");
    let img = d.dir.join(format!("{name}-root.ext4"));
    let out = Command::new("cp")
        .arg("--sparse=always")
        .arg(&pristine)
        .arg(&img)
        .output()
        .expect("cp");
    assert!(out.status.success(), "cp {pristine:?}: {out:?}");
    img
}

/// Writes the config of a Linux VM booting from `img` (no initrd).
fn root_config(d: &Bulkheadd, g: &LinuxGuest, name: &str, img: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "name = \"{name}\"\nvcpus = 1\nmemory = \"512M\"\nkernel = \"{}\"\ncmdline = \"{ROOT_CMDLINE}\"\n{extra}\n[[disks]]\npath = \"{}\"\nserial = \"{name}-root\"\n",
        g.kernel.display(),
        img.display()
    );
    let path = d.dir.join(format!("{name}.toml"));
    write_file(&path, &text);
    path
}

/// `bulkhead console NAME` on a pseudo-terminal, as a person runs it (raw mode, Ctrl-]).
struct PtyConsole {
    master: std::fs::File,
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl PtyConsole {
    fn attach(d: &Bulkheadd, name: &str) -> PtyConsole {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::process::Stdio;
        let (mut m, mut s) = (-1, -1);
        let ws = libc::winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two new fds into `m` and `s`; the name and termios may be
        // null, the window size is a valid struct that outlives the call.
        let r =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just created by openpty and are owned by nothing else.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let mut cmd = d.cli_cmd(&["console", name]);
        cmd.stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::from(slave));
        let child = cmd.spawn().expect("spawn bulkhead console");
        let master = std::fs::File::from(master);
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut reader = master.try_clone().expect("dup master");
        let sink = out.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            // EIO once the console client exits and the slave closes.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        PtyConsole { master, child, out }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    /// Waits until `needle` appears at least `n` times.
    fn wait_count(&self, needle: &str, n: usize, deadline: Duration) -> bool {
        wait_until(deadline, || self.count(needle) >= n)
    }

    /// Types `bytes` (the terminal is raw: Enter is "\r").
    fn type_bytes(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.master.write_all(bytes).expect("type on the pty");
    }

    /// Types a command line and waits for `expect` (which the command prints, and its echo
    /// does not contain) to appear once more than before.
    fn run(&mut self, line: &str, expect: &str, deadline: Duration) {
        let before = self.count(expect);
        self.type_bytes(format!("{line}\r").as_bytes());
        assert!(
            self.wait_count(expect, before + 1, deadline),
            "'{line}' did not print '{expect}' within {deadline:?}\n--- console ---\n{}",
            self.text()
        );
    }

    /// Ctrl-] and the client's exit status.
    fn detach(mut self) -> Option<i32> {
        self.type_bytes(&[0x1d]);
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PtyConsole {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for boot number `n` to reach its shell prompt.
fn wait_boot(con: &PtyConsole, d: &Bulkheadd, n: usize) {
    let booted = wait_until(BOOT, || {
        let t = con.text();
        t.matches("bulkhead-rootfs: up").count() >= n
            && t.rfind(PROMPT) > t.rfind("bulkhead-rootfs: up")
    });
    assert!(
        booted,
        "boot {n} did not reach a prompt within {BOOT:?}\n{}\n{}",
        con.text(),
        d.dump()
    );
}

/// The guest's uptime in whole seconds, read through the console.
fn guest_uptime(con: &mut PtyConsole) -> u64 {
    let before = con.text().len();
    // The echo of the typed line has "$((0))" where the output has "0".
    con.type_bytes(b"echo UPTIME-$((0))-$(cut -d. -f1 /proc/uptime)-SECS\r");
    let parse = |text: &str| -> Option<u64> {
        let tail = text.get(before..)?;
        let rest = tail.split("UPTIME-0-").nth(1)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        rest[digits.len()..]
            .starts_with("-SECS")
            .then(|| digits.parse().ok())
            .flatten()
    };
    let mut up = None;
    let seen = wait_until(Duration::from_secs(60), || {
        up = parse(&con.text());
        up.is_some()
    });
    assert!(seen, "no uptime on the console\n{}", con.text());
    up.unwrap_or_default()
}

fn debugfs_cat(img: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(img)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn e2fsck_clean(img: &Path) -> (bool, String) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .expect("e2fsck");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The disk0 backend pid the daemon records, once that process runs.
fn disk_pid(d: &Bulkheadd, vm: &str) -> Option<i32> {
    d.backend_pid_in_state(vm, "disk0")
        .filter(|p| d.disk_backends(vm, 0).contains(p))
}

/// One Linux VM from its ext4 root on bulkhead-blk, shared by every check (each boot costs
/// tens of seconds here): a shell through `bulkhead console` on a pty; sync-ed writes while
/// the disk backend is killed 10 times; `bulkhead reboot` and an in-guest `reboot` restart
/// it in place (on_reboot = "restart": fresh uptime, same disk); `bulkhead shutdown` ends it
/// as shut down; the image holds the guest's file and checks clean.
#[test]
fn linux_root_disk_shell_reboot_and_shutdown() {
    let test = "linux_root_disk_shell_reboot_and_shutdown";
    let Some(g) = linux(test) else {
        return;
    };
    let d = Bulkheadd::start("lxroot", Some(&runner_uids(63900)), false);
    let img = root_image(&d, "lxroot");
    let cfg = root_config(&d, &g, "lxroot", &img, "on_reboot = \"restart\"");
    let t0 = Instant::now();
    d.create_config("lxroot", &cfg);
    let mut con = PtyConsole::attach(&d, "lxroot");
    assert!(
        con.wait_count(PROMPT, 1, BOOT),
        "no shell prompt within {BOOT:?}\n{}\n{}",
        con.text(),
        d.dump()
    );
    eprintln!("{test}: create -> shell prompt: {:?}", t0.elapsed());
    let text = con.text();
    assert!(text.contains("bulkhead-rootfs: up"), "{text}");
    assert!(
        text.contains("EXT4-fs (vda): mounted filesystem"),
        "root is the ext4 on virtio-blk\n{text}"
    );

    // A command through the console answers; the root is writable.
    con.run("echo ANSWER=$((6*7))", "ANSWER=42", Duration::from_secs(60));
    con.run(
        "mount | grep ' / ' ; echo from-the-guest > /root/hello; sync; echo W=$((1+1))",
        "W=2",
        Duration::from_secs(60),
    );
    assert!(
        con.text().contains("/dev/root on / type ext4 (rw"),
        "{}",
        con.text()
    );

    // A second client on its own terminal: the reattach shows the last screenful (24 rows
    // here), not the whole ring, and both clients see what follows; Ctrl-] detaches it
    // while the VM runs on.
    let second = PtyConsole::attach(&d, "lxroot");
    assert!(
        wait_until(STEP, || second.text().contains("W=2")),
        "{}",
        second.text()
    );
    let shown = second.text().lines().count();
    assert!(
        shown <= 26,
        "a reattach showed {shown} lines, not a screenful\n{}",
        second.text()
    );
    assert!(
        !second.text().contains("Linux version"),
        "{}",
        second.text()
    );
    con.run("echo BOTH=$((5*5))", "BOTH=25", Duration::from_secs(60));
    assert!(
        wait_until(STEP, || second.text().contains("BOTH=25")),
        "the second client missed the output\n{}",
        second.text()
    );
    assert_eq!(second.detach(), Some(0), "Ctrl-] detaches");
    assert_eq!(d.vm("lxroot").map(|v| v.state), Some("running".into()));

    // Sync-ed writes in a loop while the disk backend is killed 10 times.
    con.run(
        "(i=0; while [ ! -e /tmp/stop ]; do echo line$i >> /root/loop || echo IOERR-write; sync || echo IOERR-sync; echo T$i.; i=$((i+1)); done; echo LOOP=$((2+3))) &",
        "T1.",
        Duration::from_secs(60),
    );
    // The loop prints "T<n>." after each round: the highest n so far.
    let ticks = |c: &PtyConsole| {
        c.text()
            .split('T')
            .filter_map(|s| {
                let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
                (!digits.is_empty() && s[digits.len()..].starts_with('.'))
                    .then(|| digits.parse::<usize>().ok())
                    .flatten()
            })
            .max()
            .unwrap_or(0)
    };
    for kill in 1..=10 {
        let pid = {
            let mut p = None;
            assert!(
                wait_until(STEP, || {
                    p = disk_pid(&d, "lxroot");
                    p.is_some()
                }),
                "no disk backend before kill {kill}\n{}",
                d.dump()
            );
            p.unwrap_or_default()
        };
        // Kill while writes are in flight: wait for two more loop rounds first.
        let seen = ticks(&con);
        assert!(
            wait_until(Duration::from_secs(60), || ticks(&con) >= seen + 2),
            "the guest's write loop stalled before kill {kill}\n{}",
            con.text()
        );
        send_signal(pid, libc::SIGKILL);
        assert!(
            wait_until(STEP, || disk_pid(&d, "lxroot").is_some_and(|p| p != pid)),
            "no new disk backend after kill {kill}\n{}",
            d.dump()
        );
    }
    let seen = ticks(&con);
    assert!(
        wait_until(Duration::from_secs(60), || ticks(&con) >= seen + 3),
        "the guest's writes did not go on after the last kill\n{}",
        con.text()
    );
    con.run("touch /tmp/stop", "LOOP=5", Duration::from_secs(60));
    let text = con.text();
    // The loop's own error lines (its command line, echoed, names them too).
    let loop_errors = text
        .lines()
        .filter(|l| l.trim().starts_with("IOERR"))
        .count();
    assert_eq!(loop_errors, 0, "the guest's writes or syncs failed\n{text}");
    for bad in ["I/O error", "EXT4-fs error", "Buffer I/O"] {
        assert!(!text.contains(bad), "the guest saw '{bad}'\n{text}");
    }

    // `bulkhead reboot`: the same VM comes back with a fresh kernel, the file still there.
    con.run(
        "touch /run/booted-before; echo R=$((3+4))",
        "R=7",
        Duration::from_secs(60),
    );
    let runner1 = d.vm("lxroot").and_then(|v| v.runner_pid);
    let t_reboot = Instant::now();
    let out = d.cli(&["reboot", "lxroot", "--timeout", "200"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(out.stdout.contains("rebooted"), "{}", out.dump());
    assert!(
        con.wait_count("bulkhead-rootfs: / clean", 1, Duration::from_secs(60)),
        "the guest did not shut down cleanly before the reboot\n{}",
        con.text()
    );
    wait_boot(&con, &d, 2);
    let runner2 = d.vm("lxroot").and_then(|v| v.runner_pid);
    assert_ne!(runner1, runner2, "a new runner runs the rebooted guest");
    assert_eq!(d.vm("lxroot").map(|v| v.state), Some("running".into()));
    let up = guest_uptime(&mut con);
    assert!(
        up <= t_reboot.elapsed().as_secs(),
        "uptime {up} s after a reboot {:?} ago",
        t_reboot.elapsed()
    );
    con.run(
        "cat /root/hello; ls /run/booted-before 2>&1 | grep -c 'No such' | sed 's/^/GONE=/'",
        "GONE=1",
        Duration::from_secs(60),
    );
    assert!(
        con.text().matches("from-the-guest").count() >= 2,
        "{}",
        con.text()
    );

    // An in-guest `reboot`: on_reboot = "restart" brings it back again.
    let t_reboot = Instant::now();
    con.type_bytes(b"reboot\r");
    wait_boot(&con, &d, 3);
    let runner3 = d.vm("lxroot").and_then(|v| v.runner_pid);
    assert_ne!(runner2, runner3, "a new runner runs the rebooted guest");
    let up = guest_uptime(&mut con);
    assert!(up <= t_reboot.elapsed().as_secs(), "uptime {up} s");
    con.run(
        "cat /root/hello; echo C=$((4+4))",
        "C=8",
        Duration::from_secs(60),
    );

    // `bulkhead shutdown`: Ctrl-Alt-Del, busybox init shuts down, the VM stops.
    let out = d.cli(&["shutdown", "lxroot", "--timeout", "120"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    wait_stopped(&d, "lxroot", "stopped (shut down)");
    assert!(
        con.count("bulkhead-rootfs: / clean") >= 3,
        "every shutdown left / clean\n{}",
        con.text()
    );
    assert_eq!(
        con.detach(),
        Some(0),
        "the console client ends when the VM stops"
    );

    // On the host image: the file, every loop line, and a clean file system.
    assert_eq!(debugfs_cat(&img, "/root/hello"), "from-the-guest\n");
    let lines = debugfs_cat(&img, "/root/loop");
    let n = lines.lines().count();
    assert!(n > 10, "only {n} lines from the write loop");
    for (i, l) in lines.lines().enumerate() {
        assert_eq!(l, format!("line{i}"), "line {i} of the loop file");
    }
    let (clean, report) = e2fsck_clean(&img);
    assert!(clean, "e2fsck -fn:\n{report}");
}

/// `on_reboot = "destroy"`: an in-guest `reboot` ends the VM.
#[test]
fn linux_on_reboot_destroy_ends_the_vm() {
    let test = "linux_on_reboot_destroy_ends_the_vm";
    let Some(g) = linux(test) else {
        return;
    };
    let d = Bulkheadd::start("lxrbd", Some(&runner_uids(64100)), false);
    let img = root_image(&d, "lxrbd");
    let cfg = root_config(&d, &g, "lxrbd", &img, "on_reboot = \"destroy\"");
    d.create_config("lxrbd", &cfg);
    let mut con = PtyConsole::attach(&d, "lxrbd");
    assert!(
        con.wait_count(PROMPT, 1, BOOT),
        "no shell prompt\n{}\n{}",
        con.text(),
        d.dump()
    );
    con.type_bytes(b"reboot\r");
    wait_stopped(&d, "lxrbd", "stopped (shut down)");
    assert_eq!(con.count("bulkhead-rootfs: up"), 1, "{}", con.text());
    let (clean, report) = e2fsck_clean(&img);
    assert!(clean, "e2fsck -fn:\n{report}");
}
