//! The runner under a control domain: serves `RunnerCommand`s on the listening socket that
//! `bulkheadd` handed in, and reports `RunnerEvent`s (console output, state, how the guest ended).
//!
//! The socket is a listener, not a connection, so the runner outlives a `bulkheadd` restart:
//! the next `bulkheadd` connects again and re-adopts it.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bulkhead_ipc::hello::{server_hello, Role};
use bulkhead_ipc::runner::{
    BootFds, BootSpec, GuestOutcome, RestoreFds, RestoreSpec, RunnerCommand, RunnerEvent,
    RunnerMessage, RunnerRequest, VcpuCounters,
};
use bulkhead_ipc::{Channel, IpcError, Listener};
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::boot::ImageFile;
use crate::memory::GuestRam;
use crate::vm::{open_kvm, DeviceBackend, DeviceKind, RunningVm, Vm, VmOutcome};

/// How long a finished runner waits for a control domain to collect the outcome.
const OUTCOME_GRACE: Duration = Duration::from_secs(60);
/// Console bytes buffered while the control domain is slow; beyond this output is dropped.
const CONSOLE_BACKLOG: usize = 256 * 1024;

/// Shared between the command loop, the console pump and the outcome watcher.
struct RunnerState {
    /// The control domain currently connected, if any (a sending clone).
    conn: Mutex<Option<Channel>>,
    /// The guest, once booted.
    vm: Mutex<Option<Arc<RunningVm>>>,
    /// How the guest ended, once it has.
    outcome: Mutex<Option<VmOutcome>>,
    /// Bytes of guest output queued for, and sent by, the console pump.
    console: ConsoleProgress,
}

/// How far the console pump is behind the guest's serial output, so that the guest's end
/// is reported only after its last output (no fixed sleep).
#[derive(Default)]
struct ConsoleProgress {
    queued: AtomicU64,
    sent: Mutex<u64>,
    sent_cv: Condvar,
}

impl ConsoleProgress {
    fn add_sent(&self, n: usize) {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        *sent += n as u64;
        self.sent_cv.notify_all();
    }

    /// Waits until everything queued so far was sent, or `limit` passed.
    fn wait_drained(&self, limit: Duration) {
        let target = self.queued.load(Ordering::Acquire);
        let deadline = std::time::Instant::now() + limit;
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        while *sent < target {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            sent = match self.sent_cv.wait_timeout(sent, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

impl RunnerState {
    /// Reports an event nobody asked for (console output, the guest's end).
    fn send(&self, event: RunnerEvent) {
        self.send_message(&RunnerMessage::Event(event));
    }

    /// Answers request `id`.
    fn answer(&self, id: u64, event: RunnerEvent) {
        self.send_message(&RunnerMessage::Answer { id, event });
    }

    fn send_message(&self, msg: &RunnerMessage) {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = conn.as_ref() {
            // A control domain that went away will reconnect; nothing to do here.
            let _ = c.send(msg, &[]);
        }
    }

    fn vm(&self) -> Option<Arc<RunningVm>> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Guest serial output into a bounded queue that the console pump drains.
struct QueuedConsole(Sender<u8>, Arc<RunnerState>);

impl Write for QueuedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for b in buf {
            match self.0.try_send(*b) {
                Ok(()) => {
                    self.1.console.queued.fetch_add(1, Ordering::AcqRel);
                }
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log(msg: &str) {
    eprintln!("bulkhead-runner[{}]: {msg}", std::process::id());
}

/// Serves the control socket `listener` until the guest has ended and its outcome was
/// delivered. Returns the process exit status.
pub fn serve(listener: Listener, selftest: bool) -> i32 {
    let state = Arc::new(RunnerState {
        conn: Mutex::new(None),
        vm: Mutex::new(None),
        outcome: Mutex::new(None),
        console: ConsoleProgress::default(),
    });
    let (tx, rx) = crossbeam_channel::bounded::<u8>(CONSOLE_BACKLOG);
    let mut console = Some(tx);
    {
        let state = state.clone();
        let _ = std::thread::Builder::new()
            .name("console-pump".into())
            .spawn(move || console_pump(rx, state));
    }
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                log(&format!("accept on the control socket failed: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Only the control domain (root) commands a runner: whoever else reached the socket
        // (the runner's own uid included) is refused before a byte is read.
        match conn.peer_credentials() {
            Ok(c) if c.uid == 0 => {}
            Ok(c) => {
                log(&format!(
                    "refusing a control connection from uid {} (pid {}): only the control domain may command a runner",
                    c.uid, c.pid
                ));
                continue;
            }
            Err(e) => {
                log(&format!("control connection without peer credentials: {e}"));
                continue;
            }
        }
        match server_hello(&conn, Duration::from_secs(5)) {
            Ok(Role::Daemon) => {}
            Ok(other) => {
                log(&format!("refusing a {other:?} on the control socket"));
                continue;
            }
            Err(e) => {
                log(&format!("control connection without a valid hello: {e}"));
                continue;
            }
        }
        match conn.try_clone() {
            Ok(sender) => *state.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender),
            Err(e) => {
                log(&format!("cannot clone the control connection: {e}"));
                continue;
            }
        }
        // A runner whose guest ended while nobody listened reports it to the first comer.
        if let Some(outcome) = state
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            state.send(RunnerEvent::Exited(guest_outcome(&outcome)));
            return outcome.exit_status();
        }
        serve_connection(&state, &conn, &mut console, selftest);
        *state.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        log("control domain disconnected; waiting for it to come back");
    }
}

fn guest_outcome(o: &VmOutcome) -> GuestOutcome {
    match o {
        VmOutcome::Reset => GuestOutcome::Reset,
        VmOutcome::DebugExit(v) => GuestOutcome::DebugExit(*v),
        other => GuestOutcome::Failed(other.to_string()),
    }
}

fn serve_connection(
    state: &Arc<RunnerState>,
    conn: &Channel,
    console: &mut Option<Sender<u8>>,
    selftest: bool,
) {
    loop {
        let (RunnerRequest { id, command: cmd }, fds) = match conn.recv::<RunnerRequest>() {
            Ok(m) => m,
            Err(IpcError::Closed) => return,
            Err(e) => {
                // A malformed frame from the control domain: close the connection.
                log(&format!("bad frame on the control channel: {e}"));
                return;
            }
        };
        let reply = match cmd {
            RunnerCommand::Boot(spec) => match console.take() {
                Some(tx) => match boot(state, spec, fds, tx, selftest) {
                    Ok(detail) => RunnerEvent::Started { detail },
                    Err(message) => {
                        log(&format!("boot failed: {message}"));
                        state.answer(id, RunnerEvent::BootFailed { message });
                        std::process::exit(2);
                    }
                },
                None => RunnerEvent::Error {
                    message: "already booted".into(),
                },
            },
            RunnerCommand::Pause => match state.vm() {
                Some(vm) => match vm.pause() {
                    Ok(()) => RunnerEvent::Paused,
                    Err(message) => RunnerEvent::Error { message },
                },
                None => not_booted(),
            },
            RunnerCommand::Resume => match state.vm() {
                Some(vm) => {
                    vm.resume();
                    RunnerEvent::Resumed
                }
                None => not_booted(),
            },
            RunnerCommand::RequestShutdown => match state.vm() {
                Some(vm) => {
                    vm.devices().request_shutdown();
                    if !vm.devices().ctrl_alt_del() {
                        log("Ctrl-Alt-Del not sent: the guest is not reading its keyboard");
                    }
                    RunnerEvent::ShutdownRequested
                }
                None => not_booted(),
            },
            RunnerCommand::VcpuStats => match state.vm() {
                Some(vm) => RunnerEvent::VcpuStats(
                    vm.vcpu_counters()
                        .into_iter()
                        .map(|(exits, run_ns)| VcpuCounters { exits, run_ns })
                        .collect(),
                ),
                None => not_booted(),
            },
            RunnerCommand::Status => {
                let vm = state.vm();
                RunnerEvent::State {
                    booted: vm.is_some(),
                    paused: vm.map(|v| v.is_paused()).unwrap_or(false),
                }
            }
            RunnerCommand::ReconnectDevice { device } => match (state.vm(), fds.into_iter().next())
            {
                (Some(vm), Some(fd)) => {
                    // On a thread of its own: a backend's setup may take seconds, and the
                    // commands behind it (pause, shutdown) must not wait for it.
                    log(&format!(
                        "{device}: a new backend; replaying the setup to it"
                    ));
                    let state = state.clone();
                    let stream = std::os::unix::net::UnixStream::from(fd);
                    let spawned = std::thread::Builder::new()
                        .name(format!("reconnect-{device}"))
                        .spawn(move || {
                            let event = reconnect_device(&vm, &device, stream);
                            state.answer(id, event);
                        });
                    match spawned {
                        Ok(_) => continue,
                        Err(e) => RunnerEvent::Error {
                            message: format!("cannot start the reconnect: {e}"),
                        },
                    }
                }
                (None, _) => not_booted(),
                (_, None) => RunnerEvent::Error {
                    message: "ReconnectDevice carried no connection".into(),
                },
            },
            RunnerCommand::Restore(spec) => match console.take() {
                Some(tx) => match restore(state, spec, fds, tx) {
                    Ok(detail) => RunnerEvent::Started { detail },
                    Err(message) => {
                        log(&format!("restore failed: {message}"));
                        state.answer(id, RunnerEvent::BootFailed { message });
                        std::process::exit(2);
                    }
                },
                None => RunnerEvent::Error {
                    message: "already booted".into(),
                },
            },
            RunnerCommand::SaveState => match state.vm() {
                Some(vm) => {
                    // On a thread of its own: draining waits for the backends.
                    let state = state.clone();
                    let spawned = std::thread::Builder::new()
                        .name("save".into())
                        .spawn(move || state.answer(id, save_answer(&vm)));
                    match spawned {
                        Ok(_) => continue,
                        Err(e) => RunnerEvent::Error {
                            message: format!("cannot start the save: {e}"),
                        },
                    }
                }
                None => not_booted(),
            },
            RunnerCommand::EndSave { resume } => match state.vm() {
                Some(vm) => match vm.end_save(resume) {
                    Ok(true) => RunnerEvent::Resumed,
                    Ok(false) => RunnerEvent::Paused,
                    Err(message) => RunnerEvent::Error { message },
                },
                None => not_booted(),
            },
            RunnerCommand::ConsoleInput(bytes) => {
                if let Some(vm) = state.vm() {
                    feed_console(&vm, &bytes);
                }
                continue;
            }
        };
        state.answer(id, reply);
    }
}

/// Takes the VM's state for a snapshot: the answer to `SaveState`.
fn save_answer(vm: &RunningVm) -> RunnerEvent {
    let records = match vm.save_state().and_then(|s| s.to_records()) {
        Ok(r) => r,
        Err(message) => {
            log(&format!("save failed: {message}"));
            return RunnerEvent::Error { message };
        }
    };
    let bytes: usize = records.iter().map(|r| r.data.len()).sum();
    let event = RunnerEvent::Saved { records };
    let answer = RunnerMessage::Answer {
        id: u64::MAX,
        event: event.clone(),
    };
    let fits = postcard::to_allocvec(&answer)
        .map(|b| b.len() <= bulkhead_ipc::transport::MAX_FRAME)
        .unwrap_or(false);
    if !fits {
        let message = format!(
            "the VM's state ({bytes} bytes) does not fit one control frame ({} bytes)",
            bulkhead_ipc::transport::MAX_FRAME
        );
        log(&format!("save failed: {message}"));
        return RunnerEvent::Error { message };
    }
    log(&format!("state saved: {bytes} bytes"));
    event
}

/// Hands `device` its new backend's connection; answers how it went.
fn reconnect_device(
    vm: &RunningVm,
    device: &str,
    stream: std::os::unix::net::UnixStream,
) -> RunnerEvent {
    let Some(dev) = vm.devices().vhost_device(device) else {
        return RunnerEvent::Error {
            message: format!("no device named {device}"),
        };
    };
    match crate::virtio_pci::reconnect(&dev, stream) {
        Ok(()) => RunnerEvent::DeviceReconnected {
            device: device.to_string(),
        },
        Err(e) => RunnerEvent::Error {
            message: format!("{device}: {e}"),
        },
    }
}

fn not_booted() -> RunnerEvent {
    RunnerEvent::Error {
        message: "the guest has not been booted".into(),
    }
}

fn feed_console(vm: &RunningVm, mut bytes: &[u8]) {
    for _ in 0..1000 {
        if bytes.is_empty() {
            return;
        }
        let n = vm.devices().console_input(bytes);
        bytes = &bytes[n..];
        if n == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn boot(
    state: &Arc<RunnerState>,
    spec: BootSpec,
    fds: Vec<OwnedFd>,
    console: Sender<u8>,
    selftest: bool,
) -> Result<String, String> {
    if selftest {
        // By now bulkheadd has sealed our root; this is the sandbox as the guest will see it.
        for p in crate::sandbox::self_test() {
            let verdict = if p.denied { "denied" } else { "ALLOWED" };
            log(&format!(
                "sandbox-selftest: {}: {verdict} ({})",
                p.what, p.detail
            ));
        }
    }
    let first_disk = BootFds::first_disk(spec.has_initrd);
    let want = first_disk + spec.disks.len() + spec.nics.len();
    if fds.len() != want {
        return Err(format!(
            "Boot carried {} descriptors, expected {want}",
            fds.len()
        ));
    }
    let mut fds = fds.into_iter().map(Some).collect::<Vec<_>>();
    let mut take = |i: usize| fds.get_mut(i).and_then(Option::take).map(File::from);
    let kvm = open_kvm(take(BootFds::KVM)).map_err(|e| e.to_string())?;
    let memfd = take(BootFds::MEMFD).ok_or("missing memfd")?;
    let ram = GuestRam::from_memfd(memfd).map_err(|e| e.to_string())?;
    let mut kernel = ImageFile {
        file: take(BootFds::KERNEL).ok_or("missing kernel fd")?,
        name: spec.kernel_name.clone().into(),
    };
    let mut initrd = if spec.has_initrd {
        Some(ImageFile {
            file: take(BootFds::INITRD).ok_or("missing initrd fd")?,
            name: "initrd".into(),
        })
    } else {
        None
    };
    let cpu_template = crate::cpu_template::by_name(&spec.cpu_template)
        .ok_or_else(|| format!("unknown CPU template '{}'", spec.cpu_template))?;
    let backends = device_backends(&spec.disks, &spec.nics, |i| take(first_disk + i))?;
    let images = crate::vm::GuestImages {
        kernel: &mut kernel,
        initrd: initrd.as_mut(),
        cmdline: &spec.cmdline,
    };
    let machine = crate::vm::Machine {
        vcpus: spec.vcpus,
        cpu_template,
    };
    let vm = Vm::with_images(
        kvm,
        ram,
        machine,
        images,
        backends,
        Box::new(QueuedConsole(console, state.clone())),
    )
    .map_err(|e| e.to_string())?;
    let detail = match vm.boot_setup() {
        Some(setup) => format!(
            "{} loaded as {:?}, entry {:?}; {} vCPUs, CPU template {}",
            spec.kernel_name, setup.format, setup.entry, spec.vcpus, spec.cpu_template
        ),
        None => String::new(),
    };
    drop(kernel);
    drop(initrd);
    let names: Vec<String> = spec.disks.iter().chain(spec.nics.iter()).cloned().collect();
    run_vm(state, vm, &names, &spec.hang_timeouts_ms, false)?;
    Ok(detail)
}

/// The devices of a boot or restore, by kind, each with its socket from `take`.
fn device_backends(
    disks: &[String],
    nics: &[String],
    mut take: impl FnMut(usize) -> Option<File>,
) -> Result<Vec<DeviceBackend>, String> {
    let kinds = disks
        .iter()
        .map(|n| (n, DeviceKind::Block))
        .chain(nics.iter().map(|n| (n, DeviceKind::Net)));
    let mut backends = Vec::new();
    for (i, (name, kind)) in kinds.enumerate() {
        let f = take(i).ok_or_else(|| format!("missing socket for {name}"))?;
        backends.push(DeviceBackend {
            name: name.clone(),
            kind,
            stream: std::os::unix::net::UnixStream::from(OwnedFd::from(f)),
        });
    }
    Ok(backends)
}

/// Creates the VM from a snapshot's state and runs it.
fn restore(
    state: &Arc<RunnerState>,
    spec: RestoreSpec,
    fds: Vec<OwnedFd>,
    console: Sender<u8>,
) -> Result<String, String> {
    let want = RestoreFds::FIRST_DEVICE + spec.disks.len() + spec.nics.len();
    if fds.len() != want {
        return Err(format!(
            "Restore carried {} descriptors, expected {want}",
            fds.len()
        ));
    }
    let snap = crate::snapshot::records::VmSnapshot::from_records(&spec.records)?;
    let mut fds = fds.into_iter().map(Some).collect::<Vec<_>>();
    let mut take = |i: usize| fds.get_mut(i).and_then(Option::take).map(File::from);
    let kvm = open_kvm(take(RestoreFds::KVM)).map_err(|e| e.to_string())?;
    let memfd = take(RestoreFds::MEMFD).ok_or("missing memfd")?;
    let ram = GuestRam::from_memfd(memfd).map_err(|e| e.to_string())?;
    let cpu_template = crate::cpu_template::by_name(&spec.cpu_template)
        .ok_or_else(|| format!("unknown CPU template '{}'", spec.cpu_template))?;
    let backends = device_backends(&spec.disks, &spec.nics, |i| {
        take(RestoreFds::FIRST_DEVICE + i)
    })?;
    let machine = crate::vm::Machine {
        vcpus: spec.vcpus,
        cpu_template,
    };
    let vm = Vm::restore(
        kvm,
        ram,
        machine,
        backends,
        Box::new(QueuedConsole(console, state.clone())),
        &snap,
    )
    .map_err(|e| e.to_string())?;
    let names: Vec<String> = spec.disks.iter().chain(spec.nics.iter()).cloned().collect();
    let paused = snap.machine.paused;
    run_vm(state, vm, &names, &spec.hang_timeouts_ms, paused)?;
    Ok(format!(
        "restored: {} vCPUs{}, {} devices, CPU template {}",
        spec.vcpus,
        if paused {
            format!(" {}", bulkhead_ipc::runner::RESTORED_PAUSED)
        } else {
            String::new()
        },
        names.len(),
        spec.cpu_template
    ))
}

/// Starts the vCPUs, the progress watchdog over `devices` and the outcome watcher.
fn run_vm(
    state: &Arc<RunnerState>,
    vm: Vm,
    devices: &[String],
    hang_timeouts_ms: &[u32],
    paused: bool,
) -> Result<(), String> {
    let running = Arc::new(vm.start_paused(None, paused).map_err(|e| e.to_string())?);
    *state.vm.lock().unwrap_or_else(|e| e.into_inner()) = Some(running.clone());
    let timeouts = devices
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let ms = hang_timeouts_ms.get(i).copied().unwrap_or(0);
            (name.clone(), Duration::from_millis(ms.into()))
        })
        .collect();
    let reporter = state.clone();
    crate::watchdog::watch_rings(running.clone(), timeouts, move |device, stalled| {
        log(&format!(
            "{device}: hung: no progress for {} ms with requests waiting",
            stalled.as_millis()
        ));
        reporter.send(RunnerEvent::DeviceHung {
            device: device.to_string(),
            stalled_ms: stalled.as_millis() as u64,
        });
    })
    .map_err(|e| format!("cannot start the watchdog: {e}"))?;
    let state2 = state.clone();
    std::thread::Builder::new()
        .name("outcome".into())
        .spawn(move || watch_outcome(state2, running))
        .map_err(|e| format!("cannot start the outcome watcher: {e}"))?;
    Ok(())
}

fn watch_outcome(state: Arc<RunnerState>, vm: Arc<RunningVm>) {
    let outcome = vm.wait();
    log(&format!("guest stopped: {outcome}"));
    // The guest's last output goes out before its end.
    state.console.wait_drained(Duration::from_secs(1));
    *state.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome.clone());
    let connected = state
        .conn
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some();
    if connected {
        state.send(RunnerEvent::Exited(guest_outcome(&outcome)));
        std::process::exit(outcome.exit_status());
    }
    // Nobody is listening (bulkheadd restarting): the accept loop hands the outcome to the
    // next control domain that connects; give up after a grace period.
    std::thread::sleep(OUTCOME_GRACE);
    std::process::exit(outcome.exit_status());
}

fn console_pump(rx: Receiver<u8>, state: Arc<RunnerState>) {
    let mut buf = Vec::with_capacity(4096);
    while let Ok(first) = rx.recv() {
        buf.clear();
        buf.push(first);
        // Coalesce whatever arrived meanwhile, briefly waiting for the rest of a line.
        let deadline = std::time::Instant::now() + Duration::from_millis(2);
        while buf.len() < 4096 {
            match rx.recv_deadline(deadline) {
                Ok(b) => buf.push(b),
                Err(_) => break,
            }
        }
        state.send(RunnerEvent::Console(buf.clone()));
        state.console.add_sent(buf.len());
    }
}
