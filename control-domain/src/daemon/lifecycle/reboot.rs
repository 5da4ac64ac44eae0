//! Guest reboots: the `reboot` verb (Ctrl-Alt-Del, as `shutdown` presses it, read as a
//! reboot), and the restart in place that `on_reboot = "restart"` asks for when the guest
//! reset itself. A restart in place is a new start of the same VM entry: the old runner is
//! gone (a reset ends the runner) and its backends were stopped with it, so the VM gets a
//! new runner and new backend processes for the same devices — same images, same taps on
//! the same bridges, same MACs, same uids, same console ring (attached consoles stay
//! attached) and the same record. The guest sees a machine reset.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bulkhead_ipc::control::{ErrorCode, Reply, StopReason, VmState};

use crate::daemon::describe::state_word;
use crate::daemon::vm::{Intent, RestartHook, VmEntry};
use crate::daemon::vmconfig::OnReboot;
use crate::daemon::{fail, log, Daemon, Failure};

impl Daemon {
    /// What restarts a VM this daemon created when its guest reboots.
    pub(super) fn restart_hook(&self) -> RestartHook {
        let me: Weak<Daemon> = self.me.clone();
        Box::new(move |vm: &Arc<VmEntry>| match me.upgrade() {
            Some(daemon) => daemon.restart_in_place(vm),
            None => Err("bulkheadd is shutting down".into()),
        })
    }

    /// Starts `vm` again with the uids its runner and backends had.
    fn restart_in_place(&self, vm: &Arc<VmEntry>) -> Result<(), String> {
        let (disks, nics, backends) =
            vm.read(|r| (r.spec.disks.len(), r.spec.nics.len(), r.backends.clone()));
        let devices = (0..disks)
            .map(|i| format!("disk{i}"))
            .chain((0..nics).map(|i| format!("nic{i}")));
        let mut uids = Vec::new();
        for d in devices {
            let b = backends
                .iter()
                .find(|b| b.device == d)
                .ok_or_else(|| format!("{d} has no backend record"))?;
            uids.push(b.uid);
        }
        // A new boot opens the kernel, initrd and images again, beneath the allowed
        // directories as a create does (they may have been replaced on purpose).
        let mut spec = vm.read(|r| r.spec.clone());
        let files = self.open_host_files(&mut spec)?;
        let detail = self.start(vm, &uids, files)?;
        log(&format!(
            "VM '{}' restarted in place (boot {}): {detail}",
            vm.name,
            vm.boots()
        ));
        Ok(())
    }

    /// Asks the guest to reboot and waits up to `timeout_secs` for it to be started again
    /// (or, with `on_reboot = "destroy"`, to stop).
    pub(crate) fn reboot(&self, vm: &VmEntry, timeout_secs: u32) -> Result<Reply, Failure> {
        let name = &vm.name;
        match vm.read(|r| r.state.clone()) {
            VmState::Running => {}
            VmState::Paused => {
                return Err(fail(
                    ErrorCode::WrongState,
                    format!("VM '{name}' is paused: `bulkhead unpause {name}` first"),
                ))
            }
            other => {
                return Err(fail(
                    ErrorCode::WrongState,
                    format!("VM '{name}' is {}, not running", state_word(&other)),
                ))
            }
        }
        let boots = vm.boots();
        super::request_shutdown(vm, Intent::Reboot)?;
        let timeout = Duration::from_secs(timeout_secs.into());
        if vm.wait_booted_after(boots, timeout) {
            return Ok(Reply::Done {
                message: format!("VM '{name}' rebooted"),
            });
        }
        if !vm.is_live() {
            let (state, on_reboot) = vm.read(|r| (r.state.clone(), r.spec.on_reboot));
            let why = match (&state, on_reboot) {
                (VmState::Stopped(StopReason::GuestShutdown), OnReboot::Destroy) => {
                    " (on_reboot = \"destroy\")"
                }
                _ => "",
            };
            return Ok(Reply::Done {
                message: format!("VM '{name}' {}{why}", state_word(&state)),
            });
        }
        Err(fail(
            ErrorCode::Timeout,
            format!("VM '{name}' did not reboot within {timeout_secs} s; it is still running (`bulkhead destroy {name}` stops it)"),
        ))
    }
}
