//! A backend that stops making progress is found and replaced; one that is merely slow is
//! left alone; kills of backends that served never mark a device failed; a failed device
//! is tried again on its own. The guest streams checksummed writes throughout
//! (`blk-stream`) and the image is checked at the end.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/stream.rs"]
mod stream;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use daemon::*;
use stream::*;

/// The default `hang_timeout_ms`.
const HANG: Duration = Duration::from_millis(2000);

#[test]
fn a_frozen_serving_backend_is_replaced_and_nothing_is_lost() {
    let test = "a_frozen_serving_backend_is_replaced_and_nothing_is_lost";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("wd-stop", Some(&runner_uids(65700)), false);
    let (dir, img) = temp_image("wd-stop", 8);
    let con = stream_vm(&d, "frozen", &img, 31, "", "");
    for round in 1..=3 {
        assert!(
            wait_until(STEP, || info_pid(&d, "frozen", "standby pid ").is_some()),
            "round {round}: no standby\n{}",
            d.dump()
        );
        let pid = wait_serving(&d, "frozen");
        send_signal(pid, libc::SIGSTOP);
        let t = Instant::now();
        assert!(
            wait_until(HANG + Duration::from_secs(10), || serving(&d, "frozen")
                .is_some_and(|p| p != pid)),
            "round {round}: the frozen backend {pid} was not replaced\n{}",
            d.dump()
        );
        let took = t.elapsed();
        eprintln!("round {round}: frozen backend replaced after {took:?}");
        assert!(
            took < HANG + Duration::from_secs(1),
            "round {round}: replaced after {took:?}, more than hang_timeout + 1 s"
        );
        let info = d.cli(&["info", "frozen"]).stdout;
        assert!(info.contains("hung: no progress for"), "{info}");
        assert!(!info.contains("FAILED"), "{info}");
    }
    let log = std::fs::read_to_string(d.disk_log_path("frozen", 0)).unwrap_or_default();
    assert!(
        log.contains("hung: no progress for"),
        "the device log says why\n{log}"
    );
    assert_stream_moves(&con);
    stream_verifies(&d, &con, "frozen", &img, 31);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_frozen_standby_is_replaced_without_disturbing_the_serving_backend() {
    let test = "a_frozen_standby_is_replaced_without_disturbing_the_serving_backend";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("wd-standby", Some(&runner_uids(65800)), false);
    let (dir, img) = temp_image("wd-standby", 8);
    let con = stream_vm(&d, "sb", &img, 32, "", "");
    assert!(
        wait_until(STEP, || info_pid(&d, "sb", "standby pid ").is_some()),
        "no standby\n{}",
        d.dump()
    );
    let serving_before = wait_serving(&d, "sb");
    let standby = info_pid(&d, "sb", "standby pid ").expect("standby");
    send_signal(standby, libc::SIGSTOP);
    assert!(
        wait_until(HANG + Duration::from_secs(10), || {
            info_pid(&d, "sb", "standby pid ").is_some_and(|p| p != standby)
        }),
        "the frozen standby {standby} was not replaced\n{}",
        d.dump()
    );
    assert_eq!(
        serving(&d, "sb"),
        Some(serving_before),
        "the serving backend was disturbed\n{}",
        d.daemon_log()
    );
    assert!(
        !d.disk_backends("sb", 0).contains(&standby),
        "the frozen standby still runs"
    );
    // The new standby takes over when the serving backend dies.
    let standby = info_pid(&d, "sb", "standby pid ");
    send_signal(serving_before, libc::SIGKILL);
    assert!(
        wait_until(STEP, || serving(&d, "sb")
            .is_some_and(|p| p != serving_before)),
        "{}",
        d.dump()
    );
    assert_eq!(serving(&d, "sb"), standby, "{}", d.daemon_log());
    stream_verifies(&d, &con, "sb", &img, 32);
    let _ = std::fs::remove_dir_all(dir);
}

/// A FUSE mount of tests/tools/slowfs.py: `disk.img` whose every read and write takes
/// `delay` longer. Unmounted on drop.
struct SlowImage {
    mountpoint: std::path::PathBuf,
    child: Child,
}

impl SlowImage {
    fn mount(test: &str, dir: &Path, backing: &Path, delay: &str) -> Option<Self> {
        let python = Path::new("/usr/bin/python3");
        let has_fusepy = Command::new(python)
            .args(["-c", "import fusepy"])
            .status()
            .is_ok_and(|s| s.success());
        if !has_fusepy || !Path::new("/dev/fuse").exists() {
            if std::env::var_os("REQUIRE_KVM").is_some() {
                panic!("{test}: needs /dev/fuse and python3-fusepy (scripts/install-deps.sh)");
            }
            eprintln!("\n*** SKIPPED {test}: no /dev/fuse or python3-fusepy ***\n");
            return None;
        }
        let mountpoint = dir.join("slow");
        std::fs::create_dir_all(&mountpoint).expect("mountpoint");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/slowfs.py");
        let child = Command::new(python)
            .arg(script)
            .arg(backing)
            .arg(&mountpoint)
            .arg(delay)
            .spawn()
            .expect("slowfs.py");
        let me = Self { mountpoint, child };
        let point = me.mountpoint.to_string_lossy().into_owned();
        assert!(
            wait_until(STEP, || std::fs::read_to_string("/proc/mounts")
                .is_ok_and(|m| m.contains(&point))),
            "slowfs did not mount at {point}"
        );
        Some(me)
    }

    fn image(&self) -> std::path::PathBuf {
        self.mountpoint.join("disk.img")
    }
}

impl Drop for SlowImage {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_slow_backend_is_not_killed() {
    let test = "a_slow_backend_is_not_killed";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("wd-slow", Some(&runner_uids(65900)), false);
    let (dir, backing) = temp_image("wd-slow", 8);
    // Every request takes 500 ms: slow, never stuck.
    let Some(slow) = SlowImage::mount(test, &dir, &backing, "0.5") else {
        return;
    };
    let img = slow.image();
    let con = stream_vm(&d, "slow", &img, 33, "", "");
    let pid = wait_serving(&d, "slow");
    // Watch for several hang timeouts, with requests always waiting, and on until the
    // stream has finished a pass: a pass is 16 requests of 64 KiB and FUSE serializes the
    // writes, so at 500 ms each it takes about 8 s, more on a loaded machine.
    let started = Instant::now();
    let watch = started + HANG * 4;
    let deadline = watch + Duration::from_secs(90);
    loop {
        assert_eq!(
            serving(&d, "slow"),
            Some(pid),
            "the slow backend was replaced\n{}",
            d.daemon_log()
        );
        let now = Instant::now();
        if now >= watch && con.stdout.text().contains("blk-stream: pass") {
            break;
        }
        assert!(
            now < deadline,
            "the stream made no progress in {:?}\n{}\n{}",
            now - started,
            con.stdout.text(),
            d.dump()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !d.daemon_log().contains("hung"),
        "a slow backend was taken for a hung one\n{}",
        d.daemon_log()
    );
    let text = con.stdout.text();
    assert!(
        text.contains("blk-stream: pass 1 ok"),
        "the first pass failed\n{text}"
    );
    let out = d.cli(&["destroy", "slow"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    drop(slow);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ten_kills_50_ms_apart_with_no_restart_limit_never_fail_the_device() {
    let test = "ten_kills_50_ms_apart_with_no_restart_limit_never_fail_the_device";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("wd-kills", Some(&runner_uids(66000)), false);
    let (dir, img) = temp_image("wd-kills", 8);
    let con = stream_vm(&d, "kills", &img, 34, "", "restart_limit = 0\n");
    assert!(
        wait_until(STEP, || info_pid(&d, "kills", "standby pid ").is_some()),
        "no standby\n{}",
        d.dump()
    );
    // Ten kills, each of the next backend to serve as soon as `info` names it, at least
    // 50 ms apart (more on a loaded machine, where `info` itself takes that long).
    let mut killed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while killed.len() < 10 {
        assert!(
            Instant::now() < deadline,
            "only {} kills landed in 90 s\n{}",
            killed.len(),
            d.dump()
        );
        if let Some(pid) = serving(&d, "kills").filter(|p| !killed.contains(p)) {
            send_signal(pid, libc::SIGKILL);
            killed.push(pid);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        wait_until(STEP, || serving(&d, "kills")
            .is_some_and(|p| !killed.contains(&p))),
        "no backend serves after the kills\n{}",
        d.dump()
    );
    let info = d.cli(&["info", "kills"]).stdout;
    assert!(!info.contains("FAILED"), "{info}");
    assert_stream_moves(&con);
    stream_verifies(&d, &con, "kills", &img, 34);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_failed_device_is_tried_again_and_comes_back_once_its_binary_works() {
    let test = "a_failed_device_is_tried_again_and_comes_back_once_its_binary_works";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("wd-retry", Some(&runner_uids(66100)), false);
    let (dir, img) = temp_image("wd-retry", 8);
    let con = stream_vm(&d, "retry", &img, 35, "", "retry_failed_secs = 3\n");
    // The device moves to a binary that crashes on every start.
    let binary = dir.join("bulkhead-blk-broken");
    std::fs::write(&binary, "#!/bin/sh\necho 'broken backend' >&2\nexit 3\n").expect("write");
    let mut perms = std::fs::metadata(&binary).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&binary, perms).expect("chmod");
    let _ = d.cli(&[
        "device-upgrade",
        "retry",
        "disk0",
        "--binary",
        binary.to_str().expect("path"),
    ]);
    assert!(
        wait_until(Duration::from_secs(60), || d
            .cli(&["info", "retry"])
            .stdout
            .contains("FAILED")),
        "the crashing binary did not fail the device\n{}",
        d.dump()
    );
    let info = d.cli(&["info", "retry"]).stdout;
    assert!(info.contains("next attempt in"), "{info}");
    // Fixed in place: the next try starts it, with no device-restart.
    let tmp = dir.join("bulkhead-blk-fixed");
    std::fs::copy(bin("bulkhead-blk"), &tmp).expect("copy");
    std::fs::rename(&tmp, &binary).expect("rename");
    assert!(
        wait_until(Duration::from_secs(30), || {
            let info = d.cli(&["info", "retry"]).stdout;
            !info.contains("FAILED") && serving(&d, "retry").is_some()
        }),
        "the device did not come back on its own\n{}",
        d.dump()
    );
    assert!(
        d.daemon_log().contains("trying the failed disk0 again"),
        "{}",
        d.daemon_log()
    );
    assert_stream_moves(&con);
    stream_verifies(&d, &con, "retry", &img, 35);
    let _ = std::fs::remove_dir_all(dir);
}
