//! Bulkhead's bare-metal test guest.
//!
//! A PVH-bootable ELF (loaded at 1 MiB) that boots under `qemu-system-x86_64 -kernel`
//! and under `bulkhead-runner`. A short ring-0 stub (`boot.S`) enters long mode and
//! drops to ring 3 with IOPL 3, where everything below runs. What it does is chosen by
//! whitespace-separated command-line tokens (unknown ones are ignored):
//! `echo`, `ticks=<ms>`, `fault=triple|unemulated|pagefault|panic`, `exit=<0..255>`,
//! `reboot`, `fill=<MiB>`, `pci`, `blk*` (PCI scan and a polled virtio-blk driver),
//! `net`, `ping=`, `udp-*`, `net-*` (a polled virtio-net driver and a tiny IPv4 stack).
//! See tests/guest/README.md for the exact output lines.
#![no_std]
#![no_main]

mod blk;
mod boot;
mod checksum;
mod mem;
mod net;
mod pci;
mod serial;
mod smp;
mod start_info;
mod tsc;
mod virtio;

use boot::{inb, outb};

/// The debug-exit port (QEMU isa-debug-exit: status (v << 1) | 1; bulkhead-runner: v).
const DEBUG_EXIT_PORT: u16 = 0xf4;
const DEFAULT_FILL_MIB: u64 = 4;
/// Bulkhead's shutdown-request port: reads 0 normally and 1 once the control domain asks
/// the guest to shut down; 0xff where nothing decodes it (QEMU), which is no request.
const SHUTDOWN_REQUEST_PORT: u16 = 0xf5;
/// Exit status when a virtio-blk request (other than a deliberately hostile one) failed.
const BLK_FAILED_EXIT: u8 = 4;

/// Options parsed from the command line.
struct Options {
    echo: bool,
    ticks_ms: Option<u64>,
    /// Each tick also reads the first disk's status register (`ticks-touch-blk`).
    touch_blk: bool,
    fault: Option<Fault>,
    exit: u8,
    reboot: bool,
    fill_mib: u64,
}

#[derive(Clone, Copy)]
enum Fault {
    Triple,
    Unemulated,
    PageFault,
    Panic,
}

fn parse_options(cmdline: &str) -> Options {
    let mut o = Options {
        echo: false,
        ticks_ms: None,
        touch_blk: false,
        fault: None,
        exit: 0,
        reboot: false,
        fill_mib: DEFAULT_FILL_MIB,
    };
    for tok in cmdline.split_ascii_whitespace() {
        match tok {
            "echo" => o.echo = true,
            "ticks-touch-blk" => o.touch_blk = true,
            "reboot" => o.reboot = true,
            "fault=triple" => o.fault = Some(Fault::Triple),
            "fault=unemulated" => o.fault = Some(Fault::Unemulated),
            "fault=pagefault" => o.fault = Some(Fault::PageFault),
            "fault=panic" => o.fault = Some(Fault::Panic),
            _ => {
                if let Some(v) = tok.strip_prefix("exit=") {
                    if let Ok(v) = v.parse::<u8>() {
                        o.exit = v;
                    }
                } else if let Some(v) = tok.strip_prefix("tsc-khz=") {
                    if let Ok(v @ 1..) = v.parse::<u64>() {
                        tsc::set_khz(v);
                    }
                } else if let Some(v) = tok.strip_prefix("ticks=") {
                    if let Ok(v @ 1..) = v.parse::<u64>() {
                        o.ticks_ms = Some(v);
                    }
                } else if let Some(v) = tok.strip_prefix("fill=") {
                    if let Ok(v) = v.parse::<u64>() {
                        o.fill_mib = v;
                    }
                }
            }
        }
    }
    o
}

/// Pulses the reset line through the i8042 (0xFE to port 0x64); returns if nothing reset.
/// Waits (bounded) for the input buffer to drain first; a status of 0xff means nothing
/// decodes the port (e.g. QEMU microvm), so there is nothing to wait for.
fn i8042_pulse_reset() {
    for _ in 0..100_000 {
        let status = inb(0x64);
        if status & 0x02 == 0 || status == 0xff {
            break;
        }
    }
    outb(0x64, 0xfe);
}

/// Resets through the i8042 (0xFE to port 0x64), then halts.
fn i8042_reset() -> ! {
    i8042_pulse_reset();
    boot::halt_forever()
}

/// Exits through the debug-exit port; falls back to an i8042 reset.
pub fn exit(v: u8) -> ! {
    outb(DEBUG_EXIT_PORT, v);
    i8042_reset()
}

/// Polls [`SHUTDOWN_REQUEST_PORT`] at most once per ~1 ms of TSC time, so that a guest
/// spinning in a loop does not turn into a storm of VM exits.
struct ShutdownPoll {
    interval: u64,
    next: u64,
}

impl ShutdownPoll {
    fn new(tsc_khz: u64) -> ShutdownPoll {
        ShutdownPoll {
            interval: tsc_khz.max(1),
            next: 0,
        }
    }

    /// If the poll is due: reads the port and shuts down on a request; returns whether
    /// it was due. `mid_line`: the console cursor is not at the start of a line.
    fn poll(&mut self, mid_line: bool) -> bool {
        let now = tsc::now();
        if now < self.next {
            return false;
        }
        self.next = now + self.interval;
        if shutdown_requested() {
            shutdown(mid_line, self.interval);
        }
        true
    }
}

/// Whether the control domain asked for a shutdown (the port reads exactly 1).
fn shutdown_requested() -> bool {
    inb(SHUTDOWN_REQUEST_PORT) == 1
}

/// Answers a shutdown request: `shutdown: requested`, i8042 reset; if the reset returns
/// (~100 ms later), exit status 0 through the debug-exit port.
fn shutdown(mid_line: bool, tsc_per_ms: u64) -> ! {
    if mid_line {
        serial::write_raw(b"\n");
    }
    println!("shutdown: requested");
    i8042_pulse_reset();
    let deadline = tsc::now() + 100 * tsc_per_ms;
    while tsc::now() < deadline {
        core::hint::spin_loop();
    }
    exit(0)
}

/// Echo mode: echo received bytes until a line equal to `quit`.
fn echo() {
    println!("echo: ready");
    let mut shutdown = ShutdownPoll::new(tsc::khz().0);
    let mut line = [0u8; 64];
    let mut len = 0usize;
    let mut last_cr = false;
    loop {
        let Some(b) = serial::try_read() else {
            net::idle_poll();
            shutdown.poll(len != 0);
            core::hint::spin_loop();
            continue;
        };
        match b {
            b'\r' | b'\n' => {
                let lf_after_cr = b == b'\n' && last_cr;
                last_cr = b == b'\r';
                if lf_after_cr {
                    continue;
                }
                serial::write_raw(b"\n");
                if &line[..len] == b"quit" {
                    break;
                }
                len = 0;
            }
            _ => {
                last_cr = false;
                serial::write_raw(&[b]);
                if len < line.len() {
                    line[len] = b;
                }
                len += 1;
            }
        }
    }
    println!("echo: done");
}

/// Ticks mode: prints `tick <n>` every `ms` milliseconds (TSC time) forever; polls the
/// shutdown port and echoes console input about once per millisecond in between.
fn ticks(ms: u64, touch_blk: bool) -> ! {
    let (khz, source) = tsc::khz();
    println!("tsc: {} kHz ({})", khz, source.name());
    let period = ms.saturating_mul(khz).max(1);
    let mut shutdown = ShutdownPoll::new(khz);
    let mut next_tick = tsc::now().saturating_add(period);
    let mut n = 0u64;
    let mut mid_line = false;
    let mut last_cr = false;
    loop {
        let now = tsc::now();
        if now >= next_tick {
            n += 1;
            if mid_line {
                serial::write_raw(b"\n");
                mid_line = false;
            }
            if touch_blk {
                blk::touch_registers();
            }
            println!("tick {}", n);
            next_tick = next_tick.saturating_add(period);
            if next_tick <= now {
                // Fell more than a period behind (the VM was paused): don't catch up.
                next_tick = now.saturating_add(period);
            }
        }
        net::idle_poll();
        if shutdown.poll(mid_line) {
            // Echo what is waiting (bounded, so a flood of input cannot starve the ticks).
            for _ in 0..16 {
                let Some(b) = serial::try_read() else { break };
                match b {
                    b'\n' if last_cr => {}
                    b'\r' | b'\n' => {
                        serial::write_raw(b"\n");
                        mid_line = false;
                    }
                    _ => {
                        serial::write_raw(&[b]);
                        mid_line = true;
                    }
                }
                last_cr = b == b'\r';
            }
        }
        core::hint::spin_loop();
    }
}

/// Boot-processor main, in ring 3.
fn main(start_info_paddr: u64) -> ! {
    boot::init_io();
    serial::init();
    println!("bulkhead-test-guest: boot");
    let si = start_info::StartInfo::parse(start_info_paddr);
    if !si.valid {
        println!(
            "start-info: bad magic {:#x} at {:#x}",
            si.magic, start_info_paddr
        );
    }
    println!("cmdline: {}", si.cmdline());
    let opts = parse_options(si.cmdline());
    println!("ram-top: {} MiB", (si.ram_top() + (1 << 19)) >> 20);
    println!("ram-usable: {} KiB", si.ram_usable() >> 10);
    for e in si.memmap() {
        println!(
            "memmap: {:#012x}-{:#012x} type {}",
            e.addr,
            e.addr + e.size,
            e.kind
        );
    }
    println!(
        "port-io: {}",
        if boot::direct_io() { "direct" } else { "gate" }
    );

    let cpus = smp::discover(si.rsdp_paddr);
    println!(
        "cpus: {} expected ({})",
        cpus.expected(),
        cpus.source.name()
    );
    smp::start_aps(&cpus);

    let sum = checksum::compute(&si, opts.fill_mib);
    if sum.bad_words != 0 {
        println!("memory: {} bad words in fill region", sum.bad_words);
    }
    println!("checksum: {:#018x}", sum.value);

    let mut exit_status = opts.exit;
    if blk::run(&si, si.cmdline()) {
        // A (non-hostile) block request failed.
        exit_status = BLK_FAILED_EXIT;
    }
    net::run(&si, si.cmdline());

    if opts.echo {
        echo();
    }
    if let Some(ms) = opts.ticks_ms {
        ticks(ms, opts.touch_blk);
    }
    match opts.fault {
        Some(Fault::Triple) => {
            println!("fault: triple");
            boot::triple_fault();
        }
        Some(Fault::Unemulated) => {
            println!("fault: unemulated");
            boot::unemulated_instruction();
            println!("fault: survived");
            exit(3);
        }
        Some(Fault::PageFault) => {
            println!("fault: pagefault");
            // SAFETY: deliberately touches an unmapped address (only 4 GiB are mapped);
            // the exception handler reports it and exits with status 101.
            unsafe { core::ptr::read_volatile(0x10_0000_0000 as *const u64) };
        }
        Some(Fault::Panic) => {
            println!("fault: panic");
            panic!("requested by the command line");
        }
        None => {}
    }
    if opts.reboot {
        println!("reboot");
        i8042_reset();
    }
    println!("exit: {}", exit_status);
    exit(exit_status)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::force_unlock_after_spin();
    println!("panic: {}", info.message());
    exit(101)
}
