//! The API: one function per `ipc` request. Each authorizes the caller by the policy, then
//! calls into the lifecycle or the supervisor, and turns the outcome into a [`Reply`]. No
//! I/O and no locks of its own. Console requests belong to a connection and are served by
//! [`super::server`].

use std::path::{Path, PathBuf};

use bulkhead_ipc::control::{ErrorCode, LimitsUpdate, Reply, Request};
use bulkhead_ipc::devstats::Limits;

use super::describe::{info, summary};
use super::policy::{Action, Caller};
use super::stats::{summed, vm_stats};
use super::vmconfig::LimitsConfig;
use super::{fail, log, Daemon, Failure};

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
            Request::Stats { name: Some(name) } => {
                let vm = self.find(caller, &name, Action::View)?;
                Ok(Reply::Stats {
                    vms: vec![vm_stats(&vm)],
                })
            }
            Request::Stats { name: None } => {
                let vms = self
                    .vms
                    .all()
                    .iter()
                    .filter(|vm| {
                        let owner = vm.read(|r| r.spec.owner);
                        self.policy
                            .authorize(caller, Action::View, Some((&vm.name, owner)))
                            .is_ok()
                    })
                    .map(|vm| summed(vm_stats(vm)))
                    .collect();
                Ok(Reply::Stats { vms })
            }
            Request::DeviceSetLimit {
                name,
                device,
                limits,
            } => self.device_set_limit(caller, &name, &device, &limits),
            Request::Console { .. } | Request::ConsoleInput { .. } | Request::ConsoleDetach => {
                Err(fail(
                    ErrorCode::Protocol,
                    "console requests are handled per connection",
                ))
            }
        }
    }

    /// `device-set-limit`: a running VM's device gets new rate limits, within the policy's
    /// caps; its backend takes them at its next request, and the record keeps them for
    /// later backends.
    fn device_set_limit(
        &self,
        caller: &Caller,
        name: &str,
        device: &str,
        upd: &LimitsUpdate,
    ) -> Result<Reply, Failure> {
        let vm = self.find(caller, name, Action::DeviceSetLimit)?;
        if !vm.is_live() {
            return Err(fail(
                ErrorCode::WrongState,
                format!("VM '{name}' is not running"),
            ));
        }
        let (disk, index) = match (device.strip_prefix("disk"), device.strip_prefix("nic")) {
            (Some(i), _) => (true, i.parse::<usize>().ok()),
            (_, Some(i)) => (false, i.parse::<usize>().ok()),
            _ => (true, None),
        };
        let (count, now) = vm.read(|r| {
            let l = |c: Option<&LimitsConfig>| c.and_then(|l| l.resolve(disk).ok());
            if disk {
                (
                    r.spec.disks.len(),
                    index
                        .and_then(|i| r.spec.disks.get(i))
                        .and_then(|d| l(d.limits.as_ref())),
                )
            } else {
                (
                    r.spec.nics.len(),
                    index
                        .and_then(|i| r.spec.nics.get(i))
                        .and_then(|n| l(n.limits.as_ref())),
                )
            }
        });
        let Some(index) = index.filter(|i| *i < count) else {
            return Err(fail(
                ErrorCode::NotFound,
                format!("VM '{name}' has no device '{device}'"),
            ));
        };
        let now = now.unwrap_or_default();
        let asked = Limits {
            bw_rate: upd.bandwidth.unwrap_or(now.bw_rate),
            bw_burst: upd.bandwidth_burst.unwrap_or(now.bw_burst),
            ops_rate: upd.ops.unwrap_or(now.ops_rate),
            ops_burst: upd.ops_burst.unwrap_or(now.ops_burst),
        };
        let l = self
            .policy
            .device_limits(device, disk, asked)
            .map_err(|m| fail(ErrorCode::Denied, m))?;
        let region = vm.devices.stats(device);
        // Under the record lock: the page has one writer at a time.
        vm.update(|r| {
            let cfg = Some(LimitsConfig::from_limits(l, disk));
            if disk {
                if let Some(d) = r.spec.disks.get_mut(index) {
                    d.limits = cfg;
                }
            } else if let Some(n) = r.spec.nics.get_mut(index) {
                n.limits = cfg;
            }
            if let Some(region) = &region {
                region.set_limits(l);
            }
        });
        vm.save();
        let ops = if disk { "requests/s" } else { "packets/s" };
        let words = format!(
            "{device}: limits {} bytes/s (burst {}), {} {ops} (burst {}) (0: none)",
            l.bw_rate, l.bw_burst, l.ops_rate, l.ops_burst
        );
        log(&format!("VM '{name}': {words}"));
        if region.is_none() {
            return Ok(Reply::Done {
                message: format!(
                    "{words}; recorded, but its backend enforces none (it takes no limits page)"
                ),
            });
        }
        Ok(Reply::Done { message: words })
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
