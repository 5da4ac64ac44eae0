//! Starting a created VM: each device's backend (through the supervisor), then the runner
//! in its sandbox, handed `/dev/kvm`, the sealed guest-RAM memfd, the kernel, the initrd
//! and the devices' connections as fds, and booted. The privileged steps of a create are
//! here, each a deliberate line: opening images and `/dev/kvm`, creating taps.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_ipc::control::VmState;
use bulkhead_ipc::hello::{client_hello, Role};
use bulkhead_ipc::runner::{BootSpec, RunnerCommand, RunnerEvent, RunnerMessage, RunnerRequest};
use bulkhead_ipc::{Channel, Listener};

use crate::daemon::images::open_beneath;
use crate::daemon::spawn::{self, RunnerSandbox};
use crate::daemon::supervisor::BackendLaunch;
use crate::daemon::vm::VmEntry;
use crate::daemon::vmconfig::VmSpec;
use crate::daemon::{log, network, Daemon};

/// How long each step of a start took, for the log line that says the VM started.
#[derive(Default)]
struct StartTimes {
    steps: Vec<(&'static str, Duration)>,
    last: Option<std::time::Instant>,
}

impl StartTimes {
    fn begin() -> Self {
        Self {
            steps: Vec::new(),
            last: Some(std::time::Instant::now()),
        }
    }

    /// Ends step `name` now.
    fn step(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        if let Some(t) = self.last.replace(now) {
            self.steps.push((name, now - t));
        }
    }

    fn summary(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let total: Duration = self.steps.iter().map(|(_, d)| *d).sum();
        let parts: Vec<String> = self
            .steps
            .iter()
            .map(|(n, d)| format!("{n} {:.1}", ms(*d)))
            .collect();
        format!("in {:.1} ms ({})", ms(total), parts.join(", "))
    }
}

/// The host files a VM config names, opened once (by [`Daemon::open_host_files`]) and
/// from then on passed on as descriptors, never looked up by path again.
pub(crate) struct HostFiles {
    kernel: File,
    initrd: Option<File>,
    disks: Vec<OwnedFd>,
}

impl Daemon {
    /// Opens `spec`'s kernel, initrd and disk images beneath the policy's allowed
    /// directories ([`open_beneath`]), and sets their paths in `spec` to where they were
    /// found. An error is one line for the user.
    pub(crate) fn open_host_files(&self, spec: &mut VmSpec) -> Result<HostFiles, String> {
        let dirs = &self.policy.image_dirs;
        let kernel = open_beneath(dirs, "kernel", &spec.kernel, false)?;
        spec.kernel = kernel.path;
        let initrd = match &spec.initrd {
            Some(p) => {
                let i = open_beneath(dirs, "initrd", p, false)?;
                spec.initrd = Some(i.path);
                Some(i.file)
            }
            None => None,
        };
        let mut disks = Vec::new();
        for (i, d) in spec.disks.iter_mut().enumerate() {
            let img = open_beneath(dirs, &format!("disk{i} image"), &d.path, !d.readonly)?;
            d.path = img.path;
            disks.push(OwnedFd::from(img.file));
        }
        Ok(HostFiles {
            kernel: kernel.file,
            initrd,
            disks,
        })
    }

    /// Spawns a VM's device backends, then its runner; seals the runner and boots it. Also
    /// starts a VM again in place after its guest rebooted ([`super::reboot`]).
    pub(super) fn start(
        &self,
        vm: &Arc<VmEntry>,
        backend_uids: &[u32],
        files: HostFiles,
    ) -> Result<String, String> {
        self.start_with(vm, backend_uids, files, None)
    }

    /// [`Self::start`], or with `restore` the runner creates the VM from a snapshot's state
    /// instead of booting it (the kernel and initrd in `files` are then not used).
    pub(super) fn start_with(
        &self,
        vm: &Arc<VmEntry>,
        backend_uids: &[u32],
        files: HostFiles,
        restore: Option<super::snapshot::RestoreInput>,
    ) -> Result<String, String> {
        let (disk_count, nic_count) = vm.read(|r| (r.spec.disks.len(), r.spec.nics.len()));
        if files.disks.len() != disk_count {
            return Err(format!(
                "{} disk images opened for {disk_count} disks",
                files.disks.len()
            ));
        }
        let HostFiles {
            kernel,
            initrd,
            disks,
        } = files;
        let mut times = StartTimes::begin();
        let mut uids = backend_uids.iter().copied();
        let mut uid = || uids.next().ok_or("no uid for a device backend");
        let mut disk_socks = Vec::new();
        for (i, image) in disks.into_iter().enumerate() {
            let launch = self.disk_launch_with(vm, i, uid()?, Some(image), None)?;
            disk_socks.push(
                self.supervisor
                    .start_device(vm, &format!("disk{i}"), launch)?,
            );
        }
        let nic_socks = (0..nic_count)
            .map(|i| {
                let launch = self.nic_launch(vm, i, uid()?)?;
                self.supervisor.start_device(vm, &format!("nic{i}"), launch)
            })
            .collect::<Result<Vec<_>, String>>()?;
        times.step("devices");
        let (ch, pidfd) = self.spawn_runner(vm, &mut times)?;
        let detail = match restore {
            None => self.boot(vm, &ch, (&kernel, initrd.as_ref()), &disk_socks, &nic_socks)?,
            Some(input) => self.boot_from_snapshot(vm, &ch, &disk_socks, &nic_socks, input)?,
        };
        times.step("boot");
        // A restored VM that was saved paused comes back paused.
        let paused = detail.contains(bulkhead_ipc::runner::RESTORED_PAUSED);
        vm.set_state(if paused {
            VmState::Paused
        } else {
            VmState::Running
        });
        self.supervisor.booted(vm);
        vm.attach(ch, pidfd)
            .map_err(|e| format!("supervisor: {e}"))?;
        vm.count_boot();
        // Each device gets a standby backend, started in the background once the guest runs.
        let devices = (0..disk_count)
            .map(|i| format!("disk{i}"))
            .chain((0..nic_count).map(|i| format!("nic{i}")));
        for device in devices {
            self.supervisor.keep_standby(vm, &device);
        }
        times.step("attach");
        Ok(format!("{detail}; started {}", times.summary()))
    }

    /// Disk `index`'s backend: `bulkhead-blk` holding only the image, already open
    /// (`image`) or opened here beneath the allowed directories (a re-adopted VM's
    /// backend that died while `bulkheadd` was down), and the device's counters page kept
    /// (`stats`), or made here.
    pub(super) fn disk_launch_with(
        &self,
        vm: &VmEntry,
        index: usize,
        uid: u32,
        image: Option<OwnedFd>,
        stats: Option<OwnedFd>,
    ) -> Result<BackendLaunch, String> {
        let disk = vm.read(|r| r.spec.disks[index].clone());
        let image = match image {
            Some(fd) => fd,
            None => OwnedFd::from(
                open_beneath(
                    &self.policy.image_dirs,
                    &format!("disk{index} image"),
                    &disk.path,
                    !disk.readonly,
                )?
                .file,
            ),
        };
        let mut args: Vec<String> = vec!["--image-fd".into(), "4".into()];
        if disk.readonly {
            args.push("--readonly".into());
        }
        if let Some(serial) = &disk.serial {
            args.push("--serial".into());
            args.push(serial.clone());
        }
        args.push("--queues".into());
        args.push(disk.queues.unwrap_or(1).to_string());
        // Only when not the default, so a binary from before `--cache` can still serve
        // (device-upgrade to an older bulkhead-blk) a disk that does not ask for it.
        if disk.cache != crate::daemon::vmconfig::DiskCache::Writeback {
            args.push("--cache".into());
            args.push(disk.cache.as_str().into());
        }
        // Given, even 0 (never poll): the backend's own default is to poll adaptively.
        if let Some(us) = disk.poll_us {
            args.push("--poll-us".into());
            args.push(us.to_string());
        }
        let stats = match stats {
            Some(fd) => fd,
            None => bulkhead_ipc::devstats::create(&format!("{}-disk{index}", vm.name))
                .map_err(|e| format!("disk{index} counters: {e}"))?,
        };
        let limits = disk
            .limits
            .as_ref()
            .map_or(Ok(Default::default()), |l| l.resolve(true))
            .map_err(|e| format!("disk{index}: {e}"))?;
        Ok(BackendLaunch {
            binary: self.cfg.blk.clone(),
            args,
            resource: image,
            uid,
            policy: disk.restart_policy(),
            stats: Some(stats),
            limits,
        })
    }

    /// NIC `index`'s backend: its tap, created here on its network's bridge, and
    /// `bulkhead-net` holding only that tap.
    fn nic_launch(&self, vm: &VmEntry, index: usize, uid: u32) -> Result<BackendLaunch, String> {
        self.nic_launch_with(vm, index, uid, None, None)
    }

    /// [`Self::nic_launch`] with the tap already open and probed (`tap`, and whether it
    /// takes UFO), or created and probed here, and its counters page kept (`stats`), or
    /// made here.
    pub(super) fn nic_launch_with(
        &self,
        vm: &VmEntry,
        index: usize,
        uid: u32,
        tap: Option<(OwnedFd, bool)>,
        stats: Option<OwnedFd>,
    ) -> Result<BackendLaunch, String> {
        let (nic, id) = vm.read(|r| (r.spec.nics[index].clone(), r.id));
        let device = format!("nic{index}");
        let (tap, ufo) = match tap {
            Some(t) => t,
            None => {
                let net = self.policy.check_network(&vm.name, &nic.network)?;
                network::ensure_bridge(&net.bridge, net.address.as_deref())
                    .map_err(|e| format!("{device}: {e}"))?;
                let tap_name = format!("bh{id}n{index}");
                let tap = network::open_tap(&tap_name, &net.bridge)
                    .map_err(|e| format!("{device}: {e}"))?;
                log(&format!(
                    "VM '{}': {device} is tap {tap_name} on bridge {}",
                    vm.name, net.bridge
                ));
                // Probed once, here: its backends (a standby too) leave it as it is.
                let ufo = network::probe_tap(&tap).map_err(|e| format!("{device}: {e}"))?;
                (OwnedFd::from(tap), ufo)
            }
        };
        let mac = nic
            .mac
            .clone()
            .unwrap_or_else(|| network::default_mac(id, index));
        let stats = match stats {
            Some(fd) => fd,
            None => bulkhead_ipc::devstats::create(&format!("{}-{device}", vm.name))
                .map_err(|e| format!("{device} counters: {e}"))?,
        };
        let limits = nic
            .limits
            .as_ref()
            .map_or(Ok(Default::default()), |l| l.resolve(false))
            .map_err(|e| format!("{device}: {e}"))?;
        Ok(BackendLaunch {
            binary: self.cfg.net.clone(),
            args: vec![
                "--tap-fd".into(),
                "4".into(),
                "--mac".into(),
                mac,
                "--tap-probed".into(),
                if ufo { "ufo" } else { "no-ufo" }.into(),
            ],
            resource: tap,
            uid,
            policy: nic.restart_policy(),
            stats: Some(stats),
            limits,
        })
    }

    /// Spawns the VM's runner in its sandbox, waits for its hello and seals its root;
    /// returns its control channel and its pidfd.
    fn spawn_runner(
        &self,
        vm: &VmEntry,
        times: &mut StartTimes,
    ) -> Result<(Channel, Option<OwnedFd>), String> {
        let (uid, vcpus, memory, id) =
            vm.read(|r| (r.runner_uid, r.spec.vcpus, r.spec.memory, r.id));
        let uid = uid.ok_or("no runner uid")?;
        let sock = self.state.socket_path(&vm.name);
        let listener =
            Listener::bind(&sock).map_err(|e| format!("control socket {}: {e}", sock.display()))?;
        let log_file =
            File::create(self.state.log_path(&vm.name)).map_err(|e| format!("runner log: {e}"))?;
        let sandbox = RunnerSandbox {
            uid,
            vcpus,
            memory,
            // From the id: a name may be as long as a host name may be.
            hostname: format!("bulkhead-vm{id}"),
            selftest: self.cfg.runner_selftest,
        };
        let child = spawn::spawn_runner(&self.cfg.runner, listener.into_fd(), log_file, &sandbox)
            .map_err(|e| format!("cannot spawn {}: {e}", self.cfg.runner.display()))?;
        vm.update(|r| r.runner_pid = Some(child.pid));
        vm.save();
        times.step("spawn");
        let ch = Channel::connect(&sock).map_err(|e| format!("cannot reach the runner: {e}"))?;
        client_hello(&ch, Role::Daemon, Duration::from_secs(30)).map_err(|e| {
            format!(
                "runner did not start: {e} (see {})",
                self.state.log_path(&vm.name).display()
            )
        })?;
        times.step("hello");
        spawn::seal_root(child.pidfd.as_fd(), &self.state.sandbox_root())
            .map_err(|e| e.to_string())?;
        times.step("seal");
        Ok((ch, Some(child.pidfd)))
    }

    /// Hands the runner its resources and boots the guest; returns the runner's words.
    fn boot(
        &self,
        vm: &VmEntry,
        ch: &Channel,
        (kernel, initrd): (&File, Option<&File>),
        disk_socks: &[UnixStream],
        nic_socks: &[UnixStream],
    ) -> Result<String, String> {
        let spec = vm.read(|r| r.spec.clone());
        let memfd = create_guest_memfd(&vm.name, &spec).map_err(|e| e.to_string())?;
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("/dev/kvm: {e}"))?;
        let boot = RunnerCommand::Boot(BootSpec {
            cmdline: spec.cmdline.clone(),
            vcpus: spec.vcpus,
            has_initrd: initrd.is_some(),
            kernel_name: spec.kernel.display().to_string(),
            disks: (0..disk_socks.len()).map(|i| format!("disk{i}")).collect(),
            nics: (0..nic_socks.len()).map(|i| format!("nic{i}")).collect(),
            cpu_template: cpu_template(&vm.name, &spec.cpu_template),
            hang_timeouts_ms: spec
                .disks
                .iter()
                .map(|d| d.restart_policy().hang_timeout_ms)
                .chain(spec.nics.iter().map(|n| n.restart_policy().hang_timeout_ms))
                .collect(),
        });
        let mut fds = vec![kvm.as_fd(), memfd.as_fd(), kernel.as_fd()];
        if let Some(i) = initrd {
            fds.push(i.as_fd());
        }
        fds.extend(disk_socks.iter().map(|s| s.as_fd()));
        fds.extend(nic_socks.iter().map(|s| s.as_fd()));
        let id = vm.request_id();
        let boot = RunnerRequest { id, command: boot };
        ch.send(&boot, &fds)
            .map_err(|e| format!("sending Boot: {e}"))?;
        vm.set_guest_ram(memfd);
        await_started(vm, ch, id)
    }
}

/// Waits for the runner's answer to the Boot or Restore request `id`.
pub(super) fn await_started(vm: &VmEntry, ch: &Channel, id: u64) -> Result<String, String> {
    {
        // Guest output (and, for a very short guest, its exit) may overtake `Started`.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (msg, _) = ch
                .recv_timeout::<RunnerMessage>(left)
                .map_err(|e| format!("no answer to Boot: {e}"))?;
            match msg {
                RunnerMessage::Answer {
                    id: answered,
                    event: RunnerEvent::Started { detail },
                } if answered == id => return Ok(detail),
                RunnerMessage::Answer {
                    event: RunnerEvent::BootFailed { message },
                    ..
                } => return Err(message),
                RunnerMessage::Event(RunnerEvent::Console(data)) => vm.console_output(&data),
                RunnerMessage::Event(RunnerEvent::Exited(outcome)) => vm.record_outcome(outcome),
                other => return Err(format!("unexpected answer to Boot: {other:?}")),
            }
        }
    }
}

/// Resolves `auto` to the template this host needs, and says why.
pub(super) fn cpu_template(vm: &str, wanted: &str) -> String {
    if wanted != "auto" {
        return wanted.to_string();
    }
    let (t, why) = core_vmm::cpu_template::HostKind::detect().auto();
    log(&format!("VM '{vm}': CPU template {} ({why})", t.name));
    t.name.to_string()
}

/// Creates the guest-RAM memfd of `spec`, sized and sealed (huge pages all allocated).
pub(super) fn create_guest_memfd(
    vm: &str,
    spec: &VmSpec,
) -> Result<File, core_vmm::memory::MemoryError> {
    use core_vmm::memory::{create_memfd, RamBacking};
    let file = create_memfd(spec.memory, RamBacking::huge_if(spec.hugepages))?;
    if spec.hugepages {
        log(&format!(
            "VM '{vm}': guest RAM {} MiB in {} huge pages of 2 MiB",
            spec.memory >> 20,
            spec.memory / core_vmm::memory::HUGE_PAGE_SIZE
        ));
    }
    Ok(file)
}
