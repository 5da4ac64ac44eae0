//! Every message of the control and runner protocols survives a trip over a real socket
//! pair, with descriptors.

mod common;

use std::collections::BTreeSet;
use std::fmt::Debug;

use bulkhead_ipc::control::{
    DeviceLimits, DeviceStats, ErrorCode, LimitsUpdate, QueueStats, Reply, Request, StopReason,
    VmInfo, VmState, VmStats, VmSummary,
};
use bulkhead_ipc::runner::{BootFds, BootSpec, GuestOutcome, RunnerCommand, RunnerEvent};
use bulkhead_ipc::Channel;
use common::{borrow, check_pipe, pipe};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn request_index(r: &Request) -> usize {
    // Exhaustive: a new variant fails to compile here until it is tested.
    match r {
        Request::Create { .. } => 0,
        Request::List => 1,
        Request::Info { .. } => 2,
        Request::Console { .. } => 3,
        Request::ConsoleInput { .. } => 4,
        Request::ConsoleDetach => 5,
        Request::Pause { .. } => 6,
        Request::Unpause { .. } => 7,
        Request::Shutdown { .. } => 8,
        Request::Destroy { .. } => 9,
        Request::DeviceRestart { .. } => 10,
        Request::DeviceUpgrade { .. } => 11,
        Request::Reboot { .. } => 12,
        Request::Stats { .. } => 13,
        Request::DeviceSetLimit { .. } => 14,
        Request::Save { .. } => 15,
        Request::Restore { .. } => 16,
    }
}
const REQUEST_VARIANTS: usize = 17;

fn reply_index(r: &Reply) -> usize {
    match r {
        Reply::Done { .. } => 0,
        Reply::Created { .. } => 1,
        Reply::List { .. } => 2,
        Reply::Info { .. } => 3,
        Reply::ConsoleAttached { .. } => 4,
        Reply::ConsoleOutput { .. } => 5,
        Reply::ConsoleClosed { .. } => 6,
        Reply::Error { .. } => 7,
        Reply::Stats { .. } => 8,
    }
}
const REPLY_VARIANTS: usize = 9;

fn command_index(c: &RunnerCommand) -> usize {
    match c {
        RunnerCommand::Boot(_) => 0,
        RunnerCommand::Pause => 1,
        RunnerCommand::Resume => 2,
        RunnerCommand::RequestShutdown => 3,
        RunnerCommand::Status => 4,
        RunnerCommand::ConsoleInput(_) => 5,
        RunnerCommand::ReconnectDevice { .. } => 6,
        RunnerCommand::VcpuStats => 7,
        RunnerCommand::SaveState => 8,
        RunnerCommand::EndSave { .. } => 9,
        RunnerCommand::Restore(_) => 10,
    }
}
const COMMAND_VARIANTS: usize = 11;

fn event_index(e: &RunnerEvent) -> usize {
    match e {
        RunnerEvent::Started { .. } => 0,
        RunnerEvent::BootFailed { .. } => 1,
        RunnerEvent::Paused => 2,
        RunnerEvent::Resumed => 3,
        RunnerEvent::State { .. } => 4,
        RunnerEvent::Exited(_) => 5,
        RunnerEvent::Error { .. } => 6,
        RunnerEvent::Console(_) => 7,
        RunnerEvent::ShutdownRequested => 8,
        RunnerEvent::DeviceReconnected { .. } => 9,
        RunnerEvent::DeviceHung { .. } => 10,
        RunnerEvent::VcpuStats(_) => 11,
        RunnerEvent::Saved { .. } => 12,
    }
}
const EVENT_VARIANTS: usize = 13;

fn summary(name: &str, state: VmState) -> VmSummary {
    VmSummary {
        name: name.into(),
        id: 7,
        state,
        vcpus: 2,
        memory_mib: 512,
        owner: 1000,
        runner_pid: Some(4242),
        uptime_secs: 3600,
    }
}

fn requests() -> Vec<Request> {
    vec![
        Request::Create {
            config_toml: "name = \"web\"\nvcpus = 2\n".into(),
            config_dir: "/etc/bulkhead".into(),
        },
        Request::List,
        Request::Info { name: "web".into() },
        Request::Console { name: "web".into() },
        Request::ConsoleInput {
            data: b"root\n\x03\x00\xff".to_vec(),
        },
        Request::ConsoleDetach,
        Request::Pause { name: "web".into() },
        Request::Unpause {
            name: "wéb-ünïcode".into(),
        },
        Request::Shutdown {
            name: "web".into(),
            timeout_secs: u32::MAX,
        },
        Request::Destroy {
            name: String::new(),
        },
        Request::DeviceRestart {
            name: "web1".into(),
            device: "disk0".into(),
        },
        Request::DeviceUpgrade {
            name: "web1".into(),
            device: "nic0".into(),
            binary: "/usr/libexec/bulkhead-net.new".into(),
        },
        Request::Reboot {
            name: "web".into(),
            timeout_secs: 0,
        },
        Request::Stats { name: None },
        Request::Stats {
            name: Some("web".into()),
        },
        Request::DeviceSetLimit {
            name: "web".into(),
            device: "disk0".into(),
            limits: LimitsUpdate {
                bandwidth: Some(8 << 20),
                bandwidth_burst: None,
                ops: Some(0),
                ops_burst: Some(u64::MAX),
            },
        },
        Request::Save {
            name: "web".into(),
            keep_running: true,
        },
        Request::Restore {
            name: Some("web2".into()),
        },
        Request::Restore { name: None },
    ]
}

fn replies() -> Vec<Reply> {
    let info = VmInfo {
        summary: summary("db", VmState::Paused),
        kernel: "/boot/vmlinuz".into(),
        hugepages: true,
        initrd: Some("/boot/initrd.img".into()),
        cmdline: "console=ttyS0 quiet".into(),
        runner_uid: Some(60001),
        disks: vec!["/var/lib/db.img".into(), "/var/lib/scratch.img".into()],
        nics: vec!["tap0".into()],
    };
    let mut codes = vec![
        ErrorCode::Protocol,
        ErrorCode::BadConfig,
        ErrorCode::NotFound,
        ErrorCode::Denied,
        ErrorCode::Exists,
        ErrorCode::WrongState,
        ErrorCode::Timeout,
        ErrorCode::Internal,
        ErrorCode::BadSnapshot,
    ]
    .into_iter()
    .map(|code| Reply::Error {
        code,
        message: format!("{code:?} happened"),
    })
    .collect::<Vec<_>>();
    let mut v = vec![
        Reply::Done {
            message: "paused web".into(),
        },
        Reply::Created {
            vm: summary("web", VmState::Starting),
        },
        Reply::List { vms: vec![] },
        Reply::List {
            vms: vec![
                summary("a", VmState::Running),
                summary("b", VmState::Stopped(StopReason::GuestShutdown)),
                summary("c", VmState::Stopped(StopReason::GuestExit(3))),
                summary(
                    "d",
                    VmState::Stopped(StopReason::Crashed("triple fault".into())),
                ),
                summary("e", VmState::Stopped(StopReason::Destroyed)),
                summary("s", VmState::Saving),
                summary("r", VmState::Restoring),
                VmSummary {
                    runner_pid: None,
                    ..summary("f", VmState::Paused)
                },
            ],
        },
        Reply::Info { vm: info.clone() },
        Reply::Stats { vms: vec![] },
        Reply::Stats {
            vms: vec![VmStats {
                summary: summary("s", VmState::Running),
                cpu_ns: u64::MAX,
                vcpus: vec![Default::default(); 2],
                devices: vec![DeviceStats {
                    device: "disk0".into(),
                    restarts: 3,
                    backend_starts: 4,
                    limits: DeviceLimits {
                        bandwidth: 1,
                        bandwidth_burst: 2,
                        ops: 3,
                        ops_burst: 4,
                    },
                    queues: vec![QueueStats {
                        requests: 9,
                        latency_hist: vec![1; 16],
                        ..QueueStats::default()
                    }],
                }],
            }],
        },
        Reply::Info {
            vm: VmInfo {
                initrd: None,
                runner_uid: None,
                disks: vec![],
                nics: vec![],
                ..info
            },
        },
        Reply::ConsoleAttached {
            history: (0..=255u8).collect(),
        },
        Reply::ConsoleOutput {
            data: b"login: ".to_vec(),
        },
        Reply::ConsoleClosed {
            reason: "the VM stopped".into(),
        },
    ];
    v.append(&mut codes);
    v
}

fn commands() -> Vec<RunnerCommand> {
    vec![
        RunnerCommand::Boot(BootSpec {
            cmdline: "console=ttyS0".into(),
            vcpus: 4,
            has_initrd: true,
            kernel_name: "vmlinuz-6.1".into(),
            disks: vec!["disk0".into()],
            nics: vec!["nic0".into()],
            cpu_template: "minimal".into(),
            hang_timeouts_ms: vec![2000],
        }),
        RunnerCommand::Pause,
        RunnerCommand::Resume,
        RunnerCommand::RequestShutdown,
        RunnerCommand::Status,
        RunnerCommand::VcpuStats,
        RunnerCommand::ConsoleInput(b"ls -l\r".to_vec()),
        RunnerCommand::ConsoleInput(Vec::new()),
        RunnerCommand::ReconnectDevice {
            device: "disk0".into(),
        },
        RunnerCommand::SaveState,
        RunnerCommand::EndSave { resume: true },
        RunnerCommand::Restore(bulkhead_ipc::runner::RestoreSpec {
            vcpus: 2,
            cpu_template: "minimal".into(),
            disks: vec!["disk0".into()],
            nics: Vec::new(),
            hang_timeouts_ms: vec![2000],
            records: vec![bulkhead_ipc::runner::StateRecord {
                name: "vcpu0".into(),
                data: vec![0, 1, 255],
            }],
        }),
    ]
}

fn events() -> Vec<RunnerEvent> {
    vec![
        RunnerEvent::Started {
            detail: "64-bit boot protocol".into(),
        },
        RunnerEvent::BootFailed {
            message: "kernel image is not a bzImage".into(),
        },
        RunnerEvent::Paused,
        RunnerEvent::Resumed,
        RunnerEvent::State {
            booted: true,
            paused: true,
        },
        RunnerEvent::State {
            booted: false,
            paused: false,
        },
        RunnerEvent::Console(b"\x1b[0mlogin: ".to_vec()),
        RunnerEvent::ShutdownRequested,
        RunnerEvent::VcpuStats(vec![]),
        RunnerEvent::VcpuStats(vec![
            bulkhead_ipc::runner::VcpuCounters {
                exits: u64::MAX,
                run_ns: 0,
            };
            64
        ]),
        RunnerEvent::DeviceReconnected {
            device: "nic0".into(),
        },
        RunnerEvent::DeviceHung {
            device: "disk0".into(),
            stalled_ms: 2050,
        },
        RunnerEvent::Exited(GuestOutcome::Reset),
        RunnerEvent::Exited(GuestOutcome::DebugExit(0x31)),
        RunnerEvent::Exited(GuestOutcome::Failed("emulation failure".into())),
        RunnerEvent::Error {
            message: "already booted".into(),
        },
        RunnerEvent::Saved {
            records: vec![bulkhead_ipc::runner::StateRecord {
                name: "vm".into(),
                data: vec![7; 300],
            }],
        },
    ]
}

/// Send each message (alternating directions) with `i % 4` pipe write ends attached, and
/// check the message and that every received fd is a working write end of its pipe.
fn round_trip_all<T>(msgs: Vec<T>, index: fn(&T) -> usize, variants: usize)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let (a, b) = Channel::pair().expect("socketpair");
    let mut seen = BTreeSet::new();
    for (i, msg) in msgs.iter().enumerate() {
        let (tx, rx) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let pipes: Vec<_> = (0..i % 4).map(|_| pipe()).collect();
        let write_ends: Vec<_> = pipes
            .iter()
            .map(|(_, w)| w.try_clone().expect("dup"))
            .collect();
        tx.send(msg, &borrow(&write_ends)).expect("send");
        drop(write_ends);
        let (got, fds): (T, _) = rx.recv().expect("recv");
        assert_eq!(&got, msg);
        assert_eq!(fds.len(), pipes.len(), "fd count for {msg:?}");
        for (k, (fd, (r, w))) in fds.into_iter().zip(pipes).enumerate() {
            drop(w);
            check_pipe(fd, &r, format!("message {i} fd {k}").as_bytes());
        }
        seen.insert(index(msg));
    }
    assert_eq!(seen.len(), variants, "every variant is exercised");
}

#[test]
fn every_request_round_trips() {
    round_trip_all(requests(), request_index, REQUEST_VARIANTS);
}

#[test]
fn every_reply_round_trips() {
    round_trip_all(replies(), reply_index, REPLY_VARIANTS);
}

#[test]
fn every_runner_command_round_trips() {
    round_trip_all(commands(), command_index, COMMAND_VARIANTS);
}

#[test]
fn every_runner_event_round_trips() {
    round_trip_all(events(), event_index, EVENT_VARIANTS);
}

#[test]
fn boot_with_a_full_set_of_fds() {
    // The Boot command carries the most descriptors: MAX_FDS must cover them.
    const { assert!(BootFds::INITRD < bulkhead_ipc::transport::MAX_FDS) };
    let (daemon, runner) = Channel::pair().expect("socketpair");
    let pipes: Vec<_> = (0..bulkhead_ipc::transport::MAX_FDS)
        .map(|_| pipe())
        .collect();
    let ws: Vec<_> = pipes
        .iter()
        .map(|(_, w)| w.try_clone().expect("dup"))
        .collect();
    let cmd = commands().remove(0);
    daemon.send(&cmd, &borrow(&ws)).expect("send");
    drop(ws);
    let (got, fds) = runner.recv::<RunnerCommand>().expect("recv");
    assert_eq!(got, cmd);
    assert_eq!(fds.len(), pipes.len());
    for (i, (fd, (r, w))) in fds.into_iter().zip(pipes).enumerate() {
        drop(w);
        check_pipe(fd, &r, format!("fd {i}").as_bytes());
    }
}

#[test]
fn largest_frame_passes_and_one_more_byte_is_refused() {
    use bulkhead_ipc::transport::{encode_frame, MAX_FRAME};
    use bulkhead_ipc::IpcError;
    // Variant tag (1 byte) + varint length (3 bytes for < 2^21) + data.
    let fits = Reply::ConsoleOutput {
        data: vec![0xa5; MAX_FRAME - 4],
    };
    assert_eq!(encode_frame(&fits).expect("encode").len(), MAX_FRAME + 4);
    let (a, b) = Channel::pair().expect("socketpair");
    a.send(&fits, &[]).expect("send max frame");
    let (got, _) = b.recv::<Reply>().expect("recv max frame");
    assert_eq!(got, fits);

    let too_big = Reply::ConsoleOutput {
        data: vec![0xa5; MAX_FRAME - 3],
    };
    assert!(matches!(a.send(&too_big, &[]), Err(IpcError::Oversized)));
    assert!(matches!(encode_frame(&too_big), Err(IpcError::Oversized)));
    // Nothing was sent; the channel still works.
    a.send(&Request::List, &[]).expect("send");
    assert_eq!(b.recv::<Request>().expect("recv").0, Request::List);
}
