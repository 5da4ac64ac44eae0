//! `bulkhead-runner`: runs one VM's vCPUs on KVM (standalone mode; the control domain will
//! drive the same library over `ipc`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use core_vmm::config::DEFAULT_MEMORY;
use core_vmm::devices::FdConsole;
use core_vmm::memory::{file_from_inherited_fd, GuestRam, RamBacking};
use core_vmm::vm::{open_kvm, EXIT_BAD_INPUT, EXIT_SETUP_FAILURE};
use core_vmm::vm::{DeviceBackend, DeviceKind};
use core_vmm::{parse_memory_size, Vm, VmConfig};

/// Runs one VM on KVM: boots a kernel and connects its serial console to stdin/stdout.
///
/// Exit status: 0 when the guest resets (i8042, Linux `reboot=k`); V when the guest writes V to
/// the debug-exit port 0xf4; 2 for bad input (config, kernel, initrd); 80 for a triple fault;
/// 81 for a KVM internal or emulation error; 82 for a vCPU failure; 83 when KVM refuses a
/// setup step.
#[derive(Parser, Debug)]
#[command(name = "bulkhead-runner", version)]
struct Args {
    /// Kernel: an ELF with a PVH entry note (vmlinux, the test guest) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "control_fd")]
    kernel: Option<PathBuf>,
    /// Initrd / initramfs to load.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest RAM: 256M, 1G, or a number of MiB.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    memory: String,
    /// Back guest RAM with 2 MiB pages from the host's hugetlb pool (reserve them first:
    /// `sysctl vm.nr_hugepages=N`); all are taken at start, and --memory must be a multiple
    /// of 2 MiB. Backends that map the RAM then move a large guest buffer in few segments.
    #[arg(long, conflicts_with = "memfd")]
    hugepages: bool,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u64,
    /// An inherited, open /dev/kvm descriptor to use instead of opening /dev/kvm.
    #[arg(long, value_name = "N")]
    kvm_fd: Option<i32>,
    /// A vhost-user-blk backend's socket (bulkhead-blk, qemu-storage-daemon, ...); repeat
    /// for more disks. Each appears to the guest as a virtio-blk PCI device.
    #[arg(long, value_name = "PATH")]
    disk_socket: Vec<PathBuf>,
    /// A vhost-user-net backend's socket (bulkhead-net, ...); repeat for more NICs. Each
    /// appears to the guest as a virtio-net PCI device, after the disks.
    #[arg(long, value_name = "PATH")]
    net_socket: Vec<PathBuf>,
    /// CPU template: `auto` (minimal on PVM-based KVM, where guest ring 0 is emulated;
    /// host otherwise), `host`, or `minimal`.
    #[arg(long, value_name = "NAME", default_value = "auto")]
    cpu_template: String,
    /// An inherited guest-RAM memfd (its size is the RAM size; overrides --memory).
    #[arg(long, value_name = "N")]
    memfd: Option<i32>,
    /// Print what was loaded where, and why the VM stopped, on stderr.
    #[arg(long, short)]
    verbose: bool,
    /// Run under bulkheadd: serve the listening control socket inherited as fd N (the
    /// kernel, RAM and /dev/kvm then arrive over it). Installs the seccomp allowlist first.
    #[arg(long, value_name = "N", conflicts_with_all = ["kernel", "initrd", "memfd", "kvm_fd"])]
    control_fd: Option<i32>,
    /// With --control-fd: try what the sandbox must forbid at boot and log the results.
    #[arg(long, hide = true, requires = "control_fd")]
    sandbox_selftest: bool,
}

/// An error with the exit status it maps to.
struct Failure(i32, String);

fn fail<E: std::fmt::Display>(status: i32) -> impl Fn(E) -> Failure {
    move |e| Failure(status, e.to_string())
}

fn run_controlled(fd: i32, selftest: bool) -> Result<i32, Failure> {
    let listener = file_from_inherited_fd(fd, "--control-fd").map_err(fail(EXIT_BAD_INPUT))?;
    core_vmm::sandbox::install_seccomp().map_err(fail(EXIT_SETUP_FAILURE))?;
    let listener = bulkhead_ipc::Listener::from_fd(std::os::fd::OwnedFd::from(listener));
    Ok(core_vmm::control::serve(listener, selftest))
}

fn run(args: Args) -> Result<i32, Failure> {
    if let Some(fd) = args.control_fd {
        return run_controlled(fd, args.sandbox_selftest);
    }
    let kernel = args
        .kernel
        .ok_or_else(|| Failure(EXIT_BAD_INPUT, "--kernel is required".into()))?;
    let memfd = args
        .memfd
        .map(|fd| file_from_inherited_fd(fd, "--memfd"))
        .transpose()
        .map_err(fail(EXIT_BAD_INPUT))?;
    let memory = match &memfd {
        Some(f) => f.metadata().map_err(fail(EXIT_BAD_INPUT))?.len(),
        None => parse_memory_size(&args.memory).map_err(fail(EXIT_BAD_INPUT))?,
    };
    let vcpus = u8::try_from(args.vcpus).map_err(|_| {
        Failure(
            EXIT_BAD_INPUT,
            format!(
                "vcpus must be between 1 and {}, got {}",
                core_vmm::config::MAX_VCPUS,
                args.vcpus
            ),
        )
    })?;
    let config = VmConfig {
        kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory,
        vcpus,
    };
    config.validate().map_err(fail(EXIT_BAD_INPUT))?;

    let kvm_file = args
        .kvm_fd
        .map(|fd| file_from_inherited_fd(fd, "--kvm-fd"))
        .transpose()
        .map_err(fail(EXIT_BAD_INPUT))?;
    let kvm = open_kvm(kvm_file).map_err(|e| Failure(e.exit_status(), e.to_string()))?;
    let ram = match memfd {
        Some(f) => GuestRam::from_memfd(f),
        None => GuestRam::create(config.memory, RamBacking::huge_if(args.hugepages)),
    }
    .map_err(fail(EXIT_SETUP_FAILURE))?;

    let stdout = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(fail(EXIT_SETUP_FAILURE))?;
    let (cpu_template, why) = match args.cpu_template.as_str() {
        "auto" => core_vmm::cpu_template::HostKind::detect().auto(),
        name => match core_vmm::cpu_template::by_name(name) {
            Some(t) => (t, "asked for"),
            None => {
                return Err(Failure(
                    EXIT_BAD_INPUT,
                    format!("unknown CPU template '{name}': use auto, host or minimal"),
                ))
            }
        },
    };
    if args.verbose {
        eprintln!(
            "bulkhead-runner: CPU template {} ({why})",
            cpu_template.name
        );
    }
    let mut backends = Vec::new();
    let sockets = args
        .disk_socket
        .iter()
        .map(|p| (p, DeviceKind::Block, "disk"))
        .chain(args.net_socket.iter().map(|p| (p, DeviceKind::Net, "nic")));
    let mut counts = [0usize; 2];
    for (path, kind, prefix) in sockets {
        let n = &mut counts[usize::from(kind == DeviceKind::Net)];
        let name = format!("{prefix}{n}");
        *n += 1;
        let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
            Failure(
                EXIT_BAD_INPUT,
                format!("{name}: cannot connect to {}: {e}", path.display()),
            )
        })?;
        backends.push(DeviceBackend { name, kind, stream });
    }
    let vm = Vm::new(
        kvm,
        ram,
        &config,
        cpu_template,
        backends,
        Box::new(FdConsole(stdout)),
    )
    .map_err(|e| Failure(e.exit_status(), e.to_string()))?;
    if let (true, Some(b)) = (args.verbose, vm.boot_setup()) {
        eprintln!(
            "bulkhead-runner: {} loaded as {:?}, entry {:?}, kernel end {:#x}, initrd {:?}; {} vCPUs, {} MiB{}",
            config.kernel.display(),
            b.format,
            b.entry,
            b.kernel_end,
            b.initrd,
            config.vcpus,
            config.memory >> 20,
            if args.hugepages { " in 2 MiB huge pages" } else { "" }
        );
    }
    let stdin: Option<OwnedFd> = std::io::stdin().as_fd().try_clone_to_owned().ok();
    let _raw = stdin
        .as_ref()
        .and_then(|fd| RawTerminal::enter(fd.as_raw_fd()));
    let running = vm
        .start(stdin)
        .map_err(|e| Failure(e.exit_status(), e.to_string()))?;
    // Backends reached by path are reconnected by path when they go away.
    let paths = args.disk_socket.iter().chain(args.net_socket.iter());
    for (dev, path) in running.devices().vhost.iter().zip(paths) {
        core_vmm::reconnect::watch_by_path(dev.clone(), path.clone());
    }
    let outcome = running.wait();
    drop(_raw);
    if args.verbose || !outcome.is_guest_exit() {
        eprintln!("bulkhead-runner: {outcome}");
    }
    Ok(outcome.exit_status())
}

/// Puts a terminal on stdin into raw mode so keys reach the guest; restored on drop.
struct RawTerminal {
    fd: i32,
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter(fd: i32) -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        // SAFETY: `fd` is our stdin duplicate, open for the life of this guard's owner.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if !nix::unistd::isatty(fd).unwrap_or(false) {
            return None;
        }
        let saved = tcgetattr(borrowed).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        // Keep output post-processing so guest "\n" still renders as lines.
        raw.output_flags = saved.output_flags;
        tcsetattr(borrowed, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: see `enter`; the descriptor is still open.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let _ =
            nix::sys::termios::tcsetattr(borrowed, nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

fn main() -> ExitCode {
    // One line, never a backtrace, if something unexpected panics.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("bulkhead-runner: internal error: {info}");
    }));
    // A console reader that goes away must not kill the VM.
    // SAFETY: setting SIGPIPE to ignore is async-signal-safe and done before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let _ = DEFAULT_MEMORY;
    let args = Args::parse();
    let status = match run(args) {
        Ok(s) => s,
        Err(Failure(status, msg)) => {
            eprintln!("bulkhead-runner: error: {msg}");
            status
        }
    };
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}
