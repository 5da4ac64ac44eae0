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
    /// `fds`: the descriptors that came with the request (a snapshot file for `Save` and
    /// `Restore`; any other request must carry none).
    pub(super) fn handle(
        &self,
        caller: &Caller,
        req: Request,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Reply, Failure> {
        let one_file = |fds: Vec<std::os::fd::OwnedFd>| -> Result<std::fs::File, Failure> {
            let mut fds = fds.into_iter();
            match (fds.next(), fds.next()) {
                (Some(fd), None) => Ok(std::fs::File::from(fd)),
                _ => Err(fail(
                    ErrorCode::Protocol,
                    "save and restore carry exactly one descriptor: the snapshot file",
                )),
            }
        };
        let snapshot = matches!(req, Request::Save { .. } | Request::Restore { .. });
        if !snapshot && !fds.is_empty() {
            return Err(fail(
                ErrorCode::Protocol,
                "this request carries no descriptors",
            ));
        }
        match req {
            Request::Save { name, keep_running } => {
                let file = one_file(fds)?;
                let vm = self.find(caller, &name, Action::Save)?;
                self.save(&vm, &file, keep_running)
            }
            Request::Restore { name } => {
                let file = one_file(fds)?;
                self.policy
                    .authorize(caller, Action::Create, None)
                    .map_err(|m| fail(ErrorCode::Denied, m))?;
                self.restore(caller, &file, name)
            }
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
