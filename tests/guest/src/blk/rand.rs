//! `blk-rand=` / `blk-rand-write=`: random reads or writes with a queue depth, timed by
//! the guest itself (see README.md, *Random I/O*). The host can replay a run from its
//! seed: which blocks were touched, in which order, with which data, and the checksum of
//! what was read.
//!
//! Request `i` (0-based, sequence number `i + 1`) goes to queue `i % queues`, at block
//! `splitmix64` output `i` (state = seed) modulo the number of `bs`-sized blocks in the
//! area. Requests are submitted strictly in sequence order, each queue holding at most
//! `qd`; they complete in any order. A write is not submitted while it overlaps a write
//! still in flight (it waits for that one), so the image ends up as if the writes had been
//! done one after the other.

use super::{Disk, SC_STATUS, SECTOR, S_TIMEOUT, T_IN, T_OUT};
use crate::println;
use crate::virtio::{r64, r8, w64, Buf, STATUS_NEEDS_RESET};

/// Most requests in flight per queue.
pub(super) const MAX_QD: usize = 64;
/// Latency histogram: exact below 32 ticks, then 32 buckets per power of two up to 2^36.
const HIST: usize = 33 * 32;

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const MIX: u64 = 0x0000_0100_0000_01b3;

/// splitmix64: the next output from `state`.
pub(super) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The data of sector `lba` written by the random write with sequence number `seq`:
/// word 0 = lba, 1 = seq, 2 = seed, words 3..63 = xorshift64 (13, 7, 17) outputs from
/// state seed ^ (lba * GOLDEN) ^ rotl(seq, 32) (GOLDEN if that is 0).
pub(super) fn rand_sector(seed: u64, lba: u64, seq: u64, out: &mut [u64; 64]) {
    out[0] = lba;
    out[1] = seq;
    out[2] = seed;
    let mut x = seed ^ lba.wrapping_mul(GOLDEN) ^ seq.rotate_left(32);
    if x == 0 {
        x = GOLDEN;
    }
    for w in out.iter_mut().skip(3) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
}

fn bucket(v: u64) -> usize {
    if v < 32 {
        return v as usize;
    }
    let e = (63 - v.leading_zeros()) as usize;
    if e > 36 {
        return HIST - 1;
    }
    (e - 4) * 32 + ((v >> (e - 5)) & 31) as usize
}

fn bucket_low(i: usize) -> u64 {
    if i < 32 {
        return i as u64;
    }
    let (e, m) = (i / 32 + 4, (i % 32) as u64);
    (32 + m) << (e - 5)
}

/// Parameters of one random token.
#[derive(Clone, Copy)]
pub(super) struct RandSpec {
    pub write: bool,
    pub seed: u64,
    pub count: u64,
    pub qd: usize,
    pub bs: u64,
    /// Area: first sector and length in sectors (0: to the end of the disk).
    pub area: (u64, u64),
}

/// One request in flight.
#[derive(Clone, Copy, Default)]
struct Slot {
    busy: bool,
    head: u16,
    seq: u64,
    lba: u64,
    t0: u64,
}

impl Disk {
    /// Runs one `blk-rand=` / `blk-rand-write=` token over the data memory `mem`.
    /// Returns true if it failed.
    pub(super) fn rand_token(&mut self, spec: RandSpec, mem: (u64, u64), qused: &mut u32) -> bool {
        let name = if spec.write { "write" } else { "read" };
        if !self.ensure_ready() {
            println!("blk-rand: {} status {}", name, S_TIMEOUT);
            return true;
        }
        if spec.write && self.ro() {
            println!("blk-rand: write on a read-only disk");
            return true;
        }
        let spb = spec.bs / SECTOR;
        let (start, mut len) = spec.area;
        if len == 0 || start.saturating_add(len) > self.capacity {
            len = self.capacity.saturating_sub(start);
        }
        let nblk = len / spb.max(1);
        if spb == 0 || spec.bs % SECTOR != 0 || nblk == 0 {
            println!(
                "blk-rand: bad block size {} or area {}:{}",
                spec.bs, start, len
            );
            return true;
        }
        let nq = self.nq;
        // Each request takes 3 descriptors; each slot its own buffer.
        let ring = self.qs[0].size as usize / 3;
        let fit = ((mem.1 - mem.0) / spec.bs / nq as u64) as usize;
        let qd = spec.qd.clamp(1, MAX_QD).min(ring).min(fit);
        if qd == 0 {
            println!("blk-rand: not enough memory for {} B requests", spec.bs);
            return true;
        }
        if qd != spec.qd {
            println!("blk-rand: queue depth {} (asked {})", qd, spec.qd);
        }
        let buf_of = |q: usize, s: usize| mem.0 + ((q * qd + s) as u64) * spec.bs;

        let mut slots = [[Slot::default(); MAX_QD]; super::MAXQ];
        let mut busy = [0usize; super::MAXQ];
        let mut hist = [0u32; HIST];
        let mut rng = spec.seed;
        let (mut next, mut done, mut errors, mut first_err) = (0u64, 0u64, 0u64, 0u8);
        let mut sum = 0u64;
        let mut pat = [0u64; 64];
        // The next request, drawn but not yet submitted: (seq, lba).
        let mut pending: Option<(u64, u64)> = None;
        let timeout = 10_000 * self.ms;
        let t_start = crate::tsc::now();
        let mut last_progress = t_start;
        let mut last_kick = t_start;
        // NEEDS_RESET is a device register: each read is an exit to the VMM, so it is
        // read only once progress has stalled, at most once a millisecond.
        let mut last_status = t_start;
        while done < spec.count {
            // Submit in sequence order while the next request's queue has room.
            let mut dirty = 0u32;
            while next < spec.count {
                let (seq, lba) = match pending {
                    Some(p) => p,
                    None => {
                        let blk = splitmix(&mut rng) % nblk;
                        let p = (next + 1, start + blk * spb);
                        pending = Some(p);
                        p
                    }
                };
                let q = (next % nq as u64) as usize;
                if busy[q] >= qd || self.qs[q].free_descs() < 3 {
                    break;
                }
                if spec.write
                    && slots[..nq].iter().any(|qs| {
                        qs[..qd]
                            .iter()
                            .any(|s| s.busy && s.lba < lba + spb && lba < s.lba + spb)
                    })
                {
                    break;
                }
                let Some(si) = slots[q][..qd].iter().position(|s| !s.busy) else {
                    break;
                };
                let buf = buf_of(q, si);
                if spec.write {
                    for k in 0..spb {
                        rand_sector(spec.seed, lba + k, seq, &mut pat);
                        let a = buf + k * SECTOR;
                        for (j, &w) in pat.iter().enumerate() {
                            w64(a + 8 * j as u64, w);
                        }
                    }
                }
                let data = Buf {
                    addr: buf,
                    len: spec.bs as u32,
                    write: !spec.write,
                };
                let typ = if spec.write { T_OUT } else { T_IN };
                let Some(head) = self.submit(q, typ, lba, Some(data)) else {
                    break;
                };
                slots[q][si] = Slot {
                    busy: true,
                    head,
                    seq,
                    lba,
                    t0: crate::tsc::now(),
                };
                busy[q] += 1;
                dirty |= 1 << q;
                *qused |= 1 << q;
                pending = None;
                next += 1;
            }
            for q in 0..nq {
                if dirty & (1 << q) != 0 {
                    self.qs[q].kick();
                }
            }
            // Collect completions, in whatever order they come.
            let mut progressed = false;
            for q in 0..nq {
                if busy[q] == 0 {
                    continue;
                }
                self.qs[q].poll();
                for si in 0..qd {
                    let s = slots[q][si];
                    if !s.busy || self.qs[q].take(s.head).is_none() {
                        continue;
                    }
                    let now = crate::tsc::now();
                    hist[bucket(now.saturating_sub(s.t0))] += 1;
                    slots[q][si].busy = false;
                    busy[q] -= 1;
                    done += 1;
                    progressed = true;
                    let st = r8(self.qs[q].scratch_of(s.head) + SC_STATUS);
                    if st != 0 {
                        errors += 1;
                        if first_err == 0 {
                            first_err = st;
                        }
                    } else if !spec.write {
                        let buf = buf_of(q, si);
                        let mut h = s.seq.wrapping_mul(MIX) ^ s.lba;
                        for k in 0..spec.bs / 8 {
                            h = (h ^ r64(buf + 8 * k)).wrapping_mul(MIX);
                        }
                        sum = sum.wrapping_add(h);
                    }
                }
            }
            let now = crate::tsc::now();
            if progressed {
                last_progress = now;
                last_kick = now;
            } else if now - last_kick > 100 * self.ms {
                // A backend being replaced may have missed a notification: repeat it.
                last_kick = now;
                for q in 0..nq {
                    if busy[q] > 0 {
                        self.qs[q].kick_always();
                    }
                }
            }
            if !progressed && now - last_progress > timeout {
                println!(
                    "blk{}: random {} timed out with {} of {} done",
                    self.index, name, done, spec.count
                );
                self.ready = false;
                if first_err == 0 {
                    first_err = S_TIMEOUT;
                }
                break;
            } else if !progressed && now - last_progress > self.ms && now - last_status > self.ms {
                last_status = now;
                if self.t.status() & STATUS_NEEDS_RESET != 0 {
                    self.ready = false;
                    first_err = S_TIMEOUT;
                    break;
                }
            }
        }
        let ticks = crate::tsc::now().saturating_sub(t_start).max(1);
        println!(
            "blk-rand: {} {} requests, {} ok, {} errors, status {}",
            name,
            spec.count,
            done - errors,
            errors,
            first_err
        );
        if !spec.write {
            println!("blk-rand-checksum: {:#018x}", sum);
        }
        let pct = |p: u64| -> u64 {
            let want = (done * p).div_ceil(100).max(1);
            let mut seen = 0u64;
            for (i, &n) in hist.iter().enumerate() {
                seen += n as u64;
                if seen >= want {
                    return bucket_low(i);
                }
            }
            0
        };
        self.perf(
            if spec.write { "randwrite" } else { "randread" },
            spec.bs,
            qd,
            done,
            done * spec.bs,
            ticks,
            Some((pct(50), pct(99))),
        );
        first_err != 0 || done != spec.count
    }

    /// Prints a `blk-perf:` line: `requests` requests of `bs` bytes, `qd` in flight per
    /// queue, `bytes` in `ticks` TSC ticks, and latency percentiles (ticks) if measured.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn perf(
        &self,
        mode: &str,
        bs: u64,
        qd: usize,
        requests: u64,
        bytes: u64,
        ticks: u64,
        lat: Option<(u64, u64)>,
    ) {
        let (khz, src) = crate::tsc::khz();
        let khz = khz.max(1);
        let ns = |t: u64| (t as u128 * 1_000_000 / khz as u128) as u64;
        let total_ns = ns(ticks).max(1);
        let iops = (requests as u128 * 1_000_000_000 / total_ns as u128) as u64;
        // MiB/s with one decimal.
        let mibps10 = (bytes as u128 * 10_000_000_000 / total_ns as u128 / (1 << 20)) as u64;
        let (p50, p99) = lat.map_or((0, 0), |(a, b)| (ns(a), ns(b)));
        println!(
            "blk-perf: {} bs={} qd={} queues={} requests={} bytes={} us={} iops={} mibps={}.{} p50_us={}.{} p99_us={}.{} tsc_khz={} ({})",
            mode,
            bs,
            qd,
            self.nq,
            requests,
            bytes,
            total_ns / 1000,
            iops,
            mibps10 / 10,
            mibps10 % 10,
            p50 / 1000,
            p50 % 1000 / 100,
            p99 / 1000,
            p99 % 1000 / 100,
            khz,
            src.name()
        );
    }
}
