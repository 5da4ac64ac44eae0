//! Device backends as separate sandboxed vhost-user processes: `bulkhead-blk` (disk) now,
//! `bulkhead-net` when the network issue lands.

pub mod blk;
