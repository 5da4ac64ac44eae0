//! `bulkhead-net`: the vhost-user-net backend over a tap, standalone or under `bulkheadd`.

use bulkhead_backends::cli::{
    check_fd, is_unix_stream, main_with, signal_ready, stats_region, usage,
};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use bulkhead_backends::net::config::{all_tap_offloads, HDR_LEN};
use bulkhead_backends::net::serve::{bind_path, serve_connected, serve_listener, Device};
use bulkhead_backends::net::{parse_mac, NetConfig, NetStats, Tap};
use clap::Parser;

/// vhost-user-net backend: one RX and one TX queue over a tap.
///
/// Standalone: `--socket PATH (--tap NAME | --tap-fd N)` listens on PATH (a stale socket
/// there is removed), serves one frontend at a time and, when it disconnects, waits for the
/// next one with the tap still open. `--tap NAME` opens /dev/net/tun itself and attaches to
/// (or creates) tap NAME with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, which needs CAP_NET_ADMIN.
///
/// Under bulkheadd: `--socket-fd N --tap-fd M` serves the frontend at the far end of the
/// already connected unix stream socket N, moving frames through the already opened tap M
/// (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR); no paths are used, a seccomp allowlist
/// (backends/seccomp/net.json) is installed before serving, and the process exits when the
/// frontend disconnects.
///
/// The guest gets VIRTIO_NET_F_MAC only with --mac; otherwise it picks its own address.
///
/// Exit status: 0 after a clean end, 2 for bad arguments or an unusable tap/socket,
/// 1 for other failures.
#[derive(Parser, Debug)]
#[command(name = "bulkhead-net", version)]
struct Args {
    /// Unix socket path to listen on (standalone mode).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "socket_fd",
        required_unless_present = "socket_fd"
    )]
    socket: Option<PathBuf>,
    /// Tap interface to open via /dev/net/tun (standalone mode; needs CAP_NET_ADMIN).
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with_all = ["tap_fd", "socket_fd"],
        required_unless_present = "tap_fd"
    )]
    tap: Option<String>,
    /// Opened tap fd (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) inherited from the parent.
    #[arg(long, value_name = "M")]
    tap_fd: Option<RawFd>,
    /// Connected unix stream socket inherited from bulkheadd (sandboxed mode).
    #[arg(long, value_name = "N", requires = "tap_fd")]
    socket_fd: Option<RawFd>,
    /// Sandboxed mode: write one byte to this inherited fd (a pipe) once running, so
    /// bulkheadd knows the binary and its libraries are loaded and may empty our root.
    #[arg(long, value_name = "R", requires = "socket_fd")]
    ready_fd: Option<RawFd>,
    /// Inherited shared page (a sealed memfd made by bulkheadd) that holds this NIC's
    /// counters (record 0: frames to the guest, record 1: frames from it); it outlives the
    /// backend, so a restarted backend counts on.
    #[arg(long, value_name = "N")]
    stats_fd: Option<RawFd>,
    /// MAC address offered to the guest (VIRTIO_NET_F_MAC), e.g. 52:54:00:12:34:56.
    #[arg(long, value_name = "MAC")]
    mac: Option<String>,
    /// Whoever opened the tap already set its vnet header size and probed its offloads:
    /// `ufo` if it takes UFO, `no-ufo` if not. The tap is then left untouched until a
    /// frontend acknowledges features, so a standby backend on the same tap does not
    /// disturb the one serving it.
    #[arg(long, value_name = "UFO", requires = "tap_fd", value_parser = ["ufo", "no-ufo"])]
    tap_probed: Option<String>,
}

/// Opens or adopts the tap, checks its flags and finds out whether it takes UFO.
fn open_tap(args: &Args) -> anyhow::Result<(Tap, bool)> {
    let tap = match (&args.tap, args.tap_fd) {
        (Some(name), None) => Tap::open(name).map_err(|e| usage(e.to_string()))?,
        (None, Some(fd)) => {
            check_fd(fd, "--tap-fd")?;
            // SAFETY: `fd` is open (checked) and handed to us to own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Tap::from_fd(fd).map_err(|e| usage(format!("--tap-fd: {e}")))?
        }
        _ => bail!(usage("give exactly one of --tap and --tap-fd")),
    };
    let name = tap.check().map_err(|e| usage(format!("tap: {e}")))?;
    if let Some(probed) = &args.tap_probed {
        let ufo = probed == "ufo";
        eprintln!(
            "bulkhead-net: tap {name}{} (probed by its opener; left as it is)",
            if ufo { "" } else { " (no UFO)" }
        );
        return Ok((tap, ufo));
    }
    tap.set_vnet_hdr_len(HDR_LEN)
        .map_err(|e| usage(format!("tap {name}: TUNSETVNETHDRSZ: {e}")))?;
    let ufo = tap.set_offload(all_tap_offloads()).is_ok();
    tap.set_offload(0)
        .map_err(|e| usage(format!("tap {name}: TUNSETOFFLOAD: {e}")))?;
    eprintln!(
        "bulkhead-net: tap {name}{}",
        if ufo { "" } else { " (no UFO)" }
    );
    Ok((tap, ufo))
}

fn run(args: Args) -> anyhow::Result<()> {
    signal_ready(args.ready_fd)?;
    let mac = match &args.mac {
        Some(s) => Some(parse_mac(s).map_err(|e| usage(format!("--mac: {e}")))?),
        None => None,
    };
    if let (Some(s), Some(t)) = (args.socket_fd, args.tap_fd) {
        if s == t {
            return Err(usage("--socket-fd and --tap-fd are the same fd"));
        }
    }
    if let Some(fd) = args.socket_fd {
        check_fd(fd, "--socket-fd")?;
        if !is_unix_stream(fd) {
            return Err(usage(format!(
                "--socket-fd {fd} is not a unix stream socket"
            )));
        }
    }
    let (tap, ufo) = open_tap(&args)?;
    // The fd stays open while we run: a restarted bulkheadd takes it back from us.
    let (region, _stats_fd) = stats_region(args.stats_fd, 2)?;
    let config = NetConfig { mac, ufo };
    if let Some(m) = mac {
        eprintln!(
            "bulkhead-net: MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
    }
    let device = Device {
        tap: Arc::new(tap),
        config,
        stats: Arc::new(NetStats::with_region(region)),
    };

    match (&args.socket, args.socket_fd) {
        (Some(path), None) => {
            let mut listener = bind_path(path).map_err(|e| usage(e.to_string()))?;
            eprintln!("bulkhead-net: listening on {}", path.display());
            serve_listener(&device, &mut listener).context("serving")?;
            Ok(())
        }
        (None, Some(fd)) => {
            // SAFETY: `fd` is an open unix stream socket (checked) handed to us to own.
            let conn = unsafe { UnixStream::from_raw_fd(fd) };
            serve_connected(&device, conn, true).context("serving")?;
            Ok(())
        }
        _ => bail!(usage("give exactly one of --socket and --socket-fd")),
    }
}

fn main() -> ExitCode {
    main_with::<Args>("bulkhead-net", run)
}
