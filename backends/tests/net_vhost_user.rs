//! End to end: the `bulkhead-net` binary driven by the `vhost` crate's vhost-user frontend
//! over a socketpair in sandboxed mode (`--socket-fd`, `--tap-fd`), with a real tap in a
//! private network namespace: negotiation, GET_CONFIG, one frame each way. Plus argument
//! errors and a standalone reconnect.

mod net_util;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use net_util::{frame, NetnsTap, Ring};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-net");
const MEM: usize = 0x20_0000;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HDR: usize = 12;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stderr_of(child: &mut Kill) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

/// Spawns the binary with `fds` inherited (FD_CLOEXEC cleared in the child only).
fn spawn(args: &[String], fds: &[RawFd]) -> Kill {
    let fds = fds.to_vec();
    let mut cmd = Command::new(BIN);
    cmd.args(args).stderr(Stdio::piped());
    // SAFETY: between fork and exec we only clear FD_CLOEXEC on fds we own
    // (async-signal-safe fcntl calls).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Kill(cmd.spawn().unwrap())
}

fn negotiate(fe: &mut Frontend, expect_mac: bool) -> Vec<u8> {
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_GUEST_CSUM,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
    }
    assert_ne!(features & PROTOCOL_FEATURES_BIT, 0);
    assert_eq!(features & (1 << VIRTIO_NET_F_MAC) != 0, expect_mac);
    // Everything offered, so the tap gets TUNSETOFFLOAD with checksum and TSO.
    fe.set_features(features).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(pf.contains(want), "protocol features {pf:?}");
    fe.set_protocol_features(want).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    let (_, config) = fe
        .get_config(0, 10, VhostUserConfigFlags::WRITABLE, &[0u8; 10])
        .unwrap();
    config
}

fn guest_memory() -> (GuestMemoryMmap, File) {
    let fd = nix::sys::memfd::memfd_create(
        c"bulkhead-net-e2e",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .unwrap();
    let file = File::from(fd);
    file.set_len(MEM as u64).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    (mem, file)
}

fn host(mem: &GuestMemoryMmap, a: u64) -> u64 {
    mem.get_host_address(GuestAddress(a)).unwrap() as u64
}

/// Configures and starts vring `index`; returns its (call, kick) eventfds.
fn setup_vring(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap,
    index: usize,
    ring: &Ring,
) -> (EventFd, EventFd) {
    fe.set_vring_num(index, ring.size).unwrap();
    fe.set_vring_addr(
        index,
        &VringConfigData {
            queue_max_size: 256,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: host(mem, ring.desc),
            used_ring_addr: host(mem, ring.used),
            avail_ring_addr: host(mem, ring.avail),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(index, 0).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(index, &call).unwrap();
    fe.set_vring_kick(index, &kick).unwrap();
    fe.set_vring_enable(index, true).unwrap();
    (call, kick)
}

fn wait_used(mem: &GuestMemoryMmap, ring: &Ring, n: u16) -> Result<(), String> {
    let start = Instant::now();
    while ring.used_idx(mem) < n {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("used idx stuck at {}", ring.used_idx(mem)));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Sets up both rings, sends one frame from the guest and receives one from the host side.
fn data_path(fe: &mut Frontend, ns: &NetnsTap) -> Result<(), String> {
    let (mem, _memfd) = guest_memory();
    let region = mem.iter().next().unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    fe.set_mem_table(&[info]).unwrap();

    let mut rx = Ring::new(0x1_0000, 16);
    let mut tx = Ring::new(0x2_0000, 16);
    // Post RX buffers before the ring starts; used_event 0 (EVENT_IDX) asks for a call.
    for i in 0..8u64 {
        rx.add_chain(&mem, &[(0x10_0000 + i * 0x1000, 2048, true)]);
    }
    let (rx_call, _rx_kick) = setup_vring(fe, &mem, 0, &rx);
    let (_tx_call, tx_kick) = setup_vring(fe, &mem, 1, &tx);

    // Guest -> host: header (no offload) + frame.
    let out = frame(
        [0xff; 6],
        MAC,
        b"hello from the guest, over a vhost-user tap",
    );
    let buf = 0x8_0000u64;
    mem.write_slice(&[0u8; HDR], GuestAddress(buf)).unwrap();
    mem.write_slice(&out, GuestAddress(buf + HDR as u64))
        .unwrap();
    tx.add_chain(
        &mem,
        &[
            (buf, HDR as u32, false),
            (buf + HDR as u64, out.len() as u32, false),
        ],
    );
    tx_kick.write(1).unwrap();
    wait_used(&mem, &tx, 1)?;
    let seen = ns
        .receive(Duration::from_secs(10))
        .ok_or("the guest's frame never reached the tap")?;
    if seen != out {
        return Err(format!("frame on the tap differs: {seen:x?}"));
    }

    // Host -> guest.
    let inbound = frame(
        MAC,
        [2, 0, 0, 0, 0, 7],
        b"hello from the host side of the tap",
    );
    ns.inject(&inbound);
    let start = Instant::now();
    loop {
        let used = rx.used_idx(&mem);
        for i in 0..used {
            let (head, len) = rx.used_entry(&mem, i);
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, GuestAddress(0x10_0000 + u64::from(head) * 0x1000))
                .unwrap();
            if got.len() == HDR + inbound.len() && got[HDR..] == inbound[..] {
                if u16::from_le_bytes([got[10], got[11]]) != 1 {
                    return Err("num_buffers is not 1".into());
                }
                // used_event is 0, so the first used entry raised the call eventfd.
                if rx_call.read().is_err() {
                    return Err("the guest was not notified of RX".into());
                }
                return Ok(());
            }
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "the host's frame never reached the guest ({used} used)"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sandboxed_inherited_socket_moves_frames_both_ways() {
    let ns = NetnsTap::new();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let theirs = OwnedFd::from(theirs);
    let (sfd, tfd) = (theirs.as_raw_fd(), ns.tap.as_raw_fd());
    let mut child = spawn(
        &[
            "--socket-fd".into(),
            sfd.to_string(),
            "--tap-fd".into(),
            tfd.to_string(),
            "--mac".into(),
            "52:54:00:12:34:56".into(),
        ],
        &[sfd, tfd],
    );
    drop(theirs);

    let mut fe = Frontend::from_stream(ours, 2);
    let config = negotiate(&mut fe, true);
    assert_eq!(&config[0..6], &MAC, "mac");
    assert_eq!(
        u16::from_le_bytes([config[6], config[7]]),
        1,
        "status LINK_UP"
    );
    assert_eq!(
        u16::from_le_bytes([config[8], config[9]]),
        1,
        "max_virtqueue_pairs"
    );

    if let Err(e) = data_path(&mut fe, &ns) {
        let _ = child.0.kill();
        panic!("{e}: {}", stderr_of(&mut child));
    }

    // The frontend leaves: the sandboxed backend serves one connection and exits cleanly.
    drop(fe);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "backend did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = stderr_of(&mut child);
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(err.contains("serving the inherited connection"), "{err}");
    assert!(err.contains("tx 1 packets"), "{err}");
    assert!(!err.contains("failed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn standalone_serves_one_frontend_after_another() {
    let ns = NetnsTap::new();
    let sock = std::env::temp_dir().join(format!("bulkhead-net-e2e-{}.sock", std::process::id()));
    let tfd = ns.tap.as_raw_fd();
    let child = spawn(
        &[
            "--socket".into(),
            sock.to_str().unwrap().into(),
            "--tap-fd".into(),
            tfd.to_string(),
        ],
        &[tfd],
    );
    let _child = child;
    let start = Instant::now();
    let mut fe = loop {
        if let Ok(fe) = Frontend::connect(&sock, 2) {
            break fe;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "backend never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for round in 0..3 {
        if round > 0 {
            fe = Frontend::connect(&sock, 2).unwrap_or_else(|e| panic!("reconnect {round}: {e}"));
        }
        let config = negotiate(&mut fe, false);
        assert_eq!(&config[0..6], &[0; 6], "no MAC without --mac");
        assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1);
        if round == 1 {
            data_path(&mut fe, &ns).unwrap();
        }
        drop(fe);
        fe = Frontend::connect(&sock, 2).unwrap();
        drop(fe);
        std::thread::sleep(Duration::from_millis(20));
        fe = Frontend::connect(&sock, 2).unwrap();
        let _ = &fe;
    }
    drop(fe);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn bad_arguments_exit_2() {
    let devnull = File::open("/dev/null").unwrap();
    let nfd = devnull.as_raw_fd().to_string();
    for args in [
        vec![],
        vec!["--socket", "/tmp/bulkhead-net-x.sock"],
        vec!["--socket-fd", "1000", "--tap-fd", "1001"],
        vec!["--socket", "/tmp/bulkhead-net-x.sock", "--tap-fd", "1001"],
        vec![
            "--socket",
            "/tmp/bulkhead-net-x.sock",
            "--tap",
            "a-name-much-too-long",
        ],
        vec![
            "--socket",
            "/tmp/bulkhead-net-x.sock",
            "--tap-fd",
            "1001",
            "--mac",
            "52:54:00",
        ],
        vec![
            "--socket",
            "/tmp/bulkhead-net-x.sock",
            "--tap-fd",
            "1001",
            "--mac",
            "01:00:5e:00:00:01",
        ],
        vec!["--socket-fd", "5", "--tap", "tap0"],
        vec![
            "--socket",
            "/tmp/bulkhead-net-x.sock",
            "--ready-fd",
            "9",
            "--tap",
            "tap0",
        ],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // An fd that is not a tap.
    let mut child = spawn(
        &[
            "--socket".into(),
            "/tmp/bulkhead-net-x.sock".into(),
            "--tap-fd".into(),
            nfd.clone(),
        ],
        &[devnull.as_raw_fd()],
    );
    let status = child.0.wait().unwrap();
    let err = stderr_of(&mut child);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("tap"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");

    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in ["--socket-fd", "--tap-fd", "--tap ", "--mac", "--ready-fd"] {
        assert!(help.contains(opt), "{opt} missing from --help");
    }
}
