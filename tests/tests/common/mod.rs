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
        });
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
                // Let the pumps drain the pipes.
                std::thread::sleep(Duration::from_millis(20));
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
