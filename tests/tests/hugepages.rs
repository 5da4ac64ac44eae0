//! Guest RAM in 2 MiB huge pages (`hugepages = true`) end to end, with real KVM, a real
//! `bulkheadd` and a real `bulkhead-blk`: a guest whose RAM is taken from the host's hugetlb
//! pool streams checksummed writes (`blk-stream`) while its disk backend is killed and
//! replaced, is saved and restored (the RAM made again of huge pages), and its stream
//! finishes and verifies; the pool gives the pages back when the VM goes. A pool too short
//! for the VM, or a size that is not a whole number of pages, is refused at create. A VM
//! holding every free page reboots in place again and again (each boot's RAM given back
//! before the next is made). A policy with `limits.hugepages = false` refuses them all.
//!
//! The tests change a global sysctl (`vm.nr_hugepages`): each holds a [`HugePool`] for its
//! whole body, which takes [`POOL_LOCK`] and puts the sysctl back as it found it.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/stream.rs"]
mod stream;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use common::*;
use daemon::*;
use stream::{assert_no_io_error, assert_stream_moves, restarts, serving, stream_consistent};

/// The host's pool of 2 MiB pages.
const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// The sysctl that sizes [`POOL`].
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Guest RAM of the streaming VM, and the 2 MiB pages it takes.
const VM_MEMORY: &str = "256M";
const VM_PAGES: u64 = 128;

/// Passes of the stream: enough to outlast the backend kill and the save.
const PASSES: u64 = 400;

/// Long enough for a restored stream to finish and verify.
const STREAM_DONE: Duration = Duration::from_secs(240);

/// Held for the whole body of each test here: they all resize and count the one pool.
static POOL_LOCK: Mutex<()> = Mutex::new(());

/// A number the kernel keeps in a file of one line.
fn read_count(path: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path} holds {text:?}, not a count: {e}"))
}

/// A count of the 2 MiB pool (`free_hugepages`, `resv_hugepages`, ...).
fn pool(name: &str) -> u64 {
    read_count(&format!("{POOL}/{name}"))
}

/// Free pages in the pool (allocated to no one).
fn free_pages() -> u64 {
    pool("free_hugepages")
}

/// Free pages no mapping has reserved yet: what a new VM can take (the count the control
/// domain's refusal gives).
fn available_pages() -> u64 {
    core_vmm::memory::free_huge_pages().unwrap_or_else(|e| panic!("{POOL}: {e}"))
}

/// The pool in words, for failure reports.
fn pool_state() -> String {
    format!(
        "vm.nr_hugepages {}, free {}, reserved {}, surplus {}, overcommit {}",
        read_count(NR_HUGEPAGES),
        free_pages(),
        pool("resv_hugepages"),
        pool("surplus_hugepages"),
        pool("nr_overcommit_hugepages")
    )
}

/// Waits until the pool has at least `pages` free again (the VM's pages went back), or
/// panics with the pool and the daemon's logs.
fn wait_pool_back(d: &Bulkheadd, pages: u64, after: &str) {
    assert!(
        wait_until(STEP, || free_pages() >= pages),
        "the pool did not get its pages back after {after} within {STEP:?}: {pages} free \
         before the VM, now {}\n{}",
        pool_state(),
        d.dump()
    );
}

/// `vm.nr_hugepages` raised for one test and put back as it was when dropped; holds
/// [`POOL_LOCK`] meanwhile, so the tests here take turns with the pool.
struct HugePool {
    /// `vm.nr_hugepages` before the test.
    original: u64,
    /// What it read after the test raised it (None: left alone).
    set: Option<u64>,
    /// Released after `drop` has put the sysctl back.
    _turn: MutexGuard<'static, ()>,
}

impl HugePool {
    /// Raises `vm.nr_hugepages` by `pages` (0: leaves it as it is). None, after a loud SKIP
    /// notice, when the host has no 2 MiB pool or the kernel could not give `pages` free
    /// pages (host memory too fragmented).
    fn reserve(test: &str, pages: u64) -> Option<HugePool> {
        if !Path::new(POOL).is_dir() {
            eprintln!("\n*** SKIP: {test}: this host has no 2 MiB hugetlb pool ({POOL}) ***\n");
            return None;
        }
        let turn = POOL_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let original = read_count(NR_HUGEPAGES);
        let mut guard = HugePool {
            original,
            set: None,
            _turn: turn,
        };
        if pages == 0 {
            return Some(guard);
        }
        let want = original + pages;
        if let Err(e) = std::fs::write(NR_HUGEPAGES, want.to_string()) {
            // A read-only /proc/sys (a container) leaves the pool to the host's admin.
            eprintln!("\n*** SKIP: {test}: cannot write {want} to {NR_HUGEPAGES}: {e} ***\n");
            return None;
        }
        guard.set = Some(read_count(NR_HUGEPAGES));
        let available = available_pages();
        if available < pages {
            eprintln!(
                "\n*** SKIP: {test}: asked the kernel for {pages} more 2 MiB pages \
                 (vm.nr_hugepages {original} -> {want}) but only {available} are free to take \
                 ({}); is host memory too fragmented? ***\n",
                pool_state()
            );
            return None;
        }
        eprintln!(
            "{test}: vm.nr_hugepages {original} -> {want} ({})",
            pool_state()
        );
        Some(guard)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let Some(set) = self.set else {
            return;
        };
        match std::fs::read_to_string(NR_HUGEPAGES).map(|t| t.trim().parse::<u64>()) {
            Ok(Ok(now)) if now == set => {
                if let Err(e) = std::fs::write(NR_HUGEPAGES, self.original.to_string()) {
                    eprintln!(
                        "warning: could not put {NR_HUGEPAGES} back to {}: {e}",
                        self.original
                    );
                }
            }
            other => eprintln!(
                "warning: {NR_HUGEPAGES} reads {other:?}, not the {set} this test set: someone \
                 else changed it meanwhile; left as it is (it was {} before the test)",
                self.original
            ),
        }
    }
}

/// A VM of [`VM_MEMORY`] in huge pages on 2 vCPUs streaming [`PASSES`] passes over sectors
/// 0..2048 of a two-queue disk on `img`, then verifying them and exiting 0.
fn huge_stream_config(d: &Bulkheadd, name: &str, img: &Path) -> PathBuf {
    let cmdline = format!(
        "blk blk-queues=2 blk-stream=11:0:2048:{PASSES} blk-stream-verify=11:0:2048:{PASSES} exit=0"
    );
    let extra = format!(
        "hugepages = true\n[[disks]]\npath = \"{}\"\nserial = \"huge\"\nqueues = 2\n",
        img.display()
    );
    d.config_with(name, &cmdline, VM_MEMORY, 2, &extra)
}

/// Asserts the pool now has at least [`VM_PAGES`] fewer free pages than `before`: `when`
/// the VM's RAM is taken from it.
fn assert_pool_holds_the_vm(d: &Bulkheadd, before: u64, when: &str) {
    let now = free_pages();
    assert!(
        before.saturating_sub(now) >= VM_PAGES,
        "{when}: the pool should have at least {VM_PAGES} fewer free pages than the {before} \
         before the VM; {}\n{}",
        pool_state(),
        d.dump()
    );
}

/// Asserts `bulkhead info NAME` says the VM's RAM is in huge pages (`when` names the step).
fn assert_info_says_huge(d: &Bulkheadd, name: &str, when: &str) {
    let info = d.cli_ok(&["info", name], "info").stdout;
    assert!(
        info.lines()
            .any(|l| l.starts_with("memory:") && l.contains("256 MiB in 2 MiB huge pages")),
        "{when}: info does not say '256 MiB in 2 MiB huge pages'\n{info}"
    );
}

/// Creates VM `name` from `cfg`, which must be refused (`why` says what is wrong with it)
/// and leave no VM listed; returns what the CLI said, stdout and stderr.
fn assert_create_refused(d: &Bulkheadd, name: &str, cfg: &Path, why: &str) -> Finished {
    let out = d.cli(&["create", cfg.to_str().expect("utf-8")]);
    assert_ne!(
        out.code,
        Some(0),
        "{why}, and yet it is created ({})\n{}\n{}",
        pool_state(),
        out.dump(),
        d.dump()
    );
    assert!(
        d.vm(name).is_none(),
        "a refused VM is not listed: {:?}\n{}",
        d.list(),
        d.dump()
    );
    out
}

/// A guest whose RAM is 128 huge pages streams writes through a kill of its disk backend
/// and through a save and restore; it finishes, verifies, and the pool gets its pages back.
#[test]
fn huge_page_vm_streams_through_backend_restart_and_save_restore() {
    let test = "huge_page_vm_streams_through_backend_restart_and_save_restore";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    // Declared before the daemon, so dropped after it: the VM's pages are given back (or
    // at least on their way) before the sysctl is put back.
    let Some(_pool) = HugePool::reserve(test, VM_PAGES) else {
        return;
    };
    let d = Bulkheadd::start("hp-stream", Some(&runner_uids(69000)), false);
    let (dir, img) = temp_image("hp-stream", 8);
    let name = "hugestream";
    let before = free_pages();

    let cfg = huge_stream_config(&d, name, &img);
    d.create_config(name, &cfg);
    let con = d.console(name);
    assert!(
        con.stdout.wait_for("blk-stream: pass 20 ok", STEP),
        "the stream did not get going\n{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    let said = format!("VM '{name}': guest RAM 256 MiB in {VM_PAGES} huge pages of 2 MiB");
    assert!(
        d.daemon_log().contains(&said),
        "the daemon log lacks '{said}'\n{}",
        d.dump()
    );
    assert_pool_holds_the_vm(&d, before, "while the VM runs");
    assert_info_says_huge(&d, name, "after the create");

    // The disk backend dies: a new one (which maps the huge-page RAM afresh) takes over,
    // and the stream goes on.
    let pid = stream::wait_serving(&d, name);
    let count = restarts(&d, name);
    send_signal(pid, libc::SIGKILL);
    assert!(
        wait_until(STEP, || serving(&d, name).is_some_and(|p| p != pid)
            && restarts(&d, name) > count),
        "no new backend serves the disk after killing {pid} (restarts {count} before)\n{}\n{}",
        d.cli(&["info", name]).stdout,
        d.dump()
    );
    assert_stream_moves(&con);
    assert_no_io_error(&con);
    eprintln!(
        "disk backend {pid} killed; {:?} serves the disk ({} restarts)",
        serving(&d, name),
        restarts(&d, name)
    );

    // Saved mid-stream (the VM goes, and its pages with it), then restored: its RAM is
    // made of huge pages again.
    let snap = dir.join("huge.snap");
    let out = d.cli_ok(&["save", name, snap.to_str().expect("utf-8")], "save");
    assert!(out.stdout.contains("saved"), "{}", out.dump());
    let text = assert_no_io_error(&con);
    assert!(
        !text.contains("blk-stream: done"),
        "the stream ended before the save: make it longer\n{text}"
    );
    let saved_at = text.matches("blk-stream: pass").count();
    eprintln!(
        "saved after {saved_at} of {PASSES} passes: {}",
        out.stdout.trim()
    );
    assert!(
        d.vm(name).is_none(),
        "save destroys the VM: {:?}\n{}",
        d.list(),
        d.dump()
    );
    wait_pool_back(&d, before, "the save");
    let out = d.cli_ok(&["restore", snap.to_str().expect("utf-8")], "restore");
    eprintln!("{}", out.stdout.trim());
    let log = d.daemon_log();
    assert_eq!(
        log.matches(&said).count(),
        2,
        "the restore makes the RAM of huge pages again and says so ('{said}' once per \
         create/restore)\n{}",
        d.dump()
    );
    assert_pool_holds_the_vm(&d, before, "after the restore");
    assert_info_says_huge(&d, name, "after the restore");

    let con = d.console(name);
    assert!(
        wait_until(STREAM_DONE, || d
            .vm(name)
            .is_some_and(|v| v.state.starts_with("stopped"))),
        "the restored guest did not end within {STREAM_DONE:?}\n{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    assert!(
        con.stdout.wait_closed(STEP),
        "the console did not close\n{}",
        con.stdout.text()
    );
    let text = assert_no_io_error(&con);
    assert!(
        text.contains("blk-stream-verify: ok"),
        "the restored stream does not verify\n{text}\n{}",
        d.dump()
    );
    assert_eq!(
        d.vm(name).map(|v| v.state),
        Some("stopped (exit 0)".to_string()),
        "{text}\n{}",
        d.dump()
    );
    // Every sector holds exactly the write of the last pass, with its request number.
    let (lo, hi) = stream_consistent(&img, 11, 0, 2048)
        .unwrap_or_else(|e| panic!("the image is not the stream's: {e}\n{}", d.dump()));
    assert_eq!(
        (lo, hi),
        (PASSES, PASSES),
        "every sector holds the last pass"
    );

    d.cli_ok(&["destroy", name], "destroy");
    wait_pool_back(&d, before, "the destroy");
    let _ = std::fs::remove_dir_all(dir);
}

/// A VM asking for more huge pages than the pool has free is refused at create, saying so
/// and naming `vm.nr_hugepages`; nothing is left of it and the pool is whole again. A size
/// that is not a whole number of 2 MiB pages is refused too.
#[test]
fn huge_page_vm_is_refused_when_the_pool_is_short() {
    let test = "huge_page_vm_is_refused_when_the_pool_is_short";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    // Nothing reserved: the VM asks for 64 pages more than the pool could give.
    let Some(_pool) = HugePool::reserve(test, 0) else {
        return;
    };
    let d = Bulkheadd::start("hp-short", Some(&runner_uids(69100)), false);
    let (dir, img) = temp_image("hp-short", 8);
    let before = free_pages();
    let growable = pool("nr_overcommit_hugepages").saturating_sub(pool("surplus_hugepages"));
    let pages = available_pages() + growable + 64;
    let name = "hugeshort";
    let extra = format!(
        "hugepages = true\n[[disks]]\npath = \"{}\"\nserial = \"short\"\n",
        img.display()
    );
    let cfg = d.config_with(name, "echo", &format!("{}M", pages * 2), 1, &extra);
    let out = assert_create_refused(
        &d,
        name,
        &cfg,
        &format!("a VM of {pages} huge pages does not fit a pool of {before} free"),
    );
    let said = format!("{}{}", out.stdout, out.stderr);
    eprintln!("refused as it should be: {}", said.trim());
    for needle in [
        format!("cannot allocate {pages} huge pages of 2 MiB"),
        // Counted once the failed RAM gave back what it took.
        format!("({} free)", pages - 64 - growable),
        "vm.nr_hugepages".to_string(),
    ] {
        assert!(
            said.contains(&needle),
            "the refusal lacks '{needle}'\n{}\n{}",
            out.dump(),
            d.dump()
        );
    }
    // Its disk backend, started before the RAM was made, is gone too.
    assert!(
        wait_until(STEP, || d.disk_backends(name, 0).is_empty()),
        "the refused VM's disk backend still runs: {:?}\n{}",
        d.disk_backends(name, 0),
        d.dump()
    );
    wait_pool_back(&d, before, "the refused create");

    // 129 MiB is not a whole number of 2 MiB pages.
    let odd = "hugeodd";
    let cfg = d.config_with(odd, "echo", "129M", 1, "hugepages = true\n");
    let out = assert_create_refused(&d, odd, &cfg, "129M is no whole number of huge pages");
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("multiple of 2 MiB"),
        "the refusal of 129M does not say 'multiple of 2 MiB'\n{}",
        out.dump()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A guest whose RAM takes every free page of the pool resets itself over and over with
/// `on_reboot = "restart"`: each boot gets its huge pages again, so the previous boot's RAM
/// (the daemon's memfd, the runner's and the disk backend's mappings) must be given back
/// before the next one is made.
#[test]
fn huge_page_vm_reboots_in_place_on_an_exact_pool() {
    let test = "huge_page_vm_reboots_in_place_on_an_exact_pool";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let Some(_pool) = HugePool::reserve(test, 64) else {
        return;
    };
    let d = Bulkheadd::start("hp-reboot", Some(&runner_uids(69200)), false);
    let (dir, img) = temp_image("hp-reboot", 8);
    let name = "hugereboot";
    let before = free_pages();
    // Every page there is: a second set cannot be had while the first is held.
    let pages = available_pages();
    let extra = format!(
        "hugepages = true\non_reboot = \"restart\"\n[[disks]]\npath = \"{}\"\nserial = \"reboot\"\n",
        img.display()
    );
    let cfg = d.config_with(
        name,
        "blk blk-write=3:0:64 reboot",
        &format!("{}M", pages * 2),
        1,
        &extra,
    );
    d.create_config(name, &cfg);
    let con = d.console(name);
    assert!(
        wait_until(STEP, || d
            .daemon_log()
            .contains(&format!("VM '{name}' restarted in place (boot 3)"))),
        "no third boot of a VM holding all {pages} free huge pages ({})\n{}",
        pool_state(),
        d.dump()
    );
    assert!(
        d.daemon_log().matches("huge pages of 2 MiB").count() >= 3,
        "each boot takes its RAM in huge pages\n{}",
        d.dump()
    );
    // The boots seen from here on each write through the disk backend, which maps that
    // boot's RAM.
    assert!(
        wait_until(STEP, || con
            .stdout
            .text()
            .matches("blk-write: 64 sectors ok status 0")
            .count()
            >= 2),
        "two more boots each wrote to the disk\n{}\n{}",
        con.stdout.text(),
        d.dump()
    );
    assert!(
        !d.daemon_log().contains("cannot allocate"),
        "a boot found the pool short\n{}",
        d.dump()
    );
    d.cli_ok(&["destroy", name], "destroy");
    wait_pool_back(&d, before, "the rebooting VM was destroyed");
    let _ = std::fs::remove_dir_all(dir);
}

/// A policy with `[limits] hugepages = false` refuses a VM that asks for huge pages (status
/// 3, naming the rule) before anything is started, and still creates one that does not.
#[test]
fn huge_pages_can_be_refused_by_policy() {
    let test = "huge_pages_can_be_refused_by_policy";
    if !root_available(test) || !kvm_available(test) {
        return;
    }
    let policy = format!("[limits]\nhugepages = false\n{}", runner_uids(69300));
    let d = Bulkheadd::start("hp-policy", Some(&policy), false);
    let cfg = d.config_with("hugedenied", "echo", "128M", 1, "hugepages = true\n");
    let out = assert_create_refused(&d, "hugedenied", &cfg, "the policy allows no huge pages");
    assert_eq!(out.code, Some(3), "{}\n{}", out.dump(), d.dump());
    assert!(
        out.stderr.contains("denied by rule 'limits.hugepages'"),
        "{}",
        out.dump()
    );
    assert!(d.list().is_empty(), "{:?}", d.list());
    assert!(
        !d.daemon_log().contains("huge pages of 2 MiB"),
        "no RAM was made for the refused VM\n{}",
        d.dump()
    );
    let cfg = d.config_with("small", "echo", "128M", 1, "");
    d.create_config("small", &cfg);
    d.cli_ok(&["destroy", "small"], "destroy");
}
