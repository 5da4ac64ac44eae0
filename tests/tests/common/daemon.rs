//! The `bulkheadd` harness shared by the suites that drive the control domain
//! (control_domain.rs, disk.rs): a real daemon per test (own socket, state dir and policy in
//! a fresh temp dir), driven through the `bulkhead` CLI. Included by those files with
//! `#[path = "common/daemon.rs"] mod daemon;` after `mod common;`.
//!
//! Dropping a [`Bulkheadd`] kills the daemon and every process whose stdout is a log in its
//! state dir: runners (`logs/NAME.log`) and disk backends (`logs/NAME.diskN.log`).
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::json::{self, Json};
use crate::common::*;

/// Deadline for one step (a VM reaching a state, output appearing, a process going away).
pub const STEP: Duration = Duration::from_secs(20);

/// Deadline for one CLI call.
pub const CLI: Duration = Duration::from_secs(30);

/// Runs `cmd` to completion within `deadline` (killed and a panic if it overruns), like
/// [`run`], but returns only once its stdout and stderr reached end-of-file: [`run`] gives
/// the output pumps 20 ms after the exit, which a loaded host (guests spinning on every
/// core) can exceed, and a CLI call then looks as if it printed nothing.
pub fn run_complete(mut cmd: Command, deadline: Duration) -> Finished {
    use std::io::Read;
    use std::process::Stdio;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let pump = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = pump(Box::new(child.stdout.take().expect("stdout")));
    let err = pump(Box::new(child.stderr.take().expect("stderr")));
    let end = std::time::Instant::now() + deadline;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if std::time::Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {deadline:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        code: status.code(),
        stdout: out.join().expect("stdout pump"),
        stderr: err.join().expect("stderr pump"),
    }
}

/// True when we are root (bulkheadd must be); otherwise a loud skip notice.
pub fn root_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!(
            "\n*** SKIPPED {test}: bulkheadd must run as root (CI runs the suite as root) ***\n"
        );
    }
    root
}

/// A `[runners]` policy section giving this test's runners their own uid range, so tests
/// running in parallel never share a runner uid (RLIMIT_NPROC is per uid).
pub fn runner_uids(base: u32) -> String {
    format!("[runners]\nuid_base = {base}\nuid_count = 50\n")
}

pub fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

pub fn send_signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is one we started or read
    // from the daemon.
    unsafe { libc::kill(pid, sig) };
}

/// A VM as `bulkhead list --json` shows it.
#[derive(Debug, Clone)]
pub struct Vm {
    pub name: String,
    /// The state as `bulkhead list` words it (`running`, `stopped (exit 3)`, …).
    pub state: String,
    pub runner_pid: Option<i32>,
    pub owner: u32,
    pub memory_mib: u64,
}

/// The wording of `bulkhead list`'s STATE column for a JSON `VmState`.
pub fn state_word(state: &Json) -> String {
    match state {
        Json::Str(s) => s.to_lowercase(),
        other => match other.get("Stopped") {
            Some(Json::Str(r)) if r == "GuestShutdown" => "stopped (shut down)".into(),
            Some(Json::Str(r)) if r == "Destroyed" => "stopped (destroyed)".into(),
            Some(r) => match (r.get("GuestExit"), r.get("Crashed")) {
                (Some(v), _) => format!("stopped (exit {})", v.as_i64().unwrap_or(-1)),
                (_, Some(why)) => format!("stopped (crashed: {})", why.as_str().unwrap_or("?")),
                _ => format!("{other:?}"),
            },
            None => format!("{other:?}"),
        },
    }
}

pub fn vm_from_json(v: &Json) -> Vm {
    Vm {
        name: v
            .get("name")
            .and_then(Json::as_str)
            .expect("name")
            .to_string(),
        state: state_word(v.get("state").expect("state")),
        runner_pid: v.get("runner_pid").and_then(Json::as_i64).map(|p| p as i32),
        owner: v.get("owner").and_then(Json::as_i64).expect("owner") as u32,
        memory_mib: v
            .get("memory_mib")
            .and_then(Json::as_i64)
            .expect("memory_mib") as u64,
    }
}

/// One `bulkheadd` with its own temp dir, socket, state dir and policy. Dropping it kills
/// the daemon and every runner whose log is in its state dir.
pub struct Bulkheadd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub state: PathBuf,
    pub policy: PathBuf,
    pub selftest: bool,
    pub daemon: Option<Running>,
    /// stderr of daemons that were stopped, for failure reports.
    pub earlier: Vec<String>,
    /// Soft and hard `RLIMIT_NOFILE` the daemon starts with (None: the test's own).
    pub open_files: Option<u64>,
    /// More arguments for the next `launch` (e.g. `--blk PATH`).
    pub extra_args: Vec<String>,
}

impl Bulkheadd {
    /// Starts a daemon for `test`; `policy` is the policy file's text (None: no file, so
    /// only root may act).
    pub fn start(test: &str, policy: Option<&str>, selftest: bool) -> Bulkheadd {
        Self::start_with(test, policy, selftest, None)
    }

    /// [`Bulkheadd::start`] under an `RLIMIT_NOFILE` of `open_files` (soft and hard).
    pub fn start_with(
        test: &str,
        policy: Option<&str>,
        selftest: bool,
        open_files: Option<u64>,
    ) -> Bulkheadd {
        let dir = std::env::temp_dir().join(format!("bh-cd-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        // uid 1000 runs the CLI and reads configs here.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut d = Bulkheadd {
            sock: dir.join("bh.sock"),
            state: dir.join("state"),
            policy: dir.join("policy.toml"),
            dir,
            selftest,
            daemon: None,
            earlier: Vec::new(),
            open_files,
            extra_args: Vec::new(),
        };
        if let Some(p) = policy {
            write_file(&d.policy, p);
        }
        d.launch();
        d
    }

    /// Starts (again) a daemon on this socket, state dir and policy; waits until it
    /// answers `bulkhead list`.
    pub fn launch(&mut self) {
        self.launch_with(None);
    }

    /// [`Bulkheadd::launch`], inside network namespace `netns` if given (`ip netns exec`
    /// execs the daemon, so the child's pid is bulkheadd's).
    fn launch_with(&mut self, netns: Option<&str>) {
        assert!(self.daemon.is_none(), "a daemon is already running");
        let mut c = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("bulkheadd"));
                c
            }
            None => Command::new(bin("bulkheadd")),
        };
        c.arg("--socket")
            .arg(&self.sock)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--policy")
            .arg(&self.policy);
        if self.selftest {
            c.arg("--runner-selftest");
        }
        if let Some(n) = self.open_files {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and only reads `lim`, a copy owned by
            // the closure.
            unsafe {
                c.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        c.args(&self.extra_args);
        let place = netns
            .map(|n| format!(" (in netns {n})"))
            .unwrap_or_default();
        let mut r = Running::spawn(c);
        let mut last = None;
        let ready = wait_until(STEP, || {
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!(
                    "bulkheadd{place} exited during start-up: {status}\n{}",
                    r.stderr.text()
                );
            }
            if !self.sock.exists() {
                return false;
            }
            let out = self.cli(&["list"]);
            let ok = out.code == Some(0);
            last = Some(out.dump());
            ok
        });
        assert!(
            ready,
            "bulkheadd{place} did not answer `list` within {STEP:?}\nlast try: {last:?}\n--- bulkheadd ---\n{}",
            r.stderr.text()
        );
        self.daemon = Some(r);
    }

    pub fn pid(&self) -> i32 {
        self.daemon.as_ref().expect("daemon running").child.id() as i32
    }

    /// SIGTERM the daemon and wait for it to exit.
    pub fn terminate(&mut self) {
        let mut r = self.daemon.take().expect("daemon running");
        send_signal(r.child.id() as i32, libc::SIGTERM);
        let status = r.wait(STEP);
        assert_eq!(
            status.code(),
            None,
            "SIGTERM should end bulkheadd by the signal\n{}",
            r.stderr.text()
        );
        self.earlier.push(r.stderr.text());
    }

    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("bulkhead"));
        c.arg("--socket").arg(&self.sock).args(args);
        c
    }

    /// The CLI as root.
    pub fn cli(&self, args: &[&str]) -> Finished {
        run_complete(self.cli_cmd(args), CLI)
    }

    /// `bulkhead ARGS` as root, which must succeed (`what` names the step in a failure).
    pub fn cli_ok(&self, args: &[&str], what: &str) -> Finished {
        let out = self.cli(args);
        assert_eq!(out.code, Some(0), "{what}\n{}\n{}", out.dump(), self.dump());
        out
    }

    /// The CLI as `uid` (gid = uid, no supplementary groups).
    pub fn cli_as(&self, uid: u32, args: &[&str]) -> Finished {
        let mut c = self.cli_cmd(args);
        c.uid(uid).gid(uid);
        run_complete(c, CLI)
    }

    /// `bulkhead console NAME` as root, running, stdin piped.
    pub fn console(&self, name: &str) -> Running {
        Running::spawn(self.cli_cmd(&["console", name]))
    }

    /// Writes a VM config next to the socket and returns its path.
    pub fn config(&self, name: &str, cmdline: &str, memory: &str, owner: Option<u32>) -> PathBuf {
        let extra = owner.map(|o| format!("owner = {o}\n")).unwrap_or_default();
        self.config_with(name, cmdline, memory, 1, &extra)
    }

    /// Writes a VM config with `vcpus` and `extra_toml` appended verbatim (an `owner = ..`
    /// line, `[[disks]]` tables, ...) next to the socket and returns its path.
    pub fn config_with(
        &self,
        name: &str,
        cmdline: &str,
        memory: &str,
        vcpus: u32,
        extra_toml: &str,
    ) -> PathBuf {
        let mut text = format!(
            "name = \"{name}\"\nvcpus = {vcpus}\nmemory = \"{memory}\"\nkernel = \"{}\"\ncmdline = \"{cmdline}\"\n",
            test_guest().display()
        );
        text.push_str(extra_toml);
        let path = self.dir.join(format!("{name}.toml"));
        write_file(&path, &text);
        path
    }

    /// `bulkhead create` as root; asserts it worked and returns the VM as listed.
    pub fn create(&self, name: &str, cmdline: &str) -> Vm {
        self.create_with(name, cmdline, "128M", None)
    }

    pub fn create_with(&self, name: &str, cmdline: &str, memory: &str, owner: Option<u32>) -> Vm {
        let cfg = self.config(name, cmdline, memory, owner);
        self.create_config(name, &cfg)
    }

    /// `bulkhead create CFG` as root for a config written by [`Bulkheadd::config_with`];
    /// asserts it worked and returns the VM `name` as listed.
    pub fn create_config(&self, name: &str, cfg: &Path) -> Vm {
        let out = self.cli(&["create", cfg.to_str().expect("utf-8 path")]);
        assert_eq!(
            out.code,
            Some(0),
            "create {name}\n{}\n{}",
            out.dump(),
            self.dump()
        );
        assert!(
            out.stdout.starts_with(&format!("created {name} (id ")),
            "{}",
            out.dump()
        );
        let vm = self
            .vm(name)
            .unwrap_or_else(|| panic!("{name} not listed after create\n{}", self.dump()));
        assert!(vm.runner_pid.is_some(), "{vm:?}");
        vm
    }

    /// `bulkhead list --json`, as root or as `uid`.
    pub fn list_as(&self, uid: Option<u32>) -> Vec<Vm> {
        let out = match uid {
            Some(u) => self.cli_as(u, &["list", "--json"]),
            None => self.cli(&["list", "--json"]),
        };
        assert_eq!(
            out.code,
            Some(0),
            "list --json\n{}\n{}",
            out.dump(),
            self.dump()
        );
        let v =
            json::parse(&out.stdout).unwrap_or_else(|e| panic!("list --json: {e}\n{}", out.dump()));
        v.as_array()
            .unwrap_or_else(|| panic!("list --json is not an array\n{}", out.dump()))
            .iter()
            .map(vm_from_json)
            .collect()
    }

    pub fn list(&self) -> Vec<Vm> {
        self.list_as(None)
    }

    pub fn vm(&self, name: &str) -> Option<Vm> {
        self.list().into_iter().find(|v| v.name == name)
    }

    /// `bulkhead info NAME --json` as root.
    pub fn info(&self, name: &str) -> Json {
        let out = self.cli(&["info", name, "--json"]);
        assert_eq!(out.code, Some(0), "info {name}\n{}", out.dump());
        json::parse(&out.stdout).unwrap_or_else(|e| panic!("info --json: {e}\n{}", out.dump()))
    }

    /// NAME's row of the `bulkhead list` table (as root), if listed.
    pub fn row(&self, name: &str) -> Option<String> {
        let out = self.cli(&["list"]);
        assert_eq!(out.code, Some(0), "list\n{}", out.dump());
        out.stdout
            .lines()
            .skip(1)
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(str::to_string)
    }

    /// Waits until NAME's `list` row contains `needle`; returns the row.
    pub fn wait_row(&self, name: &str, needle: &str) -> String {
        let mut last = None;
        let ok = wait_until(STEP, || {
            last = self.row(name);
            last.as_deref().is_some_and(|r| r.contains(needle))
        });
        assert!(
            ok,
            "`list` never showed '{needle}' for {name} within {STEP:?}; last row: {last:?}\n{}",
            self.dump()
        );
        last.unwrap_or_default()
    }

    /// What the running daemon wrote to stderr so far.
    pub fn daemon_log(&self) -> String {
        self.daemon
            .as_ref()
            .map(|d| d.stderr.text())
            .unwrap_or_default()
    }

    pub fn log_path(&self, vm: &str) -> PathBuf {
        self.state.join("logs").join(format!("{vm}.log"))
    }

    pub fn log(&self, vm: &str) -> String {
        std::fs::read_to_string(self.log_path(vm)).unwrap_or_default()
    }

    /// Live runners of this daemon (any process whose stdout is a runner log,
    /// `logs/NAME.log`, in its state dir; disk backends' `logs/NAME.diskN.log` excluded).
    pub fn runners(&self) -> Vec<i32> {
        pids_with_fd_under(1, &self.state.join("logs"))
            .into_iter()
            .filter(|&pid| {
                std::fs::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|t| {
                    !t.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.contains(".disk"))
                })
            })
            .collect()
    }

    /// The log of VM `vm`'s disk backend `index` (its stdout and stderr).
    pub fn disk_log_path(&self, vm: &str, index: usize) -> PathBuf {
        self.state
            .join("logs")
            .join(format!("{vm}.disk{index}.log"))
    }

    /// Live processes whose stdout is VM `vm`'s disk `index` log: its `bulkhead-blk`.
    pub fn disk_backends(&self, vm: &str, index: usize) -> Vec<i32> {
        let log = self.disk_log_path(vm, index);
        pids_with_fd_under(1, &self.state.join("logs"))
            .into_iter()
            .filter(|&pid| std::fs::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|t| t == log))
            .collect()
    }

    /// Everything useful after a failure: the daemons' stderr and the runner logs.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for (i, e) in self.earlier.iter().enumerate() {
            s.push_str(&format!("--- earlier bulkheadd #{i} ---\n{e}\n"));
        }
        if let Some(d) = &self.daemon {
            s.push_str(&format!("--- bulkheadd ---\n{}\n", d.stderr.text()));
        }
        if let Ok(logs) = std::fs::read_dir(self.state.join("logs")) {
            for e in logs.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                s.push_str(&format!("--- {} ---\n{text}\n", e.path().display()));
            }
        }
        s
    }
}

impl Drop for Bulkheadd {
    fn drop(&mut self) {
        // The daemon first, so it starts nothing more; then every runner it left (runners
        // deliberately survive their daemon).
        if let Some(mut d) = self.daemon.take() {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        let logs = self.state.join("logs");
        for pid in pids_with_fd_under(1, &logs) {
            send_signal(pid, libc::SIGKILL);
        }
        let clean = wait_until(Duration::from_secs(10), || {
            pids_with_fd_under(1, &logs).is_empty()
        });
        if !clean {
            eprintln!(
                "warning: runners of {} still alive: {:?}",
                self.dir.display(),
                pids_with_fd_under(1, &logs)
            );
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The start time of a running process (to tell it from a later process with its pid).
pub fn start_time(pid: i32) -> u64 {
    let (start, state) = proc_stat(pid).unwrap_or_else(|| panic!("no process {pid}"));
    assert_ne!(state, 'Z', "process {pid} is a zombie");
    start
}

impl Bulkheadd {
    /// Like [`Bulkheadd::start`], but the daemon runs inside network namespace `netns`
    /// (`ip netns exec NETNS bulkheadd ..`), so the bridges and taps it creates live
    /// there. The CLI reaches it through its socket path as usual.
    pub fn start_in_netns(
        test: &str,
        policy: Option<&str>,
        selftest: bool,
        netns: &str,
    ) -> Bulkheadd {
        let dir = std::env::temp_dir().join(format!("bh-cd-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut d = Bulkheadd {
            sock: dir.join("bh.sock"),
            state: dir.join("state"),
            policy: dir.join("policy.toml"),
            dir,
            selftest,
            daemon: None,
            earlier: Vec::new(),
            open_files: None,
            extra_args: Vec::new(),
        };
        if let Some(p) = policy {
            write_file(&d.policy, p);
        }
        d.launch_in_netns(netns);
        d
    }

    /// [`Bulkheadd::launch`] inside network namespace `netns`.
    pub fn launch_in_netns(&mut self, netns: &str) {
        self.launch_with(Some(netns));
    }

    /// The log of VM `vm`'s NIC backend `index` (its stdout and stderr).
    pub fn nic_log_path(&self, vm: &str, index: usize) -> PathBuf {
        self.state.join("logs").join(format!("{vm}.nic{index}.log"))
    }

    /// Live processes whose stdout is VM `vm`'s NIC `index` log: its `bulkhead-net`.
    pub fn nic_backends(&self, vm: &str, index: usize) -> Vec<i32> {
        let log = self.nic_log_path(vm, index);
        pids_with_fd_under(1, &self.state.join("logs"))
            .into_iter()
            .filter(|&pid| std::fs::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|t| t == log))
            .collect()
    }

    /// The pid the daemon's state record of VM `vm` gives for backend `device` (`nic0`,
    /// `disk1`, …): the `[[backends]]` entry of `state/vms/VM.toml`.
    pub fn backend_pid_in_state(&self, vm: &str, device: &str) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.state.join("vms").join(format!("{vm}.toml"))).ok()?;
        text.split("[[backends]]").skip(1).find_map(|block| {
            let field = |key: &str| {
                block.lines().find_map(|l| {
                    l.trim()
                        .strip_prefix(key)
                        .and_then(|r| r.trim_start().strip_prefix('='))
                        .map(|v| v.trim().trim_matches('"').to_string())
                })
            };
            (field("device").as_deref() == Some(device))
                .then(|| field("pid").and_then(|p| p.parse().ok()))
                .flatten()
        })
    }
}
