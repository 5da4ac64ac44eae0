//! Validation and execution of one virtio-blk request: a descriptor chain in, a status byte
//! and a used length out. Nothing the guest writes can make this panic or touch memory
//! outside guest RAM or bytes outside the image.
//!
//! Layout accepted (virtio 1.x, 5.2.6): the first 16 bytes of the first descriptor are the
//! header (`type`, `reserved`, `sector`) and that descriptor must be device-readable; the last
//! byte of the last descriptor is the status and that descriptor must be device-writable.
//! Data is every descriptor in between, plus the rest of the header descriptor for requests
//! that carry data to the device, or the start of the status descriptor for requests that
//! carry data to the driver. A chain without a usable status byte is returned with used
//! length 0 and counted as broken.

use std::io;
use std::ops::Deref;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use super::disk::{Disk, Rw, DIRECT_ALIGN, SECTOR_SIZE};
use super::stats::Stats;

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: u32 = 16;
/// Size of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const SEGMENT_LEN: u64 = 16;

/// Why a request failed; each maps to the status the driver gets.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain is longer than the queue.
    #[error("chain of {0} descriptors is longer than the queue")]
    ChainTooLong(usize),
    /// The first descriptor is device-writable.
    #[error("header descriptor is device-writable")]
    HeaderWritable,
    /// The first descriptor is shorter than a header.
    #[error("header descriptor is {0} bytes, need {HEADER_LEN}")]
    HeaderTooShort(u32),
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor has the wrong direction for request type {0}")]
    WrongDirection(u32),
    /// The data of a read or write is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    NotSectorMultiple(u64),
    /// The sector range does not fit in the image (or overflows).
    #[error("sectors {sector}+{bytes} bytes are beyond the image ({capacity} sectors)")]
    BeyondImage {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        bytes: u64,
        /// Image capacity in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("write request type {0} on a read-only disk")]
    ReadOnly(u32),
    /// A discard/write-zeroes payload that is not 1..=MAX segments of 16 bytes.
    #[error("bad discard/write-zeroes payload of {0} bytes")]
    BadSegments(u64),
    /// A discard/write-zeroes segment longer than advertised.
    #[error("discard/write-zeroes segment of {0} sectors is too long")]
    SegmentTooLong(u32),
    /// Flags the device does not know, or UNMAP on a discard.
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// GET_ID without room for the answer.
    #[error("GET_ID without a writable buffer")]
    NoIdBuffer,
    /// Request type not implemented.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The image I/O failed.
    #[error("image I/O failed: {0}")]
    Io(#[source] io::Error),
    /// Guest memory could not be accessed although it was validated.
    #[error("guest memory access failed")]
    Memory,
}

impl RequestError {
    /// The virtio-blk status this error completes the request with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// What became of one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A status byte was written; `used_len` bytes were written into the chain in total.
    Completed {
        /// The status written.
        status: u8,
        /// The used length to report.
        used_len: u32,
    },
    /// No usable status byte: report used length 0.
    Broken,
}

impl Outcome {
    /// The used length for the used ring.
    pub fn used_len(&self) -> u32 {
        match self {
            Outcome::Completed { used_len, .. } => *used_len,
            Outcome::Broken => 0,
        }
    }
}

/// One contiguous piece of request data in guest memory.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// Everything a request needs besides its chain.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The image.
    pub disk: &'a Disk,
    /// The GET_ID answer (zero-padded serial).
    pub serial: &'a [u8; ID_LEN],
    /// Counters and the malformed-request log.
    pub stats: &'a Stats,
    /// Longest chain accepted (the queue size).
    pub max_descriptors: usize,
}

fn in_memory<M: GuestMemoryBackend + ?Sized>(mem: &M, addr: GuestAddress, len: u64) -> bool {
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    if len == 0 {
        return true;
    }
    addr.checked_add(len as u64).is_some() && mem.check_range(addr, len)
}

/// Validates and executes one chain, writes its status byte, and says what to report.
pub fn process_chain<M>(chain: DescriptorChain<M>, target: &Target<'_>) -> Outcome
where
    M: Deref + Clone,
    M::Target: GuestMemoryBackend,
{
    let mem = chain.memory();
    let head = chain.head_index();
    // The iterator stops at a loop (ttl), at an unreadable descriptor table, at a bad next
    // index and at a bad indirect table: each leaves the last descriptor with NEXT set.
    // Collect at most one more than a legal chain can have (an indirect table can list up
    // to 65535), so a huge table cannot make us allocate much.
    let limit = target.max_descriptors.saturating_add(1);
    let descs: Vec<Descriptor> = chain.clone().take(limit).collect();
    process_descriptors(mem, head, &descs, target)
}

/// The descriptors of the chain whose head is `head` in the descriptor table at
/// `desc_table` of a ring of `queue_size` entries, read as virtio-queue's chain iterator
/// reads them (indirect tables followed once, a loop cut off after `queue_size` steps, at
/// most `limit` descriptors, and none that would take the chain past 2^32 bytes). Any fault
/// ends the walk early, leaving the last descriptor with NEXT set, which
/// [`process_descriptors`] reports as a broken chain. This is how a request named by the
/// in-flight log (a head, not an avail ring slot) is read again: it must be read exactly as
/// it was the first time, or a resubmitted request could complete differently.
pub fn chain_at<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    limit: usize,
) -> Vec<Descriptor> {
    const DESC_SIZE: u64 = 16;
    let mut out = Vec::new();
    let (mut table, mut size, mut ttl) = (desc_table, u32::from(queue_size), u32::from(queue_size));
    let mut index = head;
    let mut indirect = false;
    let mut bytes = 0u32;
    while out.len() < limit && ttl > 0 && u32::from(index) < size {
        let Some(addr) = table.checked_add(u64::from(index) * DESC_SIZE) else {
            break;
        };
        let Ok(desc) = mem.read_obj::<Descriptor>(addr) else {
            break;
        };
        ttl -= 1;
        if desc.refers_to_indirect_table() {
            let entries = desc.len() / DESC_SIZE as u32;
            if indirect || desc.len() % DESC_SIZE as u32 != 0 || entries > u32::from(u16::MAX) {
                break;
            }
            (table, size, ttl, index, indirect) = (desc.addr(), entries, entries, 0, true);
            continue;
        }
        // virtio 1.2, 2.7.5.2: a chain is at most 2^32 bytes; the iterator stops before a
        // descriptor that would go past that.
        let Some(total) = bytes.checked_add(desc.len()) else {
            break;
        };
        bytes = total;
        let next = desc.next();
        let more = desc.has_next();
        out.push(desc);
        if !more {
            break;
        }
        index = next;
    }
    out
}

/// Validates and executes the request made of `descs` (the chain at `head`), writes its
/// status byte, and says what to report. Reads, writes and flushes are done here, blocking.
pub fn process_descriptors<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    head: u16,
    descs: &[Descriptor],
    target: &Target<'_>,
) -> Outcome {
    match begin(mem, head, descs, target) {
        Started::Done(outcome) => outcome,
        Started::Io(req) => {
            let result = req.run_blocking(target.disk);
            req.finish(mem, result, target)
        }
    }
}

/// A request after validation.
#[derive(Debug)]
pub enum Started {
    /// Already finished (an invalid request, GET_ID, discard, write-zeroes): its status
    /// byte is written.
    Done(Outcome),
    /// A read, write or flush for an I/O engine; finish it with [`IoRequest::finish`].
    Io(IoRequest),
}

/// What an [`IoRequest`] asks the image for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Transfer data (see [`IoRequest::iovecs`]).
    Data(Rw),
    /// Make completed writes durable.
    Flush,
}

/// A validated read, write or flush, ready for an engine: the image offset and the memory
/// the kernel transfers to or from, as iovecs. Those point into guest memory (or into the
/// request's own bounce buffer) and stay valid while the guest memory mapping the request
/// was made from is kept alive by the caller.
pub struct IoRequest {
    /// The chain's head.
    pub head: u16,
    /// What to do.
    pub op: IoOp,
    /// Byte offset in the image.
    pub offset: u64,
    /// Bytes to transfer (0 for a flush).
    pub bytes: u64,
    iovecs: Vec<libc::iovec>,
    /// For `O_DIRECT` with unaligned guest buffers: an aligned copy the kernel sees
    /// instead, and the guest pieces it is copied to (reads) or was copied from (writes).
    bounce: Option<(Vec<u8>, usize, Vec<Segment>)>,
    status_addr: GuestAddress,
}

impl std::fmt::Debug for IoRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoRequest")
            .field("head", &self.head)
            .field("op", &self.op)
            .field("offset", &self.offset)
            .field("bytes", &self.bytes)
            .field("iovecs", &self.iovecs.len())
            .field("bounce", &self.bounce.is_some())
            .finish()
    }
}

// SAFETY: the raw pointers in `iovecs` refer to guest memory (kept mapped by the owner of
// the request until it is finished) or to the request's own bounce buffer, whose heap
// allocation does not move with the request. One thread at a time uses a request.
unsafe impl Send for IoRequest {}

impl IoRequest {
    /// The memory the kernel reads or writes.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Runs the request here, blocking, after an engine transferred `done` bytes of it
    /// (0: all of it).
    pub fn run_blocking_from(&self, disk: &Disk, done: usize) -> io::Result<()> {
        match self.op {
            // SAFETY: the iovecs describe live memory (see the type's contract).
            IoOp::Data(rw) => unsafe { disk.transfer(rw, &self.iovecs, self.offset, done) },
            IoOp::Flush => disk.flush(),
        }
    }

    /// Runs the whole request here, blocking.
    pub fn run_blocking(&self, disk: &Disk) -> io::Result<()> {
        self.run_blocking_from(disk, 0)
    }

    /// Completes the request with the engine's `result`: copies a bounce buffer back,
    /// counts the bytes, writes the status byte and says what to report.
    pub fn finish<M: GuestMemoryBackend + ?Sized>(
        self,
        mem: &M,
        result: io::Result<()>,
        target: &Target<'_>,
    ) -> Outcome {
        let stats = target.stats;
        let head = self.head;
        let done = result.map_err(RequestError::Io).and_then(|()| {
            match self.op {
                IoOp::Data(Rw::Read) => {
                    if let Some((buf, at, segs)) = &self.bounce {
                        let mut from = *at;
                        for s in segs {
                            let n = s.len as usize;
                            mem.write_slice(&buf[from..from + n], s.addr)
                                .map_err(|_| RequestError::Memory)?;
                            from += n;
                        }
                    }
                    stats.bytes_read.fetch_add(self.bytes, Ordering::Relaxed);
                }
                IoOp::Data(Rw::Write) => {
                    stats.bytes_written.fetch_add(self.bytes, Ordering::Relaxed);
                }
                IoOp::Flush => {}
            }
            Ok(match self.op {
                // Checked against u32 when the request was made.
                IoOp::Data(Rw::Read) => self.bytes as u32,
                _ => 0,
            })
        });
        write_status(mem, head, self.status_addr, done, stats)
    }
}

/// Where a chain's status byte goes, if it has a usable one.
fn status_address<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
) -> Option<GuestAddress> {
    match descs.last() {
        Some(last)
            if !last.has_next()
                && last.is_write_only()
                && last.len() >= 1
                && in_memory(mem, last.addr(), u64::from(last.len())) =>
        {
            last.addr()
                .checked_add(u64::from(last.len()) - 1)
                .filter(|a| in_memory(mem, *a, 1))
        }
        _ => None,
    }
}

/// Writes the status for `result` (data bytes written into the chain, or why it failed).
fn write_status<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    head: u16,
    status_addr: GuestAddress,
    result: Result<u32, RequestError>,
    stats: &Stats,
) -> Outcome {
    let (status, data_written) = match result {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
        Err(e) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            stats.log_malformed(format_args!("request at head {head}: {e}"));
            (e.status(), 0)
        }
    };
    if mem.write_obj(status, status_addr).is_err() {
        stats.broken.fetch_add(1, Ordering::Relaxed);
        return Outcome::Broken;
    }
    Outcome::Completed {
        status,
        used_len: data_written.saturating_add(1),
    }
}

/// Validates the request made of `descs` (the chain at `head`). Requests other than reads,
/// writes and flushes are executed at once; those three are returned for an engine.
pub fn begin<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    head: u16,
    descs: &[Descriptor],
    target: &Target<'_>,
) -> Started {
    let stats = target.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let Some(status_addr) = status_address(mem, descs) else {
        stats.broken.fetch_add(1, Ordering::Relaxed);
        stats.log_malformed(format_args!(
            "request at head {head}: no usable status byte ({} descriptors); returned with len 0",
            descs.len()
        ));
        return Started::Done(Outcome::Broken);
    };
    match execute(mem, descs, target) {
        Ok(Exec::Now(n)) => Started::Done(write_status(mem, head, status_addr, Ok(n), stats)),
        Ok(Exec::Later {
            op,
            offset,
            segs,
            bytes,
        }) => {
            match io_request(
                mem,
                head,
                op,
                offset,
                &segs,
                bytes,
                status_addr,
                target.disk,
            ) {
                Ok(req) => Started::Io(req),
                Err(e) => Started::Done(write_status(mem, head, status_addr, Err(e), stats)),
            }
        }
        Err(e) => Started::Done(write_status(mem, head, status_addr, Err(e), stats)),
    }
}

/// Builds the iovecs of a validated request (with a bounce buffer for `O_DIRECT` when a
/// guest piece is not aligned).
#[allow(clippy::too_many_arguments)]
fn io_request<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    head: u16,
    op: IoOp,
    offset: u64,
    segs: &[Segment],
    bytes: u64,
    status_addr: GuestAddress,
    disk: &Disk,
) -> Result<IoRequest, RequestError> {
    let mut iovecs = Vec::with_capacity(segs.len());
    let mut aligned = true;
    for s in segs {
        for slice in mem.get_slices(s.addr, s.len as usize) {
            let slice = slice.map_err(|_| RequestError::Memory)?;
            let base = slice.ptr_guard_mut().as_ptr();
            aligned &= (base as usize).is_multiple_of(DIRECT_ALIGN)
                && slice.len().is_multiple_of(DIRECT_ALIGN);
            iovecs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: slice.len(),
            });
        }
    }
    let mut bounce = None;
    if disk.direct() && !aligned && bytes > 0 {
        let len = usize::try_from(bytes).map_err(|_| RequestError::Memory)?;
        let mut buf = vec![0u8; len + DIRECT_ALIGN];
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        if op == IoOp::Data(Rw::Write) {
            let mut to = at;
            for s in segs {
                let n = s.len as usize;
                mem.read_slice(&mut buf[to..to + n], s.addr)
                    .map_err(|_| RequestError::Memory)?;
                to += n;
            }
        }
        iovecs = vec![libc::iovec {
            iov_base: buf[at..].as_mut_ptr().cast(),
            iov_len: len,
        }];
        bounce = Some((buf, at, segs.to_vec()));
    }
    Ok(IoRequest {
        head,
        op,
        offset,
        bytes,
        iovecs,
        bounce,
        status_addr,
    })
}

/// What [`execute`] did.
enum Exec {
    /// Done; this many data bytes were written into the chain.
    Now(u32),
    /// A read, write or flush to run.
    Later {
        op: IoOp,
        offset: u64,
        segs: Vec<Segment>,
        bytes: u64,
    },
}

/// The parsed header.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: u32,
    sector: u64,
}

fn read_header<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    first: &Descriptor,
) -> Result<Header, RequestError> {
    if first.is_write_only() {
        return Err(RequestError::HeaderWritable);
    }
    if first.len() < HEADER_LEN {
        return Err(RequestError::HeaderTooShort(first.len()));
    }
    if !in_memory(mem, first.addr(), u64::from(first.len())) {
        return Err(RequestError::OutsideMemory {
            addr: first.addr().raw_value(),
            len: u64::from(first.len()),
        });
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, first.addr())
        .map_err(|_| RequestError::Memory)?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&raw[8..16]);
    Ok(Header {
        kind,
        sector: u64::from_le_bytes(s),
    })
}

/// Collects the data segments for a request whose data flows in direction `writable`
/// (true: device writes guest memory), checking directions and addresses.
fn data_segments<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    kind: u32,
    writable: bool,
) -> Result<(Vec<Segment>, u64), RequestError> {
    let n = descs.len();
    let mut segs = Vec::with_capacity(n);
    let first = &descs[0];
    if !writable && first.len() > HEADER_LEN {
        segs.push(Segment {
            addr: first
                .addr()
                .checked_add(u64::from(HEADER_LEN))
                .ok_or(RequestError::Memory)?,
            len: u64::from(first.len() - HEADER_LEN),
        });
    }
    if n > 2 {
        for d in &descs[1..n - 1] {
            if d.is_write_only() != writable {
                return Err(RequestError::WrongDirection(kind));
            }
            segs.push(Segment {
                addr: d.addr(),
                len: u64::from(d.len()),
            });
        }
    }
    let last = &descs[n - 1];
    if writable && last.len() > 1 {
        segs.push(Segment {
            addr: last.addr(),
            len: u64::from(last.len() - 1),
        });
    }
    let mut total = 0u64;
    for s in &segs {
        if !in_memory(mem, s.addr, s.len) {
            return Err(RequestError::OutsideMemory {
                addr: s.addr.raw_value(),
                len: s.len,
            });
        }
        total = total.checked_add(s.len).ok_or(RequestError::Memory)?;
    }
    Ok((segs, total))
}

/// Byte offset of a sector range in the image, if `bytes` from `sector` fit in it.
fn image_range(disk: &Disk, sector: u64, bytes: u64) -> Result<u64, RequestError> {
    let beyond = || RequestError::BeyondImage {
        sector,
        bytes,
        capacity: disk.sectors(),
    };
    let start = sector.checked_mul(SECTOR_SIZE).ok_or_else(beyond)?;
    let end = start.checked_add(bytes).ok_or_else(beyond)?;
    if end > disk.usable_bytes() {
        return Err(beyond());
    }
    Ok(start)
}

/// Validates a request and runs it if it is not a read, write or flush.
fn execute<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    target: &Target<'_>,
) -> Result<Exec, RequestError> {
    if descs.len() > target.max_descriptors {
        return Err(RequestError::ChainTooLong(descs.len()));
    }
    // A single descriptor cannot be both a readable header and a writable status.
    let hdr = read_header(mem, &descs[0])?;
    let disk = target.disk;
    match hdr.kind {
        VIRTIO_BLK_T_IN => {
            let (segs, total) = data_segments(mem, descs, hdr.kind, true)?;
            if total % SECTOR_SIZE != 0 {
                return Err(RequestError::NotSectorMultiple(total));
            }
            let offset = image_range(disk, hdr.sector, total)?;
            // The data plus the status byte must fit a u32 used length; it does, because a
            // chain is limited to 2^32 bytes by the iterator, but check anyway.
            u32::try_from(total)
                .ok()
                .filter(|n| *n < u32::MAX)
                .ok_or(RequestError::BadSegments(total))?;
            Ok(Exec::Later {
                op: IoOp::Data(Rw::Read),
                offset,
                segs,
                bytes: total,
            })
        }
        VIRTIO_BLK_T_OUT => {
            let (segs, total) = data_segments(mem, descs, hdr.kind, false)?;
            if disk.readonly() {
                return Err(RequestError::ReadOnly(hdr.kind));
            }
            if total % SECTOR_SIZE != 0 {
                return Err(RequestError::NotSectorMultiple(total));
            }
            let offset = image_range(disk, hdr.sector, total)?;
            Ok(Exec::Later {
                op: IoOp::Data(Rw::Write),
                offset,
                segs,
                bytes: total,
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Exec::Later {
            op: IoOp::Flush,
            offset: 0,
            segs: Vec::new(),
            bytes: 0,
        }),
        VIRTIO_BLK_T_GET_ID => {
            let (segs, total) = data_segments(mem, descs, hdr.kind, true)?;
            if total == 0 {
                return Err(RequestError::NoIdBuffer);
            }
            let mut left: &[u8] = &target.serial[..];
            let mut written = 0u32;
            for s in &segs {
                if left.is_empty() {
                    break;
                }
                let n = (s.len as usize).min(left.len());
                mem.write_slice(&left[..n], s.addr)
                    .map_err(|_| RequestError::Memory)?;
                left = &left[n..];
                written += n as u32;
            }
            Ok(Exec::Now(written))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let (segs, total) = data_segments(mem, descs, hdr.kind, false)?;
            if disk.readonly() {
                return Err(RequestError::ReadOnly(hdr.kind));
            }
            if total == 0
                || total % SEGMENT_LEN != 0
                || total / SEGMENT_LEN > u64::from(MAX_DISCARD_SEG)
            {
                return Err(RequestError::BadSegments(total));
            }
            // Gather the (at most 16 * MAX_DISCARD_SEG) payload bytes, whatever their layout.
            let mut payload = vec![0u8; total as usize];
            let mut at = 0usize;
            for s in &segs {
                let n = s.len as usize;
                mem.read_slice(&mut payload[at..at + n], s.addr)
                    .map_err(|_| RequestError::Memory)?;
                at += n;
            }
            // Validate every segment before touching the image.
            let mut ranges = Vec::with_capacity(payload.len() / SEGMENT_LEN as usize);
            for rec in payload.chunks_exact(SEGMENT_LEN as usize) {
                let mut s = [0u8; 8];
                s.copy_from_slice(&rec[0..8]);
                let sector = u64::from_le_bytes(s);
                let num = u32::from_le_bytes([rec[8], rec[9], rec[10], rec[11]]);
                let flags = u32::from_le_bytes([rec[12], rec[13], rec[14], rec[15]]);
                let allowed = if hdr.kind == VIRTIO_BLK_T_WRITE_ZEROES {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !allowed != 0 {
                    return Err(RequestError::UnsupportedFlags(flags));
                }
                if num > MAX_DISCARD_SECTORS {
                    return Err(RequestError::SegmentTooLong(num));
                }
                let bytes = u64::from(num) * SECTOR_SIZE;
                let off = image_range(disk, sector, bytes)?;
                ranges.push((off, bytes, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0));
            }
            for (off, bytes, unmap) in ranges {
                if hdr.kind == VIRTIO_BLK_T_DISCARD {
                    disk.discard(off, bytes)
                } else {
                    disk.write_zeroes(off, bytes, unmap)
                }
                .map_err(RequestError::Io)?;
            }
            Ok(Exec::Now(0))
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Pads or truncates a serial to the 20 bytes GET_ID returns.
pub fn serial_bytes(serial: &str) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let b = serial.as_bytes();
    let n = b.len().min(ID_LEN);
    id[..n].copy_from_slice(&b[..n]);
    id
}
