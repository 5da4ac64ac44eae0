//! The `VhostUserBackend` glue: one worker thread per queue pops chains, validates them
//! ([`request::begin`](super::request::begin)), hands reads, writes and flushes to the
//! queue's I/O [`Engine`] — as many in flight as the guest makes available — and puts each
//! request in the used ring as it completes, in completion order, notifying the guest once
//! per batch of completions (EVENT_IDX decides whether it wants to hear). A FLUSH waits
//! until the requests taken before it on its queue have completed. A kick handler returns
//! only once nothing is in flight.
//!
//! When the frontend keeps an in-flight region ([`crate::inflight`]), every request is
//! marked there before it starts and cleared once it is in the used ring (out-of-order
//! completion is what the region is for), and a queue's first kick after a (re)connect
//! resubmits what the previous backend left in flight.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_ipc::devstats::{self, BackendRegion};
use vmm_sys_util::timerfd::TimerFd;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::{BlkConfig, MAX_QUEUE_SIZE};
use super::disk::Disk;
use super::engine::{Engine, EngineError, EngineKind};
use super::poll::{HostLoad, PollWindow, PREEMPTED_GAP};
use super::request::{
    begin, chain_at, process_descriptors, IoOp, IoRequest, Started, Target, ID_LEN,
};
use super::stats::{bump, Stats};
use super::waiter::IoWaiter;
use crate::inflight::{InflightRegion, InflightSlot, Takeover};
use crate::ratelimit::Limiter;
use virtio_queue::desc::split::Descriptor;

/// One queue's view of the in-flight region, and its engine.
struct QueueTrack {
    /// The slot epoch this queue last took over.
    epoch: u64,
    /// The region in use (None: the frontend keeps none).
    region: Option<Arc<InflightRegion>>,
    /// Next submission number.
    counter: u64,
    /// The queue's I/O engine.
    engine: Engine,
    /// Requests in the engine, by token.
    slab: Slab,
    /// When each request in the slab was taken, by token.
    taken: Vec<Instant>,
    /// Since when the queue has waited for the rate limiter.
    throttled_since: Option<Instant>,
    /// Sleeps the worker until a completion or a kick (None: it blocks in the engine).
    waiter: Option<IoWaiter>,
}

/// The longest a worker sleeps in [`IoWaiter::wait`] before it looks at its queue again
/// (a safety net: a completion or a kick ends the sleep).
const IO_WAIT_LIMIT_MS: i32 = 100;

/// The longest a throttled queue sleeps before it looks at its limits again (a limit
/// raised meanwhile takes effect within this).
const MAX_THROTTLE_SLEEP: Duration = Duration::from_millis(100);

/// Requests in flight, each under a token (its index) the engine hands back.
#[derive(Default)]
struct Slab {
    slots: Vec<Option<IoRequest>>,
    free: Vec<usize>,
}

impl Slab {
    fn insert(&mut self, req: IoRequest) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(req);
                i as u64
            }
            None => {
                self.slots.push(Some(req));
                (self.slots.len() - 1) as u64
            }
        }
    }

    fn get(&self, token: u64) -> Option<&IoRequest> {
        self.slots.get(token as usize).and_then(|s| s.as_ref())
    }

    fn take(&mut self, token: u64) -> Option<IoRequest> {
        let req = self.slots.get_mut(token as usize)?.take()?;
        self.free.push(token as usize);
        Some(req)
    }
}

/// State shared by the worker threads of one connection.
struct Inner {
    disk: Arc<Disk>,
    serial: [u8; ID_LEN],
    config: BlkConfig,
    stats: Arc<Stats>,
    event_idx: AtomicBool,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    inflight: Arc<InflightSlot>,
    tracks: Vec<Mutex<QueueTrack>>,
    /// When this connection's backend was made, and whether it has completed a request.
    born: std::time::Instant,
    first_completed: AtomicBool,
    /// Whether a request came back from the engine undone (logged once).
    redone: AtomicBool,
    /// The device's shared counters and limits page (under bulkheadd).
    region: Option<Arc<BackendRegion>>,
    /// The limits generation last taken from the region.
    limits_gen: AtomicU64,
    /// Whether any limit is in force (fast path: no lock when not).
    limited: AtomicBool,
    /// The rate limiter every queue shares.
    limiter: Mutex<Limiter>,
    /// One timer per queue: wakes a throttled queue (registered with its worker's epoll).
    timers: Vec<Mutex<TimerFd>>,
    /// Each queue worker's adaptive polling window (its limit: `--poll-us`).
    polls: Vec<Mutex<PollWindow>>,
    /// Whether the host is short of CPUs (no polling then); None: not known.
    host_load: Mutex<Option<Arc<HostLoad>>>,
}

/// The vhost-user-blk backend for one connection (cheap to clone; clones share state).
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

impl BlkBackend {
    /// A backend serving `disk` with `queues` request queues; the relay puts the frontend's
    /// in-flight region (if any) in `inflight`.
    pub fn new(
        disk: Arc<Disk>,
        serial: [u8; ID_LEN],
        queues: u16,
        stats: Arc<Stats>,
        inflight: Arc<InflightSlot>,
        engine: EngineKind,
        region: Option<Arc<BackendRegion>>,
    ) -> Result<Self, EngineError> {
        let config = BlkConfig {
            capacity: disk.sectors(),
            num_queues: queues,
            readonly: disk.readonly(),
        };
        let mut tracks = Vec::with_capacity(usize::from(queues));
        let mut timers = Vec::with_capacity(usize::from(queues));
        let mut pool = None;
        for q in 0..queues {
            let (engine, fallback) =
                Engine::new(engine, &disk, u32::from(MAX_QUEUE_SIZE), &mut pool)?;
            if q == 0 {
                match fallback {
                    Some(why) => eprintln!("bulkhead-blk: I/O engine {} ({why})", engine.name()),
                    None => eprintln!("bulkhead-blk: I/O engine {}", engine.name()),
                }
            }
            tracks.push(Mutex::new(QueueTrack {
                epoch: 0,
                region: None,
                counter: 0,
                engine,
                slab: Slab::default(),
                taken: Vec::new(),
                throttled_since: None,
                waiter: match IoWaiter::new() {
                    Ok(w) => Some(w),
                    Err(e) => {
                        eprintln!("bulkhead-blk: queue {q}: no epoll set ({e}); requests posted while others are in flight wait for the next completion");
                        None
                    }
                },
            }));
            let timer = TimerFd::new()
                .map_err(|e| EngineError::Timer(io::Error::from_raw_os_error(e.errno())))?;
            // Non-blocking: a timer re-armed after it fired is read without waiting.
            // SAFETY: F_GETFL/F_SETFL on a timerfd we own; no memory is passed.
            unsafe {
                let fl = libc::fcntl(timer.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
            timers.push(Mutex::new(timer));
        }
        Ok(BlkBackend {
            inner: Arc::new(Inner {
                disk,
                serial,
                config,
                stats,
                event_idx: AtomicBool::new(false),
                mem: Mutex::new(None),
                inflight,
                tracks,
                born: std::time::Instant::now(),
                first_completed: AtomicBool::new(false),
                redone: AtomicBool::new(false),
                region,
                limits_gen: AtomicU64::new(u64::MAX),
                limited: AtomicBool::new(false),
                limiter: Mutex::new(Limiter::default()),
                timers,
                polls: (0..queues)
                    .map(|_| Mutex::new(PollWindow::new(Duration::ZERO)))
                    .collect(),
                host_load: Mutex::new(None),
            }),
        })
    }

    /// Sets the most a queue worker that just served requests keeps polling its ring
    /// (and, with requests in flight, its engine) before it sleeps; zero never polls.
    /// Within that, each worker adapts its window ([`PollWindow`]), and none spins while
    /// `load` says the host has more runnable threads than CPUs.
    pub fn set_polling(&self, limit: Duration, load: Option<Arc<HostLoad>>) {
        for p in &self.inner.polls {
            p.lock().unwrap_or_else(|e| e.into_inner()).set_limit(limit);
        }
        *self
            .inner
            .host_load
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = load;
    }

    /// True if the host has more runnable threads than CPUs.
    fn host_contended(&self, now: Instant) -> bool {
        self.inner
            .host_load
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|l| l.contended(now))
    }

    /// Runs `f` on `queue`'s polling window.
    fn with_poll<R>(&self, queue: u16, f: impl FnOnce(&mut PollWindow) -> R) -> Option<R> {
        let p = self.inner.polls.get(usize::from(queue))?;
        Some(f(&mut p.lock().unwrap_or_else(|e| e.into_inner())))
    }

    /// Spins for up to `queue`'s poll window until the guest posts a request on `vring`
    /// or (with `engine`) a completion is ready. True if something is there to take.
    fn poll_for_work(
        &self,
        queue: u16,
        vring: &VringRwLock,
        mut engine: Option<&mut Engine>,
        guest: bool,
    ) -> bool {
        let start = Instant::now();
        let window = self
            .with_poll(queue, |p| p.begin(start))
            .unwrap_or_default();
        if window.is_zero() {
            return false;
        }
        if self.host_contended(start) {
            bump(&self.inner.stats.poll_skipped);
            return false;
        }
        let Some(atomic) = self.inner.mem.lock().ok().and_then(|m| m.clone()) else {
            return false;
        };
        let mem = atomic.memory();
        // Measured from here: the setup above (a read of /proc/loadavg) is not a spin.
        let mut last = Instant::now();
        loop {
            let mut found = false;
            if let Some(e) = engine.as_deref_mut() {
                found = e.completion_pending();
            }
            if guest && !found {
                if !ring_is_live(vring) {
                    return false;
                }
                let state = vring.get_ref();
                let q = state.get_queue();
                match q.avail_idx(&*mem, Ordering::Acquire) {
                    Ok(avail) => found = avail.0 != q.next_avail(),
                    Err(_) => return false,
                }
            }
            if found {
                self.with_poll(queue, PollWindow::found);
                bump(&self.inner.stats.poll_found);
                return true;
            }
            let now = Instant::now();
            if now.saturating_duration_since(last) >= PREEMPTED_GAP {
                // Descheduled mid-spin: the CPU is wanted elsewhere (a vCPU, likely).
                self.with_poll(queue, |p| p.preempted(now));
                bump(&self.inner.stats.poll_preempted);
                return false;
            }
            if now.saturating_duration_since(start) >= window {
                bump(&self.inner.stats.poll_expired);
                return false;
            }
            last = now;
            std::hint::spin_loop();
        }
    }

    /// The config space this backend serves.
    pub fn config(&self) -> BlkConfig {
        self.inner.config
    }

    /// Serves `queue` until nothing is in flight. True if the rate limiter stopped it: its
    /// timer is armed, and notifications stay off until the timer fires.
    fn process_queue(&self, queue: u16, vring: &VringRwLock) -> io::Result<bool> {
        let Some(atomic) = self.inner.mem.lock().ok().and_then(|m| m.clone()) else {
            return Ok(false);
        };
        self.refresh_limits();
        let mut throttled = false;
        let mem = atomic.memory();
        let ring_size = vring.get_ref().get_queue().size();
        let target = Target {
            disk: &self.inner.disk,
            serial: &self.inner.serial,
            stats: &self.inner.stats,
            max_descriptors: usize::from(ring_size),
        };
        let Some(track) = self.inner.tracks.get(usize::from(queue)) else {
            return Ok(false);
        };
        let mut track = track.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        let epoch = self.inner.inflight.epoch();
        if track.epoch != epoch {
            track.epoch = epoch;
            // A new connection or activation: the frontend may have handed a new kick fd.
            if let Some(w) = track.waiter.as_mut() {
                w.forget_kick();
            }
            track.region = self.inner.inflight.region();
            track.counter = 0;
            if let Some(region) = track.region.clone() {
                any |= self.take_over(queue, vring, &region, &mut track, &target, &*mem);
            }
        }
        let track = &mut *track;
        // A legitimate guest cannot have more requests in flight than the ring holds; a
        // hostile one re-posting heads is not served beyond that until some complete.
        let room = usize::from(ring_size).max(1);
        let mut done = Vec::new();
        let mut stalled = false;
        loop {
            // One clock reading per pass: the requests taken in it share it (counters only).
            let taken_at = self.inner.region.as_ref().map(|_| Instant::now());
            while !stalled && !throttled && track.engine.in_flight() < room {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                // As process_chain: at most one more descriptor than a legal chain has.
                let limit = target.max_descriptors.saturating_add(1);
                let descs: Vec<Descriptor> = chain.clone().take(limit).collect();
                if self.inner.limited.load(Ordering::Relaxed) {
                    if let Err(wait) = self.admit(&descs) {
                        // Put it back; the queue's timer takes it up again.
                        let mut g = vring.get_mut();
                        let q = g.get_queue_mut();
                        let back = q.next_avail().wrapping_sub(1);
                        q.set_next_avail(back);
                        drop(g);
                        self.arm_timer(queue, wait);
                        if track.throttled_since.is_none() {
                            track.throttled_since = Some(Instant::now());
                            self.count(queue, devstats::Q_THROTTLES, 1);
                            if let Some(r) = &self.inner.region {
                                r.set(usize::from(queue), devstats::Q_WAITING, 1);
                            }
                        }
                        throttled = true;
                        break;
                    }
                    if let Some(t) = track.throttled_since.take() {
                        self.count(
                            queue,
                            devstats::Q_THROTTLED_NS,
                            t.elapsed().as_nanos() as u64,
                        );
                        if let Some(r) = &self.inner.region {
                            r.set(usize::from(queue), devstats::Q_WAITING, 0);
                        }
                    }
                }
                if let Some(region) = &track.region {
                    region.mark(queue, head, track.counter);
                    track.counter = track.counter.wrapping_add(1);
                }
                self.count(queue, devstats::Q_REQUESTS, 1);
                match begin(&*mem, head, &descs, &target) {
                    Started::Done(outcome) => {
                        stalled |= !self.complete(
                            queue,
                            vring,
                            track.region.as_deref(),
                            head,
                            outcome.used_len(),
                        );
                        any = true;
                    }
                    Started::Io(req) => {
                        if req.op == IoOp::Flush && track.engine.in_flight() > 0 {
                            // A FLUSH covers what completed before it: let the requests
                            // taken before it finish first.
                            let n = track.engine.in_flight();
                            stalled |=
                                !self.reap(queue, vring, track, &*mem, &target, n, &mut done);
                            self.notify(vring);
                        }
                        self.count(
                            queue,
                            match req.op {
                                IoOp::Data(super::disk::Rw::Read) => devstats::Q_READS,
                                IoOp::Data(super::disk::Rw::Write) => devstats::Q_WRITES,
                                IoOp::Flush => devstats::Q_FLUSHES,
                            },
                            1,
                        );
                        let token = track.slab.insert(req);
                        if let Some(at) = taken_at {
                            let t = usize::try_from(token).unwrap_or(usize::MAX);
                            if track.taken.len() <= t {
                                track.taken.resize(t + 1, at);
                            }
                            if let Some(slot) = track.taken.get_mut(t) {
                                *slot = at;
                            }
                        }
                        let submitted = match track.slab.get(token) {
                            Some(req) => track.engine.submit(token, req),
                            None => Err(io::Error::from(io::ErrorKind::NotFound)),
                        };
                        if let Err(e) = submitted {
                            if let Some(req) = track.slab.take(token) {
                                let outcome = req.finish(&*mem, Err(e), &target);
                                stalled |= !self.complete(
                                    queue,
                                    vring,
                                    track.region.as_deref(),
                                    head,
                                    outcome.used_len(),
                                );
                                any = true;
                            }
                        }
                    }
                }
            }
            if track.engine.in_flight() == 0 {
                break;
            }
            // Tell the guest about what is done before waiting for more.
            if any {
                self.notify(vring);
                any = false;
            }
            if track.waiter.is_some() && track.engine.completion_fd().is_some() {
                // Take what is done without blocking; with nothing done, sleep until a
                // completion or, if more can be taken, a new request from the guest.
                let before = track.engine.in_flight();
                stalled |= !self.reap(queue, vring, track, &*mem, &target, 0, &mut done);
                if track.engine.in_flight() < before {
                    any = true;
                } else {
                    let more = !stalled && !throttled && track.engine.in_flight() < room;
                    self.await_io_or_guest(queue, vring, track, more);
                }
                continue;
            }
            stalled |= !self.reap(queue, vring, track, &*mem, &target, 1, &mut done);
            any = true;
        }
        if any {
            self.notify(vring);
        }
        if stalled {
            // Taking more would only fail the same way (the guest's used ring is bad).
            return Err(io::Error::other("the used ring cannot be written"));
        }
        Ok(throttled)
    }

    /// Adds `n` to `queue`'s counter `field` in the shared page, if there is one.
    #[inline]
    fn count(&self, queue: u16, field: usize, n: u64) {
        if let Some(r) = &self.inner.region {
            r.add(usize::from(queue), field, n);
        }
    }

    /// Counts a completed I/O request taken at `taken` and completed by `now`: its bytes
    /// or its failure, and its latency.
    fn account(
        &self,
        queue: u16,
        req: &IoRequest,
        ok: bool,
        taken: Option<Instant>,
        now: Option<Instant>,
    ) {
        let Some(r) = &self.inner.region else {
            return;
        };
        let q = usize::from(queue);
        match (ok, req.op) {
            (false, _) => r.add(q, devstats::Q_ERRORS, 1),
            (true, IoOp::Data(super::disk::Rw::Read)) => {
                r.add(q, devstats::Q_BYTES_READ, req.bytes)
            }
            (true, IoOp::Data(super::disk::Rw::Write)) => {
                r.add(q, devstats::Q_BYTES_WRITTEN, req.bytes)
            }
            (true, IoOp::Flush) => {}
        }
        if let (Some(t), Some(now)) = (taken, now) {
            let us = now.saturating_duration_since(t).as_micros() as u64;
            r.add(q, devstats::Q_LATENCY_SUM_US, us);
            r.add(q, devstats::Q_HIST + devstats::latency_bucket(us), 1);
        }
    }

    /// Takes the limits from the shared page when bulkheadd changed them.
    fn refresh_limits(&self) {
        let Some(r) = &self.inner.region else {
            return;
        };
        if r.limits_generation() == self.inner.limits_gen.load(Ordering::Relaxed) {
            return;
        }
        let (gen, limits) = r.limits();
        let mut l = self.inner.limiter.lock().unwrap_or_else(|e| e.into_inner());
        l.set(limits, Instant::now());
        self.inner.limited.store(l.active(), Ordering::Relaxed);
        self.inner.limits_gen.store(gen, Ordering::Relaxed);
        eprintln!(
            "bulkhead-blk: limits: {} bytes/s (burst {}), {} requests/s (burst {}) (0: none)",
            limits.bw_rate, limits.bw_burst, limits.ops_rate, limits.ops_burst
        );
    }

    /// Asks the limiter for the request made of `descs` (its data bytes: every descriptor
    /// but the header and the status).
    fn admit(&self, descs: &[Descriptor]) -> Result<(), Duration> {
        let bytes: u64 = descs
            .iter()
            .skip(1)
            .take(descs.len().saturating_sub(2))
            .map(|d| u64::from(d.len()))
            .sum();
        self.inner
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(bytes, Instant::now())
    }

    /// Arms `queue`'s timer to fire after `wait` (at most [`MAX_THROTTLE_SLEEP`]).
    fn arm_timer(&self, queue: u16, wait: Duration) {
        if let Some(t) = self.inner.timers.get(usize::from(queue)) {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = t.reset(
                wait.clamp(Duration::from_micros(1), MAX_THROTTLE_SLEEP),
                None,
            ) {
                eprintln!("bulkhead-blk: queue {queue}: cannot arm the rate-limit timer: {e}");
            }
        }
    }

    /// Each queue's timer fd, in queue order, for the worker threads' epoll.
    pub fn timer_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.inner
            .timers
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).as_raw_fd())
            .collect()
    }

    /// The epoll data the queue timers are registered with (above the queues and the exit
    /// event, as vhost-user-backend asks).
    pub fn timer_event(&self) -> u64 {
        u64::from(self.inner.config.num_queues) + 1
    }

    /// Signals the guest if it wants to hear about the used ring (EVENT_IDX).
    fn notify(&self, vring: &VringRwLock) {
        if vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                eprintln!("bulkhead-blk: cannot signal the used queue: {e}");
            }
        }
    }

    /// Spins for `queue`'s poll window, then sleeps until the engine completes a request
    /// or, with `take_more`, the guest posts one (notifications are on meanwhile, and off
    /// again on return). How long it was idle tunes the window.
    fn await_io_or_guest(
        &self,
        queue: u16,
        vring: &VringRwLock,
        track: &mut QueueTrack,
        take_more: bool,
    ) {
        if track.engine.completion_fd().is_none()
            || self.poll_for_work(queue, vring, Some(&mut track.engine), take_more)
        {
            return;
        }
        let slept = self.sleep_for_io_or_guest(vring, track, take_more);
        let now = Instant::now();
        self.with_poll(queue, |p| if slept { p.woken(now) } else { p.busy() });
    }

    /// The sleep of [`Self::await_io_or_guest`]. False if work turned up before it began.
    fn sleep_for_io_or_guest(
        &self,
        vring: &VringRwLock,
        track: &mut QueueTrack,
        take_more: bool,
    ) -> bool {
        let Some(done_fd) = track.engine.completion_fd() else {
            return false;
        };
        // Reset the completion eventfd, then look once more: a completion posted after
        // this look signals it again, so the sleep below cannot miss it.
        track.engine.clear_completion_event();
        if track.engine.completion_pending() {
            return false;
        }
        let Some(waiter) = track.waiter.as_mut() else {
            return false;
        };
        let mut kick = None;
        if take_more {
            match vring.enable_notification() {
                // Posted while notifications were off: take it now.
                Ok(true) | Err(_) => {
                    let _ = vring.disable_notification();
                    return false;
                }
                Ok(false) => {}
            }
            kick = vring.get_ref().get_kick().as_ref().map(|k| k.as_raw_fd());
        }
        // A kick that ends the sleep is left unread: vhost-user-backend's loop reads it
        // (see `waiter`), and then finds this queue with nothing new, once.
        if let Err(e) = waiter.wait(done_fd, kick, IO_WAIT_LIMIT_MS) {
            eprintln!(
                "bulkhead-blk: waiting for I/O failed ({e}); blocking in the engine from now on"
            );
            track.waiter = None;
        }
        if take_more {
            let _ = vring.disable_notification();
        }
        true
    }

    /// Waits for at least `min` of the queue's requests to complete and puts every
    /// completed one in the used ring. False if the used ring could not be written.
    #[allow(clippy::too_many_arguments)]
    fn reap<M: vm_memory::GuestMemoryBackend>(
        &self,
        queue: u16,
        vring: &VringRwLock,
        track: &mut QueueTrack,
        mem: &M,
        target: &Target<'_>,
        min: usize,
        done: &mut Vec<(u64, io::Result<usize>)>,
    ) -> bool {
        done.clear();
        if let Err(e) = track.engine.wait(min, done) {
            // The engine itself failed: finish everything in it here, blocking.
            eprintln!("bulkhead-blk: queue {queue}: I/O engine failed ({e}); finishing its requests inline");
            let tokens: Vec<usize> = (0..track.slab.slots.len())
                .filter(|t| track.slab.slots[*t].is_some())
                .collect();
            let mut ok = true;
            for t in tokens {
                if let Some(req) = track.slab.take(t as u64) {
                    let head = req.head;
                    let r = req.run_blocking(target.disk);
                    let outcome = req.finish(mem, r, target);
                    ok &= self.complete(
                        queue,
                        vring,
                        track.region.as_deref(),
                        head,
                        outcome.used_len(),
                    );
                }
            }
            track.engine = match Engine::new(EngineKind::Inline, &self.inner.disk, 1, &mut None) {
                Ok((e, _)) => e,
                Err(_) => return false,
            };
            return ok;
        }
        let mut ok = true;
        // One clock reading per batch of completions (counters only).
        let completed_at = self.inner.region.as_ref().map(|_| Instant::now());
        for (token, r) in done.drain(..) {
            let Some(req) = track.slab.take(token) else {
                continue;
            };
            let taken = track.taken.get(token as usize).copied();
            let result = match r {
                Ok(n) if matches!(req.op, IoOp::Data(_)) && (n as u64) < req.bytes => {
                    // A short transfer: do the rest here.
                    req.run_blocking_from(target.disk, n)
                }
                Ok(_) => Ok(()),
                // The kernel found no worker for it (io-wq at its thread limit) or gave
                // up: nothing was done, so do it here.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECANCELED) | Some(libc::EAGAIN) | Some(libc::EINTR)
                    ) =>
                {
                    if !self.inner.redone.swap(true, Ordering::Relaxed) {
                        eprintln!("bulkhead-blk: queue {queue}: the I/O engine gave a request back undone ({e}); doing it on the queue thread (said once)");
                    }
                    req.run_blocking(target.disk)
                }
                Err(e) => Err(e),
            };
            self.account(queue, &req, result.is_ok(), taken, completed_at);
            let head = req.head;
            let outcome = req.finish(mem, result, target);
            ok &= self.complete(
                queue,
                vring,
                track.region.as_deref(),
                head,
                outcome.used_len(),
            );
        }
        ok
    }

    /// Puts `head` in the used ring, bracketed by the in-flight region's two-phase
    /// completion. False if the used ring cannot be written.
    fn complete(
        &self,
        queue: u16,
        vring: &VringRwLock,
        region: Option<&InflightRegion>,
        head: u16,
        len: u32,
    ) -> bool {
        if let Some(r) = region {
            r.completing(queue, head);
        }
        if let Err(e) = vring.add_used(head, len) {
            self.inner.stats.log_malformed(format_args!(
                "cannot return head {head} to the used ring: {e}"
            ));
            return false;
        }
        if let Some(r) = region {
            r.completed(queue, head, vring.get_ref().get_queue().next_used());
        }
        if !self.inner.first_completed.load(Ordering::Relaxed)
            && !self.inner.first_completed.swap(true, Ordering::Relaxed)
        {
            self.log_first_completion(queue);
        }
        true
    }

    /// Says when the first request on this connection completed; the CLOCK_MONOTONIC
    /// reading lets `scripts/bench-restart.sh` time a restart from the kill to this point.
    fn log_first_completion(&self, queue: u16) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
            .unwrap_or(0.0);
        eprintln!(
            "bulkhead-blk: first request completed on queue {queue}, {:.1} ms after start (monotonic {now:.6})",
            self.inner.born.elapsed().as_secs_f64() * 1000.0
        );
    }

    /// Takes `queue` over from a previous backend: resubmits what it left in flight, oldest
    /// first, and continues the avail ring after them. True if anything was completed.
    fn take_over<M: vm_memory::GuestMemoryBackend>(
        &self,
        queue: u16,
        vring: &VringRwLock,
        region: &InflightRegion,
        track: &mut QueueTrack,
        target: &Target<'_>,
        mem: &M,
    ) -> bool {
        let (used_idx, desc_table, ring_size) = {
            let guard = vring.get_ref();
            let q = guard.get_queue();
            let used = match q.used_idx(mem, Ordering::Acquire) {
                Ok(u) => u.0,
                Err(e) => {
                    eprintln!("bulkhead-blk: queue {queue}: cannot read the used index ({e}); in-flight requests not resubmitted");
                    return false;
                }
            };
            (used, vm_memory::GuestAddress(q.desc_table()), q.size())
        };
        let Takeover::Resume {
            heads,
            next_avail,
            counter,
            ignored,
        } = region.take_over(queue, ring_size, used_idx)
        else {
            eprintln!("bulkhead-blk: queue {queue}: fresh in-flight region, tracking requests from used index {used_idx}");
            return false;
        };
        if ignored > 0 {
            eprintln!(
                "bulkhead-blk: queue {queue}: ignored {ignored} in-flight marks outside the ring"
            );
        }
        {
            let mut guard = vring.get_mut();
            let q = guard.get_queue_mut();
            q.set_next_avail(next_avail);
            q.set_next_used(used_idx);
        }
        track.counter = counter;
        eprintln!(
            "bulkhead-blk: queue {queue}: resubmitting {} in-flight request(s) {heads:?} left by the previous backend; avail ring continues at {next_avail}",
            heads.len()
        );
        let limit = target.max_descriptors.saturating_add(1);
        let mut any = false;
        for head in heads {
            let descs = chain_at(mem, desc_table, ring_size, head, limit);
            let outcome = process_descriptors(mem, head, &descs, target);
            if !self.complete(queue, vring, Some(region), head, outcome.used_len()) {
                break;
            }
            any = true;
        }
        any
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.inner.config.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        BlkConfig::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.inner.config.read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in the config space is writable (no CONFIG_WCE); ignore, as QEMU does.
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        if let Ok(mut m) = self.inner.mem.lock() {
            *m = Some(mem);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.inner.config.num_queues)
            .map(|q| 1u64 << q)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let vring = if u64::from(device_event) == self.timer_event() {
            // A throttled queue's timer: take the expiry and serve the queue again (this
            // thread's only vring).
            if let Some(t) = self.inner.timers.get(thread_id) {
                let _ = t.lock().unwrap_or_else(|e| e.into_inner()).wait();
            }
            vrings.first()
        } else {
            // With one queue per thread, `device_event` indexes this thread's vrings.
            vrings.get(usize::from(device_event))
        };
        let Some(vring) = vring else {
            return Ok(());
        };
        // One queue per worker thread, in order: the thread index is the queue index.
        let queue = u16::try_from(thread_id).unwrap_or(u16::MAX);
        // The worker slept since it last polled for nothing (if it did): that sleep's
        // length tunes the window.
        let now = Instant::now();
        self.with_poll(queue, |p| p.woken(now));
        // Errors here must not end the worker thread: that would silently kill the queue.
        // Notifications stay off (EVENT_IDX: avail_event is not advanced; otherwise
        // NO_NOTIFY) while requests are in flight.
        loop {
            // A ring the frontend stopped or reset (a disconnect, a cut connection) has
            // nothing to serve: without this check the worker would spin here, reading an
            // avail index that no longer means anything, and never see its exit event.
            if !ring_is_live(vring) {
                break;
            }
            let _ = vring.disable_notification();
            match self.process_queue(queue, vring) {
                Err(_) => {
                    // Wait for the next notification rather than spin on a broken ring.
                    let _ = vring.enable_notification();
                    break;
                }
                // Throttled: the queue's timer wakes it; notifications stay off meanwhile.
                Ok(true) => break,
                Ok(false) => {}
            }
            // The guest is likely to post again soon: look before sleeping.
            if self.poll_for_work(queue, vring, None, true) {
                continue;
            }
            match vring.enable_notification() {
                Ok(true) => {
                    self.with_poll(queue, PollWindow::busy);
                    continue;
                }
                _ => break,
            }
        }
        Ok(())
    }
}

/// False for a ring the frontend stopped or reset: its avail index means nothing.
fn ring_is_live(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.get_queue().ready() && state.is_enabled()
}
