//! Message channels on `SOCK_SEQPACKET` unix sockets.
//!
//! One datagram carries one frame: a 4-byte little-endian payload length, then the
//! `postcard` payload. Up to [`MAX_FDS`] descriptors travel with a frame as `SCM_RIGHTS`.
//! Everything that arrives from the peer is checked before it is trusted: a frame that is
//! oversized, truncated, carries too many descriptors or does not decode is an
//! [`IpcError`], never a panic, and any descriptors that came with a rejected frame are
//! closed. Because the socket keeps datagram boundaries, the channel stays usable after a
//! bad frame: the next `recv` reads the next frame.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest payload (bytes after the 4-byte header) a frame may carry.
pub const MAX_FRAME: usize = 256 * 1024;

/// Most descriptors one frame may carry.
pub const MAX_FDS: usize = 8;

/// Size of the length header in front of every payload.
pub const HEADER_LEN: usize = 4;

/// Receive buffer: one byte more than the largest valid frame, so an oversized datagram
/// is detected by its size even where `MSG_TRUNC` would not be reported.
const RECV_BUF: usize = MAX_FRAME + HEADER_LEN + 1;

/// Send buffer asked of the kernel: a unix datagram larger than the socket's send buffer
/// fails with `EMSGSIZE`, and the default (about 208 KiB) is below [`MAX_FRAME`]. The
/// kernel clamps this to `net.core.wmem_max` and doubles it.
const SNDBUF: usize = 2 * (MAX_FRAME + HEADER_LEN);

/// Backlog of a [`Listener`].
const BACKLOG: i32 = 64;

/// Everything that can go wrong on a channel.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done, e.g. `connect /run/bulkhead/control.sock`.
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket is non-blocking and the operation would block.
    #[error("the operation would block")]
    WouldBlock,
    /// The peer closed the connection (or sent an empty datagram).
    #[error("the peer closed the connection")]
    Closed,
    /// Nothing arrived within the timeout.
    #[error("timed out waiting for a message")]
    Timeout,
    /// The frame exceeds [`MAX_FRAME`] payload bytes.
    #[error("frame exceeds the maximum of {MAX_FRAME} payload bytes")]
    Oversized,
    /// The frame carries more than [`MAX_FDS`] descriptors.
    #[error("frame carries more than {MAX_FDS} file descriptors")]
    TooManyFds,
    /// The frame's length header does not match the bytes that arrived.
    #[error("frame is truncated: its length header does not match its size")]
    Truncated,
    /// The message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The payload is not a valid message of the expected type.
    #[error("cannot decode message: {0}")]
    Decode(String),
    /// The server refused our hello.
    #[error(
        "the server refused the connection: {reason} (server protocol version {server_version})"
    )]
    Refused {
        /// Why, in the server's words.
        reason: String,
        /// The protocol version the server speaks.
        server_version: u16,
    },
    /// The first frame of a connection was not a valid Bulkhead hello.
    #[error("the peer is not a Bulkhead client: its first frame is not a valid hello")]
    BadHello,
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: we speak version {ours}, the peer speaks version {theirs}"
    )]
    VersionMismatch {
        /// Our [`PROTOCOL_VERSION`](crate::hello::PROTOCOL_VERSION).
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
}

impl IpcError {
    fn sys(op: impl Into<String>, errno: Errno) -> Self {
        IpcError::Io {
            op: op.into(),
            source: io::Error::from(errno),
        }
    }

    fn io(op: impl Into<String>, source: io::Error) -> Self {
        IpcError::Io {
            op: op.into(),
            source,
        }
    }
}

/// Result of channel operations.
pub type Result<T, E = IpcError> = std::result::Result<T, E>;

/// Who is on the other end of a channel, from `SO_PEERCRED` (as of `connect`/`socketpair`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// Peer process id.
    pub pid: i32,
    /// Peer effective uid.
    pub uid: u32,
    /// Peer effective gid.
    pub gid: u32,
}

/// Encode `msg` as a complete frame (header + payload), refusing one over [`MAX_FRAME`].
pub fn encode_frame<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>> {
    let buf = postcard::to_extend(msg, vec![0u8; HEADER_LEN])
        .map_err(|e| IpcError::Encode(e.to_string()))?;
    let len = buf.len() - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(IpcError::Oversized);
    }
    let header = u32::try_from(len).map_err(|_| IpcError::Oversized)?;
    let mut buf = buf;
    buf[..HEADER_LEN].copy_from_slice(&header.to_le_bytes());
    Ok(buf)
}

/// Check a received frame's header and return its payload.
///
/// Errors: shorter than the header or the header disagrees with the size →
/// [`IpcError::Truncated`]; header or size over [`MAX_FRAME`] → [`IpcError::Oversized`].
pub fn decode_frame(frame: &[u8]) -> Result<&[u8]> {
    let Some((header, payload)) = frame.split_first_chunk::<HEADER_LEN>() else {
        return Err(IpcError::Truncated);
    };
    let claimed = u32::from_le_bytes(*header);
    let claimed = usize::try_from(claimed).map_err(|_| IpcError::Oversized)?;
    if claimed > MAX_FRAME || payload.len() > MAX_FRAME {
        return Err(IpcError::Oversized);
    }
    if claimed != payload.len() {
        return Err(IpcError::Truncated);
    }
    Ok(payload)
}

/// Decode a payload (as returned by [`decode_frame`] or [`Channel::recv_raw`]) as a `T`.
/// Every byte must be used: trailing bytes mean the payload is not a `T`.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    let (msg, rest) =
        postcard::take_from_bytes::<T>(payload).map_err(|e| IpcError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IpcError::Decode(format!(
            "{} unexpected trailing bytes",
            rest.len()
        )));
    }
    Ok(msg)
}

/// One end of a message channel (a connected `SOCK_SEQPACKET` unix socket).
///
/// Methods take `&self`; to read on one thread and write on another, give each a
/// [`try_clone`](Channel::try_clone).
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair (`socketpair`, close-on-exec), e.g. for a runner's control socket.
    pub fn pair() -> Result<(Channel, Channel)> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| IpcError::sys("socketpair", e))?;
        let (a, b) = (Channel { fd: a }, Channel { fd: b });
        a.grow_sndbuf()?;
        b.grow_sndbuf()?;
        Ok((a, b))
    }

    /// Connect to a [`Listener`] at `path`.
    pub fn connect(path: &Path) -> Result<Channel> {
        let op = || format!("connect {}", path.display());
        let addr = UnixAddr::new(path).map_err(|e| IpcError::sys(op(), e))?;
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| IpcError::sys("socket", e))?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(|e| IpcError::sys(op(), e))?;
        let ch = Channel { fd };
        ch.grow_sndbuf()?;
        Ok(ch)
    }

    /// Wrap a connected `SOCK_SEQPACKET` unix socket (e.g. one inherited or received).
    /// Growing its send buffer is attempted; if that fails, frames larger than the
    /// socket's send buffer cannot be sent.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        let ch = Channel { fd };
        // Best effort: `fd` may be a socket we are not allowed to tune.
        let _ = ch.grow_sndbuf();
        ch
    }

    /// Give up the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    fn grow_sndbuf(&self) -> Result<()> {
        let current = socket::getsockopt(&self.fd, sockopt::SndBuf)
            .map_err(|e| IpcError::sys("SO_SNDBUF", e))?;
        if current < SNDBUF {
            socket::setsockopt(&self.fd, sockopt::SndBuf, &SNDBUF)
                .map_err(|e| IpcError::sys("SO_SNDBUF", e))?;
        }
        Ok(())
    }

    /// Lets `bytes` of sent frames wait in the socket for a slow reader before a send
    /// blocks (or [`Self::try_send`] says [`IpcError::WouldBlock`]). Beyond the system's
    /// `wmem_max` this needs `CAP_NET_ADMIN` (SO_SNDBUFFORCE); without it the largest
    /// allowed size is taken.
    pub fn set_send_buffer(&self, bytes: usize) -> Result<()> {
        if socket::setsockopt(&self.fd, sockopt::SndBufForce, &bytes).is_ok() {
            return Ok(());
        }
        socket::setsockopt(&self.fd, sockopt::SndBuf, &bytes)
            .map_err(|e| IpcError::sys("SO_SNDBUF", e))
    }

    /// Another handle on the same socket (`dup`, close-on-exec). The two share the
    /// non-blocking flag.
    pub fn try_clone(&self) -> Result<Channel> {
        let fd = self.fd.try_clone().map_err(|e| IpcError::io("dup", e))?;
        Ok(Channel { fd })
    }

    /// Make `send`/`recv` return [`IpcError::WouldBlock`] instead of waiting.
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<()> {
        set_nonblocking(self.fd.as_fd(), nonblocking)
    }

    /// The peer's supplementary groups as they were when it connected (`SO_PEERGROUPS`):
    /// no race with the peer exiting and its pid being reused, as reading /proc would have.
    pub fn peer_groups(&self) -> Result<Vec<u32>> {
        let mut groups = vec![0u32; 64];
        loop {
            let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `groups`, which holds that
            // many, and stores the length it needs (or wrote) in `len`.
            let r = unsafe {
                libc::getsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            let n = len as usize / std::mem::size_of::<u32>();
            if r == 0 {
                groups.truncate(n);
                return Ok(groups);
            }
            let err = Errno::last();
            if err != Errno::ERANGE || n <= groups.len() || n > 65_536 {
                return Err(IpcError::sys("SO_PEERGROUPS", err));
            }
            groups.resize(n, 0);
        }
    }

    /// The peer's pid, uid and gid (`SO_PEERCRED`).
    pub fn peer_credentials(&self) -> Result<Credentials> {
        let cred = socket::getsockopt(&self.fd, sockopt::PeerCredentials)
            .map_err(|e| IpcError::sys("SO_PEERCRED", e))?;
        Ok(Credentials {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        })
    }

    /// Send `msg` as one frame, with `fds` (at most [`MAX_FDS`]) as `SCM_RIGHTS`.
    ///
    /// A message over [`MAX_FRAME`] is refused with [`IpcError::Oversized`] (nothing is
    /// sent); a peer that went away is [`IpcError::Closed`] (no `SIGPIPE`).
    pub fn send<T: Serialize + ?Sized>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.send_with(msg, fds, MsgFlags::MSG_NOSIGNAL)
    }

    /// [`Self::send`] that never waits: a peer whose receive queue is full gets
    /// [`IpcError::WouldBlock`] and nothing is sent. For fan-out to clients that may not read.
    pub fn try_send<T: Serialize + ?Sized>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.send_with(msg, fds, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT)
    }

    /// Shuts the connection down both ways: the peer reads end-of-file, and every clone of
    /// this channel (a thread blocked in `recv` too) sees it closed.
    pub fn shutdown(&self) -> Result<()> {
        socket::shutdown(self.fd.as_raw_fd(), socket::Shutdown::Both)
            .map_err(|e| IpcError::sys("shutdown", e))
    }

    fn send_with<T: Serialize + ?Sized>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
        flags: MsgFlags,
    ) -> Result<()> {
        if fds.len() > MAX_FDS {
            return Err(IpcError::TooManyFds);
        }
        let frame = encode_frame(msg)?;
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let iov = [io::IoSlice::new(&frame)];
        loop {
            match socket::sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, flags, None) {
                Ok(n) if n == frame.len() => return Ok(()),
                // SOCK_SEQPACKET sends all or nothing; anything else is a broken socket.
                Ok(_) => return Err(IpcError::io("sendmsg", io::ErrorKind::WriteZero.into())),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(IpcError::WouldBlock),
                Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => {
                    return Err(IpcError::Closed)
                }
                Err(Errno::EMSGSIZE) => {
                    return Err(IpcError::sys(
                        "sendmsg (frame larger than the socket's send buffer)",
                        Errno::EMSGSIZE,
                    ))
                }
                Err(e) => return Err(IpcError::sys("sendmsg", e)),
            }
        }
    }

    /// Receive one frame and decode it as a `T`, with the descriptors that came with it.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>)> {
        let (payload, fds) = self.recv_raw()?;
        Ok((decode(&payload)?, fds))
    }

    /// Like [`recv`](Channel::recv), but give up with [`IpcError::Timeout`] after `timeout`.
    pub fn recv_timeout<T: DeserializeOwned>(
        &self,
        timeout: Duration,
    ) -> Result<(T, Vec<OwnedFd>)> {
        let (payload, fds) = self.recv_raw_timeout(timeout)?;
        Ok((decode(&payload)?, fds))
    }

    /// Receive one frame and return its validated payload (not yet decoded) and fds.
    pub fn recv_raw(&self) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        self.recv_frame(MsgFlags::empty())
    }

    /// Like [`recv_raw`](Channel::recv_raw), but give up with [`IpcError::Timeout`] after
    /// `timeout`.
    pub fn recv_raw_timeout(&self, timeout: Duration) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let remaining = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut pfd, poll_timeout(remaining)) {
                Ok(0) => return Err(IpcError::Timeout),
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(IpcError::sys("poll", e)),
            }
            // Readable (or hung up / errored, which recvmsg reports). Don't block if another
            // handle took the frame in the meantime: poll again.
            match self.recv_frame(MsgFlags::MSG_DONTWAIT) {
                Err(IpcError::WouldBlock) => {
                    if remaining.is_zero() {
                        return Err(IpcError::Timeout);
                    }
                }
                other => return other,
            }
        }
    }

    fn recv_frame(&self, flags: MsgFlags) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        // Size the buffer to the waiting frame (capped one byte over the largest legal
        // one, so an oversized frame still shows as truncated): a connection waiting for
        // a request costs no 256 KiB buffer, and a small request no zero-filling of one.
        // A channel has one reader; should another take this frame first, a larger frame
        // that follows is reported as oversized rather than read.
        let waiting = peek_len(self.fd.as_fd(), flags)?;
        let mut buf = vec![0u8; waiting.clamp(1, RECV_BUF)];
        let got = recv_datagram(self.fd.as_fd(), &mut buf, flags)?;
        // Checks in order of what makes the rest meaningless. `got.fds` is dropped (closed)
        // on every error return.
        if got.ctrunc || got.fds.len() > MAX_FDS {
            return Err(IpcError::TooManyFds);
        }
        if got.trunc || got.bytes > MAX_FRAME + HEADER_LEN {
            return Err(IpcError::Oversized);
        }
        if got.bytes == 0 {
            return Err(IpcError::Closed);
        }
        let frame = buf.get(..got.bytes).ok_or(IpcError::Oversized)?;
        let payload = decode_frame(frame)?.to_vec();
        Ok((payload, got.fds))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<OwnedFd> for Channel {
    fn from(fd: OwnedFd) -> Self {
        Channel::from_fd(fd)
    }
}

/// A listening `SOCK_SEQPACKET` unix socket that yields [`Channel`]s.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Listen at `path`. A stale socket file there (nobody accepting on it) is removed
    /// first; a live one is an `AddrInUse` error, and so is any other kind of file. The
    /// parent directory must exist.
    pub fn bind(path: &Path) -> Result<Listener> {
        let op = |what: &str| format!("{what} {}", path.display());
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match Channel::connect(path) {
                Ok(_) => {
                    return Err(IpcError::io(
                        op("bind"),
                        io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another process is listening on this socket",
                        ),
                    ))
                }
                Err(_) => std::fs::remove_file(path)
                    .map_err(|e| IpcError::io(op("remove stale socket"), e))?,
            },
            Ok(_) => {
                return Err(IpcError::io(
                    op("bind"),
                    io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "a file that is not a socket is in the way",
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(IpcError::io(op("stat"), e)),
        }
        let addr = UnixAddr::new(path).map_err(|e| IpcError::sys(op("bind"), e))?;
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| IpcError::sys("socket", e))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| IpcError::sys(op("bind"), e))?;
        let backlog = Backlog::new(BACKLOG).map_err(|e| IpcError::sys("listen", e))?;
        socket::listen(&fd, backlog).map_err(|e| IpcError::sys(op("listen"), e))?;
        Ok(Listener { fd })
    }

    /// Wrap a listening `SOCK_SEQPACKET` unix socket (e.g. one inherited across an exec).
    pub fn from_fd(fd: OwnedFd) -> Listener {
        Listener { fd }
    }

    /// Give up the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Wait for and accept one connection (close-on-exec).
    pub fn accept(&self) -> Result<Channel> {
        loop {
            match socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(raw) => {
                    // SAFETY: accept4 just returned `raw` as a new descriptor that nothing
                    // else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    let ch = Channel { fd };
                    ch.grow_sndbuf()?;
                    return Ok(ch);
                }
                Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                Err(Errno::EAGAIN) => return Err(IpcError::WouldBlock),
                Err(e) => return Err(IpcError::sys("accept", e)),
            }
        }
    }

    /// Make `accept` return [`IpcError::WouldBlock`] instead of waiting.
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<()> {
        set_nonblocking(self.fd.as_fd(), nonblocking)
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> Result<()> {
    let flags =
        fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| IpcError::sys("F_GETFL", e))?;
    let mut flags = OFlag::from_bits_truncate(flags);
    flags.set(OFlag::O_NONBLOCK, nonblocking);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(|e| IpcError::sys("F_SETFL", e))?;
    Ok(())
}

/// `remaining`, rounded up to whole milliseconds, as a poll timeout.
fn poll_timeout(remaining: Duration) -> PollTimeout {
    let mut ms = remaining.as_millis();
    if Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)) < remaining {
        ms = ms.saturating_add(1);
    }
    let ms = i32::try_from(ms).unwrap_or(i32::MAX);
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// What one `recvmsg` returned.
struct Datagram {
    /// Bytes copied into the buffer.
    bytes: usize,
    /// The datagram was longer than the buffer (`MSG_TRUNC`).
    trunc: bool,
    /// Control data did not fit (`MSG_CTRUNC`): more fds were sent than we take.
    ctrunc: bool,
    /// Descriptors that arrived, now owned by us.
    fds: Vec<OwnedFd>,
}

/// Control buffer, aligned for `cmsghdr`, large enough for one `SCM_RIGHTS` message of
/// [`MAX_FDS`] descriptors (checked against `CMSG_SPACE` at run time).
#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

/// `recvmsg` with `MSG_CMSG_CLOEXEC`, taking ownership of every descriptor that arrived,
/// including when the control data was truncated (which `nix` cannot iterate).
/// The length of the frame waiting on `fd`, without taking it (0 at end of stream);
/// blocks unless `flags` has `MSG_DONTWAIT`.
fn peek_len(fd: BorrowedFd<'_>, flags: MsgFlags) -> Result<usize> {
    let flags = flags | MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC;
    loop {
        // SAFETY: a zero-length receive into a null buffer: the kernel writes nothing
        // and, with MSG_TRUNC on a SOCK_SEQPACKET socket, returns the frame's real length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), std::ptr::null_mut(), 0, flags.bits()) };
        match Errno::result(n) {
            Ok(n) => return Ok(n as usize),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(IpcError::WouldBlock),
            Err(Errno::ECONNRESET) => return Err(IpcError::Closed),
            Err(e) => return Err(IpcError::sys("recv", e)),
        }
    }
}

fn recv_datagram(fd: BorrowedFd<'_>, buf: &mut [u8], flags: MsgFlags) -> Result<Datagram> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * mem::size_of::<RawFd>()) as libc::c_uint) };
    let space = space as usize;
    let mut cmsg = CmsgBuf([0u8; 128]);
    let controllen = space.min(cmsg.0.len());
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value (null
    // pointers, zero lengths); the fields we need are set below.
    let mut mhdr: libc::msghdr = unsafe { mem::zeroed() };
    mhdr.msg_iov = &mut iov;
    mhdr.msg_iovlen = 1;
    mhdr.msg_control = cmsg.0.as_mut_ptr().cast();
    mhdr.msg_controllen = controllen as _;
    let flags = flags | MsgFlags::MSG_CMSG_CLOEXEC;
    let n = loop {
        // SAFETY: `mhdr` points at `iov` (describing `buf`, valid for `buf.len()` bytes)
        // and at `cmsg` (valid for `controllen` bytes); all outlive the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut mhdr, flags.bits()) };
        match Errno::result(n) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(IpcError::WouldBlock),
            Err(Errno::ECONNRESET) => return Err(IpcError::Closed),
            Err(e) => return Err(IpcError::sys("recvmsg", e)),
        }
    };
    // Take ownership of the descriptors first, so every later return closes them.
    let mut fds = Vec::new();
    if (mhdr.msg_controllen as usize) <= controllen {
        // SAFETY: the kernel filled `msg_control` with `msg_controllen` (≤ our buffer)
        // bytes of well-formed cmsghdrs; CMSG_FIRSTHDR/CMSG_NXTHDR stay within that
        // length and return null at its end.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&mhdr) };
        while !c.is_null() {
            // SAFETY: `c` is non-null and points at a cmsghdr inside our buffer.
            let hdr = unsafe { std::ptr::read_unaligned(c) };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN only computes a size.
                let header = unsafe { libc::CMSG_LEN(0) } as usize;
                let data_len = (hdr.cmsg_len as usize).saturating_sub(header);
                // SAFETY: `c` points at a cmsghdr inside our buffer.
                let data = unsafe { libc::CMSG_DATA(c) };
                let end = cmsg.0.as_ptr() as usize + controllen;
                let count = data_len / mem::size_of::<RawFd>();
                for i in 0..count {
                    // SAFETY: the i-th descriptor of this SCM_RIGHTS message; the kernel
                    // wrote `data_len` bytes of them after the header. The bound check keeps
                    // the read inside our buffer regardless.
                    let p = unsafe { data.add(i * mem::size_of::<RawFd>()) };
                    if p as usize + mem::size_of::<RawFd>() > end {
                        break;
                    }
                    // SAFETY: `p` is within the buffer (checked above); unaligned read.
                    let raw = unsafe { std::ptr::read_unaligned(p.cast::<RawFd>()) };
                    if raw >= 0 {
                        // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor in this
                        // process; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                    }
                }
            }
            // SAFETY: `mhdr` and `c` are as above; CMSG_NXTHDR returns null past the end.
            c = unsafe { libc::CMSG_NXTHDR(&mhdr, c) };
        }
    }
    let bytes = usize::try_from(n).unwrap_or(0);
    Ok(Datagram {
        bytes,
        trunc: mhdr.msg_flags & libc::MSG_TRUNC != 0,
        ctrunc: mhdr.msg_flags & libc::MSG_CTRUNC != 0,
        fds,
    })
}
