//! Listener/connect, credentials, cloning, non-blocking mode and timeouts.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_ipc::control::{Reply, Request};
use bulkhead_ipc::hello::{client_hello, server_hello};
use bulkhead_ipc::{Channel, IpcError, Listener, Role};
use common::SHORT;

/// A fresh directory for one test's socket; removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "bulkhead-ipc-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("mkdir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn listener_accepts_and_both_sides_talk() {
    let dir = TempDir::new();
    let path = dir.0.join("control.sock");
    let listener = Listener::bind(&path).expect("bind");
    let p = path.clone();
    let t = thread::spawn(move || {
        let ch = Channel::connect(&p).expect("connect");
        client_hello(&ch, Role::Cli, SHORT).expect("hello");
        ch.send(&Request::Info { name: "web".into() }, &[])
            .expect("send");
        ch.recv::<Reply>().expect("reply").0
    });
    let ch = listener.accept().expect("accept");
    assert_eq!(server_hello(&ch, SHORT).expect("hello"), Role::Cli);
    let creds = ch.peer_credentials().expect("creds");
    assert_eq!(creds.pid, std::process::id() as i32);
    assert_eq!(creds.uid, nix::unistd::geteuid().as_raw());
    assert_eq!(creds.gid, nix::unistd::getegid().as_raw());
    let (req, _) = ch.recv::<Request>().expect("request");
    assert_eq!(req, Request::Info { name: "web".into() });
    ch.send(
        &Reply::Done {
            message: "ok".into(),
        },
        &[],
    )
    .expect("reply");
    assert_eq!(
        t.join().expect("join"),
        Reply::Done {
            message: "ok".into()
        }
    );
}

#[test]
fn bind_replaces_a_stale_socket_but_not_a_live_one() {
    let dir = TempDir::new();
    let path = dir.0.join("d.sock");
    let first = Listener::bind(&path).expect("bind");
    // Live: someone is listening.
    match Listener::bind(&path) {
        Err(IpcError::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse)
        }
        other => panic!("expected AddrInUse, got {other:?}"),
    }
    drop(first);
    // Stale: the file remains, nobody listens.
    assert!(std::fs::symlink_metadata(&path)
        .expect("stat")
        .file_type()
        .is_socket());
    let _second = Listener::bind(&path).expect("rebind over stale socket");
    let _ch = Channel::connect(&path).expect("connect");
}

#[test]
fn bind_does_not_delete_other_files() {
    let dir = TempDir::new();
    let path = dir.0.join("not-a-socket");
    std::fs::write(&path, b"precious").expect("write");
    assert!(Listener::bind(&path).is_err());
    assert_eq!(std::fs::read(&path).expect("read"), b"precious");
    // And a missing parent directory is an error, not a panic.
    assert!(Listener::bind(&dir.0.join("missing/x.sock")).is_err());
}

#[test]
fn connect_to_nothing_is_an_error() {
    let dir = TempDir::new();
    assert!(matches!(
        Channel::connect(&dir.0.join("nobody.sock")),
        Err(IpcError::Io { .. })
    ));
}

#[test]
fn clone_reads_while_original_writes() {
    let (a, b) = Channel::pair().expect("socketpair");
    let reader = a.try_clone().expect("clone");
    let t = thread::spawn(move || {
        (0..100)
            .map(|_| reader.recv::<Reply>().expect("recv").0)
            .collect::<Vec<_>>()
    });
    let echo = thread::spawn(move || {
        for i in 0..100u32 {
            let (req, _) = b.recv::<Request>().expect("recv");
            assert_eq!(
                req,
                Request::Info {
                    name: i.to_string()
                }
            );
            b.send(
                &Reply::Done {
                    message: i.to_string(),
                },
                &[],
            )
            .expect("send");
        }
    });
    for i in 0..100u32 {
        a.send(
            &Request::Info {
                name: i.to_string(),
            },
            &[],
        )
        .expect("send");
    }
    echo.join().expect("echo");
    let got = t.join().expect("reader");
    assert_eq!(got.len(), 100);
    assert_eq!(
        got[99],
        Reply::Done {
            message: "99".into()
        }
    );
}

#[test]
fn nonblocking_would_block() {
    let (a, b) = Channel::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    assert!(matches!(a.recv::<Request>(), Err(IpcError::WouldBlock)));
    b.send(&Request::List, &[]).expect("send");
    assert_eq!(a.recv::<Request>().expect("recv").0, Request::List);
    a.set_nonblocking(false).expect("blocking");

    let dir = TempDir::new();
    let l = Listener::bind(&dir.0.join("l.sock")).expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    assert!(matches!(l.accept(), Err(IpcError::WouldBlock)));
}

#[test]
fn recv_timeout_waits_about_the_timeout() {
    let (a, b) = Channel::pair().expect("socketpair");
    let start = Instant::now();
    assert!(matches!(
        a.recv_timeout::<Request>(Duration::from_millis(100)),
        Err(IpcError::Timeout)
    ));
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert!(matches!(
        a.recv_timeout::<Request>(Duration::ZERO),
        Err(IpcError::Timeout)
    ));
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        b.send(&Request::ConsoleDetach, &[]).expect("send");
        b
    });
    let (m, _) = a.recv_timeout::<Request>(SHORT).expect("recv");
    assert_eq!(m, Request::ConsoleDetach);
    drop(t.join());
}

#[test]
fn from_fd_and_into_fd() {
    let (a, b) = Channel::pair().expect("socketpair");
    let a = Channel::from_fd(a.into_fd());
    a.send(&Request::List, &[]).expect("send");
    assert_eq!(b.recv::<Request>().expect("recv").0, Request::List);
}
