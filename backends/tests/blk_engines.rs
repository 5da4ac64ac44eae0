//! The I/O engines with many requests in flight: every engine, with and without O_DIRECT
//! (guest buffers aligned and not, the latter through the bounce buffer), runs a batch of
//! writes, a FLUSH and a batch of reads submitted together and completing in whatever
//! order the engine returns them; the image and guest memory must hold exactly what each
//! request asked for.

use std::fs::OpenOptions;
use std::sync::Arc;

use bulkhead_backends::blk::engine::Engine;
use bulkhead_backends::blk::request::{begin, serial_bytes, Outcome, Started, Target};
use bulkhead_backends::blk::{Cache, Disk, EngineKind, Stats};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REQUESTS: u64 = 24;
/// Sectors per request.
const SPR: u64 = 3;
const HDR: u64 = 0x1000;
const STATUS: u64 = 0x2000;
const WDATA: u64 = 0x10_0000;
const RDATA: u64 = 0x20_0000;
const SLOT: u64 = 0x1000;

fn pattern(req: u64) -> Vec<u8> {
    (0..SPR * 512)
        .map(|i| (req * 31 + i * 7 + i / 512) as u8)
        .collect()
}

/// The chain of request `i`: header, data (unaligned for odd `i`), status.
fn chain(mem: &GuestMemoryMmap, i: u64, kind: u32, data: u64) -> Vec<Descriptor> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    // Requests go to the image in reverse order of their heads.
    h[8..16].copy_from_slice(&((REQUESTS - 1 - i) * SPR).to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR + 16 * i)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let mut d = vec![Descriptor::new(HDR + 16 * i, 16, next, 0)];
    if kind != VIRTIO_BLK_T_FLUSH {
        let w = if kind == VIRTIO_BLK_T_IN {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        d.push(Descriptor::new(data, (SPR * 512) as u32, next | w, 0));
    }
    d.push(Descriptor::new(STATUS + i, 1, VRING_DESC_F_WRITE as u16, 0));
    d
}

fn data_at(base: u64, i: u64) -> u64 {
    base + i * SLOT + if i % 2 == 1 { 8 } else { 0 }
}

/// Submits all `chains` at once, then completes them in the engine's order.
fn run_batch(
    engine: &mut Engine,
    mem: &GuestMemoryMmap,
    target: &Target<'_>,
    chains: &[Vec<Descriptor>],
) -> Vec<Outcome> {
    let mut reqs: Vec<Option<_>> = Vec::new();
    let mut outcomes = vec![None; chains.len()];
    for (i, descs) in chains.iter().enumerate() {
        match begin(mem, i as u16, descs, target) {
            Started::Done(o) => {
                outcomes[i] = Some(o);
                reqs.push(None);
            }
            Started::Io(req) => {
                engine.submit(i as u64, &req).expect("submit");
                reqs.push(Some(req));
            }
        }
    }
    let mut done = Vec::new();
    while engine.in_flight() > 0 {
        engine.wait(1, &mut done).expect("wait");
        for (token, r) in done.drain(..) {
            let req = reqs[token as usize].take().expect("completed twice");
            let r = match r {
                Ok(n) if (n as u64) < req.bytes => req.run_blocking_from(target.disk, n),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            outcomes[token as usize] = Some(req.finish(mem, r, target));
        }
    }
    outcomes.into_iter().map(|o| o.expect("outcome")).collect()
}

fn exercise(kind: EngineKind, cache: Cache) {
    let path = std::env::temp_dir().join(format!(
        "bulkhead-blk-engine-{}-{kind:?}-{cache:?}.img",
        std::process::id()
    ));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(REQUESTS * SPR * 512 + 4096).unwrap();
    drop(f);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let disk = match Disk::with_cache(file, false, cache) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("SKIP {kind:?} {cache:?}: {e} (the temp dir's file system refuses O_DIRECT)");
            let _ = std::fs::remove_file(&path);
            return;
        }
    };
    let mut engine = match Engine::new(kind, &disk, 64, &mut None) {
        Ok((e, _)) => e,
        Err(e) => {
            eprintln!("SKIP {kind:?}: {e}");
            let _ = std::fs::remove_file(&path);
            return;
        }
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let stats = Stats::default();
    let serial = serial_bytes("engines");
    let target = Target {
        disk: &disk,
        serial: &serial,
        stats: &stats,
        max_descriptors: 8,
    };
    let ok = Outcome::Completed {
        status: 0,
        used_len: 1,
    };

    let writes: Vec<_> = (0..REQUESTS)
        .map(|i| {
            mem.write_slice(&pattern(i), GuestAddress(data_at(WDATA, i)))
                .unwrap();
            chain(&mem, i, VIRTIO_BLK_T_OUT, data_at(WDATA, i))
        })
        .collect();
    for (i, o) in run_batch(&mut engine, &mem, &target, &writes)
        .into_iter()
        .enumerate()
    {
        assert_eq!(o, ok, "{kind:?} {cache:?}: write {i}");
    }
    let flush = [chain(&mem, 0, VIRTIO_BLK_T_FLUSH, 0)];
    assert_eq!(run_batch(&mut engine, &mem, &target, &flush), vec![ok]);
    let image = std::fs::read(&path).unwrap();
    for i in 0..REQUESTS {
        let at = ((REQUESTS - 1 - i) * SPR * 512) as usize;
        assert_eq!(
            &image[at..at + (SPR * 512) as usize],
            &pattern(i)[..],
            "{kind:?} {cache:?}: image at request {i}"
        );
    }

    let reads: Vec<_> = (0..REQUESTS)
        .map(|i| chain(&mem, i, VIRTIO_BLK_T_IN, data_at(RDATA, i)))
        .collect();
    let read_ok = Outcome::Completed {
        status: 0,
        used_len: (SPR * 512) as u32 + 1,
    };
    for (i, o) in run_batch(&mut engine, &mem, &target, &reads)
        .into_iter()
        .enumerate()
    {
        assert_eq!(o, read_ok, "{kind:?} {cache:?}: read {i}");
        let i = i as u64;
        let mut got = vec![0u8; (SPR * 512) as usize];
        mem.read_slice(&mut got, GuestAddress(data_at(RDATA, i)))
            .unwrap();
        assert_eq!(got, pattern(i), "{kind:?} {cache:?}: read {i} data");
    }
    let s = stats.snapshot();
    assert_eq!(s.errors, 0);
    assert_eq!(s.bytes_written, REQUESTS * SPR * 512);
    assert_eq!(s.bytes_read, REQUESTS * SPR * 512);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn every_engine_runs_many_requests_in_flight() {
    for kind in [EngineKind::IoUring, EngineKind::Threads, EngineKind::Inline] {
        for cache in [Cache::Writeback, Cache::None] {
            exercise(kind, cache);
        }
    }
}

#[test]
fn auto_falls_back_or_uses_io_uring() {
    let path = std::env::temp_dir().join(format!("bulkhead-blk-auto-{}.img", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(4096).unwrap();
    let disk = Arc::new(Disk::new(f, false).unwrap());
    let (engine, fallback) = Engine::new(EngineKind::Auto, &disk, 8, &mut None).expect("auto");
    match fallback {
        None => assert_eq!(engine.name(), "io-uring"),
        Some(why) => {
            eprintln!("io_uring refused here: {why}");
            assert_eq!(engine.name(), "threads");
        }
    }
    let _ = std::fs::remove_file(&path);
}
