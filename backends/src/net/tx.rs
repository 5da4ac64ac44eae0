//! TX: every chain the guest offers on the transmit queue is one virtio-net header followed
//! by one Ethernet frame, laid out over any number of device-readable descriptors. The bytes
//! are gathered and written to the tap in one `write`, the header passing through as the
//! tap's vnet header. A chain that is broken, has a device-writable descriptor, points
//! outside guest RAM, is shorter than the header or carries a frame longer than
//! [`MAX_FRAME_LEN`] is dropped: returned with used length 0, counted and logged. So is a
//! frame whose source MAC address is not the NIC's, when it has one: on a shared bridge a
//! guest cannot pass itself off as another.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::config::MAX_FRAME_LEN;
use super::stats::{NetStats, TxDrop};
use super::tap::Tap;

/// Everything transmitting needs besides the queue.
#[derive(Debug, Clone, Copy)]
pub struct TxContext<'a> {
    /// Where frames go.
    pub tap: &'a Tap,
    /// Counters and the log.
    pub stats: &'a NetStats,
    /// The negotiated virtio-net header size (also the tap's vnet header size).
    pub hdr_len: usize,
    /// The only source MAC address frames may carry (None: any).
    pub source_mac: Option<[u8; 6]>,
}

/// Offset of the source address in an Ethernet frame, and its end.
const SOURCE_MAC: std::ops::Range<usize> = 6..12;

/// Whether `len` bytes at `addr` are all guest RAM.
pub(crate) fn in_memory(mem: &GuestMemoryMmap, addr: vm_memory::GuestAddress, len: u32) -> bool {
    use vm_memory::GuestMemoryBackend;
    len == 0
        || (addr.0.checked_add(u64::from(len)).is_some() && mem.check_range(addr, len as usize))
}

/// The descriptors of `chain`, or `None` if it is broken (a loop, a bad next index, a bad
/// indirect table: the iterator stops early, leaving NEXT set on the last one) or longer
/// than `max` descriptors.
pub(crate) fn collect_chain(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    max: usize,
) -> Option<Vec<Descriptor>> {
    let descs: Vec<Descriptor> = chain.clone().take(max.saturating_add(1)).collect();
    match descs.last() {
        Some(last) if !last.has_next() && descs.len() <= max => Some(descs),
        _ => None,
    }
}

/// Validates one chain and sends its frame; returns the frame length (without header).
/// `buf` is scratch space reused between calls.
pub fn transmit(
    chain: DescriptorChain<&GuestMemoryMmap>,
    max_descriptors: usize,
    ctx: &TxContext<'_>,
    buf: &mut Vec<u8>,
) -> Result<usize, TxDrop> {
    let mem = chain.memory();
    let descs = collect_chain(&chain, max_descriptors).ok_or(TxDrop::BrokenChain)?;
    let mut total = 0usize;
    for d in &descs {
        if d.is_write_only() {
            return Err(TxDrop::Writable);
        }
        if !in_memory(mem, d.addr(), d.len()) {
            return Err(TxDrop::OutsideMemory);
        }
        total = total.saturating_add(d.len() as usize);
    }
    if total < ctx.hdr_len {
        return Err(TxDrop::ShortHeader);
    }
    let frame_len = total - ctx.hdr_len;
    if frame_len > MAX_FRAME_LEN {
        return Err(TxDrop::TooLong);
    }
    buf.clear();
    buf.resize(total, 0);
    let mut at = 0;
    for d in &descs {
        let n = d.len() as usize;
        mem.read_slice(&mut buf[at..at + n], d.addr())
            .map_err(|_| TxDrop::OutsideMemory)?;
        at += n;
    }
    if let Some(mac) = ctx.source_mac {
        let frame = buf.get(ctx.hdr_len..).unwrap_or_default();
        if frame.get(SOURCE_MAC) != Some(&mac[..]) {
            return Err(TxDrop::ForeignMac);
        }
    }
    match ctx.tap.write(buf) {
        Ok(_) => Ok(frame_len),
        Err(e) => {
            ctx.stats
                .log(format_args!("tap write of {total} bytes failed: {e}"));
            Err(TxDrop::Tap)
        }
    }
}

/// Sends every chain available on the TX `queue`, returning each to the used ring (length
/// 0: the device writes nothing into TX buffers). Returns how many were returned.
pub fn process_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    ctx: &TxContext<'_>,
    buf: &mut Vec<u8>,
) -> usize {
    process_tx_limited(queue, mem, ctx, buf, &mut |_| Ok(())).0
}

/// [`process_tx`] asking `admit` before each chain (with its bytes, header included): a
/// chain it refuses is put back in the avail ring, and the wait it asked for is returned
/// with the count.
pub fn process_tx_limited(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    ctx: &TxContext<'_>,
    buf: &mut Vec<u8>,
    admit: &mut dyn FnMut(u64) -> Result<(), std::time::Duration>,
) -> (usize, Option<std::time::Duration>) {
    let max = usize::from(queue.size());
    let mut used = 0;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        // Its size as the guest describes it (bounded like `transmit` bounds it); a chain
        // that is not a frame costs what it claims and is dropped below.
        let bytes: u64 = chain
            .clone()
            .take(max.saturating_add(1))
            .map(|d| u64::from(d.len()))
            .fold(0, u64::saturating_add)
            .saturating_sub(ctx.hdr_len as u64);
        if let Err(wait) = admit(bytes) {
            let back = queue.next_avail().wrapping_sub(1);
            queue.set_next_avail(back);
            return (used, Some(wait));
        }
        match transmit(chain, max, ctx, buf) {
            Ok(n) => ctx.stats.tx_sent(n),
            Err(why) => ctx.stats.tx_dropped(head, why),
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            ctx.stats.log(format_args!(
                "cannot return TX head {head} to the used ring: {e}"
            ));
            break;
        }
        used += 1;
    }
    (used, None)
}
