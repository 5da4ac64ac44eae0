//! The per-device shared page between `bulkheadd` and a device backend: I/O counters the
//! backend keeps (per queue, as atomics) and the rate limits the daemon sets (with a
//! generation counter the backend rereads).
//!
//! `bulkheadd` creates one sealed memfd of [`REGION_SIZE`] bytes per device when the device
//! is added and hands it to every backend it spawns for that device (`--stats-fd`), so the
//! counters and the limits outlive any one backend process. Page 0 is the *limits* page:
//! only the daemon writes it (seqlock: generation odd while it writes); the backend maps it
//! read-only (a backend enforces its own limits anyway). Pages 1 and 2 are
//! the *counters*: only the backend writes them; the daemon maps them read-only and treats
//! whatever it reads as hostile input (a compromised backend can write anything there):
//! every value is a plain `u64`, no length or index in the region is trusted.
//!
//! The layout is a fixed array of little-endian `u64` words; see the `L_*`, `C_*` and `Q_*`
//! word indices.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// Page size the layout is made of.
pub const PAGE: usize = 4096;
/// Bytes of the whole region: one limits page and two counter pages.
pub const REGION_SIZE: usize = 3 * PAGE;

/// Magic in word [`L_MAGIC`] and [`C_MAGIC`]: "BHSTATS1".
pub const MAGIC: u64 = u64::from_le_bytes(*b"BHSTATS1");

/// Limits page: magic.
pub const L_MAGIC: usize = 0;
/// Limits page: generation; odd while the daemon writes, bumped on every change.
pub const L_GEN: usize = 1;
/// Limits page: bandwidth, bytes per second (0: unlimited).
pub const L_BW_RATE: usize = 2;
/// Limits page: one-time bandwidth burst, bytes.
pub const L_BW_BURST: usize = 3;
/// Limits page: operations (disk requests, NIC packets) per second (0: unlimited).
pub const L_OPS_RATE: usize = 4;
/// Limits page: one-time operations burst.
pub const L_OPS_BURST: usize = 5;

/// Counters page: magic (written by the backend once it maps the region).
pub const C_MAGIC: usize = 0;
/// Counters page: how many queue records the backend uses.
pub const C_QUEUES: usize = 1;
/// Counters page: backend starts with this region (the first one and every restart).
pub const C_STARTS: usize = 2;
/// First word of queue record 0 in the counters pages.
const C_QUEUE0: usize = 8;
/// Words per queue record.
pub const QUEUE_WORDS: usize = 32;
/// Most queue records.
pub const MAX_QUEUES: usize = 16;

/// Queue record: requests (disk) or packets (NIC) handled.
pub const Q_REQUESTS: usize = 0;
/// Queue record: read requests (disk).
pub const Q_READS: usize = 1;
/// Queue record: write requests (disk).
pub const Q_WRITES: usize = 2;
/// Queue record: flushes (disk).
pub const Q_FLUSHES: usize = 3;
/// Queue record: bytes read from the image (disk) or moved through the queue (NIC).
pub const Q_BYTES_READ: usize = 4;
/// Queue record: bytes written to the image (disk).
pub const Q_BYTES_WRITTEN: usize = 5;
/// Queue record: requests that failed (disk) or packets dropped (NIC).
pub const Q_ERRORS: usize = 6;
/// Queue record: nanoseconds the queue waited for the rate limiter.
pub const Q_THROTTLED_NS: usize = 7;
/// Queue record: sum of request latencies, microseconds (disk).
pub const Q_LATENCY_SUM_US: usize = 8;
/// Queue record: first word of the latency histogram (disk).
pub const Q_HIST: usize = 9;
/// Queue record: times the queue started waiting for the rate limiter.
pub const Q_THROTTLES: usize = Q_HIST + HIST_BUCKETS;
/// Queue record: 1 while the queue waits for the rate limiter, else 0 (so that a throttled
/// backend is not taken for a hung one).
pub const Q_WAITING: usize = Q_THROTTLES + 1;
/// Latency histogram buckets: bucket 0 is < 16 µs, bucket i < 16·2^i µs, the last is the rest.
pub const HIST_BUCKETS: usize = 16;

/// Bucket of a latency of `us` microseconds.
pub fn latency_bucket(us: u64) -> usize {
    let b = (64 - (us >> 4).leading_zeros()) as usize;
    b.min(HIST_BUCKETS - 1)
}

/// Upper bound (µs, exclusive) of histogram bucket `i`; `None` for the last.
pub fn bucket_limit_us(i: usize) -> Option<u64> {
    (i + 1 < HIST_BUCKETS).then(|| 16u64 << i)
}

/// Why a region cannot be made or mapped.
#[derive(Debug, Error)]
pub enum StatsError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The fd is smaller than the layout.
    #[error("stats region is {0} bytes, expected at least {REGION_SIZE}")]
    TooSmall(u64),
    /// The fd is not a region made by [`create`] (not a memfd of exactly the layout's
    /// size, sealed against resizing).
    #[error("not a sealed stats memfd")]
    NotARegion,
}

fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> StatsError {
    move |source| StatsError::Sys { what, source }
}

/// Rate limits of one device; 0 rates are unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes per second.
    pub bw_rate: u64,
    /// One-time extra bytes.
    pub bw_burst: u64,
    /// Operations per second.
    pub ops_rate: u64,
    /// One-time extra operations.
    pub ops_burst: u64,
}

/// Creates a device's region (the daemon's side): a sealed memfd of [`REGION_SIZE`] bytes,
/// zeroed, its limits page marked with [`MAGIC`].
pub fn create(name: &str) -> Result<OwnedFd, StatsError> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let cname = std::ffi::CString::new(format!("bulkhead-stats-{name}"))
        .unwrap_or_else(|_| c"bulkhead-stats".to_owned());
    let fd = memfd_create(
        &cname,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(|e| sys("memfd_create")(e.into()))?;
    nix::unistd::ftruncate(&fd, REGION_SIZE as i64).map_err(|e| sys("ftruncate")(e.into()))?;
    // A backend must not be able to shrink it under the daemon's mapping (SIGBUS).
    fcntl(
        fd.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(|e| sys("F_ADD_SEALS")(e.into()))?;
    Ok(fd)
}

/// One shared mapping of some pages of a region.
struct Mapping {
    base: NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the mapping is only accessed through atomics; it lives until drop.
unsafe impl Send for Mapping {}
// SAFETY: as above, every access is an atomic operation.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, page: usize, pages: usize, write: bool) -> Result<Self, StatsError> {
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| sys("fstat")(e.into()))?;
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if size < REGION_SIZE as u64 {
            return Err(StatsError::TooSmall(size));
        }
        let len = pages * PAGE;
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a file we checked is large enough; the kernel
        // picks the address; nothing else refers to it until we wrap it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                (page * PAGE) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys("mmap")(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(p.cast::<AtomicU64>())
            .ok_or_else(|| sys("mmap")(std::io::Error::other("null mapping")))?;
        Ok(Mapping {
            base,
            words: len / 8,
        })
    }

    fn word(&self, i: usize) -> Option<&AtomicU64> {
        // SAFETY: `i` is within the mapping, which is page-aligned (so 8-byte aligned) and
        // lives as long as `self`; AtomicU64 has the layout of u64.
        (i < self.words).then(|| unsafe { &*self.base.as_ptr().add(i) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no reference outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.words * 8);
        }
    }
}

fn queue_word(queue: usize, field: usize) -> Option<usize> {
    (queue < MAX_QUEUES && field < QUEUE_WORDS).then(|| C_QUEUE0 + queue * QUEUE_WORDS + field)
}

/// The backend's view: counters read-write, limits read-only.
pub struct BackendRegion {
    limits: Mapping,
    counters: Mapping,
}

impl std::fmt::Debug for BackendRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendRegion")
            .field("bytes", &((self.limits.words + self.counters.words) * 8))
            .finish()
    }
}

impl BackendRegion {
    /// Maps the region handed as `fd` (before the seccomp filter is installed) and counts
    /// this backend's start.
    pub fn map(fd: BorrowedFd<'_>, queues: usize) -> Result<Self, StatsError> {
        let r = BackendRegion {
            limits: Mapping::new(fd, 0, 1, false)?,
            counters: Mapping::new(fd, 1, 2, true)?,
        };
        r.counter(C_MAGIC).store(MAGIC, Ordering::Relaxed);
        r.counter(C_QUEUES)
            .store(queues.min(MAX_QUEUES) as u64, Ordering::Relaxed);
        r.counter(C_STARTS).fetch_add(1, Ordering::Relaxed);
        Ok(r)
    }

    fn counter(&self, i: usize) -> &AtomicU64 {
        static DUMMY: AtomicU64 = AtomicU64::new(0);
        self.counters.word(i).unwrap_or(&DUMMY)
    }

    /// Adds `n` to `queue`'s `field` (a `Q_*` index); out-of-range queues are not counted.
    #[inline]
    pub fn add(&self, queue: usize, field: usize, n: u64) {
        if let Some(w) = queue_word(queue, field) {
            self.counter(w).fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Sets `queue`'s `field` (a `Q_*` index) to `v`.
    #[inline]
    pub fn set(&self, queue: usize, field: usize, v: u64) {
        if let Some(w) = queue_word(queue, field) {
            self.counter(w).store(v, Ordering::Relaxed);
        }
    }

    /// The limits generation (cheap: compare it with the last one seen).
    #[inline]
    pub fn limits_generation(&self) -> u64 {
        self.limits
            .word(L_GEN)
            .map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// The current limits and their generation (a consistent copy; if the daemon stopped
    /// in the middle of a write, what is there, with its odd generation, after a bounded
    /// number of tries).
    pub fn limits(&self) -> (u64, Limits) {
        let w = |i| self.limits.word(i).map_or(0, |w| w.load(Ordering::Acquire));
        let mut tries = 0u32;
        loop {
            let g = w(L_GEN);
            let l = Limits {
                bw_rate: w(L_BW_RATE),
                bw_burst: w(L_BW_BURST),
                ops_rate: w(L_OPS_RATE),
                ops_burst: w(L_OPS_BURST),
            };
            tries += 1;
            if (g % 2 == 0 && w(L_GEN) == g) || tries >= 10_000 {
                return (g, l);
            }
            std::hint::spin_loop();
        }
    }
}

/// Counters of one queue, as the daemon read them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// [`Q_REQUESTS`].
    pub requests: u64,
    /// [`Q_READS`].
    pub reads: u64,
    /// [`Q_WRITES`].
    pub writes: u64,
    /// [`Q_FLUSHES`].
    pub flushes: u64,
    /// [`Q_BYTES_READ`].
    pub bytes_read: u64,
    /// [`Q_BYTES_WRITTEN`].
    pub bytes_written: u64,
    /// [`Q_ERRORS`].
    pub errors: u64,
    /// [`Q_THROTTLES`].
    pub throttles: u64,
    /// [`Q_THROTTLED_NS`].
    pub throttled_ns: u64,
    /// [`Q_LATENCY_SUM_US`].
    pub latency_sum_us: u64,
    /// The histogram ([`Q_HIST`]).
    pub latency_hist: [u64; HIST_BUCKETS],
}

/// The daemon's view: limits page read-write, counters read-only.
pub struct DaemonRegion {
    limits: Mapping,
    counters: Mapping,
}

impl DaemonRegion {
    /// Maps a region made by [`create`] and writes `limits` in it. The fd may come back
    /// from a backend (re-adoption): anything but a sealed memfd of [`REGION_SIZE`] bytes is
    /// refused, so a backend cannot make the daemon write into another file.
    pub fn map(fd: BorrowedFd<'_>, limits: Limits) -> Result<Self, StatsError> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS)
            .ok()
            .map(SealFlag::from_bits_truncate)
            .ok_or(StatsError::NotARegion)?;
        let want = SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
        let size = nix::sys::stat::fstat(fd.as_raw_fd()).map_or(-1, |st| st.st_size);
        if !seals.contains(want) || size != REGION_SIZE as i64 {
            return Err(StatsError::NotARegion);
        }
        let r = DaemonRegion {
            limits: Mapping::new(fd, 0, 1, true)?,
            counters: Mapping::new(fd, 1, 2, false)?,
        };
        if let Some(w) = r.limits.word(L_MAGIC) {
            w.store(MAGIC, Ordering::Relaxed);
        }
        r.set_limits(limits);
        Ok(r)
    }

    /// Writes new limits (the backend picks them up at its next request).
    pub fn set_limits(&self, l: Limits) {
        let (Some(g), Some(br), Some(bb), Some(or), Some(ob)) = (
            self.limits.word(L_GEN),
            self.limits.word(L_BW_RATE),
            self.limits.word(L_BW_BURST),
            self.limits.word(L_OPS_RATE),
            self.limits.word(L_OPS_BURST),
        ) else {
            return;
        };
        // Only the daemon writes this page, under its device lock: a plain seqlock.
        let gen = g.load(Ordering::Relaxed);
        let odd = gen | 1;
        g.store(odd, Ordering::Release);
        br.store(l.bw_rate, Ordering::Release);
        bb.store(l.bw_burst, Ordering::Release);
        or.store(l.ops_rate, Ordering::Release);
        ob.store(l.ops_burst, Ordering::Release);
        g.store(odd.wrapping_add(1), Ordering::Release);
    }

    fn counter(&self, i: usize) -> u64 {
        self.counters
            .word(i)
            .map_or(0, |w| w.load(Ordering::Relaxed))
    }

    /// Whether the backend says a queue waits for its rate limit (its word; a backend
    /// could lie, which only spares it from being declared hung: it could as well complete
    /// a request now and then).
    pub fn waiting(&self) -> bool {
        (0..MAX_QUEUES).any(|q| queue_word(q, Q_WAITING).is_some_and(|w| self.counter(w) != 0))
    }

    /// How many backends started with this region (0 if none has yet).
    pub fn starts(&self) -> u64 {
        if self.counter(C_MAGIC) != MAGIC {
            return 0;
        }
        self.counter(C_STARTS)
    }

    /// The counters of the first `queues` queues (the daemon's own count, never the one
    /// the backend wrote), clamped to [`MAX_QUEUES`].
    pub fn queues(&self, queues: usize) -> Vec<QueueCounters> {
        (0..queues.min(MAX_QUEUES))
            .map(|q| {
                let f = |field| queue_word(q, field).map_or(0, |w| self.counter(w));
                let mut hist = [0u64; HIST_BUCKETS];
                for (i, h) in hist.iter_mut().enumerate() {
                    *h = f(Q_HIST + i);
                }
                QueueCounters {
                    requests: f(Q_REQUESTS),
                    reads: f(Q_READS),
                    writes: f(Q_WRITES),
                    flushes: f(Q_FLUSHES),
                    bytes_read: f(Q_BYTES_READ),
                    bytes_written: f(Q_BYTES_WRITTEN),
                    errors: f(Q_ERRORS),
                    throttles: f(Q_THROTTLES),
                    throttled_ns: f(Q_THROTTLED_NS),
                    latency_sum_us: f(Q_LATENCY_SUM_US),
                    latency_hist: hist,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn backend_writes_daemon_reads_limits_flow_back() {
        let fd = create("t").expect("create");
        let d = DaemonRegion::map(
            fd.as_fd(),
            Limits {
                ops_rate: 1000,
                ..Limits::default()
            },
        )
        .expect("daemon map");
        let b = BackendRegion::map(fd.as_fd(), 2).expect("backend map");
        assert_eq!(b.limits().1.ops_rate, 1000);
        let g = b.limits_generation();
        b.add(1, Q_REQUESTS, 5);
        b.add(1, Q_BYTES_WRITTEN, 4096);
        b.add(99, Q_REQUESTS, 1); // ignored
        assert!(!d.waiting());
        b.set(1, Q_WAITING, 1);
        assert!(d.waiting());
        b.set(1, Q_WAITING, 0);
        let q = d.queues(usize::MAX);
        assert_eq!(q.len(), MAX_QUEUES);
        assert_eq!(q[1].requests, 5);
        assert_eq!(q[1].bytes_written, 4096);
        assert_eq!(d.starts(), 1);
        d.set_limits(Limits {
            bw_rate: 8 << 20,
            ..Limits::default()
        });
        assert_ne!(b.limits_generation(), g);
        assert_eq!(b.limits().1.bw_rate, 8 << 20);
        // A second backend of the same device keeps counting on top.
        drop(b);
        let b2 = BackendRegion::map(fd.as_fd(), 2).expect("backend map");
        b2.add(1, Q_REQUESTS, 1);
        assert_eq!(d.queues(2)[1].requests, 6);
        assert_eq!(d.starts(), 2);
    }

    #[test]
    fn sealed_against_shrinking() {
        let fd = create("t").expect("create");
        assert!(nix::unistd::ftruncate(&fd, 0).is_err());
    }

    #[test]
    fn daemon_refuses_other_files() {
        let f = std::fs::File::open("/proc/self/exe").expect("open");
        assert!(matches!(
            DaemonRegion::map(f.as_fd(), Limits::default()),
            Err(StatsError::NotARegion)
        ));
        let unsealed = nix::sys::memfd::memfd_create(
            c"x",
            nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .expect("memfd");
        nix::unistd::ftruncate(&unsealed, REGION_SIZE as i64).expect("size");
        assert!(DaemonRegion::map(unsealed.as_fd(), Limits::default()).is_err());
    }

    #[test]
    fn buckets() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(15), 0);
        assert_eq!(latency_bucket(16), 1);
        assert_eq!(latency_bucket(31), 1);
        assert_eq!(latency_bucket(32), 2);
        assert_eq!(latency_bucket(u64::MAX), HIST_BUCKETS - 1);
        assert_eq!(bucket_limit_us(0), Some(16));
        assert_eq!(bucket_limit_us(HIST_BUCKETS - 1), None);
    }
}
