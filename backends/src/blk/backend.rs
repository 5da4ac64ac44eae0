//! The `VhostUserBackend` glue: one worker thread per queue pops chains, runs them through
//! [`request::process_chain`](super::request::process_chain) and notifies the guest.

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
use super::request::{process_chain, Target, ID_LEN};
use super::stats::Stats;

/// State shared by the worker threads of one connection.
struct Inner {
    disk: Arc<Disk>,
    serial: [u8; ID_LEN],
    config: BlkConfig,
    stats: Arc<Stats>,
    event_idx: AtomicBool,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
}

/// The vhost-user-blk backend for one connection (cheap to clone; clones share state).
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

impl BlkBackend {
    /// A backend serving `disk` with `queues` request queues.
    pub fn new(disk: Arc<Disk>, serial: [u8; ID_LEN], queues: u16, stats: Arc<Stats>) -> Self {
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
            }),
        }
    }

    /// The config space this backend serves.
    pub fn config(&self) -> BlkConfig {
        self.inner.config
    }

    fn process_queue(&self, vring: &VringRwLock) -> io::Result<bool> {
        let Some(atomic) = self.inner.mem.lock().ok().and_then(|m| m.clone()) else {
            return Ok(false);
        };
        let mem = atomic.memory();
        let target = Target {
            disk: &self.inner.disk,
            serial: &self.inner.serial,
            stats: &self.inner.stats,
            max_descriptors: usize::from(vring.get_ref().get_queue().size()),
        };
        let mut any = false;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let outcome = process_chain(chain, &target);
            if let Err(e) = vring.add_used(head, outcome.used_len()) {
                self.inner.stats.log_malformed(format_args!(
                    "cannot return head {head} to the used ring: {e}"
                ));
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
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        // With one queue per thread, `device_event` indexes this thread's vrings.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        // Errors here must not end the worker thread: that would silently kill the queue.
        if self.inner.event_idx.load(Ordering::Relaxed) {
            loop {
                let _ = vring.disable_notification();
                let _ = self.process_queue(vring);
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
        } else {
            let _ = self.process_queue(vring);
        }
        Ok(())
    }
}
