//! TX/RX chain handling: well-formed frames both ways (against a datagram socketpair
//! standing in for the tap, and against a real tap in a private network namespace), and
//! every malformed chain dropped or skipped, counted, with no panic and nothing sent.

mod net_util;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use bulkhead_backends::net::config::{HDR_LEN, MAX_FRAME_LEN};
use bulkhead_backends::net::rx::{Rx, RxContext, RxStop};
use bulkhead_backends::net::tx::{process_tx, TxContext};
use bulkhead_backends::net::{NetStats, RxSkip, Tap, TxDrop};
use net_util::{frame, NetnsTap, Ring};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x20_0000;
const RING: u64 = 0x1_0000;
const BUF: u64 = 0x4_0000;
const OUTSIDE: u64 = 0x40_0000;
const QSIZE: u16 = 16;
const R: bool = false;
const W: bool = true;

struct Fixture {
    mem: GuestMemoryMmap,
    stats: NetStats,
    tap: Tap,
    wire: UnixDatagram,
}

impl Fixture {
    fn new() -> Self {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        Fixture {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            stats: NetStats::default(),
            tap: Tap::from_fd(OwnedFd::from(a)).unwrap(),
            wire: b,
        }
    }

    fn tx(&self) -> TxContext<'_> {
        TxContext {
            tap: &self.tap,
            stats: &self.stats,
            hdr_len: HDR_LEN,
            source_mac: None,
        }
    }

    fn rx(&self, mergeable: bool) -> RxContext<'_> {
        RxContext {
            tap: &self.tap,
            stats: &self.stats,
            hdr_len: HDR_LEN,
            mergeable,
        }
    }

    fn wire_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 0x2_0000];
        match self.wire.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(_) => None,
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

#[test]
fn tx_gathers_header_and_frame_over_descriptors() {
    let f = Fixture::new();
    let mut hdr = [0u8; HDR_LEN];
    hdr[0] = 0; // no flags, GSO_NONE
    let fr = frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 1], &pattern(500, 3));
    f.mem.write_slice(&hdr, GuestAddress(BUF)).unwrap();
    f.mem
        .write_slice(&fr[..100], GuestAddress(BUF + 0x1000))
        .unwrap();
    f.mem
        .write_slice(&fr[100..], GuestAddress(BUF + 0x3000))
        .unwrap();
    let mut ring = Ring::new(RING, QSIZE);
    ring.add_chain(
        &f.mem,
        &[
            (BUF, HDR_LEN as u32, R),
            (BUF + 0x1000, 100, R),
            (BUF + 0x3000, (fr.len() - 100) as u32, R),
        ],
    );
    let mut q = ring.queue();
    let mut buf = Vec::new();
    assert_eq!(process_tx(&mut q, &f.mem, &f.tx(), &mut buf), 1);
    let got = f.wire_recv().expect("frame on the wire");
    assert_eq!(&got[..HDR_LEN], &hdr);
    assert_eq!(&got[HDR_LEN..], &fr[..]);
    assert_eq!(ring.used_idx(&f.mem), 1);
    assert_eq!(ring.used_entry(&f.mem, 0), (0, 0));
    let s = f.stats.snapshot();
    assert_eq!((s.tx_packets, s.tx_bytes), (1, fr.len() as u64));
    assert_eq!(s.tx_drops.iter().sum::<u64>(), 0);
}

#[test]
fn tx_from_a_foreign_source_mac_is_dropped_when_the_nic_has_an_address() {
    let f = Fixture::new();
    let own = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let spoofed = frame(
        [0xff; 6],
        [0x52, 0x54, 0, 0x66, 0x66, 0x66],
        &pattern(60, 1),
    );
    let honest = frame([0xff; 6], own, &pattern(60, 2));
    let mut ring = Ring::new(RING, QSIZE);
    for (i, fr) in [&spoofed, &honest].into_iter().enumerate() {
        let at = BUF + i as u64 * 0x1000;
        f.mem
            .write_slice(&[0u8; HDR_LEN], GuestAddress(at))
            .unwrap();
        f.mem
            .write_slice(fr, GuestAddress(at + HDR_LEN as u64))
            .unwrap();
        ring.add_chain(&f.mem, &[(at, (HDR_LEN + fr.len()) as u32, R)]);
    }
    // A header with no room for an Ethernet source address at all.
    ring.add_chain(&f.mem, &[(BUF, (HDR_LEN + 8) as u32, R)]);
    let ctx = TxContext {
        source_mac: Some(own),
        ..f.tx()
    };
    let mut q = ring.queue();
    assert_eq!(process_tx(&mut q, &f.mem, &ctx, &mut Vec::new()), 3);
    let got = f.wire_recv().expect("the honest frame on the wire");
    assert_eq!(&got[HDR_LEN..], &honest[..]);
    assert!(f.wire_recv().is_none(), "a spoofed frame reached the wire");
    let s = f.stats.snapshot();
    assert_eq!(s.tx_packets, 1);
    assert_eq!(s.tx_drop(TxDrop::ForeignMac), 2);
    // Without an address (no `--mac`), any source goes.
    let mut ring = Ring::new(RING, QSIZE);
    ring.add_chain(&f.mem, &[(BUF, (HDR_LEN + spoofed.len()) as u32, R)]);
    let mut q = ring.queue();
    assert_eq!(process_tx(&mut q, &f.mem, &f.tx(), &mut Vec::new()), 1);
    assert!(f.wire_recv().is_some(), "no filter without an address");
}

#[test]
fn tx_malformed_chains_are_dropped_and_counted() {
    let f = Fixture::new();
    let mut ring = Ring::new(RING, QSIZE);
    let mut expected = Vec::new();
    // A device-writable descriptor.
    ring.add_chain(&f.mem, &[(BUF, 12, R), (BUF + 0x1000, 60, W)]);
    expected.push(TxDrop::Writable);
    // Outside guest RAM, and straddling its end.
    ring.add_chain(&f.mem, &[(BUF, 12, R), (OUTSIDE, 60, R)]);
    expected.push(TxDrop::OutsideMemory);
    ring.add_chain(&f.mem, &[(MEM_SIZE as u64 - 8, 16, R)]);
    expected.push(TxDrop::OutsideMemory);
    ring.add_chain(&f.mem, &[(u64::MAX - 4, 12, R)]);
    expected.push(TxDrop::OutsideMemory);
    // A header shorter than 12 bytes.
    ring.add_chain(&f.mem, &[(BUF, 8, R)]);
    expected.push(TxDrop::ShortHeader);
    ring.add_chain(&f.mem, &[(BUF, 4, R), (BUF + 8, 4, R)]);
    expected.push(TxDrop::ShortHeader);
    // A frame longer than 64 KiB + an Ethernet header.
    ring.add_chain(
        &f.mem,
        &[(BUF, 12, R), (BUF + 0x1000, (MAX_FRAME_LEN + 1) as u32, R)],
    );
    expected.push(TxDrop::TooLong);
    // A loop: two descriptors pointing at each other.
    let first = ring.write_descs(
        &f.mem,
        &[
            RawDescriptor::from(SplitDescriptor::new(BUF, 12, VRING_DESC_F_NEXT as u16, 0)),
            RawDescriptor::from(SplitDescriptor::new(BUF, 64, VRING_DESC_F_NEXT as u16, 0)),
        ],
    );
    f.mem
        .write_obj(
            RawDescriptor::from(SplitDescriptor::new(
                BUF,
                12,
                VRING_DESC_F_NEXT as u16,
                first + 1,
            )),
            GuestAddress(RING + 16 * u64::from(first)),
        )
        .unwrap();
    f.mem
        .write_obj(
            RawDescriptor::from(SplitDescriptor::new(
                BUF,
                64,
                VRING_DESC_F_NEXT as u16,
                first,
            )),
            GuestAddress(RING + 16 * u64::from(first + 1)),
        )
        .unwrap();
    ring.publish(&f.mem, first);
    expected.push(TxDrop::BrokenChain);
    // An indirect table longer than the queue.
    let table = BUF + 0x2_0000;
    let n = u64::from(QSIZE) + 4;
    for i in 0..n {
        let flags = if i + 1 < n {
            VRING_DESC_F_NEXT as u16
        } else {
            0
        };
        f.mem
            .write_obj(
                RawDescriptor::from(SplitDescriptor::new(BUF, 12, flags, (i + 1) as u16)),
                GuestAddress(table + 16 * i),
            )
            .unwrap();
    }
    let ind = ring.write_descs(
        &f.mem,
        &[RawDescriptor::from(SplitDescriptor::new(
            table,
            (16 * n) as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))],
    );
    ring.publish(&f.mem, ind);
    expected.push(TxDrop::BrokenChain);
    // A next index beyond the table.
    let bad = ring.write_descs(
        &f.mem,
        &[RawDescriptor::from(SplitDescriptor::new(
            BUF,
            12,
            VRING_DESC_F_NEXT as u16,
            999,
        ))],
    );
    ring.publish(&f.mem, bad);
    expected.push(TxDrop::BrokenChain);

    let mut q = ring.queue();
    let mut buf = Vec::new();
    assert_eq!(
        process_tx(&mut q, &f.mem, &f.tx(), &mut buf),
        expected.len()
    );
    assert!(f.wire_recv().is_none(), "a malformed chain reached the tap");
    assert_eq!(ring.used_idx(&f.mem), expected.len() as u16);
    for i in 0..expected.len() as u16 {
        assert_eq!(ring.used_entry(&f.mem, i).1, 0, "used len of chain {i}");
    }
    let s = f.stats.snapshot();
    assert_eq!(s.tx_packets, 0);
    for why in [
        TxDrop::Writable,
        TxDrop::OutsideMemory,
        TxDrop::ShortHeader,
        TxDrop::TooLong,
        TxDrop::BrokenChain,
    ] {
        let want = expected.iter().filter(|&&e| e == why).count() as u64;
        assert_eq!(s.tx_drop(why), want, "{why:?}");
    }
}

#[test]
fn rx_merges_buffers_and_writes_num_buffers() {
    let f = Fixture::new();
    let mut ring = Ring::new(RING, QSIZE);
    for i in 0..4u64 {
        ring.add_chain(&f.mem, &[(BUF + i * 0x1000, 1500, W)]);
    }
    let mut q = ring.queue();
    let mut hdr = [0u8; HDR_LEN];
    hdr[0] = 1; // NEEDS_CSUM, passed through
    let payload = frame(
        [0x52, 0x54, 0, 0, 0, 1],
        [2, 0, 0, 0, 0, 9],
        &pattern(2986, 1),
    );
    let mut wire = hdr.to_vec();
    wire.extend_from_slice(&payload);
    assert_eq!(wire.len(), 3012);
    f.wire.send(&wire).unwrap();
    let mut rx = Rx::default();
    let out = rx.process(&mut q, &f.mem, &f.rx(true));
    assert_eq!(out.delivered, 1);
    assert_eq!(out.used, 3);
    assert_eq!(out.stop, RxStop::TapEmpty);
    assert_eq!(ring.used_idx(&f.mem), 3);
    assert_eq!(ring.used_entry(&f.mem, 0), (0, 1500));
    assert_eq!(ring.used_entry(&f.mem, 1), (1, 1500));
    assert_eq!(ring.used_entry(&f.mem, 2), (2, 12));
    let mut got = f.read(BUF, 1500);
    got.extend(f.read(BUF + 0x1000, 1500));
    got.extend(f.read(BUF + 0x2000, 12));
    assert_eq!(got[0], 1);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[HDR_LEN..], &payload[..]);
    let s = f.stats.snapshot();
    assert_eq!((s.rx_packets, s.rx_bytes), (1, payload.len() as u64));
}

#[test]
fn rx_without_buffers_leaves_frames_in_the_tap_and_resumes() {
    let f = Fixture::new();
    let mut ring = Ring::new(RING, QSIZE);
    let mut q = ring.queue();
    let mut rx = Rx::default();
    let mut wire = vec![0u8; HDR_LEN];
    wire.extend(frame([0xff; 6], [2, 0, 0, 0, 0, 1], &pattern(2000, 5)));
    f.wire.send(&wire).unwrap();
    // No buffers at all: nothing is read.
    let out = rx.process(&mut q, &f.mem, &f.rx(true));
    assert_eq!(out.stop, RxStop::NoBuffers);
    assert!(!rx.pending());
    // One buffer, too small for the whole frame: it is held, nothing is used yet.
    ring.add_chain(&f.mem, &[(BUF, 1024, W)]);
    let out = rx.process(&mut q, &f.mem, &f.rx(true));
    assert_eq!(
        (out.stop, out.used, out.delivered),
        (RxStop::NoBuffers, 0, 0)
    );
    assert!(rx.pending());
    assert_eq!(ring.used_idx(&f.mem), 0);
    // More buffers: the frame completes over both.
    ring.add_chain(&f.mem, &[(BUF + 0x1000, 512, W), (BUF + 0x2000, 1024, W)]);
    let out = rx.process(&mut q, &f.mem, &f.rx(true));
    // Every buffer is used up again, so the tap is left alone.
    assert_eq!(
        (out.stop, out.used, out.delivered),
        (RxStop::NoBuffers, 2, 1)
    );
    assert!(!rx.pending());
    assert_eq!(ring.used_entry(&f.mem, 0), (0, 1024));
    assert_eq!(ring.used_entry(&f.mem, 1), (1, (wire.len() - 1024) as u32));
    let mut got = f.read(BUF, 1024);
    got.extend(f.read(BUF + 0x1000, 512));
    got.extend(f.read(BUF + 0x2000, wire.len() - 1024 - 512));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2);
    assert_eq!(&got[HDR_LEN..], &wire[HDR_LEN..]);
}

#[test]
fn rx_malformed_chains_are_skipped_and_counted() {
    let f = Fixture::new();
    let mut ring = Ring::new(RING, QSIZE);
    ring.add_chain(&f.mem, &[(BUF, 1500, R)]); // read-only
    ring.add_chain(&f.mem, &[(BUF, 8, W)]); // smaller than a header
    ring.add_chain(&f.mem, &[(OUTSIDE, 1500, W)]); // outside RAM
    ring.add_chain(&f.mem, &[(BUF, 6, W), (BUF + 0x100, 4, R)]); // mixed
    let bad = ring.write_descs(
        &f.mem,
        &[RawDescriptor::from(SplitDescriptor::new(
            BUF,
            64,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            500,
        ))],
    );
    ring.publish(&f.mem, bad); // broken next index
    let good = ring.add_chain(&f.mem, &[(BUF + 0x8000, 2048, W)]);
    let mut q = ring.queue();
    let mut wire = vec![0u8; HDR_LEN];
    wire.extend(frame([0xff; 6], [2, 0, 0, 0, 0, 1], &pattern(100, 9)));
    f.wire.send(&wire).unwrap();
    let mut rx = Rx::default();
    let out = rx.process(&mut q, &f.mem, &f.rx(true));
    assert_eq!(out.delivered, 1);
    assert_eq!(out.used, 6);
    for i in 0..5 {
        assert_eq!(ring.used_entry(&f.mem, i).1, 0, "skipped chain {i}");
    }
    assert_eq!(
        ring.used_entry(&f.mem, 5),
        (u32::from(good), wire.len() as u32)
    );
    let got = f.read(BUF + 0x8000, wire.len());
    assert_eq!(&got[HDR_LEN..], &wire[HDR_LEN..]);
    let s = f.stats.snapshot();
    assert_eq!(s.rx_skip(RxSkip::ReadOnly), 2);
    assert_eq!(s.rx_skip(RxSkip::TooSmall), 1);
    assert_eq!(s.rx_skip(RxSkip::OutsideMemory), 1);
    assert_eq!(s.rx_skip(RxSkip::BrokenChain), 1);
    assert_eq!(s.rx_packets, 1);
}

#[test]
fn rx_without_mergeable_drops_frames_that_do_not_fit_and_keeps_the_buffer() {
    let f = Fixture::new();
    let mut ring = Ring::new(RING, QSIZE);
    ring.add_chain(&f.mem, &[(BUF, 1526, W)]);
    let mut q = ring.queue();
    let mut big = vec![0u8; HDR_LEN];
    big.extend(frame([0xff; 6], [2, 0, 0, 0, 0, 1], &pattern(3000, 2)));
    let mut small = vec![0u8; HDR_LEN];
    small.extend(frame([0xff; 6], [2, 0, 0, 0, 0, 1], &pattern(60, 4)));
    f.wire.send(&big).unwrap();
    f.wire.send(&small).unwrap();
    let mut rx = Rx::default();
    let out = rx.process(&mut q, &f.mem, &f.rx(false));
    assert_eq!(out.delivered, 1);
    assert_eq!(ring.used_idx(&f.mem), 1);
    assert_eq!(ring.used_entry(&f.mem, 0), (0, small.len() as u32));
    let got = f.read(BUF, small.len());
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[HDR_LEN..], &small[HDR_LEN..]);
    let s = f.stats.snapshot();
    assert_eq!((s.rx_dropped, s.rx_packets), (1, 1));
}

#[test]
fn real_tap_round_trip() {
    let ns = NetnsTap::new();
    let tap = Tap::from_fd(ns.tap.try_clone().unwrap()).unwrap();
    assert_eq!(tap.check().unwrap(), "bhtap0");
    tap.set_vnet_hdr_len(HDR_LEN).unwrap();
    tap.set_offload(libc::TUN_F_CSUM).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let stats = NetStats::default();

    // Guest -> host.
    let out = frame([0xff; 6], [0x52, 0x54, 0, 0xab, 0, 1], &pattern(200, 11));
    mem.write_slice(&[0u8; HDR_LEN], GuestAddress(BUF)).unwrap();
    mem.write_slice(&out, GuestAddress(BUF + HDR_LEN as u64))
        .unwrap();
    let mut tx_ring = Ring::new(RING, QSIZE);
    tx_ring.add_chain(&mem, &[(BUF, (HDR_LEN + out.len()) as u32, R)]);
    let mut txq = tx_ring.queue();
    let ctx = TxContext {
        tap: &tap,
        stats: &stats,
        hdr_len: HDR_LEN,
        source_mac: None,
    };
    assert_eq!(process_tx(&mut txq, &mem, &ctx, &mut Vec::new()), 1);
    let seen = ns
        .receive(Duration::from_secs(5))
        .expect("frame on the host side of the tap");
    assert_eq!(seen, out);
    assert_eq!(stats.snapshot().tx_packets, 1);

    // Host -> guest.
    let inbound = frame(
        [0x52, 0x54, 0, 0xab, 0, 1],
        [2, 0, 0, 0, 0, 2],
        &pattern(300, 13),
    );
    ns.inject(&inbound);
    let mut rx_ring = Ring::new(RING + 0x1_0000, QSIZE);
    rx_ring.add_chain(&mem, &[(BUF + 0x1_0000, 2048, W)]);
    let mut rxq = rx_ring.queue();
    let rctx = RxContext {
        tap: &tap,
        stats: &stats,
        hdr_len: HDR_LEN,
        mergeable: true,
    };
    let mut rx = Rx::default();
    let start = std::time::Instant::now();
    while rx_ring.used_idx(&mem) == 0 && start.elapsed() < Duration::from_secs(5) {
        rx.process(&mut rxq, &mem, &rctx);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(rx_ring.used_idx(&mem), 1);
    let (head, len) = rx_ring.used_entry(&mem, 0);
    assert_eq!((head, len as usize), (0, HDR_LEN + inbound.len()));
    let mut got = vec![0u8; len as usize];
    mem.read_slice(&mut got, GuestAddress(BUF + 0x1_0000))
        .unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(&got[HDR_LEN..], &inbound[..]);
    // Nothing else is queued: the tap reads as empty.
    let out = rx.process(&mut rxq, &mem, &rctx);
    assert_eq!(out.delivered, 0);
    let _ = rxq.size();
}

#[test]
fn rx_and_tx_held_back_by_the_rate_limit_wait_and_are_charged_once() {
    let f = Fixture::new();
    // RX: a frame read from the tap but refused stays pending; once admitted it is
    // delivered, and the limiter was asked once for it with its size.
    let mut ring = Ring::new(RING, QSIZE);
    let mut q = ring.queue();
    ring.add_chain(&f.mem, &[(BUF, 4096, W)]);
    let mut wire = vec![0u8; HDR_LEN];
    let payload = frame([0xff; 6], [2, 0, 0, 0, 0, 1], &pattern(100, 3));
    wire.extend_from_slice(&payload);
    f.wire.send(&wire).unwrap();
    let mut rx = Rx::default();
    let out = rx.process_limited(&mut q, &f.mem, &f.rx(true), &mut |_| {
        Err(std::time::Duration::from_millis(5))
    });
    assert_eq!(out.stop, RxStop::Throttled);
    assert_eq!(out.delivered, 0);
    assert!(rx.pending());
    let mut asked = Vec::new();
    let out = rx.process_limited(&mut q, &f.mem, &f.rx(true), &mut |n| {
        asked.push(n);
        Ok(())
    });
    assert_eq!(out.delivered, 1);
    assert_eq!(asked, vec![payload.len() as u64]);
    // TX: a refused chain goes back to the avail ring, untouched; admitted, it is sent.
    let mut tring = Ring::new(RING + 0x1_0000, QSIZE);
    let mut tq = tring.queue();
    let mut bytes = vec![0u8; HDR_LEN];
    bytes.extend(frame(
        [2, 0, 0, 0, 0, 9],
        [0x52, 0x54, 0, 0, 0, 1],
        &pattern(60, 4),
    ));
    f.mem
        .write_slice(&bytes, GuestAddress(BUF + 0x8000))
        .unwrap();
    tring.add_chain(&f.mem, &[(BUF + 0x8000, bytes.len() as u32, R)]);
    let mut buf = Vec::new();
    let (used, wait) = bulkhead_backends::net::tx::process_tx_limited(
        &mut tq,
        &f.mem,
        &f.tx(),
        &mut buf,
        &mut |_| Err(std::time::Duration::from_millis(5)),
    );
    assert_eq!((used, wait), (0, Some(std::time::Duration::from_millis(5))));
    let (used, wait) = bulkhead_backends::net::tx::process_tx_limited(
        &mut tq,
        &f.mem,
        &f.tx(),
        &mut buf,
        &mut |n| {
            assert_eq!(n, (bytes.len() - HDR_LEN) as u64);
            Ok(())
        },
    );
    assert_eq!((used, wait), (1, None));
}
