//! Time stamp counter: `rdtsc` (allowed in ring 3, CR4.TSD is clear) and a best guess of
//! its frequency from CPUID.

use core::arch::x86_64::__cpuid;

/// The current TSC value.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: rdtsc is allowed in ring 3 (CR4.TSD is clear) and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Where [`detect`] found the frequency.
#[derive(Clone, Copy)]
pub enum Source {
    /// Hypervisor leaf 0x40000010 EAX (kHz), as KVM/VMware/QEMU `vmware-cpuid-freq` report it.
    Hypervisor,
    /// CPUID 0x15: crystal clock × TSC/crystal ratio.
    Cpuid15,
    /// CPUID 0x16: processor base frequency (MHz).
    Cpuid16,
    /// Nothing reported it; assumed.
    Assumed,
    /// `tsc-khz=` on the command line.
    CommandLine,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Hypervisor => "cpuid 0x40000010",
            Source::Cpuid15 => "cpuid 0x15",
            Source::Cpuid16 => "cpuid 0x16",
            Source::Assumed => "assumed",
            Source::CommandLine => "tsc-khz=",
        }
    }
}

/// The TSC frequency in kHz if CPUID reports it: hypervisor leaf 0x40000010 (when the
/// hypervisor range at 0x40000000 includes it), else leaf 0x15, else leaf 0x16.
pub fn detect() -> Option<(u64, Source)> {
    let max = __cpuid(0).eax;
    let hypervisor = max >= 1 && __cpuid(1).ecx & (1 << 31) != 0;
    if hypervisor {
        let hv_max = __cpuid(0x4000_0000).eax;
        if (0x4000_0010..0x4001_0000).contains(&hv_max) {
            let khz = __cpuid(0x4000_0010).eax as u64;
            if khz != 0 {
                return Some((khz, Source::Hypervisor));
            }
        }
    }
    if max >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            let hz = l.ecx as u64 * l.ebx as u64 / l.eax as u64;
            if hz >= 1000 {
                return Some((hz / 1000, Source::Cpuid15));
            }
        }
    }
    if max >= 0x16 {
        let mhz = __cpuid(0x16).eax as u64 & 0xffff;
        if mhz != 0 {
            return Some((mhz * 1000, Source::Cpuid16));
        }
    }
    None
}

static KHZ_OVERRIDE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Sets the TSC frequency from the command line (`tsc-khz=`); it wins over CPUID.
pub fn set_khz(khz: u64) {
    KHZ_OVERRIDE.store(khz, core::sync::atomic::Ordering::Relaxed);
}

/// The TSC frequency in kHz and its source: `tsc-khz=` if given, else CPUID, else 2 GHz.
pub fn khz() -> (u64, Source) {
    match KHZ_OVERRIDE.load(core::sync::atomic::Ordering::Relaxed) {
        0 => detect().unwrap_or((2_000_000, Source::Assumed)),
        k => (k, Source::CommandLine),
    }
}
