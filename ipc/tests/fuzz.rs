//! Property tests: decoders never panic on arbitrary input, and valid messages round-trip.

use bulkhead_ipc::control::Request;
use bulkhead_ipc::hello::{Hello, HelloReply};
use bulkhead_ipc::runner::{RunnerCommand, RunnerEvent};
use bulkhead_ipc::transport::{decode, decode_frame, encode_frame, MAX_FRAME};
use bulkhead_ipc::{Channel, IpcError};
use proptest::prelude::*;

/// Feed `bytes` to every decoder, directly and as a payload; only errors, never panics.
fn decode_all(payload: &[u8]) {
    let _ = decode::<Request>(payload);
    let _ = decode::<RunnerEvent>(payload);
    let _ = decode::<RunnerCommand>(payload);
    let _ = decode::<Hello>(payload);
    let _ = decode::<HelloReply>(payload);
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9_.-]{0,40}|\\PC{0,20}"
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<String>(), any::<String>()).prop_map(|(config_toml, config_dir)| {
            Request::Create {
                config_toml,
                config_dir,
            }
        }),
        Just(Request::List),
        name().prop_map(|name| Request::Info { name }),
        name().prop_map(|name| Request::Console { name }),
        proptest::collection::vec(any::<u8>(), 0..4096)
            .prop_map(|data| Request::ConsoleInput { data }),
        Just(Request::ConsoleDetach),
        name().prop_map(|name| Request::Pause { name }),
        name().prop_map(|name| Request::Unpause { name }),
        (name(), any::<u32>())
            .prop_map(|(name, timeout_secs)| Request::Shutdown { name, timeout_secs }),
        name().prop_map(|name| Request::Destroy { name }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(payload) = decode_frame(&bytes) {
            decode_all(payload);
        }
        decode_all(&bytes);
    }

    #[test]
    fn arbitrary_payloads_in_valid_frames_never_panic(
        payload in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&payload);
        let got = decode_frame(&frame).expect("well-formed frame");
        prop_assert_eq!(got, &payload[..]);
        decode_all(got);
    }

    #[test]
    fn arbitrary_headers_are_checked(header in any::<u32>(), len in 0usize..64) {
        let mut frame = header.to_le_bytes().to_vec();
        frame.resize(4 + len, 0);
        match decode_frame(&frame) {
            Ok(p) => prop_assert_eq!(p.len(), header as usize),
            Err(IpcError::Oversized) => prop_assert!(header as usize > MAX_FRAME),
            Err(IpcError::Truncated) => prop_assert!(header as usize != len),
            Err(e) => prop_assert!(false, "unexpected {:?}", e),
        }
    }

    #[test]
    fn requests_round_trip(req in request()) {
        let frame = encode_frame(&req).expect("encode");
        let back: Request = decode(decode_frame(&frame).expect("frame")).expect("decode");
        prop_assert_eq!(back, req);
    }

    #[test]
    fn requests_round_trip_over_a_socket(req in request()) {
        let (a, b) = Channel::pair().expect("socketpair");
        a.send(&req, &[]).expect("send");
        let (back, fds) = b.recv::<Request>().expect("recv");
        prop_assert!(fds.is_empty());
        prop_assert_eq!(back, req);
    }

    #[test]
    fn truncated_encodings_are_errors(req in request(), cut in any::<prop::sample::Index>()) {
        let payload = postcard::to_allocvec(&req).expect("encode");
        let cut = cut.index(payload.len());
        // Decoding a strict prefix follows the full message's parse and runs out of bytes.
        prop_assert!(decode::<Request>(&payload[..cut]).is_err());
    }
}
