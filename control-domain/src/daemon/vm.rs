//! One VM as `bulkheadd` tracks it: its persistent record, the control channel to its
//! runner and the thread that reads the runner's events and notices when it stops. It holds
//! the VM's console ([`ConsoleRing`]) and device table ([`DeviceTable`]), whose locks are
//! their own modules'. Owns the record lock: other modules read and change the record
//! through its methods. When the runner ends because the guest rebooted and the VM's
//! `on_reboot` is `restart`, its supervisor thread calls the restart hook the lifecycle
//! installed ([`RestartHook`]) instead of recording a stop.
//! May call: the runner's channel, the state dir, the console, the restart hook.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bulkhead_ipc::control::{StopReason, VmState};
use bulkhead_ipc::runner::{
    GuestOutcome, RunnerCommand, RunnerEvent, RunnerMessage, RunnerRequest,
};
use bulkhead_ipc::{Channel, IpcError};
use crossbeam_channel::Sender;

use super::console::ConsoleRing;
use super::state::{BackendRecord, StateDir, VmRecord};
use super::supervisor::DeviceTable;

/// Called with a device's name and how long its backend made no progress, when the runner
/// reports it hung (set by the supervisor).
pub type HangHandler = Arc<dyn Fn(&VmEntry, &str, u64) + Send + Sync>;

/// What the control domain last asked the guest for (`shutdown` or `reboot`): how a guest
/// reset that follows is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Nothing asked: a reset is the guest's own reboot (`on_reboot` decides).
    None,
    /// `bulkhead shutdown`: a reset ends the VM.
    Shutdown,
    /// `bulkhead reboot`: a reset is a reboot (`on_reboot` decides).
    Reboot,
}

/// Starts a VM again in place after its guest rebooted (set by the lifecycle, which owns
/// starting VMs). Returns why it could not.
pub type RestartHook = Box<dyn Fn(&Arc<VmEntry>) -> Result<(), String> + Send + Sync>;

/// A VM known to `bulkheadd`.
pub struct VmEntry {
    /// Name (key of the registry).
    pub name: String,
    /// The persistent record.
    record: Mutex<VmRecord>,
    /// Console buffer and subscribers.
    pub console: ConsoleRing,
    /// Sending side of the runner's control channel.
    ctl: Mutex<Option<Channel>>,
    /// Serializes commands that wait for an answer.
    next_id: std::sync::atomic::AtomicU64,
    /// Where the supervisor forwards answers while a command waits.
    waiters: Mutex<std::collections::HashMap<u64, Sender<RunnerEvent>>>,
    /// pidfd of the runner (for kill without pid reuse races).
    pidfd: Mutex<Option<OwnedFd>>,
    /// pidfds of the device backends, killed when the VM stops.
    backend_pidfds: Mutex<Vec<OwnedFd>>,
    /// Whether this daemon spawned the runner (and so must reap it).
    pub spawned_here: bool,
    /// Set by destroy so the stop is recorded as such.
    destroying: Mutex<bool>,
    /// Set when the VM is ending: device backends are no longer restarted.
    ending: std::sync::atomic::AtomicBool,
    /// Each device's backend supervision.
    pub devices: DeviceTable,
    /// The runner's report of how the guest ended.
    outcome: Mutex<Option<GuestOutcome>>,
    /// Who hears of a hung device backend.
    hang_handler: Mutex<Option<HangHandler>>,
    /// Signalled when the VM has stopped.
    stopped: (Mutex<bool>, Condvar),
    /// What the control domain asked the guest for.
    intent: Mutex<Intent>,
    /// How many times the guest was started (1 after create; +1 per restart in place),
    /// signalled on every change.
    boots: (Mutex<u64>, Condvar),
    /// Restarts the VM in place when `on_reboot = "restart"`; `None` for VMs this daemon
    /// re-adopted (their reboot ends them).
    restart_hook: Mutex<Option<RestartHook>>,
    state_dir: StateDir,
    /// CPU time of its processes, as last seen in /proc.
    pub cpu: Mutex<super::stats::CpuAccount>,
    /// The guest-RAM memfd this daemon made for the running guest (None for a re-adopted
    /// VM): what a snapshot reads guest RAM from.
    guest_ram: Mutex<Option<std::fs::File>>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl VmEntry {
    /// A VM entry for `record`, not yet connected.
    pub fn new(
        name: String,
        record: VmRecord,
        state_dir: StateDir,
        spawned_here: bool,
    ) -> Arc<Self> {
        let stopped = matches!(record.state, VmState::Stopped(_));
        Arc::new(Self {
            name,
            record: Mutex::new(record),
            console: ConsoleRing::default(),
            ctl: Mutex::new(None),
            next_id: std::sync::atomic::AtomicU64::new(1),
            waiters: Mutex::new(std::collections::HashMap::new()),
            pidfd: Mutex::new(None),
            backend_pidfds: Mutex::new(Vec::new()),
            spawned_here,
            destroying: Mutex::new(false),
            ending: std::sync::atomic::AtomicBool::new(false),
            devices: DeviceTable::default(),
            outcome: Mutex::new(None),
            hang_handler: Mutex::new(None),
            stopped: (Mutex::new(stopped), Condvar::new()),
            intent: Mutex::new(Intent::None),
            boots: (Mutex::new(0), Condvar::new()),
            restart_hook: Mutex::new(None),
            state_dir,
            cpu: Mutex::new(super::stats::CpuAccount::default()),
            guest_ram: Mutex::new(None),
        })
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> VmRecord {
        lock(&self.record).clone()
    }

    /// Reads the record under its lock.
    pub fn read<R>(&self, f: impl FnOnce(&VmRecord) -> R) -> R {
        f(&lock(&self.record))
    }

    /// Changes the record under its lock (not saved: see [`Self::save`]).
    pub fn update<R>(&self, f: impl FnOnce(&mut VmRecord) -> R) -> R {
        f(&mut lock(&self.record))
    }

    /// A copy of `device`'s backend record.
    pub fn backend(&self, device: &str) -> Option<BackendRecord> {
        lock(&self.record)
            .backends
            .iter()
            .find(|b| b.device == device)
            .cloned()
    }

    /// Changes `device`'s backend record, if it has one; returns what `f` returned.
    pub fn update_backend<R>(
        &self,
        device: &str,
        f: impl FnOnce(&mut BackendRecord) -> R,
    ) -> Option<R> {
        lock(&self.record)
            .backends
            .iter_mut()
            .find(|b| b.device == device)
            .map(f)
    }

    /// Whether the VM counts against host memory (not stopped).
    pub fn is_live(&self) -> bool {
        !matches!(lock(&self.record).state, VmState::Stopped(_))
    }

    /// Sets and persists the state.
    pub fn set_state(&self, state: VmState) {
        let mut rec = lock(&self.record);
        rec.state = state;
        if let Err(e) = self.state_dir.save(&self.name, &rec) {
            eprintln!(
                "bulkheadd: cannot save the state of VM '{}': {e}",
                self.name
            );
        }
    }

    /// Saves the record as it is.
    pub fn save(&self) {
        let rec = lock(&self.record);
        if let Err(e) = self.state_dir.save(&self.name, &rec) {
            eprintln!(
                "bulkheadd: cannot save the state of VM '{}': {e}",
                self.name
            );
        }
    }

    /// Seconds since creation.
    pub fn uptime(&self) -> u64 {
        now_unix().saturating_sub(lock(&self.record).created_unix)
    }

    /// Attaches the runner's control channel and starts the supervisor thread on `reader`.
    pub fn attach(
        self: &Arc<Self>,
        reader: Channel,
        pidfd: Option<OwnedFd>,
    ) -> std::io::Result<()> {
        let sender = reader.try_clone().map_err(std::io::Error::other)?;
        *lock(&self.ctl) = Some(sender);
        *lock(&self.pidfd) = pidfd;
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("vm-{}", self.name))
            .spawn(move || me.supervise(reader))?;
        Ok(())
    }

    /// Sets who hears of a hung device backend.
    pub fn set_hang_handler(&self, handler: HangHandler) {
        *lock(&self.hang_handler) = Some(handler);
    }

    /// Guest output that arrived outside the supervisor (during boot).
    pub fn console_output(&self, data: &[u8]) {
        self.console.push(data);
    }

    /// The runner's report of how the guest ended, received outside the supervisor.
    pub fn record_outcome(&self, outcome: GuestOutcome) {
        *lock(&self.outcome) = Some(outcome);
    }

    /// Keeps the guest-RAM memfd of the guest just started.
    pub fn set_guest_ram(&self, memfd: std::fs::File) {
        *lock(&self.guest_ram) = Some(memfd);
    }

    /// The guest-RAM memfd, if this daemon made it.
    pub fn guest_ram(&self) -> Option<std::fs::File> {
        lock(&self.guest_ram)
            .as_ref()
            .and_then(|f| f.try_clone().ok())
    }

    /// Remembers a device backend to stop with the VM.
    pub fn add_backend(&self, pidfd: OwnedFd) {
        lock(&self.backend_pidfds).push(pidfd);
    }

    /// Whether the VM is ending (no more backend restarts).
    pub fn is_ending(&self) -> bool {
        self.ending.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The runner link: commands and answers, and the VM's end.
impl VmEntry {
    /// A fresh request id (never 0, which asks for no answer).
    pub fn request_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends a command with descriptors and waits for the runner's answer to it (matched by
    /// id: other commands may be answered meanwhile, in any order, and an answer that comes
    /// after `timeout` is dropped, never taken for another command's).
    pub fn request_with_fds(
        &self,
        cmd: &RunnerCommand,
        fds: &[std::os::fd::BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<RunnerEvent, String> {
        let id = self.request_id();
        let (tx, rx) = crossbeam_channel::bounded(1);
        lock(&self.waiters).insert(id, tx);
        let answer = self.send_request(id, cmd, fds).and_then(|()| {
            rx.recv_timeout(timeout).map_err(|_| {
                format!(
                    "runner of '{}' did not answer within {timeout:?}",
                    self.name
                )
            })
        });
        lock(&self.waiters).remove(&id);
        answer
    }

    fn send_request(
        &self,
        id: u64,
        cmd: &RunnerCommand,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), String> {
        let request = RunnerRequest {
            id,
            command: cmd.clone(),
        };
        match lock(&self.ctl).as_ref() {
            Some(ch) => ch
                .send(&request, fds)
                .map_err(|e| format!("runner of '{}' is unreachable: {e}", self.name)),
            None => Err(format!("VM '{}' has no runner", self.name)),
        }
    }

    /// Kills and reaps the device backends.
    pub fn stop_backends(&self) {
        self.ending.store(true, std::sync::atomic::Ordering::SeqCst);
        self.devices.clear();
        for fd in std::mem::take(&mut *lock(&self.backend_pidfds)) {
            let _ = super::spawn::pidfd_kill(&fd);
        }
        if self.spawned_here {
            // pid 0 is a device whose first process was never started (waitpid(0) would
            // wait for any child).
            for b in lock(&self.record).backends.clone() {
                if b.pid <= 0 {
                    continue;
                }
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(b.pid), None);
            }
        }
    }

    /// Sends a command that gets no answer (console input).
    pub fn send(&self, cmd: &RunnerCommand) -> Result<(), String> {
        self.send_request(0, cmd, &[])
    }

    /// Sends a command and waits for the runner's answer to it.
    pub fn request(&self, cmd: &RunnerCommand, timeout: Duration) -> Result<RunnerEvent, String> {
        self.request_with_fds(cmd, &[], timeout)
    }

    /// Records what the control domain asks the guest for.
    pub fn set_intent(&self, intent: Intent) {
        *lock(&self.intent) = intent;
    }

    /// Installs what restarts the VM in place after a guest reboot.
    pub fn set_restart_hook(&self, hook: RestartHook) {
        *lock(&self.restart_hook) = Some(hook);
    }

    /// How many times the guest was started.
    pub fn boots(&self) -> u64 {
        *lock(&self.boots.0)
    }

    /// Counts one more start of the guest and wakes whoever waits for it.
    pub fn count_boot(&self) {
        let (m, c) = &self.boots;
        *lock(m) += 1;
        c.notify_all();
    }

    /// Waits until the guest was started more than `boots` times, or the VM stopped, up to
    /// `timeout`. True if it was started again.
    pub fn wait_booted_after(&self, boots: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, c) = &self.boots;
        let mut n = lock(m);
        loop {
            if *n > boots {
                return true;
            }
            if !self.is_live() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Short waits: a stop is signalled on the other condvar.
            let step = (deadline - now).min(Duration::from_millis(100));
            n = c.wait_timeout(n, step).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Whether a destroy was asked for.
    pub fn is_destroying(&self) -> bool {
        *lock(&self.destroying)
    }

    /// Waits until the VM has stopped, up to `timeout`. True if it has.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let (m, c) = &self.stopped;
        let deadline = Instant::now() + timeout;
        let mut done = lock(m);
        while !*done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            done = c
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Kills the runner (destroy). The supervisor records the stop.
    pub fn kill(&self) -> Result<(), String> {
        *lock(&self.destroying) = true;
        self.ending.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(fd) = lock(&self.pidfd).as_ref() {
            return super::spawn::pidfd_kill(fd)
                .map_err(|e| format!("cannot kill the runner: {e}"));
        }
        match lock(&self.record).runner_pid {
            Some(pid) if self.spawned_here => nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .map_err(|e| format!("cannot kill runner pid {pid}: {e}")),
            _ => Ok(()),
        }
    }

    /// Marks a VM stopped without a runner (found dead at adoption).
    pub fn mark_stopped(&self, reason: StopReason) {
        self.set_state(VmState::Stopped(reason));
        let (m, c) = &self.stopped;
        *lock(m) = true;
        c.notify_all();
    }

    fn supervise(self: Arc<Self>, reader: Channel) {
        loop {
            match reader.recv::<RunnerMessage>() {
                Ok((RunnerMessage::Event(RunnerEvent::Console(data)), _)) => {
                    self.console.push(&data)
                }
                Ok((RunnerMessage::Event(RunnerEvent::Exited(o)), _)) => {
                    *lock(&self.outcome) = Some(o)
                }
                Ok((RunnerMessage::Event(RunnerEvent::DeviceHung { device, stalled_ms }), _)) => {
                    let handler = lock(&self.hang_handler).clone();
                    if let Some(h) = handler {
                        h(&self, &device, stalled_ms);
                    }
                }
                Ok((RunnerMessage::Event(_), _)) => {}
                Ok((RunnerMessage::Answer { id, event }, _)) => {
                    let waiter = lock(&self.waiters).remove(&id);
                    match waiter {
                        Some(w) => {
                            let _ = w.try_send(event);
                        }
                        // Id 0 asked for no answer (a re-adoption's Status).
                        None if id == 0 => {}
                        None => eprintln!(
                            "bulkheadd: VM '{}': late answer to request {id} dropped: {event:?}",
                            self.name
                        ),
                    }
                }
                Err(IpcError::Closed) => break,
                Err(e) => {
                    eprintln!(
                        "bulkheadd: VM '{}': bad frame from its runner, dropping it: {e}",
                        self.name
                    );
                    break;
                }
            }
        }
        *lock(&self.ctl) = None;
        // The guest is gone: its RAM is not kept past its runner.
        *lock(&self.guest_ram) = None;
        self.ending.store(true, std::sync::atomic::Ordering::SeqCst);
        let reason = self.stop_reason();
        self.stop_backends();
        let mut reason = reason;
        if self.reboot_wanted(&reason) {
            match self.restart_in_place() {
                Ok(()) => return,
                Err(_) if self.is_destroying() => reason = StopReason::Destroyed,
                Err(e) => reason = StopReason::Crashed(format!("restart after reboot failed: {e}")),
            }
        }
        eprintln!(
            "bulkheadd: VM '{}' stopped: {}",
            self.name,
            describe(&reason)
        );
        {
            let mut rec = lock(&self.record);
            rec.state = VmState::Stopped(reason.clone());
            if let Err(e) = self.state_dir.save(&self.name, &rec) {
                eprintln!(
                    "bulkheadd: cannot save the state of VM '{}': {e}",
                    self.name
                );
            }
        }
        let _ = std::fs::remove_file(self.state_dir.socket_path(&self.name));
        self.console
            .close_all(format!("VM stopped: {}", describe(&reason)));
        let (m, c) = &self.stopped;
        *lock(m) = true;
        c.notify_all();
    }

    /// Whether the runner's end is a guest reboot that `on_reboot = "restart"` restarts: a
    /// reset the control domain did not ask for as a shutdown, no destroy under way, and a
    /// way to restart (not a re-adopted VM).
    fn reboot_wanted(&self, reason: &StopReason) -> bool {
        *reason == StopReason::GuestShutdown
            && matches!(lock(&self.outcome).as_ref(), Some(GuestOutcome::Reset))
            && *lock(&self.intent) != Intent::Shutdown
            && !*lock(&self.destroying)
            && lock(&self.record).spec.on_reboot == crate::daemon::vmconfig::OnReboot::Restart
            && lock(&self.restart_hook).is_some()
    }

    /// Starts the VM again after its guest rebooted: the old runner is reaped and its
    /// backends are stopped; the restart hook starts new ones for the same record. Runs on
    /// the old supervisor thread, which ends after this (the new runner has its own).
    fn restart_in_place(self: &Arc<Self>) -> Result<(), String> {
        eprintln!(
            "bulkheadd: VM '{}': the guest rebooted; on_reboot = \"restart\": starting it again",
            self.name
        );
        *lock(&self.outcome) = None;
        *lock(&self.intent) = Intent::None;
        *lock(&self.pidfd) = None;
        // The old runner is reaped: its pid must not be signalled (a destroy meanwhile).
        self.update(|r| r.runner_pid = None);
        let _ = std::fs::remove_file(self.state_dir.socket_path(&self.name));
        self.set_state(VmState::Starting);
        self.ending
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let hook = lock(&self.restart_hook).take();
        let result = match &hook {
            Some(h) => h(self),
            None => Err("no restart hook".to_string()),
        };
        if let Some(h) = hook {
            lock(&self.restart_hook).get_or_insert(h);
        }
        if let Err(e) = &result {
            // A start that failed never attached its runner: end and reap one it spawned
            // (never the old, already reaped pid), and whatever backends it started.
            self.ending.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(pid) = lock(&self.record).runner_pid {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, None);
            }
            self.stop_backends();
            return Err(e.clone());
        }
        if *lock(&self.destroying) {
            // A destroy came while the VM was starting again: it ends now (the new
            // supervisor thread records the stop as destroyed).
            let _ = self.kill();
        }
        Ok(())
    }

    /// Decides why the runner went away, reaping it if it is our child.
    fn stop_reason(&self) -> StopReason {
        let pid = lock(&self.record).runner_pid;
        let mut status = None;
        if let (Some(pid), true) = (pid, self.spawned_here) {
            status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).ok();
        }
        if *lock(&self.destroying) {
            return StopReason::Destroyed;
        }
        match lock(&self.outcome).clone() {
            Some(GuestOutcome::Reset) => StopReason::GuestShutdown,
            Some(GuestOutcome::DebugExit(v)) => StopReason::GuestExit(v),
            Some(GuestOutcome::Failed(why)) => StopReason::Crashed(why),
            None => StopReason::Crashed(match status {
                Some(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                    format!("runner killed by {sig}")
                }
                Some(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                    format!("runner exited with status {code} without a report")
                }
                _ => "runner died".to_string(),
            }),
        }
    }
}

/// Human wording of a stop reason.
pub fn describe(r: &StopReason) -> String {
    match r {
        StopReason::GuestShutdown => "guest shut down".into(),
        StopReason::GuestExit(v) => format!("guest exited with status {v}"),
        StopReason::Crashed(why) => format!("crashed: {why}"),
        StopReason::Destroyed => "destroyed".into(),
    }
}

/// Locks, recovering from a poisoned mutex (a panicked thread must not wedge the daemon).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
