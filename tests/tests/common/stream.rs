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
    let text = con.stdout.text();
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("blk-stream: pass") && l.contains("status")),
        "the guest saw an I/O error\n{text}"
    );
    let out = d.cli(&["destroy", vm]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let data = std::fs::read(img).expect("image");
    // Word 1 of each sector is the pass that wrote it; every sector of the range is a
    // stream write and the passes present are within one of each other.
    let (mut lo, mut hi) = (u64::MAX, 0);
    for n in 0..2048usize {
        let s = &data[n * 512..n * 512 + 512];
        let word = |i: usize| u64::from_le_bytes(s[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        assert!(
            word(0) == n as u64 && word(2) == seed && word(1) > 0,
            "sector {n} is not a stream write of seed {seed}"
        );
        lo = lo.min(word(1));
        hi = hi.max(word(1));
    }
    assert!(hi - lo <= 1, "passes {lo}..={hi}: a stale sector survived");
    assert!(lo >= 2, "the stream made progress (passes {lo}..={hi})");
}
