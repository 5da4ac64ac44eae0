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
use super::stats::{RX_RECORD, TX_RECORD};
use super::tap::Tap;
use super::throttle::Throttle;
use super::tx::{process_tx_limited, TxContext};
use bulkhead_ipc::devstats::BackendRegion;

/// The epoll data the tap fd is registered with (0..=NUM_QUEUES are the library's).
pub const TAP_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// The epoll data of the TX rate-limit timer.
pub const TX_TIMER_EVENT: u16 = NUM_QUEUES as u16 + 2;
/// The epoll data of the RX rate-limit timer.
pub const RX_TIMER_EVENT: u16 = NUM_QUEUES as u16 + 3;

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
    /// What the guest sends (woken by [`TX_TIMER_EVENT`]) and what it receives (by
    /// [`RX_TIMER_EVENT`]) are each held to the limits; none without a page.
    tx_throttle: Option<Throttle>,
    rx_throttle: Option<Throttle>,
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
        // Made before the seccomp filter. Without a timer nothing is limited.
        let throttle = |record| {
            let r = region.clone()?;
            match Throttle::new(r, record) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("bulkhead-net: no rate-limit timer ({e}): limits are not enforced");
                    None
                }
            }
        };
        let tx_throttle = throttle(TX_RECORD);
        let rx_throttle = throttle(RX_RECORD);
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
                tx_throttle,
                rx_throttle,
            }),
        }
    }

    /// Registers the rate-limit timers with the worker's epoll (the daemon's only handler).
    pub fn register_timer(&self, handler: &VringEpollHandler<NetBackend>) -> io::Result<()> {
        for (t, event) in [
            (&self.inner.tx_throttle, TX_TIMER_EVENT),
            (&self.inner.rx_throttle, RX_TIMER_EVENT),
        ] {
            if let Some(t) = t {
                handler.register_listener(t.timer_fd(), EventSet::IN, u64::from(event))?;
            }
        }
        Ok(())
    }

    /// Takes the limits from the shared page when bulkheadd changed them (each direction
    /// gets them).
    fn refresh_limits(&self) {
        let Some(r) = &self.inner.region else {
            return;
        };
        if r.limits_generation() == self.inner.limits_gen.load(Ordering::Relaxed) {
            return;
        }
        let (gen, limits) = r.limits();
        for t in [&self.inner.tx_throttle, &self.inner.rx_throttle]
            .into_iter()
            .flatten()
        {
            t.set(limits);
        }
        self.inner.limits_gen.store(gen, Ordering::Relaxed);
        eprintln!(
            "bulkhead-net: limits each way: {} bytes/s (burst {}), {} frames/s (burst {}) (0: none)",
            limits.bw_rate, limits.bw_burst, limits.ops_rate, limits.ops_burst
        );
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
            source_mac: self.inner.config.mac,
        };
        let Ok(mut buf) = self.inner.tx_buf.lock() else {
            return;
        };
        // The guest is told not to kick while the queue is being drained (EVENT_IDX's
        // avail_event, or else the used ring's NO_NOTIFY flag), and the queue is checked
        // once more after it is told again: without that a guest that does not negotiate
        // EVENT_IDX kicks for every frame, each kick an exit and a wake-up here.
        self.refresh_limits();
        let throttle = self.inner.tx_throttle.as_ref().filter(|t| t.active());
        loop {
            let _ = vring.disable_notification();
            let (used, wait) = {
                let mut state = vring.get_mut();
                if !state.get_queue().ready() || !state.is_enabled() {
                    return;
                }
                let mut admit = |bytes: u64| throttle.map_or(Ok(()), |t| t.admit(bytes));
                process_tx_limited(state.get_queue_mut(), &mem, &ctx, &mut buf, &mut admit)
            };
            if used > 0 {
                self.signal(vring, &mem);
            }
            if wait.is_some() {
                // Its timer takes it up again; until then the guest is told not to kick
                // (without EVENT_IDX), or its kicks find it throttled at once.
                return;
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
                let throttle = self.inner.rx_throttle.as_ref().filter(|t| t.active());
                let mut admit = |bytes: u64| throttle.map_or(Ok(()), |t| t.admit(bytes));
                state
                    .rx
                    .process_limited(vs.get_queue_mut(), &mem, &ctx, &mut admit)
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
                RxStop::Throttled => {
                    // The frame waits in `rx`; the tap waits for the RX timer, so its
                    // readiness does not wake us meanwhile.
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
                    if let Some(t) = &self.inner.tx_throttle {
                        t.fired();
                    }
                }
                if let Some(tx) = vrings.get(TX_QUEUE) {
                    self.process_tx(tx);
                }
            }
            e if usize::from(e) == RX_QUEUE || e == TAP_EVENT || e == RX_TIMER_EVENT => {
                if e == TAP_EVENT && evset.is_empty() {
                    return Ok(());
                }
                if e == RX_TIMER_EVENT {
                    if let Some(t) = &self.inner.rx_throttle {
                        t.fired();
                    }
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
