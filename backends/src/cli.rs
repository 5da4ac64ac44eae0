//! Command-line helpers the backend binaries share: usage errors (exit status 2) and checks
//! on descriptors inherited from `bulkheadd`.

use std::os::fd::{FromRawFd, RawFd};
use std::process::ExitCode;

/// An error that means "bad arguments, image, tap or socket": exit status 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A [`Usage`] error as an `anyhow::Error`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(msg.into()))
}

/// Checks that `fd` is open and not one of the standard streams.
pub fn check_fd(fd: RawFd, what: &str) -> anyhow::Result<()> {
    if fd <= 2 {
        return Err(usage(format!("{what} {fd} is a standard stream")));
    }
    // SAFETY: F_GETFD only inspects our fd table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(usage(format!("{what} {fd} is not open")));
    }
    Ok(())
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// Whether `fd` is a unix stream socket (connected or listening).
pub fn is_unix_stream(fd: RawFd) -> bool {
    sockopt(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
}

/// Writes one byte to the inherited ready pipe `fd` (if given) and closes it: tells
/// `bulkheadd` the binary and its libraries are loaded, so it may empty our root.
pub fn signal_ready(fd: Option<RawFd>) -> anyhow::Result<()> {
    let Some(fd) = fd else {
        return Ok(());
    };
    check_fd(fd, "--ready-fd")?;
    // SAFETY: `fd` is open (checked) and handed to us to own; it is used once and closed.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    std::io::Write::write_all(&mut pipe, &[1]).map_err(|e| usage(format!("--ready-fd {fd}: {e}")))
}

/// A backend binary's `main`: parse `A` (clap's own exit status on bad usage), run, print
/// one line on failure; exit 2 for [`Usage`] errors, 1 for the rest.
pub fn main_with<A: clap::Parser>(
    prog: &str,
    run: impl FnOnce(A) -> anyhow::Result<()>,
) -> ExitCode {
    let args = match A::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prog}: {e:#}");
            ExitCode::from(if e.downcast_ref::<Usage>().is_some() {
                2
            } else {
                1
            })
        }
    }
}

/// Maps the shared counters and limits page handed as `--stats-fd` (before the seccomp
/// filter), for a device with `queues` queue records. The fd is returned to be kept open
/// while the backend runs: a restarted bulkheadd takes it back from the process.
pub fn stats_region(
    fd: Option<RawFd>,
    queues: usize,
) -> anyhow::Result<(
    Option<std::sync::Arc<bulkhead_ipc::devstats::BackendRegion>>,
    Option<std::os::fd::OwnedFd>,
)> {
    let Some(fd) = fd else {
        return Ok((None, None));
    };
    check_fd(fd, "--stats-fd")?;
    // SAFETY: `fd` is open (checked) and bulkheadd handed it to us to own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let r = bulkhead_ipc::devstats::BackendRegion::map(std::os::fd::AsFd::as_fd(&fd), queues)
        .map_err(|e| usage(format!("--stats-fd: {e}")))?;
    Ok((Some(std::sync::Arc::new(r)), Some(fd)))
}
