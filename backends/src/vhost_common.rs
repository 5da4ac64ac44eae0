//! What every vhost-user backend here shares: the connection loops (a standalone listener
//! that serves one frontend after another, and the sandboxed mode that serves one already
//! connected socket inherited from `bulkheadd`), and the seccomp helpers.
//!
//! `vhost-user-backend`'s daemon only accepts connections from a listener (its request
//! handler type is private, so it cannot be driven from a connected stream). For an inherited
//! stream, the daemon listens on a fresh, randomly named abstract unix socket, we connect to
//! it ourselves, check with a GET_FEATURES round trip that the daemon is talking to us, and
//! then relay whole vhost-user messages (header, body and attached fds) between the inherited
//! stream and that private connection. The data path (vrings, eventfds, guest memory) does
//! not go through the relay. The rendezvous needs `socket`/`bind`/`connect`, so it happens
//! before the seccomp allowlist is installed.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};

/// vhost-user header: request, flags, size.
const HDR_LEN: usize = 12;
/// Largest message body relayed (vhost-user bodies are at most a few KiB).
const MAX_BODY: usize = 64 * 1024;
/// Most fds one vhost-user message carries.
const MAX_FDS: usize = 32;

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket path holds something that is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(String),
    /// Another process is serving on the socket path.
    #[error("{0} is in use by another process")]
    InUse(String),
    /// Socket setup failed.
    #[error("socket: {0}")]
    Socket(#[source] io::Error),
    /// The vhost-user daemon failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
    /// The internal connection did not answer as expected.
    #[error("internal vhost-user connection: {0}")]
    Probe(String),
    /// The sandbox could not be installed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// Why a seccomp filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// This architecture is unknown to seccompiler.
    #[error("seccomp: unsupported architecture: {0}")]
    Arch(String),
    /// The JSON does not compile.
    #[error("seccomp: {file} does not compile: {msg}")]
    Compile {
        /// The JSON file's name.
        file: &'static str,
        /// What seccompiler said.
        msg: String,
    },
    /// The JSON lacks the expected filter.
    #[error("seccomp: {file} has no '{filter}' filter")]
    Missing {
        /// The JSON file's name.
        file: &'static str,
        /// The filter looked for.
        filter: &'static str,
    },
    /// The kernel refused the filter.
    #[error("seccomp: cannot install the filter: {0}")]
    Install(String),
}

/// Compiles the filter named `filter` from the seccompiler JSON `json` (read from `file`).
pub fn compile_seccomp(
    json: &str,
    file: &'static str,
    filter: &'static str,
) -> Result<seccompiler::BpfProgram, SandboxError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SandboxError::Arch(format!("{e:?}")))?;
    let mut filters = seccompiler::compile_from_json(json.as_bytes(), arch).map_err(|e| {
        SandboxError::Compile {
            file,
            msg: e.to_string(),
        }
    })?;
    filters
        .remove(filter)
        .ok_or(SandboxError::Missing { file, filter })
}

/// Compiles a filter and installs it on every thread of the process (threads created later
/// inherit it).
pub fn install_seccomp(
    json: &str,
    file: &'static str,
    filter: &'static str,
) -> Result<(), SandboxError> {
    let prog = compile_seccomp(json, file, filter)?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| SandboxError::Install(e.to_string()))
}

/// Removes a stale socket at `path` (refusing anything that is not a socket, or a socket
/// someone still listens on) and binds a listener there.
pub fn bind_path(path: &Path) -> Result<Listener, ServeError> {
    let shown = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse(shown));
            }
            std::fs::remove_file(path).map_err(ServeError::Socket)?;
        }
        Ok(_) => return Err(ServeError::NotASocket(shown)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ServeError::Socket(e)),
    }
    Listener::new(path, false).map_err(|e| ServeError::Daemon(e.to_string()))
}

/// Serves frontends on `listener` one after another, forever: `daemon` makes a fresh daemon
/// for each connection, `after` runs when a connection ends. `prog` prefixes log lines.
pub fn serve_listener<T>(
    prog: &str,
    listener: &mut Listener,
    mut daemon: impl FnMut() -> Result<VhostUserDaemon<T>, ServeError>,
    mut after: impl FnMut(),
) -> Result<(), ServeError>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    loop {
        let conn = match listener.accept() {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => return Err(ServeError::Daemon(e.to_string())),
        };
        eprintln!("{prog}: frontend connected");
        // Through the relay, which papers over frontends that enable rings before
        // negotiating features (QEMU's virtio-net reset).
        let d = daemon()?;
        if let Err(e) = serve_connected(prog, d, conn, || Ok(())) {
            eprintln!("{prog}: {e}");
        }
        after();
    }
}

/// Serves the one frontend on the far end of `conn` with `daemon`; `before_serving` runs
/// once the private connection is set up and before any frontend message is relayed (the
/// place to install seccomp). Returns when the frontend disconnects.
pub fn serve_connected<T>(
    prog: &str,
    mut daemon: VhostUserDaemon<T>,
    conn: UnixStream,
    before_serving: impl FnOnce() -> Result<(), ServeError>,
) -> Result<(), ServeError>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    // bulkheadd hands a *listening* socket whose one connection (the runner's end) is
    // already queued: accept it directly, then close the listener, so the process holds
    // no socket but its vhost-user connection. A connected socket goes through the relay.
    let listening =
        nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::AcceptConn).unwrap_or(false);
    if listening {
        let mut listener = Listener::from(UnixListener::from(std::os::fd::OwnedFd::from(conn)));
        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        drop(listener);
        before_serving()?;
        eprintln!("{prog}: serving the connection queued on the inherited listener");
        let result = daemon.wait();
        log_end(prog, result);
        drop(daemon);
        return Ok(());
    }
    // A private rendezvous: an abstract socket with a random name, used once.
    let mut name = [0u8; 16];
    getrandom(&mut name).map_err(ServeError::Socket)?;
    let name: String = name.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("{prog}-{name}");
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(ServeError::Socket)?;
    let unix_listener = UnixListener::bind_addr(&addr).map_err(ServeError::Socket)?;
    let inner = UnixStream::connect_addr(&addr).map_err(ServeError::Socket)?;
    let mut listener = Listener::from(unix_listener);
    daemon
        .start(&mut listener)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    drop(listener);
    probe(&inner)?;

    before_serving()?;
    eprintln!("{prog}: serving the inherited connection");

    let (f2b_from, f2b_to) = (
        conn.try_clone().map_err(ServeError::Socket)?,
        inner.try_clone().map_err(ServeError::Socket)?,
    );
    let to_backend = std::thread::Builder::new()
        .name("relay-in".into())
        .spawn(move || {
            let r = pump(&f2b_from, &f2b_to, true);
            let _ = f2b_to.shutdown(std::net::Shutdown::Both);
            r
        })
        .map_err(ServeError::Socket)?;
    let (b2f_from, b2f_to) = (inner, conn);
    let to_frontend = std::thread::Builder::new()
        .name("relay-out".into())
        .spawn(move || {
            let r = pump(&b2f_from, &b2f_to, false);
            let _ = b2f_to.shutdown(std::net::Shutdown::Both);
            r
        })
        .map_err(ServeError::Socket)?;

    let result = daemon.wait();
    let r_in = to_backend.join();
    let r_out = to_frontend.join();
    for (dir, r) in [("frontend->backend", r_in), ("backend->frontend", r_out)] {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("{prog}: relay {dir}: {e}"),
            Err(_) => eprintln!("{prog}: relay {dir} thread failed"),
        }
    }
    log_end(prog, result);
    drop(daemon);
    Ok(())
}

/// Logs how a connection ended; a frontend hanging up is the normal end.
fn log_end(prog: &str, result: vhost_user_backend::Result<()>) {
    use vhost::vhost_user::Error as VuError;
    use vhost_user_backend::Error as DaemonError;
    match result {
        Ok(())
        | Err(DaemonError::HandleRequest(VuError::Disconnected))
        | Err(DaemonError::HandleRequest(VuError::PartialMessage)) => {
            eprintln!("{prog}: frontend disconnected")
        }
        Err(e) => eprintln!("{prog}: frontend connection ended: {e}"),
    }
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the kernel writes at most `buf.len() - done` bytes into our buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        done += n as usize;
    }
    Ok(())
}

/// Sends GET_FEATURES on our end of the private connection and expects a reply: proof that
/// the daemon accepted our connection and not someone else's.
fn probe(inner: &UnixStream) -> Result<(), ServeError> {
    const GET_FEATURES: u32 = 1;
    const VERSION_1: u32 = 0x1;
    const REPLY: u32 = 0x4;
    let mut msg = [0u8; HDR_LEN];
    msg[0..4].copy_from_slice(&GET_FEATURES.to_le_bytes());
    msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    let mut s = inner;
    let err = |e: io::Error| ServeError::Probe(e.to_string());
    s.write_all(&msg).map_err(err)?;
    inner
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    let mut reply = [0u8; HDR_LEN + 8];
    s.read_exact(&mut reply).map_err(err)?;
    inner.set_read_timeout(None).map_err(err)?;
    let req = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
    let flags = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
    let size = u32::from_le_bytes([reply[8], reply[9], reply[10], reply[11]]);
    if req != GET_FEATURES || flags & REPLY == 0 || size != 8 {
        return Err(ServeError::Probe(format!(
            "unexpected reply {req}/{flags:#x}/{size}"
        )));
    }
    Ok(())
}

/// Receives into `buf` (at least one byte unless EOF), collecting attached fds.
fn recv_some(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let n = msg.bytes;
                let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for r in raw {
                                // SAFETY: the kernel just installed `r` in our fd table
                                // for us (SCM_RIGHTS); nothing else owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                            }
                        }
                    }
                }
                if truncated {
                    return Err(io::Error::other("too many fds attached to a message"));
                }
                return Ok(n);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Reads exactly `buf.len()` bytes (collecting fds); `Ok(false)` on a clean EOF before the
/// first byte.
fn recv_exact(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        let n = recv_some(fd, &mut buf[done..], fds)?;
        if n == 0 {
            if done == 0 {
                return Ok(false);
            }
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        done += n;
    }
    Ok(true)
}

/// Relays whole vhost-user messages from `from` to `to` until EOF.
/// vhost-user request codes the relay looks at.
const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_VRING_ENABLE: u32 = 18;
const REQ_SET_VRING_KICK: u32 = 12;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const VERSION_1: u32 = 0x1;

/// Relays whole messages from `from` to `to`. On the frontend→backend side
/// (`frontend_side`), a SET_VRING_ENABLE that arrives before any SET_FEATURES is answered
/// here and not passed on: QEMU sends one at virtio-net reset, which the vhost crate's
/// request handler refuses (the protocol-features bit is not yet acked) by dropping the
/// connection. Rings start disabled anyway and the frontend enables them after SET_FEATURES.
fn pump(from: &UnixStream, to: &UnixStream, frontend_side: bool) -> io::Result<()> {
    let mut body = vec![0u8; MAX_BODY];
    let mut features_seen = false;
    let mut held_enable: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
    loop {
        let mut fds = Vec::new();
        let mut hdr = [0u8; HDR_LEN];
        match recv_exact(from.as_raw_fd(), &mut hdr, &mut fds) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        if size > MAX_BODY {
            return Err(io::Error::other(format!("message body of {size} bytes")));
        }
        if !recv_exact(from.as_raw_fd(), &mut body[..size], &mut fds)? && size > 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        if frontend_side {
            let request = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            let flags = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
            if request == REQ_SET_FEATURES {
                features_seen = true;
            } else if request == REQ_SET_VRING_ENABLE && !features_seen {
                if size >= 8 {
                    let index = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
                    let num = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
                    held_enable.insert(index, num);
                }
                if flags & FLAG_NEED_REPLY != 0 {
                    let mut reply = Vec::with_capacity(HDR_LEN + 8);
                    reply.extend_from_slice(&REQ_SET_VRING_ENABLE.to_le_bytes());
                    reply.extend_from_slice(&(VERSION_1 | FLAG_REPLY).to_le_bytes());
                    reply.extend_from_slice(&8u32.to_le_bytes());
                    reply.extend_from_slice(&0u64.to_le_bytes());
                    let mut w = from;
                    w.write_all(&reply)?;
                }
                continue;
            }
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        let iov = [IoSlice::new(&hdr), IoSlice::new(&body[..size])];
        let total = HDR_LEN + size;
        let sent = loop {
            match sendmsg::<()>(to.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            }
        };
        // The fds went with the first byte; send whatever the kernel did not take.
        if sent < total {
            let mut rest = Vec::with_capacity(total - sent);
            rest.extend_from_slice(&hdr);
            rest.extend_from_slice(&body[..size]);
            let mut w = to;
            w.write_all(&rest[sent..])?;
        }
        // Our copies of the fds are closed here; the receiver has its own.
        drop(fds);
        if frontend_side
            && u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) == REQ_SET_VRING_KICK
            && size >= 8
        {
            let index = u32::from(body[0]);
            if let Some(num) = held_enable.remove(&index) {
                let mut msg = Vec::with_capacity(HDR_LEN + 8);
                msg.extend_from_slice(&REQ_SET_VRING_ENABLE.to_le_bytes());
                msg.extend_from_slice(&VERSION_1.to_le_bytes());
                msg.extend_from_slice(&8u32.to_le_bytes());
                msg.extend_from_slice(&index.to_le_bytes());
                msg.extend_from_slice(&num.to_le_bytes());
                let mut w = to;
                w.write_all(&msg)?;
            }
        }
    }
}
