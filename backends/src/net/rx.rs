//! RX: frames read from the tap (each preceded by its vnet header, which becomes the
//! virtio-net header) are copied into the chains the guest offers on the receive queue.
//!
//! - A frame is read from the tap only when the guest has at least one buffer posted, so
//!   while the guest has none, frames wait in the tap's queue (at most one waits here).
//! - With MRG_RXBUF a frame is spread over as many chains as it needs and `num_buffers` in
//!   the first one says how many; chains are returned to the used ring only once the whole
//!   frame is written. If the ring runs dry mid-frame, the chains already filled are held
//!   and the frame resumes when the guest posts more.
//! - Without MRG_RXBUF a frame must fit one chain; a frame that does not fit the next chain
//!   is dropped (counted) and the chain is left in the ring for the next frame, as Linux's
//!   vhost-net does.
//! - A chain that is broken, has a device-readable descriptor, points outside guest RAM or
//!   cannot hold a virtio-net header is skipped: returned with used length 0, counted.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::config::{HDR_LEN, MAX_FRAME_LEN};
use super::stats::{NetStats, RxSkip};
use super::tap::Tap;
use super::tx::{collect_chain, in_memory};

/// Offset of `num_buffers` in `virtio_net_hdr_mrg_rxbuf`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Everything receiving needs besides the queue.
#[derive(Debug, Clone, Copy)]
pub struct RxContext<'a> {
    /// Where frames come from.
    pub tap: &'a Tap,
    /// Counters and the log.
    pub stats: &'a NetStats,
    /// The negotiated virtio-net header size (also the tap's vnet header size).
    pub hdr_len: usize,
    /// Whether MRG_RXBUF was negotiated.
    pub mergeable: bool,
}

/// Why RX processing stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxStop {
    /// The tap has no more frames: poll it.
    TapEmpty,
    /// The guest has no (more) buffers: stop polling the tap until it posts some.
    NoBuffers,
    /// Reading the tap failed with something other than "no frame": stop polling it.
    TapError,
    /// The rate limit holds the next frame back (it stays pending; the limiter's caller
    /// arranged the wakeup).
    Throttled,
}

/// What one round of RX processing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxOutcome {
    /// Frames delivered.
    pub delivered: usize,
    /// Entries added to the used ring (frames' chains and skipped chains).
    pub used: usize,
    /// Why it stopped.
    pub stop: RxStop,
}

/// One writable piece of an RX chain.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// The RX state of one connection: the frame being delivered, if any.
#[derive(Debug)]
pub struct Rx {
    frame: Vec<u8>,
    /// Bytes of `frame` that hold the frame (0: none pending).
    len: usize,
    /// Bytes of the pending frame already written into held chains.
    written: usize,
    /// Chains filled with part of the pending frame: (head, bytes written).
    held: Vec<(u16, u32)>,
    /// Where the first held chain's bytes live (its header holds `num_buffers`).
    first: Vec<Segment>,
    /// Whether the rate limit admitted (and was charged for) the pending frame.
    admitted: bool,
}

impl Default for Rx {
    fn default() -> Self {
        Rx {
            frame: vec![0u8; HDR_LEN + MAX_FRAME_LEN],
            len: 0,
            written: 0,
            held: Vec::new(),
            first: Vec::new(),
            admitted: false,
        }
    }
}

/// Whether the driver has posted chains we have not taken yet.
fn has_avail(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => idx != Wrapping(queue.next_avail()),
        Err(_) => false,
    }
}

/// Writes `data` at byte `offset` of the area described by `segs`; false if it does not fit
/// or memory refuses.
fn write_at(mem: &GuestMemoryMmap, segs: &[Segment], mut offset: usize, mut data: &[u8]) -> bool {
    for s in segs {
        if data.is_empty() {
            break;
        }
        if offset >= s.len {
            offset -= s.len;
            continue;
        }
        let n = (s.len - offset).min(data.len());
        let Some(addr) = s.addr.0.checked_add(offset as u64) else {
            return false;
        };
        if mem.write_slice(&data[..n], GuestAddress(addr)).is_err() {
            return false;
        }
        data = &data[n..];
        offset = 0;
    }
    data.is_empty()
}

/// The writable segments of an RX chain, or why it must be skipped.
fn rx_segments(
    chain: &virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    max: usize,
    hdr_len: usize,
) -> Result<Vec<Segment>, RxSkip> {
    let mem = chain.memory();
    let descs = collect_chain(chain, max).ok_or(RxSkip::BrokenChain)?;
    let mut segs = Vec::with_capacity(descs.len());
    let mut total = 0usize;
    for d in &descs {
        if !d.is_write_only() {
            return Err(RxSkip::ReadOnly);
        }
        if !in_memory(mem, d.addr(), d.len()) {
            return Err(RxSkip::OutsideMemory);
        }
        if d.len() > 0 {
            segs.push(Segment {
                addr: d.addr(),
                len: d.len() as usize,
            });
        }
        total = total.saturating_add(d.len() as usize);
    }
    if total < hdr_len {
        return Err(RxSkip::TooSmall);
    }
    Ok(segs)
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers,
}

impl Rx {
    /// Whether a frame is waiting for guest buffers.
    pub fn pending(&self) -> bool {
        self.len > 0
    }

    fn reset(&mut self) {
        self.len = 0;
        self.written = 0;
        self.held.clear();
        self.first.clear();
        self.admitted = false;
    }

    /// Moves frames from the tap into the RX `queue` until the tap is empty or the guest
    /// runs out of buffers. Never blocks.
    pub fn process(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        ctx: &RxContext<'_>,
    ) -> RxOutcome {
        self.process_limited(queue, mem, ctx, &mut |_| Ok(()))
    }

    /// [`Self::process`] asking `admit` before delivering each frame (with its bytes,
    /// without the vnet header): a frame it refuses stays pending ([`RxStop::Throttled`]).
    /// Each frame is admitted (and charged) once.
    pub fn process_limited(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        ctx: &RxContext<'_>,
        admit: &mut dyn FnMut(u64) -> Result<(), std::time::Duration>,
    ) -> RxOutcome {
        let mut out = RxOutcome {
            delivered: 0,
            used: 0,
            stop: RxStop::TapEmpty,
        };
        loop {
            if self.len == 0 {
                if !has_avail(queue, mem) {
                    out.stop = RxStop::NoBuffers;
                    return out;
                }
                match ctx.tap.read(&mut self.frame) {
                    Ok(n) if n < ctx.hdr_len => {
                        ctx.stats.rx_frame_dropped(format_args!(
                            "tap gave a {n}-byte read, shorter than the vnet header"
                        ));
                        continue;
                    }
                    Ok(n) => {
                        self.len = n;
                        if ctx.hdr_len >= HDR_LEN {
                            // The tap leaves num_buffers alone; it is ours to fill.
                            self.frame[NUM_BUFFERS_OFFSET..HDR_LEN]
                                .copy_from_slice(&1u16.to_le_bytes());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        out.stop = RxStop::TapEmpty;
                        return out;
                    }
                    Err(e) => {
                        ctx.stats.log(format_args!("tap read failed: {e}"));
                        out.stop = RxStop::TapError;
                        return out;
                    }
                }
            }
            if !self.admitted {
                match admit(self.len.saturating_sub(ctx.hdr_len) as u64) {
                    Ok(()) => self.admitted = true,
                    Err(_) => {
                        out.stop = RxStop::Throttled;
                        return out;
                    }
                }
            }
            match self.deliver(queue, mem, ctx, &mut out) {
                Delivery::Done => out.delivered += 1,
                Delivery::Dropped => {}
                Delivery::NoBuffers => {
                    out.stop = RxStop::NoBuffers;
                    return out;
                }
            }
        }
    }

    fn used(
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        ctx: &RxContext<'_>,
        head: u16,
        len: u32,
        out: &mut RxOutcome,
    ) {
        match queue.add_used(mem, head, len) {
            Ok(()) => out.used += 1,
            Err(e) => ctx.stats.log(format_args!(
                "cannot return RX head {head} to the used ring: {e}"
            )),
        }
    }

    /// Gives up the pending frame, returning any held chains with length 0.
    fn drop_frame(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        ctx: &RxContext<'_>,
        out: &mut RxOutcome,
    ) -> Delivery {
        for (head, _) in std::mem::take(&mut self.held) {
            Self::used(queue, mem, ctx, head, 0, out);
        }
        self.reset();
        Delivery::Dropped
    }

    fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        ctx: &RxContext<'_>,
        out: &mut RxOutcome,
    ) -> Delivery {
        let max = usize::from(queue.size());
        while self.written < self.len {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                if self.held.len() >= max {
                    // Every descriptor of the ring is held and the frame still does not fit.
                    ctx.stats.rx_frame_dropped(format_args!(
                        "frame of {} bytes is larger than the whole RX ring",
                        self.len
                    ));
                    return self.drop_frame(queue, mem, ctx, out);
                }
                return Delivery::NoBuffers;
            };
            let head = chain.head_index();
            let segs = match rx_segments(&chain, max, ctx.hdr_len) {
                Ok(s) => s,
                Err(why) => {
                    ctx.stats.rx_skipped(head, why);
                    Self::used(queue, mem, ctx, head, 0, out);
                    continue;
                }
            };
            let capacity: usize = segs.iter().map(|s| s.len).sum();
            if !ctx.mergeable && capacity < self.len {
                // Leave the chain for the next (smaller) frame.
                queue.go_to_previous_position();
                ctx.stats.rx_frame_dropped(format_args!(
                    "frame of {} bytes does not fit the {capacity}-byte RX buffer at head {head}",
                    self.len
                ));
                self.reset();
                return Delivery::Dropped;
            }
            let n = capacity.min(self.len - self.written);
            if !write_at(mem, &segs, 0, &self.frame[self.written..self.written + n]) {
                ctx.stats.rx_frame_dropped(format_args!(
                    "cannot write into the RX buffer at head {head}"
                ));
                Self::used(queue, mem, ctx, head, 0, out);
                return self.drop_frame(queue, mem, ctx, out);
            }
            if self.held.is_empty() {
                self.first = segs;
            }
            // n <= capacity, a sum of u32 lengths of at most `max` descriptors, and
            // n <= the frame buffer: it fits a u32.
            self.held.push((head, n as u32));
            self.written += n;
        }
        if ctx.mergeable && self.held.len() > 1 {
            let count = u16::try_from(self.held.len()).unwrap_or(u16::MAX);
            if !write_at(mem, &self.first, NUM_BUFFERS_OFFSET, &count.to_le_bytes()) {
                ctx.stats
                    .rx_frame_dropped(format_args!("cannot write num_buffers"));
                return self.drop_frame(queue, mem, ctx, out);
            }
        }
        for (head, len) in std::mem::take(&mut self.held) {
            Self::used(queue, mem, ctx, head, len, out);
        }
        ctx.stats.rx_delivered(self.len - ctx.hdr_len);
        self.reset();
        Delivery::Done
    }
}
