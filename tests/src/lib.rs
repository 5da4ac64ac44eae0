//! End-to-end suites that boot real guests under `bulkhead-runner` (and, for comparison,
//! QEMU), plus the build of the bare-metal test guest (`tests/guest`, see its README).

/// Absolute path of the test guest ELF built by `build.rs` (also found at
/// `target/guest/x86_64-unknown-linux-gnu/release/bulkhead-test-guest`).
pub const TEST_GUEST: &str = env!("BULKHEAD_TEST_GUEST");

/// Lines the test guest prints (prefixes; see tests/guest/README.md).
pub mod lines {
    /// First line, right after boot.
    pub const BOOT: &str = "bulkhead-test-guest: boot";
    /// `cmdline: <command line>`.
    pub const CMDLINE: &str = "cmdline: ";
    /// `ram-top: <N> MiB`.
    pub const RAM_TOP: &str = "ram-top: ";
    /// `ram-usable: <N> KiB`.
    pub const RAM_USABLE: &str = "ram-usable: ";
    /// `checksum: 0x<16 hex digits>`.
    pub const CHECKSUM: &str = "checksum: 0x";
    /// `echo: ready` / `echo: done`.
    pub const ECHO_READY: &str = "echo: ready";
    /// See [`ECHO_READY`].
    pub const ECHO_DONE: &str = "echo: done";
    /// `panic: ...` (the guest then exits with status 101).
    pub const PANIC: &str = "panic: ";
}

/// The exit status QEMU's `isa-debug-exit` reports for a guest `exit=<v>`.
pub const fn qemu_exit_status(v: u8) -> i32 {
    ((v as i32) << 1) | 1
}

/// Parses `cpus: <N> up` / `cpus: <N> expected (...)` into N.
pub fn parse_cpus(line: &str, what: &str) -> Option<u32> {
    let rest = line.trim_end().strip_prefix("cpus: ")?;
    let (n, tail) = rest.split_once(' ')?;
    if tail.starts_with(what) {
        n.parse().ok()
    } else {
        None
    }
}

/// Parses `checksum: 0x...` into its value.
pub fn parse_checksum(line: &str) -> Option<u64> {
    let hex = line.trim_end().strip_prefix(lines::CHECKSUM)?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_exists() {
        assert!(std::path::Path::new(TEST_GUEST).is_file(), "{TEST_GUEST}");
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_cpus("cpus: 4 expected (madt)", "expected"), Some(4));
        assert_eq!(parse_cpus("cpus: 2 up\r", "up"), Some(2));
        assert_eq!(parse_cpus("cpus: 2 up", "expected"), None);
        assert_eq!(
            parse_checksum("checksum: 0x01341ea929ce0499\r"),
            Some(0x01341ea929ce0499)
        );
        assert_eq!(qemu_exit_status(7), 15);
    }
}
