//! End to end: the `bulkhead-blk` binary driven by the `vhost` crate's vhost-user frontend,
//! standalone (with a reconnect) and sandboxed on an inherited socket (`--socket-fd`).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-blk");
const SECTORS: u64 = 128;
const MEM: usize = 0x10_0000;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("bulkhead-blk-e2e-{}-{name}", std::process::id()))
}

fn make_image(path: &Path) {
    let mut f = File::create(path).unwrap();
    for i in 0..SECTORS {
        f.write_all(&[(i as u8).wrapping_add(1); 512]).unwrap();
    }
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn negotiate(fe: &mut Frontend, expect_ro: bool) -> Vec<u8> {
    negotiate_with(fe, expect_ro, VhostUserProtocolFeatures::empty())
}

/// Negotiates like QEMU would, also acking the protocol features in `extra`.
fn negotiate_with(fe: &mut Frontend, expect_ro: bool, extra: VhostUserProtocolFeatures) -> Vec<u8> {
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_ne!(features & PROTOCOL_FEATURES_BIT, 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO) != 0, expect_ro);
    fe.set_features(features).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | extra;
    assert!(pf.contains(want), "protocol features {pf:?}");
    fe.set_protocol_features(want).unwrap();
    let (_, config) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();
    assert_eq!(config.len(), 60);
    config
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

#[test]
fn standalone_negotiates_serves_config_and_accepts_reconnects() {
    let img = scratch("standalone.img");
    let sock = scratch("standalone.sock");
    make_image(&img);
    // A stale socket file left behind must not stop the backend.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let child = Command::new(BIN)
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
        ])
        .args(["--serial", "disk-0", "--queues", "2", "--readonly"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Kill(child);
    // The stale socket is replaced; wait until the backend answers.
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
            // The backend keeps the image open and accepts the next frontend.
            fe = Frontend::connect(&sock, 2).unwrap_or_else(|e| panic!("reconnect {round}: {e}"));
        }
        let config = negotiate(&mut fe, true);
        assert_eq!(le64(&config[0..8]), SECTORS, "capacity");
        assert_eq!(
            u32::from_le_bytes(config[20..24].try_into().unwrap()),
            512,
            "blk_size"
        );
        assert_eq!(
            u16::from_le_bytes(config[34..36].try_into().unwrap()),
            2,
            "num_queues"
        );
        assert_eq!(fe.get_queue_num().unwrap(), 2);
        if round == 1 {
            data_path(&mut fe, b"disk-0").unwrap();
        }
        if round < 2 {
            drop(fe);
            fe = Frontend::connect(&sock, 2).unwrap();
            drop(fe);
            fe = Frontend::connect(&sock, 2).unwrap();
            let _ = &fe;
        }
    }
    drop(fe);
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        vec!["--socket", "/tmp/x.sock"],
        vec![
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/nonexistent/bulkhead.img",
        ],
        vec!["--socket-fd", "1000", "--image-fd", "1001"],
        vec![
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/dev/null",
            "--queues",
            "9",
        ],
        vec![
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/etc/hostname",
            "--serial",
            "012345678901234567890",
        ],
        vec![
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/etc/hostname",
            "--cache",
            "unsafe",
        ],
        vec![
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/etc/hostname",
            "--io-engine",
            "aio",
        ],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--socket-fd"));
}

/// Guest memory backed by a memfd the backend can map.
fn guest_memory() -> (GuestMemoryMmap, File) {
    let fd = nix::sys::memfd::memfd_create(
        c"bulkhead-e2e",
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

fn host(mem: &GuestMemoryMmap, a: GuestAddress) -> u64 {
    mem.get_host_address(a).unwrap() as u64
}

const QSIZE: u16 = 16;
/// Split ring layout of queue 0 (the mock's own layout overlaps its rings beyond one chain).
const DESC_TABLE: GuestAddress = GuestAddress(0);
const AVAIL: GuestAddress = GuestAddress(0x1000);
const USED: GuestAddress = GuestAddress(0x2000);

/// Starts queue 0 (QSIZE entries at DESC_TABLE/AVAIL/USED) at avail index `base`; returns
/// its call and kick eventfds.
fn start_ring(fe: &mut Frontend, mem: &GuestMemoryMmap, base: u16) -> (EventFd, EventFd) {
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 256,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host(mem, DESC_TABLE),
            used_ring_addr: host(mem, USED),
            avail_ring_addr: host(mem, AVAIL),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, base).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    (call, kick)
}

/// Waits (with a deadline) for the used index of queue 0 to reach `want`.
fn wait_used(mem: &GuestMemoryMmap, want: u16) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let used_idx: u16 = mem.read_obj(GuestAddress(USED.0 + 2)).unwrap();
        if used_idx == want {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("used index {used_idx}, never reached {want}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sets up queue 0 over memfd-backed guest memory, submits a read and a GET_ID, and checks
/// both complete with the guest notified.
fn data_path(fe: &mut Frontend, serial: &[u8]) -> Result<(), String> {
    let (mem, _memfd) = guest_memory();
    let region = mem.iter().next().unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    fe.set_mem_table(&[info]).unwrap();

    let (call, kick) = start_ring(fe, &mem, 0);

    // Request 1: read sectors 3..5; request 2: GET_ID.
    let (hdr1, data1, st1) = (0x1_0000u64, 0x2_0000u64, 0x3_0000u64);
    let (hdr2, data2, st2) = (0x1_0100u64, 0x2_1000u64, 0x3_0100u64);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&3u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr1)).unwrap();
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr2)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(st1)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(st2)).unwrap();
    let w = VRING_DESC_F_WRITE as u16;
    let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(hdr1, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(data1, 1024, w | next, 2)),
        RawDescriptor::from(SplitDescriptor::new(st1, 1, w, 0)),
        RawDescriptor::from(SplitDescriptor::new(hdr2, 16, next, 4)),
        RawDescriptor::from(SplitDescriptor::new(data2, 20, w | next, 5)),
        RawDescriptor::from(SplitDescriptor::new(st2, 1, w, 0)),
    ];
    for (i, d) in descs.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(DESC_TABLE.0 + 16 * i as u64))
            .unwrap();
    }
    // Two chains (heads 0 and 3); used_event 0 asks for an interrupt at once (EVENT_IDX).
    mem.write_obj(0u16, GuestAddress(AVAIL.0 + 4)).unwrap();
    mem.write_obj(3u16, GuestAddress(AVAIL.0 + 6)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL.0 + 4 + 2 * u64::from(QSIZE)))
        .unwrap();
    mem.write_obj(2u16, GuestAddress(AVAIL.0 + 2)).unwrap();
    kick.write(1).unwrap();

    wait_used(&mem, 2)?;
    let start = Instant::now();
    while call.read().is_err() {
        if start.elapsed() > Duration::from_secs(5) {
            return Err("the guest was not notified".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(st1)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(st2)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    let mut data = vec![0u8; 1024];
    mem.read_slice(&mut data, GuestAddress(data1)).unwrap();
    assert!(data[..512].iter().all(|&b| b == 4));
    assert!(data[512..].iter().all(|&b| b == 5));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(data2)).unwrap();
    assert_eq!(&id[..serial.len()], serial);
    Ok(())
}

/// Starts `bulkhead-blk` sandboxed on an inherited connected socket (`--socket-fd`) serving
/// `img`; returns the process (stderr piped) and our end of the socket.
fn spawn_sandboxed(img: &Path, serial: &str) -> (Kill, UnixStream) {
    spawn_sandboxed_with(img, serial, &[])
}

/// [`spawn_sandboxed`] with extra arguments.
fn spawn_sandboxed_with(img: &Path, serial: &str, extra: &[&str]) -> (Kill, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut args = vec!["--serial", serial];
    args.extend_from_slice(extra);
    (spawn_inheriting(OwnedFd::from(theirs), img, &args), ours)
}

/// Starts `bulkhead-blk` sandboxed with `sock` as its inherited `--socket-fd` and `img`
/// opened read-write as its `--image-fd`, stderr piped.
fn spawn_inheriting(sock: OwnedFd, img: &Path, extra: &[&str]) -> Kill {
    let image = File::options().read(true).write(true).open(img).unwrap();
    let (sfd, ifd) = (sock.as_raw_fd(), image.as_raw_fd());
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--socket-fd",
        &sfd.to_string(),
        "--image-fd",
        &ifd.to_string(),
    ])
    .args(extra)
    .stderr(Stdio::piped());
    // SAFETY: between fork and exec we only clear FD_CLOEXEC on two fds we own
    // (async-signal-safe fcntl calls).
    unsafe {
        cmd.pre_exec(move || {
            for fd in [sfd, ifd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = Kill(cmd.spawn().unwrap());
    drop(sock);
    drop(image);
    child
}

/// Waits (with a deadline) for the backend to exit.
fn wait_exit(child: &mut Kill) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "backend did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything the backend wrote to stderr (it must have exited or be killed first).
fn stderr_of(child: &mut Kill) -> String {
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut e) = child.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

/// An inherited connection whose other end is not root's is refused: under bulkheadd it
/// is always bulkheadd (root) that made it.
#[test]
fn an_inherited_connection_from_a_non_root_peer_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED an_inherited_connection_from_a_non_root_peer_is_refused: needs root to connect as another uid");
        return;
    }
    let img = scratch("foreign-peer.img");
    make_image(&img);
    let dir = scratch("foreign-peer");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = dir.join("s");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    // A thread of its own becomes uid 65534 (a raw setresuid changes only the calling
    // thread) and connects; its end stays open until the test ends.
    let connector = std::thread::spawn(move || {
        // SAFETY: a raw syscall changing this thread's credentials only.
        let r = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
        assert_eq!(r, 0, "setresuid");
        UnixStream::connect(&path).expect("connect as uid 65534")
    });
    let (accepted, _) = listener.accept().unwrap();
    let _their_end = connector.join().unwrap();
    let mut child = spawn_inheriting(OwnedFd::from(accepted), &img, &[]);
    let status = wait_exit(&mut child);
    let err = stderr_of(&mut child);
    assert!(!status.success(), "served a foreign peer\n{err}");
    assert!(
        err.contains("comes from uid 65534, not from bulkheadd"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn sandboxed_inherited_socket_serves_requests() {
    // Every engine's syscalls must be on the allowlist.
    for (engine, cache) in [
        ("auto", "writeback"),
        ("io-uring", "none"),
        ("threads", "writeback"),
        ("threads", "none"),
        ("inline", "writeback"),
    ] {
        let img = scratch(&format!("sandboxed-{engine}-{cache}.img"));
        make_image(&img);
        let (child, ours) = spawn_sandboxed_with(
            &img,
            "sandboxed",
            &["--io-engine", engine, "--cache", cache],
        );
        let mut fe = Frontend::from_stream(ours, 1);
        let config = negotiate(&mut fe, false);
        assert_eq!(le64(&config[0..8]), SECTORS);

        let mut child = child;
        if let Err(e) = data_path(&mut fe, b"sandboxed") {
            let _ = child.0.kill();
            panic!("{engine} {cache}: {e}: {}", stderr_of(&mut child));
        }

        // The frontend leaves: the sandboxed backend serves one connection and exits cleanly.
        drop(fe);
        let status = wait_exit(&mut child);
        let err = stderr_of(&mut child);
        assert!(status.success(), "{engine} {cache}: exit {status:?}: {err}");
        assert!(err.contains("serving the inherited connection"), "{err}");
        assert!(err.contains("I/O engine "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        let _ = std::fs::remove_file(&img);
    }
}

/// A write request of one sector of `byte` to `sector`, as descriptors `head..head+3`, with
/// its header, data and status at `slot`-indexed addresses.
fn write_request(mem: &GuestMemoryMmap, head: u16, slot: u64, sector: u64, byte: u8) -> u64 {
    let (hdr, data, status) = (
        0x1_0000 + slot * 0x100,
        0x2_0000 + slot * 0x1000,
        0x3_0000 + slot * 0x100,
    );
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    mem.write_slice(&[byte; 512], GuestAddress(data)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let w = VRING_DESC_F_WRITE as u16;
    let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    let descs = [
        SplitDescriptor::new(hdr, 16, next, head + 1),
        SplitDescriptor::new(data, 512, next, head + 2),
        SplitDescriptor::new(status, 1, w, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        let at = DESC_TABLE.0 + 16 * (u64::from(head) + i as u64);
        mem.write_obj(RawDescriptor::from(*d), GuestAddress(at))
            .unwrap();
    }
    status
}

fn sector_of(img: &Path, sector: u64) -> Vec<u8> {
    let data = std::fs::read(img).unwrap();
    data[(sector * 512) as usize..(sector * 512 + 512) as usize].to_vec()
}

/// The in-flight protocol end to end, against the libvhost-user layout written here
/// independently: a predecessor took requests C, B, A (heads 6, 3, 0) in that order, completed
/// B out of order and was killed with C and A in flight. The new backend must resubmit C
/// then A, must not redo B, and must continue the avail ring after them. Resuming from the
/// used index instead would redo B and C and lose A.
#[test]
fn inflight_region_resubmits_what_the_previous_backend_left_in_order() {
    let img = scratch("inflight.img");
    make_image(&img);
    let (mut child, ours) = spawn_sandboxed(&img, "inflight");
    let mut fe = Frontend::from_stream(ours, 1);
    negotiate_with(&mut fe, false, VhostUserProtocolFeatures::INFLIGHT_SHMFD);

    // The frontend asks for the region once and keeps it across backends.
    let (info, file) = fe
        .get_inflight_fd(&VhostUserInflight {
            num_queues: 1,
            queue_size: QSIZE,
            ..Default::default()
        })
        .unwrap();
    let per_queue = (16 + 16 * u64::from(QSIZE)).div_ceil(64) * 64;
    assert_eq!(info.mmap_size, per_queue, "one queue's region");
    assert_eq!((info.num_queues, info.queue_size), (1, QSIZE));
    let region = MmapRegion::<()>::from_file(
        FileOffset::new(file.try_clone().unwrap(), info.mmap_offset),
        info.mmap_size as usize,
    )
    .unwrap();
    let put16 = |off: usize, v: u16| region.as_volatile_slice().write_obj(v, off).unwrap();
    let put_desc = |head: u16, inflight: u8, counter: u64| {
        let off = 16 + 16 * usize::from(head);
        region.as_volatile_slice().write_obj(inflight, off).unwrap();
        region
            .as_volatile_slice()
            .write_obj(counter, off + 8)
            .unwrap();
    };
    let get_desc = |head: u16| -> u8 {
        region
            .as_volatile_slice()
            .read_obj(16 + 16 * usize::from(head))
            .unwrap()
    };
    put16(8, 1); // version
    put16(10, QSIZE); // desc_num
    put16(12, 3); // last_batch_head: B
    put16(14, 1); // used_idx: after B
    put_desc(6, 1, 5); // C, taken first
    put_desc(0, 1, 7); // A, taken last
    put_desc(3, 0, 6); // B, done

    let (mem, _memfd) = guest_memory();
    let mem_info =
        VhostUserMemoryRegionInfo::from_guest_region(mem.iter().next().unwrap()).unwrap();
    fe.set_mem_table(&[mem_info]).unwrap();
    let st_a = write_request(&mem, 0, 0, 10, 0xaa);
    write_request(&mem, 3, 1, 11, 0xbb);
    let st_c = write_request(&mem, 6, 2, 12, 0xcc);
    let st_d = write_request(&mem, 9, 3, 13, 0xdd);
    // Avail ring: C, B, A; used ring: B.
    for (i, head) in [6u16, 3, 0].iter().enumerate() {
        mem.write_obj(*head, GuestAddress(AVAIL.0 + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(3u16, GuestAddress(AVAIL.0 + 2)).unwrap();
    mem.write_obj(3u32, GuestAddress(USED.0 + 4)).unwrap();
    mem.write_obj(1u32, GuestAddress(USED.0 + 8)).unwrap();
    mem.write_obj(1u16, GuestAddress(USED.0 + 2)).unwrap();

    fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    // The frontend restarts the ring at the used index, as after any backend crash.
    let (_call, kick) = start_ring(&mut fe, &mem, 1);
    kick.write(1).unwrap();
    if let Err(e) = wait_used(&mem, 3) {
        let _ = child.0.kill();
        panic!("{e}: {}", stderr_of(&mut child));
    }
    let used_id = |i: u64| -> u32 { mem.read_obj(GuestAddress(USED.0 + 4 + 8 * i)).unwrap() };
    assert_eq!((used_id(1), used_id(2)), (6, 0), "C, then A");
    for st in [st_a, st_c] {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
    }
    assert_eq!(sector_of(&img, 10), vec![0xaa; 512]);
    assert_eq!(sector_of(&img, 12), vec![0xcc; 512]);
    assert_eq!(sector_of(&img, 11), vec![12u8; 512], "B was redone");

    // The avail ring continues after the resubmitted requests: D is next.
    mem.write_obj(9u16, GuestAddress(AVAIL.0 + 4 + 2 * 3))
        .unwrap();
    mem.write_obj(4u16, GuestAddress(AVAIL.0 + 2)).unwrap();
    kick.write(1).unwrap();
    if let Err(e) = wait_used(&mem, 4) {
        let _ = child.0.kill();
        panic!("{e}: {}", stderr_of(&mut child));
    }
    assert_eq!(used_id(3), 9);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(st_d)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(sector_of(&img, 13), vec![0xdd; 512]);
    assert_eq!(sector_of(&img, 11), vec![12u8; 512], "B was redone");
    // Nothing is left marked, and the region's used index follows the ring.
    for head in 0..QSIZE {
        assert_eq!(get_desc(head), 0, "head {head} still marked in flight");
    }
    let shadow: u16 = region.as_volatile_slice().read_obj(14).unwrap();
    assert_eq!(shadow, 4);

    drop(fe);
    let status = wait_exit(&mut child);
    let err = stderr_of(&mut child);
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(
        err.contains("resubmitting 2 in-flight request(s) [6, 0]"),
        "{err}"
    );
    let _ = std::fs::remove_file(&img);
}
