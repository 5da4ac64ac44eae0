//! Bulkhead's per-VM runner: one VM's vCPUs on KVM, its boot loaders and its legacy devices.
//!
//! The `bulkhead-runner` binary is a thin command line around [`vm::Vm`]; the control domain
//! will drive the same library through `ipc`. Guest RAM is a memfd ([`memory::GuestRam`]) so
//! that other processes (control domain, device backends) can map it too.

pub mod boot;
pub mod config;
pub mod control;
pub mod cpu;
pub mod cpu_template;
pub mod devices;
pub mod i8042;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod pci;
pub mod reconnect;
pub mod sandbox;
pub mod snapshot;
pub mod vhost_link;
pub mod virtio_pci;
pub mod vm;
pub mod watchdog;

pub use config::{parse_memory_size, VmConfig};
pub use vm::{Vm, VmError, VmOutcome};
