//! The handshake: a good one, and every way a first frame can be wrong.

mod common;

use std::os::fd::AsRawFd;
use std::thread;
use std::time::Duration;

use bulkhead_ipc::hello::{client_hello, server_hello, Hello, HelloReply, MAGIC};
use bulkhead_ipc::transport::MAX_FRAME;
use bulkhead_ipc::{Channel, IpcError, Role, PROTOCOL_VERSION};
use common::{framed, raw_send, SHORT};
use serde::Serialize;

#[test]
fn handshake_succeeds_for_every_role() {
    for role in [Role::Cli, Role::Daemon, Role::Runner, Role::Backend] {
        let (client, server) = Channel::pair().expect("socketpair");
        let t = thread::spawn(move || client_hello(&client, role, SHORT).map(|()| client));
        let got = server_hello(&server, SHORT).expect("server hello");
        assert_eq!(got, role);
        let client = t.join().expect("join").expect("client hello");
        // The connection carries requests afterwards.
        client
            .send(&bulkhead_ipc::control::Request::List, &[])
            .expect("send");
        let (req, _) = server
            .recv::<bulkhead_ipc::control::Request>()
            .expect("recv");
        assert_eq!(req, bulkhead_ipc::control::Request::List);
    }
}

/// Send `first` from a raw client, run the server side, and return its result and the
/// reply the client got.
fn serve_raw(first: &[u8]) -> (Result<Role, IpcError>, HelloReply) {
    let (client, server) = Channel::pair().expect("socketpair");
    raw_send(client.as_raw_fd(), first, &[]);
    let res = server_hello(&server, SHORT);
    let (reply, _) = client
        .recv_timeout::<HelloReply>(SHORT)
        .expect("the client gets a reply");
    (res, reply)
}

fn serve<T: Serialize>(first: &T) -> (Result<Role, IpcError>, HelloReply) {
    serve_raw(&framed(&postcard::to_allocvec(first).expect("encode")))
}

fn refused_reason(reply: HelloReply) -> String {
    match reply {
        HelloReply::Refused {
            server_version,
            reason,
        } => {
            assert_eq!(server_version, PROTOCOL_VERSION);
            reason
        }
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[test]
fn wrong_magic_is_refused() {
    let (res, reply) = serve(&Hello {
        magic: *b"BULKHEAF",
        version: PROTOCOL_VERSION,
        role: Role::Cli,
    });
    assert!(matches!(res, Err(IpcError::BadHello)), "{res:?}");
    let reason = refused_reason(reply);
    assert!(reason.contains("not a Bulkhead client"), "{reason}");
}

#[test]
fn wrong_version_is_refused_with_both_versions_named() {
    let theirs = PROTOCOL_VERSION + 1;
    let (res, reply) = serve(&Hello {
        magic: MAGIC,
        version: theirs,
        role: Role::Cli,
    });
    assert!(
        matches!(res, Err(IpcError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: t }) if t == theirs),
        "{res:?}"
    );
    assert_eq!(
        refused_reason(reply),
        format!("protocol version {theirs} is not supported; this bulkheadd speaks version {PROTOCOL_VERSION}")
    );
}

/// A later version's hello, with a role this build does not know and a new field.
#[derive(Serialize)]
struct FutureHello {
    magic: [u8; 8],
    version: u16,
    role: u32,
    features: Vec<String>,
}

#[test]
fn future_hello_with_more_fields_gets_a_version_answer() {
    let (res, reply) = serve(&FutureHello {
        magic: MAGIC,
        version: 7,
        role: 99,
        features: vec!["live-migration".into()],
    });
    assert!(
        matches!(
            res,
            Err(IpcError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 7
            })
        ),
        "{res:?}"
    );
    assert!(refused_reason(reply).contains("protocol version 7 is not supported"));
}

#[test]
fn right_version_but_malformed_is_refused() {
    let (res, reply) = serve(&FutureHello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        role: 99,
        features: vec![],
    });
    assert!(matches!(res, Err(IpcError::BadHello)), "{res:?}");
    assert!(refused_reason(reply).contains("not a Bulkhead client"));
}

#[test]
fn garbage_first_frame_is_refused() {
    for garbage in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        framed(b"\x00\x01\x02"),
        framed(b""),
        vec![0xff; 3],
    ] {
        let (res, reply) = serve_raw(&garbage);
        assert!(matches!(res, Err(IpcError::BadHello)), "{res:?}");
        assert!(refused_reason(reply).contains("not a Bulkhead client"));
    }
}

#[test]
fn a_request_instead_of_a_hello_is_refused() {
    let (res, reply) = serve(&bulkhead_ipc::control::Request::List);
    assert!(matches!(res, Err(IpcError::BadHello)), "{res:?}");
    assert!(refused_reason(reply).contains("not a Bulkhead client"));
}

#[test]
fn oversized_first_frame_is_refused() {
    let mut f = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
    f.resize(MAX_FRAME + 5, 0);
    let (res, reply) = serve_raw(&f);
    assert!(matches!(res, Err(IpcError::BadHello)), "{res:?}");
    assert!(refused_reason(reply).contains("not a Bulkhead client"));
}

#[test]
fn client_sees_refusal_as_an_error() {
    let (client, server) = Channel::pair().expect("socketpair");
    let t = thread::spawn(move || {
        let (_hello, _) = server.recv::<Hello>().expect("hello");
        server
            .send(
                &HelloReply::Refused {
                    server_version: 9,
                    reason: "protocol version 1 is not supported; this bulkheadd speaks version 9"
                        .into(),
                },
                &[],
            )
            .expect("reply");
    });
    let res = client_hello(&client, Role::Cli, SHORT);
    t.join().expect("join");
    match res {
        Err(IpcError::Refused {
            reason,
            server_version: 9,
        }) => assert!(reason.contains("speaks version 9")),
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[test]
fn client_rejects_a_welcome_of_another_version() {
    let (client, server) = Channel::pair().expect("socketpair");
    let t = thread::spawn(move || {
        let _ = server.recv::<Hello>().expect("hello");
        server
            .send(&HelloReply::Welcome { version: 3 }, &[])
            .expect("reply");
    });
    let res = client_hello(&client, Role::Runner, SHORT);
    t.join().expect("join");
    assert!(matches!(
        res,
        Err(IpcError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: 3
        })
    ));
}

#[test]
fn silence_times_out() {
    let (_client, server) = Channel::pair().expect("socketpair");
    let res = server_hello(&server, Duration::from_millis(50));
    assert!(matches!(res, Err(IpcError::Timeout)), "{res:?}");
    let (client, _server) = Channel::pair().expect("socketpair");
    let res = client_hello(&client, Role::Cli, Duration::from_millis(50));
    assert!(matches!(res, Err(IpcError::Timeout)), "{res:?}");
}

#[test]
fn client_that_hangs_up_is_closed() {
    let (client, server) = Channel::pair().expect("socketpair");
    drop(client);
    assert!(matches!(
        server_hello(&server, SHORT),
        Err(IpcError::Closed)
    ));
}
