//! A modern (virtio 1.x) PCI transport whose device is a vhost-user backend in another
//! process: feature negotiation and config space are answered here; queue notifications
//! are ioeventfds handed to the backend as vring kicks, and completions are the backend
//! writing vring call eventfds that KVM injects as MSI-X interrupts (irqfd). The data path
//! never enters this process.
//!
//! The transport never talks to the backend itself: its registers are answered at once,
//! and the vhost-user work (bringing the rings up at DRIVER_OK, stopping them on a reset,
//! replaying the setup to a new backend) is a job for the device's worker thread
//! ([`crate::vhost_link`]), so no vCPU waits on a backend.

use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupts::GsiRouter;
use crate::memory::GuestRam;
use crate::pci::{ConfigSpace, PciDevice};
pub use crate::vhost_link::SETUP_DEADLINE;
use crate::vhost_link::{handshake, BackendLink, DrainReport, Job, Plan, QueuePlan};

/// Size of BAR 0, which holds every virtio structure and the MSI-X table.
pub const BAR0_SIZE: u64 = 0x1_0000;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x8000;
const MSIX_PBA_OFFSET: u64 = 0xc000;
const NO_VECTOR: u16 = 0xffff;
/// The virtio 1.x feature bit.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bits we pass through to the guest: device-specific ones, indirect descriptors,
/// event idx, and VERSION_1.
const TRANSPORT_FEATURES: u64 = 0x00ff_ffff | (1 << 28) | (1 << 29) | VIRTIO_F_VERSION_1;
/// The largest ring the transport offers.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// A vhost-user device that cannot be set up.
#[derive(Debug, Error)]
pub enum VirtioPciError {
    /// The backend refused or broke the protocol.
    #[error("vhost-user {what}: {source}")]
    VhostUser {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// A KVM registration failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The backend did not finish a setup exchange in time; its connection was cut.
    #[error(
        "the backend did not finish the vhost-user {what} within {}s; its connection was cut",
        SETUP_DEADLINE.as_secs()
    )]
    SetupTimeout {
        /// Which exchange: "handshake" or "setup".
        what: &'static str,
    },
}

#[derive(Debug, Default, Clone, Copy)]
struct MsixEntry {
    addr: u64,
    data: u32,
    masked: bool,
}

struct Queue {
    size: u16,
    enable: bool,
    vector: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    irqfd_gsi: Option<u32>,
    pending: bool,
}

/// One queue's transport registers, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// Ring size.
    pub size: u16,
    /// Enabled by the driver.
    pub enable: bool,
    /// MSI-X vector.
    pub vector: u16,
    /// Descriptor table, avail and used ring (guest-physical).
    pub desc: u64,
    /// Avail ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// An interrupt arrived while its vector was masked.
    pub pending: bool,
}

/// A device's virtio-pci transport state (and, once drained, its backend's ring bases and
/// in-flight region), for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// Device name.
    pub name: String,
    /// Virtio device type.
    pub device_type: u16,
    /// PCI configuration registers (BAR address, command, MSI-X control).
    pub config: Vec<u32>,
    /// Features offered.
    pub device_features: u64,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// Feature select registers.
    pub dfselect: u32,
    /// Driver feature select.
    pub gfselect: u32,
    /// Device status.
    pub status: u8,
    /// Config generation.
    pub generation: u8,
    /// Queue select.
    pub queue_select: u16,
    /// Config-change MSI-X vector.
    pub config_vector: u16,
    /// Each queue.
    pub queues: Vec<QueueState>,
    /// MSI-X table: address, data, masked.
    pub msix: Vec<(u64, u32, bool)>,
    /// MSI-X enable bit.
    pub msix_enabled: bool,
    /// MSI-X function mask.
    pub msix_masked: bool,
    /// The backend's rings were up.
    pub active: bool,
    /// The drain's report (ring bases, in-flight region).
    pub drain: Option<DrainReport>,
}

/// How long a restored device's backend may take to bring its rings up.
const RESTORE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// A ring's number, avail index and used index, as the progress watchdog reads them.
pub type RingIndices = (usize, u16, u16);

/// One virtio device on the PCI bus, served by a vhost-user backend.
pub struct VhostUserPciDevice {
    name: String,
    cfg: ConfigSpace,
    vm: Arc<VmFd>,
    router: Arc<Mutex<GsiRouter>>,
    /// Guest RAM (the watchdog reads ring indices from it).
    ram: Arc<GuestRam>,
    /// 2 = block, 1 = net.
    device_type: u16,
    /// A handle on the current backend's socket (readable at EOF once it is gone).
    watch: UnixStream,
    reconnects: u32,
    /// The link, until the worker takes it ([`Self::start_worker`]).
    link: Option<BackendLink>,
    /// The worker's job queue.
    jobs: Option<mpsc::Sender<Job>>,
    /// Bumped by every activation and reset: an activation that finishes after the driver
    /// reset (or activated again) is ignored.
    epoch: u64,
    device_features: u64,
    driver_features: u64,
    dfselect: u32,
    gfselect: u32,
    status: u8,
    generation: u8,
    queue_select: u16,
    config_vector: u16,
    device_config: Vec<u8>,
    queues: Vec<Queue>,
    msix: Vec<MsixEntry>,
    msix_enabled: bool,
    msix_masked: bool,
    gsi_base: u32,
    notify_base: u64,
    /// The backend's rings are up (the worker said so): irqfds may be bound.
    active: bool,
    /// Stopped for a snapshot: the progress watchdog looks away.
    drained: bool,
}

impl VhostUserPciDevice {
    /// Connects to a vhost-user backend over `stream` and builds the PCI function for a
    /// virtio device of `device_type` (2 = block, 1 = net) with BAR 0 at `bar_addr`.
    pub fn new(
        name: &str,
        device_type: u16,
        stream: UnixStream,
        vm: Arc<VmFd>,
        router: Arc<Mutex<GsiRouter>>,
        ram: Arc<GuestRam>,
        bar_addr: u64,
    ) -> Result<Self, VirtioPciError> {
        let h = handshake(stream, device_type)?;
        let (backend_features, num_queues) = (h.backend_features, h.num_queues);
        let device_config = h.device_config.clone();
        let watch = h.sock.try_clone().map_err(VirtioPciError::EventFd)?;
        let link = BackendLink::new(name, device_type, ram.clone(), h);
        let device_features = (backend_features & TRANSPORT_FEATURES) | VIRTIO_F_VERSION_1;
        let mut queues = Vec::new();
        for _ in 0..num_queues {
            queues.push(Queue {
                size: MAX_QUEUE_SIZE,
                enable: false,
                vector: NO_VECTOR,
                desc: 0,
                avail: 0,
                used: 0,
                kick: EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?,
                call: EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?,
                irqfd_gsi: None,
                pending: false,
            });
        }
        let vectors = u32::from(num_queues) + 1;
        let gsi_base = router
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate(vectors);

        let class = match device_type {
            2 => 0x018000,
            1 => 0x020000,
            _ => 0xff0000,
        };
        let mut cfg = ConfigSpace::new(0x1af4, 0x1040 + device_type, class, 1, (0x1af4, 0x40));
        cfg.add_bar64(0, BAR0_SIZE, bar_addr);
        // Capabilities: common, ISR, device, notify (virtio vendor caps), then MSI-X.
        let vcap = |next: u8, len: u8, kind: u8, offset: u64, length: u32| -> Vec<u8> {
            let mut c = vec![0x09, next, len, kind, 0, 0, 0, 0];
            c.extend_from_slice(&(offset as u32).to_le_bytes());
            c.extend_from_slice(&length.to_le_bytes());
            c
        };
        cfg.write_raw(0x40, &vcap(0x50, 16, 1, COMMON_OFFSET, 0x40));
        cfg.write_raw(0x50, &vcap(0x60, 16, 3, ISR_OFFSET, 1));
        cfg.write_raw(
            0x60,
            &vcap(
                0x70,
                16,
                4,
                DEVICE_CFG_OFFSET,
                device_config.len().max(4) as u32,
            ),
        );
        let mut notify = vcap(
            0x84,
            20,
            2,
            NOTIFY_OFFSET,
            u32::from(num_queues) * NOTIFY_MULTIPLIER,
        );
        notify.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        cfg.write_raw(0x70, &notify);
        let table_size = (vectors - 1) as u16;
        let mut msix = vec![0x11, 0x00];
        msix.extend_from_slice(&table_size.to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        cfg.write_raw(0x84, &msix);
        cfg.set_writable(0x87, 1); // MSI-X enable / function mask bits
        cfg.set_capabilities(0x40);

        let mut dev = Self {
            name: name.to_string(),
            cfg,
            vm,
            router,
            ram,
            device_type,
            watch,
            reconnects: 0,
            link: Some(link),
            jobs: None,
            epoch: 0,
            device_features,
            driver_features: 0,
            dfselect: 0,
            gfselect: 0,
            status: 0,
            generation: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
            device_config,
            queues,
            msix: vec![
                MsixEntry {
                    masked: true,
                    ..Default::default()
                };
                vectors as usize
            ],
            msix_enabled: false,
            msix_masked: false,
            gsi_base,
            notify_base: 0,
            active: false,
            drained: false,
        };
        dev.register_notifiers(bar_addr)?;
        Ok(dev)
    }

    /// Number of queues the backend serves.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The device's name (`disk0`, `nic0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle on the current backend socket: readable (EOF) once the backend is gone.
    pub fn watch_socket(&self) -> std::io::Result<UnixStream> {
        self.watch.try_clone()
    }

    /// For the progress watchdog: the backend's reconnect count and, per ring that carries
    /// requests (every ring of a disk; a NIC's transmit rings — receive rings hold buffers
    /// that wait for traffic), its avail and used indices; None while the rings are not up.
    pub fn progress(&self) -> Option<(u32, Vec<RingIndices>)> {
        use vm_memory::{Bytes, GuestAddress};
        if !self.active || self.drained {
            return None;
        }
        let mem = self.ram.mem();
        let rings = self
            .queues
            .iter()
            .enumerate()
            .filter(|(i, q)| q.enable && (self.device_type != 1 || i % 2 == 1))
            .filter_map(|(i, q)| {
                let avail: u16 = mem.read_obj(GuestAddress(q.avail + 2)).ok()?;
                let used: u16 = mem.read_obj(GuestAddress(q.used + 2)).ok()?;
                Some((i, avail, used))
            })
            .collect();
        Some((self.reconnects, rings))
    }

    /// How many times a new backend was connected.
    pub fn reconnects(&self) -> u32 {
        self.reconnects
    }

    /// Starts the device's worker thread, the only one that talks to its backend.
    pub fn start_worker(dev: &Arc<Mutex<Self>>) -> Result<(), VirtioPciError> {
        let mut d = lock(dev);
        let Some(link) = d.link.take() else {
            return Ok(());
        };
        let (tx, rx) = mpsc::channel();
        let weak = Arc::downgrade(dev);
        std::thread::Builder::new()
            .name(format!("vhost-{}", d.name))
            .spawn(move || link.serve(rx, weak))
            .map_err(VirtioPciError::EventFd)?;
        d.jobs = Some(tx);
        Ok(())
    }

    /// Queues a job for the worker; false if there is no worker.
    fn submit(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }

    /// The negotiated features and, if the rings are up, the plan to bring a new backend's
    /// rings up the same way (the worker asks, for a reconnect).
    pub(crate) fn plan(&self) -> (u64, Option<Plan>) {
        let plan = if self.active {
            self.make_plan().ok()
        } else {
            None
        };
        (self.driver_features, plan)
    }

    fn make_plan(&self) -> std::io::Result<Plan> {
        let mut queues = Vec::new();
        for (index, q) in self.queues.iter().enumerate() {
            if !q.enable {
                continue;
            }
            queues.push(QueuePlan {
                index,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: q.kick.try_clone()?,
                call: q.call.try_clone()?,
            });
        }
        Ok(Plan {
            epoch: self.epoch,
            driver_features: self.driver_features,
            queues,
        })
    }

    /// The worker finished the activation of `epoch`.
    pub(crate) fn activated(&mut self, epoch: u64, ok: bool) {
        if epoch != self.epoch {
            return;
        }
        if ok {
            self.active = true;
            self.update_interrupts();
        } else {
            self.needs_reset();
        }
    }

    /// The worker moved the device to a new backend, reached through `watch`.
    pub(crate) fn reconnected(&mut self, watch: UnixStream) -> u32 {
        self.watch = watch;
        self.reconnects += 1;
        self.reconnects
    }

    fn needs_reset(&mut self) {
        self.status |= 0x40; // DEVICE_NEEDS_RESET
        self.generation = self.generation.wrapping_add(1);
    }

    fn register_notifiers(&mut self, bar: u64) -> Result<(), VirtioPciError> {
        if self.notify_base == bar + NOTIFY_OFFSET {
            return Ok(());
        }
        if self.notify_base != 0 {
            for (i, q) in self.queues.iter().enumerate() {
                let addr = IoEventAddress::Mmio(
                    self.notify_base + i as u64 * u64::from(NOTIFY_MULTIPLIER),
                );
                let _ = self.vm.unregister_ioevent(&q.kick, &addr, NoDatamatch);
            }
            self.notify_base = 0;
        }
        if bar == 0 {
            return Ok(());
        }
        for (i, q) in self.queues.iter().enumerate() {
            let addr =
                IoEventAddress::Mmio(bar + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER));
            self.vm
                .register_ioevent(&q.kick, &addr, NoDatamatch)
                .map_err(|source| VirtioPciError::Kvm {
                    what: "KVM_IOEVENTFD",
                    source,
                })?;
        }
        self.notify_base = bar + NOTIFY_OFFSET;
        Ok(())
    }

    fn log(&self, msg: &str) {
        eprintln!("bulkhead-runner: {}: {msg}", self.name);
    }

    fn reset(&mut self) {
        // The worker stops the rings; the transport starts over at once.
        if self.active || self.status & 0x04 != 0 {
            let queues = (0..self.queues.len())
                .filter(|&i| self.queues[i].enable)
                .collect();
            self.submit(Job::Reset { queues });
        }
        self.epoch += 1;
        self.active = false;
        self.driver_features = 0;
        self.status = 0;
        self.config_vector = NO_VECTOR;
        for q in &mut self.queues {
            q.size = MAX_QUEUE_SIZE;
            q.enable = false;
            q.vector = NO_VECTOR;
            q.desc = 0;
            q.avail = 0;
            q.used = 0;
        }
        self.update_interrupts();
    }

    /// Binds each queue's call eventfd to its MSI-X vector through an irqfd, or (masked,
    /// disabled) unbinds it and remembers a pending interrupt for when it is unmasked.
    fn update_interrupts(&mut self) {
        for i in 0..self.queues.len() {
            let vector = self.queues[i].vector;
            let entry = self.msix.get(usize::from(vector)).copied();
            let deliverable =
                self.active && self.msix_enabled && !self.msix_masked && vector != NO_VECTOR;
            let want = match entry {
                Some(e) if deliverable && !e.masked && e.addr != 0 => {
                    Some((self.gsi_base + u32::from(vector), e))
                }
                _ => None,
            };
            let current = self.queues[i].irqfd_gsi;
            if let Some(gsi) = current {
                if want.map(|(g, _)| g) != Some(gsi) {
                    let _ = self.vm.unregister_irqfd(&self.queues[i].call, gsi);
                    self.queues[i].irqfd_gsi = None;
                }
            }
            if let Some((gsi, e)) = want {
                let routed = self
                    .router
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set_msi(gsi, Some((e.addr, e.data)));
                if let Err(err) = routed {
                    self.log(&format!("cannot route MSI-X vector {vector}: {err}"));
                    continue;
                }
                if self.queues[i].irqfd_gsi.is_none() {
                    match self.vm.register_irqfd(&self.queues[i].call, gsi) {
                        Ok(()) => self.queues[i].irqfd_gsi = Some(gsi),
                        Err(err) => {
                            self.log(&format!("cannot bind queue {i} to vector {vector}: {err}"))
                        }
                    }
                }
                // An interrupt that arrived while masked is delivered now.
                if std::mem::take(&mut self.queues[i].pending) {
                    let _ = self.queues[i].call.write(1);
                }
            }
        }
    }

    fn common_read(&mut self, offset: u64) -> u64 {
        let q = self.queues.get(usize::from(self.queue_select));
        match offset {
            0x00 => u64::from(self.dfselect),
            0x04 => match self.dfselect {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.gfselect),
            0x0c => match self.gfselect {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map(|q| u64::from(q.size)).unwrap_or(0),
            0x1a => q
                .map(|q| u64::from(q.vector))
                .unwrap_or(u64::from(NO_VECTOR)),
            0x1c => q.map(|q| u64::from(q.enable)).unwrap_or(0),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map(|q| q.desc).unwrap_or(0),
            0x24 => q.map(|q| q.desc >> 32).unwrap_or(0),
            0x28 => q.map(|q| q.avail).unwrap_or(0),
            0x2c => q.map(|q| q.avail >> 32).unwrap_or(0),
            0x30 => q.map(|q| q.used).unwrap_or(0),
            0x34 => q.map(|q| q.used >> 32).unwrap_or(0),
            _ => 0,
        }
    }

    fn common_write(&mut self, offset: u64, value: u64) {
        let qs = usize::from(self.queue_select);
        let set_lo = |old: u64, v: u64| (old & !0xffff_ffff) | (v & 0xffff_ffff);
        let set_hi = |old: u64, v: u64| (old & 0xffff_ffff) | (v << 32);
        match offset {
            0x00 => self.dfselect = value as u32,
            0x08 => self.gfselect = value as u32,
            0x0c => match self.gfselect {
                0 => {
                    self.driver_features =
                        set_lo(self.driver_features, value) & self.device_features
                }
                1 => {
                    self.driver_features =
                        set_hi(self.driver_features, value) & self.device_features
                }
                _ => {}
            },
            0x10 => self.config_vector = value as u16,
            0x14 => self.write_status(value as u8),
            0x16 => self.queue_select = value as u16,
            _ => {
                if self.status & 0x04 != 0 && offset >= 0x18 {
                    // Queue layout is frozen once DRIVER_OK is set.
                    if offset == 0x1a {
                        if let Some(q) = self.queues.get_mut(qs) {
                            q.vector = value as u16;
                        }
                        self.update_interrupts();
                    }
                    return;
                }
                let Some(q) = self.queues.get_mut(qs) else {
                    return;
                };
                match offset {
                    0x18 => q.size = (value as u16).clamp(1, MAX_QUEUE_SIZE),
                    0x1a => q.vector = value as u16,
                    0x1c => q.enable = value & 1 == 1,
                    0x20 => q.desc = set_lo(q.desc, value),
                    0x24 => q.desc = set_hi(q.desc, value),
                    0x28 => q.avail = set_lo(q.avail, value),
                    0x2c => q.avail = set_hi(q.avail, value),
                    0x30 => q.used = set_lo(q.used, value),
                    0x34 => q.used = set_hi(q.used, value),
                    _ => {}
                }
            }
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let was_ok = self.status & 0x04 != 0;
        self.status = status;
        if status & 0x04 != 0 && !was_ok {
            // The worker brings the rings up; the vCPU goes on at once. The guest's
            // notifications meanwhile wait in the kick eventfds.
            self.epoch += 1;
            let queued = match self.make_plan() {
                Ok(plan) => self.submit(Job::Activate(plan)),
                Err(e) => {
                    self.log(&format!("activation failed: {e}"));
                    false
                }
            };
            if !queued {
                self.needs_reset();
            }
        }
    }

    fn msix_read(&mut self, offset: u64) -> u32 {
        if offset >= MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET {
            // PBA: a masked vector whose eventfd fired is pending.
            let mut bits = 0u32;
            for q in &mut self.queues {
                if q.irqfd_gsi.is_none() && q.vector != NO_VECTOR && q.call.read().is_ok() {
                    q.pending = true;
                }
                if q.pending && q.vector < 32 {
                    bits |= 1 << q.vector;
                }
            }
            return bits;
        }
        let (index, field) = ((offset / 16) as usize, offset % 16);
        let Some(e) = self.msix.get(index) else {
            return 0;
        };
        match field {
            0 => e.addr as u32,
            4 => (e.addr >> 32) as u32,
            8 => e.data,
            12 => u32::from(e.masked),
            _ => 0,
        }
    }

    fn msix_write(&mut self, offset: u64, value: u32) {
        let (index, field) = ((offset / 16) as usize, offset % 16);
        let Some(e) = self.msix.get_mut(index) else {
            return;
        };
        match field {
            0 => e.addr = (e.addr & !0xffff_ffff) | u64::from(value),
            4 => e.addr = (e.addr & 0xffff_ffff) | (u64::from(value) << 32),
            8 => e.data = value,
            12 => e.masked = value & 1 == 1,
            _ => {}
        }
        if field == 12 || self.queues.iter().any(|q| usize::from(q.vector) == index) {
            self.update_interrupts();
        }
    }
}

/// Drains `dev` for a snapshot (its worker stops the backend's rings and waits for what it
/// had taken) and returns the transport state with the drain's report.
pub fn drain(dev: &Arc<Mutex<VhostUserPciDevice>>) -> Result<TransportState, VirtioPciError> {
    let (done, answer) = mpsc::channel();
    {
        let mut d = lock(dev);
        d.drained = true;
        if !d.submit(Job::Drain { done }) {
            return Err(worker_gone());
        }
    }
    let report = answer
        .recv_timeout(crate::vhost_link::DRAIN_DEADLINE + SETUP_DEADLINE)
        .map_err(|_| worker_gone())??;
    let mut state = lock(dev).transport_state();
    state.drain = Some(report);
    Ok(state)
}

/// Brings a drained device's rings up again on the same backend.
pub fn resume_after_drain(dev: &Arc<Mutex<VhostUserPciDevice>>) -> Result<(), VirtioPciError> {
    let (done, answer) = mpsc::channel();
    if !lock(dev).submit(Job::Resume { done }) {
        return Err(worker_gone());
    }
    let r = answer
        .recv_timeout(RESTORE_DEADLINE)
        .map_err(|_| worker_gone())?;
    lock(dev).drained = false;
    r
}

/// Gives a freshly connected device (worker started, guest not yet running) the transport
/// state of a snapshot and, if its rings were up, brings its backend's rings up where the
/// snapshot's used rings say, with the saved in-flight region; waits for that.
pub fn restore(
    dev: &Arc<Mutex<VhostUserPciDevice>>,
    state: &TransportState,
) -> Result<(), VirtioPciError> {
    let job = lock(dev).restore_transport(state)?;
    let Some((plan, inflight)) = job else {
        return Ok(());
    };
    let (done, answer) = mpsc::channel();
    if !lock(dev).submit(Job::Restore {
        plan,
        inflight,
        done,
    }) {
        return Err(worker_gone());
    }
    answer
        .recv_timeout(RESTORE_DEADLINE)
        .map_err(|_| worker_gone())?
}

fn worker_gone() -> VirtioPciError {
    VirtioPciError::EventFd(std::io::Error::other(
        "the device's worker ended or did not answer in time",
    ))
}

fn mismatch(what: String) -> VirtioPciError {
    VirtioPciError::EventFd(std::io::Error::other(what))
}

impl VhostUserPciDevice {
    /// The transport registers, for a snapshot (no drain report).
    pub fn transport_state(&self) -> TransportState {
        TransportState {
            name: self.name.clone(),
            device_type: self.device_type,
            config: self.cfg.regs(),
            device_features: self.device_features,
            driver_features: self.driver_features,
            dfselect: self.dfselect,
            gfselect: self.gfselect,
            status: self.status,
            generation: self.generation,
            queue_select: self.queue_select,
            config_vector: self.config_vector,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    size: q.size,
                    enable: q.enable,
                    vector: q.vector,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    pending: q.pending,
                })
                .collect(),
            msix: self
                .msix
                .iter()
                .map(|e| (e.addr, e.data, e.masked))
                .collect(),
            msix_enabled: self.msix_enabled,
            msix_masked: self.msix_masked,
            active: self.active,
            drain: None,
        }
    }

    /// Puts `s` back; returns the job that brings the rings up, if they were up.
    #[allow(clippy::type_complexity)]
    fn restore_transport(
        &mut self,
        s: &TransportState,
    ) -> Result<Option<(Plan, Option<crate::vhost_link::InflightSnapshot>)>, VirtioPciError> {
        if s.name != self.name || s.device_type != self.device_type {
            return Err(mismatch(format!(
                "the snapshot's device {} (type {}) is not {} (type {})",
                s.name, s.device_type, self.name, self.device_type
            )));
        }
        if s.queues.len() != self.queues.len() || s.msix.len() != self.msix.len() {
            return Err(mismatch(format!(
                "the snapshot's device has {} queues, its new backend {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let missing = s.driver_features & !self.device_features;
        if missing != 0 {
            return Err(mismatch(format!(
                "the new backend lacks negotiated features {missing:#x}"
            )));
        }
        if !self.cfg.set_regs(&s.config) {
            return Err(mismatch("PCI config space size".into()));
        }
        self.driver_features = s.driver_features;
        self.dfselect = s.dfselect;
        self.gfselect = s.gfselect;
        self.status = s.status;
        self.generation = s.generation;
        self.queue_select = s.queue_select;
        self.config_vector = s.config_vector;
        for (q, saved) in self.queues.iter_mut().zip(&s.queues) {
            q.size = saved.size.clamp(1, MAX_QUEUE_SIZE);
            q.enable = saved.enable;
            q.vector = saved.vector;
            q.desc = saved.desc;
            q.avail = saved.avail;
            q.used = saved.used;
            q.pending = saved.pending;
        }
        for (e, &(addr, data, masked)) in self.msix.iter_mut().zip(&s.msix) {
            *e = MsixEntry { addr, data, masked };
        }
        self.msix_enabled = s.msix_enabled;
        self.msix_masked = s.msix_masked;
        let bar = if self.cfg.memory_enabled() {
            self.cfg.bar_addr(0)
        } else {
            0
        };
        self.register_notifiers(bar)?;
        if !s.active {
            return Ok(None);
        }
        self.epoch += 1;
        let plan = self.make_plan().map_err(VirtioPciError::EventFd)?;
        let inflight = s.drain.as_ref().and_then(|d| d.inflight.clone());
        Ok(Some((plan, inflight)))
    }
}

/// Moves `dev` to the backend at the other end of `stream` (a restart or upgrade): the
/// device's worker replays the setup, and the rings resume where the guest's used rings
/// say; waits for the worker's answer. vCPUs are not held meanwhile.
pub fn reconnect(
    dev: &Arc<Mutex<VhostUserPciDevice>>,
    stream: UnixStream,
) -> Result<(), VirtioPciError> {
    let (done, answer) = mpsc::channel();
    if !lock(dev).submit(Job::Reconnect { stream, done }) {
        return Err(VirtioPciError::EventFd(std::io::Error::other(
            "the device has no worker",
        )));
    }
    answer.recv().unwrap_or_else(|_| {
        Err(VirtioPciError::EventFd(std::io::Error::other(
            "the device's worker ended",
        )))
    })
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn to_u64(data: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    let n = data.len().min(8);
    raw[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(raw)
}

fn from_u64(value: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0);
    }
}

impl PciDevice for VhostUserPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.cfg
    }

    fn config_write(&mut self, reg: usize, value: u32, mask: u32) {
        self.cfg.write(reg, value, mask);
        if (4..=5).contains(&reg) || reg == 1 {
            let bar = if self.cfg.memory_enabled() {
                self.cfg.bar_addr(0)
            } else {
                0
            };
            if let Err(e) = self.register_notifiers(bar) {
                self.log(&format!("cannot move the notify area: {e}"));
            }
        }
        if reg == 0x84 / 4 {
            let control = self.cfg.read(reg) >> 16;
            self.msix_enabled = control & 0x8000 != 0;
            self.msix_masked = control & 0x4000 != 0;
            self.update_interrupts();
        }
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        let value = match offset {
            o if o < ISR_OFFSET => self.common_read(o),
            // No INTx: the ISR never has a bit set.
            o if o < DEVICE_CFG_OFFSET => 0,
            o if o < NOTIFY_OFFSET => {
                let start = (o - DEVICE_CFG_OFFSET) as usize;
                let mut v = 0u64;
                for i in 0..data.len().min(8) {
                    v |= u64::from(self.device_config.get(start + i).copied().unwrap_or(0))
                        << (8 * i);
                }
                v
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + 0x8000).contains(&o) => {
                u64::from(self.msix_read(o - MSIX_TABLE_OFFSET))
            }
            _ => 0,
        };
        from_u64(value, data);
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        let value = to_u64(data);
        match offset {
            o if o < ISR_OFFSET => self.common_write(o, value),
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Normally the ioeventfd catches these; a write that reaches us (e.g. before
                // registration) still kicks the queue.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(q) = self.queues.get(q) {
                    let _ = q.kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + 0x8000).contains(&o) => {
                self.msix_write(o - MSIX_TABLE_OFFSET, value as u32);
                if data.len() == 8 {
                    self.msix_write(o - MSIX_TABLE_OFFSET + 4, (value >> 32) as u32);
                }
            }
            _ => {}
        }
    }
}
