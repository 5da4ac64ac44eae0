//! Starting one backend process: its vhost-user socket (a listener with the runner's
//! connection already queued), its log, its sandbox (uid, namespaces, seccomp, empty root)
//! and the wait for its "ready" byte, after which its root is sealed. Knows nothing of
//! restarts: [`super::Supervisor`] decides when to call it.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::daemon::spawn;
use crate::daemon::state::StateDir;
use crate::daemon::vmconfig::RestartPolicy;

/// What a device's backend process is started with (the same on every restart).
pub struct BackendLaunch {
    /// The backend binary.
    pub binary: PathBuf,
    /// Device-specific arguments.
    pub args: Vec<String>,
    /// The image or tap, handed as fd 4.
    pub resource: OwnedFd,
    /// Its uid (= gid).
    pub uid: u32,
    /// When it is restarted.
    pub policy: RestartPolicy,
    /// The device's shared counters and limits page (a memfd from
    /// [`bulkhead_ipc::devstats::create`]), handed as fd 6 with `--stats-fd 6`; None for a
    /// backend that takes none.
    pub stats: Option<OwnedFd>,
    /// The limits written in that page when the device is added.
    pub limits: bulkhead_ipc::devstats::Limits,
}

/// A backend process that was spawned and has not yet said it is ready.
pub struct Spawned {
    /// Its pid (our child; unreaped until its watcher reaps it).
    pub pid: i32,
    /// A pidfd for it, taken at the spawn.
    pub pidfd: OwnedFd,
    /// The runner's end of its vhost-user connection.
    pub conn: UnixStream,
    /// The read end of its ready pipe.
    ready: File,
    /// Its log's file name under `STATE/logs`.
    log_name: String,
}

/// How long a new backend may take to say it runs.
const READY_TIMEOUT_MS: u16 = 30_000;

/// Spawns `binary` for `vm`'s `device` in its sandbox with fd 3 = a listener holding the
/// runner's queued connection, fd 4 = `resource` (image or tap), fd 5 = a ready pipe, fd 6
/// = `stats` (the device's shared counters page) if given. A
/// device's log starts with the VM (`fresh_log`); each later process appends to it, so the
/// log tells the device's whole history.
#[allow(clippy::too_many_arguments)]
pub fn spawn_backend(
    state: &StateDir,
    vm: &str,
    device: &str,
    binary: &Path,
    extra_args: &[String],
    resource: OwnedFd,
    stats: Option<OwnedFd>,
    uid: u32,
    standby: bool,
    fresh_log: bool,
    guest_memory: u64,
) -> Result<Spawned, String> {
    // The backend accepts the queued connection and closes the listener, so it ends up
    // holding one socket, the vhost-user connection. A name of its own: a standby and a
    // serving backend of one device may be started at the same time, and each must connect
    // to its own listener.
    static SPAWNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SPAWNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = state.path().join("run").join(format!("backend-{n}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .map_err(|e| format!("{device} socket: {e}"))?;
    let conn = UnixStream::connect(&path).map_err(|e| format!("{device} socket: {e}"));
    let _ = std::fs::remove_file(&path);
    let conn = conn?;
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| format!("{device} pipe: {e}"))?;
    let log_name = format!("{vm}.{device}.log");
    let mut log_file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(!fresh_log)
        .truncate(fresh_log)
        .open(state.path().join("logs").join(&log_name))
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
    if stats.is_some() {
        args.push("--stats-fd".into());
        args.push("6".into());
    }
    args.extend(extra_args.iter().cloned());
    // A disk backend writes up to its image's end (the image cannot grow: the backend
    // refuses requests past it); every backend writes its log.
    let image_size = File::from(resource.try_clone().map_err(|e| format!("{device}: {e}"))?)
        .metadata()
        .map(|m| m.len())
        .unwrap_or(0);
    let sandbox = spawn::Sandbox {
        uid,
        // Its own threads, a disk's I/O pool and io_uring's kernel workers (which count
        // against the uid too).
        max_threads: 256,
        hostname: format!(
            "bulkhead-{}-{device}",
            vm.chars().take(32).collect::<String>()
        ),
        max_file_size: image_size.max(spawn::LOG_FILE_LIMIT),
        max_address_space: spawn::backend_address_space(guest_memory),
    };
    let mut handed = vec![OwnedFd::from(listener), resource, ready_w];
    handed.extend(stats);
    let child = spawn::spawn_sandboxed(binary, &args, handed, log_file, &sandbox)
        .map_err(|e| format!("cannot spawn {}: {e}", binary.display()))?;
    Ok(Spawned {
        pid: child.pid,
        pidfd: child.pidfd,
        conn,
        ready: File::from(ready_r),
        log_name,
    })
}

impl Spawned {
    /// Waits for the backend's ready byte (it runs: its libraries are loaded), then takes
    /// its root away. An error means it will never serve.
    pub fn await_ready(&self, state: &StateDir, device: &str) -> Result<(), String> {
        let mut pfd = [nix::poll::PollFd::new(
            self.ready.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let polled = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(READY_TIMEOUT_MS))
            .map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        if polled > 0 && std::io::Read::read(&mut &self.ready, &mut byte).unwrap_or(0) == 1 {
            spawn::seal_root(self.pidfd.as_fd(), &state.sandbox_root())
                .map_err(|e| format!("{device}: {e}"))
        } else {
            Err(format!(
                "{device} backend did not start (see logs/{})",
                self.log_name
            ))
        }
    }
}

/// Appends one line to `vm`'s `device` log (what bulkheadd did to its backends).
pub fn append_log(state: &StateDir, vm: &str, device: &str, line: &str) {
    use std::io::Write;
    let path = state.path().join("logs").join(format!("{vm}.{device}.log"));
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}
