//! The `VhostUserBackend` glue: one worker thread per queue pops chains, runs them through
//! [`request::process_chain`](super::request::process_chain) and notifies the guest. When
//! the frontend keeps an in-flight region ([`crate::inflight`]), every request is marked
//! there before it starts and cleared once it is in the used ring, and a queue's first
//! kick after a (re)connect resubmits what the previous backend left in flight.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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
use super::request::{chain_at, process_chain, process_descriptors, Target, ID_LEN};
use super::stats::Stats;
use crate::inflight::{InflightRegion, InflightSlot, Takeover};

/// One queue's view of the in-flight region.
#[derive(Default)]
struct QueueTrack {
    /// The slot epoch this queue last took over.
    epoch: u64,
    /// The region in use (None: the frontend keeps none).
    region: Option<Arc<InflightRegion>>,
    /// Next submission number.
    counter: u64,
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
    ) -> Self {
        let config = BlkConfig {
            capacity: disk.sectors(),
            num_queues: queues,
            readonly: disk.readonly(),
        };
        BlkBackend {
            inner: Arc::new(Inner {
                disk,
                serial,
                config,
                stats,
                event_idx: AtomicBool::new(false),
                mem: Mutex::new(None),
                inflight,
                tracks: (0..queues)
                    .map(|_| Mutex::new(QueueTrack::default()))
                    .collect(),
                born: std::time::Instant::now(),
                first_completed: AtomicBool::new(false),
            }),
        }
    }

    /// The config space this backend serves.
    pub fn config(&self) -> BlkConfig {
        self.inner.config
    }

    fn process_queue(&self, queue: u16, vring: &VringRwLock) -> io::Result<bool> {
        let Some(atomic) = self.inner.mem.lock().ok().and_then(|m| m.clone()) else {
            return Ok(false);
        };
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
            track.region = self.inner.inflight.region();
            track.counter = 0;
            if let Some(region) = track.region.clone() {
                any |= self.take_over(queue, vring, &region, &mut track, &target, &*mem);
            }
        }
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            if let Some(region) = &track.region {
                region.mark(queue, head, track.counter);
                track.counter = track.counter.wrapping_add(1);
            }
            let outcome = process_chain(chain, &target);
            if !self.complete(
                queue,
                vring,
                track.region.as_deref(),
                head,
                outcome.used_len(),
            ) {
                break;
            }
            any = true;
        }
        if any {
            let notify = vring.needs_notification().unwrap_or(true);
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    eprintln!("bulkhead-blk: cannot signal the used queue: {e}");
                }
            }
        }
        Ok(any)
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
        // With one queue per thread, `device_event` indexes this thread's vrings.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        // One queue per worker thread, in order: the thread index is the queue index.
        let queue = u16::try_from(thread_id).unwrap_or(u16::MAX);
        // Errors here must not end the worker thread: that would silently kill the queue.
        if self.inner.event_idx.load(Ordering::Relaxed) {
            loop {
                let _ = vring.disable_notification();
                let _ = self.process_queue(queue, vring);
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
        } else {
            let _ = self.process_queue(queue, vring);
        }
        Ok(())
    }
}
