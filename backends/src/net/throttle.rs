//! Rate limiting of one direction of a NIC (what the guest sends, or what it receives): a
//! token-bucket [`Limiter`], a timerfd in the worker's epoll that wakes the direction once
//! it may go on (so a throttled direction never spins), and the accounting of its waits in
//! the shared counters page.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_ipc::devstats::{self, BackendRegion, Limits};
use vmm_sys_util::timerfd::TimerFd;

use crate::ratelimit::Limiter;

/// The longest a throttled direction sleeps before it looks at its limits again.
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// One direction's limiter, timer and wait accounting.
pub struct Throttle {
    limiter: Mutex<Limiter>,
    timer: Mutex<TimerFd>,
    since: Mutex<Option<Instant>>,
    region: Arc<BackendRegion>,
    record: usize,
}

impl Throttle {
    /// A throttle counting its waits in `record` of `region`; its timerfd is made here
    /// (before the seccomp filter) and is non-blocking, so a timer re-armed after it fired
    /// is read without waiting.
    pub fn new(region: Arc<BackendRegion>, record: usize) -> std::io::Result<Self> {
        let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: F_GETFL/F_SETFL on a timerfd we own; no memory is passed.
        unsafe {
            let fl = libc::fcntl(timer.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Throttle {
            limiter: Mutex::new(Limiter::default()),
            timer: Mutex::new(timer),
            since: Mutex::new(None),
            region,
            record,
        })
    }

    /// The timer's fd, for the worker's epoll.
    pub fn timer_fd(&self) -> std::os::fd::RawFd {
        self.timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_raw_fd()
    }

    /// Takes the expiry of a timer that fired (never blocks).
    pub fn fired(&self) {
        let _ = self.timer.lock().unwrap_or_else(|e| e.into_inner()).wait();
    }

    /// Takes new limits.
    pub fn set(&self, limits: Limits) {
        self.limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(limits, Instant::now());
    }

    /// Whether a limit is in force.
    pub fn active(&self) -> bool {
        self.limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .active()
    }

    /// Admits a frame of `bytes` now, or arms the timer for when it may go and says so.
    pub fn admit(&self, bytes: u64) -> Result<(), Duration> {
        let r = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(bytes, Instant::now());
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok(()) => {
                if let Some(t) = since.take() {
                    self.region.add(
                        self.record,
                        devstats::Q_THROTTLED_NS,
                        t.elapsed().as_nanos() as u64,
                    );
                    self.region.set(self.record, devstats::Q_WAITING, 0);
                }
            }
            Err(wait) => {
                if since.is_none() {
                    *since = Some(Instant::now());
                    self.region.add(self.record, devstats::Q_THROTTLES, 1);
                    self.region.set(self.record, devstats::Q_WAITING, 1);
                }
                let mut t = self.timer.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = t.reset(wait.clamp(Duration::from_micros(1), MAX_SLEEP), None) {
                    eprintln!("bulkhead-net: cannot arm a rate-limit timer: {e}");
                }
            }
        }
        r
    }
}
