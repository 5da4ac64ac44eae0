//! One VM as `bulkheadd` tracks it: its persistent record, the control channel to its
//! runner and the thread that reads the runner's events and notices when it stops. It holds
//! the VM's console ([`ConsoleRing`]) and device table ([`DeviceTable`]), whose locks are
//! their own modules'. Owns the record lock: other modules read and change the record
//! through its methods. May call: the runner's channel, the state dir, the console.

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
    state_dir: StateDir,
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
            state_dir,
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
        self.ending.store(true, std::sync::atomic::Ordering::SeqCst);
        let reason = self.stop_reason();
        self.stop_backends();
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
