//! Re-adoption: when `bulkheadd` starts, the VMs in the state dir whose runners still run
//! are reconnected, with every guarantee they had: each device's backend is supervised
//! again (one that died while `bulkheadd` was down is restarted at once) and gets a new
//! standby. VMs whose runners are gone are recorded as crashed.

use std::path::PathBuf;
use std::time::Duration;

use bulkhead_ipc::control::{StopReason, VmState};
use bulkhead_ipc::hello::{client_hello, Role};
use bulkhead_ipc::runner::{RunnerCommand, RunnerRequest};
use bulkhead_ipc::Channel;

use crate::daemon::spawn;
use crate::daemon::state::VmRecord;
use crate::daemon::vm::VmEntry;
use crate::daemon::{log, Daemon};

impl Daemon {
    /// Re-adopts the VMs in the state dir: live runners are reconnected, dead ones recorded.
    pub(in crate::daemon) fn adopt_all(&self) {
        for (name, rec) in self.state.load_all() {
            let live = !matches!(rec.state, VmState::Stopped(_));
            let vm = VmEntry::new(name.clone(), rec.clone(), self.state.clone(), false);
            self.vms.insert(vm.clone());
            if !live {
                continue;
            }
            match self.adopt(&vm, &rec) {
                Ok(()) => log(&format!(
                    "re-adopted VM '{name}' (runner pid {:?})",
                    rec.runner_pid
                )),
                Err(why) => {
                    log(&format!("VM '{name}': {why}"));
                    vm.mark_stopped(StopReason::Crashed(why));
                }
            }
        }
    }

    fn adopt(&self, vm: &std::sync::Arc<VmEntry>, rec: &VmRecord) -> Result<(), String> {
        // Standby backends end with the daemon that held their connections.
        vm.update(|r| {
            for b in r.backends.iter_mut() {
                b.standby_pid = None;
            }
        });
        let pid = rec.runner_pid.ok_or("no runner pid recorded")?;
        let sock = self.state.socket_path(&vm.name);
        let gone = |e: String| {
            log(&format!(
                "VM '{}': cannot reach runner pid {pid}: {e}",
                vm.name
            ));
            format!("runner pid {pid} was gone when bulkheadd restarted")
        };
        let ch = Channel::connect(&sock).map_err(|e| gone(e.to_string()))?;
        client_hello(&ch, Role::Daemon, Duration::from_secs(5)).map_err(|e| gone(e.to_string()))?;
        let pidfd = spawn::pidfd_open(pid).ok();
        for b in &rec.backends {
            if let Ok(fd) = spawn::pidfd_open(b.pid) {
                vm.add_backend(fd);
            }
        }
        if rec.state == VmState::Saving {
            // The last bulkheadd died during a save: its runner holds the VM paused and
            // drained. The devices come back; the vCPUs stay paused until `unpause`.
            let end = RunnerRequest {
                id: 0,
                command: RunnerCommand::EndSave { resume: false },
            };
            ch.send(&end, &[]).map_err(|e| gone(e.to_string()))?;
            vm.set_state(VmState::Paused);
            log(&format!(
                "VM '{}': a save was interrupted by bulkheadd's restart; the VM is left paused",
                vm.name
            ));
        }
        let status = RunnerRequest {
            id: 0,
            command: RunnerCommand::Status,
        };
        ch.send(&status, &[]).map_err(|e| gone(e.to_string()))?;
        // The answer (or an Exited report, if the guest ended meanwhile) reaches the supervisor.
        vm.attach(ch, pidfd).map_err(|e| e.to_string())?;
        self.adopt_devices(vm);
        Ok(())
    }

    /// Rebuilds the supervision of `vm`'s devices from its record.
    fn adopt_devices(&self, vm: &std::sync::Arc<VmEntry>) {
        let (disks, nics) = vm.read(|r| (r.spec.disks.len(), r.spec.nics.len()));
        let devices = (0..disks)
            .map(|i| (format!("disk{i}"), i, true))
            .chain((0..nics).map(|i| (format!("nic{i}"), i, false)));
        for (device, index, is_disk) in devices {
            let Some(b) = vm.backend(&device) else {
                continue;
            };
            let pidfd = spawn::pidfd_open(b.pid).ok();
            let alive = pidfd.as_ref().is_some_and(|fd| !spawn::pidfd_exited(fd));
            // The backend's own image or tap (its fd 4), so nothing is reopened by path;
            // one that is gone took its tap with it, and a new one is made.
            let kept = pidfd
                .as_ref()
                .filter(|_| alive)
                .and_then(|fd| spawn::pidfd_getfd(fd, 4).ok());
            // Its counters page (fd 6), so the counts go on.
            let stats = pidfd
                .as_ref()
                .filter(|_| alive)
                .and_then(|fd| spawn::pidfd_getfd(fd, 6).ok());
            let launch = if is_disk {
                self.disk_launch_with(vm, index, b.uid, kept, stats)
            } else {
                // What its opener found the tap takes, from the live backend's arguments.
                let ufo = std::fs::read(format!("/proc/{}/cmdline", b.pid))
                    .is_ok_and(|c| c.split(|&x| x == 0).any(|a| a == b"ufo"));
                self.nic_launch_with(vm, index, b.uid, kept.map(|fd| (fd, ufo)), stats)
            };
            match launch {
                Ok(mut launch) => {
                    launch.binary = PathBuf::from(&b.binary);
                    log(&format!(
                        "VM '{}': {device}: {}",
                        vm.name,
                        if alive {
                            format!("backend pid {} supervised again", b.pid)
                        } else {
                            format!(
                                "backend pid {} ended while bulkheadd was down; restarting it",
                                b.pid
                            )
                        }
                    ));
                    self.supervisor
                        .adopt_device(vm, &device, launch, alive.then_some(b.pid));
                }
                Err(e) => log(&format!(
                    "VM '{}': {device}: cannot supervise its backend again: {e}",
                    vm.name
                )),
            }
        }
    }
}
