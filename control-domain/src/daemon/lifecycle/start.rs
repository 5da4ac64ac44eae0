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
use bulkhead_ipc::runner::{BootSpec, RunnerCommand, RunnerEvent};
use bulkhead_ipc::{Channel, Listener};

use crate::daemon::spawn::{self, RunnerSandbox};
use crate::daemon::supervisor::BackendLaunch;
use crate::daemon::vm::VmEntry;
use crate::daemon::{log, network, Daemon};

impl Daemon {
    /// Spawns a VM's device backends, then its runner; seals the runner and boots it. Also
    /// starts a VM again in place after its guest rebooted ([`super::reboot`]).
    pub(super) fn start(&self, vm: &Arc<VmEntry>, backend_uids: &[u32]) -> Result<String, String> {
        let (disk_count, nic_count) = vm.read(|r| (r.spec.disks.len(), r.spec.nics.len()));
        let mut uids = backend_uids.iter().copied();
        let mut disk_socks = Vec::new();
        for i in 0..disk_count {
            let uid = uids.next().ok_or("no uid for a disk backend")?;
            let launch = self.disk_launch(vm, i, uid)?;
            disk_socks.push(
                self.supervisor
                    .start_device(vm, &format!("disk{i}"), launch)?,
            );
        }
        let mut nic_socks = Vec::new();
        for i in 0..nic_count {
            let uid = uids.next().ok_or("no uid for a NIC backend")?;
            let launch = self.nic_launch(vm, i, uid)?;
            nic_socks.push(
                self.supervisor
                    .start_device(vm, &format!("nic{i}"), launch)?,
            );
        }
        let (ch, pidfd) = self.spawn_runner(vm)?;
        let detail = self.boot(vm, &ch, &disk_socks, &nic_socks)?;
        vm.set_state(VmState::Running);
        vm.attach(ch, pidfd)
            .map_err(|e| format!("supervisor: {e}"))?;
        vm.count_boot();
        // Each disk gets a standby backend, started in the background once the guest runs.
        for i in 0..disk_count {
            self.supervisor.keep_standby(vm, &format!("disk{i}"));
        }
        Ok(detail)
    }

    /// Disk `index`'s backend: `bulkhead-blk` holding only the opened image.
    fn disk_launch(&self, vm: &VmEntry, index: usize, uid: u32) -> Result<BackendLaunch, String> {
        let disk = vm.read(|r| r.spec.disks[index].clone());
        let image = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.readonly)
            .open(&disk.path)
            .map_err(|e| format!("disk{index} image {}: {e}", disk.path.display()))?;
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
        Ok(BackendLaunch {
            binary: self.cfg.blk.clone(),
            args,
            resource: OwnedFd::from(image),
            uid,
            policy: disk.restart_policy(),
        })
    }

    /// NIC `index`'s backend: its tap, created here on its network's bridge, and
    /// `bulkhead-net` holding only that tap.
    fn nic_launch(&self, vm: &VmEntry, index: usize, uid: u32) -> Result<BackendLaunch, String> {
        let (nic, id) = vm.read(|r| (r.spec.nics[index].clone(), r.id));
        let device = format!("nic{index}");
        let net = self.policy.check_network(&vm.name, &nic.network)?;
        network::ensure_bridge(&net.bridge, net.address.as_deref())
            .map_err(|e| format!("{device}: {e}"))?;
        let tap_name = format!("bh{id}n{index}");
        let tap =
            network::open_tap(&tap_name, &net.bridge).map_err(|e| format!("{device}: {e}"))?;
        log(&format!(
            "VM '{}': {device} is tap {tap_name} on bridge {}",
            vm.name, net.bridge
        ));
        let mac = nic
            .mac
            .clone()
            .unwrap_or_else(|| network::default_mac(id, index));
        Ok(BackendLaunch {
            binary: self.cfg.net.clone(),
            args: vec!["--tap-fd".into(), "4".into(), "--mac".into(), mac],
            resource: OwnedFd::from(tap),
            uid,
            policy: nic.restart_policy(),
        })
    }

    /// Spawns the VM's runner in its sandbox, waits for its hello and seals its root;
    /// returns its control channel and its pidfd.
    fn spawn_runner(&self, vm: &VmEntry) -> Result<(Channel, Option<OwnedFd>), String> {
        let (uid, vcpus) = vm.read(|r| (r.runner_uid, r.spec.vcpus));
        let uid = uid.ok_or("no runner uid")?;
        let sock = self.state.socket_path(&vm.name);
        let listener =
            Listener::bind(&sock).map_err(|e| format!("control socket {}: {e}", sock.display()))?;
        let log_file =
            File::create(self.state.log_path(&vm.name)).map_err(|e| format!("runner log: {e}"))?;
        let sandbox = RunnerSandbox {
            uid,
            vcpus,
            hostname: format!("bulkhead-{}", vm.name),
            selftest: self.cfg.runner_selftest,
        };
        let pid = spawn::spawn_runner(&self.cfg.runner, listener.into_fd(), log_file, &sandbox)
            .map_err(|e| format!("cannot spawn {}: {e}", self.cfg.runner.display()))?;
        vm.update(|r| r.runner_pid = Some(pid));
        vm.save();
        let pidfd = spawn::pidfd_open(pid).ok();
        let ch = Channel::connect(&sock).map_err(|e| format!("cannot reach the runner: {e}"))?;
        client_hello(&ch, Role::Daemon, Duration::from_secs(30)).map_err(|e| {
            format!(
                "runner did not start: {e} (see {})",
                self.state.log_path(&vm.name).display()
            )
        })?;
        spawn::seal_root(pid, &self.state.sandbox_root()).map_err(|e| e.to_string())?;
        Ok((ch, pidfd))
    }

    /// Hands the runner its resources and boots the guest; returns the runner's words.
    fn boot(
        &self,
        vm: &VmEntry,
        ch: &Channel,
        disk_socks: &[UnixStream],
        nic_socks: &[UnixStream],
    ) -> Result<String, String> {
        let spec = vm.read(|r| r.spec.clone());
        let memfd = create_guest_memfd(spec.memory).map_err(|e| format!("guest RAM: {e}"))?;
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("/dev/kvm: {e}"))?;
        let kernel = File::open(&spec.kernel)
            .map_err(|e| format!("kernel {}: {e}", spec.kernel.display()))?;
        let initrd = match &spec.initrd {
            Some(p) => Some(File::open(p).map_err(|e| format!("initrd {}: {e}", p.display()))?),
            None => None,
        };
        let boot = RunnerCommand::Boot(BootSpec {
            cmdline: spec.cmdline.clone(),
            vcpus: spec.vcpus,
            has_initrd: initrd.is_some(),
            kernel_name: spec.kernel.display().to_string(),
            disks: (0..disk_socks.len()).map(|i| format!("disk{i}")).collect(),
            nics: (0..nic_socks.len()).map(|i| format!("nic{i}")).collect(),
            cpu_template: cpu_template(&vm.name, &spec.cpu_template),
        });
        let mut fds = vec![kvm.as_fd(), memfd.as_fd(), kernel.as_fd()];
        if let Some(i) = &initrd {
            fds.push(i.as_fd());
        }
        fds.extend(disk_socks.iter().map(|s| s.as_fd()));
        fds.extend(nic_socks.iter().map(|s| s.as_fd()));
        ch.send(&boot, &fds)
            .map_err(|e| format!("sending Boot: {e}"))?;
        // Guest output (and, for a very short guest, its exit) may overtake `Started`.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (event, _) = ch
                .recv_timeout::<RunnerEvent>(left)
                .map_err(|e| format!("no answer to Boot: {e}"))?;
            match event {
                RunnerEvent::Started { detail } => return Ok(detail),
                RunnerEvent::BootFailed { message } => return Err(message),
                RunnerEvent::Console(data) => vm.console_output(&data),
                RunnerEvent::Exited(outcome) => vm.record_outcome(outcome),
                other => return Err(format!("unexpected answer to Boot: {other:?}")),
            }
        }
    }
}

/// Resolves `auto` to the template this host needs, and says why.
fn cpu_template(vm: &str, wanted: &str) -> String {
    if wanted != "auto" {
        return wanted.to_string();
    }
    let (t, why) = core_vmm::cpu_template::HostKind::detect().auto();
    log(&format!("VM '{vm}': CPU template {} ({why})", t.name));
    t.name.to_string()
}

/// Creates the guest-RAM memfd, sized and sealed.
fn create_guest_memfd(size: u64) -> std::io::Result<File> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(
        c"bulkhead-guest-ram",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let file = File::from(fd);
    file.set_len(size)?;
    core_vmm::memory::seal(&file)?;
    Ok(file)
}
