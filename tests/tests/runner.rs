//! `bulkhead-runner` end to end with the bare-metal test guest: SMP boot, memory size,
//! serial echo, guest failures, bad input, and parity with QEMU.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(30);

fn boot_smp(vcpus: u32) {
    let name = format!("boot_smp_{vcpus}");
    if !kvm_available(&name) {
        return;
    }
    let out = run(runner_guest("exit=7", vcpus, "256M"), DEADLINE);
    assert_eq!(out.code, Some(7), "{}", out.dump());
    assert!(
        out.stdout.contains("bulkhead-test-guest: boot"),
        "{}",
        out.dump()
    );
    assert!(
        out.stdout.contains(&format!("cpus: {vcpus} up")),
        "{}",
        out.dump()
    );
    for id in 0..vcpus {
        assert!(
            out.stdout.contains(&format!("cpu {id} up")),
            "cpu {id} did not report in\n{}",
            out.dump()
        );
    }
    assert_eq!(
        line_value(&out.stdout, "ram-top:").as_deref(),
        Some("256 MiB"),
        "{}",
        out.dump()
    );
}

#[test]
fn boot_smp_1() {
    boot_smp(1);
}

#[test]
fn boot_smp_2() {
    boot_smp(2);
}

#[test]
fn boot_smp_4() {
    boot_smp(4);
}

#[test]
fn guest_sees_the_memory_it_was_given() {
    if !kvm_available("guest_sees_the_memory_it_was_given") {
        return;
    }
    for (arg, mib) in [("64M", 64), ("1G", 1024), ("300", 300)] {
        let out = run(runner_guest("exit=0", 1, arg), DEADLINE);
        assert_eq!(out.code, Some(0), "{}", out.dump());
        assert_eq!(
            line_value(&out.stdout, "ram-top:"),
            Some(format!("{mib} MiB")),
            "--memory {arg}\n{}",
            out.dump()
        );
    }
}

#[test]
fn serial_input_is_echoed() {
    if !kvm_available("serial_input_is_echoed") {
        return;
    }
    let mut r = Running::spawn(runner_guest("echo exit=5", 1, "64M"));
    assert!(
        r.stdout.wait_for("echo: ready", DEADLINE),
        "no echo prompt\n{}",
        r.stdout.text()
    );
    r.send(b"hello bulkhead\n");
    assert!(
        r.stdout.wait_for("hello bulkhead", DEADLINE),
        "input not echoed\n{}",
        r.stdout.text()
    );
    r.send(b"quit\n");
    let status = r.wait(DEADLINE);
    assert!(
        r.stdout.text().contains("echo: done"),
        "{}",
        r.stdout.text()
    );
    assert_eq!(
        status.code(),
        Some(5),
        "{}\n{}",
        r.stdout.text(),
        r.stderr.text()
    );
}

#[test]
fn triple_fault_is_reported() {
    if !kvm_available("triple_fault_is_reported") {
        return;
    }
    let out = run(
        runner_guest("fault=triple", 2, "64M"),
        Duration::from_secs(10),
    );
    assert_eq!(out.code, Some(80), "{}", out.dump());
    assert!(out.stderr.contains("vCPU 0"), "{}", out.dump());
    assert!(
        out.stderr.contains("triple-faulted at rip 0x"),
        "{}",
        out.dump()
    );
}

#[test]
fn unemulatable_instruction_is_reported() {
    if !kvm_available("unemulatable_instruction_is_reported") {
        return;
    }
    let out = run(
        runner_guest("fault=unemulated", 1, "64M"),
        Duration::from_secs(10),
    );
    if out.stdout.contains("fault: survived") {
        eprintln!("\n*** SKIPPED unemulatable_instruction_is_reported: this KVM ran every candidate instruction ***\n");
        return;
    }
    assert_eq!(out.code, Some(81), "{}", out.dump());
    assert!(
        out.stderr.contains("vCPU 0: KVM internal error at rip 0x"),
        "{}",
        out.dump()
    );
}

fn assert_bad_input(args: &[&str], expect: &str) {
    let mut c = Command::new(bin("bulkhead-runner"));
    c.args(args);
    let out = run(c, Duration::from_secs(10));
    assert_eq!(out.code, Some(2), "{args:?}\n{}", out.dump());
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected a one-line error for {args:?}\n{}",
        out.dump()
    );
    assert!(
        lines[0].contains(expect),
        "{args:?}: '{}' lacks '{expect}'",
        lines[0]
    );
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("backtrace"),
        "{}",
        out.dump()
    );
}

#[test]
fn bad_input_is_one_line_and_status_2() {
    let dir = std::env::temp_dir().join(format!("bulkhead-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, vec![0x5au8; 4096]).expect("write");
    let guest = std::fs::read(test_guest()).expect("read guest");
    let truncated = dir.join("truncated.elf");
    std::fs::write(&truncated, &guest[..guest.len().min(200)]).expect("write");
    let half = dir.join("half.elf");
    std::fs::write(&half, &guest[..guest.len() / 2]).expect("write");
    let guest_path = test_guest();
    let g = guest_path.to_str().expect("utf8 path");

    assert_bad_input(
        &["--kernel", "/nonexistent/kernel"],
        "cannot read kernel /nonexistent/kernel",
    );
    assert_bad_input(&["--kernel", garbage.to_str().unwrap()], "is not a kernel");
    assert_bad_input(
        &["--kernel", truncated.to_str().unwrap()],
        "cannot load kernel",
    );
    assert_bad_input(&["--kernel", half.to_str().unwrap()], "cannot load kernel");
    assert_bad_input(
        &["--kernel", g, "--vcpus", "0"],
        "vcpus must be between 1 and",
    );
    assert_bad_input(
        &["--kernel", g, "--vcpus", "100000"],
        "vcpus must be between 1 and",
    );
    assert_bad_input(&["--kernel", g, "--memory", "1K"], "too small");
    assert_bad_input(
        &["--kernel", g, "--memory", "100T"],
        "more than this host's",
    );
    assert_bad_input(&["--kernel", g, "--memory", "lots"], "invalid memory size");
    assert_bad_input(
        &["--kernel", g, "--initrd", "/nonexistent/initrd"],
        "cannot read initrd",
    );
    assert_bad_input(
        &["--kernel", g, "--kvm-fd", "999"],
        "--kvm-fd: fd 999 is not open",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn same_checksum_as_qemu() {
    if !kvm_available("same_checksum_as_qemu") {
        return;
    }
    let Some(qemu) = qemu("same_checksum_as_qemu") else {
        return;
    };
    let ours = run(runner_guest("exit=0", 1, "256M"), DEADLINE);
    assert_eq!(ours.code, Some(0), "{}", ours.dump());
    let mut q = Command::new(qemu);
    q.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel",
    ])
    .arg(test_guest())
    .args(["-append", "exit=0"]);
    let theirs = run(q, Duration::from_secs(60));
    assert_eq!(
        theirs.code,
        Some(1),
        "QEMU's debug exit gives (0<<1)|1\n{}",
        theirs.dump()
    );
    let a = line_value(&ours.stdout, "checksum:");
    let b = line_value(&theirs.stdout, "checksum:");
    assert!(a.is_some(), "{}", ours.dump());
    assert_eq!(
        a,
        b,
        "checksums differ\n--- bulkhead ---\n{}\n--- qemu ---\n{}",
        ours.dump(),
        theirs.dump()
    );
    assert_eq!(
        line_value(&theirs.stdout, "ram-top:").as_deref(),
        Some("256 MiB")
    );
}

#[test]
fn inherited_kvm_fd_is_used() {
    if !kvm_available("inherited_kvm_fd_is_used") {
        return;
    }
    // Open /dev/kvm here and hand the runner only the fd, as the control domain will.
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("kvm");
    let raw = kvm.as_raw_fd();
    let mut c = runner_guest("exit=9", 1, "64M");
    c.arg("--kvm-fd").arg("3");
    // SAFETY: only dup2/fcntl run in the forked child before exec; both are
    // async-signal-safe. dup2 onto itself keeps CLOEXEC, hence the fcntl.
    unsafe {
        c.pre_exec(move || {
            let ok = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if ok < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run(c, DEADLINE);
    assert_eq!(out.code, Some(9), "{}", out.dump());
}
