//! Disks end to end: the runner's virtio-pci + vhost-user frontend against real vhost-user-blk
//! backends (qemu-storage-daemon, bulkhead-blk), driven by the test guest's virtio-blk driver
//! (tests/guest/README.md, *PCI and virtio-blk*); VMs with `[[disks]]` created through a real
//! `bulkheadd` (the harness in common/daemon.rs), whose disks are served by sandboxed
//! `bulkhead-blk` processes; and `bulkhead-blk` standalone under QEMU and under the runner.
//!
//! The host checks every pattern the guest writes on the image itself
//! ([`blk_image_mismatch`]), so a guest and a backend that agree on a wrong layout fail.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::json::Json;
use common::*;
use daemon::*;

const DEADLINE: Duration = Duration::from_secs(60);

/// qemu-storage-daemon exporting `image` as vhost-user-blk on `sock`; killed on drop.
struct StorageDaemon(std::process::Child);

impl StorageDaemon {
    fn start(
        qsd: &std::path::Path,
        image: &std::path::Path,
        sock: &std::path::Path,
        queues: u32,
    ) -> Self {
        let child = Command::new(qsd)
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file,filename={}", image.display()))
            .args(["--blockdev", "driver=raw,node-name=disk,file=file", "--export"])
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let me = StorageDaemon(child);
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < end,
                "qemu-storage-daemon did not create {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn runner_with_qemu_storage_daemon_round_trips_the_pattern() {
    let name = "runner_with_qemu_storage_daemon_round_trips_the_pattern";
    if !kvm_available(name) {
        return;
    }
    let Some(qsd) = tool(name, "qemu-storage-daemon") else {
        return;
    };
    let (dir, img) = temp_image("qsd", 64);
    let sock = dir.join("qsd.sock");
    let daemon = StorageDaemon::start(&qsd, &img, &sock, 2);
    let mut c = runner_guest(
        "blk blk-id blk-queues=2 blk-write=7:100:2048 blk-read=100:2048 blk-verify=7:100:2048 exit=0",
        2,
        "256M",
    );
    c.arg("--disk-socket").arg(&sock);
    let out = run(c, DEADLINE);
    drop(daemon);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stdout.contains("blk-write: 2048 sectors ok status 0"),
        "{}",
        out.dump()
    );
    assert!(out.stdout.contains("blk-verify: ok"), "{}", out.dump());
    assert!(
        out.stdout.contains("blk-mq: 2 queues used"),
        "{}",
        out.dump()
    );
    let sums: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("blk-checksum:"))
        .collect();
    assert_eq!(sums.len(), 2, "{}", out.dump());
    assert_eq!(
        sums[0], sums[1],
        "read-back checksum equals the written one"
    );
    // The host finds exactly the pattern on the image, and nothing outside the range.
    assert_eq!(blk_image_mismatch(&img, 7, 100, 2048), None);
    let data = std::fs::read(&img).expect("image");
    assert!(
        data[..100 * 512].iter().all(|b| *b == 0),
        "sectors before the range untouched"
    );
    assert!(
        data[2148 * 512..2148 * 512 + 4096].iter().all(|b| *b == 0),
        "sectors after the range untouched"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------------------------------
// Helpers for VMs with disks under bulkheadd
// ------------------------------------------------------------------------------------------

/// Deadline for a guest's disk work (boot, then thousands of sectors through vhost-user).
const GUEST_IO: Duration = Duration::from_secs(60);

/// Deadline for a QEMU run (SeaBIOS first, then the guest).
const QEMU_RUN: Duration = Duration::from_secs(120);

/// A raw image of `mib` MiB (zeros) in the daemon's temp dir (world-readable, as the
/// harness's configs are), returned by its canonical path (the one bulkheadd reports).
fn image_in(d: &Bulkheadd, file: &str, mib: u64) -> PathBuf {
    let path = d.dir.join(file);
    let f = std::fs::File::create(&path).expect("create image");
    f.set_len(mib << 20).expect("size image");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::canonicalize(&path).expect("canonical image path")
}

/// One `[[disks]]` table.
fn disk_toml(path: &Path, readonly: bool, serial: Option<&str>, queues: Option<u16>) -> String {
    let mut s = format!("[[disks]]\npath = \"{}\"\n", path.display());
    if readonly {
        s.push_str("readonly = true\n");
    }
    if let Some(serial) = serial {
        s.push_str(&format!("serial = \"{serial}\"\n"));
    }
    if let Some(q) = queues {
        s.push_str(&format!("queues = {q}\n"));
    }
    s
}

/// FNV-1a 64 of a file's bytes.
fn file_hash(path: &Path) -> u64 {
    std::fs::read(path)
        .expect("read image")
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// Writes the guest's pattern of `seed` over every sector of `path`.
fn fill_with_pattern(path: &Path, seed: u64) {
    let len = std::fs::metadata(path).expect("image").len();
    let mut data = Vec::with_capacity(len as usize);
    for n in 0..len / 512 {
        data.extend_from_slice(&blk_pattern_sector(seed, n));
    }
    std::fs::write(path, &data).expect("fill image");
}

/// True when `[start, start+count)` sectors of `path` are all zero.
fn sectors_zero(path: &Path, start: u64, count: u64) -> bool {
    let data = std::fs::read(path).expect("read image");
    data[(start * 512) as usize..((start + count) * 512) as usize]
        .iter()
        .all(|b| *b == 0)
}

/// The `blk-checksum:` values in console output, in order.
fn checksums(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| {
            l.strip_prefix("blk-checksum:")
                .map(|v| v.trim().to_string())
        })
        .collect()
}

/// The guest's `blk<i>:` line.
fn blk_line(text: &str, i: usize) -> Option<String> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| l.starts_with(&format!("blk{i}: ")))
        .map(str::to_string)
}

/// The pid of `bulkhead-blk` serving disk `index` of the running VM `vm`, as `bulkhead info
/// --json` names it (`..., bulkhead-blk pid N uid U`); checked against the process whose
/// stdout is that disk's log in the state dir.
fn backend_pid(d: &Bulkheadd, vm: &str, index: usize) -> i32 {
    let info = d.info(vm);
    let disks = info
        .get("disks")
        .and_then(Json::as_array)
        .unwrap_or_else(|| panic!("info --json of {vm} has no disks: {info:?}"));
    let line = disks
        .get(index)
        .and_then(Json::as_str)
        .unwrap_or_else(|| panic!("{vm} has no disk {index}: {disks:?}"));
    let pid: i32 = line
        .split("bulkhead-blk pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("disk {index} of {vm} names no bulkhead-blk pid: {line}"));
    // The processes writing the disk's log: this one, and the standby info names once it
    // is ready (one may be starting: it is not named yet).
    let standby: Option<i32> = line
        .split("standby pid ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok());
    let writers = d.disk_backends(vm, index);
    assert!(
        writers.contains(&pid)
            && writers
                .iter()
                .all(|w| *w == pid || standby.is_none_or(|s| s == *w))
            && writers.len() <= 2,
        "the processes writing {vm}'s disk{index} log ({writers:?}) are not the ones info names ({line})\n{}",
        d.dump()
    );
    pid
}

/// The first of a process's uids (or gids).
fn proc_id(pid: i32, key: &str) -> u32 {
    proc_status_field(pid, key)
        .and_then(|v| v.split_whitespace().next().and_then(|u| u.parse().ok()))
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no {key}"))
}

/// Creates VM `name` from `cfg`, whose command line ends in `echo exit=..` so the guest
/// waits at `echo: ready` after its disk work: the whole console output is collected (a
/// console can only attach to a running VM), then `quit` lets the guest exit, and the VM
/// must reach the `list` state `stopped_as`. `while_held` runs while the guest waits (the
/// VM and its backends are running). Returns the console output.
fn run_held(
    d: &Bulkheadd,
    name: &str,
    cfg: &Path,
    stopped_as: &str,
    while_held: impl FnOnce(&str),
) -> String {
    d.create_config(name, cfg);
    let mut con = d.console(name);
    assert!(
        con.stdout.wait_for("echo: ready", GUEST_IO),
        "{name} never reached `echo: ready`\n--- console ---\n{}\n{}\n{}",
        con.stdout.text(),
        con.stderr.text(),
        d.dump()
    );
    let text = con.stdout.text();
    while_held(&text);
    con.send(b"quit\n");
    let status = con.wait(STEP);
    assert_eq!(
        status.code(),
        Some(0),
        "console of {name}\n{}\n{}",
        con.stdout.text(),
        con.stderr.text()
    );
    d.wait_row(name, stopped_as);
    // The console's output pump may lag behind its exit: wait for the guest's last line.
    assert!(
        con.stdout.wait_for("exit: ", STEP),
        "no `exit:` line from {name}\n{}",
        con.stdout.text()
    );
    con.stdout.text().replace('\r', "")
}

// ------------------------------------------------------------------------------------------
// 1. through bulkheadd: one VM writes, the next reads, info names the backend
// ------------------------------------------------------------------------------------------

#[test]
fn daemon_disk_pattern_survives_into_the_next_vm() {
    let name = "daemon_disk_pattern_survives_into_the_next_vm";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("disk-rw", Some(&runner_uids(63000)), false);
    let img = image_in(&d, "rw.img", 32);
    let disks = disk_toml(&img, false, Some("rw-disk"), None);

    // VM A (2 vCPUs: the disk gets 2 queues by default) writes and verifies the pattern.
    let cfg = d.config_with(
        "writer",
        "blk blk-id blk-write=7:0:4096 blk-verify=7:0:4096 echo exit=0",
        "256M",
        2,
        &disks,
    );
    let a = run_held(&d, "writer", &cfg, "stopped (exit 0)", |_| {});
    let blk0 = blk_line(&a, 0).unwrap_or_else(|| panic!("no blk0 line\n{a}"));
    assert!(
        blk0.contains("capacity 65536 sectors")
            && blk0.contains("queues 2,")
            && blk0.contains("ro 0")
            && blk0.contains("serial 'rw-disk'"),
        "{blk0}"
    );
    for line in [
        "blk-id: 'rw-disk'",
        "blk-write: 4096 sectors ok status 0",
        "blk-verify: ok",
        "exit: 0",
    ] {
        assert!(a.contains(line), "writer lacks '{line}'\n{a}\n{}", d.dump());
    }
    let a_sums = checksums(&a);
    assert_eq!(a_sums.len(), 1, "{a}");
    // The VM stopped, so its backend is gone; the host finds exactly the pattern.
    assert!(
        wait_until(STEP, || d.disk_backends("writer", 0).is_empty()),
        "writer's bulkhead-blk outlived its VM: {:?}",
        d.disk_backends("writer", 0)
    );
    assert_eq!(
        blk_image_mismatch(&img, 7, 0, 4096),
        None,
        "pattern on the image"
    );
    assert!(
        sectors_zero(&img, 4096, 4096),
        "sectors after the range were touched"
    );

    // VM B, a second create on the same image, reads it back: same checksum.
    let cfg = d.config_with(
        "reader",
        "blk blk-read=0:4096 echo exit=0",
        "256M",
        2,
        &disks,
    );
    let b = run_held(&d, "reader", &cfg, "stopped (exit 0)", |_| {});
    assert!(
        b.contains("blk-read: 4096 sectors ok status 0"),
        "{b}\n{}",
        d.dump()
    );
    let b_sums = checksums(&b);
    assert_eq!(
        b_sums, a_sums,
        "the reader's checksum differs from the writer's\n--- writer ---\n{a}\n--- reader ---\n{b}"
    );
    assert_eq!(
        blk_image_mismatch(&img, 7, 0, 4096),
        None,
        "reading changed the image"
    );

    // `info` of a running VM with a disk names its backend, a live process that is not the
    // runner; destroy takes the backend with it.
    let cfg = d.config_with("ticker", "blk ticks=100", "128M", 1, &disks);
    let vm = d.create_config("ticker", &cfg);
    let out = d.cli(&["info", "ticker"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let pid = backend_pid(&d, "ticker", 0);
    assert!(
        out.stdout.contains(&format!("bulkhead-blk pid {pid}")),
        "info does not name bulkhead-blk pid {pid}:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&img.display().to_string()),
        "info does not name the image:\n{}",
        out.stdout
    );
    assert_ne!(Some(pid), vm.runner_pid, "the backend is the runner?");
    let start = start_time(pid);
    let con = d.console("ticker");
    assert!(
        con.stdout.wait_for("tick 1", STEP),
        "{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    drop(con);
    assert!(
        proc_running(pid, start),
        "bulkhead-blk {pid} died under a ticking guest"
    );
    let out = d.cli(&["destroy", "ticker"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(
        wait_until(STEP, || !proc_exists(pid, start)),
        "bulkhead-blk {pid} still in /proc after destroy: {:?}",
        proc_stat(pid)
    );
}

// ------------------------------------------------------------------------------------------
// 2. read-only disk
// ------------------------------------------------------------------------------------------

#[test]
fn daemon_readonly_disk_refuses_writes() {
    let name = "daemon_readonly_disk_refuses_writes";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("disk-ro", Some(&runner_uids(63100)), false);
    let img = image_in(&d, "ro.img", 8);
    fill_with_pattern(&img, 5);
    let before = file_hash(&img);
    let cfg = d.config_with(
        "ro",
        "blk blk-write=9:0:64 blk-verify=5:0:64 echo exit=0",
        "128M",
        1,
        &disk_toml(&img, true, None, None),
    );
    let mut info_line = String::new();
    let out = run_held(&d, "ro", &cfg, "stopped (exit 4)", |_| {
        // The backend holds the image open for reading only.
        let pid = backend_pid(&d, "ro", 0);
        let mut found = false;
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .flatten()
        {
            if std::fs::read_link(e.path()).is_ok_and(|t| t == img) {
                let fdinfo = std::fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    e.file_name().to_string_lossy()
                ))
                .expect("fdinfo");
                let flags = line_value(&fdinfo, "flags:")
                    .and_then(|f| u32::from_str_radix(&f, 8).ok())
                    .expect("flags");
                assert_eq!(
                    flags & libc::O_ACCMODE as u32,
                    libc::O_RDONLY as u32,
                    "read-only disk's image open for writing: flags {flags:o}"
                );
                found = true;
            }
        }
        assert!(found, "bulkhead-blk {pid} does not hold {}", img.display());
        let info = d.info("ro");
        info_line = format!("{:?}", info.get("disks"));
    });
    assert!(info_line.contains("(read-only)"), "{info_line}");
    let blk0 = blk_line(&out, 0).unwrap_or_else(|| panic!("no blk0 line\n{out}"));
    assert!(blk0.contains("ro 1"), "{blk0}");
    for line in [
        "blk-write: 0 sectors ok status 1",
        "blk-verify: ok",
        "exit: 4",
    ] {
        assert!(out.contains(line), "lacks '{line}'\n{out}\n{}", d.dump());
    }
    assert_eq!(file_hash(&img), before, "a read-only disk's image changed");
    assert_eq!(blk_image_mismatch(&img, 5, 0, 16384), None);
}

// ------------------------------------------------------------------------------------------
// 3. two disks, four queues each
// ------------------------------------------------------------------------------------------

#[test]
fn daemon_two_disks_with_four_queues_each() {
    let name = "daemon_two_disks_with_four_queues_each";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("disk-mq", Some(&runner_uids(63200)), false);
    let img0 = image_in(&d, "d0.img", 16);
    let img1 = image_in(&d, "d1.img", 16);
    let disks = format!(
        "{}{}",
        disk_toml(&img0, false, Some("disk-zero"), Some(4)),
        disk_toml(&img1, false, Some("disk-one"), Some(4))
    );
    // The guest's disk settings are global, so one VM per target disk: both VMs have both
    // disks; each writes one and leaves the other alone.
    for (vm, disk, seed) in [("mq0", 0usize, 11u64), ("mq1", 1, 22)] {
        let cmdline = format!(
            "blk blk-queues=4 blk-disk={disk} blk-write={seed}:0:2048 blk-verify={seed}:0:2048 echo exit=0"
        );
        let cfg = d.config_with(vm, &cmdline, "256M", 4, &disks);
        let out = run_held(&d, vm, &cfg, "stopped (exit 0)", |_| {
            // One sandboxed backend per disk, each with a uid of its own.
            let p0 = backend_pid(&d, vm, 0);
            let p1 = backend_pid(&d, vm, 1);
            assert_ne!(p0, p1);
            let runner = d.vm(vm).and_then(|v| v.runner_pid).expect("runner pid");
            let uids = [
                proc_id(p0, "Uid:"),
                proc_id(p1, "Uid:"),
                proc_id(runner, "Uid:"),
            ];
            assert!(
                uids[0] != uids[1] && uids[0] != uids[2] && uids[1] != uids[2],
                "backends and runner share a uid: {uids:?}"
            );
        });
        for (i, serial) in [(0, "disk-zero"), (1, "disk-one")] {
            let l = blk_line(&out, i).unwrap_or_else(|| panic!("{vm}: no blk{i} line\n{out}"));
            assert!(
                l.contains("capacity 32768 sectors")
                    && l.contains("queues 4,")
                    && l.contains(&format!("serial '{serial}'")),
                "{vm}: {l}"
            );
        }
        for line in [
            "blk-write: 2048 sectors ok status 0",
            "blk-verify: ok",
            "blk-mq: 4 queues used",
            "exit: 0",
        ] {
            assert!(
                out.contains(line),
                "{vm} lacks '{line}'\n{out}\n{}",
                d.dump()
            );
        }
        if disk == 0 {
            assert_eq!(
                blk_image_mismatch(&img0, 11, 0, 2048),
                None,
                "disk 0 after mq0"
            );
            assert!(
                sectors_zero(&img1, 0, 32768),
                "mq0 wrote disk 1 (blk-disk=0 should be the first [[disks]])"
            );
        }
    }
    assert_eq!(
        blk_image_mismatch(&img0, 11, 0, 2048),
        None,
        "disk 0 after mq1"
    );
    assert_eq!(
        blk_image_mismatch(&img1, 22, 0, 2048),
        None,
        "disk 1 after mq1"
    );
    assert!(sectors_zero(&img0, 2048, 32768 - 2048));
    assert!(sectors_zero(&img1, 2048, 32768 - 2048));
}

// ------------------------------------------------------------------------------------------
// 4. hostile guest
// ------------------------------------------------------------------------------------------

const HOSTILE_CASES: [&str; 8] = [
    "header-writable",
    "data-outside-ram",
    "status-readonly",
    "zero-length-data",
    "descriptor-loop",
    "unknown-type",
    "beyond-capacity",
    "sector-overflow",
];

#[test]
fn daemon_hostile_guest_does_not_break_the_disk_backend() {
    let name = "daemon_hostile_guest_does_not_break_the_disk_backend";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("disk-hostile", Some(&runner_uids(63300)), false);
    let img = image_in(&d, "hostile.img", 16);
    let cfg = d.config_with(
        "hostile",
        "blk blk-hostile echo exit=0",
        "128M",
        1,
        &disk_toml(&img, false, None, None),
    );
    let mut backend = None;
    let out = run_held(&d, "hostile", &cfg, "stopped (exit 0)", |text| {
        // All the hostile cases and the follow-up I/O are done: the backend that served
        // them is the one started with the VM, still running.
        let pid = backend_pid(&d, "hostile", 0);
        let start = start_time(pid);
        assert!(
            text.contains("hostile: followup ok"),
            "{text}\n{}",
            d.dump()
        );
        assert!(
            proc_running(pid, start),
            "bulkhead-blk {pid} died\n{}",
            d.dump()
        );
        backend = Some((pid, start));
    });
    let results: Vec<(String, String)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("hostile: "))
        .filter(|l| !l.starts_with("followup"))
        .filter_map(|l| l.split_once(": "))
        .map(|(c, r)| (c.to_string(), r.trim().to_string()))
        .collect();
    let summary: String = results
        .iter()
        .map(|(c, r)| format!("  {c}: {r}\n"))
        .collect();
    let resets: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("hostile-reset: "))
        .collect();
    let context = format!(
        "per-case results:\n{summary}resets: {resets:?}\n--- console ---\n{out}\n--- {} ---\n{}",
        d.disk_log_path("hostile", 0).display(),
        std::fs::read_to_string(d.disk_log_path("hostile", 0)).unwrap_or_default()
    );
    let cases: Vec<&str> = results.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(cases, HOSTILE_CASES, "{context}");
    for (case, result) in &results {
        // IOERR or UNSUPP, or the chain given back without a status; never OK for a bad
        // request, never a claimed completion that left the status byte unwritten (255).
        // The one exception: a read of zero bytes is a valid (empty) request
        // (virtio 1.2 §5.2.6: data is a multiple of 512 bytes; 0 is), so OK is allowed.
        let ok = matches!(result.as_str(), "status 1" | "status 2" | "no completion")
            || (case == "zero-length-data" && result == "status 0");
        assert!(ok, "hostile case {case}: {result}\n{context}");
    }
    assert!(out.contains("hostile: followup ok"), "{context}");
    assert!(out.contains("exit: 0"), "{context}");
    let log = std::fs::read_to_string(d.disk_log_path("hostile", 0)).unwrap_or_default();
    assert!(
        !log.contains("panicked") && !log.contains("fatal"),
        "{context}"
    );
    // The follow-up wrote the original sectors back: the image is as it was (zeros).
    assert!(
        sectors_zero(&img, 0, 32768),
        "the hostile run changed the image\n{context}"
    );
    let (pid, start) = backend.expect("checked while held");
    assert!(
        wait_until(STEP, || !proc_exists(pid, start)),
        "bulkhead-blk {pid} outlived its VM"
    );
}

// ------------------------------------------------------------------------------------------
// 5. the disk backend's sandbox
// ------------------------------------------------------------------------------------------

#[test]
fn daemon_disk_backend_is_sandboxed() {
    let name = "daemon_disk_backend_is_sandboxed";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("disk-sandbox", Some(&runner_uids(63400)), false);
    let img = image_in(&d, "boxed.img", 16);
    // `blk` brings the device up (DRIVER_OK), so the vhost-user setup (memory table, kick
    // and call eventfds) is done by the time the guest ticks.
    let cfg = d.config_with(
        "boxed",
        "blk ticks=100",
        "128M",
        1,
        &disk_toml(&img, false, None, None),
    );
    let vm = d.create_config("boxed", &cfg);
    let con = d.console("boxed");
    assert!(
        con.stdout.wait_for("tick 1", STEP),
        "{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    assert!(
        blk_line(&con.stdout.text(), 0).is_some(),
        "{}",
        con.stdout.text()
    );
    drop(con);
    let pid = backend_pid(&d, "boxed", 0);
    let runner = vm.runner_pid.expect("runner pid");
    let status = |key: &str| {
        proc_status_field(pid, key).unwrap_or_else(|| panic!("/proc/{pid}/status has no {key}"))
    };
    let runner_uid = proc_id(runner, "Uid:");

    // Its own uid and gid (real, effective, saved, fs): not root, not the runner's.
    for key in ["Uid:", "Gid:"] {
        let ids: Vec<u32> = status(key)
            .split_whitespace()
            .map(|v| v.parse().expect("id"))
            .collect();
        assert_eq!(ids.len(), 4, "{key} {ids:?}");
        assert!(
            ids.iter().all(|&id| id == ids[0]),
            "bulkhead-blk {key} {ids:?}"
        );
        assert_ne!(ids[0], 0, "bulkhead-blk runs with {key} 0");
        assert_ne!(ids[0], runner_uid, "bulkhead-blk shares the runner's {key}");
        assert!(
            (63400..63450).contains(&ids[0]),
            "bulkhead-blk {key} {ids:?} outside the policy's range"
        );
    }
    assert_eq!(status("Groups:"), "", "supplementary groups");
    assert_eq!(status("Seccomp:"), "2", "seccomp filter mode");
    assert_eq!(status("NoNewPrivs:"), "1");

    // Namespaces: none shared with the daemon, nor with the runner.
    let daemon = d.pid();
    for ns in ["pid", "net", "mnt", "ipc", "uts"] {
        let ns_of = |p: i32| {
            std::fs::read_link(format!("/proc/{p}/ns/{ns}"))
                .unwrap_or_else(|e| panic!("/proc/{p}/ns/{ns}: {e}"))
        };
        assert_ne!(
            ns_of(pid),
            ns_of(daemon),
            "bulkhead-blk shares the daemon's {ns} namespace"
        );
        assert_ne!(
            ns_of(pid),
            ns_of(runner),
            "bulkhead-blk shares the runner's {ns} namespace"
        );
    }

    // Address space: the 128 MiB of guest RAM it maps + 3 GiB.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let address_space = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max address space"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    assert_eq!(address_space, Some((128u64 << 20) + (3 << 30)), "{limits}");

    // An empty root.
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root/"))
        .expect("read the backend's root")
        .map(|e| e.map(|e| e.file_name()))
        .collect();
    assert!(
        root.is_empty(),
        "bulkhead-blk's root is not empty: {root:?}"
    );

    // Only the descriptors it was handed (log, image, socket) or received (guest RAM,
    // eventfds), and /proc/loadavg read-only (opened before its root was taken: adaptive
    // polling stops while the host has more runnable threads than CPUs); no other host
    // path.
    let log = d.disk_log_path("boxed", 0);
    let mut seen = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy().into_owned();
        seen.push(format!("{} -> {t}", e.file_name().to_string_lossy()));
        let allowed = t == "/dev/null"
            || target == log
            || target == img
            || t.starts_with("/memfd:bulkhead-guest-ram")
            || t.starts_with("/memfd:bulkhead-inflight")
            || t.starts_with("/memfd:bulkhead-stats-")
            || t.starts_with("socket:[")
            || t.starts_with("anon_inode:");
        let loadavg = t == "/loadavg" || t == "/proc/loadavg";
        if loadavg {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .expect("fdinfo");
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .expect("fdinfo flags");
            assert_eq!(
                flags & libc::O_ACCMODE as u32,
                libc::O_RDONLY as u32,
                "{t} is not read-only: {info}"
            );
        }
        assert!(
            allowed || loadavg,
            "bulkhead-blk fd {t} is not allowed; all: {seen:?}"
        );
    }
    let has =
        |f: &dyn Fn(&str) -> bool| seen.iter().any(|s| f(s.split(" -> ").nth(1).unwrap_or("")));
    assert!(has(&|t| Path::new(t) == img), "no image fd: {seen:?}");
    assert!(
        has(&|t| t.starts_with("socket:[")),
        "no vhost-user socket: {seen:?}"
    );
    assert!(
        has(&|t| t.starts_with("/memfd:bulkhead-guest-ram")),
        "no guest RAM mapping fd: {seen:?}"
    );
    assert!(
        has(&|t| t == "anon_inode:[eventfd]"),
        "no kick/call eventfd: {seen:?}"
    );
    assert!(
        has(&|t| t.starts_with("/memfd:bulkhead-inflight")),
        "the runner handed over no in-flight region: {seen:?}"
    );
    assert!(
        has(&|t| t.starts_with("/memfd:bulkhead-stats-boxed-disk0")),
        "bulkheadd handed over no counters page: {seen:?}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("nofile");
    assert_eq!(
        open_files.split_whitespace().nth(3),
        Some("256"),
        "{open_files}"
    );
    // Still serving: the guest keeps running (and the backend with it).
    let start = start_time(pid);
    let out = d.cli(&["destroy", "boxed"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(
        wait_until(STEP, || !proc_exists(pid, start)),
        "bulkhead-blk {pid} outlived destroy"
    );
}

// ------------------------------------------------------------------------------------------
// 6. interop: standalone bulkhead-blk under QEMU and under the runner
// ------------------------------------------------------------------------------------------

/// A standalone `bulkhead-blk --socket SOCK --image IMG ARGS..`, listening; killed on drop.
fn standalone_blk(img: &Path, sock: &Path, args: &[&str]) -> Running {
    let mut c = Command::new(bin("bulkhead-blk"));
    c.arg("--socket")
        .arg(sock)
        .arg("--image")
        .arg(img)
        .args(args);
    let r = Running::spawn(c);
    assert!(
        r.stderr.wait_for("listening on", STEP),
        "bulkhead-blk did not listen\n{}",
        r.stderr.text()
    );
    r
}

/// Asserts that the standalone backend lives on after its frontend left.
fn assert_serves_on(blk: &mut Running, connections: usize) {
    let gone = wait_until(STEP, || {
        blk.stderr.text().matches("frontend disconnected").count() >= connections
    });
    assert!(
        gone,
        "bulkhead-blk never saw the frontend leave\n{}",
        blk.stderr.text()
    );
    assert!(
        blk.child.try_wait().expect("try_wait").is_none(),
        "bulkhead-blk exited after its frontend left\n{}",
        blk.stderr.text()
    );
    let err = blk.stderr.text();
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn qemu_drives_a_standalone_bulkhead_blk() {
    let name = "qemu_drives_a_standalone_bulkhead_blk";
    if !kvm_available(name) {
        return;
    }
    let Some(qemu) = qemu(name) else {
        return;
    };
    let (dir, img) = temp_image("blk-qemu", 64);
    let sock = dir.join("blk.sock");
    let mut blk = standalone_blk(&img, &sock, &["--serial", "qemu-disk"]);
    let mut c = Command::new(qemu);
    c.args([
        "-M",
        "pc",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "256",
    ])
    .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
    .args(["-numa", "node,memdev=mem", "-smp", "1"])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
    ])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
    .arg("-chardev")
    .arg(format!("socket,id=c0,path={}", sock.display()))
    .args(["-device", "vhost-user-blk-pci,chardev=c0"])
    .arg("-kernel")
    .arg(test_guest())
    .args([
        "-append",
        "blk blk-id blk-write=3:0:1024 blk-verify=3:0:1024 exit=0",
    ]);
    let out = run_complete(c, QEMU_RUN);
    let context = format!(
        "{}\n--- bulkhead-blk ---\n{}",
        out.dump(),
        blk.stderr.text()
    );
    // isa-debug-exit: QEMU exits with (value << 1) | 1, so guest status 0 is 1.
    assert_eq!(out.code, Some(1), "{context}");
    for line in [
        "blk-id: 'qemu-disk'",
        "blk-write: 1024 sectors ok status 0",
        "blk-verify: ok",
        "exit: 0",
    ] {
        assert!(out.stdout.contains(line), "lacks '{line}'\n{context}");
    }
    assert_eq!(blk_image_mismatch(&img, 3, 0, 1024), None, "{context}");
    assert!(
        sectors_zero(&img, 1024, 1024),
        "sectors after the range were touched"
    );
    // QEMU, a second implementation of the in-flight protocol, took our region and gave
    // it back.
    assert!(
        blk.stderr
            .text()
            .contains("tracking in-flight requests in the frontend's region"),
        "QEMU did not use the in-flight region\n{}",
        blk.stderr.text()
    );
    assert_serves_on(&mut blk, 1);
    drop(blk);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn runner_drives_a_standalone_bulkhead_blk_and_reconnects() {
    let name = "runner_drives_a_standalone_bulkhead_blk_and_reconnects";
    if !kvm_available(name) {
        return;
    }
    let (dir, img) = temp_image("blk-runner", 64);
    let sock = dir.join("blk.sock");
    let mut blk = standalone_blk(&img, &sock, &["--serial", "runner-disk", "--queues", "2"]);
    let mut c = runner_guest(
        "blk blk-id blk-queues=2 blk-write=3:0:1024 blk-verify=3:0:1024 exit=0",
        2,
        "256M",
    );
    c.arg("--disk-socket").arg(&sock);
    let out = run_complete(c, DEADLINE);
    let context = format!(
        "{}\n--- bulkhead-blk ---\n{}",
        out.dump(),
        blk.stderr.text()
    );
    assert_eq!(out.code, Some(0), "{context}");
    for line in [
        "blk-id: 'runner-disk'",
        "blk-write: 1024 sectors ok status 0",
        "blk-verify: ok",
        "blk-mq: 2 queues used",
    ] {
        assert!(out.stdout.contains(line), "lacks '{line}'\n{context}");
    }
    // Nothing killed the backend: a reconnect here is the runner mistaking a reply for a
    // hang-up (its watcher shares the socket with the thread that reads the replies).
    assert!(
        !out.stderr.contains("went away"),
        "spurious reconnect\n{context}"
    );
    assert_eq!(blk_image_mismatch(&img, 3, 0, 1024), None, "{context}");
    assert!(
        sectors_zero(&img, 1024, 1024),
        "sectors after the range were touched"
    );
    assert_serves_on(&mut blk, 1);

    // A second frontend on the same backend process finds the data. It also writes and
    // reads without the guest's checksum (blk-nohash, as bench-blk does): the data must
    // be the same pattern.
    let mut c = runner_guest(
        "blk blk-verify=3:0:1024 blk-nohash blk-write=4:1024:512 blk-read=0:1024 blk-verify=4:1024:512 exit=0",
        1,
        "128M",
    );
    c.arg("--disk-socket").arg(&sock);
    let out = run_complete(c, DEADLINE);
    let context = format!(
        "{}\n--- bulkhead-blk ---\n{}",
        out.dump(),
        blk.stderr.text()
    );
    assert_eq!(out.code, Some(0), "{context}");
    assert_eq!(out.stdout.matches("blk-verify: ok").count(), 2, "{context}");
    for line in [
        "blk-write: 512 sectors ok status 0",
        "blk-read: 1024 sectors ok status 0",
        "blk-checksum: none (blk-nohash)",
    ] {
        assert!(out.stdout.contains(line), "lacks '{line}'\n{context}");
    }
    assert_eq!(blk_image_mismatch(&img, 4, 1024, 512), None, "{context}");
    assert!(
        !out.stderr.contains("went away"),
        "spurious reconnect\n{context}"
    );
    assert_serves_on(&mut blk, 2);
    drop(blk);
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------------------------------
// 7. random I/O with a queue depth, checked against the host's replay of its seeds
// ------------------------------------------------------------------------------------------

/// The area and tokens of the random workload: writes of 4 KiB (32 in flight per queue)
/// and of 7 sectors, then reads of 4 KiB and of 3 sectors, over the first 8 MiB.
const RAND_AREA: (u64, u64) = (0, 16384);
const RAND_WRITES: [(u64, u64, u64, u64); 2] = [(11, 3000, 32, 4096), (12, 600, 8, 3584)];
const RAND_READS: [(u64, u64, u64, u64); 2] = [(13, 2000, 32, 4096), (14, 300, 4, 1536)];

fn rand_cmdline(queues: u16) -> String {
    let mut c = format!(
        "blk blk-queues={queues} blk-event-idx blk-rand-area={}:{}",
        RAND_AREA.0, RAND_AREA.1
    );
    for (seed, count, qd, bs) in RAND_WRITES {
        c += &format!(" blk-rand-write={seed}:{count}:{qd}:{bs}");
    }
    for (seed, count, qd, bs) in RAND_READS {
        c += &format!(" blk-rand={seed}:{count}:{qd}:{bs}");
    }
    c + " exit=0"
}

/// Checks a run of [`rand_cmdline`] on a zeroed `img`: every request completed, the image
/// holds exactly what the replay of the write seeds puts there (later writes over earlier
/// ones, nothing outside the area), and each read printed the checksum the replay computes
/// over that image.
fn check_rand_run(img: &Path, stdout: &str) -> Result<(), String> {
    use common::rand_replay::{first_difference, RandToken};
    let token = |(seed, count, _qd, bs): (u64, u64, u64, u64)| RandToken {
        seed,
        count,
        bs,
        area: RAND_AREA,
    };
    for (_, count, _, _) in RAND_WRITES {
        let line = format!("blk-rand: write {count} requests, {count} ok, 0 errors, status 0");
        stdout
            .contains(&line)
            .then_some(())
            .ok_or(format!("lacks '{line}'"))?;
    }
    let image = std::fs::read(img).map_err(|e| e.to_string())?;
    let mut want = vec![0u8; image.len()];
    for w in RAND_WRITES {
        token(w).apply_writes(&mut want);
    }
    if let Some(d) = first_difference(&image, &want) {
        return Err(format!("image differs from the replay: {d}"));
    }
    let sums: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("blk-rand-checksum: "))
        .collect();
    if sums.len() != RAND_READS.len() {
        return Err(format!("{} read checksums printed", sums.len()));
    }
    for (r, got) in RAND_READS.iter().zip(sums) {
        let expect = format!("{:#018x}", token(*r).read_checksum(&want));
        if got != expect {
            return Err(format!(
                "read seed {}: checksum {got}, replay {expect}",
                r.0
            ));
        }
    }
    let perf = stdout
        .lines()
        .filter(|l| l.starts_with("blk-perf: rand"))
        .count();
    (perf == 4)
        .then_some(())
        .ok_or(format!("{perf} blk-perf lines"))
}

#[test]
fn random_io_matches_a_host_replay_of_its_seeds() {
    let name = "random_io_matches_a_host_replay_of_its_seeds";
    if !kvm_available(name) {
        return;
    }
    for args in [
        &["--io-engine", "io-uring", "--poll-us", "0"][..],
        &["--io-engine", "threads", "--cache", "none"],
        &["--io-engine", "inline"],
        &[
            "--io-engine",
            "io-uring",
            "--cache",
            "none",
            "--poll-us",
            "50",
        ],
    ] {
        let (dir, img) = temp_image("blk-rand", 9);
        let sock = dir.join("blk.sock");
        let mut all = vec!["--queues", "2"];
        all.extend_from_slice(args);
        let mut blk = standalone_blk(&img, &sock, &all);
        let mut c = runner_guest(&rand_cmdline(2), 1, "256M");
        c.arg("--disk-socket").arg(&sock);
        let out = run_complete(c, DEADLINE);
        let context = format!(
            "bulkhead-blk {args:?}\n{}\n--- bulkhead-blk ---\n{}",
            out.dump(),
            blk.stderr.text()
        );
        assert_eq!(out.code, Some(0), "{context}");
        assert!(out.stdout.contains("blk-mq: 2 queues used"), "{context}");
        if let Err(e) = check_rand_run(&img, &out.stdout) {
            panic!("{e}\n{context}");
        }
        assert_serves_on(&mut blk, 1);
        drop(blk);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn qemu_runs_the_random_workload_unchanged() {
    let name = "qemu_runs_the_random_workload_unchanged";
    if !kvm_available(name) {
        return;
    }
    let Some(qemu) = qemu(name) else {
        return;
    };
    let (dir, img) = temp_image("blk-rand-qemu", 9);
    let mut c = Command::new(qemu);
    c.args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities"])
        .args(["-m", "256", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-nographic", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-drive")
        .arg(format!("file={},if=none,format=raw,id=d0", img.display()))
        .args([
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=2",
        ])
        .arg("-kernel")
        .arg(test_guest())
        .arg("-append")
        .arg(rand_cmdline(2));
    let out = run_complete(c, QEMU_RUN);
    // isa-debug-exit: QEMU exits with (value << 1) | 1, so guest status 0 is 1.
    assert_eq!(out.code, Some(1), "{}", out.dump());
    if let Err(e) = check_rand_run(&img, &out.stdout) {
        panic!("{e}\n{}", out.dump());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn daemon_disk_with_cache_none_is_served_o_direct() {
    let name = "daemon_disk_with_cache_none_is_served_o_direct";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("disk-direct", Some(&runner_uids(66700)), false);
    let img = image_in(&d, "direct.img", 16);
    let disks = format!(
        "{}cache = \"none\"\npoll_us = 50\n",
        disk_toml(&img, false, None, Some(2))
    );
    let cfg = d.config_with(
        "direct",
        "blk blk-queues=2 blk-write=7:0:4096 blk-verify=7:0:4096 blk-rand-write=5:500:16:4k echo exit=0",
        "128M",
        1,
        &disks,
    );
    let out = run_held(&d, "direct", &cfg, "stopped (exit 0)", |_| {
        // The backend's image fd is O_DIRECT.
        let pid = backend_pid(&d, "direct", 0);
        let mut flags = None;
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .flatten()
        {
            if std::fs::read_link(e.path()).is_ok_and(|t| t == img) {
                let fdinfo = std::fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    e.file_name().to_string_lossy()
                ))
                .expect("fdinfo");
                flags = line_value(&fdinfo, "flags:").and_then(|f| u32::from_str_radix(&f, 8).ok());
            }
        }
        let flags = flags.unwrap_or_else(|| panic!("bulkhead-blk {pid} does not hold the image"));
        assert_ne!(flags & libc::O_DIRECT as u32, 0, "image fd flags {flags:o}");
        // poll_us reaches the backend.
        let argv = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let argv: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
        assert!(
            argv.windows(2)
                .any(|w| w[0] == b"--poll-us" && w[1] == b"50"),
            "bulkhead-blk {pid} argv lacks --poll-us 50: {:?}",
            String::from_utf8_lossy(&argv.join(&b' '))
        );
    });
    for line in [
        "blk-write: 4096 sectors ok status 0",
        "blk-verify: ok",
        "blk-rand: write 500 requests, 500 ok, 0 errors, status 0",
    ] {
        assert!(out.contains(line), "lacks '{line}'\n{out}");
    }
    let log = std::fs::read_to_string(d.disk_log_path("direct", 0)).unwrap_or_default();
    assert!(log.contains("cache none"), "{log}");
}
