//! Modern virtio-pci transport (common configuration structure, notifications) and
//! polled split virtqueues, all from ring 3 through the user-accessible identity map.

use crate::pci::VirtioPci;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
const NO_VECTOR: u16 = 0xffff;

/// Largest queue size used (the device's maximum is clamped to it): 42 requests of 3
/// descriptors in flight.
pub const QMAX: usize = 128;
/// Guest memory one queue needs (desc, avail, used: a page each; per-head scratch: two).
pub const QUEUE_MEM: u64 = 0x5000;
/// Bytes of per-head scratch (request header, segment, status, ID buffer).
pub const SCRATCH: u64 = 64;

#[inline]
pub fn r8(a: u64) -> u8 {
    // SAFETY: a is device MMIO (uncached, user-accessible identity map) or our DMA RAM.
    unsafe { read_volatile(a as *const u8) }
}
#[inline]
pub fn r16(a: u64) -> u16 {
    // SAFETY: as for r8.
    unsafe { read_volatile(a as *const u16) }
}
#[inline]
pub fn r32(a: u64) -> u32 {
    // SAFETY: as for r8.
    unsafe { read_volatile(a as *const u32) }
}
#[inline]
pub fn r64(a: u64) -> u64 {
    // SAFETY: as for r8.
    unsafe { read_volatile(a as *const u64) }
}
#[inline]
pub fn w8(a: u64, v: u8) {
    // SAFETY: as for r8.
    unsafe { write_volatile(a as *mut u8, v) }
}
#[inline]
pub fn w16(a: u64, v: u16) {
    // SAFETY: as for r8.
    unsafe { write_volatile(a as *mut u16, v) }
}
#[inline]
pub fn w32(a: u64, v: u32) {
    // SAFETY: as for r8.
    unsafe { write_volatile(a as *mut u32, v) }
}
#[inline]
pub fn w64(a: u64, v: u64) {
    // SAFETY: as for r8.
    unsafe { write_volatile(a as *mut u64, v) }
}

/// Zeroes guest RAM [a, a+len).
pub fn zero(a: u64, len: u64) {
    // SAFETY: a is DMA RAM owned by the driver.
    unsafe { core::ptr::write_bytes(a as *mut u8, 0, len as usize) };
}

// virtio_pci_common_cfg offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// The transport: addresses from the PCI capabilities.
#[derive(Clone, Copy, Default)]
pub struct Transport {
    pub pci: VirtioPci,
}

impl Transport {
    fn c(&self, off: u64) -> u64 {
        self.pci.common + off
    }

    pub fn status(&self) -> u8 {
        r8(self.c(DEVICE_STATUS))
    }

    pub fn set_status(&self, s: u8) {
        w8(self.c(DEVICE_STATUS), s);
    }

    pub fn add_status(&self, s: u8) {
        self.set_status(self.status() | s);
    }

    /// Writes 0 and waits (bounded by `deadline` TSC) until the status reads back 0.
    pub fn reset(&self, deadline: u64) -> bool {
        self.set_status(0);
        while self.status() != 0 {
            if crate::tsc::now() > deadline {
                return false;
            }
            core::hint::spin_loop();
        }
        true
    }

    pub fn device_features(&self) -> u64 {
        w32(self.c(DEVICE_FEATURE_SELECT), 0);
        let lo = r32(self.c(DEVICE_FEATURE)) as u64;
        w32(self.c(DEVICE_FEATURE_SELECT), 1);
        let hi = r32(self.c(DEVICE_FEATURE)) as u64;
        hi << 32 | lo
    }

    pub fn set_driver_features(&self, f: u64) {
        w32(self.c(DRIVER_FEATURE_SELECT), 0);
        w32(self.c(DRIVER_FEATURE), f as u32);
        w32(self.c(DRIVER_FEATURE_SELECT), 1);
        w32(self.c(DRIVER_FEATURE), (f >> 32) as u32);
    }

    pub fn num_queues(&self) -> u16 {
        r16(self.c(NUM_QUEUES))
    }

    pub fn no_config_vector(&self) {
        w16(self.c(CONFIG_MSIX_VECTOR), NO_VECTOR);
    }

    pub fn config_generation(&self) -> u8 {
        r8(self.c(CONFIG_GENERATION))
    }

    /// Device-specific config access.
    pub fn cfg16(&self, off: u64) -> u16 {
        r16(self.pci.device + off)
    }
    pub fn cfg32(&self, off: u64) -> u32 {
        r32(self.pci.device + off)
    }
    /// A 64-bit field read as two dwords, retried until the generation is stable.
    pub fn cfg64(&self, off: u64) -> u64 {
        loop {
            let g = self.config_generation();
            let lo = self.cfg32(off) as u64;
            let hi = self.cfg32(off + 4) as u64;
            if self.config_generation() == g {
                return hi << 32 | lo;
            }
        }
    }

    /// The device's maximum size for queue `idx` (0: not available).
    pub fn queue_max(&self, idx: u16) -> u16 {
        w16(self.c(QUEUE_SELECT), idx);
        r16(self.c(QUEUE_SIZE))
    }

    /// Programs and enables `q` (its memory must be set up by [`Virtq::init`]).
    pub fn setup_queue(&self, q: &mut Virtq) {
        w16(self.c(QUEUE_SELECT), q.idx);
        w16(self.c(QUEUE_SIZE), q.size);
        w16(self.c(QUEUE_MSIX_VECTOR), NO_VECTOR);
        for (off, v) in [
            (QUEUE_DESC, q.desc),
            (QUEUE_DRIVER, q.avail),
            (QUEUE_DEVICE, q.used),
        ] {
            w32(self.c(off), v as u32);
            w32(self.c(off + 4), (v >> 32) as u32);
        }
        let off = r16(self.c(QUEUE_NOTIFY_OFF)) as u64;
        q.notify = self.pci.notify + off * self.pci.notify_mult as u64;
        w16(self.c(QUEUE_ENABLE), 1);
    }
}

/// A polled split virtqueue.
pub struct Virtq {
    pub idx: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Per-head scratch area (SCRATCH bytes per descriptor index).
    pub scratch: u64,
    pub notify: u64,
    event_idx: bool,
    free: [u16; QMAX],
    nfree: usize,
    chains: [[u16; 4]; QMAX],
    chain_n: [u8; QMAX],
    done: [bool; QMAX],
    done_len: [u32; QMAX],
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    pub inflight: usize,
}

/// One buffer of a chain: guest-physical address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Virtq {
    pub const fn empty() -> Virtq {
        Virtq {
            idx: 0,
            size: 0,
            desc: 0,
            avail: 0,
            used: 0,
            scratch: 0,
            notify: 0,
            event_idx: false,
            free: [0; QMAX],
            nfree: 0,
            chains: [[0; 4]; QMAX],
            chain_n: [0; QMAX],
            done: [false; QMAX],
            done_len: [0; QMAX],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            inflight: 0,
        }
    }

    /// Lays the rings out in `mem` (QUEUE_MEM bytes for QMAX entries, page aligned), zeroes them and
    /// resets the driver-side state.
    pub fn init(&mut self, idx: u16, size: u16, mem: u64, event_idx: bool) {
        *self = Virtq::empty();
        self.idx = idx;
        self.size = size;
        self.desc = mem;
        self.avail = mem + 0x1000;
        self.used = mem + 0x2000;
        self.scratch = mem + 0x3000;
        self.event_idx = event_idx;
        // Rings and the scratch of `size` heads (a smaller queue leaves the rest alone).
        zero(mem, 0x3000 + size as u64 * SCRATCH);
        for i in 0..size as usize {
            self.free[i] = (size as usize - 1 - i) as u16;
        }
        self.nfree = size as usize;
        if !event_idx {
            w16(self.avail, AVAIL_F_NO_INTERRUPT);
        }
    }

    pub fn scratch_of(&self, head: u16) -> u64 {
        self.scratch + head as u64 * SCRATCH
    }

    pub fn free_descs(&self) -> usize {
        self.nfree
    }

    /// Allocates `n` (<= 4) descriptors; the first is the head. Returns the head.
    pub fn alloc(&mut self, n: usize) -> Option<u16> {
        if n == 0 || n > 4 || self.nfree < n {
            return None;
        }
        let mut ids = [0u16; 4];
        for id in ids.iter_mut().take(n) {
            self.nfree -= 1;
            *id = self.free[self.nfree];
        }
        let head = ids[0];
        self.chains[head as usize] = ids;
        self.chain_n[head as usize] = n as u8;
        self.done[head as usize] = false;
        Some(head)
    }

    /// The `i`-th descriptor index of the chain allocated at `head`.
    pub fn chain_desc(&self, head: u16, i: usize) -> u16 {
        self.chains[head as usize][i]
    }

    /// Writes descriptor `d` verbatim (hostile chains use this directly).
    pub fn write_desc(&mut self, d: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = self.desc + d as u64 * 16;
        w64(a, addr);
        w32(a + 8, len);
        w16(a + 12, flags);
        w16(a + 14, next);
    }

    /// Writes a well-formed chain from `bufs` into the descriptors allocated at `head`
    /// (by [`Virtq::alloc`] with `bufs.len()`) and makes it available. No kick.
    pub fn submit_at(&mut self, head: u16, bufs: &[Buf]) {
        for (i, b) in bufs.iter().enumerate() {
            let d = self.chains[head as usize][i];
            let last = i + 1 == bufs.len();
            let next = if last {
                0
            } else {
                self.chains[head as usize][i + 1]
            };
            let mut flags = if last { 0 } else { DESC_F_NEXT };
            if b.write {
                flags |= DESC_F_WRITE;
            }
            self.write_desc(d, b.addr, b.len, flags, next);
        }
        self.publish(head);
    }

    /// Puts `head` in the available ring (descriptors must be written already).
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        w16(self.avail + 4 + 2 * slot as u64, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w16(self.avail + 2, self.avail_idx);
        self.inflight += 1;
    }

    /// Notifies the device if it wants to be notified.
    pub fn kick(&mut self) {
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = self.kicked_idx;
        self.kicked_idx = new;
        let need = if self.event_idx {
            let ev = r16(self.used + 4 + 8 * self.size as u64);
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            r16(self.used) & USED_F_NO_NOTIFY == 0
        };
        if need {
            w16(self.notify, self.idx);
        }
    }

    /// Always notifies (used for the hostile cases, whatever the suppression says).
    pub fn kick_always(&mut self) {
        fence(Ordering::SeqCst);
        self.kicked_idx = self.avail_idx;
        w16(self.notify, self.idx);
    }

    /// Collects new used-ring entries.
    pub fn poll(&mut self) {
        loop {
            let used_idx = r16(self.used + 2);
            if used_idx == self.last_used {
                break;
            }
            fence(Ordering::Acquire);
            let slot = self.last_used % self.size;
            let e = self.used + 4 + 8 * slot as u64;
            let id = r32(e);
            let len = r32(e + 4);
            if (id as usize) < self.size as usize {
                self.done[id as usize] = true;
                self.done_len[id as usize] = len;
            }
            self.last_used = self.last_used.wrapping_add(1);
        }
        if self.event_idx {
            w16(self.avail + 4 + 2 * self.size as u64, self.last_used);
        }
    }

    /// If the chain at `head` completed: frees it and returns the used length.
    pub fn take(&mut self, head: u16) -> Option<u32> {
        let h = head as usize;
        if !self.done[h] {
            return None;
        }
        self.done[h] = false;
        for i in 0..self.chain_n[h] as usize {
            self.free[self.nfree] = self.chains[h][i];
            self.nfree += 1;
        }
        self.chain_n[h] = 0;
        self.inflight -= 1;
        Some(self.done_len[h])
    }

    /// The next used-ring entry in ring order, as (id, len); the chain stays allocated
    /// (receive buffers are made available again as they are with [`Virtq::repost`]).
    /// Do not mix with [`Virtq::poll`] on the same queue.
    pub fn next_used(&mut self) -> Option<(u32, u32)> {
        let used_idx = r16(self.used + 2);
        if used_idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = self.last_used % self.size;
        let e = self.used + 4 + 8 * slot as u64;
        let id = r32(e);
        let len = r32(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            w16(self.avail + 4 + 2 * self.size as u64, self.last_used);
        }
        self.inflight = self.inflight.saturating_sub(1);
        Some((id, len))
    }

    /// Like [`Virtq::next_used`], but frees the chain (when `id` is a head we allocated).
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        let (id, len) = self.next_used()?;
        let h = id as usize;
        if h < self.size as usize && self.chain_n[h] != 0 {
            for i in 0..self.chain_n[h] as usize {
                self.free[self.nfree] = self.chains[h][i];
                self.nfree += 1;
            }
            self.chain_n[h] = 0;
        }
        Some((id, len))
    }

    /// Makes the (still allocated) chain at `head` available again, descriptors unchanged.
    pub fn repost(&mut self, head: u16) {
        self.publish(head);
    }

    /// Polls until `head` completes or `deadline` (TSC) passes; also gives up when the
    /// device signals NEEDS_RESET through `t`.
    pub fn wait(&mut self, head: u16, deadline: u64, t: &Transport) -> Option<u32> {
        let mut n = 0u32;
        loop {
            self.poll();
            if let Some(len) = self.take(head) {
                return Some(len);
            }
            n = n.wrapping_add(1);
            if n.is_multiple_of(1024) {
                if crate::tsc::now() > deadline {
                    return None;
                }
                if n.is_multiple_of(65536) && t.status() & STATUS_NEEDS_RESET != 0 {
                    return None;
                }
            }
            core::hint::spin_loop();
        }
    }
}
