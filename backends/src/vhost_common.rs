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
//!
//! The relay also answers, on the backend's behalf, the protocol messages vhost-user-backend
//! cannot: GET_INFLIGHT_FD and SET_INFLIGHT_FD, for a backend that keeps an in-flight log
//! ([`crate::inflight`]). Such a backend is always served through the relay, also when
//! `bulkheadd` hands it a listening socket.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};

use crate::inflight::{InflightRegion, InflightSlot};

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
    /// The inherited connection's other end is not root's (bulkheadd makes it).
    #[error("the inherited connection comes from uid {0}, not from bulkheadd (uid 0): refused")]
    ForeignPeer(u32),
}

/// For a socket inherited from `bulkheadd`: a connected one must have root at its other
/// end (`bulkheadd` made it, for the runner); a listening one is checked when its queued
/// connection is accepted ([`serve_connected`]).
pub fn check_inherited_peer(conn: &UnixStream) -> Result<(), ServeError> {
    let listening =
        nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::AcceptConn).unwrap_or(false);
    if listening {
        Ok(())
    } else {
        check_peer(conn)
    }
}

/// Refuses a connection whose peer is not root: an inherited connection is made by
/// `bulkheadd` (for the runner), never by anyone else.
fn check_peer(conn: &UnixStream) -> Result<(), ServeError> {
    let cred = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| ServeError::Socket(e.into()))?;
    if cred.uid() == 0 {
        Ok(())
    } else {
        Err(ServeError::ForeignPeer(cred.uid()))
    }
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
    let clone3 = compile_seccomp(json, file, clone3_filter(filter))?;
    // First the companion that answers clone3 with ENOSYS (an errno beats the main filter's
    // ALLOW, and glibc then falls back to clone, whose flags the main filter checks); then
    // the allowlist, which leaves no seccomp() to anyone after it.
    seccompiler::apply_filter_all_threads(&clone3)
        .map_err(|e| SandboxError::Install(e.to_string()))?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| SandboxError::Install(e.to_string()))
}

/// The name of `filter`'s companion that answers clone3 with ENOSYS.
fn clone3_filter(filter: &'static str) -> &'static str {
    match filter {
        "blk" => "blk_clone3",
        "net" => "net_clone3",
        _ => "clone3",
    }
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
/// for each connection (and, for a backend that keeps an in-flight log, the slot the relay
/// fills), `after` runs when a connection ends. `prog` prefixes log lines.
pub fn serve_listener<T>(
    prog: &str,
    listener: &mut Listener,
    mut daemon: impl FnMut() -> Result<DaemonAndSlot<T>, ServeError>,
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
        let (d, slot) = daemon()?;
        if let Err(e) = serve_connected(prog, d, slot, conn, || Ok(())) {
            eprintln!("{prog}: {e}");
        }
        after();
    }
}

/// A connection's daemon, and the in-flight slot the relay fills for it (None for a backend
/// that keeps no in-flight log).
pub type DaemonAndSlot<T> = (VhostUserDaemon<T>, Option<Arc<InflightSlot>>);

/// Serves the one frontend on the far end of `conn` with `daemon`; `before_serving` runs
/// once the private connection is set up and before any frontend message is relayed (the
/// place to install seccomp). With `inflight`, the relay answers the in-flight messages and
/// puts the frontend's region there. Returns when the frontend disconnects.
pub fn serve_connected<T>(
    prog: &str,
    mut daemon: VhostUserDaemon<T>,
    inflight: Option<Arc<InflightSlot>>,
    mut conn: UnixStream,
    before_serving: impl FnOnce() -> Result<(), ServeError>,
) -> Result<(), ServeError>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    // bulkheadd hands a *listening* socket whose one connection (the runner's end) is
    // already queued: accept it directly, then close the listener, so the process holds
    // no socket but its vhost-user connection. A connected socket, or any connection of a
    // backend with an in-flight log, goes through the relay.
    let listening =
        nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::AcceptConn).unwrap_or(false);
    if listening && inflight.is_some() {
        let listener = UnixListener::from(std::os::fd::OwnedFd::from(conn));
        conn = listener.accept().map_err(ServeError::Socket)?.0;
        check_peer(&conn)?;
    } else if listening {
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

    // Both directions write to the frontend (the relay answers some requests itself): one
    // whole message at a time.
    let frontend_writes = Arc::new(Mutex::new(()));
    let (f2b_from, f2b_to) = (
        conn.try_clone().map_err(ServeError::Socket)?,
        inner.try_clone().map_err(ServeError::Socket)?,
    );
    let in_side = Side::Frontend {
        inflight,
        writes: frontend_writes.clone(),
        prog: prog.to_string(),
    };
    let to_backend = std::thread::Builder::new()
        .name("relay-in".into())
        .spawn(move || {
            let r = pump(&f2b_from, &f2b_to, in_side);
            let _ = f2b_to.shutdown(std::net::Shutdown::Both);
            r
        })
        .map_err(ServeError::Socket)?;
    let (b2f_from, b2f_to) = (inner, conn);
    let to_frontend = std::thread::Builder::new()
        .name("relay-out".into())
        .spawn(move || {
            let r = pump(&b2f_from, &b2f_to, Side::Backend(frontend_writes));
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

/// vhost-user request codes the relay looks at.
const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_VRING_ENABLE: u32 = 18;
const REQ_SET_VRING_KICK: u32 = 12;
const REQ_GET_INFLIGHT_FD: u32 = 31;
const REQ_SET_INFLIGHT_FD: u32 = 32;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const VERSION_1: u32 = 0x1;
/// `struct VhostUserInflight`: mmap_size, mmap_offset, num_queues, queue_size (+ padding).
const INFLIGHT_BODY: usize = 24;

/// Which way a relay thread pumps, and what it needs for that.
enum Side {
    /// Frontend to backend: the side that sees requests.
    Frontend {
        /// Where to put the in-flight region (None: the backend keeps no log).
        inflight: Option<Arc<InflightSlot>>,
        /// Held while writing a whole message to the frontend.
        writes: Arc<Mutex<()>>,
        /// Log prefix.
        prog: String,
    },
    /// Backend to frontend: replies, written under the frontend lock.
    Backend(Arc<Mutex<()>>),
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Sends one whole message (header and body in `msg`) with `fds` attached.
fn send_message(to: &UnixStream, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let iov = [IoSlice::new(msg)];
    let sent = loop {
        match sendmsg::<()>(to.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    };
    // The fds went with the first byte; send whatever the kernel did not take.
    if sent < msg.len() {
        let mut w = to;
        w.write_all(&msg[sent..])?;
    }
    Ok(())
}

/// A reply header for `request` with a body of `size` bytes.
fn reply_header(request: u32, size: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR_LEN + size);
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&(VERSION_1 | FLAG_REPLY).to_le_bytes());
    m.extend_from_slice(&(size as u32).to_le_bytes());
    m
}

/// Answers GET_INFLIGHT_FD: a fresh zeroed region for the queues asked for. On failure the
/// reply carries size 0 and no fd, which frontends read as "no in-flight tracking".
fn get_inflight_fd(prog: &str, body: &[u8]) -> (Vec<u8>, Option<std::fs::File>) {
    let (num_queues, queue_size) = if body.len() >= 20 {
        (le16(body, 16), le16(body, 18))
    } else {
        (0, 0)
    };
    let mut reply = reply_header(REQ_GET_INFLIGHT_FD, INFLIGHT_BODY);
    let mut answer = |size: u64| {
        reply.extend_from_slice(&size.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        reply.extend_from_slice(&num_queues.to_le_bytes());
        reply.extend_from_slice(&queue_size.to_le_bytes());
        reply.extend_from_slice(&[0u8; 4]);
    };
    match InflightRegion::create(num_queues, queue_size) {
        Ok((_, file)) => {
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            answer(size);
            eprintln!(
                "{prog}: in-flight region of {size} bytes for {num_queues} queues of {queue_size}"
            );
            (reply, Some(file))
        }
        Err(e) => {
            eprintln!("{prog}: GET_INFLIGHT_FD: {e}");
            answer(0);
            (reply, None)
        }
    }
}

/// Takes the region SET_INFLIGHT_FD hands over; the status for a REPLY_ACK (0 = taken).
fn set_inflight_fd(prog: &str, body: &[u8], fds: &mut Vec<OwnedFd>, slot: &InflightSlot) -> u64 {
    if body.len() < 20 || fds.len() != 1 {
        eprintln!(
            "{prog}: SET_INFLIGHT_FD with a {}-byte body and {} fds: refused",
            body.len(),
            fds.len()
        );
        return 1;
    }
    let (size, offset) = (le64(body, 0), le64(body, 8));
    let (num_queues, queue_size) = (le16(body, 16), le16(body, 18));
    let file = std::fs::File::from(fds.remove(0));
    match InflightRegion::map(file, size, offset, num_queues, queue_size) {
        Ok(region) => {
            slot.install(region);
            eprintln!("{prog}: tracking in-flight requests in the frontend's region ({num_queues} queues of {queue_size})");
            0
        }
        Err(e) => {
            eprintln!("{prog}: SET_INFLIGHT_FD: {e}; requests are not tracked");
            1
        }
    }
}

/// Relays whole vhost-user messages from `from` to `to` until EOF.
///
/// On the frontend side, a SET_VRING_ENABLE that arrives before any SET_FEATURES is
/// answered here and not passed on: QEMU sends one at virtio-net reset, which the vhost
/// crate's request handler refuses (the protocol-features bit is not yet acked) by dropping
/// the connection. Rings start disabled anyway; the held enable is replayed after that
/// ring's SET_VRING_KICK. With an in-flight slot, GET_INFLIGHT_FD and SET_INFLIGHT_FD are
/// answered here too.
fn pump(from: &UnixStream, to: &UnixStream, side: Side) -> io::Result<()> {
    let mut body = vec![0u8; MAX_BODY];
    let mut features_seen = false;
    let mut held_enable: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
    // Writes to the frontend happen under this lock: either our replies (frontend side,
    // written to `from`) or relayed backend replies (backend side, written to `to`).
    let lock = match &side {
        Side::Frontend { writes, .. } | Side::Backend(writes) => writes.clone(),
    };
    let reply_to_frontend = |msg: &[u8], fds: &[RawFd]| -> io::Result<()> {
        let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
        send_message(from, msg, fds)
    };
    loop {
        let mut fds = Vec::new();
        let mut hdr = [0u8; HDR_LEN];
        match recv_exact(from.as_raw_fd(), &mut hdr, &mut fds) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
        let size = le32(&hdr, 8) as usize;
        if size > MAX_BODY {
            return Err(io::Error::other(format!("message body of {size} bytes")));
        }
        if !recv_exact(from.as_raw_fd(), &mut body[..size], &mut fds)? && size > 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let request = le32(&hdr, 0);
        let flags = le32(&hdr, 4);
        if let Side::Frontend { inflight, prog, .. } = &side {
            if request == REQ_SET_FEATURES {
                features_seen = true;
            } else if request == REQ_SET_VRING_ENABLE && !features_seen {
                if size >= 8 {
                    held_enable.insert(le32(&body, 0), le32(&body, 4));
                }
                if flags & FLAG_NEED_REPLY != 0 {
                    let mut reply = reply_header(REQ_SET_VRING_ENABLE, 8);
                    reply.extend_from_slice(&0u64.to_le_bytes());
                    reply_to_frontend(&reply, &[])?;
                }
                continue;
            } else if inflight.is_some() && request == REQ_GET_INFLIGHT_FD {
                let (reply, file) = get_inflight_fd(prog, &body[..size]);
                let raw: Vec<RawFd> = file.iter().map(|f| f.as_raw_fd()).collect();
                reply_to_frontend(&reply, &raw)?;
                continue;
            } else if let (Some(slot), REQ_SET_INFLIGHT_FD) = (inflight, request) {
                let status = set_inflight_fd(prog, &body[..size], &mut fds, slot);
                if flags & FLAG_NEED_REPLY != 0 {
                    let mut reply = reply_header(REQ_SET_INFLIGHT_FD, 8);
                    reply.extend_from_slice(&status.to_le_bytes());
                    reply_to_frontend(&reply, &[])?;
                }
                continue;
            }
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut msg = Vec::with_capacity(HDR_LEN + size);
        msg.extend_from_slice(&hdr);
        msg.extend_from_slice(&body[..size]);
        match &side {
            Side::Backend(writes) => {
                let _g = writes.lock().unwrap_or_else(|e| e.into_inner());
                send_message(to, &msg, &raw)?;
            }
            Side::Frontend { .. } => send_message(to, &msg, &raw)?,
        }
        // Our copies of the fds are closed here; the receiver has its own.
        drop(fds);
        if matches!(side, Side::Frontend { .. }) && request == REQ_SET_VRING_KICK && size >= 8 {
            let index = u32::from(body[0]);
            if let Some(num) = held_enable.remove(&index) {
                let mut msg = Vec::with_capacity(HDR_LEN + 8);
                msg.extend_from_slice(&REQ_SET_VRING_ENABLE.to_le_bytes());
                msg.extend_from_slice(&VERSION_1.to_le_bytes());
                msg.extend_from_slice(&8u32.to_le_bytes());
                msg.extend_from_slice(&index.to_le_bytes());
                msg.extend_from_slice(&num.to_le_bytes());
                send_message(to, &msg, &[])?;
            }
        }
    }
}
