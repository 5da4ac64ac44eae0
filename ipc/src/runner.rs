//! `bulkheadd` ↔ `bulkhead-runner`: the commands a control domain gives a runner, and the
//! events a runner reports.

use serde::{Deserialize, Serialize};

/// What the runner should boot. Files arrive as descriptors alongside the frame, in the
/// order given by [`BootFds`]; the runner has no filesystem of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Whether an initrd fd is included.
    pub has_initrd: bool,
    /// Kernel name, for messages only.
    pub kernel_name: String,
    /// Disks, in PCI slot order; each one's connected vhost-user socket travels as a
    /// descriptor after the kernel (and initrd).
    pub disks: Vec<String>,
    /// NICs, after the disks; each one's vhost-user socket travels after the disks'.
    pub nics: Vec<String>,
    /// CPU template name (`host`, `minimal`), already resolved by the control domain.
    pub cpu_template: String,
    /// Per device (disks, then NICs): how long a ring may hold requests the backend makes
    /// no progress on before the runner reports it hung ([`RunnerEvent::DeviceHung`]), in
    /// milliseconds; 0 watches nothing. Missing entries are 0.
    pub hang_timeouts_ms: Vec<u32>,
}

/// Order of the descriptors that travel with [`RunnerCommand::Boot`].
pub struct BootFds;

impl BootFds {
    /// The `/dev/kvm` fd.
    pub const KVM: usize = 0;
    /// The guest-RAM memfd (sealed; its size is the RAM size).
    pub const MEMFD: usize = 1;
    /// The kernel image, opened read-only.
    pub const KERNEL: usize = 2;
    /// The initrd, opened read-only, if `has_initrd`.
    pub const INITRD: usize = 3;

    /// Index of the first disk socket for a boot with or without an initrd.
    pub fn first_disk(has_initrd: bool) -> usize {
        if has_initrd {
            Self::INITRD + 1
        } else {
            Self::KERNEL + 1
        }
    }
}

/// A command from `bulkheadd` with the id its answer carries ([`RunnerMessage::Answer`]).
/// Each command gets its own answer, matched by id; a late answer to a command whose
/// caller gave up can never be taken for another's. Commands that need no answer
/// (`ConsoleInput`) are sent with id 0 and get none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerRequest {
    /// Chosen by the sender; 0 for commands that get no answer.
    pub id: u64,
    /// What to do.
    pub command: RunnerCommand,
}

/// What a runner sends to `bulkheadd`: the answer to one request, or an event of its own
/// (guest output, the guest's end), which is never an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunnerMessage {
    /// The answer to request `id`.
    Answer {
        /// The request's id.
        id: u64,
        /// What came of it.
        event: RunnerEvent,
    },
    /// Something that happened: `Console` output or `Exited`.
    Event(RunnerEvent),
}

/// A command from `bulkheadd` to a runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunnerCommand {
    /// Create the VM and start it (once, first).
    Boot(BootSpec),
    /// Stop the vCPUs.
    Pause,
    /// Restart the vCPUs.
    Resume,
    /// Ask the guest to shut down (or reboot: the control domain knows which it asked for):
    /// the runner presses Ctrl-Alt-Del on the i8042 keyboard (Linux's init runs its
    /// shutdown, then resets the machine) and raises the shutdown-request port (0xf5) that
    /// the test guest polls. The guest decides; the control domain enforces a timeout.
    RequestShutdown,
    /// Report state (used when a restarted `bulkheadd` re-adopts a runner).
    Status,
    /// Bytes typed on the console, for the guest's UART.
    ConsoleInput(Vec<u8>),
    /// The backend of `device` was replaced (restart or upgrade): its new vhost-user
    /// connection travels as the one descriptor of this frame. The runner replays the
    /// setup and resumes the vrings where the old backend stopped.
    ReconnectDevice {
        /// Device name (`disk0`, `nic0`).
        device: String,
    },
    /// Report each vCPU's exits and time in KVM_RUN ([`RunnerEvent::VcpuStats`]).
    VcpuStats,
    /// Take a snapshot's state: pause the vCPUs (if running), drain every device (its
    /// backend stops its rings: GET_VRING_BASE; requests it had taken complete first) and
    /// answer [`RunnerEvent::Saved`] with every component's state. The VM stays paused and
    /// drained until [`RunnerCommand::EndSave`] (or its end).
    SaveState,
    /// After [`RunnerCommand::SaveState`]: bring the devices' rings up again and, with
    /// `resume`, run the vCPUs (answer `Resumed`; without, `Paused`).
    EndSave {
        /// Run the vCPUs again.
        resume: bool,
    },
    /// Create the VM from a snapshot's state and run it (once, first, instead of `Boot`).
    /// Descriptors: `/dev/kvm`, the guest-RAM memfd (already holding the snapshot's RAM),
    /// then each device's vhost-user connection (disks, then NICs).
    Restore(RestoreSpec),
}

/// One vCPU's counters, as its runner keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCounters {
    /// Returns from KVM_RUN (exits to the runner; exits KVM handles itself are not seen).
    pub exits: u64,
    /// Nanoseconds spent in KVM_RUN.
    pub run_ns: u64,
}

/// A snapshot's component state, opaque to `bulkheadd` (the runner wrote it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    /// Which component (`vm`, `vcpu0`, `dev:disk0`).
    pub name: String,
    /// Its state.
    pub data: Vec<u8>,
}

/// What the runner restores (see [`RunnerCommand::Restore`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// vCPU count.
    pub vcpus: u8,
    /// CPU template name, as the snapshot was taken with.
    pub cpu_template: String,
    /// Disks, in PCI slot order (their sockets travel after the memfd).
    pub disks: Vec<String>,
    /// NICs, after the disks.
    pub nics: Vec<String>,
    /// As in [`BootSpec::hang_timeouts_ms`].
    pub hang_timeouts_ms: Vec<u32>,
    /// The component state, as [`RunnerEvent::Saved`] gave it.
    pub records: Vec<StateRecord>,
}

/// In the `detail` of the `Started` answer to a [`RunnerCommand::Restore`]: the snapshot
/// was taken of a paused VM, and the restored vCPUs wait paused too.
pub const RESTORED_PAUSED: &str = "(paused, as saved)";

/// Order of the descriptors that travel with [`RunnerCommand::Restore`].
pub struct RestoreFds;

impl RestoreFds {
    /// The `/dev/kvm` fd.
    pub const KVM: usize = 0;
    /// The guest-RAM memfd.
    pub const MEMFD: usize = 1;
    /// The first device socket.
    pub const FIRST_DEVICE: usize = 2;
}

/// How a guest run ended, as the runner saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestOutcome {
    /// i8042 reset or KVM shutdown/reset event.
    Reset,
    /// Debug-exit port write.
    DebugExit(u8),
    /// Triple fault, emulation failure, or vCPU failure, described.
    Failed(String),
}

/// An event or answer from a runner to `bulkheadd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunnerEvent {
    /// The VM is built and its vCPUs are running.
    Started {
        /// How the kernel was entered, for logs.
        detail: String,
    },
    /// Boot failed before the guest ran.
    BootFailed {
        /// Why.
        message: String,
    },
    /// vCPUs paused.
    Paused,
    /// vCPUs running again.
    Resumed,
    /// Current state (answer to `Status`).
    State {
        /// Whether the guest has been booted.
        booted: bool,
        /// Whether vCPUs are paused.
        paused: bool,
    },
    /// Guest serial output.
    Console(Vec<u8>),
    /// The shutdown request was raised.
    ShutdownRequested,
    /// A device is served by its new backend.
    DeviceReconnected {
        /// Device name.
        device: String,
    },
    /// A device's backend has work it is not doing: a ring (a disk's, or a NIC's transmit
    /// ring) held requests with no completion for `stalled_ms`. Reported once per stall (again
    /// after the backend made progress, or for a new backend).
    DeviceHung {
        /// Device name.
        device: String,
        /// How long nothing was completed.
        stalled_ms: u64,
    },
    /// The guest ended; the runner exits after sending this.
    Exited(GuestOutcome),
    /// A command could not be carried out.
    Error {
        /// Why.
        message: String,
    },
    /// Per-vCPU counters (answer to `VcpuStats`), in vCPU order.
    VcpuStats(Vec<VcpuCounters>),
    /// The answer to [`RunnerCommand::SaveState`]: the VM is paused and drained.
    Saved {
        /// Every component's state.
        records: Vec<StateRecord>,
    },
}
