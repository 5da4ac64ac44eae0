//! The API: one function per `ipc` request. Each authorizes the caller by the policy, then
//! calls into the lifecycle or the supervisor, and turns the outcome into a [`Reply`]. No
//! I/O and no locks of its own. Console requests belong to a connection and are served by
//! [`super::server`].

use std::path::{Path, PathBuf};

use bulkhead_ipc::control::{ErrorCode, Reply, Request};

use super::describe::{info, summary};
use super::policy::{Action, Caller};
use super::{fail, Daemon, Failure};

impl Daemon {
    /// Serves one request for `caller`.
    pub(super) fn handle(&self, caller: &Caller, req: Request) -> Result<Reply, Failure> {
        match req {
            Request::Create {
                config_toml,
                config_dir,
            } => {
                self.policy
                    .authorize(caller, Action::Create, None)
                    .map_err(|m| fail(ErrorCode::Denied, m))?;
                self.create(caller, &config_toml, Path::new(&config_dir))
            }
            Request::List => {
                let visible = self
                    .vms
                    .all()
                    .iter()
                    .filter(|vm| {
                        let owner = vm.read(|r| r.spec.owner);
                        self.policy
                            .authorize(caller, Action::View, Some((&vm.name, owner)))
                            .is_ok()
                    })
                    .map(|vm| summary(vm))
                    .collect();
                Ok(Reply::List { vms: visible })
            }
            Request::Info { name } => {
                let vm = self.find(caller, &name, Action::View)?;
                Ok(Reply::Info { vm: info(&vm) })
            }
            Request::Pause { name } => self.pause(&*self.find(caller, &name, Action::Pause)?, true),
            Request::Unpause { name } => {
                self.pause(&*self.find(caller, &name, Action::Pause)?, false)
            }
            Request::Shutdown { name, timeout_secs } => {
                self.shutdown(&*self.find(caller, &name, Action::Shutdown)?, timeout_secs)
            }
            Request::Reboot { name, timeout_secs } => {
                self.reboot(&*self.find(caller, &name, Action::Shutdown)?, timeout_secs)
            }
            Request::Destroy { name } => {
                self.destroy(&*self.find(caller, &name, Action::Destroy)?)
            }
            Request::DeviceRestart { name, device } => {
                self.device_restart(caller, &name, &device, None, Action::DeviceRestart)
            }
            Request::DeviceUpgrade {
                name,
                device,
                binary,
            } => self.device_restart(
                caller,
                &name,
                &device,
                Some(PathBuf::from(binary)),
                Action::DeviceUpgrade,
            ),
            Request::Console { .. } | Request::ConsoleInput { .. } | Request::ConsoleDetach => {
                Err(fail(
                    ErrorCode::Protocol,
                    "console requests are handled per connection",
                ))
            }
        }
    }

    /// `device-restart` and `device-upgrade`: a running VM's device gets a new backend.
    fn device_restart(
        &self,
        caller: &Caller,
        name: &str,
        device: &str,
        binary: Option<PathBuf>,
        action: Action,
    ) -> Result<Reply, Failure> {
        let vm = self.find(caller, name, action)?;
        if !vm.is_live() {
            return Err(fail(
                ErrorCode::WrongState,
                format!("VM '{name}' is not running"),
            ));
        }
        let by_admin = self.policy.is_admin(caller);
        let message = self
            .supervisor
            .restart_device(&vm, device, binary, by_admin)?;
        Ok(Reply::Done { message })
    }
}
