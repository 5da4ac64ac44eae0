//! Device backends as separate sandboxed vhost-user processes: `bulkhead-blk` and `bulkhead-net`.
//!
//! Empty until the disk and network issues land.
