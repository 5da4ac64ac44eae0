//! Adaptive polling for a queue worker: how long it spins on its ring (and engine) before
//! it sleeps, up to a limit (`--poll-us`). The window grows while requests and completions
//! keep coming (the queue is busy), shrinks once they stop, and drops to zero for a while
//! when spinning was preempted — on a host short of CPUs the spin would take the time a vCPU
//! needs.
//!
//! A spin also waits while the host has more runnable threads than CPUs ([`HostLoad`]):
//! there it could only run by taking a CPU from another thread, most likely a vCPU.
//!
//! Why poll at all: on a host that is itself a VM, a sleeping worker costs the guest a
//! notification (an exit) per request and the worker a wake-up of tens of microseconds
//! per sleep; both go away while it spins.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first window after polling was off (it then doubles).
const START: Duration = Duration::from_micros(4);

/// An idle period (spin plus sleep) up to this long means the queue is busy: the window
/// grows. It is not the limit itself: on a host that is a VM, waking a sleeping thread
/// alone can take longer than the limit, and the spin then still catches the requests
/// the guest posts right after each completion.
const ACTIVE_GAP: Duration = Duration::from_millis(1);

/// Longer idle periods in a row, with no spin finding work between them, before the
/// window halves. One says little: a disk that completes in batches leaves long gaps
/// between short ones, and the short ones are what the spin catches.
const SHRINK_AFTER: u32 = 4;

/// A gap this long between two looks at the clock while spinning means the thread was
/// not running: something else wanted the CPU. Interrupts are shorter: at 50 us, 2-18
/// "preemptions" a QD32 run were counted here with no other load (most likely the host
/// disk's completion interrupts, ~25 requests each) and held polling off for most of it.
pub const PREEMPTED_GAP: Duration = Duration::from_micros(500);

/// The first hold-off after a preemption; it doubles while preemptions recur, up to
/// [`MAX_HOLD`], and resets once a poll runs unpreempted.
const FIRST_HOLD: Duration = Duration::from_millis(20);
const MAX_HOLD: Duration = Duration::from_secs(1);

/// One queue worker's polling state.
#[derive(Debug)]
pub struct PollWindow {
    /// The largest window (zero: never poll).
    limit: Duration,
    /// The current window.
    window: Duration,
    /// No polling before this (after a preemption).
    hold_until: Option<Instant>,
    /// The next hold-off's length.
    hold: Duration,
    /// When the worker last began to idle (polling, then sleeping), if it is idle.
    idle_since: Option<Instant>,
    /// Long sleeps since a spin last found work (or the window last changed).
    misses: u32,
}

impl PollWindow {
    /// Polling of at most `limit` per wait; zero never polls.
    pub fn new(limit: Duration) -> PollWindow {
        PollWindow {
            limit,
            window: Duration::ZERO,
            hold_until: None,
            hold: FIRST_HOLD,
            idle_since: None,
            misses: 0,
        }
    }

    /// Changes the limit (the window shrinks to it at once).
    pub fn set_limit(&mut self, limit: Duration) {
        self.limit = limit;
        self.window = self.window.min(limit);
    }

    /// How long to spin now (zero: sleep at once). Marks the start of an idle period.
    pub fn begin(&mut self, now: Instant) -> Duration {
        self.idle_since.get_or_insert(now);
        if self.limit.is_zero() {
            return Duration::ZERO;
        }
        if let Some(until) = self.hold_until {
            if now < until {
                return Duration::ZERO;
            }
            self.hold_until = None;
        }
        self.window
    }

    /// The spin found work: the idle period ends, the window stays, and the next
    /// hold-off is the first one again.
    pub fn found(&mut self) {
        self.idle_since = None;
        self.hold = FIRST_HOLD;
        self.misses = 0;
    }

    /// Work turned up without a spin or a sleep: the idle period ends, nothing else
    /// changes.
    pub fn busy(&mut self) {
        self.idle_since = None;
    }

    /// The worker was woken at `now` after spinning for nothing and sleeping: the window
    /// grows if the whole idle period was at most [`ACTIVE_GAP`] (the queue is busy), and
    /// halves after [`SHRINK_AFTER`] longer ones with no spin finding work in between (the
    /// guest has gone quiet: the spins are wasted).
    pub fn woken(&mut self, now: Instant) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        if self.limit.is_zero() {
            return;
        }
        let idle = now.saturating_duration_since(since);
        if idle <= ACTIVE_GAP.max(self.limit) {
            self.misses = 0;
            if self.hold_until.is_none() {
                self.window = (self.window * 2).max(START).min(self.limit);
            }
        } else {
            self.misses += 1;
            if self.misses >= SHRINK_AFTER {
                self.misses = 0;
                self.window /= 2;
                if self.window < START {
                    self.window = Duration::ZERO;
                }
            }
        }
    }

    /// Spinning was preempted at `now`: no polling for a hold-off, which doubles while
    /// this recurs; the window starts again from zero afterwards.
    pub fn preempted(&mut self, now: Instant) {
        self.window = Duration::ZERO;
        self.hold_until = Some(now + self.hold);
        self.hold = (self.hold * 2).min(MAX_HOLD);
    }

    /// The current window.
    #[cfg(test)]
    fn window(&self) -> Duration {
        self.window
    }
}

/// How long a [`HostLoad`] reading stays good.
const LOAD_FRESH: Duration = Duration::from_millis(10);

/// Whether the host has more runnable threads than this process has CPUs, from the
/// running count in `/proc/loadavg` (opened before the sandbox closes the file system;
/// read with `pread`). Our own spinning thread is one of those counted.
pub struct HostLoad {
    file: File,
    cpus: usize,
    /// The last reading: when, and whether it said contended.
    last: Mutex<Option<(Instant, bool)>>,
}

impl HostLoad {
    /// Opens `/proc/loadavg` and counts the CPUs this process may run on.
    pub fn open() -> io::Result<HostLoad> {
        let file = File::open("/proc/loadavg")?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let load = HostLoad {
            file,
            cpus,
            last: Mutex::new(None),
        };
        load.read_running()?;
        Ok(load)
    }

    fn read_running(&self) -> io::Result<usize> {
        let mut buf = [0u8; 128];
        let n = self.file.read_at(&mut buf, 0)?;
        let text = std::str::from_utf8(buf.get(..n).unwrap_or_default())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        parse_running(text).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))
    }

    /// True if more threads are runnable than there are CPUs (a reading at most
    /// [`LOAD_FRESH`] old). False if the file cannot be read.
    pub fn contended(&self, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, busy)) = *last {
            if now.saturating_duration_since(at) < LOAD_FRESH {
                return busy;
            }
        }
        let busy = self.read_running().is_ok_and(|r| r > self.cpus);
        *last = Some((now, busy));
        busy
    }
}

/// The running count (`R` of the fourth field, `R/T`) of a `/proc/loadavg` line.
fn parse_running(line: &str) -> Option<usize> {
    let field = line.split_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn grows_while_events_come_within_the_limit_and_shrinks_after_long_sleeps() {
        let t0 = Instant::now();
        let mut p = PollWindow::new(200 * US);
        assert_eq!(p.begin(t0), Duration::ZERO, "starts off");
        p.woken(t0 + 30 * US);
        assert_eq!(p.window(), START);
        let mut t = t0 + 30 * US;
        for _ in 0..10 {
            p.begin(t);
            t += 30 * US;
            p.woken(t);
        }
        assert_eq!(p.window(), 200 * US, "capped at the limit");
        // An event the spin caught keeps the window.
        assert_eq!(p.begin(t), 200 * US);
        p.found();
        assert_eq!(p.window(), 200 * US);
        // Long sleeps with spins that catch the short gaps between them keep it.
        for _ in 0..20 {
            p.begin(t);
            t += Duration::from_millis(5);
            p.woken(t);
            p.begin(t);
            p.found();
        }
        assert_eq!(p.window(), 200 * US, "kept while spins find work");
        // Every SHRINK_AFTER long sleeps in a row halve it; in the end polling stops.
        for _ in 0..SHRINK_AFTER {
            p.begin(t);
            t += Duration::from_millis(5);
            p.woken(t);
        }
        assert_eq!(p.window(), 100 * US);
        for _ in 0..6 * SHRINK_AFTER {
            p.begin(t);
            t += Duration::from_millis(5);
            p.woken(t);
        }
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn a_preemption_stops_polling_for_a_hold_off_that_doubles_while_it_recurs() {
        let t0 = Instant::now();
        let mut p = PollWindow::new(100 * US);
        for i in 0..8 {
            p.begin(t0);
            p.woken(t0 + (i + 1) * US);
        }
        assert_eq!(p.window(), 100 * US);
        p.preempted(t0);
        assert_eq!(p.begin(t0 + Duration::from_millis(19)), Duration::ZERO);
        // Growth is held too.
        p.woken(t0 + Duration::from_millis(19));
        assert_eq!(p.window(), Duration::ZERO);
        // After the hold it grows again from the start.
        let t1 = t0 + Duration::from_millis(21);
        assert_eq!(p.begin(t1), Duration::ZERO);
        p.woken(t1 + US);
        assert_eq!(p.window(), START);
        // A second preemption holds twice as long.
        p.preempted(t1);
        assert_eq!(p.begin(t1 + Duration::from_millis(39)), Duration::ZERO);
        p.woken(t1 + Duration::from_millis(39));
        assert_eq!(p.begin(t1 + Duration::from_millis(41)), Duration::ZERO);
        p.woken(t1 + Duration::from_millis(41));
        assert_eq!(p.window(), START);
        // A spin that finds work resets the hold-off length to the first one.
        p.found();
        let t2 = t1 + Duration::from_millis(50);
        p.preempted(t2);
        assert_eq!(p.begin(t2 + Duration::from_millis(19)), Duration::ZERO);
        p.woken(t2 + Duration::from_millis(19));
        assert_eq!(p.window(), Duration::ZERO, "held");
        p.begin(t2 + Duration::from_millis(21));
        p.woken(t2 + Duration::from_millis(21));
        assert_eq!(p.window(), START, "held 20 ms, not 80");
    }

    #[test]
    fn reads_the_running_count_of_loadavg() {
        assert_eq!(parse_running("0.61 0.56 0.31 3/131 5563\n"), Some(3));
        assert_eq!(parse_running("0.61 0.56 0.31"), None);
        assert_eq!(parse_running("0.61 0.56 0.31 x/131 5563"), None);
        let load = HostLoad::open().expect("/proc/loadavg");
        // This test's own thread is running: at least one.
        assert!(load.read_running().expect("read") >= 1);
        let now = Instant::now();
        let first = load.contended(now);
        assert_eq!(
            load.contended(now + Duration::from_millis(1)),
            first,
            "cached"
        );
    }

    #[test]
    fn a_zero_limit_never_polls() {
        let t0 = Instant::now();
        let mut p = PollWindow::new(Duration::ZERO);
        for i in 0..10 {
            assert_eq!(p.begin(t0), Duration::ZERO);
            p.woken(t0 + i * US);
        }
        assert_eq!(p.window(), Duration::ZERO);
        p.set_limit(50 * US);
        p.begin(t0);
        p.woken(t0 + US);
        assert_eq!(p.window(), START);
        p.set_limit(2 * US);
        assert_eq!(p.window(), 2 * US);
    }
}
