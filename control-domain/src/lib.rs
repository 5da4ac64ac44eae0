//! The control domain: `bulkheadd` (owns `/dev/kvm`, policy and the state dir) and the `bulkhead` CLI.
//!
//! Empty until the control-domain issue lands; the runner already takes an inherited
//! `/dev/kvm` fd (`--kvm-fd`) so this crate can hand it one.
