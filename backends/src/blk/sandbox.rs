//! The disk backend's seccomp allowlist (kept as data in `backends/seccomp/blk.json`),
//! installed on every thread in `--socket-fd` mode once setup is done.

pub use crate::vhost_common::SandboxError;

/// The allowlist, as a reviewer reads it.
pub const BLK_SECCOMP_JSON: &str = include_str!("../../seccomp/blk.json");

/// Compiles the allowlist.
pub fn compile() -> Result<seccompiler::BpfProgram, SandboxError> {
    crate::vhost_common::compile_seccomp(BLK_SECCOMP_JSON, "blk.json", "blk")
}

/// Compiles the allowlist and installs it on every thread of the process (threads created
/// later inherit it).
pub fn install_seccomp() -> Result<(), SandboxError> {
    crate::vhost_common::install_seccomp(BLK_SECCOMP_JSON, "blk.json", "blk")
}

#[cfg(test)]
mod tests {
    #[test]
    fn allowlist_compiles_and_denies_the_obvious() {
        assert!(super::compile().is_ok());
        for bad in [
            "\"open\"",
            "\"openat\"",
            "\"socket\"",
            "\"connect\"",
            "\"execve\"",
        ] {
            assert!(
                !super::BLK_SECCOMP_JSON.contains(&format!("\"syscall\": {bad}")),
                "{bad} must not be allowed"
            );
        }
    }
}
