//! Saving and restoring a running VM: the snapshot file format ([`format`], with its
//! checksum [`crc`]), the state records of the runner's components ([`state`]) and how
//! they are taken from and given back to KVM ([`kvm`]).

pub mod crc;
pub mod format;
pub mod inflight;
pub mod kvm;
pub mod mapping;
pub mod records;
