//! Per-VM counters for `bulkhead top`, `info --json` and `metrics`: the CPU time of a VM's
//! processes (runner and device backends) from /proc, and each device's counters read
//! from its shared page. The page is written by a backend, so what is read there is
//! hostile input: only fixed-size `u64`s are taken, the queue count is ours, and sums
//! saturate.

use std::collections::BTreeMap;

use bulkhead_ipc::control::{DeviceLimits, DeviceStats, QueueStats, VmStats};
use bulkhead_ipc::devstats::{Limits, HIST_BUCKETS};
use bulkhead_ipc::runner::{RunnerCommand, RunnerEvent, VcpuCounters};
use std::time::Duration;

use super::describe::summary;
use super::vm::{lock, VmEntry};

/// CPU time of one VM's processes, kept across their ends: a process that is gone keeps
/// counting with what it had used when it was last seen.
#[derive(Debug, Default)]
pub struct CpuAccount {
    /// Live processes last seen: (pid, start time) → CPU ticks.
    seen: BTreeMap<(i32, u64), u64>,
    /// Ticks of processes no longer there.
    gone: u64,
}

impl CpuAccount {
    /// Samples `pids` and returns the VM's CPU time so far, in clock ticks.
    pub fn sample(&mut self, pids: &[i32]) -> u64 {
        let now: BTreeMap<(i32, u64), u64> = pids
            .iter()
            .filter(|p| **p > 0)
            .filter_map(|&p| proc_cpu(p).map(|(start, ticks)| ((p, start), ticks)))
            .collect();
        for (k, ticks) in &self.seen {
            if !now.contains_key(k) {
                self.gone = self.gone.saturating_add(*ticks);
            }
        }
        self.seen = now;
        self.seen
            .values()
            .fold(self.gone, |a, t| a.saturating_add(*t))
    }
}

/// A process's start time and user+system CPU ticks, from `/proc/PID/stat`.
fn proc_cpu(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15, starttime 22 (1-based).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let start: u64 = f.get(19)?.parse().ok()?;
    Some((start, utime.saturating_add(stime)))
}

/// Nanoseconds per clock tick.
fn tick_ns() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        1_000_000_000 / hz as u64
    } else {
        10_000_000
    }
}

/// `vm`'s counters now.
pub fn vm_stats(vm: &VmEntry) -> VmStats {
    let rec = vm.snapshot();
    let live = vm.is_live();
    let mut pids: Vec<i32> = Vec::new();
    if live {
        pids.extend(rec.runner_pid);
        for b in &rec.backends {
            pids.push(b.pid);
            pids.extend(b.standby_pid);
        }
    }
    let ticks = lock(&vm.cpu).sample(&pids);
    let disks = rec.spec.disks.iter().enumerate().map(|(i, d)| {
        (
            format!("disk{i}"),
            usize::from(d.queues.unwrap_or(1)),
            d.limits.as_ref().and_then(|l| l.resolve(true).ok()),
        )
    });
    let nics = rec.spec.nics.iter().enumerate().map(|(i, n)| {
        (
            format!("nic{i}"),
            2,
            n.limits.as_ref().and_then(|l| l.resolve(false).ok()),
        )
    });
    let devices = disks
        .chain(nics)
        .map(|(device, queues, limits)| {
            let restarts = rec
                .backends
                .iter()
                .find(|b| b.device == device)
                .map_or(0, |b| b.restarts);
            let region = vm.devices.stats(&device);
            let l = limits.unwrap_or_default();
            DeviceStats {
                restarts,
                backend_starts: region.as_ref().map_or(0, |r| r.starts()),
                limits: wire_limits(l),
                queues: region
                    .map(|r| {
                        r.queues(queues)
                            .into_iter()
                            .map(|q| QueueStats {
                                requests: q.requests,
                                reads: q.reads,
                                writes: q.writes,
                                flushes: q.flushes,
                                bytes_read: q.bytes_read,
                                bytes_written: q.bytes_written,
                                errors: q.errors,
                                throttled: q.throttles,
                                throttled_ns: q.throttled_ns,
                                latency_sum_us: q.latency_sum_us,
                                latency_hist: q.latency_hist.to_vec(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                device,
            }
        })
        .collect();
    VmStats {
        summary: summary(vm),
        cpu_ns: ticks.saturating_mul(tick_ns()),
        vcpus: if live { vcpu_counters(vm) } else { Vec::new() },
        devices,
    }
}

/// How long a runner has to report its vCPUs' counters.
const VCPU_STATS_TIMEOUT: Duration = Duration::from_millis(500);

/// The runner's per-vCPU counters; none if it does not answer in time. At most as many as
/// the VM has vCPUs (the runner's answer is not trusted for its length).
fn vcpu_counters(vm: &VmEntry) -> Vec<VcpuCounters> {
    let vcpus = usize::from(vm.read(|r| r.spec.vcpus));
    match vm.request(&RunnerCommand::VcpuStats, VCPU_STATS_TIMEOUT) {
        Ok(RunnerEvent::VcpuStats(mut v)) => {
            v.truncate(vcpus);
            v
        }
        _ => Vec::new(),
    }
}

/// `vm` with each disk's queues summed into one record (a NIC keeps its two, receive and
/// transmit): what every VM's row needs, small enough for many VMs in one reply.
pub fn summed(mut vm: VmStats) -> VmStats {
    for d in vm
        .devices
        .iter_mut()
        .filter(|d| d.device.starts_with("disk"))
    {
        if d.queues.len() <= 1 {
            continue;
        }
        let mut all = QueueStats {
            latency_hist: vec![0; HIST_BUCKETS],
            ..QueueStats::default()
        };
        for q in &d.queues {
            let add = |a: &mut u64, b: u64| *a = a.saturating_add(b);
            add(&mut all.requests, q.requests);
            add(&mut all.reads, q.reads);
            add(&mut all.writes, q.writes);
            add(&mut all.flushes, q.flushes);
            add(&mut all.bytes_read, q.bytes_read);
            add(&mut all.bytes_written, q.bytes_written);
            add(&mut all.errors, q.errors);
            add(&mut all.throttled, q.throttled);
            add(&mut all.throttled_ns, q.throttled_ns);
            add(&mut all.latency_sum_us, q.latency_sum_us);
            for (a, b) in all.latency_hist.iter_mut().zip(&q.latency_hist) {
                add(a, *b);
            }
        }
        d.queues = vec![all];
    }
    vm
}

/// Limits as the wire carries them.
pub fn wire_limits(l: Limits) -> DeviceLimits {
    DeviceLimits {
        bandwidth: l.bw_rate,
        bandwidth_burst: l.bw_burst,
        ops: l.ops_rate,
        ops_burst: l.ops_burst,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summed_adds_disk_queues_and_keeps_nic_records() {
        let q = |n: u64| QueueStats {
            writes: n,
            latency_hist: vec![n; HIST_BUCKETS],
            ..QueueStats::default()
        };
        let dev = |name: &str| DeviceStats {
            device: name.into(),
            queues: vec![q(1), q(u64::MAX)],
            ..DeviceStats::default()
        };
        let vm = VmStats {
            summary: bulkhead_ipc::control::VmSummary {
                name: "a".into(),
                id: 1,
                state: bulkhead_ipc::control::VmState::Running,
                vcpus: 1,
                memory_mib: 1,
                owner: 0,
                runner_pid: None,
                uptime_secs: 0,
            },
            cpu_ns: 0,
            vcpus: vec![],
            devices: vec![dev("disk0"), dev("nic0")],
        };
        let s = summed(vm);
        assert_eq!(s.devices[0].queues.len(), 1);
        assert_eq!(s.devices[0].queues[0].writes, u64::MAX);
        assert_eq!(s.devices[0].queues[0].latency_hist[0], u64::MAX);
        assert_eq!(s.devices[1].queues.len(), 2);
    }

    #[test]
    fn own_cpu_is_read_and_gone_processes_keep_counting() {
        let me = std::process::id() as i32;
        let (_, t) = proc_cpu(me).expect("own stat");
        let mut a = CpuAccount::default();
        let first = a.sample(&[me]);
        assert!(first >= t);
        // Gone (not sampled any more): still counted.
        assert!(a.sample(&[]) >= first);
    }
}
