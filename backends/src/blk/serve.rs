//! The connection loops: a standalone listener that serves one frontend after another, and
//! the sandboxed mode that serves one already connected socket inherited from `bulkheadd`.
//!
//! `vhost-user-backend`'s daemon only accepts connections from a listener (its request
//! handler type is private, so it cannot be driven from a connected stream). For an inherited
//! stream, the daemon listens on a fresh, randomly named abstract unix socket, we connect to
//! it ourselves, check with a GET_FEATURES round trip that the daemon is talking to us, and
//! then relay whole vhost-user messages (header, body and attached fds) between the inherited
//! stream and that private connection. The data path (vrings, eventfds, guest memory) does
//! not go through the relay.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::backend::BlkBackend;
use super::disk::Disk;
use super::request::ID_LEN;
use super::stats::Stats;

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
    Sandbox(#[from] super::sandbox::SandboxError),
}

/// What every connection shares: the image, its identity and the counters.
#[derive(Clone)]
pub struct Device {
    /// The image.
    pub disk: Arc<Disk>,
    /// GET_ID answer.
    pub serial: [u8; ID_LEN],
    /// Request queues.
    pub queues: u16,
    /// Counters, kept across connections.
    pub stats: Arc<Stats>,
}

impl Device {
    fn daemon(&self) -> Result<VhostUserDaemon<BlkBackend>, ServeError> {
        let backend = BlkBackend::new(
            self.disk.clone(),
            self.serial,
            self.queues,
            self.stats.clone(),
        );
        VhostUserDaemon::new(
            "bulkhead-blk".to_string(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))
    }

    fn log_stats(&self) {
        let s = self.stats.snapshot();
        eprintln!(
            "bulkhead-blk: totals: {} requests, {} errors, {} broken chains, {} bytes read, {} bytes written",
            s.requests, s.errors, s.broken, s.bytes_read, s.bytes_written
        );
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

/// Serves frontends on `listener` one after another, forever. The image stays open.
pub fn serve_listener(device: &Device, listener: &mut Listener) -> Result<(), ServeError> {
    loop {
        let mut daemon = device.daemon()?;
        daemon
            .start(listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        eprintln!("bulkhead-blk: frontend connected");
        log_end(daemon.wait());
        drop(daemon);
        device.log_stats();
    }
}

/// Serves the one frontend on the far end of `conn`, with the seccomp allowlist installed
/// once setup is done (if `sandbox`). Returns when the frontend disconnects.
pub fn serve_connected(device: &Device, conn: UnixStream, sandbox: bool) -> Result<(), ServeError> {
    let mut daemon = device.daemon()?;

    // A private rendezvous: an abstract socket with a random name, used once.
    let mut name = [0u8; 16];
    getrandom(&mut name).map_err(ServeError::Socket)?;
    let name: String = name.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("bulkhead-blk-{name}");
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(ServeError::Socket)?;
    let unix_listener = UnixListener::bind_addr(&addr).map_err(ServeError::Socket)?;
    let inner = UnixStream::connect_addr(&addr).map_err(ServeError::Socket)?;
    let mut listener = Listener::from(unix_listener);
    daemon
        .start(&mut listener)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    drop(listener);
    probe(&inner)?;

    if sandbox {
        super::sandbox::install_seccomp()?;
    }
    eprintln!("bulkhead-blk: serving the inherited connection");

    let (f2b_from, f2b_to) = (
        conn.try_clone().map_err(ServeError::Socket)?,
        inner.try_clone().map_err(ServeError::Socket)?,
    );
    let to_backend = std::thread::Builder::new()
        .name("relay-in".into())
        .spawn(move || {
            let r = pump(&f2b_from, &f2b_to);
            let _ = f2b_to.shutdown(std::net::Shutdown::Both);
            r
        })
        .map_err(ServeError::Socket)?;
    let (b2f_from, b2f_to) = (inner, conn);
    let to_frontend = std::thread::Builder::new()
        .name("relay-out".into())
        .spawn(move || {
            let r = pump(&b2f_from, &b2f_to);
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
            Ok(Err(e)) => eprintln!("bulkhead-blk: relay {dir}: {e}"),
            Err(_) => eprintln!("bulkhead-blk: relay {dir} thread failed"),
        }
    }
    log_end(result);
    drop(daemon);
    device.log_stats();
    Ok(())
}

/// Logs how a connection ended; a frontend hanging up is the normal end.
fn log_end(result: vhost_user_backend::Result<()>) {
    use vhost::vhost_user::Error as VuError;
    use vhost_user_backend::Error as DaemonError;
    match result {
        Ok(())
        | Err(DaemonError::HandleRequest(VuError::Disconnected))
        | Err(DaemonError::HandleRequest(VuError::PartialMessage)) => {
            eprintln!("bulkhead-blk: frontend disconnected")
        }
        Err(e) => eprintln!("bulkhead-blk: frontend connection ended: {e}"),
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
fn pump(from: &UnixStream, to: &UnixStream) -> io::Result<()> {
    let mut body = vec![0u8; MAX_BODY];
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
    }
}
