//! A hostile or broken peer, speaking raw datagrams: every bad frame is the right
//! `IpcError`, its descriptors are closed, and the next good frame still arrives.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use bulkhead_ipc::control::Request;
use bulkhead_ipc::transport::{encode_frame, MAX_FDS, MAX_FRAME};
use bulkhead_ipc::{Channel, IpcError};
use common::{all_writers_closed, framed, pipe, raw, raw_send};

/// Send `bad` (with `nfds` dups of a pipe's write end) raw, expect `check` to accept the
/// error, check those fds were all closed, then check a good frame still gets through.
fn bad_then_good(bad: &[u8], nfds: usize, check: impl Fn(&IpcError) -> bool) {
    let (peer, ch) = Channel::pair().expect("socketpair");
    let (r, w) = pipe();
    let dups: Vec<_> = (0..nfds).map(|_| w.try_clone().expect("dup")).collect();
    drop(w);
    raw_send(peer.as_raw_fd(), bad, &raw(&dups));
    drop(dups);
    raw_send(
        peer.as_raw_fd(),
        &encode_frame(&Request::List).expect("encode"),
        &[],
    );

    match ch.recv::<Request>() {
        Err(e) => assert!(check(&e), "unexpected error: {e:?}"),
        Ok(m) => panic!("bad frame accepted as {m:?}"),
    }
    if nfds > 0 {
        assert!(
            all_writers_closed(r.as_fd()),
            "descriptors of the rejected frame were not closed"
        );
    }
    let (next, fds) = ch.recv::<Request>().expect("next frame");
    assert_eq!(next, Request::List);
    assert!(fds.is_empty());
}

#[test]
fn garbage_payload_is_a_decode_error() {
    bad_then_good(&framed(&[0xff, 0xff, 0xff, 0xff, 0x0f]), 0, |e| {
        matches!(e, IpcError::Decode(_))
    });
    // Valid variant tag, then a string length pointing past the end.
    bad_then_good(&framed(&[2, 200, 1, b'x']), 2, |e| {
        matches!(e, IpcError::Decode(_))
    });
    // A valid Request followed by junk.
    let mut p = postcard::to_allocvec(&Request::List).expect("encode");
    p.push(0);
    bad_then_good(&framed(&p), 0, |e| matches!(e, IpcError::Decode(_)));
}

#[test]
fn garbage_without_a_valid_header() {
    // Random bytes: the header claims far more than arrived.
    bad_then_good(b"\x13\x37 this is not a frame", 1, |e| {
        matches!(e, IpcError::Oversized | IpcError::Truncated)
    });
    // Shorter than a header.
    bad_then_good(&[1, 0], 0, |e| matches!(e, IpcError::Truncated));
}

#[test]
fn header_claiming_more_than_it_carries_is_truncated() {
    let mut f = 100u32.to_le_bytes().to_vec();
    f.extend_from_slice(&[0; 10]);
    bad_then_good(&f, 3, |e| matches!(e, IpcError::Truncated));
    // ... or less.
    let mut f = 1u32.to_le_bytes().to_vec();
    f.extend_from_slice(&[1, 0]);
    bad_then_good(&f, 0, |e| matches!(e, IpcError::Truncated));
}

#[test]
fn payload_over_max_frame_is_oversized() {
    // Larger than the receive buffer: the kernel truncates it (MSG_TRUNC).
    let mut f = ((MAX_FRAME + 100) as u32).to_le_bytes().to_vec();
    f.resize(MAX_FRAME + 100 + 4, 0x41);
    bad_then_good(&f, 2, |e| matches!(e, IpcError::Oversized));
    // One byte over: fits the buffer, caught by size.
    let mut f = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
    f.resize(MAX_FRAME + 1 + 4, 0x41);
    bad_then_good(&f, 0, |e| matches!(e, IpcError::Oversized));
    // A small frame whose header claims an oversized payload.
    let mut f = u32::MAX.to_le_bytes().to_vec();
    f.extend_from_slice(&[0; 8]);
    bad_then_good(&f, 0, |e| matches!(e, IpcError::Oversized));
}

#[test]
fn zero_length_datagram_reads_as_closed() {
    bad_then_good(&[], 0, |e| matches!(e, IpcError::Closed));
}

#[test]
fn too_many_fds_are_refused_and_closed() {
    let good = encode_frame(&Request::List).expect("encode");
    for n in [MAX_FDS + 1, 16, 64] {
        bad_then_good(&good, n, |e| matches!(e, IpcError::TooManyFds));
    }
    // Exactly MAX_FDS is fine.
    let (peer, ch) = Channel::pair().expect("socketpair");
    let (_r, w) = pipe();
    let dups: Vec<_> = (0..MAX_FDS).map(|_| w.try_clone().expect("dup")).collect();
    raw_send(peer.as_raw_fd(), &good, &raw(&dups));
    let (m, fds) = ch.recv::<Request>().expect("recv");
    assert_eq!(m, Request::List);
    assert_eq!(fds.len(), MAX_FDS);
}

#[test]
fn sending_too_many_fds_is_refused() {
    let (a, _b) = Channel::pair().expect("socketpair");
    let (_r, w) = pipe();
    let fds = vec![w.as_fd(); MAX_FDS + 1];
    assert!(matches!(
        a.send(&Request::List, &fds),
        Err(IpcError::TooManyFds)
    ));
}

#[test]
fn peer_gone() {
    let (a, b) = Channel::pair().expect("socketpair");
    drop(b);
    // No SIGPIPE (the test process would die); an error instead.
    assert!(matches!(a.send(&Request::List, &[]), Err(IpcError::Closed)));
    assert!(matches!(a.recv::<Request>(), Err(IpcError::Closed)));
    assert!(matches!(
        a.recv_timeout::<Request>(Duration::from_secs(5)),
        Err(IpcError::Closed)
    ));
}

#[test]
fn a_frame_of_the_wrong_type_is_a_decode_error_not_a_panic() {
    use bulkhead_ipc::runner::RunnerEvent;
    let (a, b) = Channel::pair().expect("socketpair");
    a.send(
        &Request::Create {
            config_toml: "x".repeat(300),
            config_dir: "/".into(),
        },
        &[],
    )
    .expect("send");
    assert!(matches!(b.recv::<RunnerEvent>(), Err(IpcError::Decode(_))));
}
