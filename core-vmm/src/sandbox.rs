//! The runner's own half of its sandbox: the seccomp allowlist (kept as data in
//! `core-vmm/seccomp/runner.json`) and a self-test that tries what a sandboxed runner must
//! not be able to do. Namespaces, the empty root, uid/gid and rlimits are set by `bulkheadd`.

use std::ffi::CString;

/// The allowlist, as a reviewer reads it.
pub const RUNNER_SECCOMP_JSON: &str = include_str!("../seccomp/runner.json");

/// Compiles the allowlist and installs it for this thread and every thread it creates later.
pub fn install_seccomp() -> Result<(), String> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: unsupported architecture: {e:?}"))?;
    let mut filters = seccompiler::compile_from_json(RUNNER_SECCOMP_JSON.as_bytes(), arch)
        .map_err(|e| format!("seccomp: runner.json does not compile: {e}"))?;
    let filter = filters
        .remove("runner")
        .ok_or_else(|| "seccomp: runner.json has no 'runner' filter".to_string())?;
    let clone3 = filters
        .remove("runner_clone3")
        .ok_or_else(|| "seccomp: runner.json has no 'runner_clone3' filter".to_string())?;
    // First the companion that answers clone3 with ENOSYS (an errno beats the main filter's
    // ALLOW, and glibc then falls back to clone, whose flags the main filter checks); then
    // the allowlist, which leaves no seccomp() to anyone after it.
    seccompiler::apply_filter(&clone3)
        .map_err(|e| format!("seccomp: cannot install the clone3 filter: {e}"))?;
    seccompiler::apply_filter(&filter)
        .map_err(|e| format!("seccomp: cannot install the filter: {e}"))
}

/// One attempt of the self-test and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// What was tried.
    pub what: &'static str,
    /// True when the sandbox refused it.
    pub denied: bool,
    /// errno or result.
    pub detail: String,
}

fn probe(what: &'static str, ret: i64) -> Probe {
    if ret < 0 {
        Probe {
            what,
            denied: true,
            detail: std::io::Error::last_os_error().to_string(),
        }
    } else {
        Probe {
            what,
            denied: false,
            detail: format!("succeeded ({ret})"),
        }
    }
}

/// Tries to open `/etc/passwd` and `/dev/kvm` by path, create an AF_INET socket, `execve`
/// a shell and `ptrace` — each must be denied.
pub fn self_test() -> Vec<Probe> {
    let mut out = Vec::new();
    let passwd = CString::new("/etc/passwd").unwrap_or_default();
    let kvm = CString::new("/dev/kvm").unwrap_or_default();
    let sh = CString::new("/bin/sh").unwrap_or_default();
    // SAFETY: plain syscalls with valid NUL-terminated paths; any fd that opens is closed.
    unsafe {
        let fd = libc::open(passwd.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        out.push(probe("open /etc/passwd", fd.into()));
        if fd >= 0 {
            libc::close(fd);
        }
        let fd = libc::open(kvm.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        out.push(probe("open /dev/kvm by path", fd.into()));
        if fd >= 0 {
            libc::close(fd);
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        out.push(probe("socket(AF_INET)", fd.into()));
        if fd >= 0 {
            libc::close(fd);
        }
        let argv = [sh.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        let r = libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr());
        out.push(probe("execve /bin/sh", r.into()));
        let r = libc::ptrace(libc::PTRACE_ATTACH, 1, 0usize, 0usize);
        out.push(probe("ptrace(PTRACE_ATTACH, 1)", r));
        // A new user namespace, by clone and by clone3: both must be refused (a child that
        // got through anyway leaves at once).
        let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
        let r = libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize);
        if r == 0 {
            libc::_exit(0);
        }
        out.push(probe("clone(CLONE_NEWUSER)", r));
        let mut args = [0u64; 11]; // struct clone_args: flags, ..., exit_signal at [4]
        args[0] = libc::CLONE_NEWUSER as u64;
        args[4] = libc::SIGCHLD as u64;
        let r = libc::syscall(
            libc::SYS_clone3,
            args.as_mut_ptr(),
            std::mem::size_of_val(&args),
        );
        if r == 0 {
            libc::_exit(0);
        }
        out.push(probe("clone3(CLONE_NEWUSER)", r));
    }
    out
}
