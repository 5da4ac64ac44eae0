//! End-to-end tests of the CLI through [`run`], against a fake `bulkheadd`: a
//! [`Listener`] on a temporary path that says hello and answers canned replies.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bulkhead_ipc::control::{ErrorCode, Reply, Request, StopReason, VmInfo, VmState, VmSummary};
use bulkhead_ipc::hello::{self, Hello, HelloReply};
use bulkhead_ipc::{Channel, Listener};

use super::*;

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake daemon serving `conns` connections in turn, each by `serve` (after a normal
/// hello). Joining it re-raises any assertion that failed inside.
struct Fake {
    _dir: TempDir,
    socket: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn start<F>(conns: usize, serve: F) -> Fake
    where
        F: Fn(usize, &Channel) + Send + 'static,
    {
        Fake::start_raw(conns, move |i, ch| {
            hello::server_hello(ch, Duration::from_secs(5)).expect("hello");
            serve(i, ch);
        })
    }

    /// Like `start`, but `serve` does the hello itself.
    fn start_raw<F>(conns: usize, serve: F) -> Fake
    where
        F: Fn(usize, &Channel) + Send + 'static,
    {
        let dir = TempDir::new();
        let socket = dir.0.join("bulkhead.sock");
        let listener = Listener::bind(&socket).expect("bind");
        let thread = std::thread::spawn(move || {
            for i in 0..conns {
                let ch = listener.accept().expect("accept");
                serve(i, &ch);
            }
        });
        Fake {
            _dir: dir,
            socket,
            thread: Some(thread),
        }
    }

    fn join(mut self) {
        if let Some(t) = self.thread.take() {
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
        }
    }
}

fn recv(ch: &Channel) -> Request {
    ch.recv_timeout::<Request>(Duration::from_secs(5))
        .expect("request")
        .0
}

fn reply(ch: &Channel, r: Reply) {
    ch.send(&r, &[]).expect("send reply");
}

/// What one run of the CLI did.
#[derive(Debug)]
struct Outcome {
    status: u8,
    stdout: String,
    stderr: String,
}

/// Run the CLI with `args` (after the program name) against `socket` (as if from
/// `BULKHEAD_SOCKET`), with `stdin` as its input.
fn cli(socket: &Path, args: &[&str], stdin: &[u8]) -> Outcome {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = {
        let mut io = Streams {
            stdin: Some(Box::new(Cursor::new(stdin.to_vec()))),
            stdin_is_tty: false,
            stdout: &mut out,
            stderr: &mut err,
            socket_env: Some(socket.as_os_str().to_owned()),
        };
        let argv = std::iter::once("bulkhead").chain(args.iter().copied());
        run(argv, &mut io)
    };
    Outcome {
        status,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    }
}

fn summary(name: &str, id: u32, state: VmState) -> VmSummary {
    VmSummary {
        name: name.to_owned(),
        id,
        state,
        vcpus: 1,
        memory_mib: 256,
        owner: 1000,
        runner_pid: Some(77),
        uptime_secs: 42,
    }
}

#[test]
fn socket_path_precedence() {
    let arg = Path::new("/a.sock");
    let env = OsStr::new("/b.sock");
    assert_eq!(socket_path(Some(arg), Some(env)), PathBuf::from("/a.sock"));
    assert_eq!(socket_path(None, Some(env)), PathBuf::from("/b.sock"));
    assert_eq!(
        socket_path(None, Some(OsStr::new(""))),
        PathBuf::from(DEFAULT_SOCKET)
    );
    assert_eq!(socket_path(None, None), PathBuf::from(DEFAULT_SOCKET));
}

#[test]
fn list_prints_a_table() {
    let fake = Fake::start(1, |_, ch| {
        assert_eq!(recv(ch), Request::List);
        reply(
            ch,
            Reply::List {
                vms: vec![
                    summary("web", 1, VmState::Running),
                    summary(
                        "db",
                        2,
                        VmState::Stopped(StopReason::Crashed("triple fault".into())),
                    ),
                ],
            },
        );
    });
    let o = cli(&fake.socket, &["list"], b"");
    assert_eq!(o.status, 0, "{o:?}");
    assert_eq!(o.stderr, "");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{o:?}");
    assert!(lines[0].starts_with("NAME"), "{o:?}");
    assert!(lines[1].starts_with("web ") && lines[1].contains("running"));
    assert!(
        lines[2].contains("stopped (crashed: triple fault)"),
        "{o:?}"
    );
    fake.join();
}

#[test]
fn list_json_is_the_summaries() {
    let vms = vec![summary("web", 1, VmState::Paused)];
    let sent = vms.clone();
    let fake = Fake::start(1, move |_, ch| {
        assert_eq!(recv(ch), Request::List);
        reply(ch, Reply::List { vms: sent.clone() });
    });
    let o = cli(&fake.socket, &["list", "--json"], b"");
    assert_eq!(o.status, 0, "{o:?}");
    let expected = serde_json::to_string_pretty(&vms).expect("json") + "\n";
    assert_eq!(o.stdout, expected);
    assert!(o.stdout.contains("\"name\": \"web\""), "{}", o.stdout);
    fake.join();
}

fn vm_info() -> VmInfo {
    VmInfo {
        summary: summary("web", 1, VmState::Running),
        kernel: "/srv/vmlinux".into(),
        hugepages: false,
        initrd: Some("/srv/initrd".into()),
        cmdline: "console=ttyS0".into(),
        runner_uid: Some(60001),
        disks: vec!["/srv/root.img".into()],
        nics: vec![],
    }
}

#[test]
fn info_prints_key_values_and_json() {
    // info; info --json asks for the info, then the counters.
    let fake = Fake::start(3, |i, ch| {
        if i < 2 {
            assert_eq!(recv(ch), Request::Info { name: "web".into() });
            reply(ch, Reply::Info { vm: vm_info() });
        } else {
            assert_eq!(
                recv(ch),
                Request::Stats {
                    name: Some("web".into())
                }
            );
            reply(
                ch,
                Reply::Stats {
                    vms: vec![bulkhead_ipc::control::VmStats {
                        summary: summary("web", 1, VmState::Running),
                        cpu_ns: 2_000_000_000,
                        vcpus: vec![],
                        devices: vec![],
                    }],
                },
            );
        }
    });
    let o = cli(&fake.socket, &["info", "web"], b"");
    assert_eq!(o.status, 0, "{o:?}");
    assert_eq!(o.stdout, format::info(&vm_info()));
    assert!(o.stdout.contains("runner uid: 60001\n"), "{}", o.stdout);
    let o = cli(&fake.socket, &["info", "web", "--json"], b"");
    assert_eq!(o.status, 0, "{o:?}");
    let back: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    assert_eq!(back["kernel"], "/srv/vmlinux");
    assert_eq!(back["summary"]["name"], "web");
    assert_eq!(back["stats"]["cpu_ns"], 2_000_000_000u64);
    fake.join();
}

#[test]
fn error_replies_map_to_exit_statuses() {
    let cases = [
        (ErrorCode::NotFound, EXIT_NOT_FOUND),
        (ErrorCode::Denied, EXIT_DENIED),
        (ErrorCode::Timeout, EXIT_TIMEOUT),
        (ErrorCode::WrongState, EXIT_FAILURE),
        (ErrorCode::Internal, EXIT_FAILURE),
    ];
    let fake = Fake::start(cases.len(), move |i, ch| {
        let _ = recv(ch);
        reply(
            ch,
            Reply::Error {
                code: cases[i].0,
                message: format!("no good ({i})"),
            },
        );
    });
    for (i, (_, status)) in cases.iter().enumerate() {
        let o = cli(&fake.socket, &["pause", "web"], b"");
        assert_eq!(o.status, *status, "{o:?}");
        assert_eq!(o.stderr, format!("bulkhead: no good ({i})\n"));
        assert_eq!(o.stdout, "");
    }
    fake.join();
}

#[test]
fn done_verbs_print_the_message() {
    let fake = Fake::start(4, |i, ch| {
        let req = recv(ch);
        let expected = match i {
            0 => Request::Pause { name: "a".into() },
            1 => Request::Unpause { name: "a".into() },
            2 => Request::Destroy { name: "a".into() },
            _ => Request::Shutdown {
                name: "a".into(),
                timeout_secs: 7,
            },
        };
        assert_eq!(req, expected);
        reply(
            ch,
            Reply::Done {
                message: format!("did {i}"),
            },
        );
    });
    for (i, args) in [
        &["pause", "a"][..],
        &["unpause", "a"],
        &["destroy", "a"],
        &["shutdown", "a", "--timeout", "7"],
    ]
    .iter()
    .enumerate()
    {
        let o = cli(&fake.socket, args, b"");
        assert_eq!(o.status, 0, "{o:?}");
        assert_eq!(o.stdout, format!("did {i}\n"));
        assert_eq!(o.stderr, "");
    }
    fake.join();
}

#[test]
fn shutdown_timeout_defaults_to_60() {
    let fake = Fake::start(1, |_, ch| {
        assert_eq!(
            recv(ch),
            Request::Shutdown {
                name: "a".into(),
                timeout_secs: 60
            }
        );
        reply(
            ch,
            Reply::Error {
                code: ErrorCode::Timeout,
                message: "a did not shut down within 60 s".into(),
            },
        );
    });
    let o = cli(&fake.socket, &["shutdown", "a"], b"");
    assert_eq!(o.status, EXIT_TIMEOUT, "{o:?}");
    assert_eq!(o.stderr, "bulkhead: a did not shut down within 60 s\n");
    fake.join();
}

#[test]
fn unexpected_reply_is_one_line() {
    let fake = Fake::start(1, |_, ch| {
        let _ = recv(ch);
        reply(ch, Reply::List { vms: vec![] });
    });
    let o = cli(&fake.socket, &["destroy", "a"], b"");
    assert_eq!(o.status, EXIT_FAILURE);
    assert_eq!(
        o.stderr,
        "bulkhead: unexpected reply from bulkheadd to `destroy`: List\n"
    );
    fake.join();
}

#[test]
fn daemon_hanging_up_is_one_line() {
    let fake = Fake::start(1, |_, ch| {
        let _ = recv(ch);
    });
    let o = cli(&fake.socket, &["list"], b"");
    assert_eq!(o.status, EXIT_FAILURE);
    assert_eq!(
        o.stderr,
        "bulkhead: bulkheadd closed the connection without answering\n"
    );
    fake.join();
}

#[test]
fn unreachable_daemon() {
    let dir = TempDir::new();
    let socket = dir.0.join("nobody.sock");
    let o = cli(&socket, &["list"], b"");
    assert_eq!(o.status, EXIT_FAILURE);
    assert_eq!(
        o.stderr,
        format!(
            "bulkhead: cannot reach bulkheadd at {}: No such file or directory \
             (is bulkheadd running? use --socket or BULKHEAD_SOCKET)\n",
            socket.display()
        )
    );
}

#[test]
fn socket_flag_overrides_env() {
    let fake = Fake::start(1, |_, ch| {
        assert_eq!(recv(ch), Request::List);
        reply(ch, Reply::List { vms: vec![] });
    });
    let sock = fake.socket.to_str().expect("utf-8").to_owned();
    let o = cli(
        Path::new("/nonexistent/bulkhead.sock"),
        &["list", "--socket", &sock],
        b"",
    );
    assert_eq!(o.status, 0, "{o:?}");
    fake.join();
}

#[test]
fn refused_hello() {
    let fake = Fake::start_raw(1, |_, ch| {
        let _ = ch
            .recv_timeout::<Hello>(Duration::from_secs(5))
            .expect("hello");
        reply_hello(
            ch,
            HelloReply::Refused {
                server_version: 1,
                reason: "uid 1234 may not use bulkheadd".into(),
            },
        );
    });
    let o = cli(&fake.socket, &["list"], b"");
    assert_eq!(o.status, EXIT_FAILURE);
    assert_eq!(
        o.stderr,
        "bulkhead: bulkheadd refused the connection: uid 1234 may not use bulkheadd\n"
    );
    fake.join();
}

fn reply_hello(ch: &Channel, r: HelloReply) {
    ch.send(&r, &[]).expect("send hello reply");
}

#[test]
fn create_sends_the_file_and_its_directory() {
    let dir = TempDir::new();
    let config = dir.0.join("web.toml");
    let text = "name = \"web\"\nkernel = \"vmlinux\"\n";
    std::fs::write(&config, text).expect("write config");
    let expected_dir = std::fs::canonicalize(&dir.0)
        .expect("canonicalize")
        .into_os_string()
        .into_string()
        .expect("utf-8");
    let fake = Fake::start(1, move |_, ch| {
        assert_eq!(
            recv(ch),
            Request::Create {
                config_toml: text.into(),
                config_dir: expected_dir.clone(),
            }
        );
        reply(
            ch,
            Reply::Created {
                vm: summary("web", 9, VmState::Starting),
            },
        );
    });
    let o = cli(
        &fake.socket,
        &["create", config.to_str().expect("utf-8")],
        b"",
    );
    assert_eq!(o.status, 0, "{o:?}");
    assert_eq!(o.stdout, "created web (id 9)\n");
    fake.join();
}

#[test]
fn create_with_a_missing_file() {
    let o = cli(
        Path::new("/nonexistent.sock"),
        &["create", "/nonexistent/web.toml"],
        b"",
    );
    assert_eq!(o.status, EXIT_FAILURE);
    assert_eq!(
        o.stderr,
        "bulkhead: cannot read /nonexistent/web.toml: No such file or directory\n"
    );
}

#[test]
fn create_bad_config() {
    let dir = TempDir::new();
    let config = dir.0.join("bad.toml");
    std::fs::write(&config, "vcpus = 0\n").expect("write config");
    let fake = Fake::start(1, |_, ch| {
        let _ = recv(ch);
        reply(
            ch,
            Reply::Error {
                code: ErrorCode::BadConfig,
                message: "bad.toml: vcpus must be between 1 and 8".into(),
            },
        );
    });
    let o = cli(
        &fake.socket,
        &["create", config.to_str().expect("utf-8")],
        b"",
    );
    assert_eq!(o.status, EXIT_FAILURE);
    assert_eq!(
        o.stderr,
        "bulkhead: bad.toml: vcpus must be between 1 and 8\n"
    );
    fake.join();
}

/// A console session: history, then output, input forwarded, Ctrl-] detaches.
#[test]
fn console_streams_and_detaches() {
    let fake = Fake::start(1, |_, ch| {
        assert_eq!(recv(ch), Request::Console { name: "web".into() });
        reply(
            ch,
            Reply::ConsoleAttached {
                history: b"boot log\r\n".to_vec(),
            },
        );
        reply(
            ch,
            Reply::ConsoleOutput {
                data: b"login: ".to_vec(),
            },
        );
        assert_eq!(
            recv(ch),
            Request::ConsoleInput {
                data: b"root\n".to_vec()
            }
        );
        reply(
            ch,
            Reply::ConsoleOutput {
                data: b"# ".to_vec(),
            },
        );
        assert_eq!(recv(ch), Request::ConsoleDetach);
        reply(
            ch,
            Reply::ConsoleClosed {
                reason: "detached".into(),
            },
        );
    });
    // Bytes after Ctrl-] are not sent.
    let o = cli(&fake.socket, &["console", "web"], b"root\n\x1dignored");
    assert_eq!(o.status, 0, "{o:?}");
    assert_eq!(o.stdout, "boot log\r\nlogin: # ");
    assert_eq!(o.stderr, "\r\n[console closed: detached]\r\n");
    fake.join();
}

/// At the end of piped input the session goes on until the VM stops.
#[test]
fn console_keeps_streaming_after_input_ends() {
    let fake = Fake::start(1, |_, ch| {
        assert_eq!(recv(ch), Request::Console { name: "web".into() });
        reply(ch, Reply::ConsoleAttached { history: vec![] });
        assert_eq!(
            recv(ch),
            Request::ConsoleInput {
                data: b"poweroff\n".to_vec()
            }
        );
        // Longer than the output loop's poll interval, and no detach arrives.
        std::thread::sleep(Duration::from_millis(500));
        reply(
            ch,
            Reply::ConsoleOutput {
                data: vec![0, 0xff, b'\n'],
            },
        );
        reply(
            ch,
            Reply::ConsoleClosed {
                reason: "the VM stopped (shut down)".into(),
            },
        );
        assert!(
            ch.recv_timeout::<Request>(Duration::from_millis(300))
                .is_err(),
            "no detach after EOF"
        );
    });
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = {
        let mut io = Streams {
            stdin: Some(Box::new(Cursor::new(b"poweroff\n".to_vec()))),
            stdin_is_tty: false,
            stdout: &mut out,
            stderr: &mut err,
            socket_env: Some(fake.socket.clone().into_os_string()),
        };
        run(["bulkhead", "console", "web"], &mut io)
    };
    assert_eq!(status, 0);
    assert_eq!(out, vec![0, 0xff, b'\n'], "raw bytes, unchanged");
    assert_eq!(
        String::from_utf8_lossy(&err),
        "\r\n[console closed: the VM stopped (shut down)]\r\n"
    );
    fake.join();
}

#[test]
fn console_of_an_unknown_vm() {
    let fake = Fake::start(1, |_, ch| {
        let _ = recv(ch);
        reply(
            ch,
            Reply::Error {
                code: ErrorCode::NotFound,
                message: "no VM named nope".into(),
            },
        );
    });
    let o = cli(&fake.socket, &["console", "nope"], b"");
    assert_eq!(o.status, EXIT_NOT_FOUND, "{o:?}");
    assert_eq!(o.stderr, "bulkhead: no VM named nope\n");
    fake.join();
}

#[test]
fn console_connection_lost() {
    let fake = Fake::start(1, |_, ch| {
        let _ = recv(ch);
        reply(
            ch,
            Reply::ConsoleAttached {
                history: b"x".to_vec(),
            },
        );
    });
    let o = cli(&fake.socket, &["console", "web"], b"");
    assert_eq!(o.status, EXIT_FAILURE, "{o:?}");
    assert_eq!(o.stdout, "x");
    assert_eq!(
        o.stderr,
        "bulkhead: bulkheadd closed the console connection\n"
    );
    fake.join();
}

/// `create -c`: created, then a second connection attaches the console.
#[test]
fn create_then_console() {
    let dir = TempDir::new();
    let config = dir.0.join("vm.toml");
    std::fs::write(&config, "name = \"vm\"\n").expect("write config");
    let fake = Fake::start(2, |i, ch| {
        if i == 0 {
            assert!(matches!(recv(ch), Request::Create { .. }));
            reply(
                ch,
                Reply::Created {
                    vm: summary("vm", 3, VmState::Running),
                },
            );
        } else {
            assert_eq!(recv(ch), Request::Console { name: "vm".into() });
            reply(
                ch,
                Reply::ConsoleAttached {
                    history: b"hi\n".to_vec(),
                },
            );
            reply(
                ch,
                Reply::ConsoleClosed {
                    reason: "the VM stopped (exit 0)".into(),
                },
            );
        }
    });
    let o = cli(
        &fake.socket,
        &["create", config.to_str().expect("utf-8"), "-c"],
        b"",
    );
    assert_eq!(o.status, 0, "{o:?}");
    assert_eq!(o.stdout, "created vm (id 3)\nhi\n");
    assert_eq!(
        o.stderr,
        "\r\n[console closed: the VM stopped (exit 0)]\r\n"
    );
    fake.join();
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let o = cli(Path::new("/x"), &["frobnicate"], b"");
    assert_eq!(o.status, EXIT_USAGE);
    assert!(o.stderr.contains("frobnicate"), "{o:?}");
    let o = cli(
        Path::new("/x"),
        &["shutdown", "a", "--timeout", "soon"],
        b"",
    );
    assert_eq!(o.status, EXIT_USAGE);
    let o = cli(Path::new("/x"), &[], b"");
    assert_eq!(o.status, EXIT_USAGE);
    let o = cli(Path::new("/x"), &["--help"], b"");
    assert_eq!(o.status, 0);
    assert!(o.stdout.contains("Exit status:"), "{o:?}");
    for verb in [
        "create", "list", "info", "console", "pause", "unpause", "shutdown", "destroy",
    ] {
        assert!(o.stdout.contains(verb), "{verb} in {}", o.stdout);
    }
}

#[test]
fn clap_definition_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

#[test]
fn save_sends_the_file_it_created_and_removes_it_when_refused() {
    let dir = TempDir::new();
    let file = dir.0.join("vm.snap");
    let fake = Fake::start(2, |i, ch| {
        let (req, fds) = ch
            .recv_timeout::<Request>(Duration::from_secs(5))
            .expect("request");
        assert_eq!(
            req,
            Request::Save {
                name: "web".into(),
                keep_running: i == 0,
            }
        );
        assert_eq!(fds.len(), 1, "the snapshot file travels as one descriptor");
        let f = std::fs::File::from(fds.into_iter().next().expect("fd"));
        use std::io::Write;
        (&f).write_all(b"snapshot")
            .expect("the descriptor is writable");
        if i == 0 {
            reply(
                ch,
                Reply::Done {
                    message: "VM 'web' saved".into(),
                },
            );
        } else {
            reply(
                ch,
                Reply::Error {
                    code: ErrorCode::Internal,
                    message: "cannot save VM 'web'".into(),
                },
            );
        }
    });
    let path = file.to_str().expect("utf-8");
    let o = cli(&fake.socket, &["save", "--keep-running", "web", path], b"");
    assert_eq!(o.status, 0, "{o:?}");
    assert_eq!(std::fs::read(&file).expect("file"), b"snapshot");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "a snapshot holds guest memory: 0600");
    let o = cli(&fake.socket, &["save", "web", path], b"");
    assert_eq!(o.status, EXIT_FAILURE, "{o:?}");
    assert!(!file.exists(), "a failed save leaves no file");
    fake.join();
}

#[test]
fn restore_sends_the_file_and_a_bad_snapshot_exits_2() {
    let dir = TempDir::new();
    let file = dir.0.join("vm.snap");
    std::fs::write(&file, b"not a snapshot").expect("write");
    let fake = Fake::start(1, |_, ch| {
        let (req, fds) = ch
            .recv_timeout::<Request>(Duration::from_secs(5))
            .expect("request");
        assert_eq!(
            req,
            Request::Restore {
                name: Some("web2".into())
            }
        );
        let f = std::fs::File::from(fds.into_iter().next().expect("fd"));
        let mut text = String::new();
        use std::io::Read;
        (&f).read_to_string(&mut text).expect("readable");
        assert_eq!(text, "not a snapshot");
        reply(
            ch,
            Reply::Error {
                code: ErrorCode::BadSnapshot,
                message: "snapshot refused: not a Bulkhead snapshot (bad magic)".into(),
            },
        );
    });
    let path = file.to_str().expect("utf-8");
    let o = cli(&fake.socket, &["restore", "--name", "web2", path], b"");
    assert_eq!(o.status, EXIT_BAD_SNAPSHOT, "{o:?}");
    assert_eq!(EXIT_BAD_SNAPSHOT, 2);
    assert!(o.stderr.contains("bad magic"), "{o:?}");
    // A file that cannot be opened never reaches bulkheadd.
    let o = cli(&fake.socket, &["restore", "/nonexistent/x.snap"], b"");
    assert_eq!(o.status, EXIT_FAILURE, "{o:?}");
    assert!(o.stderr.contains("cannot open"), "{o:?}");
    fake.join();
}
