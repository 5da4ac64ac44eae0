//! A small polled virtio-blk driver (virtio 1.x, modern virtio-pci, split virtqueues)
//! and the `blk*` command-line tokens (see README.md). Everything runs in ring 3 on the
//! BSP; with several queues the BSP round-robins the requests over them.

use crate::checksum::Fnv1a;
use crate::pci::{self, Bdf, Bus, VirtioPci};
use crate::println;
use crate::start_info::StartInfo;
use crate::virtio::{
    r64, r8, w32, w64, w8, zero, Buf, Transport, Virtq, DESC_F_NEXT, DESC_F_WRITE, F_EVENT_IDX,
    F_VERSION_1, QMAX, QUEUE_MEM, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};

// Feature bits.
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Status of a request that never completed (timeout) — not a virtio value.
const S_TIMEOUT: u8 = 0xff;

const SECTOR: u64 = 512;
const MAX_DISKS: usize = 8;
/// Most queues used per disk.
const MAXQ: usize = 8;
const MAX_SLOTS: usize = 16;
/// Guest memory reserved for one disk's queues.
const DISK_QMEM: u64 = MAXQ as u64 * QUEUE_MEM;

// Scratch layout per head (virtio::SCRATCH = 64 bytes).
const SC_HDR: u64 = 0;
const SC_SEG: u64 = 16;
const SC_STATUS: u64 = 32;
const SC_ID: u64 = 40;

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

mod rand;
mod stream;

/// Default `blk-stream-timeout=` (seconds).
const STREAM_TIMEOUT_S: u64 = 120;

/// The data pattern of sector `lba` for `seed`: word 0 = lba, words 1..63 = xorshift64
/// (13, 7, 17) outputs from state seed ^ (lba * GOLDEN) (GOLDEN if that is 0).
fn gen_sector(seed: u64, lba: u64, out: &mut [u64; 64]) {
    out[0] = lba;
    let mut x = seed ^ lba.wrapping_mul(GOLDEN);
    if x == 0 {
        x = GOLDEN;
    }
    for w in out.iter_mut().skip(1) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
}

fn hash_mem(h: &mut Fnv1a, a: u64, len: u64) {
    let mut p = a;
    while p < a + len {
        h.u64(r64(p));
        p += 8;
    }
}

/// The `blk-checksum:` line of blk-write= and blk-read=.
fn print_checksum(nohash: bool, value: u64) {
    if nohash {
        println!("blk-checksum: none (blk-nohash)");
    } else {
        println!("blk-checksum: {:#018x}", value);
    }
}

fn tsc_per_ms() -> u64 {
    crate::tsc::khz().0.max(1)
}

/// Options from the command line.
#[derive(Default)]
struct Opts {
    any: bool,
    pci: bool,
    disk: usize,
    req_kib: u64,
    queues: Option<usize>,
    event_idx: bool,
    stream_timeout_s: u64,
    /// `blk-stall-ms=`: stream requests that take at least this long are reported.
    stall_ms: u64,
    /// `blk-rand-area=<start>:<sectors>`.
    rand_area: (u64, u64),
    /// `blk-nohash`: blk-write= and blk-read= skip the checksum (benchmarks).
    nohash: bool,
    /// `blk-nogen`: blk-write= fills each buffer slot once (benchmarks).
    nogen: bool,
}

/// One virtio-blk device and its driver state.
pub struct Disk {
    t: Transport,
    index: usize,
    features: u64,
    capacity: u64,
    blk_size: u32,
    dev_queues: u16,
    max_discard: u32,
    max_wz: u32,
    serial: [u8; 20],
    serial_len: usize,
    nq: usize,
    qs: [Virtq; MAXQ],
    qmem: u64,
    want_q: usize,
    event_idx: bool,
    ready: bool,
    ms: u64,
    /// `blk-nohash`: stream() does not checksum the data.
    nohash: bool,
    /// `blk-nogen`: stream() writes a slot's buffer as first filled, not each LBA's pattern.
    nogen: bool,
}

impl Disk {
    fn new(pci: VirtioPci, index: usize, qmem: u64) -> Disk {
        Disk {
            t: Transport { pci },
            index,
            features: 0,
            capacity: 0,
            blk_size: 512,
            dev_queues: 1,
            max_discard: 0,
            max_wz: 0,
            serial: [0; 20],
            serial_len: 0,
            nq: 1,
            qs: [const { Virtq::empty() }; MAXQ],
            qmem,
            want_q: 1,
            event_idx: false,
            ready: false,
            ms: tsc_per_ms(),
            nohash: false,
            nogen: false,
        }
    }

    /// The `blk-perf:` line of a blk-write= or blk-read= of `count` sectors in requests of
    /// `req_sectors`, `depth` in flight, that took `ticks`.
    fn stream_perf(&self, mode: &str, req_sectors: u64, depth: usize, count: u64, ticks: u64) {
        let requests = count.div_ceil(req_sectors);
        self.perf(
            mode,
            req_sectors * SECTOR,
            depth,
            requests,
            count * SECTOR,
            ticks,
            None,
        );
    }

    fn bdf(&self) -> Bdf {
        self.t.pci.bdf
    }

    fn ro(&self) -> bool {
        self.features & F_RO != 0
    }

    /// Full virtio 1.x initialization with `want_q` queues.
    fn init(&mut self, want_q: usize, event_idx: bool) -> Result<(), &'static str> {
        self.ready = false;
        self.want_q = want_q;
        self.event_idx = event_idx;
        let t = self.t;
        if !t.reset(crate::tsc::now() + 1000 * self.ms) {
            return Err("reset timed out");
        }
        t.add_status(STATUS_ACKNOWLEDGE);
        t.add_status(STATUS_DRIVER);
        let dev = t.device_features();
        if dev & F_VERSION_1 == 0 {
            t.add_status(STATUS_FAILED);
            return Err("VERSION_1 not offered");
        }
        let mut want = F_VERSION_1
            | F_FLUSH
            | F_BLK_SIZE
            | F_SEG_MAX
            | F_RO
            | F_DISCARD
            | F_WRITE_ZEROES
            | F_MQ;
        if event_idx {
            want |= F_EVENT_IDX;
        }
        let f = dev & want;
        t.set_driver_features(f);
        t.add_status(STATUS_FEATURES_OK);
        if t.status() & STATUS_FEATURES_OK == 0 {
            t.add_status(STATUS_FAILED);
            return Err("FEATURES_OK not accepted");
        }
        self.features = f;
        self.capacity = t.cfg64(0);
        self.blk_size = if f & F_BLK_SIZE != 0 {
            t.cfg32(0x14)
        } else {
            512
        };
        self.dev_queues = if f & F_MQ != 0 {
            t.cfg16(0x22).max(1)
        } else {
            1
        };
        self.max_discard = if f & F_DISCARD != 0 { t.cfg32(0x24) } else { 0 };
        self.max_wz = if f & F_WRITE_ZEROES != 0 {
            t.cfg32(0x30)
        } else {
            0
        };
        let nq = want_q
            .min(self.dev_queues as usize)
            .min(t.num_queues() as usize)
            .clamp(1, MAXQ);
        self.nq = nq;
        t.no_config_vector();
        for i in 0..nq {
            let max = t.queue_max(i as u16);
            if max == 0 {
                t.add_status(STATUS_FAILED);
                return Err("queue not available");
            }
            let mut size = (max as usize).min(QMAX) as u16;
            // Split rings: a power of two.
            size = 1 << (15 - size.leading_zeros());
            let mem = self.qmem + i as u64 * QUEUE_MEM;
            self.qs[i].init(i as u16, size, mem, f & F_EVENT_IDX != 0);
            t.setup_queue(&mut self.qs[i]);
        }
        t.add_status(STATUS_DRIVER_OK);
        if t.status() & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 {
            return Err("device refused DRIVER_OK");
        }
        self.ready = true;
        Ok(())
    }

    /// Re-initializes if a request timed out or the device wants a reset.
    fn ensure_ready(&mut self) -> bool {
        if self.ready && self.t.status() & STATUS_NEEDS_RESET == 0 {
            return true;
        }
        match self.init(self.want_q, self.event_idx) {
            Ok(()) => true,
            Err(e) => {
                println!("blk{}: init failed: {}", self.index, e);
                false
            }
        }
    }

    /// Queues a request on queue `q`: header, optional data, status. No kick.
    fn submit(&mut self, q: usize, typ: u32, sector: u64, data: Option<Buf>) -> Option<u16> {
        let vq = &mut self.qs[q];
        let n = if data.is_some() { 3 } else { 2 };
        let head = vq.alloc(n)?;
        let s = vq.scratch_of(head);
        w32(s + SC_HDR, typ);
        w32(s + SC_HDR + 4, 0);
        w64(s + SC_HDR + 8, sector);
        w8(s + SC_STATUS, 0xff);
        let hdr = Buf {
            addr: s + SC_HDR,
            len: 16,
            write: false,
        };
        let st = Buf {
            addr: s + SC_STATUS,
            len: 1,
            write: true,
        };
        match data {
            Some(d) => vq.submit_at(head, &[hdr, d, st]),
            None => vq.submit_at(head, &[hdr, st]),
        }
        Some(head)
    }

    /// Waits for `head` on queue `q` (10 s); returns its status (S_TIMEOUT if none).
    fn complete(&mut self, q: usize, head: u16) -> u8 {
        let deadline = crate::tsc::now() + 10_000 * self.ms;
        let t = self.t;
        let vq = &mut self.qs[q];
        match vq.wait(head, deadline, &t) {
            Some(_) => r8(vq.scratch_of(head) + SC_STATUS),
            None => {
                self.ready = false;
                S_TIMEOUT
            }
        }
    }

    /// One synchronous request on queue 0; `seg` = a DISCARD/WRITE_ZEROES segment
    /// (start, sectors) carried in the head's scratch area instead of `data`.
    fn sync(&mut self, typ: u32, sector: u64, data: Option<Buf>, seg: Option<(u64, u32)>) -> u8 {
        if !self.ensure_ready() {
            return S_TIMEOUT;
        }
        let Some(head) = self.submit_with_seg(typ, sector, data, seg) else {
            return S_TIMEOUT;
        };
        self.qs[0].kick();
        self.complete(0, head)
    }

    fn submit_with_seg(
        &mut self,
        typ: u32,
        sector: u64,
        data: Option<Buf>,
        seg: Option<(u64, u32)>,
    ) -> Option<u16> {
        match seg {
            None => self.submit(0, typ, sector, data),
            Some((start, n)) => {
                // The segment lives in the scratch of the head the next alloc returns:
                // allocate, then point the data descriptor at it.
                let vq = &mut self.qs[0];
                let head = vq.alloc(3)?;
                let s = vq.scratch_of(head);
                w64(s + SC_SEG, start);
                w32(s + SC_SEG + 8, n);
                w32(s + SC_SEG + 12, 0);
                w32(s + SC_HDR, typ);
                w32(s + SC_HDR + 4, 0);
                w64(s + SC_HDR + 8, 0);
                w8(s + SC_STATUS, 0xff);
                vq.submit_at(
                    head,
                    &[
                        Buf {
                            addr: s + SC_HDR,
                            len: 16,
                            write: false,
                        },
                        Buf {
                            addr: s + SC_SEG,
                            len: 16,
                            write: false,
                        },
                        Buf {
                            addr: s + SC_STATUS,
                            len: 1,
                            write: true,
                        },
                    ],
                );
                Some(head)
            }
        }
    }

    /// GET_ID into `serial`; returns the status.
    fn get_id(&mut self) -> u8 {
        if !self.ensure_ready() {
            return S_TIMEOUT;
        }
        let vq = &mut self.qs[0];
        let Some(head) = vq.alloc(3) else {
            return S_TIMEOUT;
        };
        let s = vq.scratch_of(head);
        zero(s, 64);
        w32(s + SC_HDR, T_GET_ID);
        w8(s + SC_STATUS, 0xff);
        vq.submit_at(
            head,
            &[
                Buf {
                    addr: s + SC_HDR,
                    len: 16,
                    write: false,
                },
                Buf {
                    addr: s + SC_ID,
                    len: 20,
                    write: true,
                },
                Buf {
                    addr: s + SC_STATUS,
                    len: 1,
                    write: true,
                },
            ],
        );
        vq.kick();
        let st = self.complete(0, head);
        self.serial_len = 0;
        if st == 0 {
            for i in 0..20 {
                let b = r8(s + SC_ID + i as u64);
                if b == 0 {
                    break;
                }
                self.serial[i] = if (0x20..0x7f).contains(&b) && b != b'\'' {
                    b
                } else {
                    b'?'
                };
                self.serial_len = i + 1;
            }
        }
        st
    }

    fn serial_str(&self) -> &str {
        core::str::from_utf8(&self.serial[..self.serial_len]).unwrap_or("?")
    }

    /// Streams a write / read / verify of [start, start+count) in requests of
    /// `req_sectors`, round-robin over the queues, data slots in [data, data_end).
    fn stream(
        &mut self,
        mode: Mode,
        start: u64,
        count: u64,
        req_sectors: u64,
        mem: (u64, u64),
        qused: &mut u32,
    ) -> Stream {
        let mut r = Stream {
            depth: 0,
            ok_sectors: 0,
            status: 0,
            hash: Fnv1a::new(),
            mismatch: None,
        };
        if !self.ensure_ready() {
            r.status = S_TIMEOUT;
            return r;
        }
        let hash = !self.nohash;
        let req_bytes = req_sectors * SECTOR;
        let nslots = ((mem.1 - mem.0) / req_bytes)
            .min((4 * self.nq) as u64)
            .min(MAX_SLOTS as u64);
        if nslots == 0 {
            println!(
                "blk: not enough memory for {} KiB requests",
                req_bytes >> 10
            );
            r.status = S_TIMEOUT;
            return r;
        }
        r.depth = nslots as usize;
        let end = start.saturating_add(count);
        let mut ring = [(0usize, 0u16, 0u64, 0u64); MAX_SLOTS];
        let (mut sub, mut ret) = (0u64, 0u64);
        let mut next = start;
        let mut pat = [0u64; 64];
        let mut dirty = 0u32;
        // blk-nogen: the slots whose buffer has been filled once.
        let mut filled = 0u32;
        loop {
            while sub - ret < nslots && next < end {
                let q = (sub % self.nq as u64) as usize;
                if self.qs[q].free_descs() < 3 {
                    break;
                }
                let n = req_sectors.min(end - next);
                let slot = sub % nslots;
                let buf = mem.0 + slot * req_bytes;
                let write = matches!(mode, Mode::Write(_));
                let fill = !(self.nogen && filled & (1 << slot) != 0);
                filled |= 1 << slot;
                if let (Mode::Write(seed), true) = (mode, fill) {
                    for i in 0..n {
                        gen_sector(seed, next + i, &mut pat);
                        let a = buf + i * SECTOR;
                        for (k, &w) in pat.iter().enumerate() {
                            w64(a + 8 * k as u64, w);
                            if hash {
                                r.hash.u64(w);
                            }
                        }
                    }
                }
                let data = Buf {
                    addr: buf,
                    len: (n * SECTOR) as u32,
                    write: !write,
                };
                let typ = if write { T_OUT } else { T_IN };
                let Some(head) = self.submit(q, typ, next, Some(data)) else {
                    break;
                };
                dirty |= 1 << q;
                *qused |= 1 << q;
                ring[(sub % MAX_SLOTS as u64) as usize] = (q, head, next, n);
                sub += 1;
                next += n;
            }
            for q in 0..self.nq {
                if dirty & (1 << q) != 0 {
                    self.qs[q].kick();
                }
            }
            dirty = 0;
            if ret == sub {
                break;
            }
            // Retire the oldest request (waiting for it), then every following one
            // that has already completed, before refilling.
            let mut blocking = true;
            while ret < sub {
                let (q, head, sector, n) = ring[(ret % MAX_SLOTS as u64) as usize];
                let st = if blocking {
                    self.complete(q, head)
                } else {
                    self.qs[q].poll();
                    match self.qs[q].take(head) {
                        Some(_) => r8(self.qs[q].scratch_of(head) + SC_STATUS),
                        None => break,
                    }
                };
                blocking = false;
                if st == S_TIMEOUT {
                    println!("blk{}: request at sector {} timed out", self.index, sector);
                    r.status = S_TIMEOUT;
                    if r.mismatch.is_none() && matches!(mode, Mode::Verify(_)) {
                        r.mismatch = Some(sector);
                    }
                    return r;
                }
                if st == 0 {
                    r.ok_sectors += n;
                } else if r.status == 0 {
                    r.status = st;
                }
                let buf = mem.0 + (ret % nslots) * req_bytes;
                match mode {
                    Mode::Write(_) => {}
                    Mode::Read if hash => hash_mem(&mut r.hash, buf, n * SECTOR),
                    Mode::Read => {}
                    Mode::Verify(seed) => {
                        if r.mismatch.is_none() {
                            if st != 0 {
                                r.mismatch = Some(sector);
                            } else {
                                for i in 0..n {
                                    gen_sector(seed, sector + i, &mut pat);
                                    let a = buf + i * SECTOR;
                                    if pat
                                        .iter()
                                        .enumerate()
                                        .any(|(k, &w)| r64(a + 8 * k as u64) != w)
                                    {
                                        r.mismatch = Some(sector + i);
                                        break;
                                    }
                                }
                            }
                        }
                    }
                }
                ret += 1;
            }
        }
        r
    }

    /// DISCARD / WRITE_ZEROES over [start, start+count), split by the device maximum.
    fn ranged(&mut self, typ: u32, start: u64, count: u64) -> u8 {
        let max = if typ == T_DISCARD {
            self.max_discard
        } else {
            self.max_wz
        };
        let max = if max == 0 {
            u32::MAX as u64
        } else {
            max as u64
        };
        let mut s = start;
        let end = start.saturating_add(count);
        let mut first = 0u8;
        loop {
            let n = (end - s).min(max);
            let st = self.sync(typ, 0, None, Some((s, n as u32)));
            if st != 0 && first == 0 {
                first = st;
            }
            s += n;
            if s >= end || st == S_TIMEOUT {
                break;
            }
        }
        first
    }

    /// One raw chain on queue 0 for the hostile cases. Returns the used length, or
    /// None if it never completed within ~1 s (or the device wants a reset).
    fn raw(&mut self, case: Hostile, buf: u64) -> (Option<u32>, u8) {
        let cap = self.capacity;
        let ms = self.ms;
        let t = self.t;
        let vq = &mut self.qs[0];
        let Some(h) = vq.alloc(3) else {
            return (None, S_TIMEOUT);
        };
        let (d1, d2) = (vq.chain_desc(h, 1), vq.chain_desc(h, 2));
        let s = vq.scratch_of(h);
        let typ = if case == Hostile::UnknownType {
            0x77
        } else {
            T_IN
        };
        let sector = match case {
            Hostile::BeyondCapacity => cap,
            Hostile::SectorOverflow => u64::MAX,
            _ => 0,
        };
        w32(s + SC_HDR, typ);
        w32(s + SC_HDR + 4, 0);
        w64(s + SC_HDR + 8, sector);
        w8(s + SC_STATUS, 0xff);
        let hdr_flags = DESC_F_NEXT
            | if case == Hostile::HeaderWritable {
                DESC_F_WRITE
            } else {
                0
            };
        let data_addr = if case == Hostile::DataOutsideRam {
            0x7_0000_0000
        } else {
            buf
        };
        let data_len = if case == Hostile::ZeroLength { 0 } else { 512 };
        let (st_flags, st_next) = match case {
            Hostile::StatusReadOnly => (0, 0),
            Hostile::Loop => (DESC_F_WRITE | DESC_F_NEXT, d1),
            _ => (DESC_F_WRITE, 0),
        };
        vq.write_desc(h, s + SC_HDR, 16, hdr_flags, d1);
        vq.write_desc(d1, data_addr, data_len, DESC_F_WRITE | DESC_F_NEXT, d2);
        vq.write_desc(d2, s + SC_STATUS, 1, st_flags, st_next);
        vq.publish(h);
        vq.kick_always();
        let r = vq.wait(h, crate::tsc::now() + 1000 * ms, &t);
        let st = r8(s + SC_STATUS);
        if r.is_none() || t.status() & STATUS_NEEDS_RESET != 0 {
            self.ready = false;
        }
        (r, st)
    }

    /// The hostile cases, then a well-formed round trip. Returns whether the round
    /// trip passed.
    fn hostile(&mut self, buf: u64) -> bool {
        for case in HOSTILE {
            if !self.ensure_ready() {
                println!("hostile: {}: no completion", case.name());
                continue;
            }
            match self.raw(case, buf) {
                (Some(len), st) if len > 0 => println!("hostile: {}: status {}", case.name(), st),
                _ => println!("hostile: {}: no completion", case.name()),
            }
            if !self.ready {
                println!("hostile-reset: {}", case.name());
            }
        }
        let ok = self.followup(buf);
        println!("hostile: followup {}", if ok { "ok" } else { "FAILED" });
        ok
    }

    /// Write+read round trip on the last 8 sectors (original contents restored), or
    /// two reads on a read-only disk.
    fn followup(&mut self, buf: u64) -> bool {
        if !self.ensure_ready() || self.capacity < 8 {
            return false;
        }
        let lba = self.capacity - 8;
        let (a, b, c) = (buf, buf + 0x1000, buf + 0x2000);
        let rd = |d: &mut Disk, at: u64| {
            d.sync(
                T_IN,
                lba,
                Some(Buf {
                    addr: at,
                    len: 4096,
                    write: true,
                }),
                None,
            )
        };
        let wr = |d: &mut Disk, at: u64| {
            d.sync(
                T_OUT,
                lba,
                Some(Buf {
                    addr: at,
                    len: 4096,
                    write: false,
                }),
                None,
            )
        };
        let eq = |x: u64, y: u64| (0..512u64).all(|i| r64(x + 8 * i) == r64(y + 8 * i));
        if self.ro() {
            zero(a, 4096);
            zero(c, 4096);
            return rd(self, a) == 0 && rd(self, c) == 0 && eq(a, c);
        }
        if rd(self, a) != 0 {
            return false;
        }
        let mut pat = [0u64; 64];
        for i in 0..8 {
            gen_sector(0x686f_7374_696c_6521, lba + i, &mut pat);
            for (k, &w) in pat.iter().enumerate() {
                w64(b + i * SECTOR + 8 * k as u64, w);
            }
        }
        zero(c, 4096);
        let ok = wr(self, b) == 0 && rd(self, c) == 0 && eq(b, c);
        let restored = wr(self, a) == 0;
        ok && restored
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Write(u64),
    Read,
    Verify(u64),
}

struct Stream {
    /// Requests kept in flight (all queues together).
    depth: usize,
    ok_sectors: u64,
    status: u8,
    hash: Fnv1a,
    mismatch: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hostile {
    HeaderWritable,
    DataOutsideRam,
    StatusReadOnly,
    ZeroLength,
    Loop,
    UnknownType,
    BeyondCapacity,
    SectorOverflow,
}

const HOSTILE: [Hostile; 8] = [
    Hostile::HeaderWritable,
    Hostile::DataOutsideRam,
    Hostile::StatusReadOnly,
    Hostile::ZeroLength,
    Hostile::Loop,
    Hostile::UnknownType,
    Hostile::BeyondCapacity,
    Hostile::SectorOverflow,
];

impl Hostile {
    fn name(self) -> &'static str {
        match self {
            Hostile::HeaderWritable => "header-writable",
            Hostile::DataOutsideRam => "data-outside-ram",
            Hostile::StatusReadOnly => "status-readonly",
            Hostile::ZeroLength => "zero-length-data",
            Hostile::Loop => "descriptor-loop",
            Hostile::UnknownType => "unknown-type",
            Hostile::BeyondCapacity => "beyond-capacity",
            Hostile::SectorOverflow => "sector-overflow",
        }
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

fn parse3(s: &str) -> Option<(u64, u64, u64)> {
    let mut it = s.split(':');
    let r = (
        parse_u64(it.next()?)?,
        parse_u64(it.next()?)?,
        parse_u64(it.next()?)?,
    );
    it.next().is_none().then_some(r)
}

fn parse4(s: &str) -> Option<(u64, u64, u64, u64)> {
    let mut it = s.split(':');
    let r = (
        parse_u64(it.next()?)?,
        parse_u64(it.next()?)?,
        parse_u64(it.next()?)?,
        parse_u64(it.next()?)?,
    );
    it.next().is_none().then_some(r)
}

fn parse2(s: &str) -> Option<(u64, u64)> {
    let mut it = s.split(':');
    let r = (parse_u64(it.next()?)?, parse_u64(it.next()?)?);
    it.next().is_none().then_some(r)
}

/// A size in bytes: a number with an optional k/K or m/M suffix (KiB, MiB).
fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1024),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    parse_u64(num)?.checked_mul(mult)
}

/// `<seed>:<count>:<qd>:<bs>` of the random tokens.
fn parse_rand(s: &str) -> Option<(u64, u64, u64, u64)> {
    let mut it = s.split(':');
    let r = (
        parse_u64(it.next()?)?,
        parse_u64(it.next()?)?,
        parse_u64(it.next()?)?,
        parse_size(it.next()?)?,
    );
    it.next().is_none().then_some(r)
}

fn is_action(tok: &str) -> bool {
    matches!(tok, "blk" | "blk-id" | "blk-flush" | "blk-hostile")
        || [
            "blk-rand=",
            "blk-rand-write=",
            "blk-write=",
            "blk-read=",
            "blk-verify=",
            "blk-discard=",
            "blk-write-zeroes=",
            "blk-stream=",
            "blk-stream-verify=",
        ]
        .iter()
        .any(|p| tok.starts_with(p))
}

fn parse_opts(cmdline: &str) -> Opts {
    let mut o = Opts {
        req_kib: 64,
        stream_timeout_s: STREAM_TIMEOUT_S,
        ..Opts::default()
    };
    for tok in cmdline.split_ascii_whitespace() {
        if tok == "pci" {
            o.pci = true;
        } else if tok == "blk-event-idx" {
            o.event_idx = true;
        } else if tok == "blk-nohash" {
            o.nohash = true;
        } else if tok == "blk-nogen" {
            // What is written is no longer a function of the range: no checksum either.
            o.nogen = true;
            o.nohash = true;
        } else if let Some(v) = tok.strip_prefix("blk-disk=") {
            if let Some(v) = parse_u64(v) {
                o.disk = v as usize;
            }
        } else if let Some(v) = tok.strip_prefix("blk-req=") {
            if let Some(v @ 1..=4096) = parse_u64(v) {
                o.req_kib = v;
            }
        } else if let Some(v) = tok.strip_prefix("blk-stream-timeout=") {
            if let Some(v @ 1..) = parse_u64(v) {
                o.stream_timeout_s = v;
            }
        } else if let Some(v) = tok.strip_prefix("blk-stall-ms=") {
            if let Some(v @ 1..) = parse_u64(v) {
                o.stall_ms = v;
            }
        } else if let Some(v) = tok.strip_prefix("blk-rand-area=") {
            if let Some(v) = parse2(v) {
                o.rand_area = v;
            }
        } else if let Some(v) = tok.strip_prefix("blk-queues=") {
            if let Some(v @ 1..) = parse_u64(v) {
                o.queues = Some(v as usize);
            }
        } else if is_action(tok) {
            o.any = true;
        }
    }
    o
}

/// Runs the `pci` / `blk*` tokens. Returns true if a (non-hostile-case) request failed.
struct FirstDisk(core::cell::UnsafeCell<Option<VirtioPci>>);
// SAFETY: the guest's drivers run on the BSP only.
unsafe impl Sync for FirstDisk {}
static FIRST_DISK: FirstDisk = FirstDisk(core::cell::UnsafeCell::new(None));

/// Reads the first disk's device status register (an MMIO read that the VMM answers), for
/// `ticks-touch-blk`: None without a disk.
pub fn touch_registers() -> Option<u8> {
    // SAFETY: single-threaded use (BSP only); `run` has finished writing it.
    let pci = unsafe { *FIRST_DISK.0.get() }?;
    Some(crate::virtio::Transport { pci }.status())
}

pub fn run(si: &StartInfo, cmdline: &str) -> bool {
    let o = parse_opts(cmdline);
    if !o.any && !o.pci {
        return false;
    }
    let mut bus = Bus::scan();
    if !o.any {
        return false;
    }
    let mut devs = [VirtioPci::default(); MAX_DISKS];
    let mut ndevs = 0;
    let funcs = bus.funcs().iter().copied().collect::<FuncList>();
    for f in funcs.iter() {
        if ndevs < MAX_DISKS && pci::is_virtio_blk(f) {
            if let Some(v) = pci::virtio_probe(&mut bus, f) {
                devs[ndevs] = v;
                ndevs += 1;
            }
        }
    }
    if ndevs > 0 {
        // SAFETY: single-threaded use (BSP only); nothing else holds a reference.
        unsafe { *FIRST_DISK.0.get() = Some(devs[0]) };
    }

    // DMA memory: from the image end rounded up to 2 MiB (the checksum fill region is
    // done with by now): MAX_DISKS × queue memory, then data buffers.
    let base = (crate::boot::image_end() + 0x1f_ffff) & !0x1f_ffff;
    let mem_end = si.usable_end_containing(base).unwrap_or(base);
    let data = base + MAX_DISKS as u64 * DISK_QMEM;
    if mem_end < data + 0x10_0000 {
        println!("blk: not enough RAM above the image");
        return true;
    }
    let qmem = |i: usize| base + i as u64 * DISK_QMEM;

    let mut failed = false;
    let want_q = o.queues.unwrap_or(1);
    let mut qused = 0u32;
    let mut disk: Option<Disk> = None;
    let req_sectors = o.req_kib * 2;
    let mut sst = stream::StreamState {
        seq: 0,
        timeout: o
            .stream_timeout_s
            .saturating_mul(1000)
            .saturating_mul(tsc_per_ms()),
        max_wait: 0,
        stall: o.stall_ms.saturating_mul(tsc_per_ms()),
        stall_max: 0,
        stall_n: 0,
        quiet_from: 0,
    };

    for tok in cmdline.split_ascii_whitespace() {
        if !is_action(tok) {
            continue;
        }
        if tok == "blk" {
            if ndevs == 0 {
                println!("blk: no devices");
            }
            for i in 0..ndevs {
                let mut tmp;
                let d: &mut Disk = if i == o.disk {
                    match get_disk(
                        &mut disk,
                        &devs[..ndevs],
                        o.disk,
                        qmem(o.disk),
                        want_q,
                        o.event_idx,
                    ) {
                        Some(d) => d,
                        None => {
                            failed = true;
                            continue;
                        }
                    }
                } else {
                    tmp = Disk::new(devs[i], i, qmem(i));
                    if let Err(e) = tmp.init(1, o.event_idx) {
                        println!("blk{}: init failed: {}", i, e);
                        failed = true;
                        continue;
                    }
                    &mut tmp
                };
                if d.get_id() != 0 {
                    failed = true;
                }
                println!(
                    "blk{}: {} capacity {} sectors, blk_size {}, queues {}, features {:#x}, ro {}, serial '{}'",
                    i,
                    d.bdf(),
                    d.capacity,
                    d.blk_size,
                    d.dev_queues,
                    d.features,
                    d.ro() as u8,
                    d.serial_str()
                );
            }
            continue;
        }
        let Some(d) = get_disk(
            &mut disk,
            &devs[..ndevs],
            o.disk,
            qmem(o.disk),
            want_q,
            o.event_idx,
        ) else {
            failed = true;
            continue;
        };
        d.nohash = o.nohash;
        d.nogen = o.nogen;
        if tok == "blk-id" {
            let st = d.get_id();
            if st != 0 {
                println!("blk-id: status {}", st);
                failed = true;
            }
            println!("blk-id: '{}'", d.serial_str());
        } else if tok == "blk-flush" {
            let st = if d.features & F_FLUSH != 0 {
                d.sync(T_FLUSH, 0, None, None)
            } else {
                println!("blk: FLUSH not negotiated");
                2
            };
            failed |= st != 0;
            println!("blk-flush: status {}", st);
        } else if tok == "blk-hostile" {
            failed |= !d.hostile(data);
        } else if let Some(v) = tok.strip_prefix("blk-discard=") {
            let Some((start, count)) = parse2(v) else {
                continue;
            };
            let st = if d.features & F_DISCARD != 0 {
                d.ranged(T_DISCARD, start, count)
            } else {
                println!("blk: DISCARD not negotiated");
                2
            };
            failed |= st != 0;
            println!("blk-discard: status {}", st);
        } else if let Some(v) = tok.strip_prefix("blk-write-zeroes=") {
            let Some((start, count)) = parse2(v) else {
                continue;
            };
            let st = if d.features & F_WRITE_ZEROES != 0 {
                d.ranged(T_WRITE_ZEROES, start, count)
            } else {
                println!("blk: WRITE_ZEROES not negotiated");
                2
            };
            failed |= st != 0;
            println!("blk-write-zeroes: status {}", st);
        } else if let Some((write, v)) = tok
            .strip_prefix("blk-rand=")
            .map(|v| (false, v))
            .or_else(|| tok.strip_prefix("blk-rand-write=").map(|v| (true, v)))
        {
            let Some((seed, count, qd, bs)) = parse_rand(v) else {
                println!("blk-rand: cannot parse '{}'", tok);
                failed = true;
                continue;
            };
            let spec = rand::RandSpec {
                write,
                seed,
                count,
                qd: qd as usize,
                bs,
                area: o.rand_area,
            };
            failed |= d.rand_token(spec, (data, mem_end), &mut qused);
        } else if let Some(v) = tok.strip_prefix("blk-write=") {
            let Some((seed, start, count)) = parse3(v) else {
                continue;
            };
            let t0 = crate::tsc::now();
            let mut r = d.stream(
                Mode::Write(seed),
                start,
                count,
                req_sectors,
                (data, mem_end),
                &mut qused,
            );
            if d.features & F_FLUSH != 0 && r.status != S_TIMEOUT {
                let st = d.sync(T_FLUSH, 0, None, None);
                if st != 0 && r.status == 0 {
                    r.status = st;
                }
            }
            let ticks = crate::tsc::now().saturating_sub(t0);
            failed |= r.status != 0 || r.ok_sectors != count;
            println!("blk-write: {} sectors ok status {}", r.ok_sectors, r.status);
            print_checksum(d.nohash, r.hash.value());
            d.stream_perf("write", req_sectors, r.depth, count, ticks);
        } else if let Some(v) = tok.strip_prefix("blk-read=") {
            let Some((start, count)) = parse2(v) else {
                continue;
            };
            let t0 = crate::tsc::now();
            let r = d.stream(
                Mode::Read,
                start,
                count,
                req_sectors,
                (data, mem_end),
                &mut qused,
            );
            let ticks = crate::tsc::now().saturating_sub(t0);
            failed |= r.status != 0 || r.ok_sectors != count;
            print_checksum(d.nohash, r.hash.value());
            println!("blk-read: {} sectors ok status {}", r.ok_sectors, r.status);
            d.stream_perf("read", req_sectors, r.depth, count, ticks);
        } else if let Some(v) = tok.strip_prefix("blk-stream=") {
            let Some((seed, start, count, passes)) = parse4(v) else {
                continue;
            };
            sst.max_wait = 0;
            failed |= d.stream_write_token(
                seed,
                start,
                count,
                passes,
                req_sectors,
                (data, mem_end),
                &mut qused,
                &mut sst,
            );
        } else if let Some(v) = tok.strip_prefix("blk-stream-verify=") {
            let Some((seed, start, count, passes)) = parse4(v) else {
                continue;
            };
            failed |= d.stream_verify_token(
                seed,
                start,
                count,
                passes,
                req_sectors,
                (data, mem_end),
                &mut qused,
                &mut sst,
            );
        } else if let Some(v) = tok.strip_prefix("blk-verify=") {
            let Some((seed, start, count)) = parse3(v) else {
                continue;
            };
            let r = d.stream(
                Mode::Verify(seed),
                start,
                count,
                req_sectors,
                (data, mem_end),
                &mut qused,
            );
            match r.mismatch {
                None if r.status == 0 && r.ok_sectors == count => println!("blk-verify: ok"),
                m => {
                    failed = true;
                    println!(
                        "blk-verify: MISMATCH at sector {}",
                        m.unwrap_or(start + r.ok_sectors)
                    );
                }
            }
        }
    }
    if o.queues.is_some() {
        println!("blk-mq: {} queues used", qused.count_ones());
    }
    failed
}

/// The selected disk, initialized on first use.
fn get_disk<'a>(
    disk: &'a mut Option<Disk>,
    devs: &[VirtioPci],
    idx: usize,
    qmem: u64,
    want_q: usize,
    event_idx: bool,
) -> Option<&'a mut Disk> {
    if disk.is_none() {
        let Some(&v) = devs.get(idx) else {
            println!("blk: no disk {}", idx);
            return None;
        };
        let mut d = Disk::new(v, idx, qmem);
        if let Err(e) = d.init(want_q, event_idx) {
            println!("blk{}: init failed: {}", idx, e);
            return None;
        }
        *disk = Some(d);
    }
    disk.as_mut()
}

/// A fixed-capacity copy of the scanned functions (no alloc).
struct FuncList {
    f: [pci::Func; pci::MAX_FUNCS],
    n: usize,
}

impl FuncList {
    fn iter(&self) -> core::slice::Iter<'_, pci::Func> {
        self.f[..self.n].iter()
    }
}

impl FromIterator<pci::Func> for FuncList {
    fn from_iter<I: IntoIterator<Item = pci::Func>>(it: I) -> Self {
        let mut l = FuncList {
            f: [pci::Func::default(); pci::MAX_FUNCS],
            n: 0,
        };
        for f in it {
            if l.n < pci::MAX_FUNCS {
                l.f[l.n] = f;
                l.n += 1;
            }
        }
        l
    }
}
