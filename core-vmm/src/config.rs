//! What a VM is made of (kernel, RAM, vCPUs) and the validation every entry point shares.

use std::path::PathBuf;

use thiserror::Error;

/// Smallest guest RAM we accept: room for the boot structures and a small kernel.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest vCPU count the MP table and our APIC-ID scheme describe.
pub const MAX_VCPUS: u8 = 254;
/// Memory size used when none is given.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// Everything needed to boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// ELF (PVH entry) or bzImage kernel.
    pub kernel: PathBuf,
    /// Optional initrd/initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
}

/// A VM configuration that cannot be run.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A snapshot's state does not fit the VM it is restored into.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// Memory size text that is not a size.
    #[error("invalid memory size '{0}': use a number with an optional K, M, G or T suffix (e.g. 256M, 1G)")]
    BadMemorySize(String),
    /// Memory too small to boot anything.
    #[error("memory {got} bytes is too small: at least {min} MiB is needed", min = MIN_MEMORY >> 20)]
    MemoryTooSmall {
        /// Requested bytes.
        got: u64,
    },
    /// Memory larger than the host has.
    #[error("memory {got_mib} MiB is more than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge {
        /// Requested MiB.
        got_mib: u64,
        /// Host RAM in MiB.
        host_mib: u64,
    },
    /// Zero or too many vCPUs.
    #[error("vcpus must be between 1 and {max}, got {0}", max = MAX_VCPUS)]
    BadVcpuCount(u64),
    /// Command line too long for the boot protocol area.
    #[error("kernel command line is {0} bytes; the limit is {max}", max = crate::layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// Command line with a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
}

/// Parses a memory size: `256M`, `1G`, `512MiB`, `1048576K`, or a plain number of MiB.
pub fn parse_memory_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadMemorySize(text.to_string());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "B" => 0,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Total RAM of this host in bytes (from `sysinfo(2)`).
pub fn host_memory() -> Option<u64> {
    nix::sys::sysinfo::sysinfo().ok().map(|s| s.ram_total())
}

impl VmConfig {
    /// Checks the parts that do not need the files: memory, vCPUs, command line.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_machine(self.memory, self.vcpus, &self.cmdline)
    }
}

/// Checks memory size, vCPU count and command line.
pub fn validate_machine(memory: u64, vcpus: u8, cmdline: &str) -> Result<(), ConfigError> {
    if memory < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall { got: memory });
    }
    if let Some(host) = host_memory() {
        if memory > host {
            return Err(ConfigError::MemoryTooLarge {
                got_mib: memory >> 20,
                host_mib: host >> 20,
            });
        }
    }
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ConfigError::BadVcpuCount(vcpus.into()));
    }
    if cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
        return Err(ConfigError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(ConfigError::CmdlineNul);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("256M"), Ok(256 << 20));
        assert_eq!(parse_memory_size("256"), Ok(256 << 20));
        assert_eq!(parse_memory_size("1G"), Ok(1 << 30));
        assert_eq!(parse_memory_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_memory_size("1K"), Ok(1024));
        assert!(parse_memory_size("").is_err());
        assert!(parse_memory_size("M").is_err());
        assert!(parse_memory_size("12Q").is_err());
        assert!(parse_memory_size("-1").is_err());
        assert!(parse_memory_size("99999999999999T").is_err());
    }

    fn cfg(memory: u64, vcpus: u8) -> VmConfig {
        VmConfig {
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            memory,
            vcpus,
        }
    }

    #[test]
    fn validation() {
        assert!(cfg(256 << 20, 1).validate().is_ok());
        assert!(matches!(
            cfg(1024, 1).validate(),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        assert!(matches!(
            cfg(1 << 50, 1).validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        assert_eq!(
            cfg(256 << 20, 0).validate(),
            Err(ConfigError::BadVcpuCount(0))
        );
    }
}
