//! The `VhostUserBackend` glue: one worker thread serves both queues and the tap. The tap fd
//! is added to that thread's epoll (`VringEpollHandler::register_listener`) while frames can
//! be delivered, and removed while the guest has no RX buffers (or the RX ring is stopped),
//! so a full guest does not make the backend spin; the next RX kick puts it back.
//!
//! RX kicks are asked for only while they are needed: notifications on the RX ring are
//! disabled (`VRING_USED_F_NO_NOTIFY`; with EVENT_IDX, `avail_event` is left behind) while
//! the guest has buffers posted, and enabled, followed by a re-check of the ring, when it
//! runs dry or the tap fails, as QEMU's virtio-net does. A driver that reposts and kicks
//! one buffer at a time would otherwise make every received frame cost a VM exit and a
//! wakeup of this thread.
//!
//! Used-buffer notifications (the call eventfd) honour the driver's suppression: EVENT_IDX's
//! `used_event`, or without it `VRING_AVAIL_F_NO_INTERRUPT`, which a polling driver sets.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::{
    header_len, mergeable, tap_offloads, NetConfig, MAX_QUEUE_SIZE, NUM_QUEUES, RX_QUEUE, TX_QUEUE,
};
use super::rx::{Rx, RxContext, RxStop};
use super::stats::NetStats;
use super::tap::Tap;
use super::tx::{process_tx_limited, TxContext};
use crate::ratelimit::Limiter;
use bulkhead_ipc::devstats::{self, BackendRegion};
use std::time::{Duration, Instant};
use vmm_sys_util::timerfd::TimerFd;

/// The epoll data the tap fd is registered with (0..=NUM_QUEUES are the library's).
pub const TAP_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// The epoll data of the TX rate-limit timer.
pub const TX_TIMER_EVENT: u16 = NUM_QUEUES as u16 + 2;
/// The longest a throttled TX queue sleeps before it looks at its limits again.
const MAX_THROTTLE_SLEEP: Duration = Duration::from_millis(100);

/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver does not want used-buffer notifications.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver set `VRING_AVAIL_F_NO_INTERRUPT` (only meaningful without EVENT_IDX,
/// which `needs_notification` handles; virtio-queue ignores this flag). A polling driver
/// sets it for good: honouring it saves a call-eventfd write per round. A driver that
/// clears it re-checks the used ring afterwards, so nothing is lost; the flag is read after
/// the used-ring updates, as the spec requires.
fn no_interrupt(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let avail = vring.get_ref().get_queue().avail_ring();
    fence(Ordering::SeqCst);
    mem.read_obj::<u16>(GuestAddress(avail))
        .map(|flags| u16::from_le(flags) & AVAIL_F_NO_INTERRUPT != 0)
        .unwrap_or(false)
}

/// RX state guarded together: the pending frame and whether the tap is in the epoll.
struct RxState {
    rx: Rx,
    tap_polled: bool,
}

struct Inner {
    tap: Arc<Tap>,
    config: NetConfig,
    stats: Arc<NetStats>,
    event_idx: AtomicBool,
    acked: AtomicU64,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    rx: Mutex<RxState>,
    tx_buf: Mutex<Vec<u8>>,
    poller: Mutex<Weak<VringEpollHandler<NetBackend>>>,
    /// The shared counters and limits page, if bulkheadd handed one.
    region: Option<Arc<BackendRegion>>,
    /// The limits generation last taken from it.
    limits_gen: AtomicU64,
    /// What the guest sends is limited by this (bandwidth: frame bytes; ops: frames).
    limiter: Mutex<Limiter>,
    /// Wakes a throttled TX queue (in the worker's epoll as [`TX_TIMER_EVENT`]).
    tx_timer: Option<Mutex<TimerFd>>,
    /// Since when TX has waited for the limiter.
    throttled_since: Mutex<Option<Instant>>,
}

/// The vhost-user-net backend for one connection (cheap to clone; clones share state).
#[derive(Clone)]
pub struct NetBackend {
    inner: Arc<Inner>,
}

impl NetBackend {
    /// A backend moving frames between the guest and `tap`.
    pub fn new(tap: Arc<Tap>, config: NetConfig, stats: Arc<NetStats>) -> Self {
        let region = stats.region();
        // Made before the seccomp filter; non-blocking, so a timer re-armed after it fired
        // is read without waiting. Without one (or without a page) nothing is limited.
        let tx_timer = region.as_ref().and_then(|_| match TimerFd::new() {
            Ok(t) => {
                // SAFETY: F_GETFL/F_SETFL on a timerfd we own; no memory is passed.
                unsafe {
                    let fl = libc::fcntl(t.as_raw_fd(), libc::F_GETFL);
                    libc::fcntl(t.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
                }
                Some(Mutex::new(t))
            }
            Err(e) => {
                eprintln!("bulkhead-net: no TX timer ({e}): rate limits are not enforced");
                None
            }
        });
        NetBackend {
            inner: Arc::new(Inner {
                tap,
                config,
                stats,
                event_idx: AtomicBool::new(false),
                acked: AtomicU64::new(0),
                mem: Mutex::new(None),
                rx: Mutex::new(RxState {
                    rx: Rx::default(),
                    tap_polled: false,
                }),
                tx_buf: Mutex::new(Vec::new()),
                poller: Mutex::new(Weak::new()),
                region,
                limits_gen: AtomicU64::new(u64::MAX),
                limiter: Mutex::new(Limiter::default()),
                tx_timer,
                throttled_since: Mutex::new(None),
            }),
        }
    }

    /// Registers the TX timer with the worker's epoll (the daemon's only handler).
    pub fn register_timer(&self, handler: &VringEpollHandler<NetBackend>) -> io::Result<()> {
        match &self.inner.tx_timer {
            Some(t) => {
                let fd = t.lock().unwrap_or_else(|e| e.into_inner()).as_raw_fd();
                handler.register_listener(fd, EventSet::IN, u64::from(TX_TIMER_EVENT))
            }
            None => Ok(()),
        }
    }

    /// Takes the limits from the shared page when bulkheadd changed them.
    fn refresh_limits(&self) {
        let Some(r) = &self.inner.region else {
            return;
        };
        if self.inner.tx_timer.is_none()
            || r.limits_generation() == self.inner.limits_gen.load(Ordering::Relaxed)
        {
            return;
        }
        let (gen, limits) = r.limits();
        self.inner
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(limits, Instant::now());
        self.inner.limits_gen.store(gen, Ordering::Relaxed);
        eprintln!(
            "bulkhead-net: TX limits: {} bytes/s (burst {}), {} frames/s (burst {}) (0: none)",
            limits.bw_rate, limits.bw_burst, limits.ops_rate, limits.ops_burst
        );
    }

    /// Arms the TX timer to fire after `wait` (at most [`MAX_THROTTLE_SLEEP`]) and counts
    /// the wait.
    fn throttled(&self, wait: Duration) {
        if let Some(t) = &self.inner.tx_timer {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = t.reset(
                wait.clamp(Duration::from_micros(1), MAX_THROTTLE_SLEEP),
                None,
            ) {
                self.inner
                    .stats
                    .log(format_args!("cannot arm the TX timer: {e}"));
            }
        }
        let mut since = self
            .inner
            .throttled_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if since.is_none() {
            *since = Some(Instant::now());
            if let Some(r) = &self.inner.region {
                r.add(super::stats::TX_RECORD, devstats::Q_THROTTLES, 1);
            }
        }
    }

    /// Counts the end of a wait for the limiter, if TX was waiting.
    fn unthrottled(&self) {
        let mut since = self
            .inner
            .throttled_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let (Some(t), Some(r)) = (since.take(), &self.inner.region) {
            r.add(
                super::stats::TX_RECORD,
                devstats::Q_THROTTLED_NS,
                t.elapsed().as_nanos() as u64,
            );
        }
    }

    /// The config space this backend serves.
    pub fn config(&self) -> NetConfig {
        self.inner.config
    }

    /// Tells the backend which worker epoll to add the tap to (the daemon's only handler).
    pub fn set_poller(&self, handler: &Arc<VringEpollHandler<NetBackend>>) {
        if let Ok(mut p) = self.inner.poller.lock() {
            *p = Arc::downgrade(handler);
        }
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.inner.mem.lock().ok().and_then(|m| m.clone())
    }

    fn hdr_len(&self) -> usize {
        header_len(self.inner.acked.load(Ordering::Relaxed))
    }

    /// Adds the tap to, or removes it from, the worker's epoll.
    fn poll_tap(&self, state: &mut RxState, on: bool) {
        if state.tap_polled == on {
            return;
        }
        let Some(handler) = self.inner.poller.lock().ok().and_then(|p| p.upgrade()) else {
            return;
        };
        let fd = self.inner.tap.as_raw_fd();
        let r = if on {
            handler.register_listener(fd, EventSet::IN, u64::from(TAP_EVENT))
        } else {
            handler.unregister_listener(fd, EventSet::IN, u64::from(TAP_EVENT))
        };
        match r {
            Ok(()) => state.tap_polled = on,
            Err(e) => self
                .inner
                .stats
                .log(format_args!("cannot change tap polling to {on}: {e}")),
        }
    }

    /// Tells the guest about new used entries, unless it said it does not want to know.
    fn signal(&self, vring: &VringRwLock, mem: &GuestMemoryMmap) {
        if !self.inner.event_idx.load(Ordering::Relaxed) && no_interrupt(vring, mem) {
            return;
        }
        if vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                self.inner
                    .stats
                    .log(format_args!("cannot signal the used queue: {e}"));
            }
        }
    }

    fn process_tx(&self, vring: &VringRwLock) {
        let Some(atomic) = self.memory() else {
            return;
        };
        let mem = atomic.memory();
        let ctx = TxContext {
            tap: &self.inner.tap,
            stats: &self.inner.stats,
            hdr_len: self.hdr_len(),
        };
        let Ok(mut buf) = self.inner.tx_buf.lock() else {
            return;
        };
        let event_idx = self.inner.event_idx.load(Ordering::Relaxed);
        self.refresh_limits();
        let mut limiter = self.inner.limiter.lock().unwrap_or_else(|e| e.into_inner());
        let limited = limiter.active();
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let (used, wait) = {
                let mut state = vring.get_mut();
                if !state.get_queue().ready() || !state.is_enabled() {
                    return;
                }
                let mut admit = |bytes: u64| {
                    if limited {
                        limiter.admit(bytes, Instant::now())
                    } else {
                        Ok(())
                    }
                };
                process_tx_limited(state.get_queue_mut(), &mem, &ctx, &mut buf, &mut admit)
            };
            if used > 0 {
                self.signal(vring, &mem);
            }
            if let Some(wait) = wait {
                // The timer takes it up again; until then the guest's kicks find it
                // throttled at once.
                self.throttled(wait);
                return;
            }
            if limited {
                self.unthrottled();
            }
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
    }

    fn process_rx(&self, vring: &VringRwLock) {
        let Ok(mut state) = self.inner.rx.lock() else {
            return;
        };
        let Some(atomic) = self.memory() else {
            self.poll_tap(&mut state, false);
            return;
        };
        let mem = atomic.memory();
        let acked = self.inner.acked.load(Ordering::Relaxed);
        let ctx = RxContext {
            tap: &self.inner.tap,
            stats: &self.inner.stats,
            hdr_len: header_len(acked),
            mergeable: mergeable(acked),
        };
        loop {
            let outcome = {
                let mut vs = vring.get_mut();
                if !vs.get_queue().ready() || !vs.is_enabled() {
                    drop(vs);
                    self.poll_tap(&mut state, false);
                    return;
                }
                // Until the ring runs dry the tap drives RX: the guest's kicks would
                // only cost it a VM exit per reposted buffer and us a wakeup.
                if let Err(e) = vs.get_queue_mut().disable_notification(&*mem) {
                    self.inner
                        .stats
                        .log(format_args!("cannot suppress RX notifications: {e}"));
                }
                state.rx.process(vs.get_queue_mut(), &mem, &ctx)
            };
            if outcome.used > 0 {
                self.signal(vring, &mem);
            }
            match outcome.stop {
                RxStop::TapEmpty => {
                    self.poll_tap(&mut state, true);
                    return;
                }
                RxStop::TapError => {
                    // Retry at the guest's next kick.
                    let _ = vring.enable_notification();
                    self.poll_tap(&mut state, false);
                    return;
                }
                RxStop::NoBuffers => {
                    // Ask for a kick when buffers come; if some came meanwhile, go on.
                    match vring.enable_notification() {
                        Ok(true) => continue,
                        _ => {
                            self.poll_tap(&mut state, false);
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.inner.config.features()
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked.store(features, Ordering::Relaxed);
        let tap = &self.inner.tap;
        if let Err(e) = tap.set_vnet_hdr_len(header_len(features)) {
            self.inner
                .stats
                .log(format_args!("TUNSETVNETHDRSZ failed: {e}"));
        }
        if let Err(e) = tap.set_offload(tap_offloads(features)) {
            self.inner
                .stats
                .log(format_args!("TUNSETOFFLOAD failed: {e}"));
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        NetConfig::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.inner.config.read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in the config space is writable (no CTRL_MAC_ADDR); ignore, as QEMU does.
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        if let Ok(mut m) = self.inner.mem.lock() {
            *m = Some(mem);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread for RX, TX and the tap.
        vec![(1u64 << NUM_QUEUES) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Errors here must not end the worker thread: that would silently kill the NIC.
        match device_event {
            e if usize::from(e) == TX_QUEUE || e == TX_TIMER_EVENT => {
                if e == TX_TIMER_EVENT {
                    if let Some(t) = &self.inner.tx_timer {
                        let _ = t.lock().unwrap_or_else(|e| e.into_inner()).wait();
                    }
                }
                if let Some(tx) = vrings.get(TX_QUEUE) {
                    self.process_tx(tx);
                }
            }
            e if usize::from(e) == RX_QUEUE || e == TAP_EVENT => {
                if e == TAP_EVENT && evset.is_empty() {
                    return Ok(());
                }
                if let Some(rx) = vrings.get(RX_QUEUE) {
                    self.process_rx(rx);
                }
            }
            _ => {}
        }
        Ok(())
    }
}
