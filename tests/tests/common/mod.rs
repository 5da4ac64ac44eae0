//! Shared helpers for the end-to-end suites: finding binaries, KVM gating, and running a
//! process with a deadline while watching its output.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A workspace binary built next to this test (target/<profile>/NAME).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (scripts/test.sh does: cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// The bare-metal test guest ELF.
pub fn test_guest() -> PathBuf {
    PathBuf::from(bulkhead_tests::TEST_GUEST)
}

/// True when /dev/kvm can be used. When it cannot: fails under REQUIRE_KVM=1, otherwise
/// prints a loud skip notice and returns false.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm is not usable but REQUIRE_KVM=1");
        }
        eprintln!("\n*** SKIPPED {test}: /dev/kvm is not usable here (set REQUIRE_KVM=1 to make this a failure) ***\n");
    }
    ok
}

/// Output of a process, collected as it arrives, with waiting on a condition.
#[derive(Clone, Default)]
pub struct Captured {
    inner: Arc<(Mutex<Vec<u8>>, Condvar)>,
    /// Set when the pipe reached end of file.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Captured {
    fn pump<R: Read + Send + 'static>(&self, mut r: R) {
        let me = self.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let (m, c) = &*me.inner;
                        m.lock().unwrap().extend_from_slice(&buf[..n]);
                        c.notify_all();
                    }
                }
            }
            me.closed.store(true, std::sync::atomic::Ordering::SeqCst);
            me.inner.1.notify_all();
        });
    }

    /// Waits (up to `deadline`) until the pipe has been read to its end.
    pub fn wait_closed(&self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        while !self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Everything so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.inner.0.lock().unwrap()).into_owned()
    }

    /// Waits until the output contains `needle`, up to `deadline`.
    pub fn wait_for(&self, needle: &str, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        let (m, c) = &*self.inner;
        let mut g = m.lock().unwrap();
        loop {
            if String::from_utf8_lossy(&g).contains(needle) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            g = c.wait_timeout(g, end - now).unwrap().0;
        }
    }
}

/// A running child whose stdout and stderr are captured.
pub struct Running {
    pub child: Child,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let stdout = Captured::default();
        let stderr = Captured::default();
        stdout.pump(child.stdout.take().expect("stdout"));
        stderr.pump(child.stderr.take().expect("stderr"));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(bytes).expect("write stdin");
        stdin.flush().expect("flush stdin");
    }

    /// Waits for exit up to `deadline`; kills the child and panics with its output if it
    /// overruns.
    pub fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                // Read the pipes to their end (a grandchild holding them open only delays
                // this by the bound below).
                self.stdout.wait_closed(Duration::from_secs(5));
                self.stderr.wait_closed(Duration::from_secs(5));
                return s;
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "process still running after {deadline:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.stdout.text(),
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Result of a finished run.
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn dump(&self) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion within `deadline`.
pub fn run(cmd: Command, deadline: Duration) -> Finished {
    let mut r = Running::spawn(cmd);
    drop(r.child.stdin.take());
    let status = r.wait(deadline);
    Finished {
        code: status.code(),
        stdout: r.stdout.text(),
        stderr: r.stderr.text(),
    }
}

/// `bulkhead-runner` with the test guest and a command line.
pub fn runner_guest(cmdline: &str, vcpus: u32, memory: &str) -> Command {
    let mut c = Command::new(bin("bulkhead-runner"));
    c.arg("--kernel")
        .arg(test_guest())
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--vcpus")
        .arg(vcpus.to_string())
        .arg("--memory")
        .arg(memory);
    c
}

/// The value after `key` on the first output line starting with it.
pub fn line_value(out: &str, key: &str) -> Option<String> {
    out.lines()
        .map(|l| l.trim_end_matches('\r'))
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

/// Path to qemu-system-x86_64, or None with a loud notice.
pub fn qemu(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.exists())
    });
    if found.is_none() {
        eprintln!(
            "\n*** SKIPPED {test}: qemu-system-x86_64 is not installed (.ci/run installs it) ***\n"
        );
    }
    found
}

/// Polls `cond` every 20 ms until it holds or `deadline` passes; true if it held.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process's start time (field 22 of `/proc/PID/stat`, clock ticks since boot) and
/// state letter, or None when there is no such process.
pub fn proc_stat(pid: i32) -> Option<(u64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

/// True while the process `pid` that started at `start` (see [`proc_stat`]) still runs:
/// not reaped, not a zombie, and the pid not reused by another process.
pub fn proc_running(pid: i32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((s, state)) if s == start && state != 'Z')
}

/// True while `/proc/PID` still belongs to the process that started at `start` (running
/// or a zombie not yet reaped).
pub fn proc_exists(pid: i32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((s, _)) if s == start)
}

/// A line of `/proc/PID/status` (`"Uid:"` → the rest of the line, trimmed).
pub fn proc_status_field(pid: i32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

/// Pids of the live processes whose fd `fd` points at a path under `dir`.
pub fn pids_with_fd_under(fd: u32, dir: &std::path::Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) {
            if target.starts_with(dir) {
                out.push(pid);
            }
        }
    }
    out
}

/// A minimal JSON reader for the CLI's `--json` output (the tests crate has no JSON
/// dependency).
pub mod rand_replay;

pub mod json {
    /// A JSON value.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Json {
        Null,
        Bool(bool),
        Num(f64),
        Str(String),
        Arr(Vec<Json>),
        Obj(Vec<(String, Json)>),
    }

    impl Json {
        /// Member `key` of an object.
        pub fn get(&self, key: &str) -> Option<&Json> {
            match self {
                Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }
        pub fn as_str(&self) -> Option<&str> {
            match self {
                Json::Str(s) => Some(s),
                _ => None,
            }
        }
        pub fn as_i64(&self) -> Option<i64> {
            match self {
                Json::Num(n) if n.fract() == 0.0 => Some(*n as i64),
                _ => None,
            }
        }
        pub fn as_array(&self) -> Option<&[Json]> {
            match self {
                Json::Arr(a) => Some(a),
                _ => None,
            }
        }
    }

    /// Parses one JSON document (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing characters at {}", p.i));
        }
        Ok(v)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.s.get(self.i).copied()
        }
        fn expect(&mut self, c: u8) -> Result<(), String> {
            if self.peek() == Some(c) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected '{}' at {}", c as char, self.i))
            }
        }
        fn lit(&mut self, word: &str, v: Json) -> Result<Json, String> {
            if self.s[self.i..].starts_with(word.as_bytes()) {
                self.i += word.len();
                Ok(v)
            } else {
                Err(format!("bad literal at {}", self.i))
            }
        }
        fn value(&mut self) -> Result<Json, String> {
            match self.peek().ok_or("unexpected end")? {
                b'{' => {
                    self.i += 1;
                    let mut m = Vec::new();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                        return Ok(Json::Obj(m));
                    }
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.expect(b':')?;
                        m.push((k, self.value()?));
                        match self.peek() {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(Json::Obj(m));
                            }
                            _ => return Err(format!("bad object at {}", self.i)),
                        }
                    }
                }
                b'[' => {
                    self.i += 1;
                    let mut a = Vec::new();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                        return Ok(Json::Arr(a));
                    }
                    loop {
                        a.push(self.value()?);
                        match self.peek() {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(Json::Arr(a));
                            }
                            _ => return Err(format!("bad array at {}", self.i)),
                        }
                    }
                }
                b'"' => Ok(Json::Str(self.string()?)),
                b't' => self.lit("true", Json::Bool(true)),
                b'f' => self.lit("false", Json::Bool(false)),
                b'n' => self.lit("null", Json::Null),
                _ => {
                    let start = self.i;
                    while self.i < self.s.len()
                        && matches!(
                            self.s[self.i],
                            b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                        )
                    {
                        self.i += 1;
                    }
                    std::str::from_utf8(&self.s[start..self.i])
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .map(Json::Num)
                        .ok_or_else(|| format!("bad number at {start}"))
                }
            }
        }
        fn string(&mut self) -> Result<String, String> {
            if self.s.get(self.i) != Some(&b'"') {
                return Err(format!("expected a string at {}", self.i));
            }
            self.i += 1;
            let mut out: Vec<u8> = Vec::new();
            loop {
                let c = *self.s.get(self.i).ok_or("unterminated string")?;
                self.i += 1;
                match c {
                    b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                    b'\\' => {
                        let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                        self.i += 1;
                        let ch = match e {
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'u' => {
                                let hex = self.s.get(self.i..self.i + 4).ok_or("short \\u")?;
                                self.i += 4;
                                let n = u32::from_str_radix(
                                    std::str::from_utf8(hex).map_err(|e| e.to_string())?,
                                    16,
                                )
                                .map_err(|e| e.to_string())?;
                                char::from_u32(n).unwrap_or('\u{fffd}')
                            }
                            other => other as char,
                        };
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    }
                    other => out.push(other),
                }
            }
        }
    }
}

/// The test guest's disk pattern for sector `n` (see tests/guest/README.md, *Pattern*).
pub fn blk_pattern_sector(seed: u64, n: u64) -> [u8; 512] {
    let mut out = [0u8; 512];
    out[..8].copy_from_slice(&n.to_le_bytes());
    let mut x = seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    if x == 0 {
        x = 0x9e37_79b9_7f4a_7c15;
    }
    for w in 1..64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out[w * 8..w * 8 + 8].copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// Checks that `image` holds the pattern of `seed` in sectors [start, start+count);
/// returns the first wrong sector.
pub fn blk_image_mismatch(
    image: &std::path::Path,
    seed: u64,
    start: u64,
    count: u64,
) -> Option<u64> {
    let data = std::fs::read(image).expect("read image");
    (start..start + count).find(|&n| {
        let off = (n * 512) as usize;
        data.get(off..off + 512) != Some(&blk_pattern_sector(seed, n)[..])
    })
}

/// A raw image of `mib` MiB (zeros) in a fresh temp dir; the dir is returned to clean up.
pub fn temp_image(tag: &str, mib: u64) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("bulkhead-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let img = dir.join("disk.img");
    let f = std::fs::File::create(&img).expect("image");
    f.set_len(mib << 20).expect("size image");
    (dir, img)
}

/// Path of a host tool, or None with a loud skip notice.
pub fn tool(test: &str, name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    });
    if found.is_none() {
        eprintln!("\n*** SKIPPED {test}: {name} is not installed (.ci/run installs it) ***\n");
    }
    found
}

/// A network namespace of one test (`bh-<tag>-<pid>`, loopback up): all of a network
/// test's interfaces, addresses and traffic live in it. Dropping it kills the processes
/// still inside it (by pid, from `ip netns pids`) and deletes it — also when the test
/// panicked.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates the namespace (a stale one of the same name, left by a killed earlier run
    /// of this pid, is deleted first).
    pub fn new(tag: &str) -> Netns {
        let name = format!("bh-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        let lo = ns.ip(&["link", "set", "lo", "up"]);
        assert_eq!(lo.code, Some(0), "lo up in {}: {}", ns.name, lo.dump());
        ns
    }

    /// `ip netns exec NS program`: `ip` enters the namespace and execs `program`, so the
    /// child's pid is the program's.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// `ip -n NS ARGS..` to completion (10 s deadline).
    pub fn ip(&self, args: &[&str]) -> Finished {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        run(c, Duration::from_secs(10))
    }

    /// Like [`Netns::ip`], asserting success.
    pub fn ip_ok(&self, args: &[&str]) {
        let out = self.ip(args);
        assert_eq!(
            out.code,
            Some(0),
            "ip -n {} {}\n{}",
            self.name,
            args.join(" "),
            out.dump()
        );
    }

    /// True if interface `dev` exists in the namespace.
    pub fn link_exists(&self, dev: &str) -> bool {
        self.ip(&["link", "show", "dev", dev]).code == Some(0)
    }

    /// Pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: kill has no memory-safety preconditions; every process in this
            // namespace was started by this test.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if !wait_until(Duration::from_secs(10), || self.pids().is_empty()) {
            eprintln!(
                "warning: processes still in netns {}: {:?}",
                self.name,
                self.pids()
            );
        }
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("warning: ip netns del {} failed: {out:?}", self.name);
        }
    }
}
