//! The slow suite: a real Linux kernel (the minimal 6.1 built by scripts/guest-kernel.sh,
//! with our libc-free /init from scripts/guest-image.sh) booted through `bulkheadd`, its
//! virtio_pci and virtio_blk drivers talking to our virtio-pci transport and bulkhead-blk.
//! On hosts whose KVM emulates guest ring 0 each boot takes tens of seconds.
//! Run alone: `cargo test -p bulkhead-tests --test linux_guest`.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::path::PathBuf;
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
