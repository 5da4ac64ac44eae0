//! Standbys: a second backend per device, set up and waiting to take over; and the check
//! that finds a backend (serving or standby) stopped for good.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::device::{self, Action, Event};
use super::{process_stopped, Supervisor};
use crate::daemon::log;
use crate::daemon::vm::VmEntry;

/// Standbys: a second backend per device, set up and waiting to take over.
impl Supervisor {
    /// A backend that is stopped (SIGSTOP) for the device's hang timeout is hung, whether
    /// or not requests wait: a serving one is replaced like after a crash, a standby (which
    /// would stall the next takeover) is ended and replaced. `stopped_since`: when `pid`
    /// was first seen stopped (its watcher keeps it).
    pub(super) fn frozen(
        &self,
        vm: &Arc<VmEntry>,
        device: &str,
        pid: i32,
        stopped_since: &mut Option<Instant>,
    ) {
        let watched = vm.devices.with(device, |s| {
            let m = &s.machine;
            let standby = matches!(m.standby, device::Standby::Waiting { pid: p, .. } if p == pid);
            let serving = m.serving_pid() == Some(pid);
            ((standby || serving) && m.policy.hang_timeout_ms > 0).then(|| {
                (
                    standby,
                    Duration::from_millis(m.policy.hang_timeout_ms.into()),
                )
            })
        });
        let Some((standby, timeout)) = watched.flatten() else {
            return;
        };
        if !process_stopped(pid) {
            *stopped_since = None;
            return;
        }
        let since = *stopped_since.get_or_insert_with(Instant::now);
        if since.elapsed() < timeout {
            return;
        }
        if !standby {
            let stalled_ms = since.elapsed().as_millis() as u64;
            if let Action::Kill(_) = self.on(vm, device, Event::Hung { stalled_ms }) {
                let words =
                    format!("hung: no progress for {stalled_ms} ms (stopped); killing pid {pid}");
                self.tell(vm, device, &format!("backend {words}"));
            }
            return;
        }
        if let Action::Kill(_) = self.on(vm, device, Event::StandbyRefused { pid }) {
            let words = format!(
                "standby (pid {pid}) hung: stopped for {} ms; ending it and starting another",
                since.elapsed().as_millis()
            );
            self.tell(vm, device, &words);
            self.keep_standby(vm, device);
        }
    }

    /// Starts a standby backend for `device` in the background if it should have one: a
    /// device (disk or NIC) whose restart policy restarts it, with no standby yet, in a VM
    /// that runs on.
    pub fn keep_standby(&self, vm: &Arc<VmEntry>, device: &str) {
        if vm.is_ending() {
            return;
        }
        if !matches!(
            self.on(vm, device, Event::StandbyWanted),
            Action::LaunchStandby
        ) {
            return;
        }
        self.in_background("standby", vm, device, |me, vm, device| {
            if let Err(e) = me.launch_standby(vm, device) {
                log(&format!(
                    "VM '{}': {device}: no standby backend: {e}",
                    vm.name
                ));
            }
            me.on(vm, device, Event::StandbyLaunchOver);
        });
    }

    pub(super) fn launch_standby(&self, vm: &Arc<VmEntry>, device: &str) -> Result<(), String> {
        let (binary, p) = self.spawn(vm, device, true, false)?;
        if let Ok(fd) = p.pidfd.try_clone() {
            vm.add_backend(fd);
        }
        let pid = p.pid;
        let conn = p.conn.try_clone().map_err(|e| format!("{device}: {e}"))?;
        // In the machine before its watcher starts, so the watcher finds it there.
        self.on(vm, device, Event::StandbySpawned { pid, binary, conn });
        self.watch(vm, device, pid);
        match p.await_ready(&self.state, device) {
            Ok(()) => {
                self.on(vm, device, Event::StandbyReady { pid });
                Ok(())
            }
            Err(e) => {
                if let Action::Kill(_) = self.on(vm, device, Event::StandbyRefused { pid }) {
                    log(&format!(
                        "VM '{}': {device} standby (pid {pid}) ended: {e}",
                        vm.name
                    ));
                }
                Err(e)
            }
        }
    }
}
