//! `bulkhead-net`: a vhost-user-net backend over one tap fd (opened by `bulkheadd`, with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), one RX and one TX queue.
//!
//! - [`config`]: feature bits, the `virtio_net_config` space, the MAC, header size and the
//!   mapping of negotiated guest offloads onto the tap;
//! - [`tap`]: the tap fd (non-blocking frame I/O and the two per-fd ioctls);
//! - [`tx`]: validation of TX chains and their transmission to the tap;
//! - [`rx`]: delivery of frames read from the tap into RX chains (mergeable buffers);
//! - [`stats`]: packet/byte/drop counters (also in bulkheadd's shared page) and the
//!   rate-limited log;
//! - [`throttle`]: the rate limit of one direction (token buckets, a timerfd wakeup);
//! - [`backend`]: the `VhostUserBackend` glue (queues, the tap in the worker's epoll);
//! - [`serve`]: the connection loops (standalone listener, or an inherited connected socket);
//! - [`sandbox`]: the seccomp allowlist installed in `--socket-fd` mode.

pub mod backend;
pub mod config;
pub mod rx;
pub mod sandbox;
pub mod serve;
pub mod stats;
pub mod tap;
pub mod throttle;
pub mod tx;

pub use backend::NetBackend;
pub use config::{parse_mac, NetConfig};
pub use stats::{NetStats, RxSkip, TxDrop, TX_DROPS};
pub use tap::Tap;
