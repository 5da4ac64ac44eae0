//! Helpers for suites where a guest streams checksummed, sequence-numbered writes
//! (`blk-stream`) while its disk backend is abused: the VM, what `info` says of its disk,
//! and the final check of the image.
#![allow(dead_code)]

use std::path::Path;

use crate::common::*;
use crate::daemon::*;

/// A VM streaming checksummed writes over its two-queue disk on `img`, whose `[[disks]]`
/// table also holds `disk_toml`.
pub fn stream_vm(
    d: &Bulkheadd,
    name: &str,
    img: &Path,
    seed: u64,
    extra_cmdline: &str,
    disk_toml: &str,
) -> Running {
    let extra = format!(
        "[[disks]]\npath = \"{}\"\nserial = \"stream\"\nqueues = 2\n{disk_toml}",
        img.display()
    );
    let cmdline =
        format!("blk blk-queues=2 blk-stream={seed}:0:2048:1000000 {extra_cmdline} echo exit=0");
    let cfg = d.config_with(name, &cmdline, "256M", 2, &extra);
    d.create_config(name, &cfg);
    let con = d.console(name);
    assert!(
        con.stdout.wait_for("blk0:", STEP),
        "{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    con
}

/// The pid after `key` on the disk0 line of `info`.
pub fn info_pid(d: &Bulkheadd, vm: &str, key: &str) -> Option<i32> {
    let info = d.cli(&["info", vm]).stdout;
    let line = info.lines().find(|l| l.contains("disk0:"))?;
    line.split(key)
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// [`serving`], waiting up to [`STEP`]: right after a replacement `info` and the process
/// list, read one after the other, may briefly disagree.
pub fn wait_serving(d: &Bulkheadd, vm: &str) -> i32 {
    let mut pid = None;
    assert!(
        wait_until(STEP, || {
            pid = serving(d, vm);
            pid.is_some()
        }),
        "no backend serves {vm}'s disk0\n{}",
        d.dump()
    );
    pid.expect("checked above")
}

/// The live process serving disk0, as `info` names it.
pub fn serving(d: &Bulkheadd, vm: &str) -> Option<i32> {
    info_pid(d, vm, " pid ").filter(|p| d.disk_backends(vm, 0).contains(p))
}

/// The restart count `info` shows for disk0.
pub fn restarts(d: &Bulkheadd, vm: &str) -> u32 {
    info_pid(d, vm, "restarts ").map_or(0, |n| n as u32)
}

/// Stops the VM and checks what the stream left: no I/O error seen, every sector holding
/// the one write issued for it, and progress made.
pub fn stream_verifies(d: &Bulkheadd, con: &Running, vm: &str, img: &Path, seed: u64) {
    let (lo, hi) = assert_stream_ends_consistent(d, con, vm, img, seed);
    assert!(lo >= 2, "the stream made progress (passes {lo}..={hi})");
}

/// Stops the VM, checks that the guest saw no I/O error and that every sector holds the
/// one write issued for it; returns the passes found (min, max).
pub fn assert_stream_ends_consistent(
    d: &Bulkheadd,
    con: &Running,
    vm: &str,
    img: &Path,
    seed: u64,
) -> (u64, u64) {
    assert_no_io_error(con);
    let out = d.cli(&["destroy", vm]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    stream_consistent(img, seed, 0, 2048).unwrap_or_else(|e| panic!("{e}"))
}

/// The guest's stream saw no request fail (no `blk-stream: pass N status S` line); returns
/// the console text.
pub fn assert_no_io_error(con: &Running) -> String {
    let text = con.stdout.text();
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("blk-stream: pass") && l.contains("status")),
        "the guest saw an I/O error\n{text}"
    );
    text
}

/// Waits until the guest finishes another stream pass (the stream goes on).
pub fn assert_stream_moves(con: &Running) {
    let passes = |t: &str| t.matches("blk-stream: pass").count();
    let seen = passes(&con.stdout.text());
    assert!(
        wait_until(STEP, || passes(&con.stdout.text()) > seen),
        "the stream stopped\n{}",
        con.stdout.text()
    );
}

/// One sector of the stream format: words 0..=2 and 4..=63 (word 3 is a request number).
pub fn stream_sector_ok(data: &[u8], seed: u64, n: u64, pass: u64) -> bool {
    let word = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    if word(0) != n || word(1) != pass || word(2) != seed || word(3) == 0 {
        return false;
    }
    let mut x = seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (pass << 32);
    if x == 0 {
        x = 0x9e37_79b9_7f4a_7c15;
    }
    (4..64).all(|i| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word(i) == x
    })
}

/// The first sector of [start, start+count) not holding pass `pass` of the stream.
pub fn stream_mismatch(
    image: &Path,
    seed: u64,
    start: u64,
    count: u64,
    pass: u64,
) -> Option<(u64, u64)> {
    let data = std::fs::read(image).expect("image");
    (start..start + count).find_map(|n| {
        let s = &data[(n * 512) as usize..(n * 512 + 512) as usize];
        (!stream_sector_ok(s, seed, n, pass))
            .then(|| (n, u64::from_le_bytes(s[8..16].try_into().unwrap_or([0; 8]))))
    })
}

/// Checks a stream range left by a VM stopped mid-stream: every sector holds exactly the
/// write the guest issued for it in some pass (pattern and request number match), and all
/// passes present are within one of each other (nothing stale). Returns (min, max) pass.
pub fn stream_consistent(
    image: &Path,
    seed: u64,
    start: u64,
    count: u64,
) -> Result<(u64, u64), String> {
    const PER_REQ: u64 = 128; // 64 KiB requests
    let requests = count.div_ceil(PER_REQ);
    let data = std::fs::read(image).map_err(|e| e.to_string())?;
    let (mut lo, mut hi) = (u64::MAX, 0);
    for n in start..start + count {
        let s = &data[(n * 512) as usize..(n * 512 + 512) as usize];
        let pass = u64::from_le_bytes(s[8..16].try_into().unwrap_or([0; 8]));
        let q = u64::from_le_bytes(s[24..32].try_into().unwrap_or([0; 8]));
        if pass == 0 || !stream_sector_ok(s, seed, n, pass) {
            return Err(format!("sector {n}: not a stream write (pass {pass})"));
        }
        let want_q = (pass - 1) * requests + (n - start) / PER_REQ + 1;
        if q != want_q {
            return Err(format!(
                "sector {n}: request number {q}, expected {want_q} for pass {pass}"
            ));
        }
        lo = lo.min(pass);
        hi = hi.max(pass);
    }
    if hi - lo > 1 {
        return Err(format!(
            "passes {lo}..={hi} on one range: a stale sector survived"
        ));
    }
    Ok((lo, hi))
}
