//! The `ipc` decoders, fed by peers that may be hostile: `decode_frame`, `decode` of every
//! message enum, and the server side of the handshake over a real socket.
//!
//! Invariants: no panic; `decode_frame` accepts exactly the frames whose header matches
//! their size and is within bounds; anything `decode` accepts encodes again into a frame
//! that decodes to the same value; `server_hello` welcomes exactly a well-formed hello of
//! this version (and answers every first frame), and the channel still works after.

use std::cell::RefCell;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use bulkhead_ipc::control::{ErrorCode, Reply, Request, StopReason, VmInfo, VmState, VmSummary};
use bulkhead_ipc::hello::{server_hello, Hello, HelloReply, MAGIC};
use bulkhead_ipc::runner::{
    BootSpec, GuestOutcome, RunnerCommand, RunnerEvent, RunnerMessage, RunnerRequest,
};
use bulkhead_ipc::transport::{decode, decode_frame, encode_frame, HEADER_LEN, MAX_FRAME};
use bulkhead_ipc::{Channel, IpcError, Role, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::mix;

fn hash_str(s: &str) -> u64 {
    s.bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| mix(h, u64::from(b)))
}

/// Decodes `payload` as a `T`; a value must survive encode → frame → decode unchanged.
fn roundtrip<T>(payload: &[u8]) -> u64
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    match decode::<T>(payload) {
        Ok(v) => {
            let frame = match encode_frame(&v) {
                Ok(f) => f,
                // A decoded value is never larger than its encoding plus a little.
                Err(e) => panic!("a decoded value does not encode again: {e}"),
            };
            let back: T = decode(decode_frame(&frame).expect("own frame")).expect("own payload");
            assert_eq!(back, v, "value changed over a round trip");
            // Signature: the variant (postcard puts it first).
            mix(1, u64::from(payload.first().copied().unwrap_or(0)))
        }
        Err(IpcError::Decode(msg)) => {
            // The kind of error, without the details that vary.
            let kind: String = msg.chars().take_while(|c| *c != ':').take(40).collect();
            mix(2, hash_str(&kind))
        }
        Err(e) => panic!("decode returned a non-decode error: {e:?}"),
    }
}

/// `decode_frame` on the input; every decoder on the payload it returns.
pub fn run_frame(data: &[u8]) -> u64 {
    let sig = match decode_frame(data) {
        Ok(p) => {
            assert!(data.len() >= HEADER_LEN && p.len() == data.len() - HEADER_LEN);
            let claimed = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
            assert_eq!(claimed, p.len());
            assert!(p.len() <= MAX_FRAME);
            let mut s = 1;
            s = mix(s, roundtrip::<Request>(p));
            s = mix(s, roundtrip::<Reply>(p));
            s = mix(s, roundtrip::<RunnerCommand>(p));
            s = mix(s, roundtrip::<RunnerEvent>(p));
            s = mix(s, roundtrip::<RunnerRequest>(p));
            s = mix(s, roundtrip::<RunnerMessage>(p));
            s = mix(s, roundtrip::<Hello>(p));
            mix(s, roundtrip::<HelloReply>(p))
        }
        Err(IpcError::Truncated) => {
            let ok_len = data.len() >= HEADER_LEN
                && u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize
                    == data.len() - HEADER_LEN;
            assert!(!ok_len, "a frame whose header matches was called truncated");
            2
        }
        Err(IpcError::Oversized) => {
            let claimed = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
            assert!(claimed > MAX_FRAME || data.len() - HEADER_LEN > MAX_FRAME);
            3
        }
        Err(e) => panic!("decode_frame returned {e:?}"),
    };
    sig
}

/// `decode::<Request>`.
pub fn run_request(data: &[u8]) -> u64 {
    roundtrip::<Request>(data)
}

/// `decode::<Reply>`.
pub fn run_reply(data: &[u8]) -> u64 {
    roundtrip::<Reply>(data)
}

/// `decode::<RunnerCommand>`.
pub fn run_runner_command(data: &[u8]) -> u64 {
    roundtrip::<RunnerCommand>(data)
}

/// `decode::<RunnerEvent>`.
pub fn run_runner_event(data: &[u8]) -> u64 {
    roundtrip::<RunnerEvent>(data)
}

/// `decode::<RunnerRequest>` (what a runner reads).
pub fn run_runner_request(data: &[u8]) -> u64 {
    roundtrip::<RunnerRequest>(data)
}

/// `decode::<RunnerMessage>` (what `bulkheadd` reads from a runner).
pub fn run_runner_message(data: &[u8]) -> u64 {
    roundtrip::<RunnerMessage>(data)
}

struct Pair {
    client: Channel,
    server: Channel,
    spare: OwnedFd,
}

thread_local! {
    static PAIR: RefCell<Option<Pair>> = const { RefCell::new(None) };
}

/// Sends `bytes` as one raw datagram with `nfds` descriptors attached.
fn raw_send(ch: &Channel, bytes: &[u8], fds: &[i32]) -> bool {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(ch.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_DONTWAIT, None).is_ok()
}

/// The handshake's server side on a raw first datagram:
///
/// ```text
/// u8 fds to attach (mod 12), then the datagram (a frame, or anything)
/// ```
pub fn run_hello(data: &[u8]) -> u64 {
    let (nfds, datagram) = match data.split_first() {
        Some((n, rest)) => (usize::from(*n % 12), rest),
        None => (0, data),
    };
    let mut sig = mix(
        roundtrip::<Hello>(datagram),
        roundtrip::<HelloReply>(datagram),
    );
    PAIR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let pair = slot.get_or_insert_with(|| {
            let (client, server) = Channel::pair().expect("socketpair");
            let spare = client.as_fd().try_clone_to_owned().expect("dup");
            Pair {
                client,
                server,
                spare,
            }
        });
        let fds = vec![pair.spare.as_raw_fd(); nfds];
        if !raw_send(&pair.client, datagram, &fds) {
            // Larger than the socket takes: nothing to test.
            return;
        }
        let expected = decode_frame(datagram)
            .ok()
            .and_then(|p| decode::<Hello>(p).ok())
            .filter(|h| h.magic == MAGIC && h.version == PROTOCOL_VERSION && nfds <= 8)
            .map(|h| h.role);
        let got = server_hello(&pair.server, Duration::from_secs(5));
        match (&got, expected) {
            (Ok(role), Some(want)) => assert_eq!(*role, want, "welcomed as another role"),
            (Ok(role), None) => panic!("welcomed a bad hello as {role:?}"),
            (Err(IpcError::Closed), _) => {
                assert!(datagram.is_empty(), "Closed for a non-empty datagram");
                sig = mix(sig, 9);
                return;
            }
            (Err(e), Some(_)) => panic!("refused a good hello: {e:?}"),
            (Err(_), None) => {}
        }
        sig = mix(
            sig,
            match &got {
                Ok(_) => 1,
                Err(IpcError::BadHello) => 2,
                Err(IpcError::VersionMismatch { .. }) => 3,
                Err(_) => 4,
            },
        );
        // Every first frame is answered: Welcome exactly when it was accepted.
        let (reply, _) = pair
            .client
            .recv_timeout::<HelloReply>(Duration::from_secs(5))
            .expect("the server answers every hello");
        match reply {
            HelloReply::Welcome { version } => {
                assert!(
                    got.is_ok() && version == PROTOCOL_VERSION,
                    "welcome for a refused hello"
                )
            }
            HelloReply::Refused { .. } => assert!(got.is_err(), "refused an accepted hello"),
        }
        // And the channel still carries the next frame.
        pair.client.send(&Request::List, &[]).expect("send");
        let (next, _) = pair
            .server
            .recv_timeout::<Request>(Duration::from_secs(5))
            .expect("next frame");
        assert_eq!(next, Request::List);
    });
    sig
}

fn payload<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("encode")
}

fn summary() -> VmSummary {
    VmSummary {
        name: "web1".into(),
        id: 3,
        state: VmState::Stopped(StopReason::Crashed("triple fault".into())),
        vcpus: 2,
        memory_mib: 512,
        owner: 1000,
        runner_pid: Some(4242),
        uptime_secs: 77,
    }
}

/// Every `Request` variant.
pub fn seeds_request() -> Vec<Vec<u8>> {
    let n = || "vm1".to_string();
    [
        Request::Create {
            config_toml: "name = \"a\"\nvcpus = 1\n".into(),
            config_dir: "/srv".into(),
        },
        Request::List,
        Request::Info { name: n() },
        Request::Console { name: n() },
        Request::ConsoleInput {
            data: b"ls\r".to_vec(),
        },
        Request::ConsoleDetach,
        Request::Pause { name: n() },
        Request::Unpause { name: n() },
        Request::Shutdown {
            name: n(),
            timeout_secs: 30,
        },
        Request::Destroy { name: n() },
        Request::DeviceRestart {
            name: n(),
            device: "disk0".into(),
        },
        Request::DeviceUpgrade {
            name: n(),
            device: "nic0".into(),
            binary: "/usr/libexec/bulkhead-net".into(),
        },
        Request::Stats { name: Some(n()) },
        Request::DeviceSetLimit {
            name: n(),
            device: "disk0".into(),
            limits: bulkhead_ipc::control::LimitsUpdate {
                ops: Some(1000),
                ..Default::default()
            },
        },
        Request::Save {
            name: n(),
            keep_running: true,
        },
        Request::Restore {
            name: Some("vm2".into()),
        },
    ]
    .iter()
    .map(payload)
    .collect()
}

/// Every `Reply` variant.
pub fn seeds_reply() -> Vec<Vec<u8>> {
    [
        Reply::Done {
            message: "ok".into(),
        },
        Reply::Created { vm: summary() },
        Reply::List {
            vms: vec![summary(), summary()],
        },
        Reply::Info {
            vm: VmInfo {
                summary: summary(),
                kernel: "/k".into(),
                hugepages: false,
                initrd: Some("/i".into()),
                cmdline: "console=ttyS0".into(),
                runner_uid: Some(61000),
                disks: vec!["disk0".into()],
                nics: vec![],
            },
        },
        Reply::Stats {
            vms: vec![bulkhead_ipc::control::VmStats {
                summary: summary(),
                cpu_ns: 1,
                vcpus: vec![Default::default()],
                devices: vec![bulkhead_ipc::control::DeviceStats {
                    device: "disk0".into(),
                    queues: vec![Default::default()],
                    ..Default::default()
                }],
            }],
        },
        Reply::ConsoleAttached {
            history: b"boot\n".to_vec(),
        },
        Reply::ConsoleOutput { data: vec![0, 255] },
        Reply::ConsoleClosed {
            reason: "stopped".into(),
        },
        Reply::Error {
            code: ErrorCode::Denied,
            message: "denied by rule 'limits.max_memory'".into(),
        },
        Reply::Error {
            code: ErrorCode::BadSnapshot,
            message: "snapshot refused: snapshot is truncated".into(),
        },
    ]
    .iter()
    .map(payload)
    .collect()
}

/// Every `RunnerCommand` variant.
pub fn seeds_runner_command() -> Vec<Vec<u8>> {
    runner_commands().iter().map(payload).collect()
}

fn runner_commands() -> Vec<RunnerCommand> {
    vec![
        RunnerCommand::Boot(BootSpec {
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            has_initrd: true,
            kernel_name: "vmlinux".into(),
            disks: vec!["disk0".into()],
            nics: vec!["nic0".into()],
            cpu_template: "minimal".into(),
            hang_timeouts_ms: vec![2000, 0],
        }),
        RunnerCommand::Pause,
        RunnerCommand::Resume,
        RunnerCommand::RequestShutdown,
        RunnerCommand::Status,
        RunnerCommand::VcpuStats,
        RunnerCommand::ConsoleInput(b"x".to_vec()),
        RunnerCommand::ReconnectDevice {
            device: "disk0".into(),
        },
        RunnerCommand::SaveState,
        RunnerCommand::EndSave { resume: false },
        RunnerCommand::Restore(bulkhead_ipc::runner::RestoreSpec {
            vcpus: 1,
            cpu_template: "host".into(),
            disks: vec!["disk0".into()],
            nics: vec![],
            hang_timeouts_ms: vec![0],
            records: vec![bulkhead_ipc::runner::StateRecord {
                name: "vm".into(),
                data: vec![1, 2, 3],
            }],
        }),
    ]
}

/// Every `RunnerCommand` variant, with ids.
pub fn seeds_runner_request() -> Vec<Vec<u8>> {
    runner_commands()
        .into_iter()
        .enumerate()
        .map(|(i, command)| {
            payload(&RunnerRequest {
                id: [0, 1, 300, u64::MAX][i % 4],
                command,
            })
        })
        .collect()
}

/// Answers and events, every `RunnerEvent` variant.
pub fn seeds_runner_message() -> Vec<Vec<u8>> {
    runner_events()
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            payload(&if i % 2 == 0 {
                RunnerMessage::Answer {
                    id: i as u64 * 1000,
                    event,
                }
            } else {
                RunnerMessage::Event(event)
            })
        })
        .collect()
}

/// Every `RunnerEvent` variant.
pub fn seeds_runner_event() -> Vec<Vec<u8>> {
    runner_events().iter().map(payload).collect()
}

fn runner_events() -> Vec<RunnerEvent> {
    vec![
        RunnerEvent::Started {
            detail: "pvh".into(),
        },
        RunnerEvent::BootFailed {
            message: "no kernel".into(),
        },
        RunnerEvent::Paused,
        RunnerEvent::Resumed,
        RunnerEvent::State {
            booted: true,
            paused: false,
        },
        RunnerEvent::Console(b"hello\n".to_vec()),
        RunnerEvent::ShutdownRequested,
        RunnerEvent::VcpuStats(vec![bulkhead_ipc::runner::VcpuCounters {
            exits: 1,
            run_ns: 2,
        }]),
        RunnerEvent::DeviceReconnected {
            device: "nic0".into(),
        },
        RunnerEvent::Exited(GuestOutcome::DebugExit(7)),
        RunnerEvent::Exited(GuestOutcome::Failed("triple fault".into())),
        RunnerEvent::Exited(GuestOutcome::Reset),
        RunnerEvent::DeviceHung {
            device: "disk0".into(),
            stalled_ms: 2000,
        },
        RunnerEvent::Error {
            message: "bad".into(),
        },
        RunnerEvent::Saved {
            records: vec![bulkhead_ipc::runner::StateRecord {
                name: "vcpu0".into(),
                data: vec![0; 64],
            }],
        },
    ]
}

/// Frames of a few messages.
pub fn seeds_frame() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        encode_frame(&Request::List).expect("frame"),
        encode_frame(&Hello::new(Role::Cli)).expect("frame"),
        encode_frame(&RunnerEvent::Paused).expect("frame"),
    ];
    v.push(vec![0xff, 0xff, 0xff, 0xff]);
    v
}

/// Hellos: good ones of every role, another version, bad magic, with descriptors.
pub fn seeds_hello() -> Vec<Vec<u8>> {
    let with = |nfds: u8, frame: Vec<u8>| {
        let mut v = vec![nfds];
        v.extend(frame);
        v
    };
    let mut out = Vec::new();
    for role in [Role::Cli, Role::Daemon, Role::Runner, Role::Backend] {
        out.push(with(0, encode_frame(&Hello::new(role)).expect("frame")));
    }
    let mut later = Hello::new(Role::Cli);
    later.version = PROTOCOL_VERSION + 1;
    out.push(with(0, encode_frame(&later).expect("frame")));
    let mut bad = Hello::new(Role::Runner);
    bad.magic = *b"XULKHEAD";
    out.push(with(1, encode_frame(&bad).expect("frame")));
    out.push(with(
        9,
        encode_frame(&Hello::new(Role::Cli)).expect("frame"),
    ));
    out.push(with(
        0,
        encode_frame(&HelloReply::Welcome { version: 1 }).expect("frame"),
    ));
    out
}
