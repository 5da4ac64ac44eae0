//! What follows the end of a device's serving backend: the machine decides (restart at
//! once, after a back-off, or stall), and this carries it out — a new backend (the standby,
//! or a fresh process handed to the runner), a slow retry of a failed device, a hung or
//! refused backend ended.

use std::sync::Arc;
use std::time::Duration;

use std::os::fd::AsFd;

use bulkhead_ipc::runner::{RunnerCommand, RunnerEvent};

use super::device::{Action, Event, Stall};
use super::{exit_words, still_running, unix_now, Supervisor};
use crate::daemon::log;
use crate::daemon::vm::VmEntry;

/// Restarts and their follow-ups.
impl Supervisor {
    /// The serving process of `device` ended with `status`: decide, then restart or stall.
    pub(super) fn serving_ended(
        &self,
        vm: &Arc<VmEntry>,
        device: &str,
        status: Option<nix::sys::wait::WaitStatus>,
    ) {
        let clean = matches!(status, Some(nix::sys::wait::WaitStatus::Exited(_, 0)));
        self.decide(vm, device, clean, exit_words(status));
    }

    /// Decides by the device's policy what follows the end of its serving process (`why`),
    /// then restarts it or stalls it.
    pub(super) fn decide(&self, vm: &Arc<VmEntry>, device: &str, clean: bool, why: String) {
        let decided = self.on(vm, device, Event::Decide { clean, why });
        let (reason, backoff) = match &decided {
            Action::Restart { backoff, reason } => (reason.clone(), Some(*backoff)),
            Action::Stalled { reason, .. } => (reason.clone(), None),
            _ => return,
        };
        log(&format!("VM '{}': {device} backend {reason}", vm.name));
        vm.update_backend(device, |b| b.last_exit = Some(reason));
        vm.save();
        match (decided, backoff) {
            (
                Action::Stalled {
                    stall, retry_in, ..
                },
                _,
            ) => self.stalled(vm, device, stall, retry_in),
            (_, Some(backoff)) => {
                if !backoff.is_zero() {
                    std::thread::sleep(backoff);
                }
                if vm.is_ending() {
                    return;
                }
                if let Err(e) = self.respawn(vm, device) {
                    log(&format!(
                        "VM '{}': restarting {device} failed: {e}",
                        vm.name
                    ));
                }
            }
            _ => {}
        }
    }

    /// `device` stalls (`stall`); a failed one is tried again after `retry_in`, and `info`
    /// says when.
    fn stalled(&self, vm: &Arc<VmEntry>, device: &str, stall: Stall, retry_in: Option<Duration>) {
        match &stall {
            Stall::Failed(_) => log(&format!(
                "VM '{}': {device} marked failed; the device stalls, the VM keeps running ({}`bulkhead device-restart {} {device}` tries now)",
                vm.name,
                retry_in.map_or(String::new(), |r| format!("next try in {} s; ", r.as_secs())),
                vm.name
            )),
            Stall::Stopped(s) => log(&format!(
                "VM '{}': {device} not restarted ({s}); the device stalls, the VM keeps running",
                vm.name
            )),
        }
        let Some(retry_in) = retry_in else {
            return;
        };
        let at = unix_now() + retry_in.as_secs();
        vm.update_backend(device, |b| b.next_attempt_unix = Some(at));
        vm.save();
        self.in_background("retry", vm, device, move |me, vm, device| {
            std::thread::sleep(retry_in);
            // Only the try this thread was scheduled for (not one a later failure or an
            // administrator's restart replaced).
            let due = vm
                .backend(device)
                .is_some_and(|b| b.next_attempt_unix == Some(at));
            if vm.is_ending() || !due {
                return;
            }
            if matches!(me.on(vm, device, Event::RetryFailed), Action::SpawnNow) {
                log(&format!(
                    "VM '{}': trying the failed {device} again",
                    vm.name
                ));
                if let Err(e) = me.respawn(vm, device) {
                    log(&format!("VM '{}': {device}: {e}", vm.name));
                }
            }
        });
    }

    /// The runner saw `device`'s serving backend hold requests with no completion for
    /// `stalled_ms`: it is killed, and replaced like after a crash.
    pub fn hung(&self, vm: &VmEntry, device: &str, stalled_ms: u64) {
        // A backend holding requests back for its rate limit makes no progress on purpose.
        if vm.devices.stats(device).is_some_and(|r| r.waiting()) {
            self.tell(
                vm,
                device,
                &format!("backend waits for its rate limit ({stalled_ms} ms without a completion): not hung"),
            );
            return;
        }
        let pid = vm
            .devices
            .with(device, |s| s.machine.serving_pid())
            .flatten();
        if let Action::Kill(pid) = self.on(vm, device, Event::Hung { stalled_ms }) {
            let words = format!("hung: no progress for {stalled_ms} ms; killing pid {pid}");
            self.tell(vm, device, &format!("backend {words}"));
        } else if let Some(pid) = pid {
            log(&format!(
                "VM '{}': {device}: the runner reports pid {pid} hung ({stalled_ms} ms), but it is already being replaced",
                vm.name
            ));
        }
    }

    /// Gives `device` a new serving process (its standby, or a new one) and hands the
    /// runner its connection.
    pub(super) fn respawn(&self, vm: &Arc<VmEntry>, device: &str) -> Result<(), String> {
        let connection = match self.on(vm, device, Event::Takeover) {
            Action::UseStandby { pid, conn } => {
                log(&format!(
                    "VM '{}': {device}: standby backend (pid {pid}) takes over",
                    vm.name
                ));
                Ok((pid, conn))
            }
            _ => self.launch_serving(vm, device, false),
        };
        let (pid, conn) = match connection {
            Ok(c) => c,
            Err((Some(_), e)) => return Err(e), // refused: its watcher decides
            Err((None, e)) => {
                // Nothing was started, so nothing will end and retry: say so in `info`.
                if let Action::Stalled {
                    stall, retry_in, ..
                } = self.on(vm, device, Event::SpawnFailed(e.clone()))
                {
                    vm.save();
                    self.stalled(vm, device, stall, retry_in);
                }
                return Err(e);
            }
        };
        let answer = vm.request_with_fds(
            &RunnerCommand::ReconnectDevice {
                device: device.to_string(),
            },
            &[conn.as_fd()],
            Duration::from_secs(20),
        );
        let refusal = match answer {
            Ok(RunnerEvent::DeviceReconnected { .. }) => None,
            Ok(RunnerEvent::Error { message }) => Some(message),
            Ok(other) => Some(format!("unexpected answer: {other:?}")),
            Err(e) => Some(e),
        };
        if let Some(e) = refusal {
            self.refuse(vm, device, pid, &e);
            return Err(e);
        }
        self.on(vm, device, Event::Served { pid });
        vm.update_backend(device, |b| b.restarts += 1);
        vm.save();
        log(&format!("VM '{}': {device} backend restarted", vm.name));
        self.keep_standby(vm, device);
        Ok(())
    }

    /// Ends a new serving process that will never serve (it did not become ready, or the
    /// runner could not set it up), so that it does not hold the device stalled for good.
    /// Its end counts as a crash at start, so a binary that always hangs ends up failed
    /// like one that always crashes.
    pub(super) fn refuse(&self, vm: &VmEntry, device: &str, pid: i32, why: &str) {
        let running = still_running(pid);
        let event = Event::Refused {
            pid,
            why: why.to_string(),
            running,
        };
        if let Action::Kill(_) = self.on(vm, device, event) {
            log(&format!(
                "VM '{}': {device} backend (pid {pid}) refused: {why}; ending it",
                vm.name
            ));
        }
    }
}
