//! Save and restore: a running or paused VM written to a snapshot file (its runner gives
//! the state of its vCPUs, machine and devices once it has paused and drained them; guest
//! RAM is read here, from the memfd this daemon made), and a VM created again from one
//! (checked whole before anything starts, then admitted like a create, its RAM filled
//! here, its runner handed the state instead of a kernel). The files are opened by the
//! client, with its own rights, and travel as descriptors.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_ipc::control::{ErrorCode, Reply, VmState};
use bulkhead_ipc::runner::{RestoreSpec, RunnerCommand, RunnerEvent, RunnerRequest, StateRecord};
use bulkhead_ipc::Channel;
use core_vmm::snapshot::format::{self, Header, Record, SnapshotReader};
use core_vmm::snapshot::mapping::Mapping;

use super::start::{await_started, cpu_template, create_guest_memfd};
use crate::daemon::policy::Caller;
use crate::daemon::vm::{lock, VmEntry};
use crate::daemon::vmconfig::{self, VmSpec};
use crate::daemon::{fail, log, Daemon, Failure};

/// How long the runner may take to pause, drain and report.
const SAVE_STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a restore hands the runner instead of a kernel.
pub(in crate::daemon) struct RestoreInput {
    memfd: File,
    records: Vec<StateRecord>,
    cpu_template: String,
}

/// This host's CPU vendor and model, as snapshot headers name them.
fn host_cpu() -> (String, String) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    format::host_cpu_from_cpuinfo(&text)
}

fn bad_snapshot(e: impl std::fmt::Display) -> Failure {
    fail(ErrorCode::BadSnapshot, format!("snapshot refused: {e}"))
}

impl Daemon {
    /// Saves `vm` to `file`; destroys it afterwards unless `keep_running`.
    pub(in crate::daemon) fn save(
        &self,
        vm: &Arc<VmEntry>,
        file: &File,
        keep_running: bool,
    ) -> Result<Reply, Failure> {
        let name = vm.name.clone();
        let before = vm.read(|r| r.state.clone());
        if !matches!(before, VmState::Running | VmState::Paused) {
            return Err(fail(
                ErrorCode::WrongState,
                format!(
                    "VM '{name}' is {}: only a running or paused VM can be saved",
                    super::state_word(&before)
                ),
            ));
        }
        let Some(memfd) = vm.guest_ram() else {
            return Err(fail(
                ErrorCode::WrongState,
                format!("VM '{name}' was re-adopted after a bulkheadd restart: this bulkheadd does not hold its guest RAM, so it cannot save it"),
            ));
        };
        let started = Instant::now();
        vm.set_state(VmState::Saving);
        let records = match vm.request(&RunnerCommand::SaveState, SAVE_STATE_TIMEOUT) {
            Ok(RunnerEvent::Saved { records }) => records,
            other => {
                let why = match other {
                    Ok(RunnerEvent::Error { message }) => message,
                    Ok(o) => format!("unexpected answer from the runner: {o:?}"),
                    Err(e) => e,
                };
                self.end_save(vm, &before);
                return Err(fail(
                    ErrorCode::Internal,
                    format!("cannot save VM '{name}': {why}; it goes on as before"),
                ));
            }
        };
        let state_done = started.elapsed();
        let written = write_file(vm, file, &memfd, &records);
        let stats = match written {
            Ok(s) => s,
            Err(e) => {
                self.end_save(vm, &before);
                return Err(fail(
                    ErrorCode::Internal,
                    format!("cannot write the snapshot of VM '{name}': {e}; it goes on as before"),
                ));
            }
        };
        let total = started.elapsed();
        let what = format!(
            "VM '{name}' saved: {} MiB of guest RAM written, snapshot {} bytes, in {} ms (state {} ms)",
            stats.ram_written >> 20,
            stats.file_len,
            total.as_millis(),
            state_done.as_millis()
        );
        log(&what);
        if keep_running {
            self.end_save(vm, &before);
            return Ok(Reply::Done {
                message: format!("{what}; it keeps {}", super::state_word(&before)),
            });
        }
        self.destroy(vm)?;
        Ok(Reply::Done {
            message: format!("{what}; destroyed"),
        })
    }

    /// Ends a save: the devices' rings up again, the vCPUs running if they were (also when
    /// a device did not come back: the runner resumes them anyway, and that device waits
    /// for its backend to be replaced).
    fn end_save(&self, vm: &VmEntry, before: &VmState) {
        let resume = *before == VmState::Running;
        match vm.request(&RunnerCommand::EndSave { resume }, Duration::from_secs(20)) {
            Ok(RunnerEvent::Resumed) | Ok(RunnerEvent::Paused) => {}
            other => log(&format!("VM '{}': ending the save: {other:?}", vm.name)),
        }
        // Unless it was destroyed (or died) meanwhile.
        if vm.read(|r| r.state == VmState::Saving) {
            vm.set_state(before.clone());
        }
    }

    /// Creates a VM from the snapshot in `file`, named `new_name` if given.
    pub(in crate::daemon) fn restore(
        &self,
        _caller: &Caller,
        file: &File,
        new_name: Option<String>,
    ) -> Result<Reply, Failure> {
        let started = Instant::now();
        let reader = SnapshotReader::open(file).map_err(bad_snapshot)?;
        let (vendor, model) = host_cpu();
        format::check_host(&reader.header, &vendor, &model).map_err(bad_snapshot)?;
        let mut spec: VmSpec = serde_json::from_slice(&reader.config)
            .map_err(|e| bad_snapshot(format!("its VM config does not read: {e}")))?;
        if spec.memory != reader.memory() {
            return Err(bad_snapshot(format!(
                "its VM config says {} bytes of RAM, its RAM index {}",
                spec.memory,
                reader.memory()
            )));
        }
        if let Some(n) = new_name {
            if !vmconfig::valid_name(&n) {
                return Err(fail(
                    ErrorCode::BadConfig,
                    format!("'{n}' is not a valid name: use 1-64 letters, digits, '-', '_' or '.'"),
                ));
            }
            spec.name = n;
        }
        let _one_create_at_a_time = lock(&self.vms.create_lock);
        let (vm, uids, files) = self.admit(spec, VmState::Restoring)?;
        let name = vm.name.clone();
        // Guest RAM is filled and checked before anything is started.
        let memfd = match fill_ram(&reader, file, &name, &vm.read(|r| r.spec.clone())) {
            Ok(m) => m,
            Err(e) => {
                self.vms.remove(&name);
                return Err(e);
            }
        };
        let input = RestoreInput {
            memfd,
            records: reader
                .records
                .iter()
                .map(|r| StateRecord {
                    name: r.name.clone(),
                    data: r.data.clone(),
                })
                .collect(),
            cpu_template: reader.header.cpu_template.clone(),
        };
        match self.start_with(&vm, &uids, files, Some(input)) {
            Ok(detail) => {
                let msg = format!(
                    "VM '{name}' restored ({} MiB of guest RAM read) in {} ms: {detail}",
                    reader.ram_bytes() >> 20,
                    started.elapsed().as_millis()
                );
                log(&msg);
                Ok(Reply::Done { message: msg })
            }
            Err(msg) => {
                self.abandon(&vm);
                log(&format!("VM '{name}' failed to restore: {msg}"));
                Err(fail(
                    ErrorCode::Internal,
                    format!("VM '{name}' failed to restore: {msg}"),
                ))
            }
        }
    }

    /// Hands the runner `/dev/kvm`, the filled memfd and the devices' connections, and the
    /// snapshot's state; returns the runner's words once the guest runs again.
    pub(super) fn boot_from_snapshot(
        &self,
        vm: &VmEntry,
        ch: &Channel,
        disk_socks: &[UnixStream],
        nic_socks: &[UnixStream],
        input: RestoreInput,
    ) -> Result<String, String> {
        let spec = vm.read(|r| r.spec.clone());
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("/dev/kvm: {e}"))?;
        let command = RunnerCommand::Restore(RestoreSpec {
            vcpus: spec.vcpus,
            cpu_template: input.cpu_template.clone(),
            disks: (0..disk_socks.len()).map(|i| format!("disk{i}")).collect(),
            nics: (0..nic_socks.len()).map(|i| format!("nic{i}")).collect(),
            hang_timeouts_ms: spec
                .disks
                .iter()
                .map(|d| d.restart_policy().hang_timeout_ms)
                .chain(spec.nics.iter().map(|n| n.restart_policy().hang_timeout_ms))
                .collect(),
            records: input.records,
        });
        let mut fds = vec![kvm.as_fd(), input.memfd.as_fd()];
        fds.extend(disk_socks.iter().map(|s| s.as_fd()));
        fds.extend(nic_socks.iter().map(|s| s.as_fd()));
        let id = vm.request_id();
        ch.send(&RunnerRequest { id, command }, &fds)
            .map_err(|e| format!("sending Restore: {e}"))?;
        vm.set_guest_ram(input.memfd);
        await_started(vm, ch, id)
    }
}

/// Writes the snapshot of `vm` (its runner has given `records` and holds it paused and
/// drained) to `file`.
fn write_file(
    vm: &VmEntry,
    file: &File,
    memfd: &File,
    records: &[StateRecord],
) -> Result<format::WriteStats, String> {
    let spec = vm.read(|r| r.spec.clone());
    let (cpu_vendor, cpu_model) = host_cpu();
    let header = Header {
        bulkhead_version: env!("CARGO_PKG_VERSION").to_string(),
        cpu_vendor,
        cpu_model,
        cpu_template: cpu_template(&vm.name, &spec.cpu_template),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        memory: spec.memory,
    };
    let config = serde_json::to_vec(&spec).map_err(|e| format!("VM config: {e}"))?;
    let records: Vec<Record> = records
        .iter()
        .map(|r| Record {
            name: r.name.clone(),
            data: r.data.clone(),
        })
        .collect();
    let ram = Mapping::map(memfd, false).map_err(|e| format!("mapping guest RAM: {e}"))?;
    let stats = format::write_snapshot(
        file,
        &header,
        &config,
        &records,
        ram.as_slice(),
        Some(memfd),
    )
    .map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| format!("snapshot file: {e}"))?;
    Ok(stats)
}

/// A fresh guest-RAM memfd holding the snapshot's RAM, each run's checksum checked.
fn fill_ram(
    reader: &SnapshotReader,
    file: &File,
    vm: &str,
    spec: &VmSpec,
) -> Result<File, Failure> {
    let memfd =
        create_guest_memfd(vm, spec).map_err(|e| fail(ErrorCode::Internal, e.to_string()))?;
    let mut map = Mapping::map(&memfd, true)
        .map_err(|e| fail(ErrorCode::Internal, format!("mapping guest RAM: {e}")))?;
    let Some(ram) = map.as_mut_slice() else {
        return Err(fail(ErrorCode::Internal, "guest RAM mapped read-only"));
    };
    reader.fill_ram(file, ram).map_err(bad_snapshot)?;
    Ok(memfd)
}
