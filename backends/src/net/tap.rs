//! The tap fd: non-blocking frame I/O and the two ioctls the backend makes on it
//! (`TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`), neither of which needs `CAP_NET_ADMIN`.
//!
//! Every read and write carries exactly one frame preceded by the virtio-net header (the
//! tap's vnet header, `IFF_VNET_HDR`). The same code drives any datagram fd, which the tests
//! use as a stand-in where a real tap is not needed.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `struct ifreq` as far as TUNSETIFF/TUNGETIFF use it: a name and the flags.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    pad: [u8; 22],
}

impl IfReq {
    fn zeroed() -> Self {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            pad: [0; 22],
        }
    }
}

/// Why a tap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty or too long.
    #[error("tap name {0:?} must be 1 to 15 bytes")]
    Name(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error("cannot attach to tap {name}: {err}")]
    Attach {
        /// The interface.
        name: String,
        /// What the kernel said.
        #[source]
        err: io::Error,
    },
    /// The fd is not a tun/tap fd attached to an interface.
    #[error("fd is not an attached tap: {0}")]
    NotATap(#[source] io::Error),
    /// The tap lacks a flag this backend needs.
    #[error("tap {name} was not opened with {missing}")]
    Flags {
        /// The interface.
        name: String,
        /// The missing flag(s).
        missing: &'static str,
    },
    /// fcntl failed.
    #[error("cannot make the tap non-blocking: {0}")]
    Fcntl(#[source] io::Error),
}

/// One tap queue fd.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
}

impl Tap {
    /// Opens `/dev/net/tun` and attaches to (creating if needed) the tap `name` with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`. Needs `CAP_NET_ADMIN`; for standalone use.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq::zeroed();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads a `struct ifreq` (we pass one of full size) and writes
        // the chosen name back into it; the fd is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                err: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            fd: OwnedFd::from(file),
        })
    }

    /// Takes an already open fd (a tap from `bulkheadd`, or a datagram socket in tests) and
    /// makes it non-blocking. No check that it is a tap: see [`Tap::check`].
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(TapError::Fcntl(io::Error::last_os_error()));
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(TapError::Fcntl(io::Error::last_os_error()));
        }
        Ok(Tap { fd })
    }

    /// Checks that this is a tap (not tun) fd with `IFF_NO_PI | IFF_VNET_HDR`; returns the
    /// interface name.
    pub fn check(&self) -> Result<String, TapError> {
        let mut req = IfReq::zeroed();
        // SAFETY: TUNGETIFF writes a `struct ifreq` into the full-size one we pass.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNGETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::NotATap(io::Error::last_os_error()));
        }
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        let flags = libc::c_int::from(req.flags);
        let missing = if flags & libc::IFF_TAP == 0 {
            Some("IFF_TAP (it is a tun device)")
        } else if flags & libc::IFF_VNET_HDR == 0 {
            Some("IFF_VNET_HDR")
        } else if flags & libc::IFF_NO_PI == 0 {
            Some("IFF_NO_PI")
        } else {
            None
        };
        match missing {
            Some(missing) => Err(TapError::Flags { name, missing }),
            None => Ok(name),
        }
    }

    /// `TUNSETVNETHDRSZ`: the size of the vnet header prepended to every frame.
    pub fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        let len =
            libc::c_int::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer we pass.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `TUNSETOFFLOAD`: which offloads (`TUN_F_*`) frames read from the tap may carry.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (with its vnet header); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Writes one frame (with its vnet header).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
