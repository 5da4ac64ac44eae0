//! `blk-stream=` / `blk-stream-verify=`: a long sequential write workload for
//! backend-restart tests, and its read-back check (see README.md, *Disk stream*).
//!
//! Unlike the other blk tokens, a request that has not completed is not an error until
//! `blk-stream-timeout=` seconds have passed: the used ring keeps being polled, the
//! queues with requests in flight are re-notified about every 100 ms (a kick may have
//! been lost while the backend was away), and the device is never reset because of a
//! slow request. Only NEEDS_RESET or the timeout end the stream with an error.

use super::{Disk, Mode, GOLDEN, MAX_SLOTS, SC_STATUS, SECTOR, S_TIMEOUT, T_FLUSH, T_IN, T_OUT};
use crate::println;
use crate::virtio::{r64, r8, w64, Buf, STATUS_NEEDS_RESET};

/// The stream pattern of sector `lba`, written in pass `pass` by the write request with
/// sequence number `seq`: word 0 = lba, 1 = pass, 2 = seed, 3 = seq, words 4..63 =
/// xorshift64 (13, 7, 17) outputs from state seed ^ (lba * GOLDEN) ^ (pass << 32)
/// (wrapping; GOLDEN if that is 0).
pub(super) fn gen_stream_sector(seed: u64, lba: u64, pass: u64, seq: u64, out: &mut [u64; 64]) {
    out[0] = lba;
    out[1] = pass;
    out[2] = seed;
    out[3] = seq;
    let mut x = seed ^ lba.wrapping_mul(GOLDEN) ^ (pass << 32);
    if x == 0 {
        x = GOLDEN;
    }
    for w in out.iter_mut().skip(4) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
}

/// Why a patient wait ended without a completion.
#[derive(Clone, Copy)]
enum Fail {
    Timeout,
    NeedsReset,
}

/// What one range (a write pass or the verify read) came to.
#[derive(Default)]
struct Outcome {
    /// First failure: (status, first sector of the request); S_TIMEOUT for a timeout
    /// or NEEDS_RESET.
    err: Option<(u8, u64)>,
    /// Requests that completed with a non-zero status, plus 1 for a timeout/NEEDS_RESET.
    errors: u64,
    /// Verify: first wrong sector and the pass found in its word 1.
    mismatch: Option<(u64, u64)>,
}

/// State shared by the stream tokens of one boot.
pub(super) struct StreamState {
    /// Sequence number of the last write request (the first one gets 1).
    pub seq: u64,
    /// Timeout per request, in TSC ticks.
    pub timeout: u64,
    /// Longest single-request latency seen, in TSC ticks.
    pub max_wait: u64,
    /// Requests that take at least this many TSC ticks are reported (`blk-stall-ms=`;
    /// 0 = never).
    pub stall: u64,
    /// The stall being observed: its longest request (TSC ticks; 0 = none) and how many
    /// requests took at least `stall`.
    pub stall_max: u64,
    pub stall_n: u64,
    /// When the last `blk-stall:` report ended (TSC): requests submitted before then are
    /// not measured, as the report's own serial output (several ms here) delayed them.
    pub quiet_from: u64,
}

impl StreamState {
    /// Records one request's latency, submitted at `t0` (TSC). A run of requests that each
    /// took at least `blk-stall-ms=` is one stall, reported on one line when the first
    /// quick request after it completes (or the token ends): printing in the middle of
    /// it would delay the requests still to be seen. `ms` = TSC ticks per millisecond.
    fn waited(&mut self, t0: u64, ms: u64) {
        let ticks = crate::tsc::now().saturating_sub(t0);
        self.max_wait = self.max_wait.max(ticks);
        if self.stall == 0 || t0 < self.quiet_from {
            return;
        }
        if ticks >= self.stall {
            self.stall_max = self.stall_max.max(ticks);
            self.stall_n += 1;
        } else {
            self.report_stall(ms);
        }
    }

    /// Prints the stall being observed, if any:
    /// `blk-stall: <longest request, us> us over <n> requests`.
    pub(super) fn report_stall(&mut self, ms: u64) {
        if self.stall_n == 0 {
            return;
        }
        println!(
            "blk-stall: {} us over {} requests",
            self.stall_max.saturating_mul(1000) / ms.max(1),
            self.stall_n
        );
        self.stall_max = 0;
        self.stall_n = 0;
        self.quiet_from = crate::tsc::now();
    }
}

impl Disk {
    /// Polls until `head` on queue `q` completes; every ~100 ms checks NEEDS_RESET and
    /// `deadline` (TSC) and re-notifies every queue with requests in flight.
    fn wait_patient(&mut self, q: usize, head: u16, deadline: u64) -> Result<u8, Fail> {
        let t = self.t;
        let period = 100 * self.ms;
        let mut next_check = crate::tsc::now() + period;
        let mut n = 0u32;
        loop {
            self.qs[q].poll();
            if self.qs[q].take(head).is_some() {
                return Ok(r8(self.qs[q].scratch_of(head) + SC_STATUS));
            }
            n = n.wrapping_add(1);
            if n.is_multiple_of(256) {
                let now = crate::tsc::now();
                if now >= next_check {
                    if t.status() & STATUS_NEEDS_RESET != 0 {
                        return Err(Fail::NeedsReset);
                    }
                    if now > deadline {
                        return Err(Fail::Timeout);
                    }
                    for i in 0..self.nq {
                        if self.qs[i].inflight > 0 {
                            self.qs[i].kick_always();
                        }
                    }
                    next_check = now + period;
                }
            }
            core::hint::spin_loop();
        }
    }

    fn report_fail(&mut self, f: Fail, sector: u64) {
        // The abandoned requests are still in the rings: re-initialize before the next
        // request (this is the only reset the stream tokens cause).
        self.ready = false;
        match f {
            Fail::Timeout => println!(
                "blk{}: stream request at sector {} timed out",
                self.index, sector
            ),
            Fail::NeedsReset => println!(
                "blk{}: stream request at sector {}: device needs reset",
                self.index, sector
            ),
        }
    }

    /// One FLUSH on queue 0, waited for patiently. Returns its status (S_TIMEOUT on
    /// timeout / NEEDS_RESET).
    fn stream_flush(&mut self, st: &mut StreamState, at: u64) -> u8 {
        let t0 = crate::tsc::now();
        let Some(head) = self.submit(0, T_FLUSH, 0, None) else {
            return S_TIMEOUT;
        };
        self.qs[0].kick();
        match self.wait_patient(0, head, t0 + st.timeout) {
            Ok(s) => {
                st.waited(t0, self.ms);
                s
            }
            Err(f) => {
                st.max_wait = st.max_wait.max(crate::tsc::now() - t0);
                self.report_fail(f, at);
                S_TIMEOUT
            }
        }
    }

    /// Writes (`Mode::Write(seed)`, pass `pass`) or reads and checks
    /// (`Mode::Verify(seed)`, expecting pass `pass`) [start, start+count) in requests
    /// of `req_sectors`, several in flight round-robin over the queues, sequentially.
    /// Stops submitting at the first failure (drains what is in flight unless it was a
    /// timeout / NEEDS_RESET).
    #[allow(clippy::too_many_arguments)]
    fn stream_range(
        &mut self,
        mode: Mode,
        pass: u64,
        start: u64,
        count: u64,
        req_sectors: u64,
        mem: (u64, u64),
        qused: &mut u32,
        st: &mut StreamState,
    ) -> Outcome {
        let mut r = Outcome::default();
        let req_bytes = req_sectors * SECTOR;
        let nslots = ((mem.1 - mem.0) / req_bytes)
            .min((4 * self.nq) as u64)
            .min(MAX_SLOTS as u64);
        if nslots == 0 {
            println!(
                "blk: not enough memory for {} KiB requests",
                req_bytes >> 10
            );
            r.err = Some((S_TIMEOUT, start));
            r.errors = 1;
            return r;
        }
        let end = start.saturating_add(count);
        // (queue, head, first sector, sectors, submit TSC)
        let mut ring = [(0usize, 0u16, 0u64, 0u64, 0u64); MAX_SLOTS];
        let (mut sub, mut ret) = (0u64, 0u64);
        let mut next = start;
        let mut pat = [0u64; 64];
        let mut dirty = 0u32;
        let (write, seed) = match mode {
            Mode::Write(s) => (true, s),
            Mode::Verify(s) => (false, s),
            Mode::Read => (false, 0),
        };
        loop {
            while r.err.is_none() && r.mismatch.is_none() && sub - ret < nslots && next < end {
                let q = (sub % self.nq as u64) as usize;
                if self.qs[q].free_descs() < 3 {
                    break;
                }
                let n = req_sectors.min(end - next);
                let buf = mem.0 + (sub % nslots) * req_bytes;
                if write {
                    let seq = st.seq + 1;
                    for i in 0..n {
                        gen_stream_sector(seed, next + i, pass, seq, &mut pat);
                        let a = buf + i * SECTOR;
                        for (k, &w) in pat.iter().enumerate() {
                            w64(a + 8 * k as u64, w);
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
                if write {
                    st.seq += 1;
                }
                dirty |= 1 << q;
                *qused |= 1 << q;
                ring[(sub % MAX_SLOTS as u64) as usize] = (q, head, next, n, crate::tsc::now());
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
            // Retire the oldest request (waiting for it, patiently), then every
            // following one that has already completed, before refilling.
            let mut blocking = true;
            while ret < sub {
                let (q, head, sector, n, t0) = ring[(ret % MAX_SLOTS as u64) as usize];
                let s = if blocking {
                    match self.wait_patient(q, head, t0 + st.timeout) {
                        Ok(s) => s,
                        Err(f) => {
                            st.max_wait = st.max_wait.max(crate::tsc::now().saturating_sub(t0));
                            self.report_fail(f, sector);
                            r.errors += 1;
                            if r.err.is_none() {
                                r.err = Some((S_TIMEOUT, sector));
                            }
                            return r;
                        }
                    }
                } else {
                    self.qs[q].poll();
                    match self.qs[q].take(head) {
                        Some(_) => r8(self.qs[q].scratch_of(head) + SC_STATUS),
                        None => break,
                    }
                };
                blocking = false;
                st.waited(t0, self.ms);
                if s != 0 {
                    r.errors += 1;
                    if r.err.is_none() {
                        r.err = Some((s, sector));
                    }
                } else if !write && r.err.is_none() && r.mismatch.is_none() {
                    let buf = mem.0 + (ret % nslots) * req_bytes;
                    for i in 0..n {
                        let a = buf + i * SECTOR;
                        let lba = sector + i;
                        // Word 3 (the writer's request sequence number) is only
                        // required to be non-zero.
                        let seq = r64(a + 24);
                        gen_stream_sector(seed, lba, pass, seq, &mut pat);
                        let bad = seq == 0
                            || pat
                                .iter()
                                .enumerate()
                                .any(|(k, &w)| r64(a + 8 * k as u64) != w);
                        if bad {
                            r.mismatch = Some((lba, r64(a + 8)));
                            break;
                        }
                    }
                }
                ret += 1;
            }
        }
        r
    }

    /// `blk-stream=<seed>:<start>:<count>:<passes>`. Returns true if it failed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn stream_write_token(
        &mut self,
        seed: u64,
        start: u64,
        count: u64,
        passes: u64,
        req_sectors: u64,
        mem: (u64, u64),
        qused: &mut u32,
        st: &mut StreamState,
    ) -> bool {
        let flush = self.features & super::F_FLUSH != 0;
        let mut errors = 0u64;
        let mut done = 0u64;
        let mut failed = false;
        if !self.ensure_ready() {
            errors = 1;
            failed = true;
            println!(
                "blk-stream: pass 1 status {} at sector {}",
                S_TIMEOUT, start
            );
        }
        let mut p = 1;
        while !failed && p <= passes {
            let r = self.stream_range(
                Mode::Write(seed),
                p,
                start,
                count,
                req_sectors,
                mem,
                qused,
                st,
            );
            errors += r.errors;
            let mut err = r.err;
            if err.is_none() && flush {
                let s = self.stream_flush(st, start.saturating_add(count));
                if s != 0 {
                    errors += 1;
                    err = Some((s, start.saturating_add(count)));
                }
            }
            if let Some((s, sector)) = err {
                println!("blk-stream: pass {} status {} at sector {}", p, s, sector);
                failed = true;
                break;
            }
            println!("blk-stream: pass {} ok", p);
            done = p;
            p += 1;
        }
        st.report_stall(self.ms);
        println!(
            "blk-stream: done {} passes, {} sectors, {} errors, max wait {} ms",
            done,
            count,
            errors,
            st.max_wait / self.ms
        );
        failed
    }

    /// `blk-stream-verify=<seed>:<start>:<count>:<passes>`. Returns true if it failed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn stream_verify_token(
        &mut self,
        seed: u64,
        start: u64,
        count: u64,
        passes: u64,
        req_sectors: u64,
        mem: (u64, u64),
        qused: &mut u32,
        st: &mut StreamState,
    ) -> bool {
        if !self.ensure_ready() {
            println!(
                "blk-stream-verify: status {} at sector {}",
                S_TIMEOUT, start
            );
            return true;
        }
        let r = self.stream_range(
            Mode::Verify(seed),
            passes,
            start,
            count,
            req_sectors,
            mem,
            qused,
            st,
        );
        st.report_stall(self.ms);
        if let Some((sector, found)) = r.mismatch {
            println!(
                "blk-stream-verify: MISMATCH at sector {} (pass {}, expected {})",
                sector, found, passes
            );
            true
        } else if let Some((s, sector)) = r.err {
            println!("blk-stream-verify: status {} at sector {}", s, sector);
            true
        } else {
            println!("blk-stream-verify: ok");
            false
        }
    }
}
