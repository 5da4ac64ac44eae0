//! `bulkhead top` (xentop's columns: a full-screen view on a terminal, `--batch` and
//! `--json` for scripts) and `bulkhead metrics` (Prometheus text exposition), both built
//! from `bulkheadd`'s per-VM counters ([`Request::Stats`]).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_ipc::control::{DeviceStats, Reply, Request, VmStats};
use serde::Serialize;

use super::{call, format, print, Failure, Streams, REPLY_TIMEOUT};

/// How rows are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// By name.
    Name,
    /// By CPU(%), highest first.
    Cpu,
    /// By memory, largest first.
    Mem,
    /// By disk requests (VBD_RD + VBD_WR), most first.
    Vbd,
    /// By network bytes (NETTX + NETRX), most first.
    Net,
    /// By device restarts, most first.
    Restarts,
}

/// What `top` was asked for.
#[derive(Debug, Clone)]
pub struct TopOptions {
    /// Print plain text frames, no screen control (xentop -b).
    pub batch: bool,
    /// Stop after this many frames.
    pub iterations: Option<u32>,
    /// Seconds between frames.
    pub delay: f64,
    /// One JSON object per frame, one per line.
    pub json: bool,
    /// Row order.
    pub sort: SortKey,
}

/// One VM's row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    name: String,
    state: String,
    cpu_secs: f64,
    cpu_percent: f64,
    mem_k: u64,
    vcpus: u8,
    nettx_k: u64,
    netrx_k: u64,
    vbd_rd: u64,
    vbd_wr: u64,
    vbd_oo: u64,
    vbd_rsect: u64,
    vbd_wsect: u64,
    restarts: u64,
    vcpu_stats: Vec<bulkhead_ipc::runner::VcpuCounters>,
    devices: Vec<DeviceStats>,
}

/// One frame of JSON output.
#[derive(Serialize)]
struct Frame<'a> {
    iteration: u32,
    time_unix: f64,
    vms: &'a [Row],
}

fn sum(d: &DeviceStats, f: impl Fn(&bulkhead_ipc::control::QueueStats) -> u64) -> u64 {
    d.queues.iter().map(f).fold(0, u64::saturating_add)
}

/// The rows for `now`, with CPU(%) from `before` (taken `wall` earlier).
pub fn rows(now: &[VmStats], before: Option<(&[VmStats], Duration)>) -> Vec<Row> {
    now.iter()
        .map(|vm| {
            let name = &vm.summary.name;
            let cpu_percent = before
                .and_then(|(prev, wall)| {
                    let p = prev.iter().find(|p| &p.summary.name == name)?;
                    let d = vm.cpu_ns.saturating_sub(p.cpu_ns) as f64;
                    (wall.as_nanos() > 0).then(|| d * 100.0 / wall.as_nanos() as f64)
                })
                .unwrap_or(0.0);
            let disks = || vm.devices.iter().filter(|d| d.device.starts_with("disk"));
            let nics = || vm.devices.iter().filter(|d| d.device.starts_with("nic"));
            let total =
                |it: &mut dyn Iterator<Item = &DeviceStats>,
                 f: &dyn Fn(&bulkhead_ipc::control::QueueStats) -> u64| {
                    it.map(|d| sum(d, f)).fold(0, u64::saturating_add)
                };
            // NIC queue records: even = receive (from the guest's view), odd = transmit.
            let net = |parity: usize| {
                nics()
                    .map(|d| {
                        d.queues
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| i % 2 == parity)
                            .map(|(_, q)| q.bytes_read)
                            .fold(0, u64::saturating_add)
                    })
                    .fold(0, u64::saturating_add)
            };
            Row {
                name: format::sanitize(name),
                state: format::state(&vm.summary.state),
                cpu_secs: vm.cpu_ns as f64 / 1e9,
                cpu_percent,
                mem_k: vm.summary.memory_mib.saturating_mul(1024),
                vcpus: vm.summary.vcpus,
                nettx_k: net(1) / 1024,
                netrx_k: net(0) / 1024,
                vbd_rd: total(&mut disks(), &|q| q.reads),
                vbd_wr: total(&mut disks(), &|q| q.writes),
                vbd_oo: total(&mut disks(), &|q| q.throttled),
                vbd_rsect: total(&mut disks(), &|q| q.bytes_read) / 512,
                vbd_wsect: total(&mut disks(), &|q| q.bytes_written) / 512,
                restarts: vm
                    .devices
                    .iter()
                    .map(|d| u64::from(d.restarts))
                    .fold(0, u64::saturating_add),
                vcpu_stats: vm.vcpus.clone(),
                devices: vm.devices.clone(),
            }
        })
        .collect()
}

fn sort(rows: &mut [Row], key: SortKey) {
    match key {
        SortKey::Name => rows.sort_by(|a, b| a.name.cmp(&b.name)),
        SortKey::Cpu => rows.sort_by(|a, b| b.cpu_percent.total_cmp(&a.cpu_percent)),
        SortKey::Mem => rows.sort_by_key(|r| std::cmp::Reverse(r.mem_k)),
        SortKey::Vbd => rows.sort_by_key(|r| std::cmp::Reverse(r.vbd_rd.saturating_add(r.vbd_wr))),
        SortKey::Net => {
            rows.sort_by_key(|r| std::cmp::Reverse(r.nettx_k.saturating_add(r.netrx_k)))
        }
        SortKey::Restarts => rows.sort_by_key(|r| std::cmp::Reverse(r.restarts)),
    }
}

/// The text table (xentop's header names).
pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<16} {:<10} {:>9} {:>7} {:>9} {:>5} {:>9} {:>9} {:>8} {:>8} {:>7} {:>10} {:>10} {:>8}\n",
        "NAME",
        "STATE",
        "CPU(sec)",
        "CPU(%)",
        "MEM(k)",
        "VCPUS",
        "NETTX(k)",
        "NETRX(k)",
        "VBD_RD",
        "VBD_WR",
        "VBD_OO",
        "VBD_RSECT",
        "VBD_WSECT",
        "RESTARTS"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<16} {:<10} {:>9.0} {:>7.1} {:>9} {:>5} {:>9} {:>9} {:>8} {:>8} {:>7} {:>10} {:>10} {:>8}\n",
            r.name,
            r.state,
            r.cpu_secs,
            r.cpu_percent,
            r.mem_k,
            r.vcpus,
            r.nettx_k,
            r.netrx_k,
            r.vbd_rd,
            r.vbd_wr,
            r.vbd_oo,
            r.vbd_rsect,
            r.vbd_wsect,
            r.restarts
        ));
    }
    s
}

/// Per-vCPU and per-device lines under a VM's row in the full-screen view.
fn device_lines(r: &Row) -> String {
    let mut s = String::new();
    for (i, v) in r.vcpu_stats.iter().enumerate() {
        s.push_str(&format!(
            "    vcpu{i:<2} exits {:>12} in KVM_RUN {:>9.1} s\n",
            v.exits,
            v.run_ns as f64 / 1e9
        ));
    }
    for d in &r.devices {
        let l = &d.limits;
        s.push_str(&format!(
            "    {:<6} reqs {:>10} rd {:>8} wr {:>8} err {:>5} throttled {:>6} ({:.1} s) restarts {:>3} limits {} B/s {} ops/s\n",
            format::sanitize(&d.device),
            sum(d, |q| q.requests),
            sum(d, |q| q.reads),
            sum(d, |q| q.writes),
            sum(d, |q| q.errors),
            sum(d, |q| q.throttled),
            sum(d, |q| q.throttled_ns) as f64 / 1e9,
            d.restarts,
            if l.bandwidth > 0 { l.bandwidth.to_string() } else { "-".into() },
            if l.ops > 0 { l.ops.to_string() } else { "-".into() },
        ));
    }
    s
}

fn fetch(socket: &Path) -> Result<Vec<VmStats>, Failure> {
    match call(socket, &Request::Stats { name: None }, REPLY_TIMEOUT)? {
        Reply::Stats { vms } => Ok(vms),
        other => Err(Failure::unexpected("top", &other)),
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `bulkhead top`.
pub fn top(socket: &Path, opts: &TopOptions, io: &mut Streams<'_>) -> Result<(), Failure> {
    if !(opts.delay.is_finite() && opts.delay > 0.0 && opts.delay <= 3600.0) {
        return Err(Failure {
            status: super::EXIT_USAGE,
            message: "--delay must be between 0 and 3600 seconds".into(),
        });
    }
    let interactive = !opts.batch
        && !opts.json
        && io.stdin_is_tty
        && std::io::IsTerminal::is_terminal(&std::io::stdout());
    if interactive {
        return full_screen(socket, opts, io);
    }
    let mut before: Option<(Vec<VmStats>, Instant)> = None;
    let mut i = 0u32;
    loop {
        let now = fetch(socket)?;
        let t = Instant::now();
        let mut r = rows(
            &now,
            before
                .as_ref()
                .map(|(p, at)| (p.as_slice(), t.duration_since(*at))),
        );
        sort(&mut r, opts.sort);
        if opts.json {
            let frame = Frame {
                iteration: i,
                time_unix: unix_now(),
                vms: &r,
            };
            let text = serde_json::to_string(&frame)
                .map_err(|e| Failure::new(format!("cannot encode JSON: {e}")))?;
            print(io.stdout, &format!("{text}\n"))?;
        } else {
            print(io.stdout, &table(&r))?;
        }
        before = Some((now, t));
        i += 1;
        if opts.iterations.is_some_and(|n| i >= n) {
            return Ok(());
        }
        if !opts.json {
            print(io.stdout, "\n")?;
        }
        std::thread::sleep(Duration::from_secs_f64(opts.delay));
    }
}

/// Waits up to `wait` for a key on `fd`; None if none came.
fn key(fd: BorrowedFd<'_>, wait: Duration) -> Option<u8> {
    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
    match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms)) {
        Ok(n) if n > 0 => {
            let mut b = [0u8; 1];
            match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut b) {
                Ok(1) => Some(b[0]),
                _ => Some(b'q'),
            }
        }
        _ => None,
    }
}

/// The full-screen view: redraws every `delay`; keys: q quits, n/c/m/v/x/r sort by name,
/// CPU, memory, disk, network, restarts; + and - change the delay; d shows devices.
fn full_screen(socket: &Path, opts: &TopOptions, io: &mut Streams<'_>) -> Result<(), Failure> {
    let _raw = super::console::RawMode::enter()?;
    let stdin = std::io::stdin();
    let fd = stdin.as_fd();
    let mut sort_key = opts.sort;
    let mut delay = opts.delay;
    let mut devices = true;
    let mut before: Option<(Vec<VmStats>, Instant)> = None;
    let mut frames = 0u32;
    let end = |io: &mut Streams<'_>| print(io.stdout, "\x1b[?25h\r\n");
    loop {
        let now = fetch(socket)?;
        let t = Instant::now();
        let mut r = rows(
            &now,
            before
                .as_ref()
                .map(|(p, at)| (p.as_slice(), t.duration_since(*at))),
        );
        sort(&mut r, sort_key);
        let mut screen = format!(
            "\x1b[H\x1b[2J\x1b[?25lbulkhead top - {} VMs, every {delay:.1} s, sorted by {sort_key:?} \
             (q quit, n/c/m/v/x/r sort, +/- delay, d devices)\n\n",
            r.len()
        );
        for (i, line) in table(&r).lines().enumerate() {
            screen.push_str(line);
            screen.push('\n');
            if devices && i > 0 {
                if let Some(row) = r.get(i - 1) {
                    screen.push_str(&device_lines(row));
                }
            }
        }
        print(io.stdout, &screen.replace('\n', "\r\n"))?;
        before = Some((now, t));
        frames += 1;
        if opts.iterations.is_some_and(|n| frames >= n) {
            return end(io);
        }
        let deadline = Instant::now() + Duration::from_secs_f64(delay);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match key(fd, left) {
                None => break,
                Some(b'q') | Some(b'Q') | Some(3) => return end(io),
                Some(b'n') => sort_key = SortKey::Name,
                Some(b'c') => sort_key = SortKey::Cpu,
                Some(b'm') => sort_key = SortKey::Mem,
                Some(b'v') => sort_key = SortKey::Vbd,
                Some(b'x') => sort_key = SortKey::Net,
                Some(b'r') => sort_key = SortKey::Restarts,
                Some(b'd') => devices = !devices,
                Some(b'+') => delay = (delay * 2.0).min(60.0),
                Some(b'-') => delay = (delay / 2.0).max(0.1),
                Some(_) => continue,
            }
            break;
        }
    }
}

/// A Prometheus label value, escaped (names are validated by bulkheadd; escape anyway).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `vm="NAME"` label.
fn vm_label(vm: &VmStats) -> String {
    format!("vm=\"{}\"", esc(&vm.summary.name))
}

/// Prometheus text exposition of every VM's counters.
pub fn metrics(vms: &[VmStats]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{{{labels}}} {v}\n"));
        }
    };
    family(
        "bulkhead_vm_cpu_seconds_total",
        "counter",
        "CPU time of the VM's runner and device backends.",
        vms.iter()
            .map(|vm| (vm_label(vm), vm.cpu_ns as f64 / 1e9))
            .collect(),
    );
    family(
        "bulkhead_vm_memory_bytes",
        "gauge",
        "Guest RAM.",
        vms.iter()
            .map(|vm| {
                (
                    vm_label(vm),
                    (vm.summary.memory_mib.saturating_mul(1 << 20)) as f64,
                )
            })
            .collect(),
    );
    family(
        "bulkhead_vm_vcpus",
        "gauge",
        "vCPUs.",
        vms.iter()
            .map(|vm| (vm_label(vm), f64::from(vm.summary.vcpus)))
            .collect(),
    );
    let per_device = |f: &dyn Fn(&DeviceStats) -> u64| -> Vec<(String, f64)> {
        vms.iter()
            .flat_map(|vm| {
                vm.devices.iter().map(move |d| {
                    (
                        format!("{},device=\"{}\"", vm_label(vm), esc(&d.device)),
                        f(d) as f64,
                    )
                })
            })
            .collect()
    };
    family(
        "bulkhead_device_restarts_total",
        "counter",
        "Backend restarts of the device.",
        per_device(&|d| u64::from(d.restarts)),
    );
    type Field = fn(&bulkhead_ipc::control::QueueStats) -> u64;
    let counters: [(&str, &str, Field); 8] = [
        ("requests_total", "Requests (disk) or packets (NIC).", |q| {
            q.requests
        }),
        ("reads_total", "Read requests.", |q| q.reads),
        ("writes_total", "Write requests.", |q| q.writes),
        ("read_bytes_total", "Bytes read.", |q| q.bytes_read),
        ("written_bytes_total", "Bytes written.", |q| q.bytes_written),
        ("errors_total", "Failed requests or dropped packets.", |q| {
            q.errors
        }),
        (
            "throttled_total",
            "Times a queue waited for its rate limit.",
            |q| q.throttled,
        ),
        (
            "throttled_seconds_total",
            "Time queues waited for their rate limit (nanoseconds / 1e9 in the value).",
            |q| q.throttled_ns,
        ),
    ];
    for (name, help, f) in counters {
        let mut samples = per_device(&|d| sum(d, f));
        if name == "throttled_seconds_total" {
            for s in &mut samples {
                s.1 /= 1e9;
            }
        }
        family(&format!("bulkhead_device_{name}"), "counter", help, samples);
    }
    family(
        "bulkhead_device_limit_bandwidth_bytes",
        "gauge",
        "Bandwidth limit in force (0: none).",
        per_device(&|d| d.limits.bandwidth),
    );
    family(
        "bulkhead_device_limit_ops",
        "gauge",
        "Requests or packets per second limit in force (0: none).",
        per_device(&|d| d.limits.ops),
    );
    out.push_str(&latency_histogram(vms));
    out
}

/// Disk request latency as a Prometheus histogram (cumulative buckets).
fn latency_histogram(vms: &[VmStats]) -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP bulkhead_device_latency_seconds Disk request latency, taken to completed.\n\
         # TYPE bulkhead_device_latency_seconds histogram\n",
    );
    for vm in vms {
        for d in vm.devices.iter().filter(|d| d.device.starts_with("disk")) {
            let labels = format!("{},device=\"{}\"", vm_label(vm), esc(&d.device));
            let mut cumulative = 0u64;
            for i in 0..bulkhead_ipc::devstats::HIST_BUCKETS {
                let n = d
                    .queues
                    .iter()
                    .map(|q| q.latency_hist.get(i).copied().unwrap_or(0))
                    .fold(0, u64::saturating_add);
                cumulative = cumulative.saturating_add(n);
                let le = match bulkhead_ipc::devstats::bucket_limit_us(i) {
                    Some(us) => format!("{}", us as f64 / 1e6),
                    None => "+Inf".into(),
                };
                out.push_str(&format!(
                    "bulkhead_device_latency_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}\n"
                ));
            }
            out.push_str(&format!(
                "bulkhead_device_latency_seconds_sum{{{labels}}} {}\n\
                 bulkhead_device_latency_seconds_count{{{labels}}} {cumulative}\n",
                sum(d, |q| q.latency_sum_us) as f64 / 1e6
            ));
        }
    }
    out
}

/// `bulkhead metrics`.
pub fn print_metrics(socket: &Path, io: &mut Streams<'_>) -> Result<(), Failure> {
    let vms = fetch(socket)?;
    print(io.stdout, &metrics(&vms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_ipc::control::{DeviceLimits, QueueStats, VmState, VmSummary};

    fn vm(name: &str, cpu_ns: u64, reads: u64) -> VmStats {
        VmStats {
            summary: VmSummary {
                name: name.into(),
                id: 1,
                state: VmState::Running,
                vcpus: 2,
                memory_mib: 256,
                owner: 0,
                runner_pid: Some(1),
                uptime_secs: 1,
            },
            cpu_ns,
            vcpus: vec![],
            devices: vec![DeviceStats {
                device: "disk0".into(),
                restarts: 1,
                backend_starts: 2,
                limits: DeviceLimits::default(),
                queues: vec![QueueStats {
                    reads,
                    bytes_read: reads.saturating_mul(4096),
                    throttled: 3,
                    ..QueueStats::default()
                }],
            }],
        }
    }

    #[test]
    fn rows_take_cpu_percent_from_two_samples_and_sum_devices() {
        let a = [vm("a", 1_000_000_000, 10)];
        let b = [vm("a", 1_500_000_000, 30)];
        let r = rows(&b, Some((&a, Duration::from_secs(1))));
        assert_eq!(r.len(), 1);
        assert!((r[0].cpu_percent - 50.0).abs() < 1e-6);
        assert_eq!(r[0].vbd_rd, 30);
        assert_eq!(r[0].vbd_rsect, 30 * 8);
        assert_eq!(r[0].vbd_oo, 3);
        assert_eq!(r[0].restarts, 1);
        assert!(table(&r).starts_with("NAME"));
        let m = metrics(&b);
        assert!(m.contains("bulkhead_device_reads_total{vm=\"a\",device=\"disk0\"} 30"));
        assert!(m.contains("bulkhead_vm_cpu_seconds_total{vm=\"a\"} 1.5"));
        assert!(
            m.contains(
                "bulkhead_device_latency_seconds_bucket{vm=\"a\",device=\"disk0\",le=\"+Inf\"} 0"
            ),
            "{m}"
        );
    }

    #[test]
    fn hostile_counters_saturate() {
        let mut v = vm("a", u64::MAX, u64::MAX);
        let q = v.devices[0].queues[0].clone();
        v.devices[0].queues.push(q);
        let r = rows(&[v], None);
        assert_eq!(r[0].vbd_rd, u64::MAX);
    }
}
