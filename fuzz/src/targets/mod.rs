//! The fuzz targets, one per parser that reads guest or peer input.

pub mod blk;
pub mod inflight;
pub mod ipc;
pub mod net;
pub mod snapshot;

use crate::Target;

/// Every target, in the order `scripts/fuzz.sh` runs them.
pub const ALL: &[Target] = &[
    Target {
        name: "blk",
        about: "virtio-blk chains popped from a fuzzed virtqueue: validation, execution, chain_at",
        run: blk::run,
        seeds: blk::seeds,
        max_len: 4096,
    },
    Target {
        name: "net-tx",
        about: "virtio-net TX chains against a reference model of what reaches the tap",
        run: net::run_tx,
        seeds: net::seeds_tx,
        max_len: 4096,
    },
    Target {
        name: "net-rx",
        about: "virtio-net RX delivery (mergeable or not) of fuzzed frames into fuzzed chains",
        run: net::run_rx,
        seeds: net::seeds_rx,
        max_len: 4096,
    },
    Target {
        name: "inflight",
        about: "the in-flight region: hostile contents, shapes, and a model of restarts",
        run: inflight::run,
        seeds: inflight::seeds,
        max_len: 8192,
    },
    Target {
        name: "ipc-frame",
        about: "decode_frame, then every message decoder on the payload",
        run: ipc::run_frame,
        seeds: ipc::seeds_frame,
        max_len: 2048,
    },
    Target {
        name: "ipc-request",
        about: "decode::<control::Request> (CLI -> bulkheadd)",
        run: ipc::run_request,
        seeds: ipc::seeds_request,
        max_len: 2048,
    },
    Target {
        name: "ipc-reply",
        about: "decode::<control::Reply> (bulkheadd -> CLI)",
        run: ipc::run_reply,
        seeds: ipc::seeds_reply,
        max_len: 2048,
    },
    Target {
        name: "ipc-runner-command",
        about: "decode::<runner::RunnerCommand> (bulkheadd -> runner)",
        run: ipc::run_runner_command,
        seeds: ipc::seeds_runner_command,
        max_len: 2048,
    },
    Target {
        name: "ipc-runner-event",
        about: "decode::<runner::RunnerEvent> (runner -> bulkheadd)",
        run: ipc::run_runner_event,
        seeds: ipc::seeds_runner_event,
        max_len: 2048,
    },
    Target {
        name: "ipc-runner-request",
        about: "decode::<runner::RunnerRequest> (bulkheadd -> runner, with ids)",
        run: ipc::run_runner_request,
        seeds: ipc::seeds_runner_request,
        max_len: 2048,
    },
    Target {
        name: "ipc-runner-message",
        about: "decode::<runner::RunnerMessage> (runner -> bulkheadd: answers and events)",
        run: ipc::run_runner_message,
        seeds: ipc::seeds_runner_message,
        max_len: 2048,
    },
    Target {
        name: "ipc-hello",
        about: "server_hello on a raw first datagram (with descriptors), Hello/HelloReply decoders",
        run: ipc::run_hello,
        seeds: ipc::seeds_hello,
        max_len: 1024,
    },
    Target {
        name: "snapshot",
        about: "the snapshot file reader (header, sections, RAM index and checksums) and the runner's record decoder",
        run: snapshot::run,
        seeds: snapshot::seeds,
        max_len: 80_000,
    },
];

/// The target called `name`.
pub fn find(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}
