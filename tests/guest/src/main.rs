//! Bulkhead's bare-metal test guest.
//!
//! A PVH-bootable ELF (loaded at 1 MiB) that boots under `qemu-system-x86_64 -kernel`
//! and under `bulkhead-runner`. A short ring-0 stub (`boot.S`) enters long mode and
//! drops to ring 3 with IOPL 3, where everything below runs. What it does is chosen by
//! whitespace-separated command-line tokens (unknown ones are ignored):
//! `echo`, `fault=triple|unemulated|pagefault|panic`, `exit=<0..255>`, `reboot`,
//! `fill=<MiB>`.
//! See tests/guest/README.md for the exact output lines.
#![no_std]
#![no_main]

mod boot;
mod checksum;
mod mem;
mod serial;
mod smp;
mod start_info;

use boot::{inb, outb};

/// The debug-exit port (QEMU isa-debug-exit: status (v << 1) | 1; bulkhead-runner: v).
const DEBUG_EXIT_PORT: u16 = 0xf4;
const DEFAULT_FILL_MIB: u64 = 4;

/// Options parsed from the command line.
struct Options {
    echo: bool,
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
        fault: None,
        exit: 0,
        reboot: false,
        fill_mib: DEFAULT_FILL_MIB,
    };
    for tok in cmdline.split_ascii_whitespace() {
        match tok {
            "echo" => o.echo = true,
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

/// Resets through the i8042 (0xFE to port 0x64), then halts.
fn i8042_reset() -> ! {
    for _ in 0..100_000 {
        if inb(0x64) & 0x02 == 0 {
            break;
        }
    }
    outb(0x64, 0xfe);
    boot::halt_forever()
}

/// Exits through the debug-exit port; falls back to an i8042 reset.
pub fn exit(v: u8) -> ! {
    outb(DEBUG_EXIT_PORT, v);
    i8042_reset()
}

/// Echo mode: echo received bytes until a line equal to `quit`.
fn echo() {
    println!("echo: ready");
    let mut line = [0u8; 64];
    let mut len = 0usize;
    let mut last_cr = false;
    loop {
        let Some(b) = serial::try_read() else {
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

    if opts.echo {
        echo();
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
    println!("exit: {}", opts.exit);
    exit(opts.exit)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::force_unlock_after_spin();
    println!("panic: {}", info.message());
    exit(101)
}
