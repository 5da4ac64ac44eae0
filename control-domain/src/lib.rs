//! The control domain: `bulkheadd` (owns `/dev/kvm`, policy and the state dir, spawns and
//! supervises sandboxed runners) and the `bulkhead` CLI (a thin client of `bulkheadd`).

pub mod cli;
pub mod daemon;
