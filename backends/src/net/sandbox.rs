//! The network backend's seccomp allowlist (kept as data in `backends/seccomp/net.json`),
//! installed on every thread in `--socket-fd` mode once setup is done.

pub use crate::vhost_common::SandboxError;

/// The allowlist, as a reviewer reads it.
pub const NET_SECCOMP_JSON: &str = include_str!("../../seccomp/net.json");

/// Compiles the allowlist.
pub fn compile() -> Result<seccompiler::BpfProgram, SandboxError> {
    crate::vhost_common::compile_seccomp(NET_SECCOMP_JSON, "net.json", "net")
}

/// Compiles the allowlist and installs it on every thread of the process (threads created
/// later inherit it).
pub fn install_seccomp() -> Result<(), SandboxError> {
    crate::vhost_common::install_seccomp(NET_SECCOMP_JSON, "net.json", "net")
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
            "\"bind\"",
            "\"execve\"",
        ] {
            assert!(
                !super::NET_SECCOMP_JSON.contains(&format!("\"syscall\": {bad}")),
                "{bad} must not be allowed"
            );
        }
        // ioctl is allowed only for the two tap requests.
        assert!(super::NET_SECCOMP_JSON.contains(&libc::TUNSETVNETHDRSZ.to_string()));
        assert!(super::NET_SECCOMP_JSON.contains(&libc::TUNSETOFFLOAD.to_string()));
    }
}
