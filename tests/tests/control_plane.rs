//! The control plane keeps its promises across its own restarts and under slow backends:
//! a re-adopted VM's devices are supervised as before (restarts, standbys), a backend that
//! died while `bulkheadd` was down is restarted when it comes back, runner commands are
//! answered while a device's backend takes seconds to set up, and no vCPU waits on a
//! backend. Device verbs have policy rules of their own.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/stream.rs"]
mod stream;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use daemon::*;
use stream::*;

#[test]
fn readopted_vm_keeps_restarts_and_standbys() {
    let test = "readopted_vm_keeps_restarts_and_standbys";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let mut d = Bulkheadd::start("cp-adopt", Some(&runner_uids(65400)), false);
    let (dir, img) = temp_image("cp-adopt", 8);
    let con = stream_vm(&d, "adopt", &img, 21, "", "");
    assert!(
        wait_until(STEP, || info_pid(&d, "adopt", "standby pid ").is_some()),
        "no standby before the restart\n{}",
        d.dump()
    );
    // bulkheadd goes down; the serving backend is killed while nobody watches.
    let before = wait_serving(&d, "adopt");
    d.terminate();
    drop(con);
    send_signal(before, libc::SIGKILL);
    assert!(
        wait_until(STEP, || !Path::new(&format!("/proc/{before}")).exists()),
        "backend {before} survived SIGKILL"
    );
    d.launch();
    // It is restarted as soon as bulkheadd is back, and gets a standby again.
    assert!(
        wait_until(STEP, || serving(&d, "adopt").is_some_and(|p| p != before)),
        "the backend killed while bulkheadd was down was not restarted\n{}",
        d.dump()
    );
    let info = d.cli(&["info", "adopt"]).stdout;
    assert!(info.contains("ended while bulkheadd was down"), "{info}");
    assert!(
        wait_until(STEP, || info_pid(&d, "adopt", "standby pid ").is_some()),
        "no standby after the restart\n{}",
        d.cli(&["info", "adopt"]).stdout
    );
    let con = d.console("adopt");
    // Ten kills: each is restarted, by the standby (one is kept ready before each kill).
    for kill in 1..=10 {
        let pid = wait_serving(&d, "adopt");
        let count = restarts(&d, "adopt");
        assert!(
            wait_until(STEP, || info_pid(&d, "adopt", "standby pid ").is_some()),
            "kill {kill}: no standby\n{}",
            d.cli(&["info", "adopt"]).stdout
        );
        let standby = info_pid(&d, "adopt", "standby pid ");
        send_signal(pid, libc::SIGKILL);
        assert!(
            wait_until(STEP, || serving(&d, "adopt").is_some_and(|p| p != pid)
                && restarts(&d, "adopt") > count),
            "kill {kill}: not restarted\n{}",
            d.dump()
        );
        assert_eq!(
            serving(&d, "adopt"),
            standby,
            "kill {kill}: the standby did not take over\n{}",
            d.daemon_log()
        );
    }
    assert!(
        restarts(&d, "adopt") >= 11,
        "{}",
        d.cli(&["info", "adopt"]).stdout
    );
    // The stream goes on across all of it.
    assert_stream_moves(&con);
    stream_verifies(&d, &con, "adopt", &img, 21);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn commands_and_vcpus_do_not_wait_on_a_backend_setup() {
    let test = "commands_and_vcpus_do_not_wait_on_a_backend_setup";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("cp-slow", Some(&runner_uids(65500)), false);
    let (dir, img) = temp_image("cp-slow", 8);
    let extra = format!("[[disks]]\npath = \"{}\"\n", img.display());
    // Each tick reads a register of the disk: a vCPU that waited on the backend would stop.
    let cfg = d.config_with("slow", "blk ticks=20 ticks-touch-blk", "256M", 2, &extra);
    d.create_config("slow", &cfg);
    let con = d.console("slow");
    assert!(con.stdout.wait_for("tick 5", STEP), "{}", d.dump());
    // A backend that takes the connection and never answers: the runner spends 5 s on it.
    let silent = Path::new(env!("CARGO_BIN_EXE_bulkhead-test-silent-backend"));
    let upgrade = {
        let cmd = d.cli_cmd(&[
            "device-upgrade",
            "slow",
            "disk0",
            "--binary",
            silent.to_str().expect("path"),
        ]);
        std::thread::spawn(move || run_complete(cmd, CLI))
    };
    assert!(
        wait_until(STEP, || d
            .log("slow")
            .contains("disk0: a new backend; replaying the setup to it")),
        "the runner never started the reconnect\n{}",
        d.dump()
    );
    let during = Instant::now();
    // A pause issued meanwhile is answered at once, not after the reconnect.
    let t = Instant::now();
    let out = d.cli(&["pause", "slow"]);
    let pause_took = t.elapsed();
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    let out = d.cli(&["unpause", "slow"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    eprintln!("pause during a backend's setup answered in {pause_took:?}");
    assert!(
        pause_took < Duration::from_secs(1),
        "pause waited for the reconnect: {pause_took:?}"
    );
    // The vCPU keeps ticking (and touching the disk's registers) while the runner waits.
    let ticks_now = |c: &Running| {
        c.stdout
            .text()
            .lines()
            .filter_map(|l| l.strip_prefix("tick ")?.trim().parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    };
    let first = ticks_now(&con);
    assert!(
        wait_until(Duration::from_secs(3), || ticks_now(&con) >= first + 20),
        "the vCPU stalled while the backend was set up: tick {} after {:?}\n{}",
        ticks_now(&con),
        during.elapsed(),
        d.log("slow")
    );
    assert!(
        during.elapsed() < Duration::from_secs(5),
        "the check ran after the setup deadline: it proves nothing ({:?})",
        during.elapsed()
    );
    let out = upgrade.join().expect("upgrade thread");
    assert_ne!(
        out.code,
        Some(0),
        "the silent backend was accepted\n{}",
        out.dump()
    );
    // Back to the real backend; the VM is intact.
    let out = d.cli(&[
        "device-upgrade",
        "slow",
        "disk0",
        "--binary",
        bin("bulkhead-blk").to_str().expect("path"),
    ]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    let out = d.cli(&["destroy", "slow"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn device_verbs_are_authorized_by_their_own_rules() {
    let test = "device_verbs_are_authorized_by_their_own_rules";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    const OWNER: u32 = 1000;
    let policy = format!("[admins]\nuids = [0]\n{}", runner_uids(65600));
    let d = Bulkheadd::start("cp-rules", Some(&policy), false);
    let (dir, img) = temp_image("cp-rules", 8);
    let extra = format!("[[disks]]\npath = \"{}\"\n", img.display());
    let cfg = d.config_with("owned", "blk ticks=100", "256M", 1, &extra);
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, format!("owner = {OWNER}\n{text}")).expect("config");
    d.create_config("owned", &cfg);
    // The owner may restart its device, but not pick a program for bulkheadd to run.
    let out = d.cli_as(OWNER, &["device-restart", "owned", "disk0"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    let out = d.cli_as(
        OWNER,
        &[
            "device-upgrade",
            "owned",
            "disk0",
            "--binary",
            bin("bulkhead-blk").to_str().expect("path"),
        ],
    );
    assert_ne!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stderr.contains("rule 'device-upgrade'"),
        "the refusal names the device-upgrade rule\n{}",
        out.dump()
    );
    // Another user may do neither, and is told which verb was refused.
    let out = d.cli_as(OWNER + 1, &["device-restart", "owned", "disk0"]);
    assert_ne!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stderr.contains("rule 'owner'") && out.stderr.contains("device-restart"),
        "{}",
        out.dump()
    );
    let out = d.cli(&["destroy", "owned"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_1_gib_disk_is_written_at_its_last_sector() {
    let test = "a_1_gib_disk_is_written_at_its_last_sector";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("cp-big", Some(&runner_uids(66300)), false);
    let (dir, img) = temp_image("cp-big", 1024);
    let last = (1u64 << 30) / 512 - 8;
    let extra = format!("[[disks]]\npath = \"{}\"\n", img.display());
    let cmdline = format!("blk blk-write=5:{last}:8 blk-verify=5:{last}:8 exit=0");
    let cfg = d.config_with("big", &cmdline, "256M", 1, &extra);
    d.create_config("big", &cfg);
    // The guest exits 0 only if every request succeeded.
    let row = d.wait_row("big", "stopped");
    assert!(
        row.contains("exit 0") || row.contains("status 0"),
        "{row}\n{}",
        d.dump()
    );
    // The last sector holds the pattern (word 0 = sector number, word 2 = seed).
    let data = std::fs::read(&img).expect("image");
    let s = &data[(last as usize + 7) * 512..(last as usize + 8) * 512];
    let word = |i: usize| u64::from_le_bytes(s[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    assert_eq!(word(0), last + 7, "the last sector was not written");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn nobody_but_root_reads_the_state_dir() {
    let test = "nobody_but_root_reads_the_state_dir";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    const OWNER: u32 = 1000;
    let d = Bulkheadd::start("cp-perms", Some(&runner_uids(66400)), false);
    let (dir, img) = temp_image("cp-perms", 8);
    let extra = format!("[[disks]]\npath = \"{}\"\n", img.display());
    let cfg = d.config_with(
        "secret",
        "blk ticks=100 secret-token=hunter2",
        "128M",
        1,
        &extra,
    );
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, format!("owner = {OWNER}\n{text}")).expect("config");
    d.create_config("secret", &cfg);
    // Every file bulkheadd keeps (records, logs, sockets), tried as the VM's owner and as
    // another user: none can be read, and no directory but the root can be listed.
    let mut files = Vec::new();
    let mut dirs = vec![d.state.clone()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let path = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() && !path.ends_with("root") => dirs.push(path),
                Ok(t) if !t.is_dir() => files.push(path),
                _ => {}
            }
        }
    }
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().ends_with("vms/secret.toml")),
        "{files:?}"
    );
    for uid in [OWNER, OWNER + 1] {
        for f in &files {
            let out = std::process::Command::new("cat")
                .arg(f)
                .uid(uid)
                .gid(uid)
                .output()
                .expect("cat");
            assert!(
                !out.status.success(),
                "uid {uid} read {}:\n{}",
                f.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        for sub in ["vms", "logs", "run"] {
            let out = std::process::Command::new("ls")
                .arg(d.state.join(sub))
                .uid(uid)
                .gid(uid)
                .output()
                .expect("ls");
            assert!(!out.status.success(), "uid {uid} listed {sub}");
        }
    }
    // The owner still reaches its VM through bulkheadd.
    let out = d.cli_as(OWNER, &["info", "secret"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    let out = d.cli(&["destroy", "secret"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_vm_name_of_64_characters_works() {
    let test = "a_vm_name_of_64_characters_works";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("cp-long", Some(&runner_uids(66500)), false);
    let (dir, img) = temp_image("cp-long", 8);
    let name = "a-very-long-vm-name-that-is-exactly-sixty-four-characters-long-x";
    assert_eq!(name.len(), 64);
    let extra = format!("[[disks]]\npath = \"{}\"\n", img.display());
    let cfg = d.config_with(name, "blk ticks=100", "128M", 1, &extra);
    d.create_config(name, &cfg);
    d.wait_row(name, "running");
    let out = d.cli(&["destroy", name]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_connection_flood_from_a_user_leaves_the_daemon_answering() {
    let test = "a_connection_flood_from_a_user_leaves_the_daemon_answering";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    // The open-file limit the review ran under: the flood alone is 5x more than it allows.
    let d = Bulkheadd::start_with("cp-flood", Some(&runner_uids(66800)), false, Some(1024));
    let (dir, img) = temp_image("cp-flood", 8);
    let _con = stream_vm(&d, "flood", &img, 41, "", "");
    let before = wait_serving(&d, "flood");
    // 5,000 connections from `nobody` (no rights in the policy) that never say hello.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/flood_connect.py");
    let mut cmd = std::process::Command::new("python3");
    // The hello deadline is 5 s: 12 s from the first connect leaves room for a slow
    // machine, not for connections that wait on the daemon's descriptors.
    cmd.arg(&script).arg(&d.sock).args(["65534", "5000", "12"]);
    let flood = Running::spawn(cmd);
    assert!(
        flood
            .stdout
            .wait_for("connected 5000", Duration::from_secs(30)),
        "the flood could not connect\n{}\n{}",
        flood.stdout.text(),
        flood.stderr.text()
    );
    // Root is answered at once.
    let asked = Instant::now();
    let out = d.cli(&["list"]);
    let took = asked.elapsed();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(
        took < Duration::from_secs(1),
        "root's list took {took:?} under the flood"
    );
    // A backend killed during the flood is replaced: the daemon has descriptors to spare.
    send_signal(before, libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(20), || serving(&d, "flood")
            .is_some_and(|p| p != before)),
        "the killed backend was not replaced during the flood\n{}",
        d.dump()
    );
    let rss_kib: u64 = proc_status_field(d.pid(), "VmRSS:")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("bulkheadd's VmRSS");
    assert!(
        rss_kib < 100 * 1024,
        "bulkheadd uses {rss_kib} KiB under the flood"
    );
    // Every connection is closed: over the limits at once, the rest at the hello deadline.
    let mut flood = flood;
    let status = flood.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "not every flood connection was closed\n{}",
        flood.stdout.text()
    );
    eprintln!(
        "{test}: root's list took {took:?}; bulkheadd RSS {rss_kib} KiB; flood: {}",
        flood.stdout.text().replace('\n', "; ")
    );
    assert!(
        d.daemon_log().contains("refused"),
        "the daemon did not log the refusals\n{}",
        d.daemon_log()
    );
    let out = d.cli(&["destroy", "flood"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn images_are_opened_only_beneath_the_allowed_dirs_and_only_files_or_disks() {
    let test = "images_are_opened_only_beneath_the_allowed_dirs_and_only_files_or_disks";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let (dir, img) = temp_image("cp-images", 8);
    let allowed = dir.join("allowed");
    std::fs::create_dir_all(&allowed).expect("allowed dir");
    let guest_dir = test_guest()
        .parent()
        .expect("the test guest's dir")
        .to_path_buf();
    let policy = format!(
        "{}[images]\nallowed = [\"{}\", \"{}\"]\n",
        runner_uids(66900),
        guest_dir.display(),
        allowed.display()
    );
    let d = Bulkheadd::start("cp-images", Some(&policy), false);
    // A secret outside, reached by a symlink inside.
    let secret = dir.join("secret");
    std::fs::write(&secret, b"SECRET").expect("secret");
    std::os::unix::fs::symlink(&secret, allowed.join("link.img")).expect("symlink");
    nix_mkfifo(&allowed.join("fifo.img"));
    mknod_char(&allowed.join("null.img"), 1, 3);
    std::fs::rename(&img, allowed.join("disk.img")).expect("move the image in");
    let cases = [
        ("link.img", "denied by rule 'images.allowed'"),
        ("fifo.img", "is a FIFO"),
        ("null.img", "is a character device"),
    ];
    for (file, why) in cases {
        let extra = format!("[[disks]]\npath = \"{}\"\n", allowed.join(file).display());
        let cfg = d.config_with("img", "blk exit=0", "64M", 1, &extra);
        let out = d.cli(&["create", &cfg.display().to_string()]);
        assert_eq!(out.code, Some(3), "{file}: {}", out.dump());
        assert!(out.stderr.contains(why), "{file}: {}", out.dump());
        assert!(d.vm("img").is_none(), "{file}: a VM was left behind");
    }
    assert_eq!(std::fs::read(&secret).expect("secret"), b"SECRET");
    // The image itself, below the allowed dir, is served.
    let extra = format!(
        "[[disks]]\npath = \"{}\"\n",
        allowed.join("disk.img").display()
    );
    let cfg = d.config_with(
        "img",
        "blk blk-write=3:0:8 blk-verify=3:0:8 exit=0",
        "64M",
        1,
        &extra,
    );
    d.create_config("img", &cfg);
    let row = d.wait_row("img", "stopped");
    assert!(
        row.contains("exit 0") || row.contains("status 0"),
        "{row}\n{}",
        d.dump()
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn nix_mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "mkfifo");
}

fn mknod_char(path: &Path, major: u32, minor: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mknod reads a NUL-terminated path that outlives the call.
    let r = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(r, 0, "mknod");
}
