//! `blk`: virtio-blk request validation and execution (`blk::request`) on chains popped from
//! a fuzzed virtqueue, as the backend's queue worker runs them.
//!
//! Invariants checked for every chain: no panic; the chain the in-flight resubmission path
//! reads (`chain_at`) is the one virtio-queue's iterator yields; a completed request
//! claims no more used bytes than the chain has writable, and its status byte is in guest
//! memory at the end of the last descriptor, which is device-writable; an OK status means
//! every descriptor lay in guest RAM, the header was readable and, on a read-only disk,
//! nothing was written; the image never changes size, and a read-only one never changes.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;

use bulkhead_backends::blk::request::{chain_at, process_chain, serial_bytes, Outcome, Target};
use bulkhead_backends::blk::{Disk, Stats};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::guest::{
    build_ring, in_ram, GuestMem, RingSeed, DATA, F_INDIRECT, F_NEXT, F_WRITE, INDIRECT,
};
use crate::input::Input;
use crate::mix;

/// Image size in sectors.
const SECTORS: u64 = 16;

struct Fixture {
    g: GuestMem,
    rw: Disk,
    ro: Disk,
    ro_file: File,
    ro_sum: u64,
    stats: Stats,
    serial: [u8; 20],
}

fn memfd(name: &std::ffi::CStr, fill: u8) -> File {
    // SAFETY: memfd_create with a valid C string; the fd is checked and owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: a new descriptor nothing else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(&vec![fill; (SECTORS * 512) as usize])
        .expect("image");
    f
}

fn checksum(f: &File) -> u64 {
    let mut f = f;
    let mut buf = Vec::new();
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_to_end(&mut buf).expect("read image");
    let mut h = 0u64;
    for chunk in buf.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = mix(h, u64::from_le_bytes(w));
    }
    mix(h, buf.len() as u64)
}

impl Fixture {
    fn new() -> Self {
        let rw = memfd(c"fuzz-blk-rw", 0xa5);
        // The read-only disk's file is writable: only the backend's read-only check can
        // keep it unchanged.
        let ro_file = memfd(c"fuzz-blk-ro", 0x5a);
        let ro_sum = checksum(&ro_file);
        Fixture {
            g: GuestMem::new(),
            rw: Disk::new(rw, false).expect("disk"),
            ro: Disk::new(ro_file.try_clone().expect("dup"), true).expect("disk"),
            ro_file,
            ro_sum,
            stats: Stats::default(),
            serial: serial_bytes("fuzz-serial"),
        }
    }
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

fn key(d: &Descriptor) -> (u64, u32, u16, u16) {
    (d.addr().0, d.len(), d.flags(), d.next())
}

/// Runs one input. The config byte's bit 4 picks the read-only disk.
pub fn run(data: &[u8]) -> u64 {
    FIXTURE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let fx = slot.get_or_insert_with(Fixture::new);
        run_with(fx, data)
    })
}

fn run_with(fx: &mut Fixture, data: &[u8]) -> u64 {
    fx.g.clear();
    let mem = &fx.g.mem;
    let mut inp = Input::new(data);
    let mut ring = build_ring(&fx.g, &mut inp);
    let readonly = ring.extra & 1 != 0;
    let disk = if readonly { &fx.ro } else { &fx.rw };
    let target = Target {
        disk,
        serial: &fx.serial,
        stats: &fx.stats,
        max_descriptors: usize::from(ring.size),
    };
    let limit = target.max_descriptors + 1;
    let mut sig = 0u64;
    while let Some(chain) = ring.queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.clone().take(limit).collect();
        let again = chain_at(mem, GuestAddress(ring.desc), ring.size, head, limit);
        assert_eq!(
            descs.iter().map(key).collect::<Vec<_>>(),
            again.iter().map(key).collect::<Vec<_>>(),
            "chain_at disagrees with the virtqueue's chain iterator at head {head}"
        );
        let kind: Option<u32> = descs
            .first()
            .and_then(|d| mem.read_obj::<u32>(d.addr()).ok());
        let outcome = process_chain(chain, &target);
        // The signature is the set of (request type, chain length, outcome) seen, so that
        // inputs doing something new, not just more of the same, join the pool.
        let mut f = mix(
            descs.len().min(4) as u64,
            u64::from(kind.unwrap_or(u32::MAX).min(64)),
        );
        match outcome {
            Outcome::Broken => f = mix(f, 0xb0),
            Outcome::Completed { status, used_len } => {
                f = mix(mix(f, u64::from(status)), u64::from(used_len.min(2)));
                check_completed(fx, &descs, status, used_len, readonly, kind);
            }
        }
        sig |= 1 << (f % 64);
        let _ = ring.queue.add_used(mem, head, outcome.used_len());
    }
    let size = disk.file().metadata().map(|m| m.len()).unwrap_or(0);
    assert_eq!(size, SECTORS * 512, "the image changed size");
    if readonly {
        assert_eq!(
            checksum(&fx.ro_file),
            fx.ro_sum,
            "a read-only image was written"
        );
    }
    sig
}

fn check_completed(
    fx: &Fixture,
    descs: &[Descriptor],
    status: u8,
    used_len: u32,
    readonly: bool,
    kind: Option<u32>,
) {
    let mem = &fx.g.mem;
    assert!(
        [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].contains(&u32::from(status)),
        "status {status} is not a virtio-blk status"
    );
    let last = descs.last().expect("a completed chain has descriptors");
    assert!(
        last.is_write_only() && !last.has_next() && last.len() >= 1,
        "completed without a writable status descriptor: {:?}",
        descs.iter().map(key).collect::<Vec<_>>()
    );
    let status_addr = last.addr().0 + u64::from(last.len()) - 1;
    assert!(in_ram(status_addr, 1), "status byte outside guest RAM");
    let got: u8 = mem
        .read_obj(GuestAddress(status_addr))
        .expect("status byte");
    assert_eq!(
        got, status,
        "status byte in memory differs from the outcome"
    );
    let writable: u64 = descs
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum();
    assert!(
        u64::from(used_len) <= writable && used_len >= 1,
        "used length {used_len} with {writable} writable bytes"
    );
    if u32::from(status) == VIRTIO_BLK_S_OK {
        // A flush carries no data: descriptors between header and status are ignored.
        let used = if kind == Some(VIRTIO_BLK_T_FLUSH) {
            &descs[..1]
        } else {
            descs
        };
        for d in used {
            assert!(
                in_ram(d.addr().0, u64::from(d.len())),
                "OK status with a descriptor outside guest RAM: {:?}",
                key(d)
            );
        }
        let first = &descs[0];
        assert!(
            !first.is_write_only() && first.len() >= 16,
            "OK status without a readable header"
        );
        let kind = kind.expect("header readable");
        assert!(
            [
                VIRTIO_BLK_T_IN,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_FLUSH,
                VIRTIO_BLK_T_GET_ID,
                VIRTIO_BLK_T_DISCARD,
                VIRTIO_BLK_T_WRITE_ZEROES
            ]
            .contains(&kind),
            "OK status for request type {kind}"
        );
        if readonly {
            assert!(
                ![
                    VIRTIO_BLK_T_OUT,
                    VIRTIO_BLK_T_DISCARD,
                    VIRTIO_BLK_T_WRITE_ZEROES
                ]
                .contains(&kind),
                "OK status for a write (type {kind}) on a read-only disk"
            );
        }
        if kind == VIRTIO_BLK_T_OUT || kind == VIRTIO_BLK_T_FLUSH {
            assert_eq!(used_len, 1, "a write reports data written to the driver");
        }
    }
}

fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Well-formed requests of every type, and a few classic malformed shapes.
pub fn seeds() -> Vec<Vec<u8>> {
    let hdr = DATA;
    let buf = DATA + 0x100;
    let status = DATA + 0x80;
    let r = 0;
    let w = F_WRITE;
    let n = F_NEXT;
    let chain3 = |kind: u32, sector: u64, data_len: u32, data_flags: u16| RingSeed {
        cfg: 4, // 16 entries
        heads: vec![0],
        descs: vec![
            (hdr, 16, r | n, 1),
            (buf, data_len, data_flags | n, 2),
            (status, 1, w, 0),
        ],
        data: header(kind, sector),
        ..Default::default()
    };
    let mut seeds = vec![
        chain3(VIRTIO_BLK_T_IN, 0, 1024, w).encode(),
        chain3(VIRTIO_BLK_T_OUT, 3, 512, r).encode(),
        chain3(VIRTIO_BLK_T_GET_ID, 0, 20, w).encode(),
        chain3(VIRTIO_BLK_T_IN, SECTORS - 2, 1024, w).encode(), // the last two sectors
    ];
    // Read-only disk (config bit 4), write attempt.
    let mut ro = chain3(VIRTIO_BLK_T_OUT, 0, 512, r);
    ro.cfg |= 0x10;
    seeds.push(ro.encode());
    // Flush: header and status only.
    seeds.push(
        RingSeed {
            cfg: 4,
            heads: vec![0],
            descs: vec![(hdr, 16, r | n, 1), (status, 1, w, 0)],
            data: header(VIRTIO_BLK_T_FLUSH, 0),
            ..Default::default()
        }
        .encode(),
    );
    // Discard / write-zeroes with one segment each (payload right after the header).
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let mut data = header(kind, 0);
        data.extend_from_slice(&2u64.to_le_bytes());
        data.extend_from_slice(&4u32.to_le_bytes());
        data.extend_from_slice(&0u32.to_le_bytes());
        seeds.push(
            RingSeed {
                cfg: 4,
                heads: vec![0],
                descs: vec![(hdr, 32, r | n, 1), (status, 1, w, 0)],
                data,
                ..Default::default()
            }
            .encode(),
        );
    }
    // Through an indirect table.
    seeds.push(
        RingSeed {
            cfg: 4,
            heads: vec![0],
            descs: vec![(INDIRECT, 48, F_INDIRECT, 0)],
            indirect: vec![(hdr, 16, r | n, 1), (buf, 512, w | n, 2), (status, 1, w, 0)],
            data: header(VIRTIO_BLK_T_IN, 1),
        }
        .encode(),
    );
    // Two requests; data in region B.
    seeds.push(
        RingSeed {
            cfg: 3,
            heads: vec![0, 3],
            descs: vec![
                (hdr, 16, r | n, 1),
                (crate::guest::B_BASE, 512, w | n, 2),
                (status, 1, w, 0),
                (hdr, 16, r | n, 4),
                (status + 1, 1, w, 0),
            ],
            data: header(VIRTIO_BLK_T_IN, 2),
            ..Default::default()
        }
        .encode(),
    );
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_seeds_complete_without_errors() {
        for (i, seed) in seeds().iter().enumerate() {
            if i == 4 {
                continue; // the write to the read-only disk
            }
            let mut fx = Fixture::new();
            run_with(&mut fx, seed);
            let s = fx.stats.snapshot();
            assert!(s.requests > 0, "seed {i} made no request");
            assert_eq!((s.errors, s.broken), (0, 0), "seed {i} failed: {s:?}");
        }
        let mut fx = Fixture::new();
        run_with(&mut fx, &seeds()[4]);
        assert_eq!(
            fx.stats.snapshot().errors,
            1,
            "the read-only write is refused"
        );
    }
}
