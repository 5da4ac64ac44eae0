//! The connection loops for the network backend, on the machinery shared with the disk
//! backend ([`crate::vhost_common`]): standalone (one frontend after another, the tap kept
//! open) or sandboxed on one inherited connected socket.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use crate::vhost_common::{bind_path, ServeError};

use super::backend::NetBackend;
use super::config::NetConfig;
use super::stats::{NetStats, RxSkip, TxDrop};
use super::tap::Tap;

const PROG: &str = "bulkhead-net";

/// What every connection shares: the tap, the config and the counters.
#[derive(Clone)]
pub struct Device {
    /// The tap.
    pub tap: Arc<Tap>,
    /// MAC and offered features.
    pub config: NetConfig,
    /// Counters, kept across connections.
    pub stats: Arc<NetStats>,
}

impl Device {
    /// A daemon for one connection, with the tap wired to its worker's epoll.
    fn daemon(&self) -> Result<VhostUserDaemon<NetBackend>, ServeError> {
        let backend = NetBackend::new(self.tap.clone(), self.config, self.stats.clone());
        let daemon = VhostUserDaemon::new(
            PROG.to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        let handler = handlers
            .first()
            .ok_or_else(|| ServeError::Daemon("no vring worker".into()))?;
        backend.set_poller(handler);
        backend
            .register_timer(handler)
            .map_err(|e| ServeError::Daemon(format!("TX timer: {e}")))?;
        Ok(daemon)
    }

    /// Logs the counters.
    pub fn log_stats(&self) {
        let s = self.stats.snapshot();
        let tx_drops: u64 = s.tx_drops.iter().sum();
        let rx_skips: u64 = s.rx_skips.iter().sum();
        eprintln!(
            "bulkhead-net: totals: tx {} packets {} bytes, {} dropped (broken {}, writable {}, outside RAM {}, short header {}, too long {}, tap refused {}, foreign source MAC {}); \
             rx {} packets {} bytes, {} frames dropped, {} chains skipped (broken {}, read-only {}, outside RAM {}, too small {})",
            s.tx_packets,
            s.tx_bytes,
            tx_drops,
            s.tx_drop(TxDrop::BrokenChain),
            s.tx_drop(TxDrop::Writable),
            s.tx_drop(TxDrop::OutsideMemory),
            s.tx_drop(TxDrop::ShortHeader),
            s.tx_drop(TxDrop::TooLong),
            s.tx_drop(TxDrop::Tap),
            s.tx_drop(TxDrop::ForeignMac),
            s.rx_packets,
            s.rx_bytes,
            s.rx_dropped,
            rx_skips,
            s.rx_skip(RxSkip::BrokenChain),
            s.rx_skip(RxSkip::ReadOnly),
            s.rx_skip(RxSkip::OutsideMemory),
            s.rx_skip(RxSkip::TooSmall),
        );
    }
}

/// Serves frontends on `listener` one after another, forever. The tap stays open.
pub fn serve_listener(device: &Device, listener: &mut Listener) -> Result<(), ServeError> {
    crate::vhost_common::serve_listener(
        PROG,
        listener,
        || device.daemon().map(|d| (d, None)),
        || device.log_stats(),
    )
}

/// Serves the one frontend on the far end of `conn`, with the seccomp allowlist installed
/// once setup is done (if `sandbox`). Returns when the frontend disconnects.
pub fn serve_connected(device: &Device, conn: UnixStream, sandbox: bool) -> Result<(), ServeError> {
    crate::vhost_common::check_inherited_peer(&conn)?;
    let daemon = device.daemon()?;
    crate::vhost_common::serve_connected(PROG, daemon, None, conn, || {
        if sandbox {
            super::sandbox::install_seccomp()?;
        }
        Ok(())
    })?;
    device.log_stats();
    Ok(())
}
