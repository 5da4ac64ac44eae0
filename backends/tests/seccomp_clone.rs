//! Each backend's seccomp lists, installed in a forked child as a sandboxed backend installs
//! them: a new namespace cannot be had, by `clone` (EPERM) or `clone3` (ENOSYS, so glibc
//! falls back to `clone` for threads). That threads are still created is shown by every
//! end-to-end suite, whose sandboxed backends start theirs after the filters.

use bulkhead_backends::blk::sandbox::BLK_SECCOMP_JSON;
use bulkhead_backends::net::sandbox::NET_SECCOMP_JSON;
use bulkhead_backends::vhost_common::compile_seccomp;

/// Child exit codes: which probe broke the rule.
const CLONE_NEWUSER_NOT_EPERM: i32 = 10;
const CLONE3_NOT_ENOSYS: i32 = 11;
const INSTALL_FAILED: i32 = 12;

fn check(json: &str, file: &'static str, main: &'static str, companion: &'static str) {
    // Compiled here, before the fork: the child only makes system calls.
    let main = compile_seccomp(json, file, main).expect("compile main filter");
    let clone3 = compile_seccomp(json, file, companion).expect("compile clone3 filter");
    // SAFETY: the child calls only async-signal-safe functions (seccomp(2) through
    // seccompiler's apply_filter, which builds its argument on the stack, raw syscalls,
    // __errno_location and _exit) before it exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: see above; every path ends in _exit.
        unsafe {
            if seccompiler::apply_filter(&clone3).is_err()
                || seccompiler::apply_filter(&main).is_err()
            {
                libc::_exit(INSTALL_FAILED);
            }
            let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
            let r = libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize);
            if r == 0 {
                libc::_exit(0);
            }
            if r != -1 || *libc::__errno_location() != libc::EPERM {
                libc::_exit(CLONE_NEWUSER_NOT_EPERM);
            }
            let mut args = [0u64; 11];
            args[0] = libc::CLONE_NEWUSER as u64;
            args[4] = libc::SIGCHLD as u64;
            let r = libc::syscall(libc::SYS_clone3, args.as_mut_ptr(), 88usize);
            if r == 0 {
                libc::_exit(0);
            }
            if r != -1 || *libc::__errno_location() != libc::ENOSYS {
                libc::_exit(CLONE3_NOT_ENOSYS);
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status),
        "{file}: child ended by a signal: {status}"
    );
    let code = libc::WEXITSTATUS(status);
    assert_eq!(
        code,
        0,
        "{file}: {}",
        match code {
            CLONE_NEWUSER_NOT_EPERM => "clone(CLONE_NEWUSER) was not refused with EPERM",
            CLONE3_NOT_ENOSYS => "clone3 was not answered ENOSYS",
            INSTALL_FAILED => "the filters could not be installed",
            _ => "unexpected",
        }
    );
}

#[test]
fn blk_lists_refuse_new_namespaces() {
    check(BLK_SECCOMP_JSON, "blk.json", "blk", "blk_clone3");
}

#[test]
fn net_lists_refuse_new_namespaces() {
    check(NET_SECCOMP_JSON, "net.json", "net", "net_clone3");
}
