//! Backend supervision: every device backend of every VM, from its first start to the VM's
//! end. Reads top to bottom: start a device ([`Supervisor::start_device`]), watch its
//! process, decide what follows its end by the device's state machine ([`device`]),
//! restart it (the standby takes over, or a new process is launched and handed to the
//! runner), keep a standby, refuse a process that will never serve, and restart or upgrade
//! on request.
//!
//! Owns the per-VM [`DeviceTable`] and its lock. Lock order: the device table, then the
//! VM's record (through [`VmEntry`]'s methods). A pid is signalled only under the device
//! table lock while the device's machine says the process is unreaped (a watcher moves the
//! machine on under that lock before it reaps), so a reused pid is never hit.
//! May call: [`launch`] (processes), the VM's runner link (`ReconnectDevice`), the VM's
//! record. Never the policy: callers authorize first.

pub mod device;
pub mod launch;
mod requests;
mod restart;
mod standby;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::state::{BackendRecord, StateDir};
use super::vm::{lock, VmEntry};
use super::{log, spawn};
use bulkhead_ipc::devstats::DaemonRegion;
use device::{Action, Device, Event, Serving, Stall};
pub use launch::BackendLaunch;

/// One device: what its processes are started with, and its state machine.
struct DeviceSlot {
    /// Image or tap (a dup; each process gets a dup of this).
    resource: OwnedFd,
    /// Device-specific arguments.
    args: Vec<String>,
    /// Its uid.
    uid: u32,
    /// The state machine.
    machine: Device<UnixStream>,
    /// A pidfd per process of the device that may still be signalled: kills go through
    /// these, so a reused pid is never hit (re-adopted backends are not our children).
    pidfds: BTreeMap<i32, OwnedFd>,
    /// The device's shared counters and limits page: the memfd every process of the
    /// device is handed, and bulkheadd's mapping of it.
    stats: Option<(OwnedFd, Arc<DaemonRegion>)>,
}

/// The devices of one VM, by name (`disk0`, `nic0`).
#[derive(Default)]
pub struct DeviceTable {
    slots: Mutex<BTreeMap<String, DeviceSlot>>,
}

impl DeviceTable {
    /// Forgets every device (the VM ends: no more restarts).
    pub fn clear(&self) {
        lock(&self.slots).clear();
    }

    /// Runs `f` on `device`'s slot under the table lock.
    fn with<R>(&self, device: &str, f: impl FnOnce(&mut DeviceSlot) -> R) -> Option<R> {
        lock(&self.slots).get_mut(device).map(f)
    }

    /// `device`'s shared counters and limits page, if it has one.
    pub fn stats(&self, device: &str) -> Option<Arc<DaemonRegion>> {
        lock(&self.slots)
            .get(device)
            .and_then(|s| s.stats.as_ref().map(|(_, r)| r.clone()))
    }
}

/// Supervises the backends of all VMs.
pub struct Supervisor {
    me: Weak<Supervisor>,
    state: StateDir,
}

impl Supervisor {
    /// A supervisor whose processes' sockets, logs and sandbox roots are in `state`.
    pub fn new(state: StateDir) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            state,
        })
    }

    /// Feeds `device`'s machine one event; carries out a `Kill` at once (under the lock,
    /// see the module doc) and brings the record in line with the machine.
    pub(super) fn on(
        &self,
        vm: &VmEntry,
        device: &str,
        event: Event<UnixStream>,
    ) -> Action<UnixStream> {
        let mut slots = lock(&vm.devices.slots);
        let Some(slot) = slots.get_mut(device) else {
            return Action::None;
        };
        let ended = match &event {
            Event::Ended { pid } => Some(*pid),
            _ => None,
        };
        let action = slot.machine.on(event, Instant::now());
        if let Action::Kill(pid) = action {
            match slot.pidfds.get(&pid) {
                Some(fd) => {
                    let _ = spawn::pidfd_kill(fd);
                }
                None => sigkill(pid),
            }
        }
        if let Some(pid) = ended {
            slot.pidfds.remove(&pid);
        }
        let m = &slot.machine;
        let changed = vm.update_backend(device, |b| {
            let before = b.clone();
            if let Serving::Up { pid, binary, .. } = &m.serving {
                b.pid = *pid;
                b.binary = binary.display().to_string();
            }
            b.standby_pid = m.ready_standby();
            (b.failed, b.stopped) = match &m.serving {
                Serving::Stalled(Stall::Failed(f)) => (Some(f.clone()), None),
                Serving::Stalled(Stall::Stopped(s)) => (None, Some(format!("not restarted: {s}"))),
                _ => (None, None),
            };
            if b.failed.is_none() {
                b.next_attempt_unix = None;
            }
            *b != before
        });
        // The state file says what `info` says (a restarted bulkheadd reads it).
        if changed == Some(true) {
            vm.save();
        }
        action
    }

    /// Takes over `device` of a VM re-adopted after a `bulkheadd` restart: its serving
    /// backend `pid` is watched from now on (through a pidfd: it is not our child), and
    /// one that ended while nobody watched (`None`) is decided on and restarted at once.
    /// The device gets a standby again.
    pub fn adopt_device(
        &self,
        vm: &Arc<VmEntry>,
        device: &str,
        launch: BackendLaunch,
        pid: Option<i32>,
    ) {
        let binary = launch.binary.clone();
        let mut pidfds = BTreeMap::new();
        if let Some(fd) = pid.and_then(|p| spawn::pidfd_open(p).ok()) {
            pidfds.extend(pid.map(|p| (p, fd)));
        }
        self.add_device(vm, device, launch, pidfds);
        let gone = matches!(
            self.on(vm, device, Event::Adopted { pid, binary }),
            Action::ServingEnded
        );
        vm.save();
        match (pid, gone) {
            (Some(pid), false) => {
                self.watch(vm, device, pid);
                self.keep_standby(vm, device);
            }
            _ => self.in_background("adopt", vm, device, |me, vm, device| {
                me.decide(vm, device, false, "ended while bulkheadd was down".into())
            }),
        }
    }

    /// Puts `device` under supervision: its slot (what its processes are started with, a
    /// fresh state machine, the pidfds of processes it already has), and `vm`'s reports of
    /// hung backends reach this supervisor.
    fn add_device(
        &self,
        vm: &VmEntry,
        device: &str,
        launch: BackendLaunch,
        pidfds: BTreeMap<i32, OwnedFd>,
    ) {
        self.hear_hangs(vm);
        let stats =
            launch
                .stats
                .and_then(|fd| match DaemonRegion::map(fd.as_fd(), launch.limits) {
                    Ok(r) => Some((fd, Arc::new(r))),
                    Err(e) => {
                        log(&format!(
                            "VM '{}': {device}: no counters or limits: {e}",
                            vm.name
                        ));
                        None
                    }
                });
        lock(&vm.devices.slots).insert(
            device.to_string(),
            DeviceSlot {
                resource: launch.resource,
                args: launch.args,
                uid: launch.uid,
                machine: Device::new(launch.binary, launch.policy),
                pidfds,
                stats,
            },
        );
    }

    /// Says what was done to `device`'s backends, in bulkheadd's log and the device's.
    pub(super) fn tell(&self, vm: &VmEntry, device: &str, words: &str) {
        log(&format!("VM '{}': {device} {words}", vm.name));
        launch::append_log(
            &self.state,
            &vm.name,
            device,
            &format!("bulkheadd: {words}"),
        );
    }

    /// Runs `work` for `vm`'s `device` on a thread of its own, named `what-DEVICE`.
    pub(super) fn in_background(
        &self,
        what: &str,
        vm: &Arc<VmEntry>,
        device: &str,
        work: impl FnOnce(&Supervisor, &Arc<VmEntry>, &str) + Send + 'static,
    ) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let vm = vm.clone();
        let device = device.to_string();
        let _ = std::thread::Builder::new()
            .name(format!("{what}-{device}"))
            .spawn(move || work(&me, &vm, &device));
    }

    /// Has `vm`'s runner reports of hung backends reach this supervisor.
    fn hear_hangs(&self, vm: &VmEntry) {
        let me = self.me.clone();
        vm.set_hang_handler(Arc::new(move |vm, device, ms| {
            if let Some(s) = me.upgrade() {
                s.hung(vm, device, ms);
            }
        }));
    }

    /// Starts `device`'s first backend; returns the runner's end of its connection.
    pub fn start_device(
        &self,
        vm: &Arc<VmEntry>,
        device: &str,
        launch: BackendLaunch,
    ) -> Result<UnixStream, String> {
        vm.update(|rec| {
            rec.backends.retain(|b| b.device != device);
            rec.backends.push(BackendRecord {
                device: device.to_string(),
                pid: 0,
                uid: launch.uid,
                binary: launch.binary.display().to_string(),
                restarts: 0,
                last_exit: None,
                failed: None,
                stopped: None,
                restart_policy: launch.policy.to_string(),
                standby_pid: None,
                next_attempt_unix: None,
            });
        });
        self.add_device(vm, device, launch, BTreeMap::new());
        self.launch_serving(vm, device, true)
            .map(|(_, conn)| conn)
            .map_err(|(_, e)| e)
    }

    /// The guest booted with every device of `vm`: the runner set up each first backend,
    /// so each serves.
    pub fn booted(&self, vm: &VmEntry) {
        let devices: Vec<(String, Option<i32>)> = lock(&vm.devices.slots)
            .iter()
            .map(|(d, s)| (d.clone(), s.machine.serving_pid()))
            .collect();
        for (device, pid) in devices {
            if let Some(pid) = pid {
                self.on(vm, &device, Event::Served { pid });
            }
        }
    }

    /// What the next process of `device` is started with.
    pub(super) fn next_launch(&self, vm: &VmEntry, device: &str) -> Result<BackendLaunch, String> {
        vm.devices
            .with(device, |slot| {
                Ok(BackendLaunch {
                    binary: slot.machine.binary.clone(),
                    args: slot.args.clone(),
                    resource: slot
                        .resource
                        .try_clone()
                        .map_err(|e| format!("{device}: {e}"))?,
                    uid: slot.uid,
                    policy: slot.machine.policy,
                    stats: match &slot.stats {
                        Some((fd, _)) => {
                            Some(fd.try_clone().map_err(|e| format!("{device}: {e}"))?)
                        }
                        None => None,
                    },
                    limits: Default::default(),
                })
            })
            .unwrap_or_else(|| Err(format!("'{device}' is not restartable (re-adopted VM?)")))
    }

    /// Spawns `device`'s next process (a `standby` or a serving one); `fresh_log` starts its
    /// log anew. Returns the binary it runs and the process.
    pub(super) fn spawn(
        &self,
        vm: &VmEntry,
        device: &str,
        standby: bool,
        fresh_log: bool,
    ) -> Result<(PathBuf, launch::Spawned), String> {
        let l = self.next_launch(vm, device)?;
        let p = launch::spawn_backend(
            &self.state,
            &vm.name,
            device,
            &l.binary,
            &l.args,
            l.resource,
            l.stats,
            l.uid,
            standby,
            fresh_log,
            vm.read(|r| r.spec.memory),
        )?;
        if let Ok(fd) = p.pidfd.try_clone() {
            vm.devices.with(device, |s| s.pidfds.insert(p.pid, fd));
        }
        Ok((l.binary, p))
    }

    /// Launches a serving process for `device` and waits until it is ready. On error, the
    /// pid of a process that was started (and refused) if there is one.
    pub(super) fn launch_serving(
        &self,
        vm: &Arc<VmEntry>,
        device: &str,
        first: bool,
    ) -> Result<(i32, UnixStream), (Option<i32>, String)> {
        let (binary, p) = self
            .spawn(vm, device, false, first)
            .map_err(|e| (None, e))?;
        if let Ok(fd) = p.pidfd.try_clone() {
            vm.add_backend(fd);
        }
        self.on(vm, device, Event::Spawned { pid: p.pid, binary });
        vm.save();
        self.watch(vm, device, p.pid);
        if let Err(e) = p.await_ready(&self.state, device) {
            self.refuse(vm, device, p.pid, &e);
            return Err((Some(p.pid), e));
        }
        Ok((p.pid, p.conn))
    }

    /// Watches a backend process; when it ends while the VM runs, its device's machine
    /// decides what follows.
    pub(super) fn watch(&self, vm: &Arc<VmEntry>, device: &str, pid: i32) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let vm = vm.clone();
        let device = device.to_string();
        let pidfd = spawn::pidfd_open(pid).ok();
        let _ = std::thread::Builder::new()
            .name(format!("watch-{device}"))
            .spawn(move || {
                if let Some(fd) = &pidfd {
                    let mut stopped_since = None;
                    loop {
                        let mut pfd = [nix::poll::PollFd::new(
                            fd.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(200u16)) {
                            Ok(0) => me.frozen(&vm, &device, pid, &mut stopped_since),
                            Err(nix::errno::Errno::EINTR) => {}
                            _ => break,
                        }
                    }
                }
                // Out of the machine's "unreaped" states before it is reaped.
                let ended = me.on(&vm, &device, Event::Ended { pid });
                let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).ok();
                if vm.is_ending() {
                    return;
                }
                match ended {
                    Action::ServingEnded => me.serving_ended(&vm, &device, status),
                    Action::StandbyEnded { replace, .. } => {
                        log(&format!(
                            "VM '{}': {device} standby (pid {pid}) {}{}",
                            vm.name,
                            exit_words(status),
                            if replace {
                                "; starting another"
                            } else {
                                "; none kept until the next restart"
                            }
                        ));
                        if replace {
                            me.keep_standby(&vm, &device);
                        }
                    }
                    _ => {}
                }
            });
    }
}

/// How a reaped process ended, in words.
pub(super) fn exit_words(status: Option<nix::sys::wait::WaitStatus>) -> String {
    match status {
        Some(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => format!("killed by {sig}"),
        Some(nix::sys::wait::WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
        // Not our child (a backend re-adopted after a bulkheadd restart): no status.
        _ => "ended (exit status unknown)".to_string(),
    }
}

/// Seconds since the epoch.
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether `pid` is stopped (SIGSTOP, or traced): state `T` or `t` in /proc/PID/stat.
pub(super) fn process_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            rest.trim_start().chars().next()
        })
        .is_some_and(|c| c == 'T' || c == 't')
}

/// Sends SIGKILL to `pid`. Callers make sure it is still unreaped (so not a reused pid).
fn sigkill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Whether child `pid` has not exited yet (it is not reaped by this check).
pub(super) fn still_running(pid: i32) -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    matches!(
        waitid(
            Id::Pid(nix::unistd::Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ),
        Ok(WaitStatus::StillAlive)
    )
}
