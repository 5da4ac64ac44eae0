//! One VM: created from a `/dev/kvm` fd, booted, and run on one thread per vCPU until the
//! guest resets, exits through the debug port, or fails.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{BootError, BootSetup, ImageFile};
use crate::config::{ConfigError, VmConfig};
use crate::cpu::{self, CpuError};
use crate::devices::{ConsoleOut, LegacyDevices, PioAction};
use crate::interrupts::GsiRouter;
use crate::layout::{ports, KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::{GuestRam, MemoryError};
use crate::pci::PciBus;
use crate::virtio_pci::{VhostUserPciDevice, BAR0_SIZE};

/// The kernel, initrd and command line to boot.
pub struct GuestImages<'a> {
    /// Kernel image.
    pub kernel: &'a mut ImageFile,
    /// Initrd.
    pub initrd: Option<&'a mut ImageFile>,
    /// Command line.
    pub cmdline: &'a str,
}

/// Which virtio device a vhost-user backend implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
}

impl DeviceKind {
    /// The virtio device type number.
    pub fn virtio_type(self) -> u16 {
        match self {
            DeviceKind::Block => 2,
            DeviceKind::Net => 1,
        }
    }
}

/// A device whose vhost-user backend is at the other end of `stream`.
pub struct DeviceBackend {
    /// Name for messages (`disk0`, `nic0`).
    pub name: String,
    /// What it is.
    pub kind: DeviceKind,
    /// Connected vhost-user socket.
    pub stream: std::os::unix::net::UnixStream,
}

/// vCPUs and the CPU template they get.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    /// vCPU count.
    pub vcpus: u8,
    /// CPUID edits.
    pub cpu_template: crate::cpu_template::CpuTemplate,
}

/// Exit status: the guest reset or powered off through the i8042 (a normal shutdown).
pub const EXIT_RESET: i32 = 0;
/// Exit status: the runner was given something it cannot run (bad config, kernel, ...).
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit status: a vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
pub const EXIT_TRIPLE_FAULT: i32 = 80;
/// Exit status: KVM could not run or emulate guest code (internal/emulation error).
pub const EXIT_EMULATION_FAILURE: i32 = 81;
/// Exit status: a vCPU thread failed (ioctl error, entry failure, unexpected exit).
pub const EXIT_VCPU_FAILURE: i32 = 82;
/// Exit status: the runner could not set the VM up (KVM refused a setup step).
pub const EXIT_SETUP_FAILURE: i32 = 83;

/// How long the vCPU threads get to stop once the VM is over.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest reset the machine through the i8042 (Linux `reboot=k`) or KVM reported a
    /// guest shutdown/reset system event.
    Reset,
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u8),
    /// A vCPU triple-faulted.
    TripleFault {
        /// vCPU index.
        vcpu: u8,
        /// Instruction pointer when it happened.
        rip: u64,
    },
    /// KVM reported an internal error, e.g. an instruction it cannot emulate.
    EmulationFailure {
        /// vCPU index.
        vcpu: u8,
        /// Instruction pointer.
        rip: u64,
        /// KVM's suberror, decoded.
        reason: String,
    },
    /// A vCPU thread could not go on.
    VcpuFailure {
        /// vCPU index.
        vcpu: u8,
        /// What went wrong.
        reason: String,
    },
}

impl VmOutcome {
    /// The runner's exit status for this outcome.
    pub fn exit_status(&self) -> i32 {
        match self {
            VmOutcome::Reset => EXIT_RESET,
            VmOutcome::DebugExit(v) => i32::from(*v),
            VmOutcome::TripleFault { .. } => EXIT_TRIPLE_FAULT,
            VmOutcome::EmulationFailure { .. } => EXIT_EMULATION_FAILURE,
            VmOutcome::VcpuFailure { .. } => EXIT_VCPU_FAILURE,
        }
    }

    /// True when the guest ended on purpose (reset or debug exit), not by a failure.
    pub fn is_guest_exit(&self) -> bool {
        matches!(self, VmOutcome::Reset | VmOutcome::DebugExit(_))
    }
}

impl std::fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmOutcome::Reset => write!(f, "guest reset (i8042 reset line or KVM system event)"),
            VmOutcome::DebugExit(v) => write!(
                f,
                "guest wrote {v} to the debug-exit port {:#x}",
                ports::DEBUG_EXIT
            ),
            VmOutcome::TripleFault { vcpu, rip } => {
                write!(f, "vCPU {vcpu} triple-faulted at rip {rip:#x}")
            }
            VmOutcome::EmulationFailure { vcpu, rip, reason } => {
                write!(
                    f,
                    "vCPU {vcpu}: KVM internal error at rip {rip:#x}: {reason}"
                )
            }
            VmOutcome::VcpuFailure { vcpu, reason } => write!(f, "vCPU {vcpu} failed: {reason}"),
        }
    }
}

/// A VM that could not be created.
#[derive(Debug, Error)]
pub enum VmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Kernel or initrd problem.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Guest RAM problem.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// vCPU setup problem.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A VM-level KVM ioctl failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The KVM fd is not a usable /dev/kvm.
    #[error("the KVM fd speaks API version {0}, not 12: is it /dev/kvm?")]
    KvmApi(i32),
    /// A device (PCI, vhost-user backend) could not be set up.
    #[error("device: {0}")]
    Device(String),
    /// Threads or eventfds could not be created.
    #[error("{what}: {source}")]
    Host {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// The runner's exit status for this error: bad input is 2, the rest are setup failures.
    pub fn exit_status(&self) -> i32 {
        match self {
            VmError::Config(_) | VmError::Boot(_) => EXIT_BAD_INPUT,
            _ => EXIT_SETUP_FAILURE,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens `/dev/kvm`, or adopts an inherited fd to it.
pub fn open_kvm(inherited: Option<File>) -> Result<Kvm, VmError> {
    let kvm = match inherited {
        Some(file) => {
            let fd: OwnedFd = file.into();
            // SAFETY: `fd` is an open descriptor we own (moved in); `Kvm` takes it over and the
            // API-version check below rejects anything that is not /dev/kvm.
            unsafe {
                <Kvm as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
                    fd,
                ))
            }
        }
        None => Kvm::new().map_err(kvm_err("opening /dev/kvm"))?,
    };
    let api = kvm.get_api_version();
    if api != 12 {
        return Err(VmError::KvmApi(api));
    }
    Ok(kvm)
}

/// A created, booted, not yet running VM.
pub struct Vm {
    _kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    vcpus: Vec<VcpuFd>,
    boot: Option<BootSetup>,
    devices: Arc<LegacyDevices>,
    reset_evt: EventFd,
    /// The MSRs a snapshot saves.
    msr_list: Arc<Vec<u32>>,
}

impl Vm {
    /// Creates the VM on `kvm`, registers `ram`, loads the kernel and prepares every vCPU.
    /// Guest serial output goes to `console`.
    pub fn new(
        kvm: Kvm,
        ram: GuestRam,
        config: &VmConfig,
        cpu_template: crate::cpu_template::CpuTemplate,
        backends: Vec<DeviceBackend>,
        console: ConsoleOut,
    ) -> Result<Self, VmError> {
        config.validate()?;
        let mut kernel = ImageFile::open("kernel", &config.kernel)?;
        let mut initrd = config
            .initrd
            .as_deref()
            .map(|p| ImageFile::open("initrd", p))
            .transpose()?;
        let images = GuestImages {
            kernel: &mut kernel,
            initrd: initrd.as_mut(),
            cmdline: &config.cmdline,
        };
        let machine = Machine {
            vcpus: config.vcpus,
            cpu_template,
        };
        Self::with_images(kvm, ram, machine, images, backends, console)
    }

    /// Like [`Vm::new`], with the kernel and initrd already open (handed in as fds by the
    /// control domain) and RAM already sized.
    pub fn with_images(
        kvm: Kvm,
        ram: GuestRam,
        machine: Machine,
        images: GuestImages<'_>,
        backends: Vec<DeviceBackend>,
        console: ConsoleOut,
    ) -> Result<Self, VmError> {
        let GuestImages {
            kernel,
            initrd,
            cmdline,
        } = images;
        let full_cmdline = machine.cpu_template.kernel_cmdline(cmdline);
        let cmdline = full_cmdline.as_str();
        crate::config::validate_machine(ram.size(), machine.vcpus, cmdline)?;
        let mut vm = Self::build(kvm, ram, machine, backends, console)?;
        let boot = crate::boot::load_images(
            vm.ram.mem(),
            vm.ram.size(),
            kernel,
            initrd,
            cmdline,
            machine.vcpus,
        )?;
        for (index, vcpu) in (0u8..).zip(&vm.vcpus) {
            cpu::setup_msrs(vcpu, index)?;
            cpu::setup_fpu(vcpu, index)?;
            cpu::setup_lapic(vcpu, index)?;
            if index == 0 {
                cpu::setup_boot_registers(vcpu, boot.entry)?;
            }
        }
        vm.boot = Some(boot);
        Ok(vm)
    }

    /// Creates the VM from a snapshot's state instead of booting: RAM (`ram`) already holds
    /// the snapshot's guest memory; every vCPU, the irqchip, PIT, clock, COM1 and each
    /// device's transport get their saved state, and each device's new backend its rings
    /// (where the saved used rings say) and the saved in-flight region.
    pub fn restore(
        kvm: Kvm,
        ram: GuestRam,
        machine: Machine,
        backends: Vec<DeviceBackend>,
        console: ConsoleOut,
        snap: &crate::snapshot::records::VmSnapshot,
    ) -> Result<Self, VmError> {
        let bad = |m: String| VmError::Config(ConfigError::Snapshot(m));
        if snap.machine.vcpus != machine.vcpus || snap.vcpus.len() != usize::from(machine.vcpus) {
            return Err(bad(format!(
                "the snapshot has {} vCPUs, the VM {}",
                snap.vcpus.len(),
                machine.vcpus
            )));
        }
        if snap.devices.len() != backends.len() {
            return Err(bad(format!(
                "the snapshot has {} devices, the VM {}",
                snap.devices.len(),
                backends.len()
            )));
        }
        crate::config::validate_machine(ram.size(), machine.vcpus, "")?;
        let vm = Self::build(kvm, ram, machine, backends, console)?;
        let kvm_err = |e: crate::snapshot::kvm::KvmStateError| VmError::Device(e.to_string());
        crate::snapshot::kvm::restore_vm(&vm.vm_fd, &snap.machine.kvm).map_err(kvm_err)?;
        for (vcpu, state) in vm.vcpus.iter().zip(&snap.vcpus) {
            let refused = crate::snapshot::kvm::restore_vcpu(vcpu, state).map_err(kvm_err)?;
            if !refused.is_empty() {
                eprintln!(
                    "bulkhead-runner: vCPU {}: KVM refused MSRs {refused:x?}",
                    state.index
                );
            }
        }
        vm.devices
            .restore_serial(&(&snap.machine.serial).into())
            .map_err(VmError::Device)?;
        vm.devices.pci.set_config_address(snap.machine.pci_address);
        for (dev, state) in vm.devices.vhost.iter().zip(&snap.devices) {
            crate::virtio_pci::restore(dev, state)
                .map_err(|e| VmError::Device(format!("{}: {e}", state.name)))?;
        }
        Ok(vm)
    }

    /// The VM with its RAM, irqchip, PIT, legacy devices, virtio devices (workers running)
    /// and vCPUs (CPUID set), but nothing loaded and no register set.
    fn build(
        kvm: Kvm,
        ram: GuestRam,
        machine: Machine,
        backends: Vec<DeviceBackend>,
        console: ConsoleOut,
    ) -> Result<Self, VmError> {
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        ram.register(&vm_fd)?;

        let host_err = |what| move |source| VmError::Host { what, source };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("serial eventfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, ports::COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (COM1)"))?;
        let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("keyboard eventfd"))?;
        vm_fd
            .register_irqfd(&kbd_irq, ports::I8042_IRQ)
            .map_err(kvm_err("KVM_IRQFD (i8042)"))?;
        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(host_err("reset eventfd"))?;
        let vm_fd = Arc::new(vm_fd);
        let ram = Arc::new(ram);
        let router = Arc::new(Mutex::new(GsiRouter::new(vm_fd.clone())));
        let mut pci = PciBus::new();
        let mut vhost = Vec::new();
        for d in backends {
            let bar = pci.allocate_bar(BAR0_SIZE).ok_or(VmError::Device(format!(
                "no PCI address space left for {}",
                d.name
            )))?;
            let dev = VhostUserPciDevice::new(
                &d.name,
                d.kind.virtio_type(),
                d.stream,
                vm_fd.clone(),
                router.clone(),
                ram.clone(),
                bar,
            )
            .map_err(|e| VmError::Device(format!("{}: {e}", d.name)))?;
            let dev = Arc::new(Mutex::new(dev));
            VhostUserPciDevice::start_worker(&dev)
                .map_err(|e| VmError::Device(format!("{}: {e}", d.name)))?;
            vhost.push(dev.clone());
            pci.add(dev)
                .ok_or(VmError::Device("the PCI bus is full".into()))?;
        }
        let devices = Arc::new(LegacyDevices::new(
            serial_irq,
            kbd_irq,
            reset_evt.try_clone().map_err(host_err("reset eventfd"))?,
            console,
            pci,
            vhost,
        ));

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let count = machine.vcpus;
        let mut vcpus = Vec::with_capacity(count.into());
        for index in 0..count {
            let vcpu = vm_fd
                .create_vcpu(index.into())
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = cpu::vcpu_cpuid(&supported, index, count);
            machine.cpu_template.apply(&mut cpuid);
            vcpu.set_cpuid2(&cpuid).map_err(|source| CpuError::Kvm {
                vcpu: index,
                what: "KVM_SET_CPUID2",
                source,
            })?;
            vcpus.push(vcpu);
        }
        // Without the list a snapshot still saves the registers; MSRs are then not kept.
        let msr_list = crate::snapshot::kvm::msr_indices(&kvm).unwrap_or_default();
        Ok(Self {
            _kvm: kvm,
            vm_fd,
            ram,
            vcpus,
            boot: None,
            devices,
            reset_evt,
            msr_list: Arc::new(msr_list),
        })
    }

    /// Where and how the kernel was loaded (None for a restored VM).
    pub fn boot_setup(&self) -> Option<&BootSetup> {
        self.boot.as_ref()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The VM fd (for devices that register ioeventfds/irqfds).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Runs the guest until it stops; serial input is read from `console_in` if given.
    /// Every vCPU thread has stopped (or been abandoned after a deadline) on return.
    pub fn run(self, console_in: Option<OwnedFd>) -> Result<VmOutcome, VmError> {
        Ok(self.start(console_in)?.wait())
    }

    /// Starts one thread per vCPU and returns a handle to pause, resume and wait on them.
    pub fn start(self, console_in: Option<OwnedFd>) -> Result<RunningVm, VmError> {
        self.start_paused(console_in, false)
    }

    /// [`Self::start`], with the vCPUs parked before their first KVM_RUN if `paused`
    /// (a restored VM that was paused when saved).
    pub fn start_paused(
        self,
        console_in: Option<OwnedFd>,
        paused: bool,
    ) -> Result<RunningVm, VmError> {
        install_kick_handler();
        let exit = Arc::new(ExitLatch::default());
        exit.set_paused(paused);
        let vcpu_count = self.vcpus.len() as u8;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut counters = Vec::new();
        for (index, vcpu) in (0u8..).zip(self.vcpus) {
            let counter = Arc::new(VcpuCounter::default());
            counters.push(counter.clone());
            let ctx = VcpuContext {
                index,
                vcpu,
                devices: self.devices.clone(),
                reset_evt: self.reset_evt.try_clone().map_err(|source| VmError::Host {
                    what: "reset eventfd",
                    source,
                })?,
                exit: exit.clone(),
                counters: counter,
                msr_list: self.msr_list.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || ctx.run())
                .map_err(|source| VmError::Host {
                    what: "spawning a vCPU thread",
                    source,
                })?;
            threads.push(handle);
        }
        if let Some(input) = console_in {
            let serial = self.devices.clone();
            let exit2 = exit.clone();
            // Detached: it blocks in read(2) and dies with the process.
            let _ = std::thread::Builder::new()
                .name("console-in".into())
                .spawn(move || console_input(input, serial, exit2));
        }
        Ok(RunningVm {
            exit,
            counters,
            threads: Mutex::new(threads),
            devices: self.devices,
            vm_fd: self.vm_fd,
            _ram: self.ram,
            _kvm: self._kvm,
            vcpu_count,
            save: Mutex::new(None),
        })
    }
}

/// A VM whose vCPU threads are running.
pub struct RunningVm {
    exit: Arc<ExitLatch>,
    counters: Vec<Arc<VcpuCounter>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    devices: Arc<LegacyDevices>,
    vm_fd: Arc<VmFd>,
    _ram: Arc<GuestRam>,
    _kvm: Kvm,
    vcpu_count: u8,
    /// While a snapshot is being taken: whether the vCPUs were paused before it, and which
    /// devices were drained.
    save: Mutex<Option<SaveInProgress>>,
}

struct SaveInProgress {
    was_paused: bool,
    drained: Vec<Arc<Mutex<VhostUserPciDevice>>>,
}

impl RunningVm {
    /// Each vCPU's (exits, nanoseconds in KVM_RUN), in vCPU order.
    pub fn vcpu_counters(&self) -> Vec<(u64, u64)> {
        self.counters
            .iter()
            .map(|c| {
                (
                    c.exits.load(Ordering::Relaxed),
                    c.run_ns.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// The devices (console input, shutdown request, vhost-user devices).
    pub fn devices(&self) -> &Arc<LegacyDevices> {
        &self.devices
    }

    /// Parks every vCPU outside KVM_RUN; returns once all are parked (or the VM ended).
    pub fn pause(&self) -> Result<(), String> {
        self.exit.set_paused(true);
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            let parked = self.exit.parked.load(Ordering::SeqCst);
            let live = self.live_threads();
            if parked >= live || self.exit.outcome().is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{parked} of {live} vCPUs paused within {STOP_DEADLINE:?}"
                ));
            }
            self.kick();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Takes a snapshot's state: pauses the vCPUs (if running), drains every device
    /// (its backend stops its rings once what it had taken is completed), then reads each
    /// vCPU's state (on its own thread, parked), the irqchip, PIT, clock, COM1 and each
    /// transport. The VM stays paused and drained until [`Self::end_save`]; on an error
    /// the caller ends the save too.
    pub fn save_state(&self) -> Result<crate::snapshot::records::VmSnapshot, String> {
        use crate::snapshot::records::{MachineState, VmSnapshot};
        {
            let mut save = lock(&self.save);
            if save.is_some() {
                return Err("a snapshot is already being taken".into());
            }
            *save = Some(SaveInProgress {
                was_paused: self.is_paused(),
                drained: Vec::new(),
            });
        }
        if self.exit.outcome().is_some() {
            return Err("the guest has stopped".into());
        }
        self.pause()?;
        let mut devices = Vec::new();
        for dev in &self.devices.vhost {
            if let Some(s) = lock(&self.save).as_mut() {
                s.drained.push(dev.clone());
            }
            let state = crate::virtio_pci::drain(dev)
                .map_err(|e| format!("{}: cannot drain: {e}", lock(dev).name()))?;
            devices.push(state);
        }
        let vcpus = self.save_vcpus()?;
        let kvm = crate::snapshot::kvm::save_vm(&self.vm_fd).map_err(|e| e.to_string())?;
        Ok(VmSnapshot {
            machine: MachineState {
                vcpus: self.vcpu_count,
                kvm,
                serial: (&self.devices.serial_state()).into(),
                pci_address: self.devices.pci.config_address(),
                paused: lock(&self.save).as_ref().is_some_and(|s| s.was_paused),
            },
            vcpus,
            devices,
        })
    }

    /// Ends a save: the drained devices' rings come up again on the same backends, and the
    /// vCPUs run again if `resume` (and they ran before the save). Returns whether they run.
    pub fn end_save(&self, resume: bool) -> Result<bool, String> {
        let Some(save) = lock(&self.save).take() else {
            return Err("no snapshot is being taken".into());
        };
        let mut failed = Vec::new();
        for dev in &save.drained {
            if let Err(e) = crate::virtio_pci::resume_after_drain(dev) {
                failed.push(format!("{}: {e}", lock(dev).name()));
            }
        }
        // The vCPUs go on even if a device did not come back: its backend is replaced
        // (a device whose drain was cut has lost its connection) and its I/O waits till then.
        let run = resume && !save.was_paused;
        if run {
            self.resume();
        }
        if !failed.is_empty() {
            return Err(format!(
                "devices not resumed (they resume when their backend is replaced): {}",
                failed.join("; ")
            ));
        }
        Ok(run)
    }

    /// Each vCPU's state, read by its own (parked) thread.
    fn save_vcpus(&self) -> Result<Vec<crate::snapshot::kvm::VcpuState>, String> {
        let want = usize::from(self.vcpu_count);
        lock(&self.exit.saved).clear();
        {
            let _paused = lock(&self.exit.pause);
            self.exit.save_gen.fetch_add(1, Ordering::SeqCst);
            self.exit.pause_cond.notify_all();
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        let mut saved = lock(&self.exit.saved);
        while saved.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "{} of {want} vCPUs saved their state within {STOP_DEADLINE:?}",
                    saved.len()
                ));
            }
            saved = self
                .exit
                .saved_cond
                .wait_timeout(saved, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut out = Vec::new();
        for r in std::mem::take(&mut *saved) {
            out.push(r?);
        }
        out.sort_by_key(|v| v.index);
        Ok(out)
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.exit.set_paused(false);
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.exit.paused()
    }

    /// The outcome, once the guest has stopped.
    pub fn outcome(&self) -> Option<VmOutcome> {
        self.exit.outcome()
    }

    /// Waits for the guest to stop, stops every vCPU thread and returns why it stopped.
    pub fn wait(&self) -> VmOutcome {
        let outcome = self.exit.wait();
        self.exit.stop.store(true, Ordering::SeqCst);
        self.exit.set_paused(false);
        let deadline = Instant::now() + STOP_DEADLINE;
        while self.live_threads() > 0 && Instant::now() < deadline {
            self.kick();
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for t in std::mem::take(&mut *threads) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        outcome
    }

    /// Ends the VM from outside: the outcome is `reason` unless the guest already stopped.
    pub fn stop(&self, reason: VmOutcome) -> VmOutcome {
        self.exit.report(reason);
        self.wait()
    }

    fn live_threads(&self) -> usize {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.iter().filter(|t| !t.is_finished()).count()
    }

    fn kick(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for t in threads.iter().filter(|t| !t.is_finished()) {
            // SAFETY: the pthread is alive (not finished, and its JoinHandle is held so it
            // is not detached or joined); the signal has a no-op handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }
}

/// The first reason to stop wins; the main thread waits for it. Also the pause gate.
#[derive(Default)]
struct ExitLatch {
    outcome: Mutex<Option<VmOutcome>>,
    cond: Condvar,
    stop: AtomicBool,
    pause: Mutex<bool>,
    pause_cond: Condvar,
    parked: std::sync::atomic::AtomicUsize,
    /// Bumped to ask every parked vCPU for its state.
    save_gen: std::sync::atomic::AtomicU64,
    /// The states they gave.
    saved: Mutex<Vec<Result<crate::snapshot::kvm::VcpuState, String>>>,
    saved_cond: Condvar,
}

impl ExitLatch {
    fn report(&self, outcome: VmOutcome) {
        let mut guard = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(outcome);
            self.cond.notify_all();
        }
    }

    fn wait(&self) -> VmOutcome {
        let mut guard = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(o) = guard.as_ref() {
                return o.clone();
            }
            guard = self.cond.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn outcome(&self) -> Option<VmOutcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_paused(&self, paused: bool) {
        *self.pause.lock().unwrap_or_else(|e| e.into_inner()) = paused;
        self.pause_cond.notify_all();
    }

    fn paused(&self) -> bool {
        *self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks a vCPU thread while the VM is paused; gives its state (`save`) whenever a
    /// snapshot asks meanwhile.
    fn park_while_paused(
        &self,
        seen: &mut u64,
        save: &mut dyn FnMut() -> Result<crate::snapshot::kvm::VcpuState, String>,
    ) {
        let mut paused = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        if !*paused {
            *seen = self.save_gen.load(Ordering::SeqCst);
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while *paused && !self.stopping() {
            let gen = self.save_gen.load(Ordering::SeqCst);
            if gen != *seen {
                *seen = gen;
                let state = save();
                lock(&self.saved).push(state);
                self.saved_cond.notify_all();
            }
            paused = self
                .pause_cond
                .wait_timeout(paused, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    // A failure leaves the default action (terminate) for a signal we never send unless
    // stopping; report it, the stop deadline still bounds the wait.
    if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
        eprintln!("bulkhead-runner: cannot install the vCPU kick handler: {e}");
    }
}

/// What one vCPU exit asks for, decoupled from the borrowed `kvm_run`.
enum ExitAction {
    Continue,
    Stop(VmOutcome),
    TripleFault,
    InternalError,
    Failed(String),
}

struct VcpuContext {
    index: u8,
    vcpu: VcpuFd,
    devices: Arc<LegacyDevices>,
    reset_evt: EventFd,
    exit: Arc<ExitLatch>,
    counters: Arc<VcpuCounter>,
    msr_list: Arc<Vec<u32>>,
}

/// One vCPU's exits and time in KVM_RUN, updated by its thread.
#[derive(Debug, Default)]
pub struct VcpuCounter {
    /// Returns from KVM_RUN.
    pub exits: AtomicU64,
    /// Nanoseconds in KVM_RUN.
    pub run_ns: AtomicU64,
}

impl VcpuContext {
    fn run(mut self) {
        let index = self.index;
        let mut seen = 0u64;
        while !self.exit.stopping() {
            {
                let (vcpu, msrs) = (&self.vcpu, &self.msr_list);
                self.exit.park_while_paused(&mut seen, &mut || {
                    crate::snapshot::kvm::save_vcpu(vcpu, index, msrs).map_err(|e| e.to_string())
                });
            }
            if self.exit.stopping() {
                break;
            }
            let entered = Instant::now();
            let ran = self.vcpu.run();
            self.counters.exits.fetch_add(1, Ordering::Relaxed);
            self.counters
                .run_ns
                .fetch_add(entered.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let action = match ran {
                Ok(VcpuExit::IoOut(port, data)) => match self.devices.pio_write(port, data) {
                    PioAction::DebugExit(v) => ExitAction::Stop(VmOutcome::DebugExit(v)),
                    PioAction::None
                        if port == ports::I8042_COMMAND && self.reset_evt.read().is_ok() =>
                    {
                        ExitAction::Stop(VmOutcome::Reset)
                    }
                    PioAction::None => ExitAction::Continue,
                },
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.devices.pio_read(port, data);
                    ExitAction::Continue
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.devices.pci.mmio(addr, Some(data), None) {
                        data.fill(0xff);
                    }
                    ExitAction::Continue
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.devices.pci.mmio(addr, None, Some(data));
                    ExitAction::Continue
                }
                Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => ExitAction::Continue,
                Ok(VcpuExit::Hlt) => ExitAction::Continue,
                Ok(VcpuExit::Shutdown) => ExitAction::TripleFault,
                Ok(VcpuExit::InternalError) => ExitAction::InternalError,
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN
                    | kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(VmOutcome::Reset),
                    other => ExitAction::Failed(format!("unexpected system event {other}")),
                },
                Ok(VcpuExit::FailEntry(reason, cpu)) => ExitAction::Failed(format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on host cpu {cpu}"
                )),
                Ok(other) => ExitAction::Failed(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ExitAction::Continue
                }
                Err(e) => ExitAction::Failed(format!("KVM_RUN: {e}")),
            };
            match action {
                ExitAction::Continue => {}
                ExitAction::Stop(o) => return self.exit.report(o),
                ExitAction::TripleFault => {
                    let rip = self.rip();
                    return self
                        .exit
                        .report(VmOutcome::TripleFault { vcpu: index, rip });
                }
                ExitAction::InternalError => {
                    let reason = self.internal_error();
                    let rip = self.rip();
                    return self.exit.report(VmOutcome::EmulationFailure {
                        vcpu: index,
                        rip,
                        reason,
                    });
                }
                ExitAction::Failed(reason) => {
                    return self.exit.report(VmOutcome::VcpuFailure {
                        vcpu: index,
                        reason,
                    });
                }
            }
        }
    }

    fn rip(&self) -> u64 {
        self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    fn internal_error(&mut self) -> String {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, which tells us
        // the `internal` member of the exit union is the one the kernel filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            1 => "instruction emulation failed",
            2 => "exception while delivering an exception (simultaneous exceptions)",
            3 => "error while delivering an event",
            4 => "unexpected exit reason",
            _ => "unknown suberror",
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        format!(
            "{what} (suberror {}, data [{}])",
            internal.suberror,
            data.join(", ")
        )
    }
}

fn console_input(input: OwnedFd, devices: Arc<LegacyDevices>, exit: Arc<ExitLatch>) {
    let mut buf = [0u8; 256];
    loop {
        let n = match nix::unistd::read(input.as_raw_fd(), &mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => continue,
            Err(_) => return,
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            if exit.stopping() {
                return;
            }
            let taken = devices.console_input(pending);
            pending = &pending[taken..];
            if !pending.is_empty() {
                // The guest has not drained its receive FIFO yet.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
