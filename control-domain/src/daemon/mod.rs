//! `bulkheadd`: the control domain. Owns `/dev/kvm`, the policy and the state dir; creates
//! guest RAM and spawns each VM's runner into its sandbox; serves the CLI; re-adopts running
//! VMs after a restart.

pub mod network;
pub mod policy;
pub mod spawn;
pub mod state;
pub mod vm;
pub mod vmconfig;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_ipc::control::{ErrorCode, Reply, Request, StopReason, VmInfo, VmState, VmSummary};
use bulkhead_ipc::hello::{client_hello, server_hello, Role};
use bulkhead_ipc::runner::{BootSpec, RunnerCommand, RunnerEvent};
use bulkhead_ipc::{Channel, IpcError, Listener};

use policy::{Action, Caller, DomainPolicy};
use spawn::RunnerSandbox;
use state::{StateDir, VmRecord};
use vm::{describe, lock, VmEntry};

/// How `bulkheadd` was started.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Client socket.
    pub socket: PathBuf,
    /// State dir.
    pub state_dir: PathBuf,
    /// Policy file (may be absent).
    pub policy: PathBuf,
    /// The runner binary.
    pub runner: PathBuf,
    /// The disk backend binary (bulkhead-blk).
    pub blk: PathBuf,
    /// The network backend binary (bulkhead-net).
    pub net: PathBuf,
    /// Have runners run their sandbox self-test (tests only).
    pub runner_selftest: bool,
}

/// A request that failed: the code and one line for the user.
type Failure = (ErrorCode, String);

fn fail(code: ErrorCode, msg: impl Into<String>) -> Failure {
    (code, msg.into())
}

/// The control domain.
pub struct Daemon {
    me: std::sync::Weak<Daemon>,
    cfg: DaemonConfig,
    policy: DomainPolicy,
    state: StateDir,
    vms: Mutex<BTreeMap<String, Arc<VmEntry>>>,
    create_lock: Mutex<()>,
    next_client: AtomicU64,
}

fn log(msg: &str) {
    eprintln!("bulkheadd: {msg}");
}

impl Daemon {
    /// Loads policy and state; re-adopts VMs whose runners still run.
    pub fn new(cfg: DaemonConfig) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let (policy, from_file) = DomainPolicy::load(&cfg.policy)?;
        if from_file {
            log(&format!("policy loaded from {}", cfg.policy.display()));
        } else {
            log(&format!(
                "no policy at {}: safe default (only root may act)",
                cfg.policy.display()
            ));
        }
        let state = StateDir::open(&cfg.state_dir)
            .with_context(|| format!("state dir {}", cfg.state_dir.display()))?;
        let daemon = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            cfg,
            policy,
            state,
            vms: Mutex::new(BTreeMap::new()),
            create_lock: Mutex::new(()),
            next_client: AtomicU64::new(1),
        });
        daemon.adopt_all();
        Ok(daemon)
    }

    /// Serves clients on the socket forever.
    pub fn serve(self: &Arc<Self>) -> anyhow::Result<()> {
        use anyhow::Context;
        use std::os::unix::fs::PermissionsExt;
        if let Some(dir) = self.cfg.socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let listener = Listener::bind(&self.cfg.socket)
            .with_context(|| format!("listening on {}", self.cfg.socket.display()))?;
        // Anyone may connect; the policy decides what they may do.
        std::fs::set_permissions(&self.cfg.socket, std::fs::Permissions::from_mode(0o666))?;
        log(&format!("listening on {}", self.cfg.socket.display()));
        loop {
            match listener.accept() {
                Ok(ch) => {
                    let me = self.clone();
                    let _ = std::thread::Builder::new()
                        .name("client".into())
                        .spawn(move || me.serve_client(ch));
                }
                Err(e) => {
                    log(&format!("accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn serve_client(self: Arc<Self>, ch: Channel) {
        if let Err(e) = server_hello(&ch, Duration::from_secs(5)) {
            log(&format!("client refused: {e}"));
            return;
        }
        let caller = match ch.peer_credentials() {
            Ok(c) => Caller::from_peer(c.pid, c.uid, c.gid),
            Err(e) => {
                log(&format!("no peer credentials: {e}"));
                return;
            }
        };
        let client_id = self.next_client.fetch_add(1, Ordering::SeqCst);
        let mut console: Option<Arc<VmEntry>> = None;
        loop {
            let req = match ch.recv::<Request>() {
                Ok((req, _fds)) => req,
                Err(IpcError::Closed) => break,
                Err(
                    e @ (IpcError::Decode(_)
                    | IpcError::Truncated
                    | IpcError::Oversized
                    | IpcError::TooManyFds),
                ) => {
                    let _ = ch.send(
                        &Reply::Error {
                            code: ErrorCode::Protocol,
                            message: format!("bad request frame: {e}"),
                        },
                        &[],
                    );
                    continue;
                }
                Err(_) => break,
            };
            let reply = match req {
                Request::Console { name } => {
                    match self.attach_console(&caller, &name, client_id, &ch) {
                        Ok((vm, history)) => {
                            console = Some(vm);
                            Reply::ConsoleAttached { history }
                        }
                        Err((code, message)) => Reply::Error { code, message },
                    }
                }
                Request::ConsoleInput { data } => match &console {
                    Some(vm) => {
                        let _ = vm.send(&RunnerCommand::ConsoleInput(data));
                        continue;
                    }
                    None => Reply::Error {
                        code: ErrorCode::WrongState,
                        message: "no console attached: send Console first".into(),
                    },
                },
                Request::ConsoleDetach => match console.take() {
                    Some(vm) => {
                        vm.unsubscribe(client_id);
                        Reply::ConsoleClosed {
                            reason: "detached".into(),
                        }
                    }
                    None => Reply::Error {
                        code: ErrorCode::WrongState,
                        message: "no console attached".into(),
                    },
                },
                other => match self.handle(&caller, other) {
                    Ok(r) => r,
                    Err((code, message)) => Reply::Error { code, message },
                },
            };
            if ch.send(&reply, &[]).is_err() {
                break;
            }
        }
        if let Some(vm) = console {
            vm.unsubscribe(client_id);
        }
    }

    fn find(&self, caller: &Caller, name: &str, action: Action) -> Result<Arc<VmEntry>, Failure> {
        let vm = lock(&self.vms).get(name).cloned();
        let Some(vm) = vm else {
            return Err(fail(
                ErrorCode::NotFound,
                format!("no VM named '{name}' (see `bulkhead list`)"),
            ));
        };
        let owner = lock(&vm.record).spec.owner;
        self.policy
            .authorize(caller, action, Some((name, owner)))
            .map_err(|m| fail(ErrorCode::Denied, m))?;
        Ok(vm)
    }

    fn attach_console(
        &self,
        caller: &Caller,
        name: &str,
        client_id: u64,
        ch: &Channel,
    ) -> Result<(Arc<VmEntry>, Vec<u8>), Failure> {
        let vm = self.find(caller, name, Action::Console)?;
        if !vm.is_live() {
            return Err(fail(
                ErrorCode::WrongState,
                format!("VM '{name}' is not running"),
            ));
        }
        let sender = ch
            .try_clone()
            .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?;
        let history = vm.subscribe(client_id, sender);
        Ok((vm, history))
    }

    fn handle(&self, caller: &Caller, req: Request) -> Result<Reply, Failure> {
        match req {
            Request::Create {
                config_toml,
                config_dir,
            } => self.create(caller, &config_toml, Path::new(&config_dir)),
            Request::List => {
                let vms: Vec<Arc<VmEntry>> = lock(&self.vms).values().cloned().collect();
                let visible = vms
                    .iter()
                    .filter(|vm| {
                        let owner = lock(&vm.record).spec.owner;
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
                let rec = vm.snapshot();
                Ok(Reply::Info {
                    vm: VmInfo {
                        summary: summary(&vm),
                        kernel: rec.spec.kernel.display().to_string(),
                        initrd: rec.spec.initrd.as_ref().map(|p| p.display().to_string()),
                        cmdline: rec.spec.cmdline.clone(),
                        runner_uid: rec.runner_uid,
                        disks: rec
                            .spec
                            .disks
                            .iter()
                            .enumerate()
                            .map(|(i, d)| {
                                let backend = rec
                                    .backends
                                    .iter()
                                    .find(|b| b.device == format!("disk{i}"))
                                    .filter(|_| vm.is_live())
                                    .map(backend_words)
                                    .unwrap_or_default();
                                format!(
                                    "disk{i}: {}{}, {} queue(s){}{}",
                                    d.path.display(),
                                    if d.readonly { " (read-only)" } else { "" },
                                    d.queues.unwrap_or(1),
                                    d.serial
                                        .as_ref()
                                        .map(|s| format!(" serial '{s}'"))
                                        .unwrap_or_default(),
                                    backend
                                )
                            })
                            .collect(),
                        nics: rec
                            .spec
                            .nics
                            .iter()
                            .enumerate()
                            .map(|(i, n)| {
                                let backend = rec
                                    .backends
                                    .iter()
                                    .find(|b| b.device == format!("nic{i}"))
                                    .filter(|_| vm.is_live())
                                    .map(|b| format!(", tap bh{}n{i}{}", rec.id, backend_words(b)))
                                    .unwrap_or_default();
                                let mac = n
                                    .mac
                                    .clone()
                                    .unwrap_or_else(|| network::default_mac(rec.id, i));
                                format!("nic{i}: {mac} on network {}{backend}", n.network)
                            })
                            .collect(),
                    },
                })
            }
            Request::Pause { name } => self.pause(caller, &name, true),
            Request::Unpause { name } => self.pause(caller, &name, false),
            Request::Shutdown { name, timeout_secs } => self.shutdown(caller, &name, timeout_secs),
            Request::Destroy { name } => self.destroy(caller, &name),
            Request::DeviceRestart { name, device } => {
                self.device_restart(caller, &name, &device, None)
            }
            Request::DeviceUpgrade {
                name,
                device,
                binary,
            } => self.device_restart(caller, &name, &device, Some(PathBuf::from(binary))),
            Request::Console { .. } | Request::ConsoleInput { .. } | Request::ConsoleDetach => {
                Err(fail(
                    ErrorCode::Protocol,
                    "console requests are handled per connection",
                ))
            }
        }
    }

    fn pause(&self, caller: &Caller, name: &str, pause: bool) -> Result<Reply, Failure> {
        let vm = self.find(caller, name, Action::Pause)?;
        let state = lock(&vm.record).state.clone();
        let (want, cmd, done) = if pause {
            (VmState::Running, RunnerCommand::Pause, VmState::Paused)
        } else {
            (VmState::Paused, RunnerCommand::Resume, VmState::Running)
        };
        if state != want {
            return Err(fail(
                ErrorCode::WrongState,
                format!(
                    "VM '{name}' is {}, not {}",
                    state_word(&state),
                    state_word(&want)
                ),
            ));
        }
        match vm.request(&cmd, Duration::from_secs(10)) {
            Ok(RunnerEvent::Paused) | Ok(RunnerEvent::Resumed) => {
                vm.set_state(done.clone());
                Ok(Reply::Done {
                    message: format!("VM '{name}' {}", if pause { "paused" } else { "unpaused" }),
                })
            }
            Ok(RunnerEvent::Error { message }) => Err(fail(ErrorCode::Internal, message)),
            Ok(other) => Err(fail(
                ErrorCode::Internal,
                format!("unexpected answer from the runner: {other:?}"),
            )),
            Err(e) => Err(fail(ErrorCode::Internal, e)),
        }
    }

    fn shutdown(&self, caller: &Caller, name: &str, timeout_secs: u32) -> Result<Reply, Failure> {
        let vm = self.find(caller, name, Action::Shutdown)?;
        if !vm.is_live() {
            return Err(fail(
                ErrorCode::WrongState,
                format!("VM '{name}' is not running"),
            ));
        }
        if lock(&vm.record).state == VmState::Paused {
            return Err(fail(
                ErrorCode::WrongState,
                format!("VM '{name}' is paused: `bulkhead unpause {name}` first"),
            ));
        }
        match vm.request(&RunnerCommand::RequestShutdown, Duration::from_secs(10)) {
            Ok(RunnerEvent::ShutdownRequested) => {}
            Ok(other) => {
                return Err(fail(
                    ErrorCode::Internal,
                    format!("unexpected answer from the runner: {other:?}"),
                ))
            }
            Err(e) => return Err(fail(ErrorCode::Internal, e)),
        }
        if vm.wait_stopped(Duration::from_secs(timeout_secs.into())) {
            let state = lock(&vm.record).state.clone();
            Ok(Reply::Done {
                message: format!("VM '{name}' {}", state_word(&state)),
            })
        } else {
            Err(fail(
                ErrorCode::Timeout,
                format!("VM '{name}' did not shut down within {timeout_secs} s; it is still running (`bulkhead destroy {name}` stops it)"),
            ))
        }
    }

    fn destroy(&self, caller: &Caller, name: &str) -> Result<Reply, Failure> {
        let vm = self.find(caller, name, Action::Destroy)?;
        if vm.is_live() {
            vm.kill().map_err(|e| fail(ErrorCode::Internal, e))?;
            if !vm.wait_stopped(Duration::from_secs(10)) {
                return Err(fail(
                    ErrorCode::Internal,
                    format!("runner of '{name}' did not die within 10 s"),
                ));
            }
        }
        lock(&self.vms).remove(name);
        self.state.remove(name);
        log(&format!("VM '{name}' destroyed"));
        Ok(Reply::Done {
            message: format!("VM '{name}' destroyed"),
        })
    }

    fn create(&self, caller: &Caller, text: &str, dir: &Path) -> Result<Reply, Failure> {
        self.policy
            .authorize(caller, Action::Create, None)
            .map_err(|m| fail(ErrorCode::Denied, m))?;
        let mut spec = vmconfig::parse(text, dir, caller.uid)
            .map_err(|e| fail(ErrorCode::BadConfig, e.to_string()))?;
        spec.kernel = self
            .policy
            .check_image("kernel", &spec.kernel)
            .map_err(|m| fail(ErrorCode::Denied, m))?;
        if let Some(i) = &spec.initrd {
            spec.initrd = Some(
                self.policy
                    .check_image("initrd", i)
                    .map_err(|m| fail(ErrorCode::Denied, m))?,
            );
        }
        for n in &spec.nics {
            self.policy
                .check_network(&spec.name, &n.network)
                .map_err(|m| fail(ErrorCode::Denied, m))?;
        }
        for d in &mut spec.disks {
            d.path = self
                .policy
                .check_image("disk", &d.path)
                .map_err(|m| fail(ErrorCode::Denied, m))?;
        }
        let _one_create_at_a_time = lock(&self.create_lock);
        let (id, uids) = {
            let vms = lock(&self.vms);
            if let Some(old) = vms.get(&spec.name) {
                if old.is_live() {
                    return Err(fail(
                        ErrorCode::Exists,
                        format!("a VM named '{}' is running", spec.name),
                    ));
                }
            }
            let in_use: u64 = vms
                .values()
                .filter(|v| v.is_live())
                .map(|v| lock(&v.record).spec.memory)
                .sum();
            self.policy
                .check_limits(spec.vcpus, spec.memory, in_use)
                .map_err(|m| fail(ErrorCode::Denied, m))?;
            let id = vms.values().map(|v| lock(&v.record).id).max().unwrap_or(0) + 1;
            let mut used: Vec<u32> = Vec::new();
            for v in vms.values().filter(|v| v.is_live()) {
                let rec = lock(&v.record);
                used.extend(rec.runner_uid);
                used.extend(rec.backends.iter().map(|b| b.uid));
            }
            let need = 1 + spec.disks.len() + spec.nics.len();
            let free: Vec<u32> = (self.policy.runner_uid_base
                ..self.policy.runner_uid_base + self.policy.runner_uid_count)
                .filter(|u| !used.contains(u))
                .take(need)
                .collect();
            if free.len() < need {
                return Err(fail(
                    ErrorCode::Denied,
                    "denied by rule 'runners': not enough free runner uids",
                ));
            }
            (id, free)
        };
        let uid = uids[0];
        let name = spec.name.clone();
        let record = VmRecord {
            id,
            state: VmState::Starting,
            runner_pid: None,
            runner_uid: Some(uid),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            spec,
            backends: Vec::new(),
        };
        let vm = VmEntry::new(name.clone(), record, self.state.clone(), true);
        lock(&self.vms).insert(name.clone(), vm.clone());
        match self.start(&vm, &uids[1..]) {
            Ok(detail) => {
                log(&format!("VM '{name}' (id {id}) started: {detail}"));
                Ok(Reply::Created { vm: summary(&vm) })
            }
            Err(msg) => {
                let _ = vm.kill();
                vm.wait_stopped(Duration::from_secs(5));
                vm.stop_backends();
                lock(&self.vms).remove(&name);
                self.state.remove(&name);
                log(&format!("VM '{name}' failed to start: {msg}"));
                Err(fail(
                    ErrorCode::BadConfig,
                    format!("VM '{name}' failed to start: {msg}"),
                ))
            }
        }
    }

    /// Spawns one sandboxed `bulkhead-blk` for disk `index` as `uid`, holding only the opened
    /// image and a listener with the runner's connection queued; returns the runner's end.
    fn spawn_disk(&self, vm: &Arc<VmEntry>, index: usize, uid: u32) -> Result<UnixStream, String> {
        let disk = lock(&vm.record).spec.disks[index].clone();
        let device = format!("disk{index}");
        let image = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.readonly)
            .open(&disk.path)
            .map_err(|e| format!("{device} image {}: {e}", disk.path.display()))?;
        let mut args: Vec<String> = vec!["--image-fd".into(), "4".into()];
        if disk.readonly {
            args.push("--readonly".into());
        }
        if let Some(serial) = &disk.serial {
            args.push("--serial".into());
            args.push(serial.clone());
        }
        args.push("--queues".into());
        args.push(disk.queues.unwrap_or(1).to_string());
        self.spawn_backend(
            vm,
            &device,
            BackendLaunch {
                binary: self.cfg.blk.clone(),
                args,
                resource: OwnedFd::from(image),
                uid,
                policy: disk.restart_policy(),
            },
        )
        .map(|(_, conn)| conn)
    }

    /// Creates NIC `index`'s tap on its network's bridge and spawns one sandboxed
    /// `bulkhead-net` as `uid` holding only the tap and its vhost-user connection.
    fn spawn_nic(&self, vm: &Arc<VmEntry>, index: usize, uid: u32) -> Result<UnixStream, String> {
        let (nic, id) = {
            let rec = lock(&vm.record);
            (rec.spec.nics[index].clone(), rec.id)
        };
        let device = format!("nic{index}");
        let net = self.policy.check_network(&vm.name, &nic.network)?;
        network::ensure_bridge(&net.bridge, net.address.as_deref())
            .map_err(|e| format!("{device}: {e}"))?;
        let tap_name = format!("bh{id}n{index}");
        let tap =
            network::open_tap(&tap_name, &net.bridge).map_err(|e| format!("{device}: {e}"))?;
        log(&format!(
            "VM '{}': {device} is tap {tap_name} on bridge {}",
            vm.name, net.bridge
        ));
        let mac = nic
            .mac
            .clone()
            .unwrap_or_else(|| network::default_mac(id, index));
        let args = vec!["--tap-fd".into(), "4".into(), "--mac".into(), mac];
        self.spawn_backend(
            vm,
            &device,
            BackendLaunch {
                binary: self.cfg.net.clone(),
                args,
                resource: OwnedFd::from(tap),
                uid,
                policy: nic.restart_policy(),
            },
        )
        .map(|(_, conn)| conn)
    }

    /// Spawns a sandboxed vhost-user backend with fd 3 = a listener holding the runner's
    /// queued connection, fd 4 =
    /// `resource` (image or tap), fd 5 = a ready pipe; waits until it runs, then empties its
    /// root. Returns its pid and the runner's end of the connection.
    fn spawn_backend(
        &self,
        vm: &Arc<VmEntry>,
        device: &str,
        launch: BackendLaunch,
    ) -> Result<(i32, UnixStream), String> {
        match self.launch_backend(vm, device, launch, false)? {
            (pid, Some(conn)) => Ok((pid, conn)),
            (_, None) => Err(format!("{device}: no connection")),
        }
    }

    /// [`Self::spawn_backend`], or with `standby` the same process started as the device's
    /// standby: it is not recorded as serving, and its connection is kept in the slot
    /// (None is returned) until it takes over.
    fn launch_backend(
        &self,
        vm: &Arc<VmEntry>,
        device: &str,
        launch: BackendLaunch,
        standby: bool,
    ) -> Result<(i32, Option<UnixStream>), String> {
        let BackendLaunch {
            binary,
            args: extra_args,
            resource,
            uid,
            policy,
        } = launch;
        let binary = binary.as_path();
        // A listener with the runner's connection already queued: the backend accepts it and
        // closes the listener, so it ends up holding one socket, the vhost-user connection.
        // A name of its own: a standby and a serving backend of one device may be started
        // at the same time, and each must connect to its own listener.
        static SPAWNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SPAWNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self
            .state
            .path()
            .join("run")
            .join(format!("{}.{device}.{n}.sock", vm.name));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| format!("{device} socket: {e}"))?;
        let runner_end = UnixStream::connect(&path).map_err(|e| format!("{device} socket: {e}"));
        let _ = std::fs::remove_file(&path);
        let runner_end = runner_end?;
        let backend_end = OwnedFd::from(listener);
        let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| format!("{device} pipe: {e}"))?;
        // A device's log starts with the VM; each restart of its backend appends to it, so
        // the log tells the device's whole history.
        let log_name = format!("{}.{device}.log", vm.name);
        let respawn = lock(&vm.slots).contains_key(device);
        let mut log_file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(respawn)
            .truncate(!respawn)
            .open(self.state.path().join("logs").join(&log_name))
            .map_err(|e| format!("{device} log: {e}"))?;
        {
            use std::io::Write;
            let _ = writeln!(
                log_file,
                "bulkheadd: starting {} for {device}{}",
                binary.display(),
                if standby { " (standby)" } else { "" }
            );
        }
        let mut args: Vec<String> = vec![
            "--socket-fd".into(),
            "3".into(),
            "--ready-fd".into(),
            "5".into(),
        ];
        args.extend(extra_args.iter().cloned());
        let sandbox = spawn::Sandbox {
            uid,
            max_threads: 64,
            hostname: format!("bulkhead-{}-{device}", vm.name),
        };
        {
            let mut slots = lock(&vm.slots);
            let dup = resource.try_clone().map_err(|e| format!("{device}: {e}"))?;
            let slot = slots
                .entry(device.to_string())
                .or_insert_with(|| vm::DeviceSlot {
                    resource: dup,
                    binary: binary.to_path_buf(),
                    args: extra_args.clone(),
                    uid,
                    started: std::time::Instant::now(),
                    quick_failures: 0,
                    planned: None,
                    policy,
                    recent: std::collections::VecDeque::new(),
                    alive: false,
                    refused: None,
                    refusals: 0,
                    last_refusal: String::new(),
                    restarting: false,
                    standby: None,
                    standby_starting: false,
                });
            if !standby {
                slot.started = std::time::Instant::now();
            }
        }
        let handed = vec![backend_end, resource, ready_w];
        let pid = spawn::spawn_sandboxed(binary, &args, handed, log_file, &sandbox)
            .map_err(|e| format!("cannot spawn {}: {e}", binary.display()))?;
        if let Ok(fd) = spawn::pidfd_open(pid) {
            vm.add_backend(fd);
        }
        let mut runner_end = Some(runner_end);
        if standby {
            // In the slot before its watcher starts, so the watcher finds it there.
            let mut slots = lock(&vm.slots);
            if let (Some(slot), Some(conn)) = (slots.get_mut(device), runner_end.take()) {
                slot.standby = Some(vm::Standby {
                    pid,
                    binary: binary.to_path_buf(),
                    conn,
                    ready: false,
                    started: std::time::Instant::now(),
                });
            }
        } else {
            // Slots, then record: `alive` and the pid the record names change together.
            let mut slots = lock(&vm.slots);
            if let Some(slot) = slots.get_mut(device) {
                slot.alive = true;
            }
            let mut rec = lock(&vm.record);
            let record = state::BackendRecord {
                device: device.to_string(),
                pid,
                uid,
                binary: binary.display().to_string(),
                restarts: 0,
                last_exit: None,
                failed: None,
                stopped: None,
                restart_policy: policy.to_string(),
                standby_pid: None,
            };
            match rec.backends.iter_mut().find(|b| b.device == device) {
                Some(b) => {
                    b.pid = pid;
                    b.binary = record.binary;
                    b.restart_policy = record.restart_policy;
                }
                None => rec.backends.push(record),
            }
            drop(rec);
            drop(slots);
            vm.save();
        }
        self.watch_backend(vm, device, pid);
        // The backend writes one byte once it runs (its libraries are loaded): only then
        // may its root be taken away.
        let ready = File::from(ready_r);
        let mut pfd = [nix::poll::PollFd::new(
            ready.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let polled = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(30_000u16))
            .map_err(|e| e.to_string());
        let mut byte = [0u8; 1];
        let started = polled.and_then(|polled| {
            if polled > 0 && std::io::Read::read(&mut &ready, &mut byte).unwrap_or(0) == 1 {
                spawn::seal_root(pid, &self.state.sandbox_root())
                    .map_err(|e| format!("{device}: {e}"))
            } else {
                Err(format!(
                    "{device} backend did not start (see logs/{log_name})"
                ))
            }
        });
        if let Err(e) = started {
            if standby {
                self.drop_standby(vm, device, pid, &e);
            } else {
                self.refuse_backend(vm, device, pid, &e);
            }
            return Err(e);
        }
        if standby {
            let mut slots = lock(&vm.slots);
            if let Some(s) = slots
                .get_mut(device)
                .and_then(|slot| slot.standby.as_mut())
                .filter(|s| s.pid == pid)
            {
                s.ready = true;
                if let Some(b) = lock(&vm.record)
                    .backends
                    .iter_mut()
                    .find(|b| b.device == device)
                {
                    b.standby_pid = Some(pid);
                }
            }
        }
        Ok((pid, runner_end))
    }

    /// Starts a standby backend for `device` in the background, if it should have one: a
    /// disk whose restart policy restarts it, with no standby yet, in a VM that runs on.
    fn keep_standby(&self, vm: &Arc<VmEntry>, device: &str) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        if !device.starts_with("disk") || vm.is_ending() {
            return;
        }
        let launch = {
            let mut slots = lock(&vm.slots);
            let Some(slot) = slots.get_mut(device) else {
                return;
            };
            if slot.standby.is_some()
                || slot.standby_starting
                || slot.policy.mode == vmconfig::RestartMode::Never
            {
                return;
            }
            let Ok(launch) = BackendLaunch::from_slot(slot, device) else {
                return;
            };
            slot.standby_starting = true;
            launch
        };
        let vm = vm.clone();
        let device = device.to_string();
        let _ = std::thread::Builder::new()
            .name(format!("standby-{device}"))
            .spawn(move || {
                if let Err(e) = me.launch_backend(&vm, &device, launch, true) {
                    log(&format!(
                        "VM '{}': {device}: no standby backend: {e}",
                        vm.name
                    ));
                }
                if let Some(slot) = lock(&vm.slots).get_mut(&device) {
                    slot.standby_starting = false;
                }
            });
    }

    /// Ends `device`'s standby `pid` if it is still the slot's (so unreaped), saying why.
    fn drop_standby(&self, vm: &Arc<VmEntry>, device: &str, pid: i32, why: &str) {
        let mut slots = lock(&vm.slots);
        let Some(slot) = slots.get_mut(device) else {
            return;
        };
        if slot.standby.as_ref().is_some_and(|s| s.pid == pid) {
            slot.standby = None;
            if let Some(b) = lock(&vm.record)
                .backends
                .iter_mut()
                .find(|b| b.device == device)
            {
                b.standby_pid = None;
            }
            log(&format!(
                "VM '{}': {device} standby (pid {pid}) ended: {why}",
                vm.name
            ));
            sigkill(pid);
        }
    }

    /// Makes `device`'s ready standby (of the slot's binary) the serving backend: the
    /// record names it from here on. Returns its pid and the runner's end of its
    /// connection. A standby of another binary is ended instead.
    fn take_standby(&self, vm: &Arc<VmEntry>, device: &str) -> Option<(i32, UnixStream)> {
        let mut slots = lock(&vm.slots);
        let slot = slots.get_mut(device)?;
        let s = slot.standby.take()?;
        let mut rec = lock(&vm.record);
        let b = rec.backends.iter_mut().find(|b| b.device == device)?;
        b.standby_pid = None;
        if !s.ready || s.binary != slot.binary {
            // Still in the slot until now, so unreaped.
            sigkill(s.pid);
            return None;
        }
        b.pid = s.pid;
        b.binary = s.binary.display().to_string();
        slot.alive = true;
        slot.started = std::time::Instant::now();
        Some((s.pid, s.conn))
    }

    /// Watches a backend process; when it ends while the VM runs, restarts it (unless it
    /// keeps crashing at once) and hands the runner the new connection.
    fn watch_backend(&self, vm: &Arc<VmEntry>, device: &str, pid: i32) {
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
                    let mut pfd = [nix::poll::PollFd::new(
                        fd.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    while matches!(
                        nix::poll::poll(&mut pfd, nix::poll::PollTimeout::NONE),
                        Err(nix::errno::Errno::EINTR)
                    ) {}
                }
                // Which process ended: the serving one (the record names it), the standby,
                // or one already set aside. Not alive (or out of the slot) from here on:
                // nobody signals the pid once it may be reaped.
                let (serving, standby_life) = {
                    let mut slots = lock(&vm.slots);
                    let mut rec = lock(&vm.record);
                    let b = rec.backends.iter_mut().find(|b| b.device == device);
                    let serving = b.as_ref().is_some_and(|b| b.pid == pid);
                    let mut standby_life = None;
                    if let Some(slot) = slots.get_mut(&device) {
                        if serving {
                            slot.alive = false;
                        } else if slot.standby.as_ref().is_some_and(|s| s.pid == pid) {
                            standby_life = slot.standby.take().map(|s| s.started.elapsed());
                            if let Some(b) = b {
                                b.standby_pid = None;
                            }
                        }
                    }
                    (serving, standby_life)
                };
                let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).ok();
                if vm.is_ending() {
                    return;
                }
                let clean = matches!(status, Some(nix::sys::wait::WaitStatus::Exited(_, 0)));
                let why = match status {
                    Some(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                        format!("killed by {sig}")
                    }
                    Some(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                        format!("exited with status {code}")
                    }
                    _ => "ended".to_string(),
                };
                if !serving {
                    if let Some(life) = standby_life {
                        // A standby that lived a while is replaced; one that died at once
                        // (a binary that crashes) is not, until the next restart.
                        let again = life >= Duration::from_secs(1);
                        log(&format!(
                            "VM '{}': {device} standby (pid {pid}) {why}{}",
                            vm.name,
                            if again {
                                "; starting another"
                            } else {
                                "; none kept until the next restart"
                            }
                        ));
                        if again {
                            me.keep_standby(&vm, &device);
                        }
                    }
                    return;
                }
                me.restart_backend(&vm, &device, why, clean);
            });
    }

    /// Decides, by the device's restart policy, what follows its backend ending with `why`
    /// (`clean`: exit status 0), and respawns it if that is the decision.
    fn restart_backend(&self, vm: &Arc<VmEntry>, device: &str, why: String, clean: bool) {
        // A backend that dies this soon after being handed its device "crashed at once":
        // it is backed off, and failed after BUDGET such crashes in a row. Later deaths (a
        // crash under load, a kill) restart it at once, up to the policy's rate.
        const QUICK: Duration = Duration::from_millis(250);
        const BUDGET: u32 = 5;
        const WINDOW: Duration = Duration::from_secs(60);
        enum Next {
            Restart { backoff: Duration },
            Stop(String),
            Fail(String),
        }
        let (reason, next) = {
            let mut slots = lock(&vm.slots);
            let Some(slot) = slots.get_mut(device) else {
                return;
            };
            let planned = slot.planned.take();
            let refused = slot.refused.take();
            let reason = match (&planned, &refused) {
                (Some(p), _) => format!("{p} ({why})"),
                (None, Some(r)) => format!("{why}: refused, {r}"),
                (None, None) => why,
            };
            let policy = slot.policy;
            let next = if planned.is_some() {
                slot.quick_failures = 0;
                Next::Restart {
                    backoff: Duration::ZERO,
                }
            } else if policy.mode == vmconfig::RestartMode::Never {
                Next::Stop("restart policy is 'never'".into())
            } else if policy.mode == vmconfig::RestartMode::OnFailure && clean {
                Next::Stop("it exited cleanly and the restart policy is 'on-failure'".into())
            } else {
                if slot.started.elapsed() < QUICK || refused.is_some() {
                    slot.quick_failures += 1;
                } else {
                    slot.quick_failures = 0;
                }
                let now = std::time::Instant::now();
                slot.recent.push_back(now);
                while slot
                    .recent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > WINDOW)
                {
                    slot.recent.pop_front();
                }
                let quick = slot.quick_failures;
                if quick >= BUDGET {
                    Next::Fail(format!(
                        "crashed {quick} times in a row within {QUICK:?} of starting; last: {reason}"
                    ))
                } else if policy.per_minute > 0 && slot.recent.len() > policy.per_minute as usize {
                    Next::Fail(format!(
                        "ended {} times within a minute, more than its restart_limit of {}; last: {reason}",
                        slot.recent.len(),
                        policy.per_minute
                    ))
                } else if quick > 0 {
                    Next::Restart {
                        backoff: Duration::from_millis(100u64 << (quick - 1).min(4)),
                    }
                } else {
                    Next::Restart {
                        backoff: Duration::ZERO,
                    }
                }
            };
            slot.restarting = matches!(next, Next::Restart { .. });
            (reason, next)
        };
        log(&format!("VM '{}': {device} backend {reason}", vm.name));
        {
            let mut rec = lock(&vm.record);
            if let Some(b) = rec.backends.iter_mut().find(|b| b.device == device) {
                b.last_exit = Some(reason.clone());
                match &next {
                    Next::Fail(f) => b.failed = Some(f.clone()),
                    Next::Stop(s) => b.stopped = Some(format!("not restarted: {s}")),
                    Next::Restart { .. } => {}
                }
            }
        }
        vm.save();
        match next {
            Next::Fail(_) => {
                log(&format!(
                    "VM '{}': {device} marked failed; the device stalls, the VM keeps running (`bulkhead device-restart {} {device}` tries again)",
                    vm.name, vm.name
                ));
                return;
            }
            Next::Stop(s) => {
                log(&format!(
                    "VM '{}': {device} not restarted ({s}); the device stalls, the VM keeps running",
                    vm.name
                ));
                return;
            }
            Next::Restart { backoff } => {
                if !backoff.is_zero() {
                    std::thread::sleep(backoff);
                }
            }
        }
        let result = if vm.is_ending() {
            Ok(())
        } else {
            self.respawn_backend(vm, device)
        };
        if let Some(slot) = lock(&vm.slots).get_mut(device) {
            slot.restarting = false;
        }
        if let Err(e) = result {
            log(&format!(
                "VM '{}': restarting {device} failed: {e}",
                vm.name
            ));
        }
    }

    /// Starts a new backend process for `device` from its slot (same resource, binary,
    /// arguments, uid) and hands the runner the new connection.
    fn respawn_backend(&self, vm: &Arc<VmEntry>, device: &str) -> Result<(), String> {
        let pid_before = lock(&vm.record)
            .backends
            .iter()
            .find(|b| b.device == device)
            .map(|b| b.pid);
        let connection = match self.take_standby(vm, device) {
            Some((pid, conn)) => {
                log(&format!(
                    "VM '{}': {device}: standby backend (pid {pid}) takes over",
                    vm.name
                ));
                Ok((pid, conn))
            }
            None => {
                let launch = lock(&vm.slots)
                    .get(device)
                    .ok_or_else(|| format!("'{device}' is not restartable (re-adopted VM?)"))
                    .and_then(|slot| BackendLaunch::from_slot(slot, device));
                launch.and_then(|launch| self.spawn_backend(vm, device, launch))
            }
        };
        // The error, and the new process if there is one (which the runner refused).
        let result = match connection {
            Err(e) => Err((None, e)),
            Ok((pid, conn)) => {
                match vm.request_with_fds(
                    &RunnerCommand::ReconnectDevice {
                        device: device.to_string(),
                    },
                    &[conn.as_fd()],
                    Duration::from_secs(20),
                ) {
                    Ok(RunnerEvent::DeviceReconnected { .. }) => Ok(()),
                    Ok(RunnerEvent::Error { message }) => Err((Some(pid), message)),
                    Ok(other) => Err((Some(pid), format!("unexpected answer: {other:?}"))),
                    Err(e) => Err((Some(pid), e)),
                }
            }
        };
        match result {
            Ok(()) => {
                let mut rec = lock(&vm.record);
                if let Some(b) = rec.backends.iter_mut().find(|b| b.device == device) {
                    b.restarts += 1;
                }
                drop(rec);
                vm.save();
                log(&format!("VM '{}': {device} backend restarted", vm.name));
                self.keep_standby(vm, device);
                Ok(())
            }
            Err((Some(pid), e)) => {
                self.refuse_backend(vm, device, pid, &e);
                Err(e)
            }
            Err((None, e)) => {
                // A process that was spawned is watched, and its end is decided by the
                // policy. Without one, nothing would retry: say so in `info`.
                let mut rec = lock(&vm.record);
                if let Some(b) = rec
                    .backends
                    .iter_mut()
                    .find(|b| b.device == device && Some(b.pid) == pid_before)
                {
                    b.failed = Some(format!("cannot start a backend: {e}"));
                    drop(rec);
                    vm.save();
                }
                Err(e)
            }
        }
    }

    /// Ends a new backend process that will never serve (it did not become ready, or the
    /// runner could not set it up: e.g. it accepted the connection and never answered), so
    /// that it does not hold the device stalled for good. Its exit is counted as a crash at
    /// start, so a binary that always hangs ends up failed like one that always crashes.
    fn refuse_backend(&self, vm: &Arc<VmEntry>, device: &str, pid: i32, why: &str) {
        // Slots, then record: `alive` speaks of the process the record names, and only
        // while that is still `pid` (not a successor) may `pid` be signalled.
        let mut slots = lock(&vm.slots);
        let Some(slot) = slots.get_mut(device) else {
            return;
        };
        let current = lock(&vm.record)
            .backends
            .iter()
            .find(|b| b.device == device)
            .map(|b| b.pid);
        // Not when it is being ended on request (a restart or upgrade killed it while it
        // was being set up), nor once it has ended on its own (e.g. exited before it said it
        // was ready): its watcher decides by the usual rules.
        if current != Some(pid) || !slot.alive || slot.planned.is_some() || !still_running(pid) {
            return;
        }
        slot.refusals += 1;
        slot.last_refusal = why.to_string();
        slot.refused = Some(why.to_string());
        log(&format!(
            "VM '{}': {device} backend (pid {pid}) refused: {why}; ending it",
            vm.name
        ));
        sigkill(pid);
    }

    /// Restarts a device's backend (or upgrades it to `binary`) under a running guest.
    fn device_restart(
        &self,
        caller: &Caller,
        name: &str,
        device: &str,
        binary: Option<PathBuf>,
    ) -> Result<Reply, Failure> {
        let action = if binary.is_some() {
            Action::Create
        } else {
            Action::Pause
        };
        let vm = self.find(caller, name, action)?;
        if !vm.is_live() {
            return Err(fail(
                ErrorCode::WrongState,
                format!("VM '{name}' is not running"),
            ));
        }
        let (old_pid, old_restarts) = lock(&vm.record)
            .backends
            .iter()
            .find(|b| b.device == device)
            .map(|b| (b.pid, b.restarts))
            .ok_or_else(|| {
                fail(
                    ErrorCode::NotFound,
                    format!("VM '{name}' has no device '{device}'"),
                )
            })?;
        // An administrator's restart also revives a device that was failed or stopped: its
        // crash counters start over.
        let refusals_before;
        let alive = {
            let mut slots = lock(&vm.slots);
            let slot = slots.get_mut(device).ok_or_else(|| {
                fail(
                    ErrorCode::WrongState,
                    format!("'{device}' is not restartable (re-adopted VM?)"),
                )
            })?;
            if let Some(b) = &binary {
                let b = b
                    .canonicalize()
                    .map_err(|e| fail(ErrorCode::BadConfig, format!("{}: {e}", b.display())))?;
                slot.binary = b;
                slot.planned = Some(format!("upgraded to {}", slot.binary.display()));
                // A standby runs the old binary: it is ended when it would take over
                // (take_standby), and a new one of the new binary follows the upgrade.
            } else {
                slot.planned = Some("restarted on request".into());
            }
            slot.quick_failures = 0;
            slot.recent.clear();
            refusals_before = slot.refusals;
            if slot.alive {
                // Not yet reaped (the watcher clears `alive` under this lock before it
                // reaps), so the pid the record names now is still this backend's.
                let current = lock(&vm.record)
                    .backends
                    .iter()
                    .find(|b| b.device == device)
                    .map_or(old_pid, |b| b.pid);
                sigkill(current);
            } else {
                // No process will exit to trigger the restart: one is started here, or the
                // restart already under way is waited for.
                slot.planned = None;
            }
            // A restart already under way picks up the new binary; only start one if none
            // is coming.
            slot.alive || slot.restarting
        };
        {
            let mut rec = lock(&vm.record);
            if let Some(b) = rec.backends.iter_mut().find(|b| b.device == device) {
                b.failed = None;
                b.stopped = None;
            }
        }
        vm.save();
        if !alive {
            log(&format!(
                "VM '{name}': starting a backend for the stalled {device} on request"
            ));
            self.respawn_backend(&vm, device)
                .map_err(|e| fail(ErrorCode::Internal, format!("{device}: {e}")))?;
            let (pid, restarts) = lock(&vm.record)
                .backends
                .iter()
                .find(|b| b.device == device)
                .map(|b| (b.pid, b.restarts))
                .unwrap_or((old_pid, old_restarts));
            return Ok(Reply::Done {
                message: format!(
                    "VM '{name}': {device} now served by pid {pid} (restart #{restarts})"
                ),
            });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (pid, restarts) = lock(&vm.record)
                .backends
                .iter()
                .find(|b| b.device == device)
                .map(|b| (b.pid, b.restarts))
                .unwrap_or((old_pid, 0));
            let (failed, stopped) = lock(&vm.record)
                .backends
                .iter()
                .find(|b| b.device == device)
                .map(|b| (b.failed.clone(), b.stopped.clone()))
                .unwrap_or_default();
            if let Some(why) = failed {
                return Err(fail(ErrorCode::Internal, format!("{device} failed: {why}")));
            }
            if let Some(why) = stopped {
                return Err(fail(
                    ErrorCode::Internal,
                    format!("{device} stopped: {why}"),
                ));
            }
            let refused = lock(&vm.slots)
                .get(device)
                .filter(|s| s.refusals > refusals_before)
                .map(|s| s.last_refusal.clone());
            if let Some(why) = refused {
                return Err(fail(
                    ErrorCode::Internal,
                    format!(
                        "the new {device} backend was refused and ended: {why}; bulkheadd keeps trying by the restart policy (see `bulkhead info {name}`)"
                    ),
                ));
            }
            if pid != old_pid && restarts > old_restarts {
                return Ok(Reply::Done {
                    message: format!(
                        "VM '{name}': {device} now served by pid {pid} (restart #{restarts})"
                    ),
                });
            }
            if std::time::Instant::now() >= deadline {
                return Err(fail(
                    ErrorCode::Timeout,
                    format!("{device} did not come back within 30 s (see `bulkhead info {name}`)"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Spawns, seals and boots a VM's runner (and its disk backends).
    fn start(&self, vm: &Arc<VmEntry>, backend_uids: &[u32]) -> Result<String, String> {
        let (disk_count, nic_count) = {
            let rec = lock(&vm.record);
            (rec.spec.disks.len(), rec.spec.nics.len())
        };
        let mut uids = backend_uids.iter().copied();
        let mut disk_socks = Vec::new();
        for i in 0..disk_count {
            let uid = uids.next().ok_or("no uid for a disk backend")?;
            disk_socks.push(self.spawn_disk(vm, i, uid)?);
        }
        let mut nic_socks = Vec::new();
        for i in 0..nic_count {
            let uid = uids.next().ok_or("no uid for a NIC backend")?;
            nic_socks.push(self.spawn_nic(vm, i, uid)?);
        }
        let rec = vm.snapshot();
        let spec = &rec.spec;
        let uid = rec.runner_uid.ok_or("no runner uid")?;
        let sock = self.state.socket_path(&vm.name);
        let listener =
            Listener::bind(&sock).map_err(|e| format!("control socket {}: {e}", sock.display()))?;
        let log_file =
            File::create(self.state.log_path(&vm.name)).map_err(|e| format!("runner log: {e}"))?;
        let sandbox = RunnerSandbox {
            uid,
            vcpus: spec.vcpus,
            hostname: format!("bulkhead-{}", vm.name),
            selftest: self.cfg.runner_selftest,
        };
        let pid = spawn::spawn_runner(&self.cfg.runner, listener.into_fd(), log_file, &sandbox)
            .map_err(|e| format!("cannot spawn {}: {e}", self.cfg.runner.display()))?;
        lock(&vm.record).runner_pid = Some(pid);
        vm.save();
        let pidfd = spawn::pidfd_open(pid).ok();
        let ch = Channel::connect(&sock).map_err(|e| format!("cannot reach the runner: {e}"))?;
        client_hello(&ch, Role::Daemon, Duration::from_secs(30)).map_err(|e| {
            format!(
                "runner did not start: {e} (see {})",
                self.state.log_path(&vm.name).display()
            )
        })?;
        spawn::seal_root(pid, &self.state.sandbox_root()).map_err(|e| e.to_string())?;

        let memfd = create_guest_memfd(spec.memory).map_err(|e| format!("guest RAM: {e}"))?;
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("/dev/kvm: {e}"))?;
        let kernel = File::open(&spec.kernel)
            .map_err(|e| format!("kernel {}: {e}", spec.kernel.display()))?;
        let initrd = match &spec.initrd {
            Some(p) => Some(File::open(p).map_err(|e| format!("initrd {}: {e}", p.display()))?),
            None => None,
        };
        let boot = RunnerCommand::Boot(BootSpec {
            cmdline: spec.cmdline.clone(),
            vcpus: spec.vcpus,
            has_initrd: initrd.is_some(),
            kernel_name: spec.kernel.display().to_string(),
            disks: (0..disk_socks.len()).map(|i| format!("disk{i}")).collect(),
            nics: (0..nic_socks.len()).map(|i| format!("nic{i}")).collect(),
            cpu_template: self.cpu_template(&vm.name, &spec.cpu_template),
        });
        let mut fds = vec![kvm.as_fd(), memfd.as_fd(), kernel.as_fd()];
        if let Some(i) = &initrd {
            fds.push(i.as_fd());
        }
        fds.extend(disk_socks.iter().map(|s| s.as_fd()));
        fds.extend(nic_socks.iter().map(|s| s.as_fd()));
        ch.send(&boot, &fds)
            .map_err(|e| format!("sending Boot: {e}"))?;
        // Guest output (and, for a very short guest, its exit) may overtake `Started`.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let detail = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (event, _) = ch
                .recv_timeout::<RunnerEvent>(left)
                .map_err(|e| format!("no answer to Boot: {e}"))?;
            match event {
                RunnerEvent::Started { detail } => break detail,
                RunnerEvent::BootFailed { message } => return Err(message),
                RunnerEvent::Console(data) => vm.console_output(&data),
                RunnerEvent::Exited(outcome) => vm.record_outcome(outcome),
                other => return Err(format!("unexpected answer to Boot: {other:?}")),
            }
        };
        vm.set_state(VmState::Running);
        vm.attach(ch, pidfd)
            .map_err(|e| format!("supervisor: {e}"))?;
        // Each disk gets a standby backend, started in the background once the guest runs.
        for i in 0..disk_count {
            self.keep_standby(vm, &format!("disk{i}"));
        }
        Ok(detail)
    }

    /// Resolves `auto` to the template this host needs, and says why.
    fn cpu_template(&self, vm: &str, wanted: &str) -> String {
        if wanted != "auto" {
            return wanted.to_string();
        }
        let (t, why) = core_vmm::cpu_template::HostKind::detect().auto();
        log(&format!("VM '{vm}': CPU template {} ({why})", t.name));
        t.name.to_string()
    }

    /// Re-adopts the VMs in the state dir: live runners are reconnected, dead ones recorded.
    fn adopt_all(&self) {
        for (name, rec) in self.state.load_all() {
            let live = !matches!(rec.state, VmState::Stopped(_));
            let vm = VmEntry::new(name.clone(), rec.clone(), self.state.clone(), false);
            lock(&self.vms).insert(name.clone(), vm.clone());
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

    fn adopt(&self, vm: &Arc<VmEntry>, rec: &VmRecord) -> Result<(), String> {
        // Standby backends end with the daemon that held their connections.
        for b in lock(&vm.record).backends.iter_mut() {
            b.standby_pid = None;
        }
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

/// Creates the guest-RAM memfd, sized and sealed.
fn create_guest_memfd(size: u64) -> std::io::Result<File> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(
        c"bulkhead-guest-ram",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let file = File::from(fd);
    file.set_len(size)?;
    core_vmm::memory::seal(&file)?;
    Ok(file)
}

fn summary(vm: &VmEntry) -> VmSummary {
    let rec = vm.snapshot();
    let live = !matches!(rec.state, VmState::Stopped(_));
    VmSummary {
        name: vm.name.clone(),
        id: rec.id,
        state: rec.state.clone(),
        vcpus: rec.spec.vcpus,
        memory_mib: rec.spec.memory >> 20,
        owner: rec.spec.owner,
        runner_pid: rec.runner_pid.filter(|_| live),
        uptime_secs: vm.uptime(),
    }
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

/// What a device's backend process is started with (the same on every restart).
struct BackendLaunch {
    /// The backend binary.
    binary: PathBuf,
    /// Device-specific arguments.
    args: Vec<String>,
    /// The image or tap, handed as fd 4.
    resource: OwnedFd,
    /// Its uid (= gid).
    uid: u32,
    /// When it is restarted.
    policy: vmconfig::RestartPolicy,
}

impl BackendLaunch {
    /// What the slot starts its device's backend with.
    fn from_slot(slot: &vm::DeviceSlot, device: &str) -> Result<Self, String> {
        Ok(Self {
            binary: slot.binary.clone(),
            args: slot.args.clone(),
            resource: slot
                .resource
                .try_clone()
                .map_err(|e| format!("{device}: {e}"))?,
            uid: slot.uid,
            policy: slot.policy,
        })
    }
}

/// How `info` describes a device's backend process.
fn backend_words(b: &state::BackendRecord) -> String {
    let binary = Path::new(&b.binary)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut s = format!(
        ", {binary} pid {} uid {} ({}), restarts {}",
        b.pid, b.uid, b.binary, b.restarts
    );
    if !b.restart_policy.is_empty() {
        s.push_str(&format!(", restart {}", b.restart_policy));
    }
    if let Some(p) = b.standby_pid {
        s.push_str(&format!(", standby pid {p}"));
    }
    if let Some(e) = &b.last_exit {
        s.push_str(&format!(", last exit: {e}"));
    }
    if let Some(f) = &b.failed {
        s.push_str(&format!(", FAILED: {f}"));
    }
    if let Some(f) = &b.stopped {
        s.push_str(&format!(", STOPPED: {f}"));
    }
    s
}

fn state_word(s: &VmState) -> String {
    match s {
        VmState::Starting => "starting".into(),
        VmState::Running => "running".into(),
        VmState::Paused => "paused".into(),
        VmState::Stopped(r) => format!("stopped ({})", describe(r)),
    }
}
