//! The control domain end to end: a real `bulkheadd` per test (own socket, state dir and
//! policy in a fresh temp dir), driven through the `bulkhead` CLI (as root and as uid
//! 1000) and, for protocol abuse, through raw frames on its socket. VMs run the bare-metal
//! test guest (tests/guest/README.md).
//!
//! Every test kills its daemon and every runner it started when it ends (pass or fail):
//! see [`Bulkheadd`]'s `Drop`. Runners are found by their log file (fd 1 points into the
//! test's state dir), so none is missed even when the daemon is gone.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use bulkhead_ipc::control::{ErrorCode, Reply, Request};
use bulkhead_ipc::hello::{client_hello, Hello, HelloReply, Role, MAGIC, PROTOCOL_VERSION};
use bulkhead_ipc::transport::MAX_FRAME;
use bulkhead_ipc::{Channel, IpcError};
use common::json::Json;
use common::*;
use daemon::*;

/// The unprivileged user the tests act as.
const USER: u32 = 1000;

/// `tick N` lines in console output.
fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

/// Console output with the `tick N` lines taken out and the rest joined without line
/// breaks.
fn without_ticks(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim().starts_with("tick "))
        .map(|l| l.trim_end_matches('\r'))
        .collect()
}

fn max_tick(text: &str) -> u64 {
    ticks(text).into_iter().max().unwrap_or(0)
}

/// The one non-empty line of a CLI error (stderr), asserting there is exactly one.
fn one_error_line(out: &Finished) -> String {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected a one-line error\n{}", out.dump());
    assert!(lines[0].starts_with("bulkhead: "), "{}", out.dump());
    lines[0].to_string()
}

// ------------------------------------------------------------------------------------------
// 1. create, list, console, guest exit
// ------------------------------------------------------------------------------------------

#[test]
fn create_list_console_and_guest_exit() {
    let name = "create_list_console_and_guest_exit";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    // No policy file: the safe default, root may do everything.
    let d = Bulkheadd::start("exit", None, false);
    let vm = d.create("guest1", "echo exit=3");
    let pid = vm.runner_pid.expect("runner pid");
    let start = start_time(pid);
    assert_eq!(vm.state, "running", "{vm:?}");
    assert_eq!((vm.owner, vm.memory_mib), (0, 128), "{vm:?}");
    let row = d.wait_row("guest1", "running");
    assert!(row.contains(&pid.to_string()), "PID column: {row}");

    let mut con = d.console("guest1");
    for line in [
        "bulkhead-test-guest: boot",
        "cmdline: echo exit=3",
        "echo: ready",
    ] {
        assert!(
            con.stdout.wait_for(line, STEP),
            "console lacks '{line}'\n{}\n{}\n{}",
            con.stdout.text(),
            con.stderr.text(),
            d.dump()
        );
    }
    con.send(b"typed into the console\n");
    assert!(
        con.stdout.wait_for("typed into the console", STEP),
        "console input not echoed\n{}",
        con.stdout.text()
    );
    con.send(b"quit\n");
    let status = con.wait(STEP);
    assert_eq!(
        status.code(),
        Some(0),
        "console should end well when the VM stops\n{}\n{}",
        con.stdout.text(),
        con.stderr.text()
    );
    assert!(
        con.stdout.text().contains("echo: done"),
        "{}",
        con.stdout.text()
    );
    assert!(
        con.stderr
            .text()
            .contains("[console closed: VM stopped: guest exited with status 3]"),
        "{}",
        con.stderr.text()
    );

    let row = d.wait_row("guest1", "stopped (exit 3)");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols.get(cols.len() - 2),
        Some(&"-"),
        "a stopped VM has no PID: {row}"
    );

    let info = d.info("guest1");
    let summary = info.get("summary").expect("summary");
    assert_eq!(
        state_word(summary.get("state").expect("state")),
        "stopped (exit 3)",
        "{info:?}"
    );
    assert_eq!(summary.get("runner_pid"), Some(&Json::Null), "{info:?}");
    assert_eq!(
        info.get("cmdline").and_then(Json::as_str),
        Some("echo exit=3")
    );
    let kernel = std::fs::canonicalize(test_guest()).expect("guest path");
    assert_eq!(info.get("kernel").and_then(Json::as_str), kernel.to_str());
    // bulkheadd spawned this runner, so it reaps it: no zombie either.
    assert!(
        wait_until(STEP, || !proc_exists(pid, start)),
        "runner {pid} still exists: {:?}",
        proc_stat(pid)
    );
}

// ------------------------------------------------------------------------------------------
// 2. destroy leaves nothing behind
// ------------------------------------------------------------------------------------------

#[test]
fn destroy_leaves_no_process_behind() {
    let name = "destroy_leaves_no_process_behind";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("destroy", Some(&runner_uids(62000)), false);
    let vm = d.create("doomed", "echo");
    let pid = vm.runner_pid.expect("runner pid");
    let start = start_time(pid);
    assert_eq!(d.runners(), vec![pid], "exactly one runner, the listed one");

    let out = d.cli(&["destroy", "doomed"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(
        out.stdout.contains("VM 'doomed' destroyed"),
        "{}",
        out.dump()
    );
    // Gone from /proc: killed and reaped (bulkheadd is its parent), not left a zombie.
    assert!(
        wait_until(STEP, || !proc_exists(pid, start)),
        "runner {pid} still in /proc after destroy: {:?}",
        proc_stat(pid)
    );
    assert!(d.runners().is_empty(), "runners left: {:?}", d.runners());
    assert!(d.vm("doomed").is_none(), "{:?}", d.list());
    assert!(d.row("doomed").is_none());
    let out = d.cli(&["info", "doomed"]);
    assert_eq!(
        out.code,
        Some(4),
        "info of a destroyed VM is NotFound\n{}",
        out.dump()
    );
    assert!(
        !d.state.join("vms/doomed.toml").exists(),
        "state record left behind"
    );
    assert!(
        !d.state.join("run/doomed.sock").exists(),
        "runner socket left behind"
    );
}

// ------------------------------------------------------------------------------------------
// 3. the runner's sandbox, seen from outside and from its own self-test
// ------------------------------------------------------------------------------------------

#[test]
fn runner_is_sandboxed() {
    let name = "runner_is_sandboxed";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("sandbox", Some(&runner_uids(62100)), true);
    let vm = d.create("boxed", "echo");
    let pid = vm.runner_pid.expect("runner pid");
    let status = |key: &str| {
        proc_status_field(pid, key).unwrap_or_else(|| panic!("/proc/{pid}/status has no {key}"))
    };

    // A dedicated uid and gid (real, effective, saved, fs), no supplementary groups.
    for key in ["Uid:", "Gid:"] {
        let ids: Vec<u32> = status(key)
            .split_whitespace()
            .map(|v| v.parse().expect("id"))
            .collect();
        assert_eq!(ids.len(), 4, "{key} {ids:?}");
        assert!(ids.iter().all(|&id| id != 0), "runner {key} {ids:?}");
        assert!(ids.iter().all(|&id| id == ids[0]), "runner {key} {ids:?}");
        assert!(
            (62100..62150).contains(&ids[0]),
            "runner {key} {ids:?} outside the policy's range"
        );
    }
    assert_eq!(status("Groups:"), "", "supplementary groups");
    assert_eq!(status("Seccomp:"), "2", "seccomp filter mode");
    assert_eq!(status("NoNewPrivs:"), "1");

    // Own pid, net, mount (and ipc, uts) namespaces.
    let daemon = d.pid();
    for ns in ["pid", "net", "mnt", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("runner ns");
        let ours = std::fs::read_link(format!("/proc/{daemon}/ns/{ns}")).expect("daemon ns");
        assert_ne!(theirs, ours, "runner shares the daemon's {ns} namespace");
    }

    // An empty root.
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root/"))
        .expect("read the runner's root")
        .map(|e| e.map(|e| e.file_name()))
        .collect();
    assert!(root.is_empty(), "runner's root is not empty: {root:?}");

    // Only the descriptors it was handed or made itself; no host file.
    let log = d.log_path("boxed");
    let mut seen = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
    {
        // A descriptor may close between read_dir and readlink.
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy().into_owned();
        let allowed = t == "/dev/null"
            || target == log
            || t == "/dev/kvm"
            || t.starts_with("/memfd:bulkhead-guest-ram")
            || t.starts_with("socket:[")
            || t.starts_with("anon_inode:");
        assert!(
            allowed,
            "runner fd {:?} -> {t} is not allowed",
            e.file_name()
        );
        seen.push(t);
    }
    assert!(
        seen.iter().any(|t| t == "/dev/kvm"),
        "no /dev/kvm fd: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|t| t.starts_with("/memfd:bulkhead-guest-ram")),
        "no guest RAM memfd: {seen:?}"
    );

    // rlimits set by the spawn.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("nofile");
    assert_eq!(
        open_files.split_whitespace().nth(3),
        Some("256"),
        "{open_files}"
    );
    // Address space: its 128 MiB of guest RAM + 2 GiB + 256 MiB for its one vCPU.
    assert_eq!(
        limit_value(&limits, "Max address space"),
        Some((128u64 << 20) + (2 << 30) + (256 << 20)),
        "{limits}"
    );

    // The runner's own self-test, run inside the sealed sandbox before the guest booted.
    let text = d.log("boxed");
    for probe in [
        "open /etc/passwd",
        "open /dev/kvm by path",
        "socket(AF_INET)",
        "execve /bin/sh",
        "ptrace",
        "clone(CLONE_NEWUSER)",
        "clone3(CLONE_NEWUSER)",
    ] {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("sandbox-selftest: {probe}")))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "self-test of '{probe}' not logged once\n{text}"
        );
        assert!(
            lines[0].contains(": denied ("),
            "'{probe}' was not denied: {}",
            lines[0]
        );
    }
    assert!(
        !text.contains("ALLOWED"),
        "the sandbox allowed something\n{text}"
    );
}

// ------------------------------------------------------------------------------------------
// 4. two VMs at once
// ------------------------------------------------------------------------------------------

#[test]
fn two_vms_run_at_once_under_different_uids() {
    let name = "two_vms_run_at_once_under_different_uids";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("two", Some(&runner_uids(62200)), false);
    let a = d.create("vm-a", "echo exit=1");
    let b = d.create("vm-b", "echo exit=2");
    let (pa, pb) = (a.runner_pid.expect("pid a"), b.runner_pid.expect("pid b"));
    assert_ne!(pa, pb);
    let list = d.list();
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list.iter().all(|v| v.state == "running"), "{list:?}");

    let uid = |pid: i32| -> u32 {
        proc_status_field(pid, "Uid:")
            .and_then(|u| u.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| panic!("uid of {pid}"))
    };
    let (ua, ub) = (uid(pa), uid(pb));
    assert_ne!(ua, ub, "two runners share uid {ua}");
    assert!(ua != 0 && ub != 0);
    for (n, u) in [("vm-a", ua), ("vm-b", ub)] {
        let info = d.info(n);
        assert_eq!(
            info.get("runner_uid").and_then(Json::as_i64),
            Some(i64::from(u)),
            "{n}: {info:?}"
        );
    }
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).expect("ns");
    assert_ne!(ns(pa), ns(pb), "two runners share a pid namespace");

    // Each console is its own guest's.
    for (n, own, other) in [
        ("vm-a", "cmdline: echo exit=1", "exit=2"),
        ("vm-b", "cmdline: echo exit=2", "exit=1"),
    ] {
        let mut c = d.console(n);
        assert!(
            c.stdout.wait_for("echo: ready", STEP),
            "{n}: {}",
            c.stdout.text()
        );
        let text = c.stdout.text();
        assert!(
            text.contains(own) && !text.contains(other),
            "{n}'s console:\n{text}"
        );
        c.send(&[0x1d]); // Ctrl-]: detach.
        let st = c.wait(STEP);
        assert_eq!(st.code(), Some(0), "{}", c.stderr.text());
    }
    // Both still run after the consoles left.
    assert!(
        d.list().iter().all(|v| v.state == "running"),
        "{:?}",
        d.list()
    );
    assert!(proc_running(pa, start_time(pa)) && proc_running(pb, start_time(pb)));
}

// ------------------------------------------------------------------------------------------
// 5. policy
// ------------------------------------------------------------------------------------------

#[test]
fn policy_admins_and_owners() {
    let name = "policy_admins_and_owners";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let policy = format!("[admins]\nuids = [0]\n{}", runner_uids(62300));
    let d = Bulkheadd::start("owners", Some(&policy), false);

    // uid 1000 may not create, even a VM it would own.
    let cfg = d.config("mine", "echo", "128M", Some(USER));
    let out = d.cli_as(USER, &["create", cfg.to_str().expect("path")]);
    assert_eq!(out.code, Some(3), "{}", out.dump());
    let line = one_error_line(&out);
    assert!(line.contains("rule 'admins'"), "{line}");
    assert!(
        d.list().is_empty(),
        "a refused create left a VM: {:?}",
        d.list()
    );
    assert!(d.runners().is_empty());

    let a = d.create_with("vm-a", "echo", "128M", Some(USER));
    let b = d.create_with("vm-b", "echo", "128M", Some(0));
    assert_eq!((a.owner, b.owner), (USER, 0));

    // Its own VM's console works for uid 1000.
    let mut c = d.cli_cmd(&["console", "vm-a"]);
    c.uid(USER).gid(USER);
    let mut con = Running::spawn(c);
    assert!(
        con.stdout.wait_for("echo: ready", STEP),
        "uid {USER} sees no output of its VM\n{}\n{}",
        con.stdout.text(),
        con.stderr.text()
    );
    con.send(b"owner was here\n");
    assert!(
        con.stdout.wait_for("owner was here", STEP),
        "{}",
        con.stdout.text()
    );
    con.send(&[0x1d]);
    let st = con.wait(STEP);
    assert_eq!(st.code(), Some(0), "{}", con.stderr.text());

    // Not someone else's.
    let out = d.cli_as(USER, &["console", "vm-b"]);
    assert_eq!(out.code, Some(3), "{}", out.dump());
    let line = one_error_line(&out);
    assert!(
        line.contains("rule 'owner'") && line.contains("vm-b"),
        "{line}"
    );
    assert!(
        out.stdout.is_empty(),
        "output of a VM uid {USER} does not own:\n{}",
        out.stdout
    );
    for verb in ["info", "destroy", "pause", "shutdown"] {
        let out = d.cli_as(USER, &[verb, "vm-b"]);
        assert_eq!(
            out.code,
            Some(3),
            "{verb} vm-b as uid {USER}\n{}",
            out.dump()
        );
        assert!(
            one_error_line(&out).contains("rule 'owner'"),
            "{}",
            out.dump()
        );
    }

    // uid 1000 sees only its own VM; root sees both, still running.
    let mine: Vec<String> = d.list_as(Some(USER)).into_iter().map(|v| v.name).collect();
    assert_eq!(mine, vec!["vm-a".to_string()]);
    let table = d.cli_as(USER, &["list"]);
    assert_eq!(table.code, Some(0), "{}", table.dump());
    assert!(
        table.stdout.contains("vm-a") && !table.stdout.contains("vm-b"),
        "{}",
        table.stdout
    );
    let all = d.list();
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.iter().all(|v| v.state == "running"), "{all:?}");
}

#[test]
fn policy_memory_limits() {
    let name = "policy_memory_limits";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let policy = format!(
        "[limits]\nmax_memory = \"256M\"\nhost_memory = \"384M\"\n{}",
        runner_uids(62400)
    );
    let d = Bulkheadd::start("limits", Some(&policy), false);
    let try_create = |vm: &str, memory: &str| {
        let cfg = d.config(vm, "echo", memory, None);
        d.cli(&["create", cfg.to_str().expect("path")])
    };

    let out = try_create("big", "512M");
    assert_eq!(out.code, Some(3), "{}", out.dump());
    assert!(
        one_error_line(&out).contains("limits.max_memory"),
        "{}",
        out.dump()
    );
    assert!(d.list().is_empty(), "{:?}", d.list());

    let out = try_create("first", "256M");
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    let out = try_create("second", "256M");
    assert_eq!(out.code, Some(3), "{}", out.dump());
    assert!(
        one_error_line(&out).contains("limits.host_memory"),
        "{}",
        out.dump()
    );
    let names: Vec<String> = d.list().into_iter().map(|v| v.name).collect();
    assert_eq!(names, vec!["first".to_string()]);
    assert_eq!(d.runners().len(), 1, "a refused create left a runner");

    // The memory of a destroyed VM is given back.
    let out = d.cli(&["destroy", "first"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let out = try_create("second", "256M");
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
}

// ------------------------------------------------------------------------------------------
// 6. protocol abuse
// ------------------------------------------------------------------------------------------

/// Sends `bytes` as one datagram, bypassing the framing.
fn send_raw(ch: &Channel, bytes: &[u8]) {
    // SAFETY: `bytes` is valid for `bytes.len()` bytes; the fd is the channel's socket.
    let n = unsafe {
        libc::send(
            ch.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    assert_eq!(
        usize::try_from(n).ok(),
        Some(bytes.len()),
        "send of {} bytes: {}",
        bytes.len(),
        std::io::Error::last_os_error()
    );
}

/// A frame: the 4-byte little-endian length `claimed`, then `payload`.
fn frame(claimed: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = claimed.to_le_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// Expects the daemon to refuse the hello (naming why) and close the connection.
fn expect_refused(ch: &Channel, what: &str) -> String {
    let reason = match ch.recv_timeout::<HelloReply>(STEP) {
        Ok((
            HelloReply::Refused {
                server_version,
                reason,
            },
            _,
        )) => {
            assert_eq!(server_version, PROTOCOL_VERSION, "{what}");
            reason
        }
        other => panic!("{what}: expected a Refused hello reply, got {other:?}"),
    };
    match ch.recv_raw_timeout(STEP) {
        Err(IpcError::Closed) => {}
        other => panic!("{what}: the connection should be closed after Refused, got {other:?}"),
    }
    reason
}

/// Expects `Reply::Error { code: Protocol }` for the last frame.
fn expect_protocol_error(ch: &Channel, what: &str) {
    match ch.recv_timeout::<Reply>(STEP) {
        Ok((
            Reply::Error {
                code: ErrorCode::Protocol,
                message,
            },
            _,
        )) => {
            assert!(!message.is_empty(), "{what}: empty message");
        }
        other => panic!("{what}: expected Error {{ code: Protocol }}, got {other:?}"),
    }
}

#[test]
fn protocol_abuse_gets_error_replies_not_crashes() {
    let name = "protocol_abuse_gets_error_replies_not_crashes";
    if !root_available(name) {
        return;
    }
    let mut d = Bulkheadd::start("protocol", Some(&runner_uids(62500)), false);
    let connect = || Channel::connect(&d.sock).expect("connect");

    // Bad first frames.
    let ch = connect();
    send_raw(&ch, b"GET / HTTP/1.0\r\n\r\n");
    let r = expect_refused(&ch, "HTTP request as hello");
    assert!(r.contains("not a Bulkhead client"), "{r}");

    let ch = connect();
    send_raw(&ch, &[0xff, 0x00]);
    let r = expect_refused(&ch, "2-byte first frame");
    assert!(r.contains("not a Bulkhead client"), "{r}");

    let ch = connect();
    send_raw(&ch, &frame(18, b"not a hello at all"));
    let r = expect_refused(&ch, "well-framed garbage as hello");
    assert!(r.contains("not a Bulkhead hello"), "{r}");

    // Right magic and version, but a role that does not exist.
    let ch = connect();
    let mut bad_role = MAGIC.to_vec();
    bad_role.extend_from_slice(&[PROTOCOL_VERSION as u8, 0x09]);
    send_raw(&ch, &frame(bad_role.len() as u32, &bad_role));
    let r = expect_refused(&ch, "hello with an unknown role");
    assert!(r.contains("malformed hello"), "{r}");

    // Another protocol version: refused, naming both versions.
    let ch = connect();
    let future = Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION + 98,
        role: Role::Cli,
    };
    ch.send(&future, &[]).expect("send hello");
    let r = expect_refused(&ch, "wrong-version hello");
    assert!(
        r.contains(&format!("version {}", PROTOCOL_VERSION + 98))
            && r.contains(&format!("version {PROTOCOL_VERSION}")),
        "{r}"
    );

    // An empty datagram reads as a closed connection: dropped without an answer.
    let ch = connect();
    send_raw(&ch, &[]);
    match ch.recv_raw_timeout(STEP) {
        Err(IpcError::Closed) => {}
        Ok((payload, _)) => match bulkhead_ipc::transport::decode::<HelloReply>(&payload) {
            Ok(HelloReply::Refused { .. }) => {}
            other => panic!("empty first frame: {other:?}"),
        },
        Err(e) => panic!("empty first frame: {e}"),
    }

    // After a good hello: each bad frame gets a Protocol error, and the connection lives on.
    let ch = connect();
    client_hello(&ch, Role::Cli, STEP).expect("hello");
    send_raw(
        &ch,
        &frame(8, &[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff]),
    );
    expect_protocol_error(&ch, "garbage request");
    send_raw(&ch, &frame(1, &[0x7f]));
    expect_protocol_error(&ch, "unknown request variant");
    send_raw(&ch, &frame(2, &[0x01, 0x00]));
    expect_protocol_error(&ch, "a request with trailing bytes");
    send_raw(&ch, &frame(100, &[0x01; 10]));
    expect_protocol_error(&ch, "truncated frame (header says 100, 10 sent)");
    send_raw(&ch, &[0x01, 0x00]);
    expect_protocol_error(&ch, "frame shorter than its header");
    send_raw(&ch, &frame(1 << 30, &[0x01; 16]));
    expect_protocol_error(&ch, "header claiming 1 GiB");
    let big = MAX_FRAME + 1024;
    send_raw(&ch, &frame(big as u32, &vec![0x41; big]));
    expect_protocol_error(&ch, "oversized frame (256 KiB + 1 KiB)");
    ch.send(
        &Request::ConsoleInput {
            data: b"x".to_vec(),
        },
        &[],
    )
    .expect("send");
    match ch.recv_timeout::<Reply>(STEP) {
        Ok((
            Reply::Error {
                code: ErrorCode::WrongState,
                ..
            },
            _,
        )) => {}
        other => panic!("console input without a console: {other:?}"),
    }
    ch.send(&Request::List, &[]).expect("send List");
    match ch.recv_timeout::<Reply>(STEP) {
        Ok((Reply::List { vms }, _)) => assert!(vms.is_empty(), "{vms:?}"),
        other => panic!("List after bad frames on the same connection: {other:?}"),
    }
    drop(ch);

    // A client that says hello and vanishes mid-request changes nothing either.
    let ch = connect();
    client_hello(&ch, Role::Cli, STEP).expect("hello");
    send_raw(&ch, &frame(1000, &[0x00; 3]));
    drop(ch);

    // The daemon survived all of it and serves a new client.
    let daemon = d.daemon.as_mut().expect("daemon");
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "bulkheadd died\n{}",
        daemon.stderr.text()
    );
    let out = d.cli(&["list"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(out.stdout.starts_with("NAME"), "{}", out.dump());
    let err = d.daemon.as_ref().expect("daemon").stderr.text();
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------
// 7. control-plane restart
// ------------------------------------------------------------------------------------------

#[test]
fn control_plane_restart_readopts_runners() {
    let name = "control_plane_restart_readopts_runners";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let mut d = Bulkheadd::start("restart", Some(&runner_uids(62600)), false);
    let v1 = d.create("v1", "ticks=100");
    let v2 = d.create("v2", "ticks=100");
    let (p1, p2) = (v1.runner_pid.expect("pid"), v2.runner_pid.expect("pid"));
    let (s1, s2) = (start_time(p1), start_time(p2));

    let c1 = d.console("v1");
    assert!(
        c1.stdout.wait_for("tick 3", STEP),
        "v1 does not tick\n{}\n{}",
        c1.stdout.text(),
        d.dump()
    );

    // Stop the control plane: the guests keep running.
    d.terminate();
    let before = max_tick(&c1.stdout.text());
    drop(c1);
    assert!(before >= 3, "{before}");
    assert!(proc_running(p1, s1), "v1's runner died with bulkheadd");
    assert!(proc_running(p2, s2), "v2's runner died with bulkheadd");

    // A new bulkheadd on the same state dir re-adopts them.
    d.launch();
    let list = d.list();
    for (vm, pid) in [("v1", p1), ("v2", p2)] {
        let v = list
            .iter()
            .find(|v| v.name == vm)
            .unwrap_or_else(|| panic!("{vm} not listed: {list:?}"));
        assert_eq!(v.state, "running", "{v:?}\n{}", d.dump());
        assert_eq!(v.runner_pid, Some(pid), "{v:?}");
    }

    // Output after the restart: a tick the old daemon never saw.
    let c1 = d.console("v1");
    let mut after = 0;
    let fresh = wait_until(STEP, || {
        after = max_tick(&c1.stdout.text());
        after > before
    });
    assert!(
        fresh,
        "no tick after {before} through the new daemon\n{}\n{}",
        c1.stdout.text(),
        d.dump()
    );
    drop(c1);
    // And input: the ticking guest echoes console bytes (up to 16 per poll, so a tick
    // line may land inside the echo: compare with the tick lines taken out).
    let mut c2 = d.console("v2");
    c2.send(b"hello after restart\n");
    assert!(
        wait_until(STEP, || without_ticks(&c2.stdout.text())
            .contains("hello after restart")),
        "console input after restart not echoed\n{}\n{}",
        c2.stdout.text(),
        d.dump()
    );
    drop(c2);

    // destroy works on a re-adopted VM.
    let out = d.cli(&["destroy", "v1"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    // Not our child any more (its parent was the old daemon): gone or a zombie awaiting init.
    assert!(
        wait_until(STEP, || !proc_running(p1, s1)),
        "v1's runner {p1} survived destroy"
    );
    assert!(d.vm("v1").is_none(), "{:?}", d.list());

    // A new VM next to a re-adopted one gets a runner uid of its own.
    let v3 = d.create("v3", "ticks=100");
    let p3 = v3.runner_pid.expect("pid");
    let s3 = start_time(p3);
    let uid = |pid: i32| proc_status_field(pid, "Uid:").expect("uid");
    assert_ne!(uid(p3), uid(p2), "v3 got the uid of the re-adopted v2");

    // Restart with one runner killed meanwhile: that VM is recorded as crashed.
    d.terminate();
    send_signal(p2, libc::SIGKILL);
    assert!(
        wait_until(STEP, || !proc_running(p2, s2)),
        "v2's runner survived SIGKILL"
    );
    assert!(proc_running(p3, s3), "v3's runner died with bulkheadd");
    d.launch();
    let row = d.wait_row("v2", "stopped (crashed: ");
    let v2 = d.vm("v2").expect("v2 listed");
    assert_eq!(v2.runner_pid, None, "{v2:?}");
    assert!(v2.state.starts_with("stopped (crashed: "), "{v2:?} / {row}");
    let v3 = d.vm("v3").expect("v3 listed");
    assert_eq!(
        (v3.state.as_str(), v3.runner_pid),
        ("running", Some(p3)),
        "{v3:?}\n{}",
        d.dump()
    );
    let c3 = d.console("v3");
    assert!(
        c3.stdout.wait_for("tick ", STEP),
        "v3 silent after the second restart\n{}",
        d.dump()
    );
    drop(c3);

    // Both go away with destroy (the crashed one is only a record).
    for vm in ["v2", "v3"] {
        let out = d.cli(&["destroy", vm]);
        assert_eq!(
            out.code,
            Some(0),
            "destroy {vm}\n{}\n{}",
            out.dump(),
            d.dump()
        );
    }
    assert!(
        wait_until(STEP, || !proc_running(p3, s3)),
        "v3's runner survived destroy"
    );
    assert!(d.list().is_empty(), "{:?}", d.list());
}

// ------------------------------------------------------------------------------------------
// 8. shutdown (and pause, which it must respect)
// ------------------------------------------------------------------------------------------

#[test]
fn shutdown_pause_and_unpause() {
    let name = "shutdown_pause_and_unpause";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("shutdown", Some(&runner_uids(62700)), false);
    let vm = d.create("polite", "ticks=100");
    let pid = vm.runner_pid.expect("pid");
    let start = start_time(pid);
    let mut con = d.console("polite");
    assert!(
        con.stdout.wait_for("tick 2", STEP),
        "{}\n{}",
        con.stdout.text(),
        d.dump()
    );

    // Paused: the guest stops ticking, and shutdown is refused until it is unpaused.
    let out = d.cli(&["pause", "polite"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(out.stdout.contains("VM 'polite' paused"), "{}", out.dump());
    d.wait_row("polite", "paused");
    // Absence of output needs a window: let in-flight bytes land, then watch for 1 s
    // (10 tick periods).
    std::thread::sleep(Duration::from_millis(300));
    let frozen = max_tick(&con.stdout.text());
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        max_tick(&con.stdout.text()),
        frozen,
        "a paused guest kept ticking"
    );
    let out = d.cli(&["shutdown", "polite", "--timeout", "5"]);
    assert_eq!(out.code, Some(1), "{}", out.dump());
    assert!(one_error_line(&out).contains("unpause"), "{}", out.dump());
    let out = d.cli(&["unpause", "polite"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    d.wait_row("polite", "running");
    assert!(
        wait_until(STEP, || max_tick(&con.stdout.text()) > frozen),
        "no tick after unpause\n{}",
        con.stdout.text()
    );

    // A guest that complies.
    let out = d.cli(&["shutdown", "polite", "--timeout", "20"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(
        out.stdout.contains("VM 'polite' stopped (guest shut down)"),
        "{}",
        out.dump()
    );
    d.wait_row("polite", "stopped (shut down)");
    assert!(
        con.stdout.wait_for("shutdown: requested", STEP),
        "{}",
        con.stdout.text()
    );
    let st = con.wait(STEP);
    assert_eq!(st.code(), Some(0), "{}", con.stderr.text());
    assert!(
        con.stderr
            .text()
            .contains("[console closed: VM stopped: guest shut down]"),
        "{}",
        con.stderr.text()
    );
    assert!(
        wait_until(STEP, || !proc_exists(pid, start)),
        "runner {pid} left after shutdown"
    );
    let out = d.cli(&["shutdown", "polite"]);
    assert_eq!(
        out.code,
        Some(1),
        "shutdown of a stopped VM\n{}",
        out.dump()
    );

    // A guest that does not comply in time. The test guest has no mode that ignores the
    // request (echo and ticks both poll the port), so give it no time at all: with
    // --timeout 0 bulkheadd gives up before any guest could stop (a runner reports its
    // guest's end no sooner than 50 ms after it). This exercises the daemon's and CLI's
    // timeout path, not a truly stubborn guest.
    d.create("stubborn", "echo");
    let out = d.cli(&["shutdown", "stubborn", "--timeout", "0"]);
    assert_eq!(out.code, Some(5), "{}\n{}", out.dump(), d.dump());
    let line = one_error_line(&out);
    assert!(line.contains("bulkhead destroy stubborn"), "{line}");
    let out = d.cli(&["destroy", "stubborn"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    let _ = std::io::stderr().flush();
}

// ------------------------------------------------------------------------------------------
// 9. a guest that ends while bulkheadd is down
// ------------------------------------------------------------------------------------------

#[test]
fn guest_ending_while_daemon_is_down_is_reported_after_restart() {
    let name = "guest_ending_while_daemon_is_down_is_reported_after_restart";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let mut d = Bulkheadd::start("ended", Some(&runner_uids(62800)), false);
    // Filling 300 MiB takes the guest about a second; it then exits with status 7.
    let vm = d.create_with("ender", "fill=300 exit=7", "512M", None);
    let pid = vm.runner_pid.expect("pid");
    let start = start_time(pid);
    d.terminate();
    // The runner logs how the guest ended, then keeps the outcome for the next daemon.
    assert!(
        wait_until(STEP, || d.log("ender").contains("guest stopped")),
        "the guest did not end\n{}",
        d.dump()
    );
    assert!(
        proc_running(pid, start),
        "the runner did not wait for a daemon to collect the outcome"
    );
    d.launch();
    let row = d.wait_row("ender", "stopped (");
    assert!(
        row.contains("stopped (exit 7)"),
        "the outcome the runner kept was not collected: {row}\n{}",
        d.dump()
    );
    assert!(
        wait_until(STEP, || !proc_running(pid, start)),
        "runner {pid} lingers after reporting"
    );
}

// ------------------------------------------------------------------------------------------
// 10. create is reliable on a busy host
// ------------------------------------------------------------------------------------------

#[test]
fn create_is_reliable_on_a_busy_host() {
    let name = "create_is_reliable_on_a_busy_host";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("busy", Some(&runner_uids(62900)), false);
    // Keep every core busy so the runners' threads get preempted at awkward moments:
    // ticking guests (their vCPUs spin on rdtsc) and spinning threads here.
    for i in 0..3 {
        d.create(&format!("spin{i}"), "ticks=100");
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..cores * 2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 1u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for i in 0..20 {
        let vm = format!("busy{i}");
        let cfg = d.config(&vm, "echo", "64M", None);
        let out = d.cli(&["create", cfg.to_str().expect("path")]);
        if out.code != Some(0) {
            failures.push(format!("create #{i}: {}", out.stderr.trim()));
            continue;
        }
        let out = d.cli(&["destroy", &vm]);
        assert_eq!(out.code, Some(0), "{}", out.dump());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    assert!(
        failures.is_empty(),
        "{} of 20 creates failed on a busy host:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ------------------------------------------------------------------------------------------
// 11. a console client that never reads
// ------------------------------------------------------------------------------------------

#[test]
fn console_client_that_never_reads_stalls_nothing() {
    let name = "console_client_that_never_reads_stalls_nothing";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("deafcon", Some(&runner_uids(65300)), false);
    // A tick every millisecond: a socket nobody reads fills within a minute.
    d.create("chatty", "ticks=1");
    let deaf = Channel::connect(&d.sock).expect("connect");
    client_hello(&deaf, Role::Cli, STEP).expect("hello");
    deaf.send(
        &Request::Console {
            name: "chatty".into(),
        },
        &[],
    )
    .expect("send Console");
    // Never read from `deaf` again. bulkheadd cuts it off once its socket is full.
    assert!(
        wait_until(Duration::from_secs(120), || d
            .daemon_log()
            .contains("does not read its output; disconnecting it")),
        "the deaf console client was never cut off\n{}",
        d.dump()
    );
    // The VM's other clients and verbs are unaffected: a reading console sees new ticks,
    // pause and unpause answer, destroy works.
    let con = d.console("chatty");
    assert!(
        con.stdout.wait_for("tick", STEP),
        "no tick on a second console\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
        con.stdout.text(),
        con.stderr.text(),
        d.dump()
    );
    let seen = max_tick(&con.stdout.text());
    assert!(
        wait_until(STEP, || max_tick(&con.stdout.text()) > seen + 100),
        "the second console stopped moving\n{}",
        con.stdout.text()
    );
    for verb in ["pause", "unpause"] {
        let out = d.cli(&[verb, "chatty"]);
        assert_eq!(out.code, Some(0), "{verb}\n{}\n{}", out.dump(), d.dump());
    }
    let out = d.cli(&["destroy", "chatty"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    // The cut-off client reads what was queued, then end-of-file.
    let mut closed = false;
    for _ in 0..100_000 {
        match deaf.recv_timeout::<Reply>(STEP) {
            Ok(_) => continue,
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the cut-off client was never closed");
}

/// `on_reboot = "restart"`: `bulkhead reboot` and a guest's own reset start the same VM again
/// in place (a new runner, the console stays attached); `bulkhead shutdown` still ends it;
/// `destroy` stops a VM that keeps rebooting; without the key a reset ends the VM.
#[test]
fn reboot_restarts_in_place() {
    let name = "reboot_restarts_in_place";
    if !root_available(name) || !kvm_available(name) {
        return;
    }
    let d = Bulkheadd::start("reboot", Some(&runner_uids(64200)), false);
    let cfg = d.config_with("again", "ticks=100", "128M", 1, "on_reboot = \"restart\"\n");
    let vm = d.create_config("again", &cfg);
    let pid1 = vm.runner_pid.expect("pid");
    let con = d.console("again");
    assert!(con.stdout.wait_for("tick 2", STEP), "{}", con.stdout.text());

    // `bulkhead reboot`: the guest resets when asked; the VM runs again with a new runner.
    let out = d.cli(&["reboot", "again", "--timeout", "20"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(out.stdout.contains("VM 'again' rebooted"), "{}", out.dump());
    let pid2 = d.vm("again").and_then(|v| v.runner_pid).expect("pid");
    assert_ne!(pid1, pid2, "a new runner after the reboot");
    assert!(
        wait_until(STEP, || con.stdout.text().matches("cpu 0 up").count() >= 2),
        "the attached console shows the second boot\n{}",
        con.stdout.text()
    );
    assert_eq!(d.vm("again").map(|v| v.state), Some("running".into()));

    // `bulkhead shutdown`: the same reset now ends the VM.
    let out = d.cli(&["shutdown", "again", "--timeout", "20"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(
        out.stdout.contains("VM 'again' stopped (guest shut down)"),
        "{}",
        out.dump()
    );

    // A guest that resets itself at once keeps being restarted until destroyed.
    let cfg = d.config_with("loop", "reboot", "128M", 1, "on_reboot = \"restart\"\n");
    d.create_config("loop", &cfg);
    assert!(
        wait_until(STEP, || d
            .daemon_log()
            .contains("VM 'loop' restarted in place (boot 3)")),
        "no third boot\n{}",
        d.dump()
    );
    let out = d.cli(&["destroy", "loop"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.dump(), d.dump());
    assert!(d.vm("loop").is_none(), "{}", d.dump());

    // Without on_reboot (default "destroy"), the guest's reset ends the VM.
    let cfg = d.config_with("once", "reboot", "128M", 1, "");
    d.create_config("once", &cfg);
    d.wait_row("once", "stopped (shut down)");
}

/// The soft value of the `/proc/PID/limits` row that starts with `name` (None: unlimited
/// or absent).
fn limit_value(limits: &str, name: &str) -> Option<u64> {
    limits
        .lines()
        .find(|l| l.starts_with(name))?
        .strip_prefix(name)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
