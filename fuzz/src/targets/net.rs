//! `net-tx` and `net-rx`: `bulkhead-net`'s TX chain validation (`net::tx::process_tx`) and
//! RX delivery (`net::rx::Rx::process`) on a fuzzed virtqueue, with a datagram socket
//! standing in for the tap.
//!
//! TX is checked against a reference model: every chain popped is returned with used
//! length 0, and exactly the chains that are whole, device-readable, in guest RAM and of a
//! legal size reach the wire, byte for byte, in order. RX checks that every used length
//! fits the chain it names, that the counters agree with what was returned, and that a
//! frame is left pending only when the guest ran out of buffers.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use bulkhead_backends::net::config::{HDR_LEN, LEGACY_HDR_LEN, MAX_FRAME_LEN};
use bulkhead_backends::net::rx::{Rx, RxContext, RxStop};
use bulkhead_backends::net::tx::{process_tx, TxContext};
use bulkhead_backends::net::{NetStats, Tap, TxDrop, TX_DROPS};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::Bytes;

use crate::guest::{
    build_ring, in_ram, GuestMem, Ring, RingSeed, DATA, F_INDIRECT, F_NEXT, F_WRITE, INDIRECT,
};
use crate::input::{Input, Writer};
use crate::mix;

struct Fixture {
    g: GuestMem,
    stats: NetStats,
    tap: Tap,
    wire: UnixDatagram,
    buf: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let (a, b) = UnixDatagram::pair().expect("socketpair");
        b.set_nonblocking(true).expect("nonblocking");
        Fixture {
            g: GuestMem::new(),
            stats: NetStats::default(),
            tap: Tap::from_fd(OwnedFd::from(a)).expect("tap"),
            wire: b,
            buf: Vec::new(),
        }
    }

    /// Empties both directions of the stand-in tap.
    fn drain(&mut self) {
        let mut scratch = vec![0u8; HDR_LEN + MAX_FRAME_LEN + 16];
        while self.wire.recv(&mut scratch).is_ok() {}
        while self.tap.read(&mut scratch).is_ok() {}
    }
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

fn with_fixture(f: impl FnOnce(&mut Fixture) -> u64) -> u64 {
    FIXTURE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let fx = slot.get_or_insert_with(Fixture::new);
        fx.drain();
        fx.g.clear();
        f(fx)
    })
}

/// The descriptors of every chain the ring offers, read before the device touches memory.
fn chains(g: &GuestMem, ring: &Ring) -> Vec<(u16, Vec<Descriptor>)> {
    let mut q = ring.fresh_queue();
    let mut out = Vec::new();
    while let Some(chain) = q.pop_descriptor_chain(&g.mem) {
        let head = chain.head_index();
        out.push((head, chain.take(usize::from(ring.size) + 1).collect()));
    }
    out
}

/// Whether any descriptor of `chains` may be written by the device over the rings (wherever
/// the input placed them), the indirect area or the descriptor table (a guest that does that rewrites its own chains
/// while they are processed, and the models below no longer apply).
fn self_modifying(ring: &Ring, chains: &[(u16, Vec<Descriptor>)]) -> bool {
    let table = (ring.desc, ring.desc + 16 * u64::from(ring.size));
    let overlaps = |d: &Descriptor, (lo, hi): (u64, u64)| {
        let a = d.addr().0;
        a < hi && a.saturating_add(u64::from(d.len())) > lo
    };
    chains.iter().flat_map(|(_, ds)| ds).any(|d| {
        overlaps(d, (0, DATA))
            || overlaps(d, table)
            || overlaps(d, (ring.avail, ring.avail + 6 + 2 * u64::from(ring.size)))
            || overlaps(d, (ring.used, ring.used + 8 * 257))
    })
}

/// The NIC's own address when a TX input turns the source-MAC filter on.
const NIC_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Runs one TX input. Config bit 4: the legacy 10-byte header; bit 5: the NIC has
/// [`NIC_MAC`] and frames from any other source are dropped.
pub fn run_tx(data: &[u8]) -> u64 {
    with_fixture(|fx| {
        let mut inp = Input::new(data);
        let mut ring = build_ring(&fx.g, &mut inp);
        let hdr_len = if ring.extra & 1 != 0 {
            LEGACY_HDR_LEN
        } else {
            HDR_LEN
        };
        let source_mac = (ring.extra & 2 != 0).then_some(NIC_MAC);
        let offered = chains(&fx.g, &ring);
        // The model: which chains go out, and as which bytes.
        let max = usize::from(ring.size);
        let expected: Vec<Option<Vec<u8>>> = offered
            .iter()
            .map(|(_, ds)| {
                let last = ds.last()?;
                if last.has_next() || ds.len() > max {
                    return None;
                }
                let mut bytes = Vec::new();
                for d in ds {
                    if d.is_write_only() || !in_ram(d.addr().0, u64::from(d.len())) {
                        return None;
                    }
                    let mut b = vec![0u8; d.len() as usize];
                    fx.g.mem.read_slice(&mut b, d.addr()).ok()?;
                    bytes.extend_from_slice(&b);
                    if bytes.len() > hdr_len + MAX_FRAME_LEN {
                        return None;
                    }
                }
                if bytes.len() < hdr_len {
                    return None;
                }
                match source_mac {
                    Some(m) if bytes.get(hdr_len + 6..hdr_len + 12) != Some(&m[..]) => None,
                    _ => Some(bytes),
                }
            })
            .collect();
        let before = fx.stats.snapshot();
        let ctx = TxContext {
            tap: &fx.tap,
            stats: &fx.stats,
            hdr_len,
            source_mac,
        };
        let n = process_tx(&mut ring.queue, &fx.g.mem, &ctx, &mut fx.buf);
        let after = fx.stats.snapshot();
        // A head outside the ring cannot be returned to the used ring: process_tx stops
        // there (the chains after it wait for the next kick).
        let cut = offered
            .iter()
            .position(|(h, _)| *h >= ring.size)
            .map_or(offered.len(), |i| i + 1);
        let returned = offered[..cut]
            .iter()
            .filter(|(h, _)| *h < ring.size)
            .count();
        assert_eq!(
            n, returned,
            "process_tx returned {n} chains, the model {returned}"
        );
        let mut sig = mix(offered.len() as u64, hdr_len as u64);
        let modifying = self_modifying(&ring, &offered);
        if !modifying {
            assert_eq!(
                ring.used_idx(&fx.g.mem),
                Some(ring.start.wrapping_add(n as u16)),
                "used index"
            );
            for (i, (head, _)) in offered[..returned].iter().enumerate() {
                let (id, len) = ring.used_entry(&fx.g.mem, i as u16).expect("used entry");
                assert_eq!((id, len), (u32::from(*head), 0), "used entry {i}");
            }
        }
        let sent = after.tx_packets - before.tx_packets;
        let tap_refused = after.tx_drop(TxDrop::Tap) - before.tx_drop(TxDrop::Tap);
        let drops: u64 = (0..TX_DROPS)
            .map(|i| after.tx_drops[i] - before.tx_drops[i])
            .sum();
        assert_eq!(
            sent + drops,
            cut as u64,
            "every chain taken is sent or dropped"
        );
        for i in 0..TX_DROPS {
            sig = mix(sig, after.tx_drops[i] - before.tx_drops[i]);
        }
        if !modifying {
            let want: Vec<&Vec<u8>> = expected[..cut].iter().flatten().collect();
            assert_eq!(
                sent + tap_refused,
                want.len() as u64,
                "chains sent differ from the model"
            );
            // What reached the wire, in order (the tap may refuse some when it is full).
            let mut scratch = vec![0u8; HDR_LEN + MAX_FRAME_LEN + 16];
            let mut at = 0;
            while let Ok(got) = fx.wire.recv(&mut scratch) {
                let got = &scratch[..got];
                while at < want.len() && want[at].as_slice() != got {
                    at += 1;
                }
                assert!(
                    at < want.len(),
                    "a frame on the wire that the model did not send"
                );
                at += 1;
            }
        }
        sig
    })
}

/// Runs one RX input:
///
/// ```text
/// u8 n_frames (mod 5), then per frame u16 len (bit 15 clear: up to 2 KiB; set: x3, up to
/// 96 KiB) and u8 fill; then the ring (config bit 4: mergeable buffers, bit 5: legacy header)
/// ```
pub fn run_rx(data: &[u8]) -> u64 {
    with_fixture(|fx| {
        let mut inp = Input::new(data);
        let n_frames = inp.u8() % 5;
        let mut frames = Vec::new();
        for i in 0..n_frames {
            let raw = inp.u16();
            let fill = inp.u8();
            let len = if raw & 0x8000 == 0 {
                usize::from(raw & 0x7ff)
            } else {
                usize::from(raw & 0x7fff) * 3
            };
            frames.push(
                (0..len)
                    .map(|j| (j as u8).wrapping_mul(31).wrapping_add(fill ^ i))
                    .collect::<Vec<u8>>(),
            );
        }
        let mut ring = build_ring(&fx.g, &mut inp);
        let mergeable = ring.extra & 1 != 0;
        let hdr_len = if !mergeable && ring.extra & 2 != 0 {
            LEGACY_HDR_LEN
        } else {
            HDR_LEN
        };
        let offered = chains(&fx.g, &ring);
        let modifying = self_modifying(&ring, &offered);
        let mut queued = 0;
        for f in &frames {
            if fx.wire.send(f).is_ok() {
                queued += 1;
            }
        }
        let before = fx.stats.snapshot();
        let ctx = RxContext {
            tap: &fx.tap,
            stats: &fx.stats,
            hdr_len,
            mergeable,
        };
        let mut rx = Rx::default();
        let first = rx.process(&mut ring.queue, &fx.g.mem, &ctx);
        let second = rx.process(&mut ring.queue, &fx.g.mem, &ctx);
        let after = fx.stats.snapshot();
        let used = first.used + second.used;
        let delivered = first.delivered + second.delivered;
        assert!(
            delivered <= queued,
            "delivered {delivered} of {queued} frames"
        );
        assert_eq!(
            after.rx_packets - before.rx_packets,
            delivered as u64,
            "rx_packets"
        );
        assert!(
            used <= offered.len(),
            "{used} used entries for {} chains",
            offered.len()
        );
        if second.stop == RxStop::TapEmpty {
            assert!(
                !rx.pending(),
                "a frame is pending although the tap is empty"
            );
        }
        if !modifying {
            assert_eq!(
                ring.used_idx(&fx.g.mem),
                Some(ring.start.wrapping_add(used as u16)),
                "used index"
            );
            for i in 0..used {
                let (id, len) = ring.used_entry(&fx.g.mem, i as u16).expect("used entry");
                // Skipped chains are returned at once, filled ones when their frame is
                // complete: the used ring is not in pop order, but each entry names a chain
                // that was offered.
                let Some((_, ds)) = offered.iter().find(|(h, _)| u32::from(*h) == id) else {
                    panic!("used entry {i} names head {id}, which was never offered");
                };
                let capacity: u64 = ds
                    .iter()
                    .filter(|d| d.is_write_only())
                    .map(|d| u64::from(d.len()))
                    .sum();
                assert!(
                    u64::from(len) <= capacity,
                    "used length {len} for a chain of {capacity} writable bytes"
                );
                if len > 0 {
                    assert!(
                        ds.iter()
                            .all(|d| d.is_write_only() && in_ram(d.addr().0, u64::from(d.len()))),
                        "bytes written into a chain with a read-only or outside descriptor"
                    );
                }
            }
        }
        let mut sig = mix(delivered as u64, used as u64);
        sig = mix(sig, u64::from(mergeable) | (hdr_len as u64) << 1);
        sig = mix(sig, first.stop as u64 * 3 + second.stop as u64);
        for i in 0..4 {
            sig = mix(sig, after.rx_skips[i] - before.rx_skips[i]);
        }
        mix(sig, after.rx_dropped - before.rx_dropped)
    })
}

/// TX seeds: frames over one, two and three descriptors, through an indirect table.
pub fn seeds_tx() -> Vec<Vec<u8>> {
    let mut frame = vec![0u8; HDR_LEN];
    frame.extend((0..60u8).map(|i| i.wrapping_mul(7)));
    let one = RingSeed {
        cfg: 4,
        heads: vec![0],
        descs: vec![(DATA, frame.len() as u32, 0, 0)],
        data: frame.clone(),
        ..Default::default()
    };
    let split = RingSeed {
        cfg: 4,
        heads: vec![0, 2],
        descs: vec![
            (DATA, HDR_LEN as u32, F_NEXT, 1),
            (DATA + HDR_LEN as u64, 60, 0, 0),
            (DATA, frame.len() as u32, 0, 0),
        ],
        data: frame.clone(),
        ..Default::default()
    };
    let indirect = RingSeed {
        cfg: 4,
        heads: vec![0],
        descs: vec![(INDIRECT, 32, F_INDIRECT, 0)],
        indirect: vec![
            (DATA, HDR_LEN as u32, F_NEXT, 1),
            (DATA + HDR_LEN as u64, 60, 0, 0),
        ],
        data: frame.clone(),
    };
    let mut legacy = one.clone();
    legacy.cfg |= 0x10;
    vec![
        one.encode(),
        split.encode(),
        indirect.encode(),
        legacy.encode(),
    ]
}

/// RX seeds: a small frame into one buffer, a large one over mergeable buffers.
pub fn seeds_rx() -> Vec<Vec<u8>> {
    let with_frames = |frames: &[(u16, u8)], ring: RingSeed| {
        let mut w = Writer::new();
        w.u8(frames.len() as u8);
        for &(len, fill) in frames {
            w.u16(len).u8(fill);
        }
        w.bytes(&ring.encode());
        w.finish()
    };
    let buffers = |n: u16, len: u32| RingSeed {
        cfg: 4,
        heads: (0..n).collect(),
        descs: (0..n)
            .map(|i| (DATA + u64::from(i) * 0x1000, len, F_WRITE, 0))
            .collect(),
        ..Default::default()
    };
    let mut mergeable = buffers(4, 1500);
    mergeable.cfg |= 0x10;
    vec![
        with_frames(&[(100, 1)], buffers(1, 2048)),
        with_frames(&[(100, 1), (1400, 2)], buffers(2, 2048)),
        with_frames(&[(0x8000 | 1000, 3)], mergeable.clone()),
        with_frames(&[(1400, 4)], buffers(1, 512)),
        with_frames(&[(60, 5), (60, 6), (60, 7)], mergeable),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> bulkhead_backends::net::stats::NetStatsSnapshot {
        FIXTURE.with(|c| c.borrow().as_ref().expect("fixture").stats.snapshot())
    }

    #[test]
    fn tx_seeds_reach_the_wire() {
        for (i, seed) in seeds_tx().iter().enumerate() {
            let before = stats_or_default();
            run_tx(seed);
            let after = stats();
            assert!(
                after.tx_packets > before.tx_packets,
                "seed {i} sent nothing"
            );
            assert_eq!(after.tx_drops, before.tx_drops, "seed {i} dropped a chain");
        }
    }

    #[test]
    fn rx_seeds_deliver() {
        for (i, seed) in seeds_rx().iter().enumerate() {
            let before = stats_or_default();
            run_rx(seed);
            let after = stats();
            if i == 3 {
                assert_eq!(
                    after.rx_dropped,
                    before.rx_dropped + 1,
                    "too big for the buffer"
                );
            } else {
                assert!(
                    after.rx_packets > before.rx_packets,
                    "seed {i} delivered nothing"
                );
                assert_eq!(after.rx_skips, before.rx_skips, "seed {i} skipped a chain");
            }
        }
    }

    fn stats_or_default() -> bulkhead_backends::net::stats::NetStatsSnapshot {
        FIXTURE.with(|c| {
            c.borrow()
                .as_ref()
                .map(|f| f.stats.snapshot())
                .unwrap_or_default()
        })
    }
}
