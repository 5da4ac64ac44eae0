//! `bulkhead save` and `bulkhead restore` with real KVM and real backends: a guest streaming
//! checksummed, sequence-numbered writes (`blk-stream`) is saved mid-stream, destroyed,
//! restored with fresh processes, and must finish its stream and verify it (nothing lost,
//! nothing doubled); a paused VM saved, restored and saved again gives the same guest RAM;
//! every bad snapshot is refused with status 2 and nothing changes.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/stream.rs"]
mod stream;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use core_vmm::snapshot::crc::crc32;
use core_vmm::snapshot::format::SnapshotReader;
use daemon::*;
use stream::{assert_no_io_error, stream_consistent};

/// Long enough for a stream that is still going when it is saved.
const STREAM_DONE: Duration = Duration::from_secs(240);

/// Creates `name` (128 MiB, `vcpus`) running the test guest's `cmdline` with one disk on
/// `img` (serial "snap"), `toml` before its table, and waits for its echo prompt.
fn echo_vm(
    d: &Bulkheadd,
    name: &str,
    img: &Path,
    toml: &str,
    cmdline: &str,
    vcpus: u32,
) -> Running {
    let extra = format!(
        "{toml}[[disks]]\npath = \"{}\"\nserial = \"snap\"\n",
        img.display()
    );
    let cfg = d.config_with(name, cmdline, "128M", vcpus, &extra);
    d.create_config(name, &cfg);
    let con = d.console(name);
    assert!(
        con.stdout.wait_for("echo: ready", STEP),
        "{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    con
}

/// The guest RAM a snapshot holds: its size, bytes written, and the CRC-32 of all of it.
fn snapshot_ram(path: &Path) -> (u64, u64, u32) {
    let f = std::fs::File::open(path).expect("snapshot");
    let r = SnapshotReader::open(&f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut ram = vec![0u8; r.memory() as usize];
    r.fill_ram(&f, &mut ram).expect("snapshot RAM");
    (r.memory(), r.ram_bytes(), crc32(&ram))
}

/// The state dir's files (names and contents), to show a refused restore changed nothing.
fn state_files(d: &Bulkheadd) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![d.state.clone()];
    while let Some(dir) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                let data = std::fs::read(&p).unwrap_or_default();
                out.push((p, data));
            }
        }
    }
    out.sort();
    out
}

/// A stream of `passes` passes over sectors 0..2048 of a disk with `queues` queues on
/// `vcpus` vCPUs, then its verification, then exit 0.
fn stream_config(d: &Bulkheadd, name: &str, img: &Path, vcpus: u32, queues: u32) -> PathBuf {
    let passes = 400;
    let cmdline = format!(
        "blk blk-queues={queues} blk-stream=11:0:2048:{passes} blk-stream-verify=11:0:2048:{passes} exit=0"
    );
    let extra = format!(
        "[[disks]]\npath = \"{}\"\nserial = \"snap\"\nqueues = {queues}\n",
        img.display()
    );
    d.config_with(name, &cmdline, "256M", vcpus, &extra)
}

/// Saves the stream mid-way, restores it, and checks that it finishes and verifies.
fn stream_survives(test: &str, tag: &str, uid_base: u32, vcpus: u32, queues: u32) {
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start(tag, Some(&runner_uids(uid_base)), false);
    let (dir, img) = temp_image(tag, 8);
    let name = format!("snap{tag}");
    let cfg = stream_config(&d, &name, &img, vcpus, queues);
    d.create_config(&name, &cfg);
    let con = d.console(&name);
    assert!(
        con.stdout.wait_for("blk-stream: pass 20 ok", STEP),
        "the stream did not get going\n{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    let snap = dir.join("vm.snap");
    let out = d.cli_ok(&["save", &name, snap.to_str().expect("utf-8")], "save");
    assert!(out.stdout.contains("saved"), "{}", out.dump());
    let before = assert_no_io_error(&con);
    assert!(
        !before.contains("blk-stream: done"),
        "the stream ended before the save: make it longer\n{before}"
    );
    assert!(
        d.vm(&name).is_none(),
        "save destroys the VM: {:?}",
        d.list()
    );
    let (memory, written, _) = snapshot_ram(&snap);
    assert_eq!(memory, 256 << 20);
    let size = std::fs::metadata(&snap).expect("snapshot").len();
    eprintln!(
        "snapshot: {size} bytes, {written} bytes of guest RAM; {}",
        out.stdout.trim()
    );
    assert!(
        written < 64 << 20 && size < written + (1 << 20),
        "the snapshot is sparse: {written} of {memory} bytes written, file {size}"
    );

    let out = d.cli_ok(&["restore", snap.to_str().expect("utf-8")], "restore");
    eprintln!("{}", out.stdout.trim());
    let con = d.console(&name);
    assert!(
        con.stdout.wait_for("blk-stream-verify: ", STREAM_DONE),
        "the restored stream did not finish\n{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    // The guest exits after its verification: wait for that, so the whole line is in.
    assert!(
        wait_until(STEP, || d
            .vm(&name)
            .is_some_and(|v| v.state.starts_with("stopped"))),
        "the restored guest did not end\n{}",
        d.dump()
    );
    assert!(con.stdout.wait_closed(STEP), "the console did not close");
    let text = assert_no_io_error(&con);
    assert!(
        text.contains("blk-stream-verify: ok"),
        "the restored stream does not verify\n{text}\n{}",
        d.dump()
    );
    assert!(
        d.vm(&name).is_some_and(|v| v.state == "stopped (exit 0)"),
        "{:?}",
        d.vm(&name)
    );
    // Every sector holds exactly the write of the last pass, with its request number.
    let (lo, hi) = stream_consistent(&img, 11, 0, 2048).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((lo, hi), (400, 400), "every sector holds the last pass");
    let _ = d.cli(&["destroy", &name]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn stream_survives_save_and_restore() {
    stream_survives("stream_survives_save_and_restore", "s1", 67000, 1, 1);
}

#[test]
fn stream_survives_save_and_restore_with_2_vcpus_and_2_queues() {
    stream_survives(
        "stream_survives_save_and_restore_with_2_vcpus_and_2_queues",
        "s2",
        67100,
        2,
        2,
    );
}

/// A paused VM is saved, restored (paused), saved again and restored again: both
/// snapshots hold the same guest RAM, and the restored VM runs on when unpaused.
#[test]
fn paused_vm_saved_twice_gives_the_same_ram() {
    let test = "paused_vm_saved_twice_gives_the_same_ram";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("s3", Some(&runner_uids(67200)), false);
    let (dir, img) = temp_image("s3", 8);
    let name = "snaptwice";
    let _con = echo_vm(&d, name, &img, "", "fill=16 blk echo", 2);
    d.cli_ok(&["pause", name], "pause");
    let first = dir.join("first.snap");
    let second = dir.join("second.snap");
    d.cli_ok(&["save", name, first.to_str().expect("utf-8")], "save");
    d.cli_ok(&["restore", first.to_str().expect("utf-8")], "restore");
    assert!(
        d.row(name).is_some_and(|r| r.contains("paused")),
        "a VM saved paused is restored paused: {:?}",
        d.row(name)
    );
    d.cli_ok(
        &["save", name, second.to_str().expect("utf-8")],
        "save again",
    );
    let a = snapshot_ram(&first);
    let b = snapshot_ram(&second);
    assert_eq!(a, b, "both snapshots hold the same guest RAM");
    d.cli_ok(
        &["restore", second.to_str().expect("utf-8")],
        "restore again",
    );
    d.cli_ok(&["unpause", name], "unpause");
    // The guest echoes serial input: it runs again.
    let mut con = d.console(name);
    con.send(b"still here\r");
    assert!(
        con.stdout.wait_for("still here", STEP),
        "the twice-restored guest does not echo\n{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    let _ = d.cli(&["destroy", name]);
    let _ = std::fs::remove_dir_all(dir);
}

/// Truncated, corrupted, wrong-version, wrong-host and foreign files are refused with status
/// 2 and a line that names what is wrong; the state dir is left as it was and nothing is listed.
#[test]
fn bad_snapshots_are_refused_and_change_nothing() {
    let test = "bad_snapshots_are_refused_and_change_nothing";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("s4", Some(&runner_uids(67300)), false);
    let (dir, img) = temp_image("s4", 8);
    let name = "snapbad";
    let _con = echo_vm(&d, name, &img, "", "fill=4 blk echo", 1);
    let good = dir.join("good.snap");
    d.cli_ok(&["save", name, good.to_str().expect("utf-8")], "save");
    let bytes = std::fs::read(&good).expect("snapshot");
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            bytes[..bytes.len() - 100].to_vec(),
            "truncated",
        ),
        ("truncated-header", bytes[..30].to_vec(), "truncated"),
        ("empty", Vec::new(), "truncated"),
        ("not-a-snapshot", b"name = \"x\"\n".to_vec(), "bad magic"),
    ];
    let mut version = bytes.clone();
    version[8] = 9;
    cases.push(("wrong-version", version, "format version 9"));
    let mut header = bytes.clone();
    header[25] ^= 0x40;
    cases.push(("corrupted-header", header, "corrupted"));
    // A byte in the middle of the guest RAM.
    let mut ram = bytes.clone();
    let at = bytes.len() - 4096 * 3;
    ram[at] ^= 1;
    cases.push(("corrupted-ram", ram, "corrupted"));
    // The same snapshot, as if taken on another kind of CPU.
    let foreign = {
        let f = std::fs::File::open(&good).expect("snapshot");
        let r = SnapshotReader::open(&f).expect("a good snapshot reads");
        let mut ram = vec![0u8; r.memory() as usize];
        r.fill_ram(&f, &mut ram).expect("RAM");
        let mut header = r.header.clone();
        header.cpu_vendor = if header.cpu_vendor == "AuthenticAMD" {
            "GenuineIntel".into()
        } else {
            "AuthenticAMD".into()
        };
        let p = dir.join("foreign.tmp");
        let out = std::fs::File::create(&p).expect("create");
        core_vmm::snapshot::format::write_snapshot(
            &out, &header, &r.config, &r.records, &ram, None,
        )
        .expect("write");
        std::fs::read(&p).expect("read")
    };
    cases.push(("wrong-host", foreign, "was taken on"));
    let state_before = state_files(&d);
    let listed_before = d.list().len();
    for (what, data, says) in cases {
        let p = dir.join(format!("{what}.snap"));
        std::fs::write(&p, &data).expect("write");
        let out = d.cli(&["restore", p.to_str().expect("utf-8")]);
        assert_eq!(out.code, Some(2), "{what}: exit status 2\n{}", out.dump());
        let line = out.stderr.trim();
        assert_eq!(line.lines().count(), 1, "{what}: one line\n{}", out.dump());
        assert!(
            line.contains(says),
            "{what}: the error names what is wrong ({says})\n{}",
            out.dump()
        );
        assert_eq!(d.list().len(), listed_before, "{what}: nothing listed");
        assert_eq!(
            state_files(&d),
            state_before,
            "{what}: the state dir changed"
        );
    }
    // The good one still restores.
    d.cli_ok(&["restore", good.to_str().expect("utf-8")], "restore");
    let _ = d.cli(&["destroy", name]);
    let _ = std::fs::remove_dir_all(dir);
}

/// `save --keep-running` mid-stream: the VM goes on (its backend's rings brought up again
/// where they stopped) and its stream verifies; then the snapshot, restored under a new
/// name, replays the rest of the stream from the save point and verifies too.
#[test]
fn keep_running_save_and_restore_under_a_new_name() {
    let test = "keep_running_save_and_restore_under_a_new_name";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("s5", Some(&runner_uids(67400)), false);
    let (dir, img) = temp_image("s5", 8);
    let name = "snapkeep";
    let cfg = stream_config(&d, name, &img, 2, 2);
    d.create_config(name, &cfg);
    let con = d.console(name);
    assert!(
        con.stdout.wait_for("blk-stream: pass 20 ok", STEP),
        "{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    let snap = dir.join("keep.snap");
    let out = d.cli_ok(
        &[
            "save",
            "--keep-running",
            name,
            snap.to_str().expect("utf-8"),
        ],
        "save",
    );
    assert!(out.stdout.contains("keeps running"), "{}", out.dump());
    assert!(
        !con.stdout.text().contains("blk-stream: done"),
        "the stream ended before the save: make it longer"
    );
    finishes_and_verifies(&d, &con, name);
    let _ = d.cli(&["destroy", name]);

    d.cli_ok(
        &[
            "restore",
            "--name",
            "snapkeep2",
            snap.to_str().expect("utf-8"),
        ],
        "restore",
    );
    let con = d.console("snapkeep2");
    finishes_and_verifies(&d, &con, "snapkeep2");
    let (lo, hi) = stream_consistent(&img, 11, 0, 2048).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((lo, hi), (400, 400), "every sector holds the last pass");
    let _ = d.cli(&["destroy", "snapkeep2"]);
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits for `vm`'s stream to end and its verification to pass (the guest then exits 0).
fn finishes_and_verifies(d: &Bulkheadd, con: &Running, vm: &str) {
    assert!(
        wait_until(STREAM_DONE, || d
            .vm(vm)
            .is_some_and(|v| v.state.starts_with("stopped"))),
        "{vm} did not end\n{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    assert!(con.stdout.wait_closed(STEP), "the console did not close");
    let text = assert_no_io_error(con);
    assert!(
        text.contains("blk-stream-verify: ok"),
        "{vm}: the stream does not verify\n{text}\n{}",
        d.dump()
    );
    assert_eq!(
        d.vm(vm).map(|v| v.state),
        Some("stopped (exit 0)".to_string())
    );
}

/// Save and restore obey the rules of create: only the owner (or an administrator) saves
/// a VM, only administrators restore, and a restored VM's disk is checked against the
/// image dirs again.
#[test]
fn save_and_restore_obey_the_policy() {
    let test = "save_and_restore_obey_the_policy";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let (dir, img) = temp_image("s6", 8);
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let guest_dir = test_guest()
        .parent()
        .expect("guest dir")
        .display()
        .to_string();
    let policy = |images: &[&str]| {
        format!(
            "[admins]\nuids = [0]\n[images]\nallowed = {images:?}\n{}",
            runner_uids(67500)
        )
    };
    let mut d = Bulkheadd::start(
        "s6",
        Some(&policy(&[&guest_dir, &dir.display().to_string()])),
        false,
    );
    let name = "snappol";
    let _con = echo_vm(&d, name, &img, "owner = 1000\n", "blk echo", 1);
    let snap = dir.join("pol.snap");
    let snap_s = snap.to_str().expect("utf-8");
    // Not the owner: refused, and the file it created is gone again.
    let out = d.cli_as(1001, &["save", name, snap_s]);
    assert_eq!(out.code, Some(3), "{}", out.dump());
    assert!(
        out.stderr.contains("denied by rule 'owner'"),
        "{}",
        out.dump()
    );
    assert!(!snap.exists(), "a refused save leaves no file");
    // The owner may.
    let out = d.cli_as(1000, &["save", name, snap_s]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    // Restoring is creating: administrators only.
    let out = d.cli_as(1000, &["restore", snap_s]);
    assert_eq!(out.code, Some(3), "{}", out.dump());
    assert!(
        out.stderr.contains("denied by rule 'admins'"),
        "{}",
        out.dump()
    );
    // With the disk's dir no longer allowed, the restored VM's disk is refused.
    d.terminate();
    write_file(&d.policy, &policy(&[&guest_dir]));
    d.launch();
    let before = state_files(&d);
    let out = d.cli(&["restore", snap_s]);
    assert_eq!(out.code, Some(3), "{}", out.dump());
    assert!(
        out.stderr.contains("denied by rule 'images.allowed'"),
        "{}",
        out.dump()
    );
    assert_eq!(state_files(&d), before, "the state dir changed");
    assert!(d.vm(name).is_none());
    let _ = std::fs::remove_dir_all(dir);
}

/// A snapshot taken mid-stream is restored by a `bulkheadd` whose disk backend binary was
/// replaced meanwhile by another build (the release build, which scripts/test.sh makes for
/// the live-upgrade test; copied to a path of its own): the new binary serves the restored
/// disk, takes the saved in-flight region, and the stream finishes and verifies.
#[test]
fn restore_after_the_disk_backend_binary_was_upgraded() {
    let test = "restore_after_the_disk_backend_binary_was_upgraded";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let mut d = Bulkheadd::start("s7", Some(&runner_uids(67600)), false);
    let (dir, img) = temp_image("s7", 8);
    let name = "snapupg";
    let cfg = stream_config(&d, name, &img, 1, 1);
    d.create_config(name, &cfg);
    let con = d.console(name);
    assert!(
        con.stdout.wait_for("blk-stream: pass 20 ok", STEP),
        "{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    let snap = dir.join("upg.snap");
    d.cli_ok(&["save", name, snap.to_str().expect("utf-8")], "save");
    let new_blk = dir.join("bulkhead-blk.new");
    let release = bin("bulkhead-blk")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("release/bulkhead-blk");
    assert!(
        release.exists(),
        "{} is missing: build it first (scripts/test.sh does: cargo build --release -p bulkhead-backends --bin bulkhead-blk)",
        release.display()
    );
    std::fs::copy(&release, &new_blk).expect("copy bulkhead-blk");
    d.terminate();
    d.extra_args = vec!["--blk".into(), new_blk.display().to_string()];
    d.launch();
    d.cli_ok(&["restore", snap.to_str().expect("utf-8")], "restore");
    let info = d.cli(&["info", name]).stdout;
    assert!(
        info.contains("bulkhead-blk.new"),
        "the new binary serves the disk\n{info}"
    );
    let con = d.console(name);
    finishes_and_verifies(&d, &con, name);
    let (lo, hi) = stream_consistent(&img, 11, 0, 2048).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((lo, hi), (400, 400), "every sector holds the last pass");
    let _ = d.cli(&["destroy", name]);
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends numbered UDP datagrams to argv[1]:argv[2] until stdin closes and prints `ok SEQ`
/// for each echo that comes back intact.
const UDP_CLIENT: &str = r#"
import socket, sys, threading, time
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.005)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
sent = 0
while not stop.is_set():
    s.sendto(sent.to_bytes(4, "big") + b"snapshot-echo" * 8, (addr, port))
    sent += 1
    deadline = time.monotonic() + 0.01
    while time.monotonic() < deadline:
        try:
            data, _ = s.recvfrom(2048)
        except socket.timeout:
            continue
        if data[4:] == b"snapshot-echo" * 8:
            print(f"ok {int.from_bytes(data[:4], 'big')}", flush=True)
"#;

/// A guest echoing UDP on its NIC is saved and restored: the restored NIC (a new
/// `bulkhead-net` on a new tap on the same bridge) echoes again.
#[test]
fn nic_echoes_udp_after_save_and_restore() {
    let test = "nic_echoes_udp_after_save_and_restore";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let ns = Netns::new("snapnet");
    let policy = format!(
        "{}[networks.lan]\naddress = \"10.77.1.1/24\"\nvms = [\"*\"]\n",
        runner_uids(67700)
    );
    let d = Bulkheadd::start_in_netns("snapnet", Some(&policy), false, &ns.name);
    let name = "snapnet";
    let cfg = d.config_with(
        name,
        "net ip=10.77.1.2/24 peer=10.77.1.1 udp-echo=7000:100000000 net-idle=600000",
        "128M",
        1,
        "[[nics]]\nnetwork = \"lan\"\nmac = \"52:54:00:5a:00:01\"\n",
    );
    d.create_config(name, &cfg);
    let mut client = ns.exec("python3");
    client.args(["-c", UDP_CLIENT, "10.77.1.2", "7000"]);
    let mut client = Running::spawn(client);
    let echoes = |c: &Running| c.stdout.text().matches("ok ").count();
    assert!(
        wait_until(Duration::from_secs(30), || echoes(&client) > 5),
        "no echo to begin with\n{}\n{}",
        client.stderr.text(),
        d.dump()
    );
    let dir = std::env::temp_dir().join(format!("bulkhead-snapnet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let snap = dir.join("net.snap");
    d.cli_ok(&["save", name, snap.to_str().expect("utf-8")], "save");
    d.cli_ok(&["restore", snap.to_str().expect("utf-8")], "restore");
    let before = echoes(&client);
    assert!(
        wait_until(Duration::from_secs(30), || echoes(&client) > before + 20),
        "no echo after the restore ({before} before)\n{}",
        d.dump()
    );
    client.send(b"");
    drop(client.child.stdin.take());
    let _ = client.wait(Duration::from_secs(10));
    let _ = d.cli(&["destroy", name]);
    let _ = std::fs::remove_dir_all(dir);
}

/// A save whose disk backend does not drain (stopped with SIGSTOP) fails after the drain
/// deadline, `list` shows the VM `saving` meanwhile, no file is left, and the VM goes on:
/// the backend is replaced and the stream finishes and verifies.
#[test]
fn save_of_a_frozen_backend_fails_and_the_vm_goes_on() {
    let test = "save_of_a_frozen_backend_fails_and_the_vm_goes_on";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let d = Bulkheadd::start("s8", Some(&runner_uids(67800)), false);
    let (dir, img) = temp_image("s8", 8);
    let name = "snapfrozen";
    let cmdline = "blk blk-stream=11:0:2048:400 blk-stream-verify=11:0:2048:400 exit=0";
    let extra = format!(
        "[[disks]]\npath = \"{}\"\nserial = \"snap\"\nhang_timeout_ms = 0\n",
        img.display()
    );
    let cfg = d.config_with(name, cmdline, "256M", 1, &extra);
    d.create_config(name, &cfg);
    let con = d.console(name);
    assert!(
        con.stdout.wait_for("blk-stream: pass 20 ok", STEP),
        "{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    let pid = d
        .backend_pid_in_state(name, "disk0")
        .expect("disk0's backend");
    send_signal(pid, libc::SIGSTOP);
    let snap = dir.join("frozen.snap");
    let save = Running::spawn(d.cli_cmd(&["save", name, snap.to_str().expect("utf-8")]));
    assert!(
        wait_until(STEP, || d.row(name).is_some_and(|r| r.contains("saving"))),
        "list never showed the VM saving: {:?}",
        d.row(name)
    );
    let mut save = save;
    let status = save.wait(Duration::from_secs(60));
    send_signal(pid, libc::SIGCONT);
    assert_eq!(
        status.code(),
        Some(1),
        "the save fails\n{}\n{}",
        save.stderr.text(),
        d.dump()
    );
    assert!(
        save.stderr.text().contains("goes on as before"),
        "{}",
        save.stderr.text()
    );
    assert!(!snap.exists(), "a failed save leaves no file");
    // The drain's deadline cut the frozen backend's connection: it is replaced.
    assert!(
        wait_until(STEP, || stream::restarts(&d, name) >= 1),
        "the frozen backend was not replaced; its threads: {}\n{}",
        threads_of(pid),
        d.dump()
    );
    finishes_and_verifies(&d, &con, name);
    let (lo, hi) = stream_consistent(&img, 11, 0, 2048).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((lo, hi), (400, 400), "every sector holds the last pass");
    let _ = d.cli(&["destroy", name]);
    let _ = std::fs::remove_dir_all(dir);
}

/// Each thread of `pid` with its state and where it waits, for a failure report.
fn threads_of(pid: i32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("process {pid} is gone");
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let dir = t.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|r| r.split(' ').next())
            .unwrap_or("?");
        out.push(format!(
            "{} {} {} {}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            state,
            read("wchan")
        ));
    }
    out.join("; ")
}
