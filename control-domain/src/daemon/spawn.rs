//! Spawning a runner into its sandbox — every privileged step is here, in the control domain:
//! new mount, pid, net, ipc and uts namespaces; only the handed fds; tight rlimits; a dedicated
//! uid/gid with no supplementary groups (address space sized from the VM's memory);
//! `no_new_privs`; then, once the runner has started,
//! its root is replaced by an empty read-only tmpfs. (The runner adds its own seccomp filter.)

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Who and what a sandboxed process becomes.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// uid and gid.
    pub uid: u32,
    /// Thread/process limit for that uid.
    pub max_threads: u64,
    /// Host name inside its UTS namespace.
    pub hostname: String,
    /// Largest file it may write (RLIMIT_FSIZE): its log, and for a disk backend its image,
    /// whose size the control domain fixed when it opened it.
    pub max_file_size: u64,
    /// Largest address space (RLIMIT_AS), sized from the VM's memory: a process that
    /// runs away allocates up to this and no more.
    pub max_address_space: u64,
}

/// Address space a runner may use besides guest RAM: its threads' stacks, the C
/// library's per-thread heaps, KVM's per-vCPU mappings (measured: about 700 MiB of
/// mappings with 2 vCPUs), with room to spare.
pub const RUNNER_OVERHEAD: u64 = 2 << 30;
/// More per vCPU (its thread's stack and heap, its KVM run area).
pub const RUNNER_PER_VCPU: u64 = 256 << 20;
/// Address space a device backend may use besides guest RAM (which it maps whole): its
/// queue threads, I/O pool and rings (measured: about 1.1 GiB of mappings for a disk).
pub const BACKEND_OVERHEAD: u64 = 3 << 30;

/// The address-space limit of a runner for a VM with `memory` bytes of RAM and `vcpus`.
pub fn runner_address_space(memory: u64, vcpus: u8) -> u64 {
    memory
        .saturating_add(RUNNER_OVERHEAD)
        .saturating_add(RUNNER_PER_VCPU.saturating_mul(u64::from(vcpus)))
}

/// The address-space limit of a device backend of a VM with `memory` bytes of RAM.
pub fn backend_address_space(memory: u64) -> u64 {
    memory.saturating_add(BACKEND_OVERHEAD)
}

/// A process spawned into a sandbox: its pid and a pidfd, taken before anything could
/// reap it, through which it is reached from then on (no pid-reuse races).
#[derive(Debug)]
pub struct SandboxedChild {
    /// Its pid in our pid namespace.
    pub pid: i32,
    /// A pidfd for it.
    pub pidfd: OwnedFd,
}

/// What RLIMIT_FSIZE allows a process that writes only its log.
pub const LOG_FILE_LIMIT: u64 = 64 << 20;

/// Who and what a runner becomes.
#[derive(Debug, Clone)]
pub struct RunnerSandbox {
    /// uid and gid.
    pub uid: u32,
    /// vCPU count (sizes the thread and address-space limits).
    pub vcpus: u8,
    /// Guest RAM, bytes (sizes the address-space limit).
    pub memory: u64,
    /// Host name inside its UTS namespace.
    pub hostname: String,
    /// Ask the runner to run its sandbox self-test at boot (tests only).
    pub selftest: bool,
}

fn cstr(s: &[u8]) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| std::io::Error::other("NUL byte in a spawn argument"))
}

/// Writes `msg` to the log fd (2) and exits the child; for use after clone only.
fn child_fail(msg: &[u8]) -> isize {
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut digits = [b'0'; 4];
    let mut e = errno.unsigned_abs();
    for d in digits.iter_mut().rev() {
        *d = b'0' + (e % 10) as u8;
        e /= 10;
    }
    // SAFETY: write/_exit are async-signal-safe; the buffers are valid for their lengths.
    unsafe {
        libc::write(2, b"bulkheadd: sandbox setup failed: ".as_ptr().cast(), 33);
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::write(2, b" (errno ".as_ptr().cast(), 8);
        libc::write(2, digits.as_ptr().cast(), digits.len());
        libc::write(2, b")\n".as_ptr().cast(), 2);
        libc::_exit(126)
    }
}

/// Starts `runner` in a fresh sandbox with `listener` as fd 3 and `log` as stdout/stderr.
/// Returns its pid (in our pid namespace). The runner's root is still the host's until
/// [`seal_root`] runs; it must not act on anything before that (it waits for `Boot`).
pub fn spawn_runner(
    runner: &Path,
    listener: OwnedFd,
    log: File,
    sb: &RunnerSandbox,
) -> std::io::Result<SandboxedChild> {
    let mut args = vec!["--control-fd".to_string(), "3".to_string()];
    if sb.selftest {
        args.push("--sandbox-selftest".into());
    }
    let sandbox = Sandbox {
        uid: sb.uid,
        max_threads: u64::from(sb.vcpus) + 64,
        hostname: sb.hostname.clone(),
        max_file_size: LOG_FILE_LIMIT,
        max_address_space: runner_address_space(sb.memory, sb.vcpus),
    };
    spawn_sandboxed(runner, &args, vec![listener], log, &sandbox)
}

/// Starts `binary` with `args` in a fresh sandbox: new mount, pid, net, ipc and uts
/// namespaces, `sandbox.uid` as uid and gid with no supplementary groups, `no_new_privs`,
/// tight rlimits, stdin `/dev/null`, stdout/stderr `log`, and `handed` as fds 3, 4, ... —
/// nothing else. The binary is executed by fd (the uid needs no path to it).
pub fn spawn_sandboxed(
    binary: &Path,
    args: &[String],
    handed: Vec<OwnedFd>,
    log: File,
    sandbox: &Sandbox,
) -> std::io::Result<SandboxedChild> {
    let exe = cstr(binary.as_os_str().as_bytes())?;
    let mut cargs = vec![exe];
    for a in args {
        cargs.push(cstr(a.as_bytes())?);
    }
    let argv: Vec<*const libc::c_char> = cargs
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let binary_file = File::open(binary)?;
    let mut sources = vec![devnull.as_raw_fd(), log.as_raw_fd(), log.as_raw_fd()];
    sources.extend(handed.iter().map(|f| f.as_raw_fd()));
    sources.push(binary_file.as_raw_fd());
    let exe_fd = (sources.len() - 1) as i32;
    let mut high = vec![0i32; sources.len()];
    let empty = cstr(b"")?;
    let hostname = sandbox.hostname.as_bytes().to_vec();
    let uid = sandbox.uid;
    let threads = sandbox.max_threads;
    let max_file_size = sandbox.max_file_size;
    let max_address_space = sandbox.max_address_space;
    let root = cstr(b"/")?;
    let mut stack = vec![0u8; 256 * 1024];

    let child = Box::new(move || -> isize {
        // SAFETY: this runs in the cloned child (a copy of the parent, single-threaded);
        // only raw syscalls follow, all on buffers prepared before the clone.
        unsafe {
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return child_fail(b"making mounts private");
            }
            if libc::sethostname(hostname.as_ptr().cast(), hostname.len()) != 0 {
                return child_fail(b"sethostname");
            }
            libc::setsid();
            // Move the handed fds out of the way, then into 0, 1, 2, 3, ...
            for (i, src) in sources.iter().enumerate() {
                high[i] = libc::fcntl(*src, libc::F_DUPFD, 100);
                if high[i] < 0 {
                    return child_fail(b"dup of a handed fd");
                }
            }
            for (target, fd) in high.iter().enumerate() {
                if libc::dup2(*fd, target as i32) < 0 {
                    return child_fail(b"dup2 of a handed fd");
                }
            }
            if libc::fcntl(exe_fd, libc::F_SETFD, libc::FD_CLOEXEC) != 0 {
                return child_fail(b"cloexec on the binary");
            }
            // Everything else is closed: the process holds only what it was handed.
            if libc::syscall(libc::SYS_close_range, (exe_fd + 1) as u32, u32::MAX, 0u32) != 0 {
                return child_fail(b"close_range");
            }
            let limits: [(libc::__rlimit_resource_t, u64); 6] = [
                (libc::RLIMIT_NOFILE, 256),
                (libc::RLIMIT_NPROC, threads),
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_FSIZE, max_file_size),
                (libc::RLIMIT_MEMLOCK, 64 << 10),
                (libc::RLIMIT_AS, max_address_space),
            ];
            for (res, v) in limits {
                let lim = libc::rlimit {
                    rlim_cur: v,
                    rlim_max: v,
                };
                if libc::setrlimit(res, &lim) != 0 {
                    return child_fail(b"setrlimit");
                }
            }
            // Raw syscalls, not glibc's wrappers: those broadcast the change to every thread
            // glibc believes the process has (setxid), and the clone copied the parent's
            // thread list — waiting for threads that do not exist here deadlocks.
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
                return child_fail(b"setgroups");
            }
            if libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0 {
                return child_fail(b"setresgid");
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                return child_fail(b"setresuid");
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return child_fail(b"no_new_privs");
            }
            libc::syscall(
                libc::SYS_execveat,
                exe_fd,
                empty.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            child_fail(b"execveat")
        }
    });
    let flags = nix::sched::CloneFlags::CLONE_NEWNS
        | nix::sched::CloneFlags::CLONE_NEWPID
        | nix::sched::CloneFlags::CLONE_NEWNET
        | nix::sched::CloneFlags::CLONE_NEWIPC
        | nix::sched::CloneFlags::CLONE_NEWUTS;
    // SAFETY: the child only makes raw syscalls on data prepared above and then execs or
    // exits; it never returns into the parent's Rust state.
    let pid = unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(std::io::Error::from)?
        .as_raw();
    drop(devnull);
    drop(binary_file);
    drop(log);
    drop(handed);
    // Our unreaped child: the pid cannot have been reused yet.
    match pidfd_open(pid) {
        Ok(pidfd) => Ok(SandboxedChild { pid, pidfd }),
        Err(e) => {
            // SAFETY: plain syscalls on our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            Err(std::io::Error::other(format!(
                "pidfd_open of the sandboxed child: {e}"
            )))
        }
    }
}

/// Replaces the running runner's root (and cwd) with an empty, read-only tmpfs mounted on
/// `mount_point` inside its mount namespace, and detaches the host's tree from it. The
/// namespace is entered through the process's pidfd (`setns` on a pidfd), never through
/// `/proc/PID`: should it have died, this fails rather than enter another's.
pub fn seal_root(pidfd: std::os::fd::BorrowedFd<'_>, mount_point: &Path) -> std::io::Result<()> {
    let ns = pidfd;
    let mp = cstr(mount_point.as_os_str().as_bytes())?;
    let tmpfs = cstr(b"tmpfs")?;
    let opts = cstr(b"size=16k,mode=0555,nr_inodes=8")?;
    let dot = cstr(b".")?;
    let slash = cstr(b"/")?;
    // SAFETY: fork in the (multi-threaded) daemon; the child makes only raw syscalls on
    // buffers prepared above, then _exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: child of fork: async-signal-safe syscalls only, then _exit.
        unsafe {
            let step = |ok: bool, code: i32| {
                if !ok {
                    libc::_exit(code);
                }
            };
            step(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) == 0, 10);
            step(
                libc::mount(
                    tmpfs.as_ptr(),
                    mp.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    opts.as_ptr().cast(),
                ) == 0,
                11,
            );
            step(libc::chdir(mp.as_ptr()) == 0, 12);
            step(
                libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) == 0,
                13,
            );
            step(libc::umount2(dot.as_ptr(), libc::MNT_DETACH) == 0, 14);
            step(libc::chdir(slash.as_ptr()) == 0, 15);
            step(
                libc::mount(
                    std::ptr::null(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT
                        | libc::MS_BIND
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) == 0,
                16,
            );
            libc::_exit(0);
        }
    }
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None)
        .map_err(std::io::Error::from)?;
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        other => {
            let step = match other {
                nix::sys::wait::WaitStatus::Exited(_, 10) => "setns into its mount namespace",
                nix::sys::wait::WaitStatus::Exited(_, 11) => "mounting the empty tmpfs",
                nix::sys::wait::WaitStatus::Exited(_, 13) => "pivot_root",
                nix::sys::wait::WaitStatus::Exited(_, 14) => "detaching the host tree",
                nix::sys::wait::WaitStatus::Exited(_, 16) => "remounting the root read-only",
                _ => "an unexpected step",
            };
            Err(std::io::Error::other(format!(
                "sealing the runner's root failed at {step} ({other:?})"
            )))
        }
    }
}

/// A pidfd for `pid` (to signal a runner we did not spawn without pid-reuse races).
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the return value is a new fd that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Sends SIGKILL through a pidfd.
pub fn pidfd_kill(pidfd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: plain syscall on a pidfd we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            0usize,
            0u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A copy of descriptor `fd` of the process behind `pidfd` (a re-adopted backend's image
/// or tap, so it is never reopened by path).
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall on a pidfd we own; on success the return value is a new fd
    // (close-on-exec) that we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0u32) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `r` was just returned by pidfd_getfd and is owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r as i32) })
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable then).
pub fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    use std::os::fd::AsFd;
    let mut pfd = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}
