//! Ring-0 stub (PVH note, long mode, GDT/TSS/IDT, AP trampoline) and the ring-3 entry
//! points it jumps to. The stub itself is `boot.S`; everything here runs in ring 3.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, Ordering};

global_asm!(include_str!("boot.S"), options(att_syntax));

/// Most CPUs the stub has stacks/TSS slots for (`MAX_CPUS` in boot.S).
pub const MAX_CPUS: usize = 32;

extern "C" {
    static __image_start: u8;
    static __rodata_end: u8;
    static __image_end: u8;
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

/// Physical address of the first byte of the loaded image.
pub fn image_start() -> u64 {
    core::ptr::addr_of!(__image_start) as u64
}

/// End of the read-only part of the image (.text, .note, .rodata).
pub fn rodata_end() -> u64 {
    core::ptr::addr_of!(__rodata_end) as u64
}

/// End of the whole image including .data and .bss.
pub fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}

/// The real-mode AP trampoline code, to be copied below 1 MiB.
pub fn ap_trampoline() -> &'static [u8] {
    let start = core::ptr::addr_of!(ap_tramp_start);
    let end = core::ptr::addr_of!(ap_tramp_end);
    // SAFETY: both symbols delimit the trampoline inside the read-only .text section.
    unsafe { core::slice::from_raw_parts(start, end as usize - start as usize) }
}

/// Service numbers of the ring-0 gate (`ud2; "BH"`, number in ecx); must match
/// svc_table in boot.S.
mod svc {
    pub const HALT: u32 = 0;
    pub const TRIPLE_FAULT: u32 = 1;
    pub const UNEMULATED: u32 = 2;
    pub const OUTB: u32 = 3;
    pub const INB: u32 = 4;
    pub const OUTW: u32 = 5;
    pub const INW: u32 = 6;
    pub const OUTL: u32 = 7;
    pub const INL: u32 = 8;
}

/// Halts this CPU forever (ring-0 `cli; hlt` through the gate).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: the service never returns; it only halts the CPU.
        unsafe {
            asm!("ud2", ".byte 0x42, 0x48", in("ecx") svc::HALT, out("r11") _, options(nomem, nostack))
        };
    }
}

/// Triple fault from ring 0 (empty IDT, then `ud2`).
pub fn triple_fault() -> ! {
    // SAFETY: the service never returns; it resets/shuts down the machine.
    unsafe {
        asm!("ud2", ".byte 0x42, 0x48", in("ecx") svc::TRIPLE_FAULT, out("r11") _, options(nomem, nostack))
    };
    halt_forever()
}

/// Executes instructions the KVM emulator cannot handle (fnclex at ring 0, then xsave
/// to unbacked MMIO). Returns only if the hypervisor survived both.
pub fn unemulated_instruction() {
    // SAFETY: the service returns normally if the instructions ran; it clobbers rax/rdx/rdi.
    unsafe {
        asm!("ud2", ".byte 0x42, 0x48", in("ecx") svc::UNEMULATED, out("rax") _, out("rdx") _, out("rdi") _,
             out("r11") _, options(nostack));
    }
}

/// Ring-3 entry of the bootstrap processor, `start_info` = PVH `hvm_start_info` address.
#[no_mangle]
extern "C" fn bsp_main(start_info: u64) -> ! {
    crate::main(start_info)
}

/// Ring-3 entry of an application processor with CPU index `idx` (1..).
#[no_mangle]
extern "C" fn ap_main(idx: u64) -> ! {
    crate::smp::ap_main(idx)
}

/// Ring-3 landing point for any CPU exception (reflected by the ring-0 ISR).
#[no_mangle]
extern "C" fn exception_main(vector: u64, rip: u64, error: u64, cs: u64, cr2: u64) -> ! {
    crate::serial::force_unlock_after_spin();
    crate::println!("panic: exception {} at rip {:#x}", vector, rip);
    crate::println!("panic: error-code {:#x} cs {:#x} cr2 {:#x}", error, cs, cr2);
    crate::exit(101)
}

static DIRECT_IO: AtomicBool = AtomicBool::new(false);

/// Decides how ring 3 does port I/O: directly if the CPU really runs us with IOPL 3
/// (hardware-virtualized KVM, QEMU), else through the ring-0 gate's I/O services (PVM
/// hosts run guest ring 3 with IOPL 0 whatever the guest put in RFLAGS). Call first.
pub fn init_io() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS only.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) };
    let direct = (flags >> 12) & 3 == 3;
    DIRECT_IO.store(direct, Ordering::Relaxed);
    direct
}

/// Whether port I/O is done directly from ring 3 (see [`init_io`]).
pub fn direct_io() -> bool {
    DIRECT_IO.load(Ordering::Relaxed)
}

macro_rules! port_io {
    ($(#[$m:meta])* $out:ident, $in:ident, $ty:ty, $reg:tt, $out_asm:literal, $in_asm:literal, $out_svc:expr, $in_svc:expr) => {
        $(#[$m])*
        #[inline(always)]
        pub fn $out(port: u16, val: $ty) {
            if DIRECT_IO.load(Ordering::Relaxed) {
                // SAFETY: ring 3 runs with IOPL 3; port I/O has no memory effects.
                unsafe { asm!($out_asm, in("dx") port, in($reg) val, options(nomem, nostack, preserves_flags)) };
            } else {
                // SAFETY: the gate executes exactly this `out` in ring 0 and returns.
                unsafe { asm!("ud2", ".byte 0x42, 0x48", in("ecx") $out_svc, in("dx") port, in($reg) val, out("r11") _, options(nomem, nostack)) };
            }
        }

        $(#[$m])*
        #[inline(always)]
        pub fn $in(port: u16) -> $ty {
            let val: $ty;
            if DIRECT_IO.load(Ordering::Relaxed) {
                // SAFETY: ring 3 runs with IOPL 3; port I/O has no memory effects.
                unsafe { asm!($in_asm, in("dx") port, out($reg) val, options(nomem, nostack, preserves_flags)) };
            } else {
                // SAFETY: the gate executes exactly this `in` in ring 0 and returns.
                unsafe { asm!("ud2", ".byte 0x42, 0x48", in("ecx") $in_svc, in("dx") port, out($reg) val, out("r11") _, options(nomem, nostack)) };
            }
            val
        }
    };
}

port_io!(
    outb,
    inb,
    u8,
    "al",
    "out dx, al",
    "in al, dx",
    svc::OUTB,
    svc::INB
);
port_io!(
    #[allow(dead_code)]
    outw,
    inw,
    u16,
    "ax",
    "out dx, ax",
    "in ax, dx",
    svc::OUTW,
    svc::INW
);
port_io!(
    #[allow(dead_code)]
    outl,
    inl,
    u32,
    "eax",
    "out dx, eax",
    "in eax, dx",
    svc::OUTL,
    svc::INL
);
