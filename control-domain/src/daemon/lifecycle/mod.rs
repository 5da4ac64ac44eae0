//! VM lifecycle: the registry of VMs and the verbs that change a VM's life — create (with
//! [`start`]), pause and unpause, shutdown, reboot and the restart in place after a guest
//! reboot ([`reboot`]), destroy, save and restore ([`snapshot`]) — and re-adoption after a
//! restart ([`adopt`]). Called by [`super::api`] after it authorized the caller; checks what the
//! policy says a VM may have (limits, images, networks). Owns the registry's lock and the
//! create lock (one create at a time, so limits and uids are counted once).
//! May call: the VM's runner link, the supervisor (to start devices), the state dir.

mod adopt;
mod reboot;
mod snapshot;
mod start;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_ipc::control::{ErrorCode, Reply, VmState};
use bulkhead_ipc::runner::{RunnerCommand, RunnerEvent};

use super::describe::{state_word, summary};
use super::policy::{Action, Caller};
use super::state::VmRecord;
use super::vm::{lock, Intent, VmEntry};
use super::{fail, log, vmconfig, Daemon, Failure};
use start::HostFiles;

/// The VMs `bulkheadd` knows, by name.
#[derive(Default)]
pub struct Registry {
    vms: Mutex<BTreeMap<String, Arc<VmEntry>>>,
    create_lock: Mutex<()>,
}

impl Registry {
    /// The VM named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<VmEntry>> {
        lock(&self.vms).get(name).cloned()
    }

    /// Every VM, in name order.
    pub fn all(&self) -> Vec<Arc<VmEntry>> {
        lock(&self.vms).values().cloned().collect()
    }

    fn insert(&self, vm: Arc<VmEntry>) {
        lock(&self.vms).insert(vm.name.clone(), vm);
    }

    fn remove(&self, name: &str) {
        lock(&self.vms).remove(name);
    }
}

impl Daemon {
    /// Creates and starts a VM from a config's text (`dir`: where relative paths start).
    pub(super) fn create(&self, caller: &Caller, text: &str, dir: &Path) -> Result<Reply, Failure> {
        let spec = vmconfig::parse(text, dir, caller.uid)
            .map_err(|e| fail(ErrorCode::BadConfig, e.to_string()))?;
        let _one_create_at_a_time = lock(&self.vms.create_lock);
        let (vm, uids, files) = self.admit(spec, VmState::Starting)?;
        let (name, id) = (vm.name.clone(), vm.read(|r| r.id));
        match self.start(&vm, &uids, files) {
            Ok(detail) => {
                log(&format!("VM '{name}' (id {id}) started: {detail}"));
                Ok(Reply::Created { vm: summary(&vm) })
            }
            Err(msg) => {
                self.abandon(&vm);
                log(&format!("VM '{name}' failed to start: {msg}"));
                Err(fail(
                    ErrorCode::BadConfig,
                    format!("VM '{name}' failed to start: {msg}"),
                ))
            }
        }
    }

    /// Checks a new VM's `spec` as every create is checked — networks, device limits
    /// against the policy's caps, the limits, free runner uids — opens its kernel, initrd
    /// and disk images beneath the allowed directories (the one open of each), gives it an
    /// id and puts it in the registry in `state` (not yet in the state dir). Returns it,
    /// the uids for its device backends and the opened files. The caller holds the create
    /// lock.
    fn admit(
        &self,
        mut spec: vmconfig::VmSpec,
        state: VmState,
    ) -> Result<(Arc<VmEntry>, Vec<u32>, HostFiles), Failure> {
        let denied = |m: String| fail(ErrorCode::Denied, m);
        for n in &spec.nics {
            self.policy
                .check_network(&spec.name, &n.network)
                .map_err(denied)?;
        }
        // The limits each device runs with: its own, or the policy's default or cap.
        for (i, d) in spec.disks.iter_mut().enumerate() {
            let asked = d
                .limits
                .as_ref()
                .map_or(Ok(Default::default()), |l| l.resolve(true));
            let asked = asked.map_err(|e| fail(ErrorCode::BadConfig, e.to_string()))?;
            let l = self
                .policy
                .device_limits(&format!("disk{i}"), true, asked)
                .map_err(denied)?;
            d.limits = Some(vmconfig::LimitsConfig::from_limits(l, true));
        }
        for (i, n) in spec.nics.iter_mut().enumerate() {
            let asked = n
                .limits
                .as_ref()
                .map_or(Ok(Default::default()), |l| l.resolve(false));
            let asked = asked.map_err(|e| fail(ErrorCode::BadConfig, e.to_string()))?;
            let l = self
                .policy
                .device_limits(&format!("nic{i}"), false, asked)
                .map_err(denied)?;
            n.limits = Some(vmconfig::LimitsConfig::from_limits(l, false));
        }
        // The one open of each file the config names; from here on they are descriptors.
        let files = self.open_host_files(&mut spec).map_err(denied)?;
        let (id, uids) = {
            let vms = self.vms.all();
            if let Some(old) = vms.iter().find(|v| v.name == spec.name) {
                if old.is_live() {
                    return Err(fail(
                        ErrorCode::Exists,
                        format!("a VM named '{}' is running", spec.name),
                    ));
                }
            }
            let live: Vec<&Arc<VmEntry>> = vms.iter().filter(|v| v.is_live()).collect();
            let in_use: u64 = live.iter().map(|v| v.read(|r| r.spec.memory)).sum();
            self.policy
                .check_limits(spec.vcpus, spec.memory, in_use)
                .map_err(denied)?;
            if spec.hugepages {
                self.policy.check_hugepages().map_err(denied)?;
            }
            let id = vms.iter().map(|v| v.read(|r| r.id)).max().unwrap_or(0) + 1;
            let mut used: Vec<u32> = Vec::new();
            for v in &live {
                v.read(|rec| {
                    used.extend(rec.runner_uid);
                    used.extend(rec.backends.iter().map(|b| b.uid));
                });
            }
            let need = 1 + spec.disks.len() + spec.nics.len();
            let free: Vec<u32> = (self.policy.runner_uid_base
                ..self.policy.runner_uid_base + self.policy.runner_uid_count)
                .filter(|u| !used.contains(u))
                .take(need)
                .collect();
            if free.len() < need {
                return Err(denied(
                    "denied by rule 'runners': not enough free runner uids".into(),
                ));
            }
            (id, free)
        };
        let name = spec.name.clone();
        let record = VmRecord {
            id,
            state,
            runner_pid: None,
            runner_uid: Some(uids[0]),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            spec,
            backends: Vec::new(),
        };
        let vm = VmEntry::new(name, record, self.state.clone(), true);
        vm.set_restart_hook(self.restart_hook());
        self.vms.insert(vm.clone());
        Ok((vm, uids[1..].to_vec(), files))
    }

    /// Undoes a create or restore that failed: its processes stopped, the VM forgotten.
    fn abandon(&self, vm: &VmEntry) {
        let _ = vm.kill();
        vm.wait_stopped(Duration::from_secs(5));
        vm.stop_backends();
        self.vms.remove(&vm.name);
        self.state.remove(&vm.name);
    }

    /// Pauses (or with `pause` false, unpauses) a running VM's vCPUs.
    pub(super) fn pause(&self, vm: &VmEntry, pause: bool) -> Result<Reply, Failure> {
        let name = &vm.name;
        let state = vm.read(|r| r.state.clone());
        let (want, cmd, done) = if pause {
            (VmState::Running, RunnerCommand::Pause, VmState::Paused)
        } else {
            (VmState::Paused, RunnerCommand::Resume, VmState::Running)
        };
        if state != want {
            return Err(fail(
                ErrorCode::WrongState,
                format!(
                    "VM '{name}' is {}, not {}",
                    state_word(&state),
                    state_word(&want)
                ),
            ));
        }
        match vm.request(&cmd, Duration::from_secs(10)) {
            Ok(RunnerEvent::Paused) | Ok(RunnerEvent::Resumed) => {
                vm.set_state(done);
                Ok(Reply::Done {
                    message: format!("VM '{name}' {}", if pause { "paused" } else { "unpaused" }),
                })
            }
            Ok(RunnerEvent::Error { message }) => Err(fail(ErrorCode::Internal, message)),
            Ok(other) => Err(fail(
                ErrorCode::Internal,
                format!("unexpected answer from the runner: {other:?}"),
            )),
            Err(e) => Err(fail(ErrorCode::Internal, e)),
        }
    }

    /// Asks the guest to shut down and waits up to `timeout_secs` for it to stop.
    pub(super) fn shutdown(&self, vm: &VmEntry, timeout_secs: u32) -> Result<Reply, Failure> {
        let name = &vm.name;
        if !vm.is_live() {
            return Err(fail(
                ErrorCode::WrongState,
                format!("VM '{name}' is not running"),
            ));
        }
        match vm.read(|r| r.state.clone()) {
            VmState::Paused => {
                return Err(fail(
                    ErrorCode::WrongState,
                    format!("VM '{name}' is paused: `bulkhead unpause {name}` first"),
                ))
            }
            s @ (VmState::Saving | VmState::Restoring) => {
                return Err(fail(
                    ErrorCode::WrongState,
                    format!("VM '{name}' is {}: wait for it to finish", state_word(&s)),
                ))
            }
            _ => {}
        }
        request_shutdown(vm, Intent::Shutdown)?;
        if vm.wait_stopped(Duration::from_secs(timeout_secs.into())) {
            let state = vm.read(|r| r.state.clone());
            Ok(Reply::Done {
                message: format!("VM '{name}' {}", state_word(&state)),
            })
        } else {
            Err(fail(
                ErrorCode::Timeout,
                format!("VM '{name}' did not shut down within {timeout_secs} s; it is still running (`bulkhead destroy {name}` stops it)"),
            ))
        }
    }

    /// Stops a VM at once (if it runs) and forgets it.
    pub(super) fn destroy(&self, vm: &VmEntry) -> Result<Reply, Failure> {
        let name = &vm.name;
        if vm.is_live() {
            vm.kill().map_err(|e| fail(ErrorCode::Internal, e))?;
            if !vm.wait_stopped(Duration::from_secs(10)) {
                return Err(fail(
                    ErrorCode::Internal,
                    format!("runner of '{name}' did not die within 10 s"),
                ));
            }
        }
        self.vms.remove(name);
        self.state.remove(name);
        log(&format!("VM '{name}' destroyed"));
        Ok(Reply::Done {
            message: format!("VM '{name}' destroyed"),
        })
    }

    /// Looks up `name` and checks that `caller` may do `action` to it.
    pub(super) fn find(
        &self,
        caller: &Caller,
        name: &str,
        action: Action,
    ) -> Result<Arc<VmEntry>, Failure> {
        let Some(vm) = self.vms.get(name) else {
            return Err(fail(
                ErrorCode::NotFound,
                format!("no VM named '{name}' (see `bulkhead list`)"),
            ));
        };
        let owner = vm.read(|r| r.spec.owner);
        self.policy
            .authorize(caller, action, Some((name, owner)))
            .map_err(|m| fail(ErrorCode::Denied, m))?;
        Ok(vm)
    }
}

/// Asks the guest to shut down the standard way (Ctrl-Alt-Del on its keyboard, and the
/// shutdown-request port test guests poll), remembering `intent`: whether the reset that
/// follows is a shutdown or a reboot.
pub(super) fn request_shutdown(vm: &VmEntry, intent: Intent) -> Result<(), Failure> {
    vm.set_intent(intent);
    match vm.request(&RunnerCommand::RequestShutdown, Duration::from_secs(10)) {
        Ok(RunnerEvent::ShutdownRequested) => Ok(()),
        Ok(other) => Err(fail(
            ErrorCode::Internal,
            format!("unexpected answer from the runner: {other:?}"),
        )),
        Err(e) => Err(fail(ErrorCode::Internal, e)),
    }
}
