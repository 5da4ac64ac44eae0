//! A virtio device's link to its vhost-user backend, and the device's worker thread: the
//! only thread that talks to the backend. The transport ([`crate::virtio_pci`]) hands it
//! [`Job`]s — bring the rings up when the driver sets DRIVER_OK, stop them on a reset,
//! replay the setup to a new backend — and never waits for them, so no vCPU (and no control
//! command) waits on a backend, however slow or silent. Jobs run in the order given.
//!
//! A backend that offers `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` is asked for an in-flight
//! region once (GET_INFLIGHT_FD); the link keeps it and hands it to every backend that
//! serves the device afterwards (SET_INFLIGHT_FD), so a restarted backend resubmits what its
//! predecessor had taken but not completed. With a backend that lacks it, a reconnect
//! resumes each ring at the guest-visible used index, and the log says so.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex, Weak};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;
use crate::virtio_pci::{VhostUserPciDevice, VirtioPciError, MAX_QUEUE_SIZE};

/// How long a backend may take over a whole setup exchange (the handshake, or the replay
/// of features, memory table and vrings) before its connection is cut. Only the device's
/// worker waits meanwhile.
pub const SETUP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Cuts a vhost-user connection (shutdown, both ways) unless disarmed by dropping it
/// before `SETUP_DEADLINE`. A socket receive timeout cannot do this: the vhost crate
/// retries a timed-out receive forever, so a backend that accepted and never answers
/// would hold the caller for good; a shut-down socket makes every wait on it end.
struct SetupDeadline {
    disarm: mpsc::Sender<()>,
    fired: Arc<std::sync::atomic::AtomicBool>,
}

impl SetupDeadline {
    fn arm(sock: &UnixStream) -> Result<Self, VirtioPciError> {
        let sock = sock.try_clone().map_err(VirtioPciError::EventFd)?;
        let (disarm, armed) = mpsc::channel::<()>();
        let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = fired.clone();
        std::thread::Builder::new()
            .name("setup-deadline".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = armed.recv_timeout(SETUP_DEADLINE) {
                    f.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                }
            })
            .map_err(VirtioPciError::EventFd)?;
        Ok(Self { disarm, fired })
    }

    /// Runs `f` under a deadline on `sock`; its error becomes a
    /// [`VirtioPciError::SetupTimeout`] if the deadline fired (the error the cut caused
    /// says less).
    fn run<T>(
        sock: &UnixStream,
        what: &'static str,
        f: impl FnOnce() -> Result<T, VirtioPciError>,
    ) -> Result<T, VirtioPciError> {
        let Self { disarm, fired } = Self::arm(sock)?;
        let result = f();
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

/// What a fresh vhost-user connection told us.
pub struct Handshake {
    frontend: Frontend,
    /// The backend's virtio feature bits.
    pub backend_features: u64,
    /// It speaks the protocol-features extension.
    pub protocol: bool,
    inflight: bool,
    /// Queues it serves.
    pub num_queues: u16,
    /// Its device config space.
    pub device_config: Vec<u8>,
    /// A second handle on the socket: to cut it on a deadline, and to notice the backend
    /// going away.
    pub sock: UnixStream,
}

/// SET_OWNER, features, protocol features, queue count and config space, within
/// [`SETUP_DEADLINE`].
pub fn handshake(stream: UnixStream, device_type: u16) -> Result<Handshake, VirtioPciError> {
    let sock = stream.try_clone().map_err(VirtioPciError::EventFd)?;
    SetupDeadline::run(
        &sock.try_clone().map_err(VirtioPciError::EventFd)?,
        "handshake",
        || handshake_steps(stream, sock, device_type),
    )
}

fn handshake_steps(
    stream: UnixStream,
    sock: UnixStream,
    device_type: u16,
) -> Result<Handshake, VirtioPciError> {
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
        sock,
    })
}

/// One ring as the driver laid it out, with the eventfds the backend gets.
pub struct QueuePlan {
    /// Queue index.
    pub index: usize,
    /// Ring size.
    pub size: u16,
    /// Descriptor table, avail and used ring (guest-physical).
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Guest notifications (an ioeventfd) and completions (an irqfd).
    pub kick: EventFd,
    pub call: EventFd,
}

/// Everything the backend is set up with: the negotiated features and the enabled rings.
pub struct Plan {
    /// The transport's epoch when the plan was made: activation results of an older epoch
    /// (the driver reset meanwhile) are ignored.
    pub epoch: u64,
    /// Negotiated virtio features.
    pub driver_features: u64,
    /// The enabled rings.
    pub queues: Vec<QueuePlan>,
}

/// Work for a device's worker thread.
pub enum Job {
    /// The driver set DRIVER_OK: bring the backend's rings up from the start.
    Activate(Plan),
    /// The driver reset the device: stop these rings; the in-flight region is dropped (a
    /// reset driver starts over).
    Reset { queues: Vec<usize> },
    /// A new backend serves the device: replay the setup (the rings resume where the guest's
    /// used rings say), then answer.
    Reconnect {
        stream: UnixStream,
        done: mpsc::Sender<Result<(), VirtioPciError>>,
    },
    /// A snapshot is taken: stop every ring (GET_VRING_BASE), wait until the requests the
    /// backend had taken are completed, and answer each ring's base and the in-flight
    /// region's contents.
    Drain {
        done: mpsc::Sender<Result<DrainReport, VirtioPciError>>,
    },
    /// After a drain: bring the same backend's rings up again where they stopped.
    Resume {
        done: mpsc::Sender<Result<(), VirtioPciError>>,
    },
    /// A restored device: give the backend the saved in-flight region (if the device had
    /// one) and bring its rings up where the snapshot's used rings say.
    Restore {
        plan: Plan,
        inflight: Option<InflightSnapshot>,
        done: mpsc::Sender<Result<(), VirtioPciError>>,
    },
}

/// A device's in-flight region as a snapshot keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InflightSnapshot {
    /// Queues it covers.
    pub num_queues: u16,
    /// Ring size it was laid out for.
    pub queue_size: u16,
    /// Its bytes, sparse: a drained region is mostly zeros.
    pub bytes: crate::snapshot::inflight::SparseBytes,
}

/// What a drained device reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DrainReport {
    /// Each stopped ring and its base (GET_VRING_BASE: the next avail entry the backend
    /// would have taken).
    pub bases: Vec<(usize, u16)>,
    /// The in-flight region, if the device keeps one.
    pub inflight: Option<InflightSnapshot>,
}

/// How long a drain waits for the requests a backend had taken to complete.
pub const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// The device's vhost-user connection and what was agreed on it. Owned by the worker.
pub struct BackendLink {
    name: String,
    device_type: u16,
    ram: Arc<GuestRam>,
    num_queues: usize,
    frontend: Frontend,
    sock: UnixStream,
    protocol: bool,
    /// The current backend keeps an in-flight log.
    inflight: bool,
    /// The device's in-flight region, kept across backends until the driver resets.
    inflight_region: Option<(VhostUserInflight, File)>,
}

impl BackendLink {
    /// The link over a finished handshake.
    pub fn new(name: &str, device_type: u16, ram: Arc<GuestRam>, h: Handshake) -> Self {
        Self {
            name: name.to_string(),
            device_type,
            ram,
            num_queues: usize::from(h.num_queues),
            frontend: h.frontend,
            sock: h.sock,
            protocol: h.protocol,
            inflight: h.inflight,
            inflight_region: None,
        }
    }

    fn log(&self, msg: &str) {
        eprintln!("bulkhead-runner: {}: {msg}", self.name);
    }

    /// Runs the jobs for `device` until the transport is gone.
    pub fn serve(mut self, jobs: mpsc::Receiver<Job>, device: Weak<Mutex<VhostUserPciDevice>>) {
        while let Ok(job) = jobs.recv() {
            let Some(dev) = device.upgrade() else {
                return;
            };
            match job {
                Job::Activate(plan) => {
                    let epoch = plan.epoch;
                    let r = self.activate(&plan, false);
                    if let Err(e) = &r {
                        self.log(&format!("activation failed: {e}"));
                    }
                    lock(&dev).activated(epoch, r.is_ok());
                }
                Job::Reset { queues } => self.reset(&queues),
                Job::Reconnect { stream, done } => {
                    let r = self.reconnect(&dev, stream);
                    let _ = done.send(r);
                }
                Job::Drain { done } => {
                    let r = self.drain(&dev);
                    let _ = done.send(r);
                }
                Job::Resume { done } => {
                    let plan = lock(&dev).plan().1;
                    let r = match plan {
                        Some(plan) => self.activate(&plan, true).map(|()| kick_and_call(&plan)),
                        None => Ok(()),
                    };
                    let _ = done.send(r);
                }
                Job::Restore {
                    plan,
                    inflight,
                    done,
                } => {
                    let epoch = plan.epoch;
                    let r = self
                        .restore_inflight(inflight)
                        .and_then(|()| self.activate(&plan, true))
                        .map(|()| kick_and_call(&plan));
                    if let Err(e) = &r {
                        self.log(&format!("restore failed: {e}"));
                    }
                    lock(&dev).activated(epoch, r.is_ok());
                    let _ = done.send(r);
                }
            }
        }
    }

    /// Replaces a vanished (or upgraded) backend with the one at the other end of `stream`:
    /// replays the whole vhost-user setup and restarts each vring where the old backend
    /// stopped: each ring's base is the guest-visible used index, and a backend with an
    /// in-flight log resubmits from the kept region what its predecessor had taken but not
    /// completed (without one, those requests are redone from the used ring in avail
    /// order). Notifications the guest made meanwhile wait in the kick eventfds, and every
    /// ring is kicked once so the new backend looks at it.
    fn reconnect(
        &mut self,
        dev: &Arc<Mutex<VhostUserPciDevice>>,
        stream: UnixStream,
    ) -> Result<(), VirtioPciError> {
        let h = handshake(stream, self.device_type)?;
        // The driver's state now; the vCPU may change it meanwhile, and its jobs follow
        // this one.
        let (driver_features, plan) = lock(dev).plan();
        let missing =
            driver_features & !h.backend_features & !crate::virtio_pci::VIRTIO_F_VERSION_1;
        if missing != 0 {
            return Err(VirtioPciError::EventFd(std::io::Error::other(format!(
                "the new backend lacks negotiated features {missing:#x}"
            ))));
        }
        if usize::from(h.num_queues) < self.num_queues || h.protocol != self.protocol {
            return Err(VirtioPciError::EventFd(std::io::Error::other(
                "the new backend serves fewer queues or another protocol",
            )));
        }
        let watch = h.sock.try_clone().map_err(VirtioPciError::EventFd)?;
        self.frontend = h.frontend;
        self.sock = h.sock;
        self.inflight = h.inflight;
        if let Some(plan) = &plan {
            if !self.inflight {
                self.log(
                    "the new backend lacks VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: resuming from the used index, so requests the old backend had taken but not completed are redone in avail order",
                );
            }
            self.activate(plan, true)?;
            for q in &plan.queues {
                let _ = q.kick.write(1);
            }
        }
        let n = lock(dev).reconnected(watch);
        self.log(&format!("backend reconnected (reconnect #{n})"));
        Ok(())
    }

    /// Brings the backend up: features, memory table, every ring of `plan`. With `resume`,
    /// each vring starts where the guest-visible used ring says the last backend stopped.
    fn activate(&mut self, plan: &Plan, resume: bool) -> Result<(), VirtioPciError> {
        let sock = self.sock.try_clone().map_err(VirtioPciError::EventFd)?;
        SetupDeadline::run(&sock, "setup", || self.activate_steps(plan, resume))
    }

    fn activate_steps(&mut self, plan: &Plan, resume: bool) -> Result<(), VirtioPciError> {
        let features = plan.driver_features
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
        for q in &plan.queues {
            let data = VringConfigData {
                queue_max_size: MAX_QUEUE_SIZE,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc)?,
                used_ring_addr: host(q.used)?,
                avail_ring_addr: host(q.avail)?,
                log_addr: None,
            };
            let i = q.index;
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
                num_queues: self.num_queues as u16,
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

    /// Stops every ring for a snapshot and waits (up to [`DRAIN_DEADLINE`]) until the used
    /// ring holds every request the backend had taken; a NIC's receive rings are not waited
    /// on (buffers it took wait for packets, and are offered again from the used index).
    fn drain(
        &mut self,
        dev: &Arc<Mutex<VhostUserPciDevice>>,
    ) -> Result<DrainReport, VirtioPciError> {
        let Some(plan) = lock(dev).plan().1 else {
            return Ok(DrainReport {
                bases: Vec::new(),
                inflight: self.inflight_snapshot()?,
            });
        };
        let sock = self.sock.try_clone().map_err(VirtioPciError::EventFd)?;
        let bases = SetupDeadline::run(&sock, "drain", || {
            let mut bases = Vec::new();
            for q in &plan.queues {
                if self.protocol {
                    self.frontend
                        .set_vring_enable(q.index, false)
                        .map_err(vu("SET_VRING_ENABLE"))?;
                }
                let base = self
                    .frontend
                    .get_vring_base(q.index)
                    .map_err(vu("GET_VRING_BASE"))?;
                bases.push((q.index, u16::try_from(base & 0xffff).unwrap_or(0)));
            }
            Ok(bases)
        })?;
        let deadline = std::time::Instant::now() + DRAIN_DEADLINE;
        for (q, &(index, base)) in plan.queues.iter().zip(&bases) {
            if self.device_type == 1 && index % 2 == 0 {
                continue;
            }
            loop {
                let used: u16 =
                    self.ram
                        .mem()
                        .read_obj(GuestAddress(q.used + 2))
                        .map_err(|_| {
                            VirtioPciError::EventFd(std::io::Error::other(
                                "used ring outside guest RAM",
                            ))
                        })?;
                if used == base {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    return Err(VirtioPciError::EventFd(std::io::Error::other(format!(
                        "queue {index}: the backend took requests up to {base} but completed only up to {used} within {}s",
                        DRAIN_DEADLINE.as_secs()
                    ))));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        self.log(&format!("drained: vring bases {bases:?}"));
        Ok(DrainReport {
            bases,
            inflight: self.inflight_snapshot()?,
        })
    }

    /// The in-flight region's bytes, if the device keeps one.
    fn inflight_snapshot(&self) -> Result<Option<InflightSnapshot>, VirtioPciError> {
        use std::os::unix::fs::FileExt;
        let Some((info, file)) = &self.inflight_region else {
            return Ok(None);
        };
        let mut bytes = vec![0u8; usize::try_from(info.mmap_size).unwrap_or(0)];
        file.read_exact_at(&mut bytes, info.mmap_offset)
            .map_err(VirtioPciError::EventFd)?;
        Ok(Some(InflightSnapshot {
            num_queues: info.num_queues,
            queue_size: info.queue_size,
            bytes: crate::snapshot::inflight::SparseBytes::from_bytes(&bytes),
        }))
    }

    /// Asks the (new) backend for an in-flight region and fills it with `saved`.
    fn restore_inflight(&mut self, saved: Option<InflightSnapshot>) -> Result<(), VirtioPciError> {
        let Some(saved) = saved else {
            return Ok(());
        };
        if !self.inflight {
            self.log("the backend keeps no in-flight region; the snapshot's is not used (it was drained, so nothing was in flight)");
            return Ok(());
        }
        let ask = VhostUserInflight {
            num_queues: saved.num_queues,
            queue_size: saved.queue_size,
            ..Default::default()
        };
        let sock = self.sock.try_clone().map_err(VirtioPciError::EventFd)?;
        let (info, file) = SetupDeadline::run(&sock, "setup", || {
            self.frontend
                .get_inflight_fd(&ask)
                .map_err(vu("GET_INFLIGHT_FD"))
        })?;
        let bytes = saved.bytes.to_bytes().map_err(|e| {
            VirtioPciError::EventFd(std::io::Error::other(format!(
                "the snapshot's in-flight region: {e}"
            )))
        })?;
        if info.mmap_size as usize != bytes.len() {
            return Err(VirtioPciError::EventFd(std::io::Error::other(format!(
                "the backend's in-flight region is {} bytes, the snapshot's {}",
                info.mmap_size,
                bytes.len()
            ))));
        }
        crate::snapshot::inflight::write_region(&file, info.mmap_offset, &bytes)
            .map_err(VirtioPciError::EventFd)?;
        self.inflight_region = Some((info, file));
        Ok(())
    }

    /// Stops `queues` after a driver reset; nothing the old region holds is to be
    /// resubmitted.
    fn reset(&mut self, queues: &[usize]) {
        self.inflight_region = None;
        let Ok(sock) = self.sock.try_clone() else {
            return;
        };
        let _ = SetupDeadline::run(&sock, "reset", || {
            for &i in queues {
                if self.protocol {
                    let _ = self.frontend.set_vring_enable(i, false);
                }
                let _ = self.frontend.get_vring_base(i);
            }
            Ok(())
        });
    }
}

/// Every ring of `plan` is looked at once by the backend (a kick) and by the driver (a
/// call): a completion that landed while the rings were stopped had no one to tell.
fn kick_and_call(plan: &Plan) {
    for q in &plan.queues {
        let _ = q.kick.write(1);
        let _ = q.call.write(1);
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
