//! One VM as `bulkheadd` tracks it: its record, the control channel to its runner, the
//! console ring buffer and attached consoles, and the supervisor thread that reads the
//! runner's events and notices when it stops.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bulkhead_ipc::control::{Reply, StopReason, VmState};
use bulkhead_ipc::runner::{GuestOutcome, RunnerCommand, RunnerEvent};
use bulkhead_ipc::{Channel, IpcError};
use crossbeam_channel::Sender;

use super::state::{StateDir, VmRecord};

/// How much console output is kept for late attachers.
pub const CONSOLE_RING: usize = 64 * 1024;

/// The console: recent output and who is watching.
#[derive(Default)]
pub struct Console {
    ring: VecDeque<u8>,
    subscribers: Vec<(u64, Channel)>,
}

impl Console {
    fn push(&mut self, data: &[u8]) {
        self.ring.extend(data);
        let excess = self.ring.len().saturating_sub(CONSOLE_RING);
        self.ring.drain(..excess);
        let reply = Reply::ConsoleOutput {
            data: data.to_vec(),
        };
        // A subscriber whose socket fails has gone; drop it.
        self.subscribers
            .retain(|(_, ch)| ch.send(&reply, &[]).is_ok());
    }
}

/// A device backend as `bulkheadd` restarts it: the same resource (a dup of the image or
/// tap fd), binary, arguments and uid every time.
pub struct DeviceSlot {
    /// Image or tap.
    pub resource: OwnedFd,
    /// Binary to run (changed by an upgrade).
    pub binary: std::path::PathBuf,
    /// Device-specific arguments.
    pub args: Vec<String>,
    /// Its uid.
    pub uid: u32,
    /// When the current process started.
    pub started: std::time::Instant,
    /// Consecutive exits within a short time of starting.
    pub quick_failures: u32,
    /// Why the next exit is expected (restart or upgrade by request), if it is.
    pub planned: Option<String>,
    /// When to restart it, and how often at most.
    pub policy: crate::daemon::vmconfig::RestartPolicy,
    /// When its recent unplanned restarts happened (the last minute's).
    pub recent: std::collections::VecDeque<std::time::Instant>,
    /// A process serves the device (false once it ended, until one is started again). While
    /// true, its pid is not yet reaped, so it may be signalled without a pid-reuse race.
    pub alive: bool,
    /// Why the current process was refused (it never became ready, or the runner could not
    /// set it up in time) and killed: its exit then counts as a crash at start.
    pub refused: Option<String>,
    /// How many processes were refused so far, and why the last one was (an upgrade
    /// watches this to answer early).
    pub refusals: u32,
    pub last_refusal: String,
    /// A restart is under way (its back-off, or the spawn): a request to start the device
    /// waits for that one instead of starting a second process beside it.
    pub restarting: bool,
    /// The device's standby backend, if one is kept (disks).
    pub standby: Option<Standby>,
    /// A standby is being started.
    pub standby_starting: bool,
}

/// A backend process started ahead of need: sandboxed like the serving one, handed the same
/// image and a vhost-user connection of its own, which it has accepted and set up; it waits
/// for the runner. When the serving backend dies, the runner gets `conn` and the standby
/// takes over, so a restart skips the spawn, the exec and the backend's start-up.
pub struct Standby {
    /// Its pid. Unreaped while it is in the slot: its watcher takes it out first.
    pub pid: i32,
    /// The binary it runs (a standby of another binary than the slot's is not used).
    pub binary: std::path::PathBuf,
    /// The runner's end of its connection.
    pub conn: std::os::unix::net::UnixStream,
    /// It signalled ready and its root is sealed: it may take over.
    pub ready: bool,
    /// When it was started.
    pub started: std::time::Instant,
}

/// A VM known to `bulkheadd`.
pub struct VmEntry {
    /// Name (key of the registry).
    pub name: String,
    /// The persistent record.
    pub record: Mutex<VmRecord>,
    /// Console buffer and subscribers.
    pub console: Mutex<Console>,
    /// Sending side of the runner's control channel.
    ctl: Mutex<Option<Channel>>,
    /// Serializes commands that wait for an answer.
    cmd_lock: Mutex<()>,
    /// Where the supervisor forwards answers while a command waits.
    waiter: Mutex<Option<Sender<RunnerEvent>>>,
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
    /// What it takes to respawn each device backend.
    pub slots: Mutex<std::collections::BTreeMap<String, DeviceSlot>>,
    /// The runner's report of how the guest ended.
    outcome: Mutex<Option<GuestOutcome>>,
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
            console: Mutex::new(Console::default()),
            ctl: Mutex::new(None),
            cmd_lock: Mutex::new(()),
            waiter: Mutex::new(None),
            pidfd: Mutex::new(None),
            backend_pidfds: Mutex::new(Vec::new()),
            spawned_here,
            destroying: Mutex::new(false),
            ending: std::sync::atomic::AtomicBool::new(false),
            slots: Mutex::new(std::collections::BTreeMap::new()),
            outcome: Mutex::new(None),
            stopped: (Mutex::new(stopped), Condvar::new()),
            state_dir,
        })
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> VmRecord {
        lock(&self.record).clone()
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

    /// Guest output that arrived outside the supervisor (during boot).
    pub fn console_output(&self, data: &[u8]) {
        lock(&self.console).push(data);
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

    /// Sends a command with descriptors and waits for the runner's answer.
    pub fn request_with_fds(
        &self,
        cmd: &RunnerCommand,
        fds: &[std::os::fd::BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<RunnerEvent, String> {
        let _one_at_a_time = lock(&self.cmd_lock);
        let (tx, rx) = crossbeam_channel::bounded(4);
        *lock(&self.waiter) = Some(tx);
        let sent = match lock(&self.ctl).as_ref() {
            Some(ch) => ch
                .send(cmd, fds)
                .map_err(|e| format!("runner of '{}' is unreachable: {e}", self.name)),
            None => Err(format!("VM '{}' has no runner", self.name)),
        };
        let answer = sent.and_then(|()| {
            rx.recv_timeout(timeout).map_err(|_| {
                format!(
                    "runner of '{}' did not answer within {timeout:?}",
                    self.name
                )
            })
        });
        *lock(&self.waiter) = None;
        answer
    }

    /// Kills and reaps the device backends.
    pub fn stop_backends(&self) {
        self.ending.store(true, std::sync::atomic::Ordering::SeqCst);
        lock(&self.slots).clear();
        for fd in std::mem::take(&mut *lock(&self.backend_pidfds)) {
            let _ = super::spawn::pidfd_kill(&fd);
        }
        if self.spawned_here {
            for b in lock(&self.record).backends.clone() {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(b.pid), None);
            }
        }
    }

    /// Sends a command without waiting.
    pub fn send(&self, cmd: &RunnerCommand) -> Result<(), String> {
        match lock(&self.ctl).as_ref() {
            Some(ch) => ch
                .send(cmd, &[])
                .map_err(|e| format!("runner of '{}' is unreachable: {e}", self.name)),
            None => Err(format!("VM '{}' has no runner", self.name)),
        }
    }

    /// Sends a command and waits for the runner's answer.
    pub fn request(&self, cmd: &RunnerCommand, timeout: Duration) -> Result<RunnerEvent, String> {
        let _one_at_a_time = lock(&self.cmd_lock);
        let (tx, rx) = crossbeam_channel::bounded(4);
        *lock(&self.waiter) = Some(tx);
        let sent = self.send(cmd);
        let answer = sent.and_then(|()| {
            rx.recv_timeout(timeout).map_err(|_| {
                format!(
                    "runner of '{}' did not answer within {timeout:?}",
                    self.name
                )
            })
        });
        *lock(&self.waiter) = None;
        answer
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

    /// Adds a console subscriber; returns the buffered history.
    pub fn subscribe(&self, id: u64, ch: Channel) -> Vec<u8> {
        let mut c = lock(&self.console);
        c.subscribers.push((id, ch));
        c.ring.iter().copied().collect()
    }

    /// Removes a console subscriber.
    pub fn unsubscribe(&self, id: u64) {
        lock(&self.console).subscribers.retain(|(i, _)| *i != id);
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
            match reader.recv::<RunnerEvent>() {
                Ok((RunnerEvent::Console(data), _)) => lock(&self.console).push(&data),
                Ok((RunnerEvent::Exited(o), _)) => *lock(&self.outcome) = Some(o),
                Ok((event, _)) => {
                    if let Some(w) = lock(&self.waiter).as_ref() {
                        let _ = w.try_send(event);
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
        let closed = Reply::ConsoleClosed {
            reason: format!("VM stopped: {}", describe(&reason)),
        };
        for (_, ch) in std::mem::take(&mut lock(&self.console).subscribers) {
            let _ = ch.send(&closed, &[]);
        }
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
