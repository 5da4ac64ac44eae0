//! Helpers shared by the `net_*` tests: a real tap in a private network namespace with a
//! packet socket on its host side, split rings laid out by hand, and frame builders.
#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// An EtherType reserved for local experiments: nothing else on the tap uses it.
pub const ETH_TEST: u16 = 0x88b5;

/// A tap (opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, up) in a fresh network namespace
/// that disappears with its last fd, and an AF_PACKET socket bound to it for `ETH_TEST`.
pub struct NetnsTap {
    /// The tap queue fd (close-on-exec).
    pub tap: OwnedFd,
    /// The host side: frames the guest sends arrive here; frames sent here reach the guest.
    pub packet: OwnedFd,
    /// The tap's ifindex.
    pub ifindex: i32,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

fn check(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

fn make_netns_tap() -> io::Result<NetnsTap> {
    // SAFETY: unshare only changes this thread's network namespace.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "unshare")?;
    // Keep the namespace quiet: no IPv6 router solicitations or MLD reports on the tap.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
    // SAFETY: plain open of a device node; the fd is checked and owned below.
    let fd = check(
        unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) },
        "open /dev/net/tun",
    )?;
    // SAFETY: `fd` was just opened by us.
    let tap = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        data: [0; 24],
    };
    req.name[..6].copy_from_slice(b"bhtap0");
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    check(
        // SAFETY: TUNSETIFF reads and writes a full-size ifreq.
        unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &mut req) },
        "TUNSETIFF",
    )?;
    // SAFETY: a plain socket in this thread's (new) namespace; owned below.
    let s = check(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )?;
    // SAFETY: just created.
    let ctl = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS/SIOCGIFINDEX read and write a full-size ifreq.
    unsafe {
        check(
            libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req),
            "SIOCGIFFLAGS",
        )?;
        let mut f = i16::from_ne_bytes([req.data[0], req.data[1]]);
        f |= libc::IFF_UP as i16;
        req.data[..2].copy_from_slice(&f.to_ne_bytes());
        check(
            libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req),
            "SIOCSIFFLAGS",
        )?;
        check(
            libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFINDEX, &mut req),
            "SIOCGIFINDEX",
        )?;
    }
    let ifindex = i32::from_ne_bytes([req.data[0], req.data[1], req.data[2], req.data[3]]);
    let proto = ETH_TEST.to_be();
    // SAFETY: a packet socket in this thread's namespace; owned below.
    let p = check(
        unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        },
        "socket(AF_PACKET)",
    )?;
    // SAFETY: just created.
    let packet = unsafe { OwnedFd::from_raw_fd(p) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex;
    check(
        // SAFETY: bind reads `size_of::<sockaddr_ll>()` bytes from `sll`.
        unsafe {
            libc::bind(
                packet.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        },
        "bind(AF_PACKET)",
    )?;
    Ok(NetnsTap {
        tap,
        packet,
        ifindex,
    })
}

impl NetnsTap {
    /// Creates the namespace, tap and packet socket on a throwaway thread (a network
    /// namespace is per thread), so the test process itself stays where it was.
    pub fn new() -> NetnsTap {
        std::thread::spawn(make_netns_tap)
            .join()
            .expect("netns thread")
            .expect("cannot create a tap in a fresh network namespace (root needed)")
    }

    /// Sends one Ethernet frame out of the host side, towards the tap fd.
    pub fn inject(&self, frame: &[u8]) {
        // SAFETY: send reads `frame.len()` bytes from `frame`.
        let n = unsafe {
            libc::send(
                self.packet.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
        assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    /// Waits up to `timeout` for a frame the guest side sent (ingress on the tap).
    pub fn receive(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.packet.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes one pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            if r <= 0 {
                continue;
            }
            let mut buf = vec![0u8; 70000];
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom writes at most `buf.len()` bytes and `len` address bytes.
            let n = unsafe {
                libc::recvfrom(
                    self.packet.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                continue;
            }
            // Our own injected frames show up as outgoing; skip them.
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            buf.truncate(n as usize);
            return Some(buf);
        }
    }
}

/// An Ethernet frame with EtherType `ETH_TEST`.
pub fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETH_TEST.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A split ring laid out by hand: descriptor table at `base`, avail ring at `base + 0x1000`,
/// used ring at `base + 0x2000` (MockSplitQueue's own layout overlaps the used ring with
/// the avail ring as soon as more than one chain is posted).
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    pub fn new(base: u64, size: u16) -> Ring {
        assert!(size <= 256);
        Ring {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Writes raw descriptors at the next free table slots and returns the first index.
    pub fn write_descs(&mut self, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> u16 {
        let first = self.next_desc;
        for d in descs {
            let at = self.desc + 16 * u64::from(self.next_desc % self.size);
            mem.write_obj(*d, GuestAddress(at)).unwrap();
            self.next_desc += 1;
        }
        first
    }

    /// Publishes `head` in the avail ring.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Adds and publishes a chain of `(addr, len, device-writable)` descriptors.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let first = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                let mut next = 0;
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                    next = (first + i as u16 + 1) % self.size;
                }
                RawDescriptor::from(SplitDescriptor::new(a, l, flags, next))
            })
            .collect();
        let head = self.write_descs(mem, &raw) % self.size;
        self.publish(mem, head);
        head
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used entry `i`: (head, len).
    pub fn used_entry(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// A device-side queue over this ring.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }
}
