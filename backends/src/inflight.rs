//! The in-flight request log of `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`: a shared-memory
//! region the frontend keeps across backend restarts, in which a backend marks each request
//! before it starts it and clears the mark once the request is in the used ring, so that a
//! restarted backend resubmits, in the order they were taken, exactly the requests its
//! predecessor had taken but not completed.
//!
//! The layout is the one QEMU and libvhost-user use for split virtqueues, so any frontend
//! that implements the feature can hold our region. For each queue, at
//! `index * queue_region_size(queue_size)`:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc_num x { u8 inflight; u8 padding[5]; u16 next; u64 counter }
//! ```
//!
//! Completion is two-phase: `last_batch_head` names the request being completed before the
//! used ring is written, and `used_idx` mirrors the used index after the mark is cleared. A
//! backend killed between the two leaves `used_idx` behind the guest-visible used index,
//! which tells its successor that `last_batch_head` was in fact completed.
//!
//! Every field is accessed through atomics: the memory is shared with the frontend (and a
//! frontend may be hostile), so nothing read from it is trusted beyond its range checks.

use std::fs::File;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

/// The region version this backend writes (the one QEMU's libvhost-user writes).
pub const INFLIGHT_VERSION: u16 = 1;
/// Largest queue a region may describe (the virtio maximum for split rings).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most queues a region may describe.
pub const MAX_QUEUES: u16 = 64;

const HEADER_LEN: usize = 16;
const DESC_LEN: usize = 16;
const ALIGN: usize = 64;

// Header field offsets within one queue's region.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
// Field offsets within one descriptor state.
const DOFF_INFLIGHT: usize = 0;
const DOFF_COUNTER: usize = 8;

/// Why a region could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend described a region we cannot use.
    #[error("inflight region: {0}")]
    Invalid(String),
    /// Creating the backing memfd failed.
    #[error("inflight region: cannot create the memfd: {0}")]
    Create(#[source] std::io::Error),
    /// Mapping the region failed.
    #[error("inflight region: cannot map {size} bytes at offset {offset}: {msg}")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// Offset in the file.
        offset: u64,
        /// What the mapping said.
        msg: String,
    },
}

/// Bytes one queue's part of the region takes.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// What a backend must do for one queue when it takes over a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Takeover {
    /// The region was fresh (the first backend for this device): nothing to resubmit.
    Fresh,
    /// The predecessor left these descriptor heads in flight: resubmit them in this order,
    /// then continue with the avail ring at `next_avail`.
    Resume {
        /// Heads to resubmit, oldest first.
        heads: Vec<u16>,
        /// Where the avail ring continues (`used_idx` plus the heads in flight).
        next_avail: u16,
        /// The next submission counter.
        counter: u64,
        /// Marks found for heads outside the ring (ignored; a corrupt or hostile region).
        ignored: usize,
    },
}

/// A mapped in-flight region for `num_queues` queues of up to `queue_size` descriptors.
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

fn check_shape(num_queues: u16, queue_size: u16) -> Result<usize, InflightError> {
    if num_queues == 0 || num_queues > MAX_QUEUES {
        return Err(InflightError::Invalid(format!(
            "{num_queues} queues (1..={MAX_QUEUES} allowed)"
        )));
    }
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::Invalid(format!(
            "queue size {queue_size} (1..={MAX_QUEUE_SIZE} allowed)"
        )));
    }
    Ok(usize::from(num_queues) * queue_region_size(queue_size))
}

impl InflightRegion {
    /// Allocates a fresh, zeroed region in a new memfd (GET_INFLIGHT_FD). Returns the region
    /// and the file to hand to the frontend; its size is `file.metadata().len()`.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Self, File), InflightError> {
        let size = check_shape(num_queues, queue_size)?;
        let fd = nix::sys::memfd::memfd_create(
            c"bulkhead-inflight",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| InflightError::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(size as u64).map_err(InflightError::Create)?;
        let dup = file.try_clone().map_err(InflightError::Create)?;
        let region = Self::map(dup, size as u64, 0, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps a region the frontend handed back (SET_INFLIGHT_FD), after checking that its
    /// size covers `num_queues` queues of `queue_size` descriptors.
    pub fn map(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let need = check_shape(num_queues, queue_size)?;
        if mmap_size < need as u64 {
            return Err(InflightError::Invalid(format!(
                "{mmap_size} bytes cannot hold {num_queues} queues of {queue_size} (need {need})"
            )));
        }
        if !mmap_offset.is_multiple_of(4096) {
            return Err(InflightError::Invalid(format!(
                "offset {mmap_offset} is not page-aligned"
            )));
        }
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if mmap_offset
            .checked_add(need as u64)
            .is_none_or(|end| end > file_len)
        {
            return Err(InflightError::Invalid(format!(
                "the file is {file_len} bytes, too short for {need} bytes at offset {mmap_offset}"
            )));
        }
        let map_err = |msg: String| InflightError::Map {
            size: need as u64,
            offset: mmap_offset,
            msg,
        };
        // Map only what we use; the file may be larger.
        let map = MmapRegion::from_file(FileOffset::new(file, mmap_offset), need)
            .map_err(|e| map_err(e.to_string()))?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
        })
    }

    /// Queues the region describes.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue the region describes.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn base(&self, queue: u16) -> Option<usize> {
        (queue < self.num_queues).then(|| usize::from(queue) * queue_region_size(self.queue_size))
    }

    fn u16_at(&self, off: usize) -> Option<&AtomicU16> {
        self.map.get_atomic_ref::<AtomicU16>(off).ok()
    }

    fn head_at(&self, queue: u16, head: u16) -> Option<(&AtomicU8, &AtomicU64)> {
        if head >= self.queue_size {
            return None;
        }
        let off = self.base(queue)? + HEADER_LEN + usize::from(head) * DESC_LEN;
        Some((
            self.map
                .get_atomic_ref::<AtomicU8>(off + DOFF_INFLIGHT)
                .ok()?,
            self.map
                .get_atomic_ref::<AtomicU64>(off + DOFF_COUNTER)
                .ok()?,
        ))
    }

    /// Takes over `queue` for a backend whose ring has `ring_size` descriptors and whose
    /// guest-visible used index is `used_idx`: initializes a fresh region, or finishes the
    /// predecessor's interrupted completion and lists what it left in flight.
    pub fn take_over(&self, queue: u16, ring_size: u16, used_idx: u16) -> Takeover {
        let Some(base) = self.base(queue) else {
            return Takeover::Fresh;
        };
        let (Some(version), Some(desc_num), Some(last), Some(shadow_used)) = (
            self.u16_at(base + OFF_VERSION),
            self.u16_at(base + OFF_DESC_NUM),
            self.u16_at(base + OFF_LAST_BATCH_HEAD),
            self.u16_at(base + OFF_USED_IDX),
        ) else {
            return Takeover::Fresh;
        };
        if version.load(Ordering::Acquire) == 0 {
            // Fresh: nothing was ever in flight. Start from a clean slate.
            for head in 0..self.queue_size {
                if let Some((flag, counter)) = self.head_at(queue, head) {
                    flag.store(0, Ordering::Relaxed);
                    counter.store(0, Ordering::Relaxed);
                }
            }
            desc_num.store(self.queue_size, Ordering::Relaxed);
            last.store(0, Ordering::Relaxed);
            shadow_used.store(used_idx, Ordering::Relaxed);
            version.store(INFLIGHT_VERSION, Ordering::Release);
            return Takeover::Fresh;
        }
        // The predecessor was killed after the used ring showed its last completion but
        // before it cleared that request's mark: the mark is stale.
        if shadow_used.load(Ordering::Acquire) != used_idx {
            if let Some((flag, _)) = self.head_at(queue, last.load(Ordering::Relaxed)) {
                flag.store(0, Ordering::Release);
            }
            shadow_used.store(used_idx, Ordering::Release);
        }
        let mut found: Vec<(u64, u16)> = Vec::new();
        let mut ignored = 0;
        for head in 0..self.queue_size {
            let Some((flag, counter)) = self.head_at(queue, head) else {
                continue;
            };
            if flag.load(Ordering::Acquire) == 0 {
                continue;
            }
            if head >= ring_size {
                flag.store(0, Ordering::Relaxed);
                ignored += 1;
                continue;
            }
            found.push((counter.load(Ordering::Relaxed), head));
        }
        found.sort_unstable();
        let counter = found.last().map_or(0, |(c, _)| c.wrapping_add(1));
        let inuse = found.len() as u16;
        Takeover::Resume {
            heads: found.into_iter().map(|(_, h)| h).collect(),
            next_avail: used_idx.wrapping_add(inuse),
            counter,
            ignored,
        }
    }

    /// Marks `head` of `queue` in flight with submission number `counter`, before the
    /// request is started.
    pub fn mark(&self, queue: u16, head: u16, counter: u64) {
        if let Some((flag, c)) = self.head_at(queue, head) {
            c.store(counter, Ordering::Relaxed);
            flag.store(1, Ordering::Release);
        }
    }

    /// Says `head` of `queue` is about to be put in the used ring.
    pub fn completing(&self, queue: u16, head: u16) {
        if let Some(base) = self.base(queue) {
            if let Some(last) = self.u16_at(base + OFF_LAST_BATCH_HEAD) {
                last.store(head, Ordering::Release);
            }
        }
        fence(Ordering::SeqCst);
    }

    /// Clears `head` of `queue` once the used ring shows it and its used index is
    /// `used_idx`.
    pub fn completed(&self, queue: u16, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if let Some((flag, _)) = self.head_at(queue, head) {
            flag.store(0, Ordering::Release);
        }
        if let Some(base) = self.base(queue) {
            if let Some(used) = self.u16_at(base + OFF_USED_IDX) {
                used.store(used_idx, Ordering::Release);
            }
        }
    }

    /// Heads of `queue` currently marked in flight (for tests and logs).
    pub fn in_flight(&self, queue: u16) -> Vec<u16> {
        (0..self.queue_size)
            .filter(|h| {
                self.head_at(queue, *h)
                    .is_some_and(|(f, _)| f.load(Ordering::Acquire) != 0)
            })
            .collect()
    }
}

/// Where the relay puts the region the frontend handed over (SET_INFLIGHT_FD) for the
/// backend's queue workers to take over. Each new region bumps the epoch, so a worker knows
/// to take its queue over again.
#[derive(Debug, Default)]
pub struct InflightSlot {
    region: Mutex<Option<Arc<InflightRegion>>>,
    epoch: AtomicU64,
}

impl InflightSlot {
    /// Installs the region the frontend handed over.
    pub fn install(&self, region: InflightRegion) {
        let mut r = self.region.lock().unwrap_or_else(|e| e.into_inner());
        *r = Some(Arc::new(region));
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Changes each time a region is installed (0: none yet).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The current region, if the frontend handed one over.
    pub fn region(&self) -> Option<Arc<InflightRegion>> {
        self.region
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(heads: &[u16], next_avail: u16, counter: u64, ignored: usize) -> Takeover {
        Takeover::Resume {
            heads: heads.to_vec(),
            next_avail,
            counter,
            ignored,
        }
    }

    fn reopen(file: &File, queues: u16, size: u16) -> InflightRegion {
        let len = file.metadata().expect("metadata").len();
        InflightRegion::map(file.try_clone().expect("dup"), len, 0, queues, size).expect("map")
    }

    #[test]
    fn layout_matches_libvhost_user() {
        // 16-byte header plus 16 bytes per descriptor, rounded up to 64.
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(1), 64);
    }

    #[test]
    fn fresh_region_then_resubmission_in_submission_order() {
        let (first, file) = InflightRegion::create(2, 8).expect("create");
        assert_eq!(
            file.metadata().expect("md").len(),
            2 * queue_region_size(8) as u64
        );
        assert_eq!(first.take_over(1, 8, 0), Takeover::Fresh);
        // Three requests taken (heads 5, 2, 7), the first completed.
        first.mark(1, 5, 0);
        first.mark(1, 2, 1);
        first.mark(1, 7, 2);
        first.completing(1, 5);
        first.completed(1, 5, 1);
        drop(first);
        // A successor, through another mapping of the same memory.
        let second = reopen(&file, 2, 8);
        assert_eq!(second.take_over(1, 8, 1), resume(&[2, 7], 3, 3, 0));
        // The other queue had nothing.
        assert_eq!(
            second.take_over(0, 8, 0),
            Takeover::Fresh,
            "queue 0 was never taken over, so it is still fresh"
        );
    }

    #[test]
    fn a_completion_interrupted_after_the_used_ring_is_not_redone() {
        let (r, file) = InflightRegion::create(1, 4).expect("create");
        r.take_over(0, 4, 10);
        r.mark(0, 3, 0);
        r.mark(0, 1, 1);
        // Killed between the used ring update (guest used idx 11) and clearing the mark.
        r.completing(0, 3);
        drop(r);
        let s = reopen(&file, 1, 4);
        assert_eq!(s.take_over(0, 4, 11), resume(&[1], 12, 2, 0));
        assert_eq!(s.in_flight(0), vec![1]);
        // Killed before the used ring update: the request is still in flight.
        s.completing(0, 1);
        drop(s);
        let t = reopen(&file, 1, 4);
        assert_eq!(t.take_over(0, 4, 11), resume(&[1], 12, 2, 0));
    }

    #[test]
    fn hostile_contents_stay_in_range() {
        let (r, file) = InflightRegion::create(1, 8).expect("create");
        r.take_over(0, 8, 0);
        // Marks beyond the ring the guest configured (4) are dropped, not resubmitted.
        r.mark(0, 6, 0);
        r.mark(0, 1, 1);
        // Out-of-range heads and queues are ignored.
        r.mark(0, 200, 2);
        r.mark(5, 1, 3);
        drop(r);
        let s = reopen(&file, 1, 8);
        assert_eq!(s.take_over(0, 4, 0), resume(&[1], 1, 2, 1));
        // Garbage in last_batch_head points nowhere.
        let base = 0;
        s.u16_at(base + OFF_LAST_BATCH_HEAD)
            .expect("field")
            .store(0xffff, Ordering::Relaxed);
        assert!(matches!(s.take_over(0, 4, 9), Takeover::Resume { .. }));
    }

    #[test]
    fn shapes_a_frontend_cannot_hand_us() {
        let (_, file) = InflightRegion::create(1, 8).expect("create");
        let len = file.metadata().expect("md").len();
        let dup = || file.try_clone().expect("dup");
        assert!(
            InflightRegion::map(dup(), len, 0, 2, 8).is_err(),
            "too small"
        );
        assert!(
            InflightRegion::map(dup(), len * 2, 0, 2, 8).is_err(),
            "claims more than the file has"
        );
        assert!(
            InflightRegion::map(dup(), len, 100, 1, 8).is_err(),
            "unaligned"
        );
        assert!(
            InflightRegion::map(dup(), len, 0, 0, 8).is_err(),
            "no queues"
        );
        assert!(
            InflightRegion::map(dup(), len, 0, 1, 0).is_err(),
            "empty queues"
        );
        assert!(InflightRegion::create(1, 40000).is_err(), "oversized queue");
        assert!(InflightRegion::map(dup(), len, 0, 1, 8).is_ok());
    }
}
