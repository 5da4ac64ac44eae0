//! Re-adoption: when `bulkheadd` starts, the VMs in the state dir whose runners still run
//! are reconnected; the others are recorded as crashed.

use std::time::Duration;

use bulkhead_ipc::control::{StopReason, VmState};
use bulkhead_ipc::hello::{client_hello, Role};
use bulkhead_ipc::runner::RunnerCommand;
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
        ch.send(&RunnerCommand::Status, &[])
            .map_err(|e| gone(e.to_string()))?;
        // The answer (or an Exited report, if the guest ended meanwhile) reaches the supervisor.
        vm.attach(ch, pidfd).map_err(|e| e.to_string())
    }
}
