//! How `bulkhead` renders what `bulkheadd` answers: the `list` table, `info` lines, states
//! and uptimes. Pure functions of the reply, so they are unit-tested here.

use std::fmt::Write as _;

use bulkhead_ipc::control::{StopReason, VmInfo, VmState, VmSummary};

/// The `list` header, in column order.
const HEADER: [&str; 8] = [
    "NAME",
    "ID",
    "STATE",
    "VCPUS",
    "MEMORY(MiB)",
    "OWNER",
    "PID",
    "UPTIME",
];

/// Which `list` columns are right-aligned (the numbers).
const RIGHT: [bool; 8] = [false, true, false, true, true, true, true, true];

/// Text from the daemon made safe for a terminal: control characters (escape sequences,
/// newlines) are shown escaped instead of acting on the terminal or breaking the layout.
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `running`, `paused`, `starting`, or `stopped (<reason>)`.
pub fn state(s: &VmState) -> String {
    match s {
        VmState::Starting => "starting".to_owned(),
        VmState::Running => "running".to_owned(),
        VmState::Paused => "paused".to_owned(),
        VmState::Saving => "saving".to_owned(),
        VmState::Restoring => "restoring".to_owned(),
        VmState::Stopped(reason) => format!("stopped ({})", stop_reason(reason)),
    }
}

/// `shut down`, `exit <v>`, `crashed: <detail>` or `destroyed`.
pub fn stop_reason(r: &StopReason) -> String {
    match r {
        StopReason::GuestShutdown => "shut down".to_owned(),
        StopReason::GuestExit(v) => format!("exit {v}"),
        StopReason::Crashed(detail) => format!("crashed: {}", sanitize(detail)),
        StopReason::Destroyed => "destroyed".to_owned(),
    }
}

/// Elapsed time like `ps -o etime`: `mm:ss`, `hh:mm:ss` or `d-hh:mm:ss`.
pub fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}-{h:02}:{m:02}:{s:02}")
    } else if h > 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{m:02}:{s:02}")
    }
}

/// The cells of one `list` row, in [`HEADER`] order.
fn row(vm: &VmSummary) -> [String; 8] {
    [
        sanitize(&vm.name),
        vm.id.to_string(),
        state(&vm.state),
        vm.vcpus.to_string(),
        vm.memory_mib.to_string(),
        vm.owner.to_string(),
        vm.runner_pid
            .map_or_else(|| "-".to_owned(), |p| p.to_string()),
        uptime(vm.uptime_secs),
    ]
}

/// The `list` table: a header line, then one line per VM, columns separated by at least
/// two spaces, numbers right-aligned, no trailing whitespace. Ends with a newline.
pub fn table(vms: &[VmSummary]) -> String {
    let mut rows: Vec<[String; 8]> = Vec::with_capacity(vms.len() + 1);
    rows.push(HEADER.map(str::to_owned));
    rows.extend(vms.iter().map(row));
    let mut widths = [0usize; 8];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if RIGHT[i] {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Width of the `key:` column of `info`.
const KEY_WIDTH: usize = 12;

/// One `key: value` line of `info`; a multi-valued key continues on aligned lines.
fn field(out: &mut String, key: &str, values: &[String]) {
    let label = format!("{key}:");
    let mut first = true;
    for v in values {
        let k = if first { label.as_str() } else { "" };
        first = false;
        let line = format!("{k:<KEY_WIDTH$}{v}");
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// `info`: one `key: value` line per property (disks and NICs one per line, `-` when
/// there are none). Ends with a newline.
pub fn info(vm: &VmInfo) -> String {
    let s = &vm.summary;
    let one = |v: String| vec![v];
    let opt = |v: Option<String>| vec![v.unwrap_or_else(|| "-".to_owned())];
    let list = |items: &[String]| {
        if items.is_empty() {
            vec!["-".to_owned()]
        } else {
            items.iter().map(|i| sanitize(i)).collect()
        }
    };
    let mut out = String::new();
    field(&mut out, "name", &one(sanitize(&s.name)));
    field(&mut out, "id", &one(s.id.to_string()));
    field(&mut out, "state", &one(state(&s.state)));
    field(&mut out, "vcpus", &one(s.vcpus.to_string()));
    let pages = if vm.hugepages {
        " in 2 MiB huge pages"
    } else {
        ""
    };
    field(
        &mut out,
        "memory",
        &one(format!("{} MiB{pages}", s.memory_mib)),
    );
    field(&mut out, "owner", &one(format!("uid {}", s.owner)));
    field(
        &mut out,
        "runner pid",
        &opt(s.runner_pid.map(|p| p.to_string())),
    );
    field(
        &mut out,
        "runner uid",
        &opt(vm.runner_uid.map(|u| u.to_string())),
    );
    field(
        &mut out,
        "uptime",
        &one(format!("{} ({} s)", uptime(s.uptime_secs), s.uptime_secs)),
    );
    field(&mut out, "kernel", &one(sanitize(&vm.kernel)));
    field(&mut out, "initrd", &opt(vm.initrd.as_deref().map(sanitize)));
    field(&mut out, "cmdline", &one(sanitize(&vm.cmdline)));
    field(&mut out, "disks", &list(&vm.disks));
    field(&mut out, "nics", &list(&vm.nics));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(name: &str, id: u32, state: VmState) -> VmSummary {
        VmSummary {
            name: name.to_owned(),
            id,
            state,
            vcpus: 2,
            memory_mib: 512,
            owner: 1000,
            runner_pid: Some(4242),
            uptime_secs: 3723,
        }
    }

    #[test]
    fn states() {
        assert_eq!(state(&VmState::Running), "running");
        assert_eq!(state(&VmState::Paused), "paused");
        assert_eq!(state(&VmState::Starting), "starting");
        assert_eq!(
            state(&VmState::Stopped(StopReason::GuestShutdown)),
            "stopped (shut down)"
        );
        assert_eq!(
            state(&VmState::Stopped(StopReason::GuestExit(3))),
            "stopped (exit 3)"
        );
        assert_eq!(
            state(&VmState::Stopped(StopReason::Crashed(
                "triple fault".into()
            ))),
            "stopped (crashed: triple fault)"
        );
        assert_eq!(
            state(&VmState::Stopped(StopReason::Destroyed)),
            "stopped (destroyed)"
        );
    }

    #[test]
    fn uptimes() {
        assert_eq!(uptime(0), "00:00");
        assert_eq!(uptime(59), "00:59");
        assert_eq!(uptime(61), "01:01");
        assert_eq!(uptime(3600), "01:00:00");
        assert_eq!(uptime(3723), "01:02:03");
        assert_eq!(uptime(86_400 + 3723), "1-01:02:03");
        assert_eq!(uptime(u64::MAX), "213503982334601-07:00:15");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(sanitize("a\x1b[2Jb\nc"), "a\\u{1b}[2Jb\\nc");
        assert_eq!(sanitize("café"), "café");
        assert_eq!(
            state(&VmState::Stopped(StopReason::Crashed("x\ny".into()))),
            "stopped (crashed: x\\ny)"
        );
    }

    #[test]
    fn empty_table_is_the_header() {
        assert_eq!(
            table(&[]),
            "NAME  ID  STATE  VCPUS  MEMORY(MiB)  OWNER  PID  UPTIME\n"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let mut b = summary("database", 12, VmState::Stopped(StopReason::GuestExit(1)));
        b.runner_pid = None;
        b.memory_mib = 16384;
        b.uptime_secs = 5;
        let t = table(&[summary("web", 1, VmState::Running), b]);
        let expected = "\
NAME      ID  STATE             VCPUS  MEMORY(MiB)  OWNER   PID    UPTIME
web        1  running               2          512   1000  4242  01:02:03
database  12  stopped (exit 1)      2        16384   1000     -     00:05
";
        assert_eq!(t, expected);
        for line in t.lines() {
            assert_eq!(line, line.trim_end());
        }
    }

    #[test]
    fn info_lines() {
        let vm = VmInfo {
            summary: summary("web", 1, VmState::Paused),
            kernel: "/srv/vmlinux".into(),
            hugepages: true,
            initrd: None,
            cmdline: "console=ttyS0".into(),
            runner_uid: Some(60001),
            disks: vec!["/srv/a.img".into(), "/srv/b.img (ro)".into()],
            nics: vec![],
        };
        let expected = "\
name:       web
id:         1
state:      paused
vcpus:      2
memory:     512 MiB in 2 MiB huge pages
owner:      uid 1000
runner pid: 4242
runner uid: 60001
uptime:     01:02:03 (3723 s)
kernel:     /srv/vmlinux
initrd:     -
cmdline:    console=ttyS0
disks:      /srv/a.img
            /srv/b.img (ro)
nics:       -
";
        assert_eq!(info(&vm), expected);
    }

    #[test]
    fn info_empty_cmdline_has_no_trailing_space() {
        let vm = VmInfo {
            summary: summary("x", 1, VmState::Starting),
            kernel: "k".into(),
            hugepages: false,
            initrd: Some("i".into()),
            cmdline: String::new(),
            runner_uid: None,
            disks: vec![],
            nics: vec!["tap0".into()],
        };
        let text = info(&vm);
        assert!(text.contains("\ncmdline:\n"), "{text}");
        assert!(text.contains("\nrunner uid: -\n"), "{text}");
        assert!(text.contains("\ninitrd:     i\n"), "{text}");
        assert!(text.contains("\nnics:       tap0\n"), "{text}");
    }
}
