//! How `list` and `info` describe a VM and its devices: pure formatting of a VM's record,
//! no locks of its own (it reads records through [`VmEntry`]) and no I/O.

use std::path::Path;

use bulkhead_ipc::control::{VmInfo, VmState, VmSummary};

use super::network;
use super::state::BackendRecord;
use super::vm::{describe, VmEntry};
use super::vmconfig::LimitsConfig;

/// One line of `list`.
pub fn summary(vm: &VmEntry) -> VmSummary {
    let rec = vm.snapshot();
    let live = !matches!(rec.state, VmState::Stopped(_));
    VmSummary {
        name: vm.name.clone(),
        id: rec.id,
        state: rec.state.clone(),
        vcpus: rec.spec.vcpus,
        memory_mib: rec.spec.memory >> 20,
        owner: rec.spec.owner,
        runner_pid: rec.runner_pid.filter(|_| live),
        uptime_secs: vm.uptime(),
    }
}

/// `, limits ...` for a device with rate limits; nothing without.
fn limit_words(l: Option<&LimitsConfig>, disk: bool) -> String {
    let Some(l) = l.and_then(|l| l.resolve(disk).ok()) else {
        return String::new();
    };
    let mut parts = Vec::new();
    if l.bw_rate > 0 {
        parts.push(format!("{} B/s (burst {})", l.bw_rate, l.bw_burst));
    }
    if l.ops_rate > 0 {
        let unit = if disk { "requests/s" } else { "frames/s sent" };
        parts.push(format!("{} {unit} (burst {})", l.ops_rate, l.ops_burst));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(", limits {}", parts.join(", "))
    }
}

/// What `info` shows.
pub fn info(vm: &VmEntry) -> VmInfo {
    let rec = vm.snapshot();
    let live = vm.is_live();
    let backend = |device: String| {
        rec.backends
            .iter()
            .find(|b| b.device == device)
            .filter(|_| live)
    };
    VmInfo {
        summary: summary(vm),
        kernel: rec.spec.kernel.display().to_string(),
        hugepages: rec.spec.hugepages,
        initrd: rec.spec.initrd.as_ref().map(|p| p.display().to_string()),
        cmdline: rec.spec.cmdline.clone(),
        runner_uid: rec.runner_uid,
        disks: rec
            .spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                format!(
                    "disk{i}: {}{}, {} queue(s){}{}{}",
                    d.path.display(),
                    if d.readonly { " (read-only)" } else { "" },
                    d.queues.unwrap_or(1),
                    d.serial
                        .as_ref()
                        .map(|s| format!(" serial '{s}'"))
                        .unwrap_or_default(),
                    backend(format!("disk{i}"))
                        .map(backend_words)
                        .unwrap_or_default(),
                    limit_words(d.limits.as_ref(), true)
                )
            })
            .collect(),
        nics: rec
            .spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let words = backend(format!("nic{i}"))
                    .map(|b| format!(", tap bh{}n{i}{}", rec.id, backend_words(b)))
                    .unwrap_or_default();
                let mac = n
                    .mac
                    .clone()
                    .unwrap_or_else(|| network::default_mac(rec.id, i));
                format!(
                    "nic{i}: {mac} on network {}{words}{}",
                    n.network,
                    limit_words(n.limits.as_ref(), false)
                )
            })
            .collect(),
    }
}

/// How `info` describes a device's backend process.
fn backend_words(b: &BackendRecord) -> String {
    let binary = Path::new(&b.binary)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut s = format!(
        ", {binary} pid {} uid {} ({}), restarts {}",
        b.pid, b.uid, b.binary, b.restarts
    );
    if !b.restart_policy.is_empty() {
        s.push_str(&format!(", restart {}", b.restart_policy));
    }
    if let Some(p) = b.standby_pid {
        s.push_str(&format!(", standby pid {p}"));
    }
    if let Some(e) = &b.last_exit {
        s.push_str(&format!(", last exit: {e}"));
    }
    if let Some(f) = &b.failed {
        s.push_str(&format!(", FAILED: {f}"));
        if let Some(at) = b.next_attempt_unix {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            s.push_str(&format!(", next attempt in {} s", at.saturating_sub(now)));
        }
    }
    if let Some(f) = &b.stopped {
        s.push_str(&format!(", STOPPED: {f}"));
    }
    s
}

/// A VM state in words.
pub fn state_word(s: &VmState) -> String {
    match s {
        VmState::Starting => "starting".into(),
        VmState::Running => "running".into(),
        VmState::Paused => "paused".into(),
        VmState::Saving => "saving".into(),
        VmState::Restoring => "restoring".into(),
        VmState::Stopped(r) => format!("stopped ({})", describe(r)),
    }
}
