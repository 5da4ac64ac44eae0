//! Per-device counters, `bulkhead top`, and disk rate limits enforced in `bulkhead-blk`:
//! the test guest measures its own I/O rate (`blk-perf`) against a limited disk, before
//! and after `bulkhead device-set-limit` and after its backend is killed; `top --json`
//! shows counters moving and surviving a backend kill; a policy cap refuses a config.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/stream.rs"]
mod stream;

use std::path::Path;
use std::time::Duration;

use common::json::{self, Json};
use common::*;
use daemon::*;
use stream::{serving, stream_vm};

/// How long one measured run may take, at most.
const RUN: Duration = Duration::from_secs(60);

/// The complete `blk-perf` lines the guest printed so far.
fn perf_lines(con: &Running) -> Vec<String> {
    let text = con.stdout.text();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter(|l| l.starts_with("blk-perf: rand"))
        .map(str::to_owned)
        .collect()
}

/// `key=` value of a blk-perf line, as a number.
fn perf_value(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// MiB/s of a blk-perf line, from its exact `bytes=` and `us=` (its `mibps=` has one
/// decimal).
fn perf_mibps(line: &str) -> f64 {
    perf_value(line, "bytes=") / (perf_value(line, "us=") / 1e6) / f64::from(1u32 << 20)
}

/// Waits for the `n`th blk-perf line (1-based) and returns it.
fn wait_perf(d: &Bulkheadd, con: &Running, n: usize) -> String {
    assert!(
        wait_until(RUN, || perf_lines(con).len() >= n),
        "blk-perf line {n} did not come\n{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    perf_lines(con)[n - 1].clone()
}

fn assert_within(what: &str, got: f64, want: f64, pct: f64, context: &str) {
    eprintln!("{what}: measured {got}, limit {want}");
    let lo = want * (1.0 - pct / 100.0);
    let hi = want * (1.0 + pct / 100.0);
    assert!(
        (lo..=hi).contains(&got),
        "{what}: measured {got}, want {want} ±{pct}%\n{context}"
    );
}

/// `tsc-khz=` for the guest's timing: the host's TSC rate (the guest cannot measure it
/// on every host, and assumes 2 GHz otherwise), or nothing if /proc/cpuinfo lacks it.
fn tsc_khz() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|mhz| format!("tsc-khz={}", (mhz * 1000.0) as u64))
        .unwrap_or_default()
}

/// A VM with one disk on `img` limited by `limits_toml` that runs the blk tokens `work`
/// over one queue.
fn limited_vm(d: &Bulkheadd, name: &str, img: &Path, limits_toml: &str, work: &str) -> Running {
    limited_vm_queues(d, name, img, limits_toml, work, 1)
}

/// [`limited_vm`] with `queues` queues (the guest round-robins its requests over them; one
/// limit holds for the disk).
fn limited_vm_queues(
    d: &Bulkheadd,
    name: &str,
    img: &Path,
    limits_toml: &str,
    work: &str,
    queues: u32,
) -> Running {
    let extra = format!(
        "[[disks]]\npath = \"{}\"\nqueues = {queues}\n[disks.limits]\n{limits_toml}",
        img.display()
    );
    let cmdline = format!("{} blk blk-queues={queues} {work} echo exit=0", tsc_khz());
    let cfg = d.config_with(name, &cmdline, "256M", 1, &extra);
    d.create_config(name, &cfg);
    let con = d.console(name);
    assert!(
        con.stdout.wait_for("blk0:", STEP),
        "{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    con
}

#[test]
fn disk_iops_limit_holds_after_set_limit_and_backend_kill() {
    let name = "disk_iops_limit_holds_after_set_limit_and_backend_kill";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("rl-iops", Some(&runner_uids(68000)), false);
    let (dir, img) = temp_image("rl-iops", 64);
    // Run 1: 3000 reads at 1000/s (3 s). Run 2 is cut by the set-limit (not measured);
    // run 3 at 500/s; run 4 is cut by the kill; run 5 at 500/s with the new backend.
    let work = "blk-rand=1:3000:8:4K blk-rand=2:1500:8:4K blk-rand=3:1500:8:4K \
                blk-rand=4:1500:8:4K blk-rand=5:1500:8:4K";
    let con = limited_vm(&d, "rliops", &img, "iops = 1000\n", work);
    let ctx = |con: &Running| format!("{}\n{}", con.stdout.text(), d.dump());

    let first = wait_perf(&d, &con, 1);
    let out = d.cli(&["device-set-limit", "rliops", "disk0", "--iops", "500"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.contains("500 requests/s"), "{}", out.dump());
    assert_within(
        "run 1 IOPS",
        perf_value(&first, "iops="),
        1000.0,
        10.0,
        &ctx(&con),
    );

    let third = wait_perf(&d, &con, 3);
    assert_within(
        "run 3 IOPS",
        perf_value(&third, "iops="),
        500.0,
        10.0,
        &ctx(&con),
    );

    // Kill the serving backend while run 4 goes on; run 5 runs on its successor.
    let pid = serving(&d, "rliops").unwrap_or_else(|| panic!("no serving backend\n{}", ctx(&con)));
    send_signal(pid, libc::SIGKILL);
    assert!(
        wait_until(STEP, || serving(&d, "rliops").is_some_and(|p| p != pid)),
        "no new backend after the kill\n{}",
        ctx(&con)
    );
    assert!(
        perf_lines(&con).len() < 5,
        "run 5 ended before the new backend served\n{}",
        ctx(&con)
    );
    let fifth = wait_perf(&d, &con, 5);
    assert_within(
        "run 5 IOPS",
        perf_value(&fifth, "iops="),
        500.0,
        10.0,
        &ctx(&con),
    );
    assert!(
        con.stdout
            .wait_for("blk-rand: read 1500 requests, 1500 ok", STEP),
        "{}",
        ctx(&con)
    );
    let text = con.stdout.text();
    assert!(!text.contains(" errors, status 1"), "{text}");

    // The counters kept counting across the kill: every request of every run.
    let info = d.cli(&["info", "rliops", "--json"]);
    assert_eq!(info.code, Some(0), "{}", info.dump());
    let v = json::parse(&info.stdout).expect("info json");
    let disk0 = &v
        .get("stats")
        .and_then(|s| s.get("devices"))
        .and_then(|d| d.as_array())
        .expect("devices")[0];
    let reads: i64 = disk0
        .get("queues")
        .and_then(|q| q.as_array())
        .expect("queues")
        .iter()
        .map(|q| q.get("reads").and_then(|r| r.as_i64()).unwrap_or(0))
        .sum();
    assert!(reads >= 9000, "reads {reads}\n{}", info.stdout);
    assert_eq!(
        disk0
            .get("limits")
            .and_then(|l| l.get("ops"))
            .and_then(|o| o.as_i64()),
        Some(500),
        "{}",
        info.stdout
    );
    let _ = d.cli(&["destroy", "rliops"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn disk_bandwidth_limit_holds_and_changes_live() {
    let name = "disk_bandwidth_limit_holds_and_changes_live";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("rl-bw", Some(&runner_uids(68100)), false);
    let (dir, img) = temp_image("rl-bw", 64);
    // Over two queues: 24 MiB of 64 KiB reads at 8 MiB/s (3 s); run 2 is cut by the
    // set-limit; run 3: 12 MiB at 4 MiB/s (3 s).
    let work = "blk-rand=1:384:8:64K blk-rand=2:192:8:64K blk-rand=3:192:8:64K";
    let con = limited_vm_queues(&d, "rlbw", &img, "bandwidth = \"8M\"\n", work, 2);
    let ctx = |con: &Running| format!("{}\n{}", con.stdout.text(), d.dump());
    let first = wait_perf(&d, &con, 1);
    let out = d.cli(&["device-set-limit", "rlbw", "disk0", "--bandwidth", "4M"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert_within("run 1 MiB/s", perf_mibps(&first), 8.0, 10.0, &ctx(&con));
    let third = wait_perf(&d, &con, 3);
    assert_within("run 3 MiB/s", perf_mibps(&third), 4.0, 10.0, &ctx(&con));
    assert!(
        con.stdout.wait_for("blk-mq: 2 queues used", STEP),
        "{}",
        ctx(&con)
    );
    let _ = d.cli(&["destroy", "rlbw"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sum of `key` over every queue of disk0 of the VM in a `top --json` frame.
fn disk_sum(frame: &Json, vm: &str, key: &str) -> i64 {
    frame
        .get("vms")
        .and_then(|v| v.as_array())
        .and_then(|vms| {
            vms.iter()
                .find(|v| v.get("name").and_then(|n| n.as_str()) == Some(vm))
        })
        .and_then(|v| v.get("devices"))
        .and_then(|d| d.as_array())
        .and_then(|d| d.first())
        .and_then(|d| d.get("queues"))
        .and_then(|q| q.as_array())
        .map_or(-1, |qs| {
            qs.iter()
                .map(|q| q.get(key).and_then(|x| x.as_i64()).unwrap_or(0))
                .sum()
        })
}

fn vm_num(frame: &Json, vm: &str, key: &str) -> f64 {
    let v = frame
        .get("vms")
        .and_then(|v| v.as_array())
        .and_then(|vms| {
            vms.iter()
                .find(|v| v.get("name").and_then(|n| n.as_str()) == Some(vm))
        })
        .and_then(|v| v.get(key))
        .cloned();
    match v {
        Some(Json::Num(n)) => n,
        other => panic!("{key} of {vm}: {other:?}"),
    }
}

/// Two frames of `bulkhead top --batch --iterations 2 --json`.
fn top_frames(d: &Bulkheadd) -> (Json, Json) {
    let out = d.cli(&[
        "top",
        "--batch",
        "--iterations",
        "2",
        "--delay",
        "1",
        "--json",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let frames: Vec<Json> = out
        .stdout
        .lines()
        .map(|l| json::parse(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(frames.len(), 2, "{}", out.stdout);
    (frames[0].clone(), frames[1].clone())
}

#[test]
fn top_shows_counters_moving_and_surviving_a_backend_kill() {
    let name = "top_shows_counters_moving_and_surviving_a_backend_kill";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("rl-top", Some(&runner_uids(68200)), false);
    let (dir, img) = temp_image("rl-top", 16);
    let con = stream_vm(&d, "rltop", &img, 7, "", "");
    let ctx = || format!("{}\n{}", con.stdout.text(), d.dump());
    assert!(
        wait_until(STEP, || con.stdout.text().contains("blk-stream: pass")),
        "no stream pass\n{}",
        ctx()
    );
    let (a, b) = top_frames(&d);
    let (wa, wb) = (
        disk_sum(&a, "rltop", "writes"),
        disk_sum(&b, "rltop", "writes"),
    );
    assert!(wa > 0 && wb > wa, "writes {wa} -> {wb}\n{}", ctx());
    let (ba, bb) = (
        disk_sum(&a, "rltop", "bytes_written"),
        disk_sum(&b, "rltop", "bytes_written"),
    );
    assert!(bb > ba, "bytes written {ba} -> {bb}");
    assert!(vm_num(&b, "rltop", "vbd_wr") >= wb as f64);
    let (ca, cb) = (
        vm_num(&a, "rltop", "cpu_secs"),
        vm_num(&b, "rltop", "cpu_secs"),
    );
    assert!(cb > ca, "CPU seconds {ca} -> {cb}\n{}", ctx());
    assert!(vm_num(&b, "rltop", "cpu_percent") > 0.0);
    // The runner's per-vCPU counters: both vCPUs exited to it (the guest's port I/O).
    let vcpus = b
        .get("vms")
        .and_then(|v| v.as_array())
        .and_then(|vms| vms.first())
        .and_then(|v| v.get("vcpu_stats"))
        .and_then(|v| v.as_array())
        .map(|v| v.to_vec())
        .unwrap_or_default();
    assert_eq!(vcpus.len(), 2, "{b:?}");
    assert!(
        vcpus
            .iter()
            .all(|v| v.get("exits").and_then(|e| e.as_i64()).unwrap_or(0) > 0),
        "{vcpus:?}"
    );
    // The text table, as xentop -b prints it.
    let out = d.cli(&["top", "-b", "-i", "1"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.starts_with("NAME "), "{}", out.stdout);
    assert!(out.stdout.contains("VBD_WR"), "{}", out.stdout);
    assert!(out.stdout.contains("\nrltop "), "{}", out.stdout);

    // Kill the backend: its successor counts on from where it was.
    let pid = serving(&d, "rltop").unwrap_or_else(|| panic!("no backend\n{}", ctx()));
    send_signal(pid, libc::SIGKILL);
    assert!(
        wait_until(STEP, || serving(&d, "rltop").is_some_and(|p| p != pid)),
        "no new backend\n{}",
        ctx()
    );
    let (c, e) = top_frames(&d);
    let (wc, we) = (
        disk_sum(&c, "rltop", "writes"),
        disk_sum(&e, "rltop", "writes"),
    );
    assert!(
        wc >= wb && we > wc,
        "writes {wb} -> {wc} -> {we}\n{}",
        ctx()
    );
    assert!(vm_num(&e, "rltop", "restarts") >= 1.0);
    assert!(vm_num(&e, "rltop", "cpu_secs") >= cb);

    let m = d.cli(&["metrics"]);
    assert_eq!(m.code, Some(0), "{}", m.dump());
    assert!(
        m.stdout
            .contains("bulkhead_device_writes_total{vm=\"rltop\",device=\"disk0\"}"),
        "{}",
        m.stdout
    );
    let _ = d.cli(&["destroy", "rltop"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn policy_cap_refuses_a_config_above_it_and_a_set_limit_above_it() {
    let name = "policy_cap_refuses_a_config_above_it_and_a_set_limit_above_it";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let policy = format!(
        "[limits]\nmax_disk_iops = 500\ndefault_disk_bandwidth = \"16M\"\n{}",
        runner_uids(68300)
    );
    let d = Bulkheadd::start("rl-cap", Some(&policy), false);
    let (dir, img) = temp_image("rl-cap", 8);
    let disk = |limits: &str| {
        format!(
            "[[disks]]\npath = \"{}\"\nqueues = 1\n{limits}",
            img.display()
        )
    };
    let cfg = d.config_with(
        "rlcap",
        "blk echo exit=0",
        "128M",
        1,
        &disk("[disks.limits]\niops = 1000\n"),
    );
    let out = d.cli(&["create", cfg.to_str().expect("utf-8")]);
    assert_eq!(out.code, Some(3), "{}", out.dump());
    assert!(
        out.stderr.contains("denied by rule 'limits.max_disk_iops'"),
        "{}",
        out.dump()
    );
    assert!(d.vm("rlcap").is_none());

    // Within the cap: the disk gets the policy's default bandwidth and the cap as its IOPS.
    let cfg = d.config_with("rlcap", "blk echo", "128M", 1, &disk(""));
    d.create_config("rlcap", &cfg);
    let info = d.cli(&["info", "rlcap", "--json"]);
    let v = json::parse(&info.stdout).expect("json");
    let limits = v
        .get("stats")
        .and_then(|s| s.get("devices"))
        .and_then(|d| d.as_array())
        .and_then(|d| d.first())
        .and_then(|d| d.get("limits"))
        .cloned()
        .expect("limits");
    assert_eq!(
        limits.get("ops").and_then(|o| o.as_i64()),
        Some(500),
        "{}",
        info.stdout
    );
    assert_eq!(
        limits.get("bandwidth").and_then(|o| o.as_i64()),
        Some(16 << 20),
        "{}",
        info.stdout
    );
    let text = d.cli(&["info", "rlcap"]).stdout;
    assert!(
        text.contains("limits 16777216 B/s (burst 0), 500 requests/s (burst 0)"),
        "{text}"
    );
    let out = d.cli(&["device-set-limit", "rlcap", "disk0", "--iops", "600"]);
    assert_eq!(out.code, Some(3), "{}", out.dump());
    assert!(
        out.stderr.contains("limits.max_disk_iops"),
        "{}",
        out.dump()
    );
    let _ = d.cli(&["destroy", "rlcap"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reads counted for disk0 of `vm`, from `info --json`.
fn info_reads(d: &Bulkheadd, vm: &str) -> (i64, i64) {
    let info = d.cli(&["info", vm, "--json"]);
    assert_eq!(info.code, Some(0), "{}", info.dump());
    let v = json::parse(&info.stdout).expect("info json");
    let disk0 = v
        .get("stats")
        .and_then(|s| s.get("devices"))
        .and_then(|d| d.as_array())
        .and_then(|d| d.first())
        .cloned()
        .unwrap_or_else(|| panic!("no disk0 stats\n{}", info.stdout));
    let reads = disk0
        .get("queues")
        .and_then(|q| q.as_array())
        .map_or(0, |qs| {
            qs.iter()
                .map(|q| q.get("reads").and_then(|r| r.as_i64()).unwrap_or(0))
                .sum()
        });
    let ops = disk0
        .get("limits")
        .and_then(|l| l.get("ops"))
        .and_then(|o| o.as_i64())
        .unwrap_or(-1);
    (reads, ops)
}

#[test]
fn counters_and_limits_survive_a_bulkheadd_restart() {
    let name = "counters_and_limits_survive_a_bulkheadd_restart";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let mut d = Bulkheadd::start("rl-adopt", Some(&runner_uids(68600)), false);
    let (dir, img) = temp_image("rl-adopt", 64);
    // Run 1 before the restart; the rest after it (one that starts after the set-limit
    // is measured).
    let work = "blk-rand=1:1500:8:4K blk-rand=2:1500:8:4K blk-rand=3:3000:8:4K \
                blk-rand=4:3000:8:4K";
    let con = limited_vm(&d, "rladopt", &img, "iops = 500\n", work);
    let ctx = |con: &Running, d: &Bulkheadd| format!("{}\n{}", con.stdout.text(), d.dump());
    wait_perf(&d, &con, 1);
    let (before, ops) = info_reads(&d, "rladopt");
    assert!(before >= 1500, "reads {before}");
    assert_eq!(ops, 500);
    d.terminate();
    d.launch();
    // The console went with the old daemon: attach again.
    let con = d.console("rladopt");
    // The re-adopted VM's counters page is the one its backend holds: counts go on.
    let (after, ops) = info_reads(&d, "rladopt");
    assert!(
        after >= before,
        "reads {before} -> {after}\n{}",
        ctx(&con, &d)
    );
    assert_eq!(ops, 500, "{}", ctx(&con, &d));
    assert!(
        wait_until(STEP, || info_reads(&d, "rladopt").0 > after),
        "counters stopped after the restart\n{}",
        ctx(&con, &d)
    );
    // A limit set after the restart reaches the backend: the first run that starts after
    // it (the second blk-perf line from now) holds it.
    let seen = perf_lines(&con).len();
    let out = d.cli(&["device-set-limit", "rladopt", "disk0", "--iops", "1000"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(!out.stdout.contains("enforces none"), "{}", out.dump());
    let line = wait_perf(&d, &con, seen + 2);
    assert_within(
        "a run after the restart and set-limit, IOPS",
        perf_value(&line, "iops="),
        1000.0,
        10.0,
        &ctx(&con, &d),
    );
    let _ = d.cli(&["destroy", "rladopt"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_throttled_disk_is_not_taken_for_a_hung_one() {
    let name = "a_throttled_disk_is_not_taken_for_a_hung_one";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("rl-hang", Some(&runner_uids(68700)), false);
    let (dir, img) = temp_image("rl-hang", 16);
    // 1 MiB reads at 256 KiB/s: each waits ~4 s for its rate, twice the hang timeout (2 s).
    let con = limited_vm(
        &d,
        "rlhang",
        &img,
        "bandwidth = \"256K\"\n",
        "blk-rand=1:3:1:1M",
    );
    let line = wait_perf(&d, &con, 1);
    let text = con.stdout.text();
    assert!(
        text.contains("blk-rand: read 3 requests, 3 ok, 0 errors"),
        "{}\n{}",
        text,
        d.dump()
    );
    assert_eq!(
        stream::restarts(&d, "rlhang"),
        0,
        "the throttled backend was replaced\n{}",
        d.dump()
    );
    // The first request is admitted at once (into debt); each later one waits for the
    // 1 MiB before it to be paid at 256 KiB/s: about 2 x 4 s in all.
    let secs = perf_value(&line, "us=") / 1e6;
    assert!((7.0..=9.5).contains(&secs), "3 reads took {secs} s\n{line}");
    let _ = d.cli(&["destroy", "rlhang"]);
    let _ = std::fs::remove_dir_all(&dir);
}
