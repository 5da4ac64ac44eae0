//! Request and error counters, and a rate-limited log of malformed requests to stderr.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most this many malformed-request lines per window.
const LOG_BURST: u32 = 10;
/// The rate-limiting window.
const LOG_WINDOW: Duration = Duration::from_secs(1);

/// Counters shared by every queue of one disk, for the lifetime of the process.
#[derive(Debug)]
pub struct Stats {
    /// Descriptor chains taken from the avail rings.
    pub requests: AtomicU64,
    /// Requests completed with a status other than OK (IOERR or UNSUPP).
    pub errors: AtomicU64,
    /// Chains so broken that no status could be written: returned with used len 0.
    pub broken: AtomicU64,
    /// Bytes read from the image into guest memory.
    pub bytes_read: AtomicU64,
    /// Bytes written to the image from guest memory.
    pub bytes_written: AtomicU64,
    /// Polling: spins that found work, spins that ran out their window, spins cut short
    /// by a preemption, and spins skipped because the host was short of CPUs.
    pub poll_found: AtomicU64,
    pub poll_expired: AtomicU64,
    pub poll_preempted: AtomicU64,
    pub poll_skipped: AtomicU64,
    log: Mutex<LogWindow>,
}

/// Adds one to counter `c` (the counters are statistics: no ordering with anything else).
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
struct LogWindow {
    start: Instant,
    printed: u32,
    suppressed: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            broken: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            poll_found: AtomicU64::new(0),
            poll_expired: AtomicU64::new(0),
            poll_preempted: AtomicU64::new(0),
            poll_skipped: AtomicU64::new(0),
            log: Mutex::new(LogWindow {
                start: Instant::now(),
                printed: 0,
                suppressed: 0,
            }),
        }
    }
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// See [`Stats::requests`].
    pub requests: u64,
    /// See [`Stats::errors`].
    pub errors: u64,
    /// See [`Stats::broken`].
    pub broken: u64,
    /// See [`Stats::bytes_read`].
    pub bytes_read: u64,
    /// See [`Stats::bytes_written`].
    pub bytes_written: u64,
}

impl Stats {
    /// Copies the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            broken: self.broken.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Logs one malformed or failed request, at most [`LOG_BURST`] lines per second; the
    /// number of lines dropped is reported with the next line that gets through.
    pub fn log_malformed(&self, what: std::fmt::Arguments<'_>) {
        let Ok(mut w) = self.log.lock() else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(w.start) >= LOG_WINDOW {
            w.start = now;
            w.printed = 0;
        }
        if w.printed >= LOG_BURST {
            w.suppressed += 1;
            return;
        }
        w.printed += 1;
        if w.suppressed > 0 {
            eprintln!(
                "bulkhead-blk: {what} ({} similar messages suppressed)",
                w.suppressed
            );
            w.suppressed = 0;
        } else {
            eprintln!("bulkhead-blk: {what}");
        }
    }
}
