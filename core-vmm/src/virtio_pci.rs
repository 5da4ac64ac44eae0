//! A modern (virtio 1.x) PCI transport whose device is a vhost-user backend in another
//! process: feature negotiation and config space go through the vhost-user frontend; queue
//! notifications are ioeventfds handed to the backend as vring kicks, and completions are
//! the backend writing vring call eventfds that KVM injects as MSI-X interrupts (irqfd).
//! The data path never enters this process.
//!
//! A backend that offers `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` is asked for an in-flight
//! region once (GET_INFLIGHT_FD); this process keeps it and hands it to every backend that
//! serves the device afterwards (SET_INFLIGHT_FD), so a restarted backend resubmits what its
//! predecessor had taken but not completed. With a backend that lacks it, a reconnect
//! resumes each ring at the guest-visible used index, and the log says so.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupts::GsiRouter;
use crate::memory::GuestRam;
use crate::pci::{ConfigSpace, PciDevice};

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
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bits we pass through to the guest: device-specific ones, indirect descriptors,
/// event idx, and VERSION_1.
const TRANSPORT_FEATURES: u64 = 0x00ff_ffff | (1 << 28) | (1 << 29) | VIRTIO_F_VERSION_1;
const MAX_QUEUE_SIZE: u16 = 256;

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

/// How long a backend may take over a whole setup exchange (the handshake, or the replay
/// of features, memory table and vrings) before its connection is cut. The device lock —
/// and the runner thread that holds it: a vCPU, or the control channel — waits meanwhile.
pub const SETUP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Cuts a vhost-user connection (shutdown, both ways) unless disarmed by dropping it
/// before `SETUP_DEADLINE`. A socket receive timeout cannot do this: the vhost crate
/// retries a timed-out receive forever, so a backend that accepted and never answers
/// would hold the caller for good; a shut-down socket makes every wait on it end.
struct SetupDeadline {
    disarm: std::sync::mpsc::Sender<()>,
    fired: Arc<std::sync::atomic::AtomicBool>,
}

impl SetupDeadline {
    fn arm(sock: &UnixStream) -> Result<Self, VirtioPciError> {
        let sock = sock.try_clone().map_err(VirtioPciError::EventFd)?;
        let (disarm, armed) = std::sync::mpsc::channel::<()>();
        let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = fired.clone();
        std::thread::Builder::new()
            .name("setup-deadline".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    armed.recv_timeout(SETUP_DEADLINE)
                {
                    f.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
            })
            .map_err(VirtioPciError::EventFd)?;
        Ok(Self { disarm, fired })
    }

    /// Disarms the deadline; `result` becomes a [`VirtioPciError::SetupTimeout`] if it
    /// fired (the error the cut caused says less).
    fn finish<T>(
        self,
        what: &'static str,
        result: Result<T, VirtioPciError>,
    ) -> Result<T, VirtioPciError> {
        let Self { disarm, fired } = self;
        drop(disarm);
        if result.is_err() && fired.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(VirtioPciError::SetupTimeout { what });
        }
        result
    }
}

fn vu(what: &'static str) -> impl FnOnce(vhost::Error) -> VirtioPciError {
    move |source| VirtioPciError::VhostUser { what, source }
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

/// One virtio device on the PCI bus, served by a vhost-user backend.
pub struct VhostUserPciDevice {
    name: String,
    cfg: ConfigSpace,
    vm: Arc<VmFd>,
    router: Arc<Mutex<GsiRouter>>,
    ram: Arc<GuestRam>,
    frontend: Frontend,
    watch: UnixStream,
    device_type: u16,
    reconnects: u32,
    protocol: bool,
    /// The current backend keeps an in-flight log.
    inflight: bool,
    /// The device's in-flight region, kept across backends until the driver resets.
    inflight_region: Option<(VhostUserInflight, File)>,
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
    active: bool,
}

/// What a fresh vhost-user connection told us.
struct Handshake {
    frontend: Frontend,
    backend_features: u64,
    protocol: bool,
    inflight: bool,
    num_queues: u16,
    device_config: Vec<u8>,
    /// A second handle on the socket, to notice the backend going away.
    watch: UnixStream,
}

/// SET_OWNER, features, protocol features, queue count and config space.
fn handshake(stream: UnixStream, device_type: u16) -> Result<Handshake, VirtioPciError> {
    let watch = stream.try_clone().map_err(VirtioPciError::EventFd)?;
    let mut frontend = Frontend::from_stream(stream, 64);
    frontend.set_owner().map_err(vu("SET_OWNER"))?;
    let backend_features = frontend.get_features().map_err(vu("GET_FEATURES"))?;
    let mut protocol = false;
    let mut inflight = false;
    let mut num_queues = 1u16;
    let mut device_config = Vec::new();
    if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
        protocol = true;
        let offered = frontend
            .get_protocol_features()
            .map_err(vu("GET_PROTOCOL_FEATURES"))?;
        let wanted = offered
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        inflight = wanted.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        frontend
            .set_protocol_features(wanted)
            .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        if wanted.contains(VhostUserProtocolFeatures::MQ) {
            let n = frontend.get_queue_num().map_err(vu("GET_QUEUE_NUM"))?;
            num_queues = u16::try_from(n.clamp(1, 16)).unwrap_or(1);
        }
        if wanted.contains(VhostUserProtocolFeatures::CONFIG) {
            // virtio-blk's config is 60 bytes; virtio-net's is smaller.
            let len: u32 = if device_type == 2 { 60 } else { 12 };
            let buf = vec![0u8; len as usize];
            let (_, payload) = frontend
                .get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf)
                .map_err(vu("GET_CONFIG"))?;
            device_config = payload;
        }
    }
    Ok(Handshake {
        frontend,
        backend_features,
        protocol,
        inflight,
        num_queues,
        device_config,
        watch,
    })
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
        let Handshake {
            frontend,
            backend_features,
            protocol,
            inflight,
            num_queues,
            device_config,
            watch,
        } = {
            let deadline = SetupDeadline::arm(&stream)?;
            deadline.finish("handshake", handshake(stream, device_type))?
        };
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
            frontend,
            watch,
            device_type,
            reconnects: 0,
            protocol,
            inflight,
            inflight_region: None,
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

    /// How many times a new backend was connected.
    pub fn reconnects(&self) -> u32 {
        self.reconnects
    }

    /// Replaces a vanished (or upgraded) backend with the one at the other end of `stream`:
    /// replays the whole vhost-user setup and restarts each vring where the old backend
    /// stopped: each ring's base is the guest-visible used index, and a backend with an
    /// in-flight log resubmits from the kept region what its predecessor had taken but not
    /// completed (without one, those requests are redone from the used ring in avail
    /// order). Notifications the guest made meanwhile wait in the kick eventfds, and every
    /// ring is kicked once so the new backend looks at it.
    pub fn reconnect(&mut self, stream: UnixStream) -> Result<(), VirtioPciError> {
        let deadline = SetupDeadline::arm(&stream)?;
        let h = deadline.finish("handshake", handshake(stream, self.device_type))?;
        let missing = self.driver_features & !h.backend_features & !VIRTIO_F_VERSION_1;
        if missing != 0 {
            return Err(VirtioPciError::EventFd(std::io::Error::other(format!(
                "the new backend lacks negotiated features {missing:#x}"
            ))));
        }
        if usize::from(h.num_queues) < self.queues.len() || h.protocol != self.protocol {
            return Err(VirtioPciError::EventFd(std::io::Error::other(
                "the new backend serves fewer queues or another protocol",
            )));
        }
        self.frontend = h.frontend;
        self.watch = h.watch;
        self.inflight = h.inflight;
        self.reconnects += 1;
        if self.active && !self.inflight {
            self.log(
                "the new backend lacks VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: resuming from the used index, so requests the old backend had taken but not completed are redone in avail order",
            );
        }
        if self.active {
            let deadline = SetupDeadline::arm(&self.watch)?;
            deadline.finish("setup", self.activate(true))?;
            for q in &self.queues {
                let _ = q.kick.write(1);
            }
        }
        self.log(&format!(
            "backend reconnected (reconnect #{})",
            self.reconnects
        ));
        Ok(())
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

    /// Brings the backend up: features, memory table, every enabled vring. With `resume`,
    /// each vring starts where the guest-visible used ring says the last backend stopped.
    fn activate(&mut self, resume: bool) -> Result<(), VirtioPciError> {
        let features = self.driver_features
            | if self.protocol {
                VHOST_USER_F_PROTOCOL_FEATURES
            } else {
                0
            };
        self.frontend
            .set_features(features)
            .map_err(vu("SET_FEATURES"))?;
        let memfd = self.ram.memfd().as_raw_fd();
        let mut regions = Vec::new();
        for r in self.ram.regions() {
            let host = self
                .ram
                .mem()
                .get_host_address(GuestAddress(r.guest_addr))
                .map_err(|_| {
                    VirtioPciError::EventFd(std::io::Error::other("guest RAM not mapped"))
                })?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: host as u64,
                mmap_offset: r.file_offset,
                mmap_handle: memfd,
            });
        }
        self.frontend
            .set_mem_table(&regions)
            .map_err(vu("SET_MEM_TABLE"))?;
        self.hand_inflight_region()?;
        let host = |gpa: u64| -> Result<u64, VirtioPciError> {
            self.ram
                .mem()
                .get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| {
                    VirtioPciError::EventFd(std::io::Error::other(format!(
                        "vring address {gpa:#x} is outside guest RAM"
                    )))
                })
        };
        let mut plan = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.enable {
                continue;
            }
            plan.push((
                i,
                VringConfigData {
                    queue_max_size: MAX_QUEUE_SIZE,
                    queue_size: q.size,
                    flags: 0,
                    desc_table_addr: host(q.desc)?,
                    used_ring_addr: host(q.used)?,
                    avail_ring_addr: host(q.avail)?,
                    log_addr: None,
                },
            ));
        }
        for (i, data) in plan {
            let q = &self.queues[i];
            self.frontend
                .set_vring_num(i, q.size)
                .map_err(vu("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &data)
                .map_err(vu("SET_VRING_ADDR"))?;
            let base = if resume {
                // used->idx: the next avail entry the old backend had not completed.
                let idx: u16 = self
                    .ram
                    .mem()
                    .read_obj(GuestAddress(q.used + 2))
                    .map_err(|_| {
                        VirtioPciError::EventFd(std::io::Error::other(
                            "used ring outside guest RAM",
                        ))
                    })?;
                let how = if self.inflight_region.is_some() {
                    "; the backend resubmits what the in-flight region holds"
                } else {
                    ""
                };
                self.log(&format!(
                    "queue {i} resumes at index {idx} (from the used ring){how}"
                ));
                idx
            } else {
                0
            };
            self.frontend
                .set_vring_base(i, base)
                .map_err(vu("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &q.call)
                .map_err(vu("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &q.kick)
                .map_err(vu("SET_VRING_KICK"))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(vu("SET_VRING_ENABLE"))?;
            }
        }
        self.active = true;
        self.update_interrupts();
        Ok(())
    }

    /// Hands the backend the device's in-flight region, asking for one first if the device
    /// has none yet. A backend without the feature gets none, and the region is dropped: a
    /// later backend must not resubmit marks that this one's completions made stale.
    fn hand_inflight_region(&mut self) -> Result<(), VirtioPciError> {
        if !self.inflight {
            self.inflight_region = None;
            return Ok(());
        }
        if self.inflight_region.is_none() {
            let ask = VhostUserInflight {
                num_queues: self.queues.len() as u16,
                queue_size: MAX_QUEUE_SIZE,
                ..Default::default()
            };
            let (info, file) = self
                .frontend
                .get_inflight_fd(&ask)
                .map_err(vu("GET_INFLIGHT_FD"))?;
            if info.mmap_size == 0 {
                self.log("the backend returned no in-flight region; a restart resumes from the used index");
                return Ok(());
            }
            self.log(&format!(
                "in-flight region: {} bytes for {} queues",
                info.mmap_size, info.num_queues
            ));
            self.inflight_region = Some((info, file));
        }
        if let Some((info, file)) = &self.inflight_region {
            self.frontend
                .set_inflight_fd(info, file.as_raw_fd())
                .map_err(vu("SET_INFLIGHT_FD"))?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        // A reset driver starts over: nothing the old region holds is to be resubmitted.
        self.inflight_region = None;
        if self.active {
            for i in 0..self.queues.len() {
                if self.queues[i].enable {
                    if self.protocol {
                        let _ = self.frontend.set_vring_enable(i, false);
                    }
                    let _ = self.frontend.get_vring_base(i);
                }
            }
        }
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
            let r = SetupDeadline::arm(&self.watch)
                .and_then(|deadline| deadline.finish("setup", self.activate(false)));
            if let Err(e) = r {
                self.log(&format!("activation failed: {e}"));
                self.status |= 0x40; // DEVICE_NEEDS_RESET
                self.generation = self.generation.wrapping_add(1);
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
