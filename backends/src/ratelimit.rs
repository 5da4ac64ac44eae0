//! Token-bucket rate limiting of a device's requests (bytes per second and operations per
//! second), with the limits read from the device's shared page ([`bulkhead_ipc::devstats`]).
//!
//! Each bucket refills at its rate and holds at most 100 ms of it (at least one token), so
//! a measurement over any window longer than that sees the rate; `burst` is a one-time
//! credit on top (Firecracker's `one_time_burst`), spent first and not refilled. A request
//! that costs more than the bucket holds is admitted once the bucket is full and leaves it
//! in debt, paid back at the rate before the next one is admitted: a large request never
//! waits forever, and the long-run rate is exact.

use std::time::{Duration, Instant};

use bulkhead_ipc::devstats::Limits;

/// Most a bucket holds, in seconds of its rate.
const CAPACITY_SECS: f64 = 0.1;

/// One token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` per second with a one-time `burst`; None if `rate`
    /// is 0 (unlimited).
    pub fn new(rate: u64, burst: u64, now: Instant) -> Option<Self> {
        if rate == 0 {
            return None;
        }
        let rate = rate as f64;
        let capacity = (rate * CAPACITY_SECS).max(1.0);
        Some(TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            burst: burst as f64,
            last: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
    }

    /// How long until `cost` may be taken; None if it may be now.
    pub fn wait(&mut self, cost: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        let need = (cost as f64).min(self.capacity);
        let have = self.tokens + self.burst;
        if have >= need {
            None
        } else {
            // At least a microsecond: a wait of zero would spin.
            Some(Duration::from_secs_f64(
                ((need - have) / self.rate).max(1e-6),
            ))
        }
    }

    /// Takes `cost` (after [`Self::wait`] said it may): the burst first, then the bucket,
    /// which may go into debt.
    pub fn take(&mut self, cost: u64) {
        let mut cost = cost as f64;
        let from_burst = cost.min(self.burst);
        self.burst -= from_burst;
        cost -= from_burst;
        self.tokens -= cost;
    }
}

/// A device's limiter: a bandwidth bucket and an operations bucket, both of which must
/// admit a request.
#[derive(Debug, Clone, Default)]
pub struct Limiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    limits: Limits,
}

impl Limiter {
    /// Takes `limits` (fresh, full buckets) if they differ from the ones in force.
    pub fn set(&mut self, limits: Limits, now: Instant) {
        if limits == self.limits {
            return;
        }
        self.limits = limits;
        self.bytes = TokenBucket::new(limits.bw_rate, limits.bw_burst, now);
        self.ops = TokenBucket::new(limits.ops_rate, limits.ops_burst, now);
    }

    /// Whether any limit is set.
    pub fn active(&self) -> bool {
        self.bytes.is_some() || self.ops.is_some()
    }

    /// Admits one operation of `bytes` now (and charges it), or says how long to wait.
    pub fn admit(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let wb = self.bytes.as_mut().and_then(|b| b.wait(bytes, now));
        let wo = self.ops.as_mut().and_then(|b| b.wait(1, now));
        match (wb, wo) {
            (None, None) => {
                if let Some(b) = &mut self.bytes {
                    b.take(bytes);
                }
                if let Some(b) = &mut self.ops {
                    b.take(1);
                }
                Ok(())
            }
            (a, b) => Err(a.unwrap_or_default().max(b.unwrap_or_default())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admitted operations over `secs` of simulated time, each of `bytes`, retrying after
    /// the wait the limiter asks for.
    fn run(l: &mut Limiter, bytes: u64, secs: f64) -> u64 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut n = 0;
        while now.duration_since(t0).as_secs_f64() < secs {
            match l.admit(bytes, now) {
                Ok(()) => n += 1,
                Err(w) => {
                    assert!(w > Duration::ZERO);
                    now += w;
                }
            }
        }
        n
    }

    #[test]
    fn ops_rate_holds() {
        let mut l = Limiter::default();
        l.set(
            Limits {
                ops_rate: 1000,
                ..Limits::default()
            },
            Instant::now(),
        );
        let n = run(&mut l, 4096, 3.0);
        // 3000 over 3 s, plus the first bucket (100).
        assert!((3000..=3101).contains(&n), "{n}");
    }

    #[test]
    fn bandwidth_holds_and_big_requests_pass() {
        let mut l = Limiter::default();
        l.set(
            Limits {
                bw_rate: 8 << 20,
                ..Limits::default()
            },
            Instant::now(),
        );
        // 4 MiB requests: bigger than the bucket (0.8 MiB), still admitted, at the rate.
        let n = run(&mut l, 4 << 20, 3.0);
        assert!((6..=7).contains(&n), "{n}");
    }

    #[test]
    fn burst_is_one_time() {
        let now = Instant::now();
        let mut b = TokenBucket::new(10, 100, now).expect("bucket");
        // capacity 1 + burst 100.
        for _ in 0..101 {
            assert_eq!(b.wait(1, now), None);
            b.take(1);
        }
        assert!(b.wait(1, now).is_some());
    }

    #[test]
    fn unlimited_is_free() {
        let mut l = Limiter::default();
        assert!(!l.active());
        assert_eq!(l.admit(u64::MAX, Instant::now()), Ok(()));
    }
}
