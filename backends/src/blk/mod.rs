//! `bulkhead-blk`: a vhost-user-blk backend serving one raw disk image.
//!
//! - [`disk`]: the image file and positioned I/O straight into and out of guest memory;
//! - [`request`]: validation of one virtio-blk descriptor chain, turned into an I/O for an engine;
//! - [`engine`]: the I/O engines (io_uring, a thread pool, inline) that run a queue's requests,
//!   several in flight;
//! - [`poll`]: the adaptive window a queue worker spins for before it sleeps;
//! - [`waiter`]: sleeps a queue worker with requests in flight until one completes or the
//!   guest posts more;
//! - [`config`]: the feature bits and the `virtio_blk_config` space served through GET_CONFIG;
//! - [`stats`]: request/error counters and the rate-limited log of malformed requests;
//! - [`backend`]: the `VhostUserBackend` glue (queues, notifications, config);
//! - [`serve`]: the connection loops (standalone listener, or an inherited connected socket);
//! - [`sandbox`]: the seccomp allowlist installed in `--socket-fd` mode.

pub mod backend;
pub mod config;
pub mod disk;
pub mod engine;
pub mod poll;
pub mod request;
pub mod sandbox;
pub mod serve;
pub mod stats;
pub mod waiter;

pub use backend::BlkBackend;
pub use config::BlkConfig;
pub use disk::{Cache, Disk, DiskError, SECTOR_SIZE};
pub use engine::EngineKind;
pub use stats::Stats;
