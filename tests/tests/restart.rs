//! Device backends crash, restart and are upgraded under a running guest: the guest streams
//! sequence-numbered writes (`blk-stream`, tests/guest/README.md "Disk stream") while the test
//! kills or upgrades `bulkhead-blk`; it must see no I/O error, and afterwards every sector on
//! the image must hold the last pass written to it.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/stream.rs"]
mod stream;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use daemon::*;
use stream::{
    assert_no_io_error, assert_stream_ends_consistent, info_pid, restarts, serving as backend_pid,
    stream_consistent, stream_mismatch,
};

/// A small xorshift for kill timing (deterministic per run seed).
struct Jitter(u64);
impl Jitter {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo)
    }
}

/// `name` from the release build (`target/release`), which scripts/test.sh builds too.
fn release_bin(name: &str) -> std::path::PathBuf {
    let debug = bin(name);
    let target = debug.parent().and_then(|p| p.parent()).expect("target dir");
    let p = target.join("release").join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (scripts/test.sh does: cargo build --release -p bulkhead-backends --bin bulkhead-blk)",
        p.display()
    );
    p
}

fn disk_vm(d: &Bulkheadd, name: &str, img: &Path, cmdline: &str) {
    disk_vm_with(d, name, img, cmdline, "");
}

/// A VM with one two-queue disk on `img`, whose `[[disks]]` table also holds `policy`.
fn disk_vm_with(d: &Bulkheadd, name: &str, img: &Path, cmdline: &str, policy: &str) {
    let extra = format!(
        "[[disks]]\npath = \"{}\"\nserial = \"stream\"\nqueues = 2\n{policy}",
        img.display()
    );
    let cfg = d.config_with(name, cmdline, "256M", 2, &extra);
    d.create_config(name, &cfg);
}

/// Waits for the VM's console to reach `needle`, returning the console text.
fn console_text(con: &Running, needle: &str, deadline: Duration) -> String {
    assert!(
        con.stdout.wait_for(needle, deadline),
        "no '{needle}'\n{}",
        con.stdout.text()
    );
    con.stdout.text()
}

#[test]
fn disk_backend_killed_50_times_loses_nothing() {
    let test = "disk_backend_killed_50_times_loses_nothing";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("rs-kill", Some(&runner_uids(64500)), false);
    let (dir, img) = temp_image("restart-kill", 8);
    // Enough passes to outlast 50 kills; `echo` keeps the VM up so the console can be read.
    let passes = 1_000_000u64;
    disk_vm(&d, "stream", &img, &format!("blk blk-queues=2 blk-stream=3:0:2048:{passes} blk-stream-verify=3:0:2048:{passes} echo exit=0"));
    let con = d.console("stream");
    console_text(&con, "blk0:", STEP);
    let mut jitter = Jitter(0x5eed_1234_abcd_0001);
    let mut kills = 0;
    let mut takeovers = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    assert!(
        wait_until(STEP, || info_pid(&d, "stream", "standby pid ").is_some()),
        "the disk got no standby backend\n{}",
        d.cli(&["info", "stream"]).stdout
    );
    while kills < 50 {
        assert!(
            Instant::now() < deadline,
            "only {kills} kills in time\n{}",
            d.dump()
        );

        let Some(pid) = backend_pid(&d, "stream") else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        std::thread::sleep(Duration::from_millis(jitter.next_ms(300, 700)));
        // A ready standby (info names it) is the one that takes over.
        let standby = info_pid(&d, "stream", "standby pid ");
        let count = restarts(&d, "stream");
        send_signal(pid, libc::SIGKILL);
        kills += 1;
        // Wait for the replacement to be serving (the runner set it up: the restart is
        // counted) before the next kill.
        let replaced = wait_until(STEP, || {
            backend_pid(&d, "stream").is_some_and(|p| p != pid) && restarts(&d, "stream") > count
        });
        assert!(replaced, "no new backend after kill {kills}\n{}", d.dump());
        if let Some(s) = standby {
            assert_eq!(
                backend_pid(&d, "stream"),
                Some(s),
                "kill {kills}: the standby did not take over\n{}",
                d.daemon_log()
            );
            takeovers += 1;
        }
    }
    eprintln!("{kills} kills: the standby took over {takeovers} times");
    assert!(
        takeovers >= kills / 2,
        "a standby was ready for only {takeovers} of {kills} kills\n{}",
        d.daemon_log()
    );
    // Let the stream run on the last backend for a moment, then stop the VM mid-stream.
    std::thread::sleep(Duration::from_millis(500));
    let text = assert_no_io_error(&con);
    assert!(
        !text.contains("timed out") && !text.contains("needs reset"),
        "{text}"
    );
    let backend_log = std::fs::read_to_string(d.disk_log_path("stream", 0)).unwrap_or_default();
    let runner_log = d.log("stream");
    let out = d.cli(&["destroy", "stream"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    // Every backend took over the runner's in-flight region (the first one found it fresh).
    let took_over = backend_log
        .matches("tracking in-flight requests in the frontend's region")
        .count();
    assert!(
        took_over > 50,
        "{took_over} backends were handed the in-flight region\n{backend_log}"
    );
    assert!(
        runner_log.contains("in-flight region:")
            && runner_log.contains("resubmits what the in-flight region holds"),
        "{runner_log}"
    );
    let resubmitted: usize = backend_log
        .lines()
        .filter_map(|l| l.split("resubmitting ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse::<usize>().ok())
        .sum();
    eprintln!("{kills} kills: {resubmitted} in-flight requests resubmitted by the next backend");
    // Nothing lost, stale or doubled: every sector holds the one write issued for it.
    let (lo, hi) = stream_consistent(&img, 3, 0, 2048).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        lo >= 2,
        "the stream made progress across the kills (passes {lo}..={hi})"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn disk_backend_upgraded_10_times_loses_nothing() {
    let test = "disk_backend_upgraded_10_times_loses_nothing";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("rs-upg", Some(&runner_uids(64600)), false);
    let (dir, img) = temp_image("restart-upgrade", 8);
    // Two different builds of the backend: this profile's and the release build
    // (scripts/test.sh builds both), copied so the daemon's record names each.
    let a = dir.join("bulkhead-blk-a");
    let b = dir.join("bulkhead-blk-b");
    let release = release_bin("bulkhead-blk");
    std::fs::copy(bin("bulkhead-blk"), &a).expect("copy");
    std::fs::copy(&release, &b).expect("copy");
    assert_ne!(
        std::fs::read(&a).expect("read"),
        std::fs::read(&b).expect("read"),
        "the two builds are the same file"
    );
    let passes = 1_000_000u64;
    disk_vm(&d, "upg", &img, &format!("blk blk-queues=2 blk-stream=4:0:2048:{passes} blk-stream-verify=4:0:2048:{passes} echo exit=0"));
    let con = d.console("upg");
    console_text(&con, "blk0:", STEP);
    for i in 0..10 {
        let target = if i % 2 == 0 { &a } else { &b };
        let out = d.cli(&[
            "device-upgrade",
            "upg",
            "disk0",
            "--binary",
            target.to_str().expect("path"),
        ]);
        assert_eq!(
            out.code,
            Some(0),
            "upgrade {i}\n{}\n{}",
            out.dump(),
            d.dump()
        );
        let info = d.cli(&["info", "upg"]);
        assert!(
            info.stdout.contains(target.to_str().expect("path")),
            "info names the serving binary\n{}",
            info.stdout
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_no_io_error(&con);
    let out = d.cli(&["destroy", "upg"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let (lo, hi) = stream_consistent(&img, 4, 0, 2048).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        lo >= 2,
        "the stream made progress across the upgrades (passes {lo}..={hi})"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn crash_looping_backend_is_marked_failed_and_the_vm_keeps_running() {
    let test = "crash_looping_backend_is_marked_failed_and_the_vm_keeps_running";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("rs-fail", Some(&runner_uids(64700)), false);
    let (dir, img) = temp_image("restart-fail", 8);
    disk_vm(&d, "loop", &img, "blk blk-write=1:0:64 ticks=100");
    let con = d.console("loop");
    console_text(&con, "tick 1", STEP);
    // A "backend" that exits at once on every start.
    let crasher = dir.join("crasher");
    std::fs::write(&crasher, "#!/bin/sh\nexit 3\n").expect("write");
    std::fs::set_permissions(
        &crasher,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let out = d.cli(&[
        "device-upgrade",
        "loop",
        "disk0",
        "--binary",
        crasher.to_str().expect("path"),
    ]);
    assert_ne!(
        out.code,
        Some(0),
        "an upgrade to a crashing binary does not succeed\n{}",
        out.dump()
    );
    let failed = wait_until(Duration::from_secs(60), || {
        d.cli(&["info", "loop"]).stdout.contains("FAILED")
    });
    let info = d.cli(&["info", "loop"]).stdout;
    assert!(
        failed,
        "the device was never marked failed\n{info}\n{}",
        d.dump()
    );
    assert!(
        info.contains("crashed 5 times in a row"),
        "info says why\n{info}"
    );
    // The VM itself keeps running: the guest still ticks.
    let before = con.stdout.text().matches("tick ").count();
    assert!(
        wait_until(STEP, || con.stdout.text().matches("tick ").count()
            > before + 3),
        "the guest stopped"
    );
    assert!(
        d.row("loop").is_some_and(|r| r.contains("running")),
        "{:?}",
        d.row("loop")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn runner_resumes_after_qemu_storage_daemon_restarts() {
    let test = "runner_resumes_after_qemu_storage_daemon_restarts";
    if !kvm_available(test) {
        return;
    }
    let Some(qsd) = tool(test, "qemu-storage-daemon") else {
        return;
    };
    let (dir, img) = temp_image("restart-qsd", 8);
    let sock = dir.join("qsd.sock");
    let start_qsd = || {
        let _ = std::fs::remove_file(&sock);
        let child = std::process::Command::new(&qsd)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file,filename={}",
                img.display()
            ))
            .args([
                "--blockdev",
                "driver=raw,node-name=disk,file=file",
                "--export",
            ])
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        assert!(
            wait_until(Duration::from_secs(10), || sock.exists()),
            "no socket"
        );
        child
    };
    let mut qsd_child = start_qsd();
    let passes = 3000u64;
    let mut c = runner_guest(
        &format!("blk blk-stream=6:0:2048:{passes} blk-stream-verify=6:0:2048:{passes} exit=0"),
        1,
        "256M",
    );
    c.arg("--disk-socket").arg(&sock);
    let mut r = Running::spawn(c);
    assert!(r.stdout.wait_for("blk0:", STEP), "{}", r.stdout.text());
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        let _ = qsd_child.kill();
        let _ = qsd_child.wait();
        std::thread::sleep(Duration::from_millis(300));
        qsd_child = start_qsd();
        assert!(
            !r.stdout.text().contains("blk-stream: done"),
            "the stream ended too early"
        );
    }
    let status = r.wait(Duration::from_secs(600));
    let _ = qsd_child.kill();
    let _ = qsd_child.wait();
    let text = r.stdout.text();
    assert_eq!(status.code(), Some(0), "{text}\n{}", r.stderr.text());
    assert!(
        text.contains(&format!(
            "blk-stream: done {passes} passes, 2048 sectors, 0 errors"
        )),
        "{text}"
    );
    assert!(text.contains("blk-stream-verify: ok"), "{text}");
    assert!(
        r.stderr.text().contains("resumes at index"),
        "the runner says how it resumed\n{}",
        r.stderr.text()
    );
    assert!(
        r.stderr
            .text()
            .contains("lacks VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: resuming from the used index"),
        "the runner says it falls back for a backend without an in-flight log\n{}",
        r.stderr.text()
    );
    assert_eq!(stream_mismatch(&img, 6, 0, 2048, passes), None);
    let _ = std::fs::remove_dir_all(dir);
}

/// Creates VM `name` streaming writes (seed `seed`, endless passes) to a two-queue disk on
/// `img` whose `[[disks]]` table also holds `policy`; once the guest has found the disk,
/// checks that `info` words the policy as `shown`, and returns the console.
fn stream_vm(
    d: &Bulkheadd,
    name: &str,
    img: &Path,
    seed: u64,
    policy: &str,
    shown: &str,
) -> Running {
    let cmdline = format!("blk blk-queues=2 blk-stream={seed}:0:2048:1000000 echo exit=0");
    disk_vm_with(d, name, img, &cmdline, policy);
    let con = d.console(name);
    console_text(&con, "blk0:", STEP);
    let info = d.cli(&["info", name]).stdout;
    assert!(info.contains(shown), "info shows the policy\n{info}");
    con
}

/// Kills the VM's disk backend and waits for bulkheadd to record the next restart.
fn kill_and_wait_replaced(d: &Bulkheadd, vm: &str) -> i32 {
    let pid = backend_pid(d, vm).expect("a backend serves the disk");
    send_signal(pid, libc::SIGKILL);
    let replaced = wait_until(STEP, || backend_pid(d, vm).is_some_and(|p| p != pid));
    assert!(replaced, "no new backend after the kill\n{}", d.dump());
    pid
}

#[test]
fn restart_policy_never_leaves_the_device_stopped_until_device_restart() {
    let test = "restart_policy_never_leaves_the_device_stopped_until_device_restart";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("rs-never", Some(&runner_uids(64800)), false);
    let (dir, img) = temp_image("restart-never", 8);
    let con = stream_vm(
        &d,
        "never",
        &img,
        7,
        "restart = \"never\"\n",
        "restart never",
    );
    std::thread::sleep(Duration::from_millis(300));
    let pid = backend_pid(&d, "never").expect("backend");
    send_signal(pid, libc::SIGKILL);
    let stopped = wait_until(STEP, || {
        d.cli(&["info", "never"])
            .stdout
            .contains("STOPPED: not restarted: restart policy is 'never'")
    });
    assert!(
        stopped,
        "info never said the device stopped\n{}\n{}",
        d.cli(&["info", "never"]).stdout,
        d.dump()
    );
    assert_eq!(
        backend_pid(&d, "never"),
        None,
        "a backend was started anyway"
    );
    assert!(
        d.row("never").is_some_and(|r| r.contains("running")),
        "the VM keeps running with the device stalled: {:?}",
        d.row("never")
    );
    // An administrator starts it again; the stream resumes where it stalled.
    let out = d.cli(&["device-restart", "never", "disk0"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    let info = d.cli(&["info", "never"]).stdout;
    assert!(!info.contains("STOPPED"), "{info}");
    let new_pid = backend_pid(&d, "never").expect("a backend after device-restart");
    assert_ne!(new_pid, pid);
    let log = d.disk_log_path("never", 0);
    assert!(
        wait_until(STEP, || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.matches("first request completed").count() >= 2)),
        "the revived backend completed no request\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = assert_stream_ends_consistent(&d, &con, "never", &img, 7);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn restart_limit_and_on_failure_stop_a_device_and_device_restart_revives_it() {
    let test = "restart_limit_and_on_failure_stop_a_device_and_device_restart_revives_it";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("rs-limit", Some(&runner_uids(64900)), false);
    let (dir, img) = temp_image("restart-limit", 8);
    let con = stream_vm(
        &d,
        "limit",
        &img,
        8,
        "restart = \"on-failure\"\nrestart_limit = 3\n",
        "restart on-failure, at most 3/min",
    );
    // Three kills are within the limit: each is restarted.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        kill_and_wait_replaced(&d, "limit");
    }
    // The fourth within the minute marks the device failed; the VM runs on.
    std::thread::sleep(Duration::from_millis(300));
    send_signal(backend_pid(&d, "limit").expect("backend"), libc::SIGKILL);
    let failed = wait_until(STEP, || {
        d.cli(&["info", "limit"])
            .stdout
            .contains("more than its restart_limit of 3")
    });
    assert!(failed, "{}\n{}", d.cli(&["info", "limit"]).stdout, d.dump());
    assert!(d.row("limit").is_some_and(|r| r.contains("running")));
    let out = d.cli(&["device-restart", "limit", "disk0"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(!d.cli(&["info", "limit"]).stdout.contains("FAILED"));

    // on-failure: a backend that exits cleanly is not restarted. (An ELF: bulkheadd execs
    // backends by fd, which a `#!` script cannot survive.)
    let clean = Path::new("/bin/true");
    let out = d.cli(&[
        "device-upgrade",
        "limit",
        "disk0",
        "--binary",
        clean.to_str().expect("path"),
    ]);
    assert_ne!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stderr
            .contains("exited cleanly and the restart policy is 'on-failure'"),
        "{}",
        out.dump()
    );
    // Back to the real backend: the stream finishes what it started.
    let out = d.cli(&[
        "device-upgrade",
        "limit",
        "disk0",
        "--binary",
        bin("bulkhead-blk").to_str().expect("path"),
    ]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    let info = d.cli(&["info", "limit"]).stdout;
    assert!(
        !info.contains("STOPPED") && !info.contains("FAILED"),
        "{info}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = assert_stream_ends_consistent(&d, &con, "limit", &img, 8);
    let _ = std::fs::remove_dir_all(dir);
}

/// Live processes running `exe`.
fn processes_of(exe: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|t| t == exe)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_backend_that_never_answers_is_cut_off_and_the_device_is_moved_back() {
    let test = "a_backend_that_never_answers_is_cut_off_and_the_device_is_moved_back";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("rs-silent", Some(&runner_uids(65000)), false);
    let (dir, img) = temp_image("restart-silent", 8);
    let con = stream_vm(&d, "silent", &img, 9, "", "restart always");
    // Takes the connection, says it is ready, never answers a message.
    let silent = Path::new(env!("CARGO_BIN_EXE_bulkhead-test-silent-backend"));
    let out = d.cli(&[
        "device-upgrade",
        "silent",
        "disk0",
        "--binary",
        silent.to_str().expect("path"),
    ]);
    assert_ne!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    for says in [
        "backend was refused and ended",
        "did not finish the vhost-user handshake within 5s",
    ] {
        assert!(out.stderr.contains(says), "lacks '{says}'\n{}", out.dump());
    }
    // The runner is not wedged (its control channel carries the next reconnect), and
    // bulkheadd's retry with the silent binary is replaced by the real backend again.
    let out = d.cli(&[
        "device-upgrade",
        "silent",
        "disk0",
        "--binary",
        bin("bulkhead-blk").to_str().expect("path"),
    ]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(
        wait_until(STEP, || processes_of(silent).is_empty()),
        "silent backends left running: {:?}\n{}",
        processes_of(silent),
        d.dump()
    );
    let log = d.daemon_log();
    assert!(
        log.contains("refused: disk0: the backend did not finish the vhost-user handshake"),
        "bulkheadd says why it ended the silent backend\n{log}"
    );
    let info = d.cli(&["info", "silent"]).stdout;
    assert!(
        !info.contains("FAILED") && !info.contains("STOPPED"),
        "{info}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = assert_stream_ends_consistent(&d, &con, "silent", &img, 9);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn random_writes_completing_out_of_order_survive_backend_kills() {
    use common::rand_replay::{first_difference, RandToken};
    let test = "random_writes_completing_out_of_order_survive_backend_kills";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("rs-rand", Some(&runner_uids(65100)), false);
    let (dir, img) = temp_image("restart-rand", 9);
    // 32 random 4 KiB writes in flight on each of two queues, completing in any order,
    // then random reads, over 8 MiB; the test kills the serving backend while they run.
    let area = (0u64, 16384u64);
    let writes = RandToken {
        seed: 21,
        count: 400_000,
        bs: 4096,
        area,
    };
    let reads = RandToken {
        seed: 22,
        count: 100_000,
        bs: 4096,
        area,
    };
    let cmdline = format!(
        "blk blk-queues=2 blk-event-idx blk-rand-area={}:{} blk-rand-write={}:{}:32:4k blk-rand={}:{}:32:4k echo exit=0",
        area.0, area.1, writes.seed, writes.count, reads.seed, reads.count
    );
    disk_vm(&d, "rand", &img, &cmdline);
    let con = d.console("rand");
    console_text(&con, "blk0:", STEP);
    let mut jitter = Jitter(0x5eed_1234_abcd_0002);
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    // Kill while the random writes run (and on into the reads), at most 30 times.
    while kills < 30 && !con.stdout.text().contains("blk-rand-checksum:") {
        assert!(
            Instant::now() < deadline,
            "only {kills} kills in time\n{}",
            d.dump()
        );
        let Some(pid) = backend_pid(&d, "rand") else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        // Past the 250 ms within which a death counts as a crash at start.
        std::thread::sleep(Duration::from_millis(jitter.next_ms(300, 600)));
        send_signal(pid, libc::SIGKILL);
        kills += 1;
        let replaced = wait_until(STEP, || backend_pid(&d, "rand").is_some_and(|p| p != pid));
        assert!(replaced, "no new backend after kill {kills}\n{}", d.dump());
    }
    // The read pass's perf line follows its checksum line: waiting for it, the checksum
    // line is whole (console output arrives in pieces).
    let text = console_text(&con, "blk-perf: randread", Duration::from_secs(180));
    let backend_log = std::fs::read_to_string(d.disk_log_path("rand", 0)).unwrap_or_default();
    let out = d.cli(&["destroy", "rand"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let resubmitted: usize = backend_log
        .lines()
        .filter_map(|l| l.split("resubmitting ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse::<usize>().ok())
        .sum();
    eprintln!("{kills} kills during random I/O: {resubmitted} in-flight requests resubmitted");
    assert!(
        kills >= 3,
        "the random I/O outran the kills ({kills})\n{text}"
    );
    let line = format!(
        "blk-rand: write {n} requests, {n} ok, 0 errors, status 0",
        n = writes.count
    );
    assert!(text.contains(&line), "lacks '{line}'\n{text}");
    assert!(!text.contains("timed out"), "{text}");
    // Nothing lost, stale or doubled out of order: the image is the replay of the writes.
    let image = std::fs::read(&img).expect("image");
    let mut want = vec![0u8; image.len()];
    writes.apply_writes(&mut want);
    if let Some(diff) = first_difference(&image, &want) {
        panic!("after {kills} kills the image differs from the replay: {diff}\n{backend_log}");
    }
    let sum = format!("blk-rand-checksum: {:#018x}", reads.read_checksum(&want));
    assert!(
        text.contains(&sum),
        "reads returned other data: want '{sum}'\n{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
