//! The disk backend's seccomp allowlist (kept as data in `backends/seccomp/blk.json`),
//! installed on every thread in `--socket-fd` mode once setup is done.

/// The allowlist, as a reviewer reads it.
pub const BLK_SECCOMP_JSON: &str = include_str!("../../seccomp/blk.json");

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// This architecture is unknown to seccompiler.
    #[error("seccomp: unsupported architecture: {0}")]
    Arch(String),
    /// The JSON does not compile.
    #[error("seccomp: blk.json does not compile: {0}")]
    Compile(String),
    /// The JSON has no `blk` filter.
    #[error("seccomp: blk.json has no 'blk' filter")]
    Missing,
    /// The kernel refused the filter.
    #[error("seccomp: cannot install the filter: {0}")]
    Install(String),
}

/// Compiles the allowlist.
pub fn compile() -> Result<seccompiler::BpfProgram, SandboxError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SandboxError::Arch(format!("{e:?}")))?;
    let mut filters = seccompiler::compile_from_json(BLK_SECCOMP_JSON.as_bytes(), arch)
        .map_err(|e| SandboxError::Compile(e.to_string()))?;
    filters.remove("blk").ok_or(SandboxError::Missing)
}

/// Compiles the allowlist and installs it on every thread of the process (threads created
/// later inherit it).
pub fn install_seccomp() -> Result<(), SandboxError> {
    let filter = compile()?;
    seccompiler::apply_filter_all_threads(&filter).map_err(|e| SandboxError::Install(e.to_string()))
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
