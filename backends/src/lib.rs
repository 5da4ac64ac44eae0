//! Device backends as separate sandboxed vhost-user processes: `bulkhead-blk` (disk) and
//! `bulkhead-net` (network), sharing their connection loops in [`vhost_common`].

pub mod blk;
pub mod cli;
pub mod inflight;
pub mod net;
pub mod ratelimit;
pub mod vhost_common;
