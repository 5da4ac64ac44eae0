//! The guest-physical memory map every Bulkhead VM gets (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                       0x0000_6000  PVH hvm_start_info + memmap
//! 0x0000_7000  Linux boot_params          0x0000_9000  PML4, PDPT, PD (identity 1 GiB)
//! 0x0002_0000  kernel command line       0x0009_fc00  reserved (EBDA, BIOS area) to 1 MiB; MP table at 0xf_0000
//! 0x0010_0000  kernel (ELF p_paddr / bzImage protected-mode part), RAM to the MMIO gap
//! 0xc000_0000  MMIO gap (IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000) up to 4 GiB
//! 0x1_0000_0000 the rest of RAM, if any
//! ```

/// Where the GDT lives.
pub const GDT_START: u64 = 0x500;
/// The PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map table.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// The Linux zero page (`boot_params`) for bzImage boots.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Level-4 page table of the identity map used for 64-bit entry.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 × 2 MiB = the first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the EBDA; from here to 1 MiB is reported as reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and table, in the BIOS area guests scan (0xf0000..1 MiB).
pub const MPTABLE_START: u64 = 0xf_0000;
/// End of conventional memory (640 KiB).
pub const LOW_RAM_END: u64 = 0xa0000;
/// Start of high memory; kernels load here or above.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap; RAM beyond this continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The I/O APIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Address KVM needs for its TSS (three pages) below 4 GiB, out of RAM.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Address KVM needs for its identity-map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy I/O ports the runner serves.
pub mod ports {
    /// COM1 16550 UART base.
    pub const COM1: u16 = 0x3f8;
    /// COM1's interrupt line.
    pub const COM1_IRQ: u32 = 4;
    /// i8042 keyboard controller: data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 keyboard controller: command/status port (0xFE here resets the machine).
    pub const I8042_COMMAND: u16 = 0x64;
    /// The i8042 keyboard's interrupt line.
    pub const I8042_IRQ: u32 = 1;
    /// Test-guest debug-exit port (QEMU's isa-debug-exit convention).
    pub const DEBUG_EXIT: u16 = 0xf4;
    /// Reads 1 once the control domain asked the guest to shut down (`bulkhead shutdown`),
    /// 0 before; guests without ACPI poll it. All ones under other VMMs.
    pub const SHUTDOWN_REQUEST: u16 = 0xf5;
}
