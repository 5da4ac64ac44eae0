//! `inflight`: the in-flight region a new backend maps and takes over after a restart
//! (`backends::inflight`), which a hostile frontend or a crash can leave in any state.
//!
//! Three modes, by the first byte:
//! - **raw**: region bytes straight from the input, any shape; `take_over` of every queue
//!   (and one past the end) must give heads that are in the ring, distinct, ordered by
//!   their counters, with `next_avail = used_idx + heads`, and a second take-over must agree;
//! - **shape**: `map` with any file size, mmap size, offset and shape accepts exactly the
//!   regions that fit;
//! - **model**: a backend's life as the protocol has it (mark, complete in two phases, die
//!   between any two steps, restart) against a model of what must be resubmitted.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

use bulkhead_backends::inflight::{
    queue_region_size, InflightRegion, Takeover, MAX_QUEUES, MAX_QUEUE_SIZE,
};

use crate::input::{Input, Writer};
use crate::mix;

thread_local! {
    /// One memfd reused by every input (truncated and rewritten each time).
    static FILE: RefCell<Option<File>> = const { RefCell::new(None) };
}

fn with_file<R>(f: impl FnOnce(&File) -> R) -> R {
    FILE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let file = slot.get_or_insert_with(|| {
            // SAFETY: memfd_create with a valid C string; the fd is checked and owned below.
            let fd = unsafe { libc::memfd_create(c"fuzz-inflight".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create failed");
            // SAFETY: a new descriptor nothing else owns.
            unsafe { File::from_raw_fd(fd) }
        });
        f(file)
    })
}

/// Sets the memfd to `len` bytes holding `content` (zero-padded or cut).
fn fill(file: &File, content: &[u8], len: usize) {
    file.set_len(0).expect("truncate");
    file.set_len(len as u64).expect("size");
    let mut w = file;
    use std::io::Seek;
    w.seek(std::io::SeekFrom::Start(0)).expect("seek");
    w.write_all(&content[..content.len().min(len)])
        .expect("write");
}

fn dup(file: &File) -> File {
    file.try_clone().expect("dup")
}

/// Checks one take-over result against `ring_size` and `used_idx`; returns a signature.
fn check_takeover(t: &Takeover, region: &InflightRegion, ring_size: u16, used_idx: u16) -> u64 {
    match t {
        Takeover::Fresh => 1,
        Takeover::Resume {
            heads,
            next_avail,
            counter: _,
            ignored,
        } => {
            let limit = ring_size.min(region.queue_size());
            let mut seen = vec![false; usize::from(region.queue_size())];
            for &h in heads {
                assert!(h < limit, "resubmits head {h} of a ring of {limit}");
                assert!(!seen[usize::from(h)], "resubmits head {h} twice");
                seen[usize::from(h)] = true;
            }
            assert_eq!(
                *next_avail,
                used_idx.wrapping_add(heads.len() as u16),
                "next_avail is not used_idx plus the heads in flight"
            );
            mix(mix(2, heads.len() as u64), (*ignored).min(4) as u64)
        }
    }
}

fn raw(inp: &mut Input<'_>) -> u64 {
    let queues = 1 + u16::from(inp.u8() % 4);
    let raw_size = inp.u16();
    // Mostly small rings (a take-over walks every head); one in eight up to the maximum.
    let queue_size = if raw_size & 0xe000 != 0xe000 {
        1 + raw_size % 300
    } else {
        1 + raw_size % MAX_QUEUE_SIZE
    };
    let mut calls = Vec::new();
    for _ in 0..=queues {
        let ring_size = inp.u16();
        let ring_size = if ring_size & 0x8000 == 0 {
            ring_size % (queue_size + 2)
        } else {
            ring_size
        };
        calls.push((ring_size, inp.u16()));
    }
    let len = usize::from(queues) * queue_region_size(queue_size);
    let content = inp.rest();
    with_file(|file| {
        fill(file, content, len);
        let region = InflightRegion::map(dup(file), len as u64, 0, queues, queue_size)
            .expect("a region that fits maps");
        let mut sig = mix(u64::from(queues), u64::from(queue_size.min(300)));
        for (q, &(ring_size, used_idx)) in calls.iter().enumerate() {
            let q = q as u16;
            let first = region.take_over(q, ring_size, used_idx);
            sig = mix(sig, check_takeover(&first, &region, ring_size, used_idx));
            let again = region.take_over(q, ring_size, used_idx);
            check_takeover(&again, &region, ring_size, used_idx);
            let heads = |t: &Takeover| match t {
                Takeover::Fresh => Vec::new(),
                Takeover::Resume { heads, .. } => heads.clone(),
            };
            assert_eq!(heads(&first), heads(&again), "a second take-over disagrees");
            if q >= queues {
                assert_eq!(first, Takeover::Fresh, "a queue past the region");
            }
            // Whatever the region says, the backend's own calls stay in range.
            region.mark(q, ring_size, 7);
            region.completing(q, used_idx);
            region.completed(q, ring_size, used_idx);
            let _ = region.in_flight(q);
        }
        sig
    })
}

fn shape(inp: &mut Input<'_>) -> u64 {
    let file_len = u64::from(inp.u32() % (1 << 20));
    let mmap_size = match inp.u8() % 3 {
        0 => file_len,
        1 => u64::from(inp.u32()),
        _ => inp.u64(),
    };
    let offset = match inp.u8() % 3 {
        0 => 0,
        1 => u64::from(inp.u16() % 4) * 4096,
        _ => inp.u64(),
    };
    let queues = inp.u16() % (MAX_QUEUES + 3);
    let raw_size = inp.u16();
    let queue_size = if raw_size & 0x8000 == 0 {
        raw_size % 600
    } else {
        raw_size
    };
    with_file(|file| {
        fill(file, &[], file_len as usize);
        let r = InflightRegion::map(dup(file), mmap_size, offset, queues, queue_size);
        let fits =
            (1..=MAX_QUEUES).contains(&queues) && (1..=MAX_QUEUE_SIZE).contains(&queue_size) && {
                let need = (usize::from(queues) * queue_region_size(queue_size)) as u64;
                mmap_size >= need
                    && offset % 4096 == 0
                    && offset.checked_add(need).is_some_and(|end| end <= file_len)
            };
        match r {
            Ok(region) => {
                assert!(fits, "mapped a region that does not fit: {queues}x{queue_size}, size {mmap_size}, offset {offset}, file {file_len}");
                assert_eq!(
                    (region.num_queues(), region.queue_size()),
                    (queues, queue_size)
                );
                let t = region.take_over(queues - 1, queue_size, 0);
                check_takeover(&t, &region, queue_size, 0);
                3
            }
            Err(_) => {
                assert!(!fits, "refused a region that fits: {queues}x{queue_size}, size {mmap_size}, offset {offset}, file {file_len}");
                4
            }
        }
    })
}

/// What one backend incarnation does to one queue, step by step.
#[derive(Default)]
struct Model {
    /// Heads in flight: head → submission counter.
    inflight: BTreeMap<u16, u64>,
    counter: u64,
    used: u16,
}

fn model(inp: &mut Input<'_>) -> u64 {
    let queues = 1 + u16::from(inp.u8() % 3);
    let queue_size = 1 + u16::from(inp.u8() % 64);
    let used0 = inp.u16();
    let (mut region, file) = InflightRegion::create(queues, queue_size).expect("create");
    let len = file.metadata().expect("metadata").len();
    let mut models: Vec<Model> = (0..queues)
        .map(|_| Model {
            used: used0,
            ..Model::default()
        })
        .collect();
    for q in 0..queues {
        assert_eq!(region.take_over(q, queue_size, used0), Takeover::Fresh);
    }
    let mut sig = 5u64;
    let mut steps = 0;
    while !inp.is_empty() && steps < 256 {
        steps += 1;
        let op = inp.u8();
        let q = u16::from(op >> 4) % queues;
        let m = &mut models[usize::from(q)];
        let head = u16::from(inp.u8()) % queue_size;
        match op & 7 {
            // Take a request: mark it before starting it.
            0..=2 => {
                if let std::collections::btree_map::Entry::Vacant(e) = m.inflight.entry(head) {
                    region.mark(q, head, m.counter);
                    e.insert(m.counter);
                    m.counter = m.counter.wrapping_add(1);
                }
            }
            // Complete one in flight, both phases.
            3 | 4 => {
                if let Some((&h, _)) = m
                    .inflight
                    .iter()
                    .nth(usize::from(head) % m.inflight.len().max(1))
                {
                    region.completing(q, h);
                    m.used = m.used.wrapping_add(1);
                    region.completed(q, h, m.used);
                    m.inflight.remove(&h);
                }
            }
            // Die after the used ring showed a completion, before the mark was cleared.
            5 => {
                if let Some((&h, _)) = m.inflight.iter().next() {
                    region.completing(q, h);
                    m.used = m.used.wrapping_add(1);
                    m.inflight.remove(&h);
                }
                region = restart(&file, len, queues, queue_size, &mut models);
                sig = mix(sig, 6);
            }
            // Die before the used ring was written.
            6 => {
                if let Some((&h, _)) = m.inflight.iter().next() {
                    region.completing(q, h);
                }
                region = restart(&file, len, queues, queue_size, &mut models);
                sig = mix(sig, 7);
            }
            // Just die.
            _ => {
                region = restart(&file, len, queues, queue_size, &mut models);
                sig = mix(sig, 8);
            }
        }
    }
    mix(sig, models.iter().map(|m| m.inflight.len() as u64).sum())
}

/// A successor maps the same region, takes every queue over and must be told exactly what
/// the model has in flight, oldest first; it then completes those, as the backend does.
fn restart(
    file: &File,
    len: u64,
    queues: u16,
    queue_size: u16,
    models: &mut [Model],
) -> InflightRegion {
    let region = InflightRegion::map(dup(file), len, 0, queues, queue_size).expect("remap");
    for (q, m) in models.iter_mut().enumerate() {
        let q = q as u16;
        let mut want: Vec<(u64, u16)> = m.inflight.iter().map(|(&h, &c)| (c, h)).collect();
        want.sort_unstable();
        let t = region.take_over(q, queue_size, m.used);
        let Takeover::Resume {
            heads,
            next_avail,
            counter,
            ignored,
        } = t
        else {
            panic!("a region in use came back fresh");
        };
        assert_eq!(
            heads,
            want.iter().map(|&(_, h)| h).collect::<Vec<_>>(),
            "queue {q}: resubmits the wrong requests"
        );
        assert_eq!(ignored, 0);
        assert_eq!(next_avail, m.used.wrapping_add(heads.len() as u16));
        if let Some(&(c, _)) = want.last() {
            assert_eq!(counter, c.wrapping_add(1), "next counter");
        }
        for h in heads {
            region.completing(q, h);
            m.used = m.used.wrapping_add(1);
            region.completed(q, h, m.used);
        }
        m.inflight.clear();
        m.counter = counter;
        assert!(
            region.in_flight(q).is_empty(),
            "marks left after resubmission"
        );
    }
    region
}

/// Runs one input.
pub fn run(data: &[u8]) -> u64 {
    let mut inp = Input::new(data);
    match inp.u8() % 3 {
        0 => raw(&mut inp),
        1 => shape(&mut inp),
        _ => model(&mut inp),
    }
}

/// A region left with requests in flight, a few shapes, and protocol histories.
pub fn seeds() -> Vec<Vec<u8>> {
    // Raw: one queue of 8; heads 5 and 2 in flight, a stale last_batch_head.
    let mut region = vec![0u8; queue_region_size(8)];
    region[0..8].copy_from_slice(&0u64.to_le_bytes());
    region[8..10].copy_from_slice(&1u16.to_le_bytes());
    region[10..12].copy_from_slice(&8u16.to_le_bytes());
    region[12..14].copy_from_slice(&5u16.to_le_bytes());
    region[14..16].copy_from_slice(&3u16.to_le_bytes());
    for (head, counter) in [(5usize, 9u64), (2, 4)] {
        let at = 16 + 16 * head;
        region[at] = 1;
        region[at + 8..at + 16].copy_from_slice(&counter.to_le_bytes());
    }
    let mut raw = Writer::new();
    raw.u8(0).u8(0).u16(7).u16(8).u16(3).u16(8).u16(4);
    raw.bytes(&region);
    let mut shape = Writer::new();
    shape.u8(1).u32(8192).u8(0).u8(0).u16(2).u16(8);
    let mut life = Writer::new();
    life.u8(2).u8(1).u8(15).u16(65530);
    for (op, head) in [
        (0u8, 1u8),
        (0, 4),
        (0x10, 2),
        (3, 0),
        (0, 7),
        (5, 0),
        (0, 3),
        (6, 0),
        (0x13, 0),
        (7, 0),
    ] {
        life.u8(op).u8(head);
    }
    vec![raw.finish(), shape.finish(), life.finish()]
}
