//! The connection loops for the disk backend: a standalone listener that serves one frontend
//! after another, and the sandboxed mode that serves one already connected socket inherited
//! from `bulkheadd`. The machinery (the relay for inherited sockets) is shared with the
//! network backend in [`crate::vhost_common`].

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use crate::vhost_common::{bind_path, ServeError};

use super::backend::BlkBackend;
use super::disk::Disk;
use super::engine::EngineKind;
use super::request::ID_LEN;
use super::stats::Stats;
use crate::inflight::InflightSlot;
use bulkhead_ipc::devstats::BackendRegion;
use vmm_sys_util::epoll::EventSet;

const PROG: &str = "bulkhead-blk";

/// What every connection shares: the image, its identity and the counters.
#[derive(Clone)]
pub struct Device {
    /// The image.
    pub disk: Arc<Disk>,
    /// GET_ID answer.
    pub serial: [u8; ID_LEN],
    /// Request queues.
    pub queues: u16,
    /// Counters, kept across connections.
    pub stats: Arc<Stats>,
    /// The I/O engine each queue gets.
    pub engine: EngineKind,
    /// The most a queue worker polls before it sleeps (`--poll-us`).
    pub poll: std::time::Duration,
    /// The host's runnable-thread count (no polling while it exceeds the CPUs).
    pub host_load: Option<Arc<super::poll::HostLoad>>,
    /// The shared counters and limits page bulkheadd handed us (`--stats-fd`), if any.
    pub region: Option<Arc<BackendRegion>>,
}

impl Device {
    /// A daemon for one connection, and the slot its relay fills with the frontend's
    /// in-flight region.
    fn daemon(&self) -> Result<(VhostUserDaemon<BlkBackend>, Arc<InflightSlot>), ServeError> {
        let slot = Arc::new(InflightSlot::default());
        let backend = BlkBackend::new(
            self.disk.clone(),
            self.serial,
            self.queues,
            self.stats.clone(),
            slot.clone(),
            self.engine,
            self.region.clone(),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        backend.set_polling(self.poll, self.host_load.clone());
        let timers = backend.timer_fds();
        let event = backend.timer_event();
        let daemon = VhostUserDaemon::new(
            PROG.to_string(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        // One worker thread per queue, in queue order: each hears its queue's timer.
        for (handler, fd) in daemon.get_epoll_handlers().iter().zip(timers) {
            handler
                .register_listener(fd, EventSet::IN, event)
                .map_err(|e| ServeError::Daemon(format!("queue timer: {e}")))?;
        }
        Ok((daemon, slot))
    }

    fn log_stats(&self) {
        let s = self.stats.snapshot();
        eprintln!(
            "bulkhead-blk: totals: {} requests, {} errors, {} broken chains, {} bytes read, {} bytes written",
            s.requests, s.errors, s.broken, s.bytes_read, s.bytes_written
        );
        let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "bulkhead-blk: polling: {} spins found work, {} ran out their window, {} were preempted, {} skipped (host short of CPUs)",
            n(&self.stats.poll_found),
            n(&self.stats.poll_expired),
            n(&self.stats.poll_preempted),
            n(&self.stats.poll_skipped)
        );
    }
}

/// Serves frontends on `listener` one after another, forever. The image stays open.
pub fn serve_listener(device: &Device, listener: &mut Listener) -> Result<(), ServeError> {
    crate::vhost_common::serve_listener(
        PROG,
        listener,
        || device.daemon().map(|(d, slot)| (d, Some(slot))),
        || device.log_stats(),
    )
}

/// Serves the one frontend on the far end of `conn`, with the seccomp allowlist installed
/// once setup is done (if `sandbox`). Returns when the frontend disconnects.
pub fn serve_connected(device: &Device, conn: UnixStream, sandbox: bool) -> Result<(), ServeError> {
    crate::vhost_common::check_inherited_peer(&conn)?;
    let (daemon, slot) = device.daemon()?;
    crate::vhost_common::serve_connected(PROG, daemon, Some(slot), conn, || {
        if sandbox {
            super::sandbox::install_seccomp()?;
        }
        Ok(())
    })?;
    device.log_stats();
    Ok(())
}
