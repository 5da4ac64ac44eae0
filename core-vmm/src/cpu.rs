//! vCPU state at power-on: CPUID topology, MSRs, FPU, LAPIC wiring, and the registers,
//! segments and page tables for the entry mode the kernel image asks for.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    GDT_START, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

/// A vCPU register or table write that KVM or guest memory refused.
#[derive(Debug, Error)]
pub enum CpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {vcpu}: {what}: {source}")]
    Kvm {
        /// vCPU index.
        vcpu: u8,
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing GDT or page tables to guest memory failed.
    #[error("cannot write boot tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// How the first instruction is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh {
        /// 32-bit physical entry point from the ELF note.
        entry: u64,
    },
    /// Linux 64-bit boot protocol: long mode, identity map, RSI = `boot_params`.
    Linux64 {
        /// 64-bit entry point (bzImage load address + 0x200, or an ELF's `e_entry`).
        entry: u64,
    },
}

impl EntryMode {
    /// Where the vCPU starts.
    pub fn entry(&self) -> u64 {
        match *self {
            EntryMode::Pvh { entry } | EntryMode::Linux64 { entry } => entry,
        }
    }
}

// GDT layout shared by both entry modes.
const GDT_CODE64: usize = 1;
const GDT_DATA: usize = 2;
const GDT_TSS: usize = 3;
const GDT_CODE32: usize = 4;
const GDT: [u64; 5] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // data
    gdt_entry(0x808b, 0, 0xfffff), // TSS
    gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
];
const BOOT_STACK: u64 = 0x8ff0;
const IDT_START: u64 = GDT_START + (GDT.len() as u64) * 8;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

fn segment(index: usize) -> kvm_segment {
    let e = GDT[index];
    let g = ((e >> 55) & 1) as u8;
    let raw_limit = (((e >> 32) & 0x000f_0000) | (e & 0xffff)) as u32;
    let present = ((e >> 47) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Shapes the host-supported CPUID into what vCPU `index` of `count` should see:
/// its APIC ID, one socket of `count` single-thread cores, and the hypervisor bit.
pub fn vcpu_cpuid(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let apic = u32::from(index);
    let n = u32::from(count);
    // Bits of APIC ID that number the cores in the package.
    let core_bits = 32 - (n.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | (n.min(255) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical CPU per package
                }
            }
            4 => {
                // Intel deterministic cache parameters: cores per package; caches per core
                // except the last level, shared by the package.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((n - 1) << 26);
            }
            0xb | 0x1f => {
                let (shift, logical, kind) = match e.index {
                    0 => (0, 1, 1),
                    1 => (core_bits, n, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = logical;
                e.ecx = (kind << 8) | (e.index & 0xff);
                e.edx = apic;
            }
            0x8000_0008 => {
                // AMD: number of cores - 1, and APIC ID width.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (n - 1);
            }
            0x8000_001e => {
                // AMD extended APIC ID, one core per compute unit, node 0.
                e.eax = apic;
                e.ebx = apic & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

/// Sets the boot MSRs (SYSCALL/SYSENTER cleared, fast strings on, write-back MTRR default).
/// Returns how many of them KVM accepted; some KVMs refuse MSRs they do not model.
pub fn setup_msrs(vcpu: &VcpuFd, index: u8) -> Result<usize, CpuError> {
    const MSRS: [(u32, u64); 12] = [
        (0x174, 0),                     // IA32_SYSENTER_CS
        (0x175, 0),                     // IA32_SYSENTER_ESP
        (0x176, 0),                     // IA32_SYSENTER_EIP
        (0xc000_0081, 0),               // STAR
        (0xc000_0082, 0),               // LSTAR
        (0xc000_0083, 0),               // CSTAR
        (0xc000_0084, 0),               // SYSCALL_MASK
        (0xc000_0102, 0),               // KERNEL_GS_BASE
        (0x10, 0),                      // IA32_TSC
        (0x1a0, 1),                     // IA32_MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6),         // MTRR default type: enabled, write-back
        (0x277, 0x0007_0406_0007_0406), // IA32_PAT power-on value
    ];
    let entries: Vec<kvm_msr_entry> = MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Kvm {
        vcpu: index,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    vcpu.set_msrs(&msrs).map_err(|source| CpuError::Kvm {
        vcpu: index,
        what: "KVM_SET_MSRS",
        source,
    })
}

/// x87 and SSE control words at their power-on values.
pub fn setup_fpu(vcpu: &VcpuFd, index: u8) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| CpuError::Kvm {
        vcpu: index,
        what: "KVM_SET_FPU",
        source,
    })
}

/// Wires the local APIC for virtual-wire mode: LINT0 = ExtINT, LINT1 = NMI.
pub fn setup_lapic(vcpu: &VcpuFd, index: u8) -> Result<(), CpuError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    let kvm_err = |what, source| CpuError::Kvm {
        vcpu: index,
        what,
        source,
    };
    let mut lapic = vcpu.get_lapic().map_err(|e| kvm_err("KVM_GET_LAPIC", e))?;
    for (offset, mode) in [(LVT_LINT0, 7u32), (LVT_LINT1, 4u32)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| kvm_err("KVM_SET_LAPIC", e))
}

/// Writes the GDT, an empty IDT and (for 64-bit entry) the identity page tables.
pub fn write_boot_tables(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), CpuError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    if let EntryMode::Linux64 { .. } = mode {
        mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
        mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
        for i in 0..512u64 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
        }
    }
    Ok(())
}

/// Sets the boot processor's registers and segments for `mode`.
pub fn setup_boot_registers(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), CpuError> {
    let kvm_err = |what, source| CpuError::Kvm {
        vcpu: 0,
        what,
        source,
    };
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| kvm_err("KVM_GET_SREGS", e))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    let data = segment(GDT_DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT_TSS);
    let regs = match mode {
        EntryMode::Pvh { entry } => {
            sregs.cs = segment(GDT_CODE32);
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            kvm_regs {
                rflags: 0x2,
                rip: entry,
                rbx: PVH_INFO_START,
                ..Default::default()
            }
        }
        EntryMode::Linux64 { entry } => {
            sregs.cs = segment(GDT_CODE64);
            sregs.cr3 = PML4_START;
            sregs.cr4 |= 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG | ET | PE
            sregs.efer |= 0x500; // LME | LMA
            kvm_regs {
                rflags: 0x2,
                rip: entry,
                rsp: BOOT_STACK,
                rbp: BOOT_STACK,
                rsi: ZERO_PAGE_START,
                ..Default::default()
            }
        }
    };
    vcpu.set_sregs(&sregs)
        .map_err(|e| kvm_err("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs).map_err(|e| kvm_err("KVM_SET_REGS", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(GDT_CODE64);
        assert_eq!(
            (cs.l, cs.db, cs.type_, cs.limit, cs.selector),
            (1, 0, 0xb, 0xffff_ffff, 8)
        );
        let cs32 = segment(GDT_CODE32);
        assert_eq!((cs32.l, cs32.db, cs32.present), (0, 1, 1));
        assert_eq!(segment(GDT_TSS).type_, 0xb);
    }

    #[test]
    fn cpuid_topology() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let supported = CpuId::from_entries(&entries).expect("cpuid");
        let c = vcpu_cpuid(&supported, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & (1 << 31), 0);
        assert_eq!((s[1].eax, s[1].ebx, s[1].edx), (2, 4, 3));
    }
}
