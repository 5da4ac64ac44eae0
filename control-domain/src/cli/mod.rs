//! The `bulkhead` CLI: a thin client of `bulkheadd`. Every verb is one
//! [`Request`](bulkhead_ipc::control::Request) on a fresh connection; the reply is printed
//! ([`format`]) or, for `console`, streamed ([`console`]).
//!
//! [`main_with_args`] is the whole program; [`run`] is the same with the process's
//! streams and environment passed in, so tests drive it end to end against a fake daemon.

pub mod console;
pub mod format;
pub mod top;

use std::ffi::{OsStr, OsString};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bulkhead_ipc::control::{ErrorCode, Reply, Request};
use bulkhead_ipc::hello::{self, Role};
use bulkhead_ipc::{Channel, IpcError};
use clap::Parser;

/// Where `bulkheadd` listens unless `--socket` or `BULKHEAD_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/bulkhead/bulkhead.sock";

/// The environment variable naming the daemon's socket.
pub const SOCKET_ENV: &str = "BULKHEAD_SOCKET";

/// Exit status: any failure without a more specific status.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: a snapshot that is truncated, corrupted, of another format version or from
/// another kind of host (`restore`); the same status as bad usage.
pub const EXIT_BAD_SNAPSHOT: u8 = 2;
/// Exit status: bad usage (clap's).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: `bulkheadd`'s policy refused the request.
pub const EXIT_DENIED: u8 = 3;
/// Exit status: no such VM.
pub const EXIT_NOT_FOUND: u8 = 4;
/// Exit status: the guest did not comply in time.
pub const EXIT_TIMEOUT: u8 = 5;

/// How long the daemon has to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the daemon has to answer a request (other than `shutdown`, which gets its
/// own timeout plus [`SHUTDOWN_GRACE`]).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Extra time given to the daemon to answer `shutdown` beyond the guest's timeout.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

const AFTER_HELP: &str = "\
The daemon's socket is --socket PATH, else $BULKHEAD_SOCKET, else /run/bulkhead/bulkhead.sock.

Exit status:
  0  success
  1  failure: bulkheadd unreachable or refused the connection, a bad or unexpected
     reply, or an error bulkheadd reports without a more specific status
  2  usage error, or a bad snapshot (restore: truncated, corrupted, another format
     version or another kind of host)
  3  bulkheadd's policy denied the request
  4  no such VM (or not visible to you)
  5  timed out: the guest did not do it in time (e.g. shutdown --timeout)";

/// Manage Bulkhead VMs: a thin client of the bulkheadd daemon; every verb is one request
/// to it, and bulkheadd decides what you may do.
#[derive(Parser, Debug)]
#[command(name = "bulkhead", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// bulkheadd's socket [default: $BULKHEAD_SOCKET, else /run/bulkhead/bulkhead.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    verb: Verb,
}

/// The verbs, named as in Xen's `xl`.
#[derive(clap::Subcommand, Debug)]
enum Verb {
    /// Create and start a VM from a TOML config file.
    ///
    /// The file is sent to bulkheadd as it is; bulkheadd validates it and resolves relative
    /// paths in it against the file's directory. Prints `created NAME (id ID)`.
    Create {
        /// The VM config (TOML).
        #[arg(value_name = "CONFIG")]
        config: PathBuf,
        /// Then attach to the VM's console (as `bulkhead console NAME`).
        #[arg(short, long)]
        console: bool,
    },
    /// List the VMs you may see.
    ///
    /// Columns: NAME, ID, STATE (running, paused, starting, saving, restoring, or stopped
    /// (REASON)), VCPUS,
    /// MEMORY(MiB), OWNER (uid), PID (of the VM's runner, - when none), UPTIME (time
    /// since creation, [D-]HH:MM:SS or MM:SS).
    List {
        /// Print the list as JSON (an array of bulkheadd's VM summaries) instead.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM's details, one `key: value` line each.
    Info {
        /// The VM's name.
        name: String,
        /// Print bulkheadd's VM info as JSON instead, with its counters under "stats"
        /// (CPU time, and per device: restarts, limits, per-queue counters).
        #[arg(long)]
        json: bool,
    },
    /// Show every VM's resource use, refreshed (xentop's columns).
    ///
    /// Columns: NAME, STATE, CPU(sec) (runner and device backends, those restarted too),
    /// CPU(%) (since the previous frame), MEM(k), VCPUS, NETTX(k)/NETRX(k) (bytes through
    /// the NICs' backends that keep counters), VBD_RD/VBD_WR (disk read/write requests),
    /// VBD_OO (times a disk queue waited for its rate limit), VBD_RSECT/VBD_WSECT (512-byte
    /// sectors read/written), RESTARTS (device backend restarts). Counters are kept by the
    /// backends in a page bulkheadd hands each of them, so they survive backend restarts.
    ///
    /// On a terminal: a full-screen view; keys q quit, n/c/m/v/x/r sort by name, CPU,
    /// memory, disk, network, restarts, +/- double/halve the delay, d shows/hides the
    /// per-device lines. Otherwise (or with --batch) the table is printed every delay;
    /// --json prints one JSON object per frame, one per line.
    Top {
        /// Plain text frames, no screen control (as `xentop -b`).
        #[arg(short, long)]
        batch: bool,
        /// Stop after N frames.
        #[arg(short, long, value_name = "N")]
        iterations: Option<u32>,
        /// Seconds between frames.
        #[arg(short, long, value_name = "S", default_value_t = 3.0)]
        delay: f64,
        /// One JSON object per frame and line: {"iteration", "time_unix", "vms": [...]}.
        #[arg(long)]
        json: bool,
        /// Row order.
        #[arg(long, value_enum, default_value = "name")]
        sort: top::SortKey,
    },
    /// Print every VM's counters in the Prometheus text exposition format.
    Metrics,
    /// Change a device's rate limits on a running VM, at once and kept across backend
    /// restarts and upgrades.
    ///
    /// Each option given replaces that value (0: none), the others stay. The policy's caps
    /// (limits.max_disk_*, limits.max_nic_*) apply: a rate above one is refused, and a
    /// rate of 0 gets the policy's default or cap. Sizes take K, M, G suffixes (binary).
    DeviceSetLimit {
        /// The VM's name.
        name: String,
        /// The device: disk0, ..., nic0, ...
        device: String,
        /// Bytes per second.
        #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
        bandwidth: Option<u64>,
        /// One-time extra bytes above the rate.
        #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
        bandwidth_burst: Option<u64>,
        /// Disk requests per second.
        #[arg(long, value_name = "N", conflicts_with_all = ["pps", "pps_burst"])]
        iops: Option<u64>,
        /// One-time extra requests.
        #[arg(long, value_name = "N")]
        iops_burst: Option<u64>,
        /// NIC packets per second.
        #[arg(long, value_name = "N")]
        pps: Option<u64>,
        /// One-time extra packets.
        #[arg(long, value_name = "N", conflicts_with = "iops_burst")]
        pps_burst: Option<u64>,
    },
    /// Attach to a VM's serial console.
    ///
    /// Prints the recent output bulkheadd kept (on a terminal, the last screenful), then
    /// streams the guest's output to stdout and sends stdin to the guest; any number of
    /// clients may attach at once and all see the same output. On a terminal, stdin is put
    /// in raw mode (Ctrl-C goes to the guest) until bulkhead exits. Ctrl-] (byte 0x1d, from a terminal or a pipe)
    /// detaches. When stdin is not a terminal and ends, output keeps streaming. Exits 0
    /// when you detach or the console closes (the VM stopped).
    Console {
        /// The VM's name.
        name: String,
    },
    /// Pause a VM: stop running its vCPUs.
    Pause {
        /// The VM's name.
        name: String,
    },
    /// Resume a paused VM.
    Unpause {
        /// The VM's name.
        name: String,
    },
    /// Ask the guest to shut down, and wait for it.
    ///
    /// The guest is asked the way a PC is: Ctrl-Alt-Del on its keyboard (Linux's init runs
    /// its shutdown and resets the machine; the VM then stops whatever on_reboot says),
    /// and the shutdown-request port the test guest polls. If the guest has not shut down
    /// within the timeout, bulkhead says so and exits with status 5; `bulkhead destroy`
    /// stops a VM by force.
    Shutdown {
        /// The VM's name.
        name: String,
        /// Seconds to wait for the guest.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u32,
    },
    /// Ask the guest to reboot, and wait until the VM is running again.
    ///
    /// Ctrl-Alt-Del, as for shutdown; when the guest resets, the VM's on_reboot decides:
    /// "restart" starts it again in place (same disks, NICs, console), "destroy" (the
    /// default) ends it. Exits with status 5 if that has not happened within the timeout.
    Reboot {
        /// The VM's name.
        name: String,
        /// Seconds to wait for the guest.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u32,
    },
    /// Kill a VM now and remove it.
    Destroy {
        /// The VM's name.
        name: String,
    },
    /// Save a VM (running or paused) to a snapshot file, then destroy it.
    ///
    /// The vCPUs are paused and every device drained (its backend stops its rings once the
    /// requests it took are done); bulkheadd writes the VM config, each vCPU, the irqchip,
    /// PIT, clock, serial port and virtio-pci transport state, each device's ring bases and
    /// in-flight region, and the guest RAM that is not zero. The file is created (mode
    /// 0600) by this command, with your rights, and removed again if the save fails (the VM
    /// then goes on as before). Prints what was written.
    Save {
        /// The VM's name.
        name: String,
        /// The snapshot file to write.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Keep the VM afterwards (running, or paused if it was paused) instead of
        /// destroying it.
        #[arg(long)]
        keep_running: bool,
    },
    /// Create a VM again from a snapshot file and run it (administrators).
    ///
    /// Fresh backends and a fresh runner, each in its sandbox; guest RAM, vCPUs, devices
    /// and each device's rings continue where the snapshot stopped. The VM config inside is
    /// checked like a create's (limits, image dirs, networks). A truncated, corrupted,
    /// wrong-version or wrong-host snapshot is refused with exit status 2 and nothing is
    /// started.
    Restore {
        /// The snapshot file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Name the restored VM this instead of the name in the snapshot.
        #[arg(long, value_name = "NEW")]
        name: Option<String>,
    },
    /// Restart one device's backend process under the running guest (its I/O pauses, the
    /// guest sees no error); also starts a device that was stopped or marked failed.
    DeviceRestart {
        /// The VM's name.
        name: String,
        /// The device: disk0, disk1, ..., nic0, ...
        device: String,
    },
    /// Move one device to a new backend binary under the running guest (administrators).
    DeviceUpgrade {
        /// The VM's name.
        name: String,
        /// The device: disk0, ..., nic0, ...
        device: String,
        /// The new backend binary.
        #[arg(long, value_name = "PATH")]
        binary: PathBuf,
    },
}

/// A byte count: digits (bytes) or digits with K, M, G, T (binary).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|_| format!("'{s}' is too large"));
    }
    core_vmm::config::parse_memory_size(t)
        .map_err(|_| format!("'{s}' is not a byte count like 1048576 or 8M"))
}

/// The process's streams and environment, passed in so tests can supply their own.
pub struct Streams<'a> {
    /// Console input (read by a separate thread while a console is attached).
    pub stdin: Option<Box<dyn Read + Send>>,
    /// Whether the process's real stdin is a terminal: then `console` puts it in raw mode.
    /// Only ever true when `stdin` is the real stdin.
    pub stdin_is_tty: bool,
    /// Where results and console output go.
    pub stdout: &'a mut dyn Write,
    /// Where errors and console notices go.
    pub stderr: &'a mut dyn Write,
    /// The value of `BULKHEAD_SOCKET`, if set.
    pub socket_env: Option<OsString>,
}

/// A failed verb: the exit status and the one line to print after `bulkhead: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Exit status.
    pub status: u8,
    /// What went wrong, one line.
    pub message: String,
}

impl Failure {
    fn new(message: impl Into<String>) -> Failure {
        Failure {
            status: EXIT_FAILURE,
            message: message.into(),
        }
    }

    /// An error reply from the daemon.
    fn from_reply(code: ErrorCode, message: &str) -> Failure {
        let status = match code {
            ErrorCode::Denied => EXIT_DENIED,
            ErrorCode::NotFound => EXIT_NOT_FOUND,
            ErrorCode::Timeout => EXIT_TIMEOUT,
            ErrorCode::Protocol
            | ErrorCode::BadConfig
            | ErrorCode::Exists
            | ErrorCode::WrongState
            | ErrorCode::Internal => EXIT_FAILURE,
            ErrorCode::BadSnapshot => EXIT_BAD_SNAPSHOT,
        };
        Failure {
            status,
            message: one_line(message),
        }
    }

    /// A reply that makes no sense for `verb`.
    fn unexpected(verb: &str, reply: &Reply) -> Failure {
        Failure::new(format!(
            "unexpected reply from bulkheadd to `{verb}`: {}",
            reply_name(reply)
        ))
    }

    fn stdout(e: &std::io::Error) -> Failure {
        Failure::new(format!("cannot write to stdout: {e}"))
    }
}

/// Text as one printable line.
fn one_line(s: &str) -> String {
    format::sanitize(s.trim_end())
}

/// A reply's variant name, for messages.
fn reply_name(reply: &Reply) -> &'static str {
    match reply {
        Reply::Done { .. } => "Done",
        Reply::Created { .. } => "Created",
        Reply::List { .. } => "List",
        Reply::Info { .. } => "Info",
        Reply::Stats { .. } => "Stats",
        Reply::ConsoleAttached { .. } => "ConsoleAttached",
        Reply::ConsoleOutput { .. } => "ConsoleOutput",
        Reply::ConsoleClosed { .. } => "ConsoleClosed",
        Reply::Error { .. } => "Error",
    }
}

/// The errno text of an I/O error, without Rust's `(os error N)` suffix.
fn errno_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    }
}

/// `--socket`, else `BULKHEAD_SOCKET` (if set and not empty), else [`DEFAULT_SOCKET`].
pub fn socket_path(arg: Option<&Path>, env: Option<&OsStr>) -> PathBuf {
    match (arg, env) {
        (Some(p), _) => p.to_owned(),
        (None, Some(e)) if !e.is_empty() => PathBuf::from(e),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// Connect to `bulkheadd` at `path` and say hello as the CLI.
pub fn connect(path: &Path) -> Result<Channel, Failure> {
    let ch = Channel::connect(path).map_err(|e| {
        let why = match &e {
            IpcError::Io { source, .. } => errno_text(source),
            other => other.to_string(),
        };
        Failure::new(format!(
            "cannot reach bulkheadd at {}: {why} (is bulkheadd running? use --socket or {SOCKET_ENV})",
            path.display()
        ))
    })?;
    match hello::client_hello(&ch, Role::Cli, HELLO_TIMEOUT) {
        Ok(()) => Ok(ch),
        Err(IpcError::Refused { reason, .. }) => Err(Failure::new(format!(
            "bulkheadd refused the connection: {}",
            one_line(&reason)
        ))),
        Err(IpcError::VersionMismatch { ours, theirs }) => Err(Failure::new(format!(
            "bulkheadd at {} speaks protocol version {theirs}; this bulkhead speaks version {ours}",
            path.display()
        ))),
        Err(IpcError::Timeout) => Err(Failure::new(format!(
            "bulkheadd at {} did not answer within {} s",
            path.display(),
            HELLO_TIMEOUT.as_secs()
        ))),
        Err(IpcError::Closed) => Err(Failure::new(format!(
            "bulkheadd at {} closed the connection without answering",
            path.display()
        ))),
        Err(e) => Err(Failure::new(format!(
            "cannot talk to bulkheadd at {}: {e}",
            path.display()
        ))),
    }
}

/// Send `req`.
fn send(ch: &Channel, req: &Request) -> Result<(), Failure> {
    ch.send(req, &[]).map_err(|e| match e {
        IpcError::Closed => Failure::new("bulkheadd closed the connection"),
        e => Failure::new(format!("cannot send the request to bulkheadd: {e}")),
    })
}

/// Wait up to `wait` for one reply; an error reply becomes the [`Failure`] it describes.
fn recv_reply(ch: &Channel, wait: Duration) -> Result<Reply, Failure> {
    match ch.recv_timeout::<Reply>(wait) {
        Ok((Reply::Error { code, message }, _fds)) => Err(Failure::from_reply(code, &message)),
        Ok((reply, _fds)) => Ok(reply),
        Err(IpcError::Closed) => Err(Failure::new(
            "bulkheadd closed the connection without answering",
        )),
        Err(IpcError::Timeout) => Err(Failure::new(format!(
            "bulkheadd did not answer within {} s",
            wait.as_secs()
        ))),
        Err(e @ IpcError::Decode(_)) => Err(Failure::new(format!(
            "cannot understand bulkheadd's reply ({e}); are bulkhead and bulkheadd the same version?"
        ))),
        Err(e) => Err(Failure::new(format!("bad reply from bulkheadd: {e}"))),
    }
}

/// One request carrying `file`'s descriptor, one reply.
fn call_with_fd(
    socket: &Path,
    req: &Request,
    file: &std::fs::File,
    wait: Duration,
) -> Result<Reply, Failure> {
    use std::os::fd::AsFd;
    let ch = connect(socket)?;
    ch.send(req, &[file.as_fd()]).map_err(|e| match e {
        IpcError::Closed => Failure::new("bulkheadd closed the connection"),
        e => Failure::new(format!("cannot send the request to bulkheadd: {e}")),
    })?;
    recv_reply(&ch, wait)
}

/// `save`: creates the file (0600) with the caller's rights, hands it to bulkheadd, and
/// removes it again if the save failed.
fn save(
    socket: &Path,
    name: String,
    file: &Path,
    keep_running: bool,
    io: &mut Streams<'_>,
) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = file.display();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| Failure::new(format!("cannot create {shown}: {}", errno_text(&e))))?;
    let req = Request::Save { name, keep_running };
    match call_with_fd(socket, &req, &f, REPLY_TIMEOUT) {
        Ok(Reply::Done { message }) => print(io.stdout, &format!("{}\n", one_line(&message))),
        Ok(other) => {
            let _ = std::fs::remove_file(file);
            Err(Failure::unexpected("save", &other))
        }
        Err(e) => {
            let _ = std::fs::remove_file(file);
            Err(e)
        }
    }
}

/// One request, one reply.
fn call(socket: &Path, req: &Request, wait: Duration) -> Result<Reply, Failure> {
    let ch = connect(socket)?;
    send(&ch, req)?;
    recv_reply(&ch, wait)
}

fn print(out: &mut dyn Write, text: &str) -> Result<(), Failure> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::stdout(&e))
}

fn json<T: serde::Serialize>(out: &mut dyn Write, value: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::new(format!("cannot encode JSON: {e}")))?;
    print(out, &format!("{text}\n"))
}

/// Read a config file and the absolute directory it is in.
fn read_config(path: &Path) -> Result<(String, String), Failure> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(format!("cannot read {shown}: {}", errno_text(&e))))?;
    let abs = std::path::absolute(path)
        .map_err(|e| Failure::new(format!("cannot resolve {shown}: {}", errno_text(&e))))?;
    let parent = abs.parent().unwrap_or(Path::new("/"));
    // Resolve the directory's symlinks as the kernel will when it follows `dir/../x`.
    let dir = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_owned());
    let dir = dir.into_os_string().into_string().map_err(|d| {
        Failure::new(format!(
            "the directory of {shown} is not valid UTF-8: {}",
            Path::new(&d).display()
        ))
    })?;
    Ok((text, dir))
}

/// Run one verb.
fn execute(cli: Cli, io: &mut Streams<'_>) -> Result<(), Failure> {
    let socket = socket_path(cli.socket.as_deref(), io.socket_env.as_deref());
    match cli.verb {
        Verb::Create { config, console } => {
            let (config_toml, config_dir) = read_config(&config)?;
            let req = Request::Create {
                config_toml,
                config_dir,
            };
            let vm = match call(&socket, &req, REPLY_TIMEOUT)? {
                Reply::Created { vm } => vm,
                other => return Err(Failure::unexpected("create", &other)),
            };
            print(
                io.stdout,
                &format!("created {} (id {})\n", format::sanitize(&vm.name), vm.id),
            )?;
            if console {
                console::attach(&socket, &vm.name, io)?;
            }
            Ok(())
        }
        Verb::List { json: as_json } => match call(&socket, &Request::List, REPLY_TIMEOUT)? {
            Reply::List { vms } if as_json => json(io.stdout, &vms),
            Reply::List { vms } => print(io.stdout, &format::table(&vms)),
            other => Err(Failure::unexpected("list", &other)),
        },
        Verb::Info {
            name,
            json: as_json,
        } => match call(
            &socket,
            &Request::Info { name: name.clone() },
            REPLY_TIMEOUT,
        )? {
            Reply::Info { vm } if as_json => {
                let stats =
                    match call(&socket, &Request::Stats { name: Some(name) }, REPLY_TIMEOUT)? {
                        Reply::Stats { vms } => vms.into_iter().next(),
                        other => return Err(Failure::unexpected("info", &other)),
                    };
                let mut v = serde_json::to_value(&vm)
                    .map_err(|e| Failure::new(format!("cannot encode JSON: {e}")))?;
                if let (Some(obj), Some(stats)) = (v.as_object_mut(), stats) {
                    let s = serde_json::to_value(&stats)
                        .map_err(|e| Failure::new(format!("cannot encode JSON: {e}")))?;
                    obj.insert("stats".into(), s);
                }
                json(io.stdout, &v)
            }
            Reply::Info { vm } => print(io.stdout, &format::info(&vm)),
            other => Err(Failure::unexpected("info", &other)),
        },
        Verb::Console { name } => console::attach(&socket, &name, io),
        Verb::Top {
            batch,
            iterations,
            delay,
            json,
            sort,
        } => top::top(
            &socket,
            &top::TopOptions {
                batch,
                iterations,
                delay,
                json,
                sort,
            },
            io,
        ),
        Verb::Metrics => top::print_metrics(&socket, io),
        Verb::DeviceSetLimit {
            name,
            device,
            bandwidth,
            bandwidth_burst,
            iops,
            iops_burst,
            pps,
            pps_burst,
        } => {
            let limits = bulkhead_ipc::control::LimitsUpdate {
                bandwidth,
                bandwidth_burst,
                ops: iops.or(pps),
                ops_burst: iops_burst.or(pps_burst),
            };
            if limits == Default::default() {
                return Err(Failure {
                    status: EXIT_USAGE,
                    message: "give at least one of --bandwidth, --bandwidth-burst, --iops, --iops-burst, --pps, --pps-burst".into(),
                });
            }
            done(
                &socket,
                "device-set-limit",
                &Request::DeviceSetLimit {
                    name,
                    device,
                    limits,
                },
                io,
            )
        }
        Verb::Pause { name } => done(&socket, "pause", &Request::Pause { name }, io),
        Verb::Unpause { name } => done(&socket, "unpause", &Request::Unpause { name }, io),
        Verb::Destroy { name } => done(&socket, "destroy", &Request::Destroy { name }, io),
        Verb::Save {
            name,
            file,
            keep_running,
        } => save(&socket, name, &file, keep_running, io),
        Verb::Restore { file, name } => {
            let shown = file.display();
            let f = std::fs::File::open(&file)
                .map_err(|e| Failure::new(format!("cannot open {shown}: {}", errno_text(&e))))?;
            let reply = call_with_fd(&socket, &Request::Restore { name }, &f, REPLY_TIMEOUT)?;
            match reply {
                Reply::Done { message } => print(io.stdout, &format!("{}\n", one_line(&message))),
                other => Err(Failure::unexpected("restore", &other)),
            }
        }
        Verb::DeviceRestart { name, device } => done(
            &socket,
            "device-restart",
            &Request::DeviceRestart { name, device },
            io,
        ),
        Verb::DeviceUpgrade {
            name,
            device,
            binary,
        } => {
            let binary = std::fs::canonicalize(&binary)
                .unwrap_or(binary)
                .display()
                .to_string();
            done(
                &socket,
                "device-upgrade",
                &Request::DeviceUpgrade {
                    name,
                    device,
                    binary,
                },
                io,
            )
        }
        Verb::Shutdown { name, timeout } => {
            let req = Request::Shutdown {
                name,
                timeout_secs: timeout,
            };
            let wait = Duration::from_secs(u64::from(timeout)).saturating_add(SHUTDOWN_GRACE);
            match call(&socket, &req, wait)? {
                Reply::Done { message } => print(io.stdout, &format!("{}\n", one_line(&message))),
                other => Err(Failure::unexpected("shutdown", &other)),
            }
        }
        Verb::Reboot { name, timeout } => {
            let req = Request::Reboot {
                name,
                timeout_secs: timeout,
            };
            let wait = Duration::from_secs(u64::from(timeout)).saturating_add(SHUTDOWN_GRACE);
            match call(&socket, &req, wait)? {
                Reply::Done { message } => print(
                    io.stdout,
                    &format!(
                        "{}
",
                        one_line(&message)
                    ),
                ),
                other => Err(Failure::unexpected("reboot", &other)),
            }
        }
    }
}

/// A verb whose answer is `Done { message }`: print the message.
fn done(socket: &Path, verb: &str, req: &Request, io: &mut Streams<'_>) -> Result<(), Failure> {
    match call(socket, req, REPLY_TIMEOUT)? {
        Reply::Done { message } => print(io.stdout, &format!("{}\n", one_line(&message))),
        other => Err(Failure::unexpected(verb, &other)),
    }
}

/// The whole CLI on the given arguments (`args[0]` is the program name) and streams;
/// returns the exit status.
pub fn run<I, T>(args: I, io: &mut Streams<'_>) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are "errors" that go to stdout with status 0.
            let text = e.render().to_string();
            let out: &mut dyn Write = if e.use_stderr() {
                &mut *io.stderr
            } else {
                &mut *io.stdout
            };
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            return u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE);
        }
    };
    match execute(cli, io) {
        Ok(()) => 0,
        Err(f) => {
            let _ = writeln!(io.stderr, "bulkhead: {}", f.message);
            let _ = io.stderr.flush();
            f.status
        }
    }
}

/// The `bulkhead` program: parse `args`, run the verb against the daemon with the
/// process's real stdin/stdout/stderr and environment.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    // One line, never a backtrace, if something unexpected panics.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        eprintln!("bulkhead: internal error: {}", one_line(&what));
    }));
    let stdin = std::io::stdin();
    let stdin_is_tty = stdin.is_terminal();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut io = Streams {
        stdin: Some(Box::new(stdin)),
        stdin_is_tty,
        stdout: &mut stdout,
        stderr: &mut stderr,
        socket_env: std::env::var_os(SOCKET_ENV),
    };
    ExitCode::from(run(args, &mut io))
}

#[cfg(test)]
mod tests;
