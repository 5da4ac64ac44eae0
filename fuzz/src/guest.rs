//! Guest memory for the chain targets, and a split virtqueue laid out in it from fuzz bytes.
//!
//! Guest RAM is two regions with a hole between them (`A` at 0, 64 KiB; `B` at 128 KiB,
//! 16 KiB), each mapped with an inaccessible guard page on both sides: a backend that ever
//! touched a byte just outside guest RAM through a raw pointer would fault here instead of
//! silently reading a neighbouring allocation.
//!
//! Descriptor fields in the input are not used raw: addresses and lengths pass through
//! [`desc_addr`] and [`desc_len`], which land most of them in or at the edges of guest RAM
//! (random 64-bit addresses almost never would) and keep the rest arbitrary.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::input::{Input, Writer};

/// Guest address of region A.
pub const A_BASE: u64 = 0;
/// Size of region A.
pub const A_SIZE: usize = 0x1_0000;
/// Guest address of region B (after a 64 KiB hole).
pub const B_BASE: u64 = 0x2_0000;
/// Size of region B.
pub const B_SIZE: usize = 0x4000;
/// The descriptor table (up to 256 entries).
pub const DESC: u64 = 0x0;
/// The avail ring.
pub const AVAIL: u64 = 0x1000;
/// The used ring.
pub const USED: u64 = 0x2000;
/// Where the input's indirect descriptors go (16 entries).
pub const INDIRECT: u64 = 0x3000;
/// Indirect descriptors an input may give.
pub const INDIRECT_MAX: usize = 16;
/// Where the input's data bytes go in region A (the rest follow in region B).
pub const DATA: u64 = 0x3100;

const PAGE: usize = 4096;

/// One anonymous mapping with guard pages on both sides; unmapped on drop.
struct Guarded {
    base: *mut libc::c_void,
    total: usize,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: `base`/`total` are exactly what mmap returned; the guest-memory regions
        // built on it (not owning it) were dropped before this (field order of GuestMem).
        unsafe {
            libc::munmap(self.base, self.total);
        }
    }
}

fn guarded(size: usize) -> (Guarded, *mut u8) {
    let total = size + 2 * PAGE;
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert!(base != libc::MAP_FAILED, "mmap of guest memory failed");
    let g = Guarded { base, total };
    let inner = (base as usize + PAGE) as *mut u8;
    // SAFETY: both ranges lie inside the mapping just made.
    let r = unsafe {
        libc::mprotect(base, PAGE, libc::PROT_NONE)
            | libc::mprotect(inner.add(size).cast(), PAGE, libc::PROT_NONE)
    };
    assert_eq!(r, 0, "mprotect of the guard pages failed");
    (g, inner)
}

/// Guest RAM: regions A and B, guarded.
pub struct GuestMem {
    /// The memory, as the backends see it. Declared first: dropped before the mappings.
    pub mem: GuestMemoryMmap,
    _maps: Vec<Guarded>,
    zeros: Vec<u8>,
}

impl Default for GuestMem {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestMem {
    /// Maps both regions.
    pub fn new() -> Self {
        let mut maps = Vec::new();
        let mut regions = Vec::new();
        for (gpa, size) in [(A_BASE, A_SIZE), (B_BASE, B_SIZE)] {
            let (g, inner) = guarded(size);
            // SAFETY: `inner..inner+size` is read/write memory of the mapping `g`, which
            // outlives the region (see the field order of GuestMem).
            let region = unsafe {
                MmapRegion::build_raw(
                    inner,
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .expect("guest region");
            regions.push(GuestRegionMmap::new(region, GuestAddress(gpa)).expect("region"));
            maps.push(g);
        }
        GuestMem {
            mem: GuestMemoryMmap::from_regions(regions).expect("guest memory"),
            _maps: maps,
            zeros: vec![0u8; A_SIZE.max(B_SIZE)],
        }
    }

    /// Zeroes all of guest RAM.
    pub fn clear(&self) {
        self.mem
            .write_slice(&self.zeros[..A_SIZE], GuestAddress(A_BASE))
            .expect("clear A");
        self.mem
            .write_slice(&self.zeros[..B_SIZE], GuestAddress(B_BASE))
            .expect("clear B");
    }
}

/// Maps a raw input address: most land in region A, region B, at their ends or in the hole;
/// some at the top of the address space; some stay raw.
pub fn desc_addr(raw: u64) -> u64 {
    match raw >> 60 {
        0..=7 => A_BASE + (raw & 0xffff),
        8..=10 => B_BASE + (raw & 0x3fff),
        11 => A_BASE + A_SIZE as u64 - (raw & 0xfff),
        12 => A_BASE + A_SIZE as u64 + (raw & 0xffff),
        13 => B_BASE + B_SIZE as u64 - (raw & 0xfff),
        14 => u64::MAX - (raw & 0xffff),
        _ => raw,
    }
}

/// The raw input address that [`desc_addr`] maps to `addr` in region A or B.
pub fn enc_addr(addr: u64) -> u64 {
    if addr >= B_BASE {
        (8 << 60) | (addr - B_BASE)
    } else {
        addr
    }
}

/// Maps a raw input length: mostly up to 8 KiB, whole sectors, tiny, or near 4 GiB.
pub fn desc_len(raw: u32) -> u32 {
    match raw >> 28 {
        0..=9 => raw & 0x1fff,
        10 => (raw & 0x3f) * 512,
        11 => raw & 0x1f,
        12 => u32::MAX - (raw & 0xffff),
        _ => raw,
    }
}

/// Maps raw input flags: mostly the three defined bits, sometimes anything.
pub fn desc_flags(raw: u16) -> u16 {
    if raw & 0x8000 == 0 {
        raw & 0x7
    } else {
        raw
    }
}

/// Maps a raw index (next, head): mostly within the ring, sometimes anything.
pub fn ring_index(raw: u16, size: u16) -> u16 {
    if raw & 0x8000 == 0 {
        raw % size
    } else {
        raw
    }
}

/// Flag bits as the input gives them.
pub const F_NEXT: u16 = 1;
/// Device-writable.
pub const F_WRITE: u16 = 2;
/// Indirect table.
pub const F_INDIRECT: u16 = 4;

/// A queue built from an input, and where its parts are.
pub struct Ring {
    /// The device-side queue, ready.
    pub queue: Queue,
    /// Ring size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Avail ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// The used index the queue starts at.
    pub start: u16,
    /// The target-specific bits of the config byte (bits 4..8).
    pub extra: u8,
}

impl Ring {
    /// Another device-side queue over the same ring, at the start (for reference models).
    pub fn fresh_queue(&self) -> Queue {
        make_queue(self.size, self.desc, self.avail, self.used, self.start)
    }

    /// Used ring entry `i` (counted from the start): (id, len).
    pub fn used_entry(&self, mem: &GuestMemoryMmap, i: u16) -> Option<(u32, u32)> {
        let at = self.used + 4 + 8 * u64::from(self.start.wrapping_add(i) % self.size);
        Some((
            mem.read_obj(GuestAddress(at)).ok()?,
            mem.read_obj(GuestAddress(at + 4)).ok()?,
        ))
    }

    /// The used index in guest memory.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> Option<u16> {
        mem.read_obj(GuestAddress(self.used + 2)).ok()
    }
}

fn read_desc(inp: &mut Input<'_>, size: u16) -> RawDescriptor {
    let addr = desc_addr(inp.u64());
    let len = desc_len(inp.u32());
    let flags = desc_flags(inp.u16());
    let next = ring_index(inp.u16(), size);
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Lays a split virtqueue out in (cleared) guest memory from `inp`:
///
/// ```text
/// u8 cfg        ring size 1 << ((cfg & 15) % 9); bits 4..8 are the target's
/// u8 placement  0: rings at DESC/AVAIL/USED; 1: table in region B; 2: table at the end
///               of region A; 3: avail ring at the end of region A
/// u16 start     next_avail = next_used = used idx = start
/// u8 n_avail    avail idx = start + n_avail; that many heads follow (at most the ring size)
/// u8 n_desc     descriptors given (at most the ring size)
/// u8 n_ind      indirect descriptors given at INDIRECT (at most 16)
/// u16 × heads, 16 bytes × descriptors (u64 addr, u32 len, u16 flags, u16 next), same × indirect
/// the rest      data bytes at DATA, then at the start of region B
/// ```
pub fn build_ring(g: &GuestMem, inp: &mut Input<'_>) -> Ring {
    let mem = &g.mem;
    let cfg = inp.u8();
    let size: u16 = 1 << ((cfg & 15) % 9);
    let placement = inp.u8() & 3;
    let start = inp.u16();
    let n_avail = inp.u8();
    let n_desc = usize::from(inp.u8()) % (usize::from(size) + 1);
    let n_ind = usize::from(inp.u8()) % (INDIRECT_MAX + 1);

    let table_bytes = 16 * u64::from(size);
    let (desc, avail) = match placement {
        1 => (B_BASE, AVAIL),
        2 => (A_BASE + A_SIZE as u64 - table_bytes, AVAIL),
        3 => (DESC, A_BASE + A_SIZE as u64 - 4 - 2 * u64::from(size) - 2),
        _ => (DESC, AVAIL),
    };
    let used = USED;

    for i in 0..u16::from(n_avail).min(size) {
        let head = ring_index(inp.u16(), size);
        let slot = avail + 4 + 2 * u64::from(start.wrapping_add(i) % size);
        let _ = mem.write_obj(head, GuestAddress(slot));
    }
    let _ = mem.write_obj(
        start.wrapping_add(u16::from(n_avail)),
        GuestAddress(avail + 2),
    );
    let _ = mem.write_obj(start, GuestAddress(used + 2));
    for i in 0..n_desc {
        let d = read_desc(inp, size);
        let _ = mem.write_obj(d, GuestAddress(desc + 16 * i as u64));
    }
    for i in 0..n_ind {
        let d = read_desc(inp, INDIRECT_MAX as u16);
        let _ = mem.write_obj(d, GuestAddress(INDIRECT + 16 * i as u64));
    }
    let data = inp.rest();
    let in_a = data.len().min(A_SIZE - DATA as usize);
    let _ = mem.write_slice(&data[..in_a], GuestAddress(DATA));
    let in_b = (data.len() - in_a).min(B_SIZE);
    let _ = mem.write_slice(&data[in_a..in_a + in_b], GuestAddress(B_BASE));

    Ring {
        queue: make_queue(size, desc, avail, used, start),
        size,
        desc,
        avail,
        used,
        start,
        extra: cfg >> 4,
    }
}

fn make_queue(size: u16, desc: u64, avail: u64, used: u64, start: u16) -> Queue {
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    let _ = queue.try_set_desc_table_address(GuestAddress(desc));
    let _ = queue.try_set_avail_ring_address(GuestAddress(avail));
    let _ = queue.try_set_used_ring_address(GuestAddress(used));
    queue.set_next_avail(start);
    queue.set_next_used(start);
    queue.set_ready(true);
    queue
}

/// Builds seeds in [`build_ring`]'s format.
#[derive(Debug, Clone, Default)]
pub struct RingSeed {
    /// Config byte (ring size code and target bits).
    pub cfg: u8,
    /// Heads published.
    pub heads: Vec<u16>,
    /// Descriptors: (guest address, len, flags, next).
    pub descs: Vec<(u64, u32, u16, u16)>,
    /// Indirect descriptors, same.
    pub indirect: Vec<(u64, u32, u16, u16)>,
    /// Data bytes (land at DATA).
    pub data: Vec<u8>,
}

impl RingSeed {
    /// The input bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(self.cfg)
            .u8(0)
            .u16(0)
            .u8(self.heads.len() as u8)
            .u8(self.descs.len() as u8)
            .u8(self.indirect.len() as u8);
        for &h in &self.heads {
            w.u16(h);
        }
        for &(a, l, f, n) in self.descs.iter().chain(&self.indirect) {
            w.u64(enc_addr(a)).u32(l).u16(f).u16(n);
        }
        w.bytes(&self.data);
        w.finish()
    }
}

/// Whether `len` bytes at `addr` are all guest RAM (the reference check the targets use).
pub fn in_ram(addr: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let within = |base: u64, size: usize| addr >= base && end <= base + size as u64;
    within(A_BASE, A_SIZE) || within(B_BASE, B_SIZE)
}
