//! A small polled virtio-net driver (virtio 1.x, modern virtio-pci, split virtqueues:
//! RX queue 0, TX queue 1, 12-byte header) and just enough networking on top of it:
//! Ethernet, ARP, IPv4 (no fragments), ICMP echo and UDP, plus the `net`/`ping=`/`udp-*`/
//! `net-*` command-line tokens (see README.md). Everything runs in ring 3 on the BSP with
//! interrupts off; frames live in guest RAM at the top of the usable region (no alloc).

use crate::checksum::Fnv1a;
use crate::pci::{self, Bus, VirtioPci};
use crate::println;
use crate::start_info::StartInfo;
use crate::virtio::{
    r16, r8, zero, Buf, Transport, Virtq, DESC_F_NEXT, DESC_F_WRITE, F_VERSION_1, QMAX,
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};
use core::cell::UnsafeCell;
use core::fmt;

// Feature bits.
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;

/// virtio_net_hdr with VERSION_1 (num_buffers always present).
const HDR: usize = 12;
/// One RX buffer / TX slot.
const BUF: u64 = 2048;
const MAX_NICS: usize = 4;
/// Largest queue used (the memory layout below holds 64 RX and 64 TX buffers).
const NET_QMAX: usize = 64;

// Per-device guest memory (NIC_MEM bytes, one slot per device index).
const NIC_MEM: u64 = 0x10_0000;
const M_RXQ: u64 = 0;
const M_TXQ: u64 = 0x4000;
/// Reassembly area for frames spread over several RX buffers (MRG_RXBUF).
const M_ASM: u64 = 0x8000;
const ASM_MAX: usize = 0x18000;
const M_RXBUF: u64 = 0x20000;
const M_TXBUF: u64 = 0x40000;
/// The oversized hostile frame.
const M_BIG: u64 = 0x60000;
const BIG_FRAME: usize = 70_000;
/// net-sink's sequence bitmap (2^20 bits).
const M_BITMAP: u64 = 0x80000;
const BITMAP_BITS: u64 = 1 << 20;

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
/// Local experimental ethertype (hostile frames).
const ETH_EXPERIMENTAL: u16 = 0x88b5;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const BROADCAST: [u8; 6] = [0xff; 6];
/// Largest UDP payload without fragmentation (1500 - 20 - 8).
const UDP_MAX: usize = 1472;
/// Largest IP payload we send (1500 - 20).
const IP_MAX: usize = 1480;
const UDP_SRC_PORT: u16 = 5000;
const PING_ID: u16 = 0x4248;
const PING_PAYLOAD: usize = 56;
const ARP_TIMEOUT_MS: u64 = 2000;
const ARP_RETRY_MS: u64 = 250;
const DEFAULT_MAC: [u8; 6] = [0x02, 0x42, 0x48, 0x00, 0x00, 0x01];

fn bytes(a: u64, len: usize) -> &'static [u8] {
    // SAFETY: [a, a+len) is guest RAM owned by the driver (identity mapped); the device
    // does not write it while the slice is used (the RX buffer is only made available
    // again on the next receive call).
    unsafe { core::slice::from_raw_parts(a as *const u8, len) }
}

#[allow(clippy::mut_from_ref)]
fn bytes_mut(a: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: as for `bytes`; the range is a buffer not available to the device.
    unsafe { core::slice::from_raw_parts_mut(a as *mut u8, len) }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn put16(b: &mut [u8], v: u16) {
    b[..2].copy_from_slice(&v.to_be_bytes());
}

/// Ones' complement sum of `data` (big-endian 16-bit words, odd byte padded) onto `acc`.
fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut it = data.chunks_exact(2);
    for c in &mut it {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [b] = it.remainder() {
        acc += (*b as u64) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data`.
fn csum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// The UDP checksum (pseudo-header + segment, checksum field as it is in `seg`).
fn udp_csum(src: [u8; 4], dst: [u8; 4], seg: &[u8]) -> u16 {
    let mut acc = sum16(&src, 0);
    acc = sum16(&dst, acc);
    acc += PROTO_UDP as u64 + seg.len() as u64;
    !fold(sum16(seg, acc))
}

/// Byte `i` of the payload of datagram `seq`: bytes 0..4 = seq (big-endian), then
/// (7 * seq + i) mod 256.
fn pattern(seq: u32, i: usize) -> u8 {
    if i < 4 {
        seq.to_be_bytes()[i]
    } else {
        (seq as usize).wrapping_mul(7).wrapping_add(i) as u8
    }
}

fn fill_pattern(seq: u32, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = pattern(seq, i);
    }
}

/// The sequence number in a payload (first 4 bytes, big-endian; None if shorter).
fn payload_seq(p: &[u8]) -> Option<u32> {
    (p.len() >= 4).then(|| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
}

/// Dotted-quad display.
struct Ip([u8; 4]);

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let a = self.0;
        write!(f, "{}.{}.{}.{}", a[0], a[1], a[2], a[3])
    }
}

struct Mac([u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// What a received frame meant to the caller (ARP and echo requests are answered
/// inside [`Net::recv`]).
#[derive(Clone, Copy)]
enum Event {
    EchoReply { src: [u8; 4], id: u16, seq: u16 },
    Udp(Udp),
}

/// A received UDP datagram; its payload stays valid until the next [`Net::recv`].
#[derive(Clone, Copy)]
struct Udp {
    src_mac: [u8; 6],
    src: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &'static [u8],
    csum_ok: bool,
}

const ARP_SLOTS: usize = 8;

/// One virtio-net device, its driver state and the stack's state.
pub struct Net {
    t: Transport,
    index: usize,
    mem: u64,
    features: u64,
    mac: [u8; 6],
    fallback_mac: [u8; 6],
    rx: Virtq,
    tx: Virtq,
    /// RX head to make available again at the next receive.
    rx_pending: Option<u16>,
    /// RX buffers made available again since the last RX kick.
    rx_unkicked: u16,
    ready: bool,
    ms: u64,
    ip: [u8; 4],
    prefix: u8,
    gw: Option<[u8; 4]>,
    arp: [([u8; 4], [u8; 6]); ARP_SLOTS],
    arp_n: usize,
    arp_next: usize,
    ip_id: u16,
}

impl Net {
    fn new(pci: VirtioPci, index: usize, mem: u64, fallback_mac: [u8; 6]) -> Net {
        Net {
            t: Transport { pci },
            index,
            mem,
            features: 0,
            mac: fallback_mac,
            fallback_mac,
            rx: Virtq::empty(),
            tx: Virtq::empty(),
            rx_pending: None,
            rx_unkicked: 0,
            ready: false,
            ms: crate::tsc::khz().0.max(1),
            ip: [0; 4],
            prefix: 32,
            gw: None,
            arp: [([0; 4], [0; 6]); ARP_SLOTS],
            arp_n: 0,
            arp_next: 0,
            ip_id: 1,
        }
    }

    fn now(&self) -> u64 {
        crate::tsc::now()
    }

    fn after_ms(&self, ms: u64) -> u64 {
        self.now().saturating_add(ms.saturating_mul(self.ms))
    }

    /// Full virtio 1.x initialization; RX pre-filled with one 2 KiB buffer per
    /// descriptor.
    fn init(&mut self) -> Result<(), &'static str> {
        self.ready = false;
        self.rx_pending = None;
        let t = self.t;
        if !t.reset(self.after_ms(1000)) {
            return Err("reset timed out");
        }
        t.add_status(STATUS_ACKNOWLEDGE);
        t.add_status(STATUS_DRIVER);
        let dev = t.device_features();
        if dev & F_VERSION_1 == 0 {
            t.add_status(STATUS_FAILED);
            return Err("VERSION_1 not offered");
        }
        let f = dev & (F_VERSION_1 | F_MAC | F_MRG_RXBUF | F_STATUS);
        t.set_driver_features(f);
        t.add_status(STATUS_FEATURES_OK);
        if t.status() & STATUS_FEATURES_OK == 0 {
            t.add_status(STATUS_FAILED);
            return Err("FEATURES_OK not accepted");
        }
        self.features = f;
        self.mac = self.fallback_mac;
        if f & F_MAC != 0 {
            loop {
                let g = t.config_generation();
                for i in 0..6 {
                    self.mac[i] = r8(t.pci.device + i as u64);
                }
                if t.config_generation() == g {
                    break;
                }
            }
        }
        if t.num_queues() < 2 {
            t.add_status(STATUS_FAILED);
            return Err("fewer than 2 queues");
        }
        t.no_config_vector();
        for (i, off) in [(0u16, M_RXQ), (1, M_TXQ)] {
            let max = t.queue_max(i);
            if max == 0 {
                t.add_status(STATUS_FAILED);
                return Err("queue not available");
            }
            let size = (max as usize).min(QMAX).min(NET_QMAX) as u16;
            let size = 1u16 << (15 - size.leading_zeros());
            let q = if i == 0 { &mut self.rx } else { &mut self.tx };
            q.init(i, size, self.mem + off, false);
            t.setup_queue(q);
        }
        // RX buffers: descriptor/head i owns buffer i.
        for _ in 0..self.rx.size {
            let Some(h) = self.rx.alloc(1) else { break };
            let a = self.rxbuf(h);
            self.rx.submit_at(
                h,
                &[Buf {
                    addr: a,
                    len: BUF as u32,
                    write: true,
                }],
            );
        }
        t.add_status(STATUS_DRIVER_OK);
        if t.status() & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 {
            return Err("device refused DRIVER_OK");
        }
        self.rx.kick();
        self.rx_unkicked = 0;
        self.ready = true;
        Ok(())
    }

    fn rxbuf(&self, head: u16) -> u64 {
        self.mem + M_RXBUF + head as u64 * BUF
    }

    fn txbuf(&self, head: u16) -> u64 {
        self.mem + M_TXBUF + head as u64 * BUF
    }

    fn link_up(&self) -> bool {
        self.features & F_STATUS == 0 || self.t.cfg16(6) & LINK_UP != 0
    }

    fn needs_reset(&self) -> bool {
        self.t.status() & STATUS_NEEDS_RESET != 0
    }

    /// Re-initializes if the device wants a reset (or a TX never completed).
    fn ensure_ready(&mut self) -> bool {
        if self.ready && !self.needs_reset() {
            return true;
        }
        match self.init() {
            Ok(()) => true,
            Err(e) => {
                println!("net{}: init failed: {}", self.index, e);
                false
            }
        }
    }

    // ---- receive ----

    /// Makes the last received frame's buffer available again. The device is told
    /// (a kick, if it wants one) only once half the ring has been reposted, or when the
    /// used ring runs empty ([`Net::kick_rx`]): a kick per buffer would cost a VM exit and
    /// a device wakeup per frame.
    fn repost_pending(&mut self) {
        if let Some(h) = self.rx_pending.take() {
            self.rx.repost(h);
            self.rx_unkicked += 1;
            if self.rx_unkicked >= self.rx.size / 2 {
                self.kick_rx();
            }
        }
    }

    /// Tells the device about reposted RX buffers, if there are any it was not told of.
    fn kick_rx(&mut self) {
        if self.rx_unkicked > 0 {
            self.rx_unkicked = 0;
            self.rx.kick();
        }
    }

    /// Processes received frames (answering ARP and echo requests) until one is of
    /// interest to the caller, or the ring is empty (None), at most 64 frames.
    fn recv(&mut self) -> Option<Event> {
        if !self.ready {
            return None;
        }
        for _ in 0..64 {
            self.repost_pending();
            let Some((id, len)) = self.rx.next_used() else {
                self.kick_rx();
                return None;
            };
            if id >= self.rx.size as u32 {
                continue; // device bug: unknown buffer
            }
            let head = id as u16;
            let buf = self.rxbuf(head);
            let len = (len as usize).min(BUF as usize);
            self.rx_pending = Some(head);
            if len < HDR {
                continue;
            }
            let nbuf = if self.features & F_MRG_RXBUF != 0 {
                r16(buf + 10)
            } else {
                1
            };
            let frame = if nbuf <= 1 {
                bytes(buf + HDR as u64, len - HDR)
            } else {
                match self.gather(buf, len, nbuf) {
                    Some(f) => f,
                    None => continue,
                }
            };
            if let Some(ev) = self.handle(frame) {
                return Some(ev);
            }
        }
        None
    }

    /// Copies a frame spread over `nbuf` RX buffers (the first at `buf`, `len` used
    /// bytes) into the reassembly area; reposts the buffers. None: dropped.
    fn gather(&mut self, buf: u64, len: usize, nbuf: u16) -> Option<&'static [u8]> {
        let asm = bytes_mut(self.mem + M_ASM, ASM_MAX);
        let mut n = len - HDR;
        asm[..n].copy_from_slice(bytes(buf + HDR as u64, n));
        self.repost_pending();
        let mut ok = true;
        let deadline = self.after_ms(10);
        let mut got = 1;
        while got < nbuf {
            let Some((id, l)) = self.rx.next_used() else {
                if self.now() > deadline {
                    return None;
                }
                core::hint::spin_loop();
                continue;
            };
            got += 1;
            if id >= self.rx.size as u32 {
                ok = false;
                continue;
            }
            let l = (l as usize).min(BUF as usize);
            if n + l <= ASM_MAX {
                asm[n..n + l].copy_from_slice(bytes(self.rxbuf(id as u16), l));
                n += l;
            } else {
                ok = false;
            }
            self.rx.repost(id as u16);
            self.rx_unkicked += 1;
        }
        self.kick_rx();
        ok.then_some(&asm[..n])
    }

    fn on_link(&self, a: [u8; 4]) -> bool {
        let m = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix as u32)
        };
        u32::from_be_bytes(a) & m == u32::from_be_bytes(self.ip) & m
    }

    fn is_broadcast(&self, a: [u8; 4]) -> bool {
        let m = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix as u32)
        };
        a == [255; 4]
            || (self.prefix < 31 && u32::from_be_bytes(a) == u32::from_be_bytes(self.ip) | !m)
    }

    fn handle(&mut self, f: &'static [u8]) -> Option<Event> {
        if f.len() < 14 {
            return None;
        }
        let dst = &f[0..6];
        if dst != self.mac && dst != BROADCAST {
            return None;
        }
        let mut src_mac = [0u8; 6];
        src_mac.copy_from_slice(&f[6..12]);
        match be16(&f[12..14]) {
            ETH_ARP => {
                self.arp_in(&f[14..]);
                None
            }
            ETH_IPV4 => self.ipv4_in(src_mac, &f[14..]),
            _ => None,
        }
    }

    fn arp_learn(&mut self, ip: [u8; 4], mac: [u8; 6]) {
        for e in self.arp[..self.arp_n].iter_mut() {
            if e.0 == ip {
                e.1 = mac;
                return;
            }
        }
        if self.arp_n < ARP_SLOTS {
            self.arp[self.arp_n] = (ip, mac);
            self.arp_n += 1;
        } else {
            self.arp[self.arp_next] = (ip, mac);
            self.arp_next = (self.arp_next + 1) % ARP_SLOTS;
        }
    }

    fn arp_lookup(&self, ip: [u8; 4]) -> Option<[u8; 6]> {
        self.arp[..self.arp_n]
            .iter()
            .find(|e| e.0 == ip)
            .map(|e| e.1)
    }

    fn arp_in(&mut self, a: &[u8]) {
        if a.len() < 28 || be16(&a[0..2]) != 1 || be16(&a[2..4]) != ETH_IPV4 {
            return;
        }
        if a[4] != 6 || a[5] != 4 || self.ip == [0; 4] {
            return;
        }
        let op = be16(&a[6..8]);
        let mut smac = [0u8; 6];
        smac.copy_from_slice(&a[8..14]);
        let sip = [a[14], a[15], a[16], a[17]];
        let tip = [a[24], a[25], a[26], a[27]];
        if tip != self.ip || sip == [0; 4] {
            return;
        }
        self.arp_learn(sip, smac);
        if op == 1 {
            self.send_arp(2, smac, smac, sip);
        }
    }

    fn send_arp(&mut self, op: u16, eth_dst: [u8; 6], tmac: [u8; 6], tip: [u8; 4]) -> bool {
        let (mac, ip) = (self.mac, self.ip);
        self.send_eth(eth_dst, ETH_ARP, |p| {
            put16(&mut p[0..], 1);
            put16(&mut p[2..], ETH_IPV4);
            p[4] = 6;
            p[5] = 4;
            put16(&mut p[6..], op);
            p[8..14].copy_from_slice(&mac);
            p[14..18].copy_from_slice(&ip);
            p[18..24].copy_from_slice(&tmac);
            p[24..28].copy_from_slice(&tip);
            28
        })
    }

    fn ipv4_in(&mut self, src_mac: [u8; 6], ip: &'static [u8]) -> Option<Event> {
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            return None;
        }
        let ihl = (ip[0] & 0xf) as usize * 4;
        let total = be16(&ip[2..4]) as usize;
        if ihl < 20 || total < ihl || total > ip.len() {
            return None;
        }
        if fold(sum16(&ip[..ihl], 0)) != 0xffff {
            return None; // bad header checksum
        }
        if be16(&ip[6..8]) & 0x3fff != 0 {
            return None; // a fragment
        }
        let src = [ip[12], ip[13], ip[14], ip[15]];
        let dst = [ip[16], ip[17], ip[18], ip[19]];
        let to_us = dst == self.ip && self.ip != [0; 4];
        if !to_us && !self.is_broadcast(dst) {
            return None;
        }
        let body = &ip[ihl..total];
        match ip[9] {
            PROTO_ICMP => {
                if body.len() < 8 || fold(sum16(body, 0)) != 0xffff {
                    return None;
                }
                match (body[0], body[1]) {
                    (8, 0) if to_us && body.len() <= IP_MAX => {
                        self.send_ip(src_mac, src, PROTO_ICMP, |p| {
                            p[..body.len()].copy_from_slice(body);
                            p[0] = 0;
                            put16(&mut p[2..], 0);
                            let c = csum(&p[..body.len()]);
                            put16(&mut p[2..], c);
                            body.len()
                        });
                        None
                    }
                    (0, 0) => Some(Event::EchoReply {
                        src,
                        id: be16(&body[4..6]),
                        seq: be16(&body[6..8]),
                    }),
                    _ => None,
                }
            }
            PROTO_UDP => {
                if body.len() < 8 {
                    return None;
                }
                let ulen = be16(&body[4..6]) as usize;
                if ulen < 8 || ulen > body.len() {
                    return None;
                }
                let seg = &body[..ulen];
                let csum_ok = be16(&seg[6..8]) == 0 || udp_csum(src, dst, seg) == 0;
                Some(Event::Udp(Udp {
                    src_mac,
                    src,
                    sport: be16(&seg[0..2]),
                    dport: be16(&seg[2..4]),
                    payload: &seg[8..],
                    csum_ok,
                }))
            }
            _ => None,
        }
    }

    /// Answers ARP / echo requests that are waiting; other traffic is dropped.
    fn poll_background(&mut self) {
        let _ = self.recv();
    }

    // ---- transmit ----

    fn reclaim(&mut self) {
        while self.tx.pop_used().is_some() {}
    }

    /// A free TX descriptor (waits up to 1 s for completions).
    fn tx_alloc(&mut self) -> Option<u16> {
        self.reclaim();
        if let Some(h) = self.tx.alloc(1) {
            return Some(h);
        }
        let deadline = self.after_ms(1000);
        let mut n = 0u32;
        loop {
            self.reclaim();
            if let Some(h) = self.tx.alloc(1) {
                return Some(h);
            }
            n = n.wrapping_add(1);
            if n.is_multiple_of(256) && (self.now() > deadline || self.needs_reset()) {
                self.ready = false;
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Sends one frame: `build` writes the Ethernet payload and returns its length.
    fn send_eth(
        &mut self,
        dst: [u8; 6],
        ethertype: u16,
        build: impl FnOnce(&mut [u8]) -> usize,
    ) -> bool {
        if !self.ready {
            return false;
        }
        let Some(head) = self.tx_alloc() else {
            return false;
        };
        let a = self.txbuf(head);
        let b = bytes_mut(a, BUF as usize);
        b[..HDR].fill(0);
        b[HDR..HDR + 6].copy_from_slice(&dst);
        b[HDR + 6..HDR + 12].copy_from_slice(&self.mac);
        put16(&mut b[HDR + 12..], ethertype);
        let n = build(&mut b[HDR + 14..]);
        let mut flen = 14 + n;
        if flen < 60 {
            b[HDR + flen..HDR + 60].fill(0);
            flen = 60;
        }
        self.tx.submit_at(
            head,
            &[Buf {
                addr: a,
                len: (HDR + flen) as u32,
                write: false,
            }],
        );
        self.tx.kick();
        true
    }

    fn send_ip(
        &mut self,
        dst_mac: [u8; 6],
        dst: [u8; 4],
        proto: u8,
        body: impl FnOnce(&mut [u8]) -> usize,
    ) -> bool {
        let src = self.ip;
        let id = self.ip_id;
        self.ip_id = self.ip_id.wrapping_add(1);
        self.send_eth(dst_mac, ETH_IPV4, |p| {
            let n = body(&mut p[20..20 + IP_MAX]);
            let total = 20 + n;
            p[0] = 0x45;
            p[1] = 0;
            put16(&mut p[2..], total as u16);
            put16(&mut p[4..], id);
            put16(&mut p[6..], 0x4000); // DF
            p[8] = 64;
            p[9] = proto;
            put16(&mut p[10..], 0);
            p[12..16].copy_from_slice(&src);
            p[16..20].copy_from_slice(&dst);
            let c = csum(&p[..20]);
            put16(&mut p[10..], c);
            total
        })
    }

    /// Sends a UDP datagram; `fill` writes the payload (<= 1472 bytes), returns its length.
    fn send_udp(
        &mut self,
        dst_mac: [u8; 6],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> bool {
        let src = self.ip;
        self.send_ip(dst_mac, dst, PROTO_UDP, |p| {
            let n = fill(&mut p[8..8 + UDP_MAX]);
            let ulen = 8 + n;
            put16(&mut p[0..], sport);
            put16(&mut p[2..], dport);
            put16(&mut p[4..], ulen as u16);
            put16(&mut p[6..], 0);
            let c = udp_csum(src, dst, &p[..ulen]);
            put16(&mut p[6..], if c == 0 { 0xffff } else { c });
            ulen
        })
    }

    fn send_echo_request(&mut self, dst_mac: [u8; 6], dst: [u8; 4], seq: u16) -> bool {
        self.send_ip(dst_mac, dst, PROTO_ICMP, |p| {
            let n = 8 + PING_PAYLOAD;
            p[0] = 8;
            p[1] = 0;
            put16(&mut p[2..], 0);
            put16(&mut p[4..], PING_ID);
            put16(&mut p[6..], seq);
            for (i, b) in p[8..n].iter_mut().enumerate() {
                *b = i as u8;
            }
            let c = csum(&p[..n]);
            put16(&mut p[2..], c);
            n
        })
    }

    /// The MAC to send to for `dst`: on-link or without a gateway directly, else the
    /// gateway's; ARP request retried every 250 ms until `deadline` (TSC).
    fn resolve(&mut self, dst: [u8; 4], deadline: u64) -> Option<[u8; 6]> {
        if self.is_broadcast(dst) {
            return Some(BROADCAST);
        }
        let hop = match self.gw {
            Some(gw) if !self.on_link(dst) => gw,
            _ => dst,
        };
        if let Some(m) = self.arp_lookup(hop) {
            return Some(m);
        }
        loop {
            if !self.send_arp(1, BROADCAST, [0; 6], hop) && !self.ensure_ready() {
                return None;
            }
            let retry = self.after_ms(ARP_RETRY_MS).min(deadline);
            while self.now() < retry {
                self.poll_background();
                if let Some(m) = self.arp_lookup(hop) {
                    return Some(m);
                }
                core::hint::spin_loop();
            }
            if self.now() >= deadline {
                return None;
            }
        }
    }

    fn resolve_or_report(&mut self, dst: [u8; 4]) -> Option<[u8; 6]> {
        let d = self.after_ms(ARP_TIMEOUT_MS);
        let r = self.resolve(dst, d);
        if r.is_none() {
            println!("net: cannot resolve {}", Ip(dst));
        }
        r
    }

    // ---- token actions ----

    /// One echo request / reply round with a 1 s deadline.
    fn ping_once(&mut self, dst: [u8; 4], seq: u16) -> bool {
        let deadline = self.after_ms(1000);
        let Some(mac) = self.resolve(dst, deadline) else {
            return false;
        };
        if !self.send_echo_request(mac, dst, seq) {
            return false;
        }
        while self.now() < deadline {
            if let Some(Event::EchoReply { src, id, seq: s }) = self.recv() {
                if src == dst && id == PING_ID && s == seq {
                    return true;
                }
            }
            core::hint::spin_loop();
        }
        false
    }

    fn ping(&mut self, dst: [u8; 4], count: u64) {
        let mut ok = 0;
        for n in 1..=count {
            let start = self.now();
            let seq = n as u16;
            if self.ping_once(dst, seq) {
                ok += 1;
                println!("ping: {} seq {} reply", Ip(dst), n);
            } else {
                println!("ping: {} seq {} timeout", Ip(dst), n);
            }
            let next = start.saturating_add(100 * self.ms);
            while n < count && self.now() < next {
                self.poll_background();
                core::hint::spin_loop();
            }
        }
        println!("ping: {}/{} replies", ok, count);
    }

    fn udp_send(&mut self, dst: [u8; 4], port: u16, count: u64, size: usize) {
        let mut h = Fnv1a::new();
        let mut sent = 0u64;
        if let Some(mac) = self.resolve_or_report(dst) {
            for seq in 0..count {
                let seq = seq as u32;
                let ok = self.send_udp(mac, dst, UDP_SRC_PORT, port, |p| {
                    fill_pattern(seq, &mut p[..size]);
                    size
                });
                if !ok {
                    break;
                }
                for i in 0..size {
                    h.byte(pattern(seq, i));
                }
                sent += 1;
                if sent.is_multiple_of(32) {
                    self.poll_background();
                }
            }
            self.drain_tx();
        }
        println!("udp-send: {} sent", sent);
        println!("udp-checksum: {:#018x}", h.value());
    }

    /// Waits (up to 1 s) until the device has consumed everything queued for TX.
    fn drain_tx(&mut self) {
        let deadline = self.after_ms(1000);
        while self.ready && self.tx.inflight > 0 && self.now() < deadline {
            self.reclaim();
            core::hint::spin_loop();
        }
    }

    fn udp_echo(&mut self, port: u16, count: u64, idle_ms: u64) {
        let (mut n, mut bad) = (0u64, 0u64);
        let mut idle = self.after_ms(idle_ms);
        while n + bad < count && self.now() < idle {
            let Some(Event::Udp(u)) = self.recv() else {
                core::hint::spin_loop();
                continue;
            };
            if u.dport != port {
                continue;
            }
            idle = self.after_ms(idle_ms);
            if !u.csum_ok {
                bad += 1;
                continue;
            }
            let p = u.payload;
            if p.len() <= UDP_MAX
                && self.send_udp(u.src_mac, u.src, port, u.sport, |b| {
                    b[..p.len()].copy_from_slice(p);
                    p.len()
                })
            {
                n += 1;
            }
        }
        self.drain_tx();
        println!("udp-echo: {} echoed, {} bad checksum", n, bad);
    }

    fn udp_recv(&mut self, port: u16, count: u64, idle_ms: u64) {
        let (mut n, mut bad) = (0u64, 0u64);
        let mut h = Fnv1a::new();
        let mut idle = self.after_ms(idle_ms);
        while n < count && self.now() < idle {
            let Some(Event::Udp(u)) = self.recv() else {
                core::hint::spin_loop();
                continue;
            };
            if u.dport != port {
                continue;
            }
            idle = self.after_ms(idle_ms);
            n += 1;
            if !u.csum_ok {
                bad += 1;
                continue;
            }
            for &b in u.payload {
                h.byte(b);
            }
        }
        println!("udp-recv: {} received, {} bad checksum", n, bad);
        println!("udp-checksum: {:#018x}", h.value());
    }

    fn udp_rtt(&mut self, dst: [u8; 4], port: u16, count: u64, size: usize) {
        let (mut ok, mut mismatch) = (0u64, 0u64);
        if let Some(mac) = self.resolve_or_report(dst) {
            for seq in 0..count {
                let seq = seq as u32;
                if !self.send_udp(mac, dst, UDP_SRC_PORT, port, |p| {
                    fill_pattern(seq, &mut p[..size]);
                    size
                }) {
                    continue;
                }
                let deadline = self.after_ms(1000);
                while self.now() < deadline {
                    let Some(Event::Udp(u)) = self.recv() else {
                        core::hint::spin_loop();
                        continue;
                    };
                    if u.src != dst || u.dport != UDP_SRC_PORT || u.sport != port {
                        continue;
                    }
                    if size >= 4 {
                        if let Some(s) = payload_seq(u.payload) {
                            if s < seq {
                                continue; // a late echo of an earlier datagram
                            }
                        }
                    }
                    let same = u.csum_ok
                        && u.payload.len() == size
                        && u.payload
                            .iter()
                            .enumerate()
                            .all(|(i, &b)| b == pattern(seq, i));
                    if same {
                        ok += 1;
                    } else {
                        mismatch += 1;
                    }
                    break;
                }
            }
        }
        println!(
            "udp-rtt: {}/{} echoed, payload mismatch {}",
            ok, count, mismatch
        );
    }

    fn stream_datagrams(mib: u64) -> u64 {
        (mib << 20).div_ceil(UDP_MAX as u64)
    }

    fn net_stream(&mut self, dst: [u8; 4], port: u16, mib: u64) {
        let total = Self::stream_datagrams(mib);
        let mut sent = 0u64;
        if let Some(mac) = self.resolve_or_report(dst) {
            while sent < total {
                let seq = sent as u32;
                if !self.send_udp(mac, dst, UDP_SRC_PORT, port, |p| {
                    fill_pattern(seq, &mut p[..UDP_MAX]);
                    UDP_MAX
                }) {
                    println!("net: net-stream stalled after {} datagrams", sent);
                    break;
                }
                sent += 1;
                if sent.is_multiple_of(256) {
                    self.poll_background();
                }
            }
            self.drain_tx();
        }
        let mib_sent = if sent == total {
            mib
        } else {
            (sent * UDP_MAX as u64) >> 20
        };
        println!("net-stream: {} MiB sent in {} datagrams", mib_sent, sent);
    }

    fn net_sink(&mut self, port: u16, mib: u64, idle_ms: u64) {
        let expected = Self::stream_datagrams(mib);
        let bitmap = bytes_mut(self.mem + M_BITMAP, (BITMAP_BITS / 8) as usize);
        let clear = (expected.min(BITMAP_BITS).div_ceil(8) as usize).max(1);
        bitmap[..clear].fill(0);
        let (mut bytes_in, mut n, mut unique, mut max_seq) = (0u64, 0u64, 0u64, None::<u64>);
        let mut idle = self.after_ms(idle_ms);
        while unique < expected && self.now() < idle {
            let Some(Event::Udp(u)) = self.recv() else {
                core::hint::spin_loop();
                continue;
            };
            if u.dport != port || !u.csum_ok {
                continue;
            }
            idle = self.after_ms(idle_ms);
            bytes_in += u.payload.len() as u64;
            n += 1;
            let Some(s) = payload_seq(u.payload) else {
                continue;
            };
            let s = s as u64;
            max_seq = Some(max_seq.map_or(s, |m: u64| m.max(s)));
            if s < BITMAP_BITS {
                let (i, bit) = ((s / 8) as usize, 1u8 << (s % 8));
                if bitmap[i] & bit != 0 {
                    continue; // duplicate
                }
                bitmap[i] |= bit;
            }
            unique += 1;
        }
        let want = expected.max(max_seq.map_or(0, |m| m + 1));
        println!(
            "net-sink: {} bytes in {} datagrams, {} missing by sequence",
            bytes_in,
            n,
            want.saturating_sub(unique)
        );
    }

    /// One malformed TX chain; true if the device returned it (within ~1 s).
    fn hostile_case(&mut self, case: Hostile, dst_mac: [u8; 6]) -> bool {
        self.reclaim();
        let n = if case == Hostile::Loop { 2 } else { 1 };
        let Some(head) = self.tx.alloc(n) else {
            return false;
        };
        let a = self.txbuf(head);
        let frame_len = if case == Hostile::Oversized {
            BIG_FRAME
        } else {
            60
        };
        let base = if case == Hostile::Oversized {
            self.mem + M_BIG
        } else {
            a
        };
        let b = bytes_mut(base, HDR + frame_len);
        b.fill(0);
        b[HDR..HDR + 6].copy_from_slice(&dst_mac);
        b[HDR + 6..HDR + 12].copy_from_slice(&self.mac);
        put16(&mut b[HDR + 12..], ETH_EXPERIMENTAL);
        let whole = (HDR + frame_len) as u32;
        match case {
            Hostile::Writable => self.tx.write_desc(head, base, whole, DESC_F_WRITE, 0),
            Hostile::OutsideRam => self.tx.write_desc(head, 0x7_0000_0000, whole, 0, 0),
            Hostile::ShortHeader => self.tx.write_desc(head, base, 8, 0, 0),
            Hostile::ZeroLength => self.tx.write_desc(head, base, 0, 0, 0),
            Hostile::Loop => {
                let d1 = self.tx.chain_desc(head, 1);
                self.tx.write_desc(head, base, HDR as u32, DESC_F_NEXT, d1);
                self.tx
                    .write_desc(d1, base + HDR as u64, frame_len as u32, DESC_F_NEXT, head);
            }
            Hostile::Oversized => self.tx.write_desc(head, base, whole, 0, 0),
        }
        self.tx.publish(head);
        self.tx.kick_always();
        let deadline = self.after_ms(1000);
        let mut i = 0u32;
        loop {
            while let Some((id, _len)) = self.tx.pop_used() {
                if id == head as u32 {
                    return true;
                }
            }
            i = i.wrapping_add(1);
            if i.is_multiple_of(256) && (self.now() > deadline || self.needs_reset()) {
                return false;
            }
            core::hint::spin_loop();
        }
    }

    fn hostile(&mut self, peer: Option<[u8; 4]>) {
        let dst_mac = peer.and_then(|p| self.arp_lookup(p)).unwrap_or(BROADCAST);
        for case in HOSTILE {
            if !self.ensure_ready() {
                println!("net-hostile: {}: no completion", case.name());
                continue;
            }
            let returned = self.hostile_case(case, dst_mac);
            println!(
                "net-hostile: {}: {}",
                case.name(),
                if returned {
                    "returned"
                } else {
                    "no completion"
                }
            );
            if !returned || self.needs_reset() {
                // The chain may still be owned by the device: start over.
                self.ready = false;
                println!("net-hostile-reset: {}", case.name());
            }
        }
        let ok = match peer {
            Some(p) if self.ensure_ready() => (1..=3u16).any(|s| self.ping_once(p, 0x7000 + s)),
            Some(_) => false,
            None => {
                println!("net: net-hostile followup needs peer=");
                false
            }
        };
        println!("net-hostile: followup {}", if ok { "ok" } else { "FAILED" });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hostile {
    Writable,
    OutsideRam,
    ShortHeader,
    ZeroLength,
    Loop,
    Oversized,
}

const HOSTILE: [Hostile; 6] = [
    Hostile::Writable,
    Hostile::OutsideRam,
    Hostile::ShortHeader,
    Hostile::ZeroLength,
    Hostile::Loop,
    Hostile::Oversized,
];

impl Hostile {
    fn name(self) -> &'static str {
        match self {
            Hostile::Writable => "device-writable",
            Hostile::OutsideRam => "outside-ram",
            Hostile::ShortHeader => "short-header",
            Hostile::ZeroLength => "zero-length",
            Hostile::Loop => "descriptor-loop",
            Hostile::Oversized => "oversized-frame",
        }
    }
}

// ---- the selected device, kept for the echo/ticks loops ----

struct Global(UnsafeCell<Option<Net>>);
// SAFETY: only the BSP touches the network state (APs never call into this module).
unsafe impl Sync for Global {}
static NET: Global = Global(UnsafeCell::new(None));

fn global() -> &'static mut Option<Net> {
    // SAFETY: single-threaded use (BSP only), and no two references are live at once:
    // `run` finishes before the echo/ticks loops call `idle_poll`.
    unsafe { &mut *NET.0.get() }
}

/// Called from the echo/ticks wait loops: answers ARP and ICMP echo requests if a
/// net device was initialized (other traffic is dropped).
pub fn idle_poll() {
    if let Some(n) = global() {
        if n.ready {
            n.poll_background();
        }
    }
}

// ---- command line ----

fn parse_u64(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut it = s.split('.');
    let mut r = [0u8; 4];
    for b in r.iter_mut() {
        *b = it.next()?.parse().ok()?;
    }
    it.next().is_none().then_some(r)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut it = s.split(':');
    let mut r = [0u8; 6];
    for b in r.iter_mut() {
        let p = it.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    it.next().is_none().then_some(r)
}

#[derive(Default)]
struct Opts {
    any: bool,
    dev: usize,
    ip: Option<([u8; 4], u8)>,
    gw: Option<[u8; 4]>,
    peer: Option<[u8; 4]>,
    mac: Option<[u8; 6]>,
    /// `net-spoof-mac=`: send from this address even when the device gave one (a guest
    /// pretending to be another on the bridge).
    spoof_mac: Option<[u8; 6]>,
    idle_ms: u64,
}

impl Opts {
    /// An address argument: dotted quad, or `peer` / `gw`.
    fn addr(&self, s: &str) -> Option<[u8; 4]> {
        match s {
            "peer" => self.peer,
            "gw" => self.gw,
            _ => parse_ip(s),
        }
    }
}

const ACTION_PREFIXES: [&str; 7] = [
    "ping=",
    "udp-send=",
    "udp-echo=",
    "udp-recv=",
    "udp-rtt=",
    "net-stream=",
    "net-sink=",
];

fn is_action(tok: &str) -> bool {
    matches!(tok, "net" | "net-hostile") || ACTION_PREFIXES.iter().any(|p| tok.starts_with(p))
}

fn parse_opts(cmdline: &str) -> Opts {
    let mut o = Opts {
        idle_ms: 5000,
        ..Opts::default()
    };
    for tok in cmdline.split_ascii_whitespace() {
        if let Some(v) = tok.strip_prefix("ip=") {
            let (a, p) = match v.split_once('/') {
                Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| *p <= 32)),
                None => (v, Some(24)),
            };
            if let (Some(a), Some(p)) = (parse_ip(a), p) {
                o.ip = Some((a, p));
            }
        } else if let Some(v) = tok.strip_prefix("gw=") {
            o.gw = parse_ip(v).or(o.gw);
        } else if let Some(v) = tok.strip_prefix("peer=") {
            o.peer = parse_ip(v).or(o.peer);
        } else if let Some(v) = tok.strip_prefix("net-mac=") {
            o.mac = parse_mac(v).or(o.mac);
        } else if let Some(v) = tok.strip_prefix("net-spoof-mac=") {
            o.spoof_mac = parse_mac(v).or(o.spoof_mac);
        } else if let Some(v) = tok.strip_prefix("net-dev=") {
            if let Some(v) = parse_u64(v) {
                o.dev = v as usize;
            }
        } else if let Some(v) = tok.strip_prefix("net-idle=") {
            if let Some(v @ 1..) = parse_u64(v) {
                o.idle_ms = v;
            }
        } else if is_action(tok) {
            o.any = true;
        }
    }
    o
}

fn split_n<const N: usize>(s: &str) -> Option<[&str; N]> {
    let mut it = s.split(':');
    let mut r = [""; N];
    for x in r.iter_mut() {
        *x = it.next()?;
    }
    it.next().is_none().then_some(r)
}

fn port(s: &str) -> Option<u16> {
    parse_u64(s).and_then(|v| u16::try_from(v).ok())
}

/// Runs the net tokens in command-line order (after the blk tokens).
pub fn run(si: &StartInfo, cmdline: &str) {
    let o = parse_opts(cmdline);
    if !o.any {
        return;
    }
    let mut bus = Bus::scan_quiet();
    let mut devs = [VirtioPci::default(); MAX_NICS];
    let mut ndevs = 0;
    let mut funcs = [pci::Func::default(); pci::MAX_FUNCS];
    let nf = bus.funcs().len();
    funcs[..nf].copy_from_slice(bus.funcs());
    for f in funcs[..nf].iter() {
        if ndevs < MAX_NICS && pci::is_virtio_net(f) {
            if let Some(v) = pci::virtio_probe(&mut bus, f) {
                devs[ndevs] = v;
                ndevs += 1;
            }
        }
    }

    // Memory: MAX_NICS × NIC_MEM at the top of the usable region holding the image end
    // (above virtio-blk's queues and, normally, its data buffers).
    let base = (crate::boot::image_end() + 0x1f_ffff) & !0x1f_ffff;
    let mem_end = si.usable_end_containing(base).unwrap_or(base) & !0xfff;
    let region = mem_end.saturating_sub(MAX_NICS as u64 * NIC_MEM);
    if region < base + 0x10_0000 {
        println!("net: not enough RAM above the image");
        return;
    }
    let mem = |i: usize| region + i as u64 * NIC_MEM;
    let fallback = |i: usize| {
        let mut m = o.mac.unwrap_or(DEFAULT_MAC);
        if o.mac.is_none() {
            m[5] = m[5].wrapping_add(i as u8);
        }
        m
    };

    let mut tried = false;
    for tok in cmdline.split_ascii_whitespace() {
        if !is_action(tok) {
            continue;
        }
        if tok == "net" {
            if ndevs == 0 {
                println!("net: no devices");
            }
            for i in 0..ndevs {
                if i == o.dev {
                    let Some(n) = selected(&mut tried, &devs[..ndevs], &o, mem(i), fallback(i))
                    else {
                        continue;
                    };
                    print_line(n);
                } else {
                    let mut n = Net::new(devs[i], i, mem(i), fallback(i));
                    match n.init() {
                        Ok(()) => print_line(&n),
                        Err(e) => println!("net{}: init failed: {}", i, e),
                    }
                    // Not the selected device: stop it (no DMA into its buffers later).
                    n.t.reset(n.after_ms(1000));
                }
            }
            continue;
        }
        if o.ip.is_none() {
            println!("net: {}: no ip= address", tok);
            continue;
        }
        let Some(n) = selected(&mut tried, &devs[..ndevs], &o, mem(o.dev), fallback(o.dev)) else {
            continue;
        };
        if !n.ensure_ready() {
            continue;
        }
        if tok == "net-hostile" {
            n.hostile(o.peer);
        } else if let Some(v) = tok.strip_prefix("ping=") {
            if let Some([a, c]) = split_n::<2>(v) {
                if let (Some(a), Some(c)) = (o.addr(a), parse_u64(c)) {
                    n.ping(a, c);
                }
            }
        } else if let Some(v) = tok.strip_prefix("udp-send=") {
            if let Some([a, p, c, s]) = split_n::<4>(v) {
                if let (Some(a), Some(p), Some(c), Some(s)) =
                    (o.addr(a), port(p), parse_u64(c), parse_u64(s))
                {
                    n.udp_send(a, p, c, (s as usize).min(UDP_MAX));
                }
            }
        } else if let Some(v) = tok.strip_prefix("udp-echo=") {
            if let Some([p, c]) = split_n::<2>(v) {
                if let (Some(p), Some(c)) = (port(p), parse_u64(c)) {
                    n.udp_echo(p, c, o.idle_ms);
                }
            }
        } else if let Some(v) = tok.strip_prefix("udp-recv=") {
            if let Some([p, c]) = split_n::<2>(v) {
                if let (Some(p), Some(c)) = (port(p), parse_u64(c)) {
                    n.udp_recv(p, c, o.idle_ms);
                }
            }
        } else if let Some(v) = tok.strip_prefix("udp-rtt=") {
            if let Some([a, p, c, s]) = split_n::<4>(v) {
                if let (Some(a), Some(p), Some(c), Some(s)) =
                    (o.addr(a), port(p), parse_u64(c), parse_u64(s))
                {
                    n.udp_rtt(a, p, c, (s as usize).min(UDP_MAX));
                }
            }
        } else if let Some(v) = tok.strip_prefix("net-stream=") {
            if let Some([a, p, m]) = split_n::<3>(v) {
                if let (Some(a), Some(p), Some(m)) = (o.addr(a), port(p), parse_u64(m)) {
                    n.net_stream(a, p, m);
                }
            }
        } else if let Some(v) = tok.strip_prefix("net-sink=") {
            if let Some([p, m]) = split_n::<2>(v) {
                if let (Some(p), Some(m)) = (port(p), parse_u64(m)) {
                    n.net_sink(p, m, o.idle_ms);
                }
            }
        }
    }
}

fn print_line(n: &Net) {
    println!(
        "net{}: {} mac {} link {} features {:#x}",
        n.index,
        n.t.pci.bdf,
        Mac(n.mac),
        if n.link_up() { "up" } else { "down" },
        n.features
    );
}

/// The selected device (`net-dev=`), initialized on first use and kept in [`NET`].
fn selected(
    tried: &mut bool,
    devs: &[VirtioPci],
    o: &Opts,
    mem: u64,
    fallback_mac: [u8; 6],
) -> Option<&'static mut Net> {
    let g = global();
    if g.is_none() && !*tried {
        *tried = true;
        let Some(&v) = devs.get(o.dev) else {
            if devs.is_empty() {
                println!("net: no devices");
            } else {
                println!("net: no device {}", o.dev);
            }
            return None;
        };
        let mut n = Net::new(v, o.dev, mem, fallback_mac);
        if let Some((ip, prefix)) = o.ip {
            n.ip = ip;
            n.prefix = prefix;
        }
        n.gw = o.gw;
        zero(mem, NIC_MEM);
        if let Err(e) = n.init() {
            println!("net{}: init failed: {}", o.dev, e);
            return None;
        }
        if let Some(m) = o.spoof_mac {
            n.mac = m;
            println!("net{}: sending as {}", o.dev, Mac(m));
        }
        *g = Some(n);
    }
    g.as_mut()
}
