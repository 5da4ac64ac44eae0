//! CLI ↔ `bulkheadd`: every request the control domain serves, and its replies.

use serde::{Deserialize, Serialize};

/// A request from the `bulkhead` CLI (or any client) to `bulkheadd`. One per frame; the
/// daemon answers each with one [`Reply`] (a console session streams several).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Create and start a VM from a TOML config (text); relative paths in it are resolved
    /// against `config_dir`, the directory the config file was read from.
    Create {
        /// The VM config, TOML.
        config_toml: String,
        /// Directory of the config file, for relative paths.
        config_dir: String,
    },
    /// List the VMs the caller may see.
    List,
    /// Details of one VM.
    Info {
        /// VM name.
        name: String,
    },
    /// Attach to a VM's serial console: the reply is [`Reply::ConsoleAttached`] with the
    /// buffered history, then [`Reply::ConsoleOutput`] frames as output arrives, until the
    /// client sends [`Request::ConsoleDetach`] or the VM stops ([`Reply::ConsoleClosed`]).
    Console {
        /// VM name.
        name: String,
    },
    /// Keystrokes for an attached console.
    ConsoleInput {
        /// Bytes to feed the guest's UART.
        data: Vec<u8>,
    },
    /// Leave an attached console.
    ConsoleDetach,
    /// Stop running a VM's vCPUs.
    Pause {
        /// VM name.
        name: String,
    },
    /// Resume a paused VM.
    Unpause {
        /// VM name.
        name: String,
    },
    /// Ask the guest to shut down; wait up to `timeout_secs` for it.
    Shutdown {
        /// VM name.
        name: String,
        /// How long to wait before reporting that the guest did not comply.
        timeout_secs: u32,
    },
    /// Ask the guest to reboot (as `Shutdown` asks, Ctrl-Alt-Del): the VM's `on_reboot`
    /// decides what follows (`restart`: the VM starts again in place). Waits up to
    /// `timeout_secs` for the guest to go down and, with `restart`, to be started again.
    Reboot {
        /// VM name.
        name: String,
        /// How long to wait before reporting that the guest did not comply.
        timeout_secs: u32,
    },
    /// Kill a VM now and remove it.
    Destroy {
        /// VM name.
        name: String,
    },
    /// Restart a device's backend process under the running guest.
    DeviceRestart {
        /// VM name.
        name: String,
        /// Device (`disk0`, `nic0`).
        device: String,
    },
    /// Move a device to a new backend binary under the running guest (administrators only).
    DeviceUpgrade {
        /// VM name.
        name: String,
        /// Device (`disk0`, `nic0`).
        device: String,
        /// Path of the new backend binary.
        binary: String,
    },
    /// Counters of one VM (`Some`) or of every VM the caller may see: `bulkhead top`,
    /// `info --json`, `metrics`.
    Stats {
        /// VM name; None: all.
        name: Option<String>,
    },
    /// Change a device's rate limits on the running VM (kept across backend restarts).
    DeviceSetLimit {
        /// VM name.
        name: String,
        /// Device (`disk0`, `nic0`).
        device: String,
        /// What to change.
        limits: LimitsUpdate,
    },
    /// Save a VM (running or paused) to a snapshot: the file, opened for writing by the
    /// client (with its own rights), travels as the one descriptor of this frame. Unless
    /// `keep_running`, the VM is destroyed once the snapshot is written.
    Save {
        /// VM name.
        name: String,
        /// Keep the VM (running, or paused if it was) after the snapshot.
        keep_running: bool,
    },
    /// Create a VM from a snapshot: the file, opened for reading by the client, travels as
    /// the one descriptor of this frame.
    Restore {
        /// A new name for the VM (default: the snapshot's).
        name: Option<String>,
    },
}

/// A change of a device's limits: each `Some` replaces that value (0: none), each `None`
/// keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsUpdate {
    /// Bytes per second.
    pub bandwidth: Option<u64>,
    /// One-time extra bytes.
    pub bandwidth_burst: Option<u64>,
    /// Requests (disk) or packets (NIC) per second.
    pub ops: Option<u64>,
    /// One-time extra requests or packets.
    pub ops_burst: Option<u64>,
}

/// A device's limits in force (0: none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLimits {
    /// Bytes per second.
    pub bandwidth: u64,
    /// One-time extra bytes.
    pub bandwidth_burst: u64,
    /// Requests (disk) or packets (NIC) per second.
    pub ops: u64,
    /// One-time extra requests or packets.
    pub ops_burst: u64,
}

/// One queue's counters, as its backend keeps them (untrusted: a backend writes them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Requests (disk) or packets (NIC).
    pub requests: u64,
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Bytes read from the disk (or moved through a NIC queue).
    pub bytes_read: u64,
    /// Bytes written to the disk.
    pub bytes_written: u64,
    /// Failed requests (disk) or dropped packets (NIC).
    pub errors: u64,
    /// Times the queue had to wait for its rate limit.
    pub throttled: u64,
    /// Nanoseconds the queue waited for its rate limit.
    pub throttled_ns: u64,
    /// Sum of request latencies, microseconds.
    pub latency_sum_us: u64,
    /// Latency histogram: bucket 0 is < 16 µs, bucket i < 16·2^i µs, the last the rest.
    pub latency_hist: Vec<u64>,
}

/// One device's counters and limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// Device name (`disk0`, `nic0`).
    pub device: String,
    /// Backend restarts (crash, hang, restart, upgrade).
    pub restarts: u32,
    /// Backend processes (serving or standby) started with this device's counters page.
    pub backend_starts: u64,
    /// Limits in force.
    pub limits: DeviceLimits,
    /// Per queue (disk: request queues; NIC: rx, tx, rx, tx, ...); empty when the device
    /// keeps no counters.
    pub queues: Vec<QueueStats>,
}

/// One VM's counters: `bulkhead top`'s row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// The summary (name, state, vCPUs, memory).
    pub summary: VmSummary,
    /// CPU time of its runner and its device backends (those gone too), nanoseconds.
    pub cpu_ns: u64,
    /// Per vCPU: exits to the runner and time in KVM_RUN (empty if the runner did not
    /// answer in time).
    pub vcpus: Vec<crate::runner::VcpuCounters>,
    /// Per device.
    pub devices: Vec<DeviceStats>,
}

/// Why a request failed, for scripts; the message says it for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame was not a valid request.
    Protocol,
    /// The VM config is invalid.
    BadConfig,
    /// No such VM (or not visible to the caller).
    NotFound,
    /// Policy refused it.
    Denied,
    /// A VM with that name exists.
    Exists,
    /// The VM is not in a state that allows it.
    WrongState,
    /// Waited and the guest did not comply.
    Timeout,
    /// The daemon failed.
    Internal,
    /// A snapshot that is truncated, corrupted, of another format version or from another
    /// kind of host.
    BadSnapshot,
}

/// Lifecycle state of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Runner spawned, guest not yet started.
    Starting,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// The VM ended.
    Stopped(StopReason),
    /// A snapshot of it is being written.
    Saving,
    /// It is being created from a snapshot.
    Restoring,
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// The guest shut down or reset (i8042, KVM system event).
    GuestShutdown,
    /// The guest wrote a status to the debug-exit port.
    GuestExit(u8),
    /// The guest or its runner failed (triple fault, emulation failure, runner died).
    Crashed(String),
    /// An administrator destroyed it.
    Destroyed,
}

/// One line of `bulkhead list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    /// VM name.
    pub name: String,
    /// Numeric id (unique per daemon state dir).
    pub id: u32,
    /// State.
    pub state: VmState,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Owner uid.
    pub owner: u32,
    /// Runner pid, while it runs.
    pub runner_pid: Option<i32>,
    /// Seconds since creation.
    pub uptime_secs: u64,
}

/// `bulkhead info`: the summary plus how the VM was configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The summary.
    pub summary: VmSummary,
    /// Kernel path.
    pub kernel: String,
    /// Whether guest RAM is in 2 MiB huge pages.
    pub hugepages: bool,
    /// Initrd path.
    pub initrd: Option<String>,
    /// Command line.
    pub cmdline: String,
    /// Runner uid/gid.
    pub runner_uid: Option<u32>,
    /// Disks, as configured.
    pub disks: Vec<String>,
    /// NICs, as configured.
    pub nics: Vec<String>,
}

/// `bulkheadd`'s answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done; the message says what happened.
    Done {
        /// What happened.
        message: String,
    },
    /// A VM was created and started.
    Created {
        /// Its summary.
        vm: VmSummary,
    },
    /// `list`.
    List {
        /// The VMs.
        vms: Vec<VmSummary>,
    },
    /// `info`.
    Info {
        /// The VM.
        vm: VmInfo,
    },
    /// Counters ([`Request::Stats`]).
    Stats {
        /// Per VM.
        vms: Vec<VmStats>,
    },
    /// Console attached; `history` is the buffered output so far (up to 64 KiB).
    ConsoleAttached {
        /// Recent output.
        history: Vec<u8>,
    },
    /// More console output.
    ConsoleOutput {
        /// Bytes from the guest's UART.
        data: Vec<u8>,
    },
    /// The console session ended.
    ConsoleClosed {
        /// Why.
        reason: String,
    },
    /// The request failed.
    Error {
        /// Class of failure.
        code: ErrorCode,
        /// One line for people: what was wrong and what to do.
        message: String,
    },
}
