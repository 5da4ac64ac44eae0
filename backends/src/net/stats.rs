//! Packet, byte and drop counters, and a rate-limited log of malformed chains to stderr.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bulkhead_ipc::devstats::{self, BackendRegion};
use std::time::{Duration, Instant};

/// At most this many log lines per window.
const LOG_BURST: u32 = 10;
/// The rate-limiting window.
const LOG_WINDOW: Duration = Duration::from_secs(1);

/// Why a TX chain was dropped (returned to the used ring with length 0, nothing sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxDrop {
    /// The chain loops, has a bad next index or indirect table, or is longer than the queue.
    #[error("broken or overlong descriptor chain")]
    BrokenChain,
    /// A descriptor is device-writable.
    #[error("device-writable descriptor in a TX chain")]
    Writable,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    OutsideMemory,
    /// Fewer bytes than a virtio-net header.
    #[error("shorter than the virtio-net header")]
    ShortHeader,
    /// A frame longer than 64 KiB plus an Ethernet header.
    #[error("frame too long")]
    TooLong,
    /// The tap refused the frame (bad vnet header, frame too short, ...).
    #[error("the tap refused the frame")]
    Tap,
    /// The frame's source MAC address is not the NIC's (or it has no Ethernet header):
    /// a guest sends only as itself.
    #[error("source MAC address is not the NIC's")]
    ForeignMac,
}

/// Why an RX chain was skipped (returned to the used ring with length 0, nothing written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RxSkip {
    /// The chain loops, has a bad next index or indirect table, or is longer than the queue.
    #[error("broken or overlong descriptor chain")]
    BrokenChain,
    /// A descriptor is device-readable only.
    #[error("read-only descriptor in an RX chain")]
    ReadOnly,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    OutsideMemory,
    /// Too small to hold a virtio-net header.
    #[error("smaller than the virtio-net header")]
    TooSmall,
}

/// How many [`TxDrop`] reasons there are.
pub const TX_DROPS: usize = 7;
const RX_SKIPS: usize = 4;

impl TxDrop {
    fn index(self) -> usize {
        self as usize
    }
}

impl RxSkip {
    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one NIC, kept for the lifetime of the process.
#[derive(Debug)]
pub struct NetStats {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_drops: [AtomicU64; TX_DROPS],
    rx_skips: [AtomicU64; RX_SKIPS],
    rx_dropped: AtomicU64,
    log: Mutex<LogWindow>,
    /// The shared counters page bulkheadd reads (record [`RX_RECORD`]: frames to the guest,
    /// [`TX_RECORD`]: frames from it), if one was handed to us.
    region: Option<Arc<BackendRegion>>,
}

/// The shared page's record for frames delivered to the guest.
pub const RX_RECORD: usize = 0;
/// The shared page's record for frames the guest sent.
pub const TX_RECORD: usize = 1;

#[derive(Debug)]
struct LogWindow {
    start: Instant,
    printed: u32,
    suppressed: u64,
}

impl Default for NetStats {
    fn default() -> Self {
        NetStats {
            tx_packets: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            rx_packets: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_drops: Default::default(),
            rx_skips: Default::default(),
            rx_dropped: AtomicU64::new(0),
            log: Mutex::new(LogWindow {
                start: Instant::now(),
                printed: 0,
                suppressed: 0,
            }),
            region: None,
        }
    }
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetStatsSnapshot {
    /// Frames written to the tap.
    pub tx_packets: u64,
    /// Frame bytes (without the virtio-net header) written to the tap.
    pub tx_bytes: u64,
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Frame bytes (without the virtio-net header) delivered to the guest.
    pub rx_bytes: u64,
    /// TX chains dropped, by reason: broken chain, writable, outside memory, short header,
    /// too long, refused by the tap, foreign source MAC (the order of [`TxDrop`]).
    pub tx_drops: [u64; TX_DROPS],
    /// RX chains skipped, by reason: broken chain, read-only, outside memory, too small
    /// (the order of [`RxSkip`]).
    pub rx_skips: [u64; RX_SKIPS],
    /// Frames read from the tap that no guest buffer could take (too big without
    /// MRG_RXBUF, or larger than the whole ring).
    pub rx_dropped: u64,
}

impl NetStatsSnapshot {
    /// Dropped TX chains for one reason.
    pub fn tx_drop(&self, why: TxDrop) -> u64 {
        self.tx_drops[why.index()]
    }

    /// Skipped RX chains for one reason.
    pub fn rx_skip(&self, why: RxSkip) -> u64 {
        self.rx_skips[why.index()]
    }
}

impl NetStats {
    /// Counters that are also kept in `region` (the page bulkheadd reads).
    pub fn with_region(region: Option<Arc<BackendRegion>>) -> Self {
        NetStats {
            region,
            ..NetStats::default()
        }
    }

    /// The shared page, if there is one.
    pub fn region(&self) -> Option<Arc<BackendRegion>> {
        self.region.clone()
    }

    fn shared(&self, record: usize, field: usize, n: u64) {
        if let Some(r) = &self.region {
            r.add(record, field, n);
        }
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> NetStatsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStatsSnapshot {
            tx_packets: load(&self.tx_packets),
            tx_bytes: load(&self.tx_bytes),
            rx_packets: load(&self.rx_packets),
            rx_bytes: load(&self.rx_bytes),
            tx_drops: std::array::from_fn(|i| load(&self.tx_drops[i])),
            rx_skips: std::array::from_fn(|i| load(&self.rx_skips[i])),
            rx_dropped: load(&self.rx_dropped),
        }
    }

    /// Counts one frame sent to the tap.
    pub fn tx_sent(&self, frame_bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes
            .fetch_add(frame_bytes as u64, Ordering::Relaxed);
        self.shared(TX_RECORD, devstats::Q_REQUESTS, 1);
        self.shared(TX_RECORD, devstats::Q_BYTES_READ, frame_bytes as u64);
    }

    /// Counts one frame delivered to the guest.
    pub fn rx_delivered(&self, frame_bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes
            .fetch_add(frame_bytes as u64, Ordering::Relaxed);
        self.shared(RX_RECORD, devstats::Q_REQUESTS, 1);
        self.shared(RX_RECORD, devstats::Q_BYTES_READ, frame_bytes as u64);
    }

    /// Counts and logs one dropped TX chain.
    pub fn tx_dropped(&self, head: u16, why: TxDrop) {
        self.tx_drops[why.index()].fetch_add(1, Ordering::Relaxed);
        self.shared(TX_RECORD, devstats::Q_ERRORS, 1);
        self.log(format_args!("TX chain at head {head} dropped: {why}"));
    }

    /// Counts and logs one skipped RX chain.
    pub fn rx_skipped(&self, head: u16, why: RxSkip) {
        self.rx_skips[why.index()].fetch_add(1, Ordering::Relaxed);
        self.log(format_args!("RX chain at head {head} skipped: {why}"));
    }

    /// Counts and logs one frame from the tap that could not be delivered.
    pub fn rx_frame_dropped(&self, what: std::fmt::Arguments<'_>) {
        self.rx_dropped.fetch_add(1, Ordering::Relaxed);
        self.shared(RX_RECORD, devstats::Q_ERRORS, 1);
        self.log(what);
    }

    /// Logs one line, at most [`LOG_BURST`] lines per second; the number of lines dropped
    /// is reported with the next line that gets through.
    pub fn log(&self, what: std::fmt::Arguments<'_>) {
        let Ok(mut w) = self.log.lock() else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(w.start) >= LOG_WINDOW {
            w.start = now;
            w.printed = 0;
        }
        if w.printed >= LOG_BURST {
            w.suppressed += 1;
            return;
        }
        w.printed += 1;
        if w.suppressed > 0 {
            eprintln!(
                "bulkhead-net: {what} ({} similar messages suppressed)",
                w.suppressed
            );
            w.suppressed = 0;
        } else {
            eprintln!("bulkhead-net: {what}");
        }
    }
}
