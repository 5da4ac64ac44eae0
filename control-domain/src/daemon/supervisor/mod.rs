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

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bulkhead_ipc::runner::{RunnerCommand, RunnerEvent};

use super::state::{BackendRecord, StateDir};
use super::vm::{lock, VmEntry};
use super::{log, spawn};
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
    fn on(&self, vm: &VmEntry, device: &str, event: Event<UnixStream>) -> Action<UnixStream> {
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
        self.hear_hangs(vm);
        let binary = launch.binary.clone();
        let mut pidfds = BTreeMap::new();
        if let Some(fd) = pid.and_then(|p| spawn::pidfd_open(p).ok()) {
            pidfds.extend(pid.map(|p| (p, fd)));
        }
        lock(&vm.devices.slots).insert(
            device.to_string(),
            DeviceSlot {
                resource: launch.resource,
                args: launch.args,
                uid: launch.uid,
                machine: Device::new(launch.binary, launch.policy),
                pidfds,
            },
        );
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
            _ => {
                let Some(me) = self.me.upgrade() else {
                    return;
                };
                let vm = vm.clone();
                let device = device.to_string();
                let _ = std::thread::Builder::new()
                    .name(format!("adopt-{device}"))
                    .spawn(move || {
                        me.decide(&vm, &device, false, "ended while bulkheadd was down".into())
                    });
            }
        }
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
        self.hear_hangs(vm);
        lock(&vm.devices.slots).insert(
            device.to_string(),
            DeviceSlot {
                resource: launch.resource,
                args: launch.args,
                uid: launch.uid,
                machine: Device::new(launch.binary, launch.policy),
                pidfds: BTreeMap::new(),
            },
        );
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
    fn next_launch(&self, vm: &VmEntry, device: &str) -> Result<BackendLaunch, String> {
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
                })
            })
            .unwrap_or_else(|| Err(format!("'{device}' is not restartable (re-adopted VM?)")))
    }

    /// Spawns `device`'s next process (a `standby` or a serving one); `fresh_log` starts its
    /// log anew. Returns the binary it runs and the process.
    fn spawn(
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
            l.uid,
            standby,
            fresh_log,
        )?;
        if let Ok(fd) = spawn::pidfd_open(p.pid) {
            vm.devices.with(device, |s| s.pidfds.insert(p.pid, fd));
        }
        Ok((l.binary, p))
    }

    /// Launches a serving process for `device` and waits until it is ready. On error, the
    /// pid of a process that was started (and refused) if there is one.
    fn launch_serving(
        &self,
        vm: &Arc<VmEntry>,
        device: &str,
        first: bool,
    ) -> Result<(i32, UnixStream), (Option<i32>, String)> {
        let (binary, p) = self
            .spawn(vm, device, false, first)
            .map_err(|e| (None, e))?;
        if let Ok(fd) = spawn::pidfd_open(p.pid) {
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
    fn watch(&self, vm: &Arc<VmEntry>, device: &str, pid: i32) {
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

    /// The serving process of `device` ended with `status`: decide, then restart or stall.
    fn serving_ended(
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
    fn decide(&self, vm: &Arc<VmEntry>, device: &str, clean: bool, why: String) {
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
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let vm = vm.clone();
        let device = device.to_string();
        let _ = std::thread::Builder::new()
            .name(format!("retry-{device}"))
            .spawn(move || {
                std::thread::sleep(retry_in);
                // Only the try this thread was scheduled for (not one a later failure or an
                // administrator's restart replaced).
                let due = vm
                    .backend(&device)
                    .is_some_and(|b| b.next_attempt_unix == Some(at));
                if vm.is_ending() || !due {
                    return;
                }
                if matches!(me.on(&vm, &device, Event::RetryFailed), Action::SpawnNow) {
                    log(&format!(
                        "VM '{}': trying the failed {device} again",
                        vm.name
                    ));
                    if let Err(e) = me.respawn(&vm, &device) {
                        log(&format!("VM '{}': {device}: {e}", vm.name));
                    }
                }
            });
    }

    /// The runner saw `device`'s serving backend hold requests with no completion for
    /// `stalled_ms`: it is killed, and replaced like after a crash.
    pub fn hung(&self, vm: &VmEntry, device: &str, stalled_ms: u64) {
        let pid = vm
            .devices
            .with(device, |s| s.machine.serving_pid())
            .flatten();
        if let Action::Kill(pid) = self.on(vm, device, Event::Hung { stalled_ms }) {
            let words = format!("hung: no progress for {stalled_ms} ms; killing pid {pid}");
            log(&format!("VM '{}': {device} backend {words}", vm.name));
            launch::append_log(
                &self.state,
                &vm.name,
                device,
                &format!("bulkheadd: {words}"),
            );
        } else if let Some(pid) = pid {
            log(&format!(
                "VM '{}': {device}: the runner reports pid {pid} hung ({stalled_ms} ms), but it is already being replaced",
                vm.name
            ));
        }
    }

    /// Gives `device` a new serving process (its standby, or a new one) and hands the
    /// runner its connection.
    fn respawn(&self, vm: &Arc<VmEntry>, device: &str) -> Result<(), String> {
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
    fn refuse(&self, vm: &VmEntry, device: &str, pid: i32, why: &str) {
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

/// Standbys: a second backend per device, set up and waiting to take over.
impl Supervisor {
    /// A backend that is stopped (SIGSTOP) for the device's hang timeout is hung, whether
    /// or not requests wait: a serving one is replaced like after a crash, a standby (which
    /// would stall the next takeover) is ended and replaced. `stopped_since`: when `pid`
    /// was first seen stopped (its watcher keeps it).
    fn frozen(
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
                log(&format!("VM '{}': {device} backend {words}", vm.name));
                launch::append_log(
                    &self.state,
                    &vm.name,
                    device,
                    &format!("bulkheadd: {words}"),
                );
            }
            return;
        }
        if let Action::Kill(_) = self.on(vm, device, Event::StandbyRefused { pid }) {
            let words = format!(
                "standby (pid {pid}) hung: stopped for {} ms; ending it and starting another",
                since.elapsed().as_millis()
            );
            log(&format!("VM '{}': {device} {words}", vm.name));
            launch::append_log(
                &self.state,
                &vm.name,
                device,
                &format!("bulkheadd: {words}"),
            );
            self.keep_standby(vm, device);
        }
    }

    /// Starts a standby backend for `device` in the background if it should have one: a
    /// device (disk or NIC) whose restart policy restarts it, with no standby yet, in a VM
    /// that runs on.
    pub fn keep_standby(&self, vm: &Arc<VmEntry>, device: &str) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        if vm.is_ending() {
            return;
        }
        if !matches!(
            self.on(vm, device, Event::StandbyWanted),
            Action::LaunchStandby
        ) {
            return;
        }
        let vm = vm.clone();
        let device = device.to_string();
        let _ = std::thread::Builder::new()
            .name(format!("standby-{device}"))
            .spawn(move || {
                if let Err(e) = me.launch_standby(&vm, &device) {
                    log(&format!(
                        "VM '{}': {device}: no standby backend: {e}",
                        vm.name
                    ));
                }
                me.on(&vm, &device, Event::StandbyLaunchOver);
            });
    }

    fn launch_standby(&self, vm: &Arc<VmEntry>, device: &str) -> Result<(), String> {
        let (binary, p) = self.spawn(vm, device, true, false)?;
        if let Ok(fd) = spawn::pidfd_open(p.pid) {
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

/// How a reaped process ended, in words.
fn exit_words(status: Option<nix::sys::wait::WaitStatus>) -> String {
    match status {
        Some(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => format!("killed by {sig}"),
        Some(nix::sys::wait::WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
        // Not our child (a backend re-adopted after a bulkheadd restart): no status.
        _ => "ended (exit status unknown)".to_string(),
    }
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether `pid` is stopped (SIGSTOP, or traced): state `T` or `t` in /proc/PID/stat.
fn process_stopped(pid: i32) -> bool {
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
fn still_running(pid: i32) -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    matches!(
        waitid(
            Id::Pid(nix::unistd::Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ),
        Ok(WaitStatus::StillAlive)
    )
}
