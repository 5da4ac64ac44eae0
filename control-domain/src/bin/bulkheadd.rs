//! `bulkheadd`: Bulkhead's control domain daemon (run as root).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use control_domain::daemon::{Daemon, DaemonConfig};

/// Bulkhead's control domain: owns /dev/kvm, the policy and the state dir, runs each VM's
/// vCPUs in a sandboxed bulkhead-runner, and serves the `bulkhead` CLI. Stopping it
/// (SIGTERM) leaves VMs running; starting it again re-adopts them.
#[derive(Parser, Debug)]
#[command(name = "bulkheadd", version)]
struct Args {
    /// Socket the CLI connects to.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/bulkhead/bulkhead.sock"
    )]
    socket: PathBuf,
    /// Where VM records, runner sockets and logs live.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/bulkhead")]
    state_dir: PathBuf,
    /// Policy file; when absent, only root may act.
    #[arg(long, value_name = "PATH", default_value = "/etc/bulkhead/policy.toml")]
    policy: PathBuf,
    /// The runner binary (default: bulkhead-runner next to bulkheadd).
    #[arg(long, value_name = "PATH")]
    runner: Option<PathBuf>,
    /// The disk backend binary (default: bulkhead-blk next to bulkheadd).
    #[arg(long, value_name = "PATH")]
    blk: Option<PathBuf>,
    /// The network backend binary (default: bulkhead-net next to bulkheadd).
    #[arg(long, value_name = "PATH")]
    net: Option<PathBuf>,
    /// Have runners run their sandbox self-test at boot and log it (for tests).
    #[arg(long, hide = true)]
    runner_selftest: bool,
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("bulkheadd: internal error: {info}")
    }));
    // SAFETY: ignoring SIGPIPE before any thread starts; vanished clients become EPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // Everything bulkheadd creates (records, logs, sockets) is its own unless it says
    // otherwise: VM records hold command lines, logs hold guests' secrets.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    raise_open_file_limit();
    let args = Args::parse();
    let sibling = |given: Option<PathBuf>, name: &str| -> Option<PathBuf> {
        given.or_else(|| {
            std::env::current_exe()
                .ok()
                .map(|exe| exe.with_file_name(name))
        })
    };
    let Some(runner) = sibling(args.runner, "bulkhead-runner") else {
        eprintln!("bulkheadd: error: cannot locate bulkhead-runner; pass --runner");
        return ExitCode::from(2);
    };
    let Some(blk) = sibling(args.blk, "bulkhead-blk") else {
        eprintln!("bulkheadd: error: cannot locate bulkhead-blk; pass --blk");
        return ExitCode::from(2);
    };
    let Some(net) = sibling(args.net, "bulkhead-net") else {
        eprintln!("bulkheadd: error: cannot locate bulkhead-net; pass --net");
        return ExitCode::from(2);
    };
    if !runner.is_file() {
        eprintln!(
            "bulkheadd: error: runner binary {} not found; pass --runner",
            runner.display()
        );
        return ExitCode::from(2);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bulkheadd: error: must run as root (it creates namespaces and switches runners to their own uids)");
        return ExitCode::from(2);
    }
    let cfg = DaemonConfig {
        socket: args.socket,
        state_dir: args.state_dir,
        policy: args.policy,
        runner,
        blk,
        net,
        runner_selftest: args.runner_selftest,
    };
    let result = Daemon::new(cfg).and_then(|d| d.serve());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkheadd: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Raises the soft limit on open files to the hard one: with clients capped by the
/// connection limits, the rest is the reserve that VM starts, backend restarts and state
/// writes draw on.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                eprintln!("bulkheadd: cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => eprintln!("bulkheadd: cannot read the open-file limit: {e}"),
    }
}
