//! `bulkhead-blk`: the vhost-user-blk disk backend, standalone or under `bulkheadd`.

use bulkhead_backends::cli::{
    check_fd, is_unix_stream, main_with, signal_ready, stats_region, usage,
};
use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use bulkhead_backends::blk::config::MAX_QUEUES;
use bulkhead_backends::blk::poll::HostLoad;
use bulkhead_backends::blk::request::{serial_bytes, ID_LEN};
use bulkhead_backends::blk::serve::{bind_path, serve_connected, serve_listener, Device};
use bulkhead_backends::blk::{Cache, Disk, EngineKind, Stats, SECTOR_SIZE};
use clap::Parser;

/// vhost-user-blk backend serving one raw disk image.
///
/// Standalone: `--socket PATH --image PATH` listens on PATH (a stale socket there is
/// removed), serves one frontend at a time and, when it disconnects, waits for the next
/// one with the image still open.
///
/// Under bulkheadd: `--socket-fd N --image-fd M` serves the frontend at the far end of the
/// already connected unix stream socket N, using the already opened image M; no paths are
/// used, a seccomp allowlist (backends/seccomp/blk.json) is installed before serving, and the
/// process exits when the frontend disconnects.
///
/// Exit status: 0 after a clean end, 2 for bad arguments or an unusable image/socket,
/// 1 for other failures.
#[derive(Parser, Debug)]
#[command(name = "bulkhead-blk", version)]
struct Args {
    /// Unix socket path to listen on (standalone mode).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "socket_fd",
        required_unless_present = "socket_fd"
    )]
    socket: Option<PathBuf>,
    /// Raw disk image to serve (standalone mode).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "image_fd",
        required_unless_present = "image_fd"
    )]
    image: Option<PathBuf>,
    /// Connected unix stream socket inherited from bulkheadd (sandboxed mode).
    #[arg(long, value_name = "N", requires = "image_fd")]
    socket_fd: Option<RawFd>,
    /// Opened disk image inherited from bulkheadd (sandboxed mode).
    #[arg(long, value_name = "M", requires = "socket_fd")]
    image_fd: Option<RawFd>,
    /// Sandboxed mode: write one byte to this inherited fd (a pipe) once running, so
    /// bulkheadd knows the binary and its libraries are loaded and may empty our root.
    #[arg(long, value_name = "N", requires = "socket_fd")]
    ready_fd: Option<RawFd>,
    /// Refuse writes; the guest sees VIRTIO_BLK_F_RO.
    #[arg(long)]
    readonly: bool,
    /// Serial number returned by GET_ID (at most 20 bytes, zero-padded).
    #[arg(long, value_name = "S", default_value = "")]
    serial: String,
    /// Number of request queues (1 to 8).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    queues: u16,
    /// Host caching of the image: writeback (through the page cache) or none (O_DIRECT).
    /// Either way a completed FLUSH means earlier completed writes are durable.
    #[arg(long, value_name = "MODE", default_value = "writeback", value_parser = parse_cache)]
    cache: Cache,
    /// I/O engine per queue: auto (io-uring if the kernel allows it, else threads),
    /// io-uring, threads (a pool of blocking threads), inline (one request at a time).
    #[arg(long, value_name = "ENGINE", default_value = "auto")]
    io_engine: EngineKind,
    /// The most (microseconds) a queue worker that just served requests keeps looking at
    /// the ring and the engine before it sleeps and waits to be notified: while it looks,
    /// the guest's next request needs no notification (an exit in the guest) and the
    /// worker no wake-up, at the price of CPU time. Each worker adapts its window within
    /// this: it grows while the queue is busy, shrinks once the guest goes quiet, and
    /// polling stops while the host has more runnable threads than CPUs or after a spin
    /// was preempted. 0 never polls.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_US,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    poll_us: u32,
    /// Inherited shared page (a sealed memfd made by bulkheadd) that holds this disk's
    /// counters, which the backend keeps, and its rate limits, which it obeys; it outlives
    /// the backend, so a restarted backend counts on and keeps the limits.
    #[arg(long, value_name = "N")]
    stats_fd: Option<RawFd>,
}

fn parse_cache(s: &str) -> Result<Cache, String> {
    match s {
        "writeback" => Ok(Cache::Writeback),
        "none" => Ok(Cache::None),
        _ => Err(format!("unknown cache mode '{s}' (writeback, none)")),
    }
}

/// `--poll-us` when not given: the adaptive window's limit.
const DEFAULT_POLL_US: u32 = 200;

fn run(args: Args) -> anyhow::Result<()> {
    // Before the ready byte: bulkheadd then takes our root (and /proc) away.
    let host_load = if args.poll_us > 0 {
        match HostLoad::open() {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                eprintln!("bulkhead-blk: cannot read /proc/loadavg ({e}): polling will not know when the host is short of CPUs");
                None
            }
        }
    } else {
        None
    };
    signal_ready(args.ready_fd)?;
    if args.serial.len() > ID_LEN {
        return Err(usage(format!(
            "--serial is {} bytes, at most {ID_LEN}",
            args.serial.len()
        )));
    }
    let serial = serial_bytes(&args.serial);

    let image = match (&args.image, args.image_fd) {
        (Some(path), None) => OpenOptions::new()
            .read(true)
            .write(!args.readonly)
            .open(path)
            .map_err(|e| usage(format!("cannot open image {}: {e}", path.display())))?,
        (None, Some(fd)) => {
            check_fd(fd, "--image-fd")?;
            // SAFETY: `fd` is open (checked) and bulkheadd handed it to us to own.
            unsafe { std::fs::File::from_raw_fd(fd) }
        }
        _ => bail!(usage("give exactly one of --image and --image-fd")),
    };
    let disk = Disk::with_cache(image, args.readonly, args.cache)
        .map_err(|e| usage(format!("image: {e}")))?;
    if disk.size() % SECTOR_SIZE != 0 {
        eprintln!(
            "bulkhead-blk: image size {} is not a multiple of 512; the last {} bytes are not served",
            disk.size(),
            disk.size() % SECTOR_SIZE
        );
    }
    eprintln!(
        "bulkhead-blk: image of {} sectors{}, {} queue(s), cache {}, serial {:?}",
        disk.sectors(),
        if disk.readonly() { ", read-only" } else { "" },
        args.queues,
        if disk.direct() { "none" } else { "writeback" },
        args.serial
    );
    // The fd stays open while we run: a restarted bulkheadd takes it back from us.
    let (region, _stats_fd) = stats_region(args.stats_fd, usize::from(args.queues))?;
    let device = Device {
        region,
        disk: Arc::new(disk),
        serial,
        queues: args.queues,
        stats: Arc::new(Stats::default()),
        engine: args.io_engine,
        poll: std::time::Duration::from_micros(args.poll_us.into()),
        host_load,
    };

    match (&args.socket, args.socket_fd) {
        (Some(path), None) => {
            let mut listener = bind_path(path).map_err(|e| usage(e.to_string()))?;
            eprintln!("bulkhead-blk: listening on {}", path.display());
            serve_listener(&device, &mut listener).context("serving")?;
            Ok(())
        }
        (None, Some(fd)) => {
            check_fd(fd, "--socket-fd")?;
            if Some(fd) == args.image_fd {
                return Err(usage("--socket-fd and --image-fd are the same fd"));
            }
            if !is_unix_stream(fd) {
                return Err(usage(format!(
                    "--socket-fd {fd} is not a unix stream socket"
                )));
            }
            // SAFETY: `fd` is an open unix stream socket (checked) handed to us to own.
            let conn = unsafe { UnixStream::from_raw_fd(fd) };
            serve_connected(&device, conn, true).context("serving")?;
            Ok(())
        }
        _ => bail!(usage("give exactly one of --socket and --socket-fd")),
    }
}

fn main() -> ExitCode {
    main_with::<Args>("bulkhead-blk", run)
}
