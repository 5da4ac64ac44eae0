//! Restarts and upgrades on request (`device-restart`, `device-upgrade`): the device's
//! machine is told, and the answer waits until a new process serves, or says why not.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_ipc::control::ErrorCode;

use super::device::{Action, Event};
use super::Supervisor;
use crate::daemon::state::BackendRecord;
use crate::daemon::vm::VmEntry;
use crate::daemon::{fail, log, Failure};

impl Supervisor {
    /// Restarts `device`'s backend, or upgrades it to `binary`, under a running guest; also
    /// revives a stalled device. Answers once the new process serves (or why not).
    pub fn restart_device(
        &self,
        vm: &Arc<VmEntry>,
        device: &str,
        binary: Option<PathBuf>,
        by_admin: bool,
    ) -> Result<String, Failure> {
        let name = &vm.name;
        let before = vm.backend(device).ok_or_else(|| {
            fail(
                ErrorCode::NotFound,
                format!("VM '{name}' has no device '{device}'"),
            )
        })?;
        let upgrade = match binary {
            Some(b) => Some(
                b.canonicalize()
                    .map_err(|e| fail(ErrorCode::BadConfig, format!("{}: {e}", b.display())))?,
            ),
            None => None,
        };
        let refusals_before = vm
            .devices
            .with(device, |s| s.machine.refusals)
            .ok_or_else(|| {
                fail(
                    ErrorCode::WrongState,
                    format!("'{device}' is not restartable (re-adopted VM?)"),
                )
            })?;
        let action = self.on(vm, device, Event::RestartRequested { upgrade, by_admin });
        vm.save();
        let served = |b: &BackendRecord| {
            format!(
                "VM '{name}': {device} now served by pid {} (restart #{})",
                b.pid, b.restarts
            )
        };
        if matches!(action, Action::SpawnNow) {
            log(&format!(
                "VM '{name}': starting a backend for the stalled {device} on request"
            ));
            self.respawn(vm, device)
                .map_err(|e| fail(ErrorCode::Internal, format!("{device}: {e}")))?;
            return Ok(vm.backend(device).map(|b| served(&b)).unwrap_or_default());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = vm.backend(device).unwrap_or_else(|| before.clone());
            if let Some(why) = now.failed.clone() {
                return Err(fail(ErrorCode::Internal, format!("{device} failed: {why}")));
            }
            if let Some(why) = now.stopped.clone() {
                return Err(fail(
                    ErrorCode::Internal,
                    format!("{device} stopped: {why}"),
                ));
            }
            let refused = vm
                .devices
                .with(device, |s| {
                    (s.machine.refusals > refusals_before).then(|| s.machine.last_refusal.clone())
                })
                .flatten();
            if let Some(why) = refused {
                return Err(fail(
                    ErrorCode::Internal,
                    format!(
                        "the new {device} backend was refused and ended: {why}; bulkheadd keeps trying by the restart policy (see `bulkhead info {name}`)"
                    ),
                ));
            }
            if now.pid != before.pid && now.restarts > before.restarts {
                return Ok(served(&now));
            }
            if Instant::now() >= deadline {
                return Err(fail(
                    ErrorCode::Timeout,
                    format!("{device} did not come back within 30 s (see `bulkhead info {name}`)"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
