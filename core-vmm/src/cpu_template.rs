//! CPU templates: named edits of the CPUID a guest sees, kept as data. `minimal` hides what
//! hosts whose KVM emulates guest ring-0 code (PVM) cannot run there; `host` passes KVM's
//! supported CPUID through. The same mechanism serves migration-safe templates later.

use kvm_bindings::CpuId;

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One feature bit: where it lives and what it is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureBit {
    /// CPUID leaf.
    pub leaf: u32,
    /// Subleaf (index).
    pub subleaf: u32,
    /// Register.
    pub reg: Reg,
    /// Bit number.
    pub bit: u8,
    /// Feature name as Linux's /proc/cpuinfo spells it.
    pub name: &'static str,
}

const fn f(leaf: u32, subleaf: u32, reg: Reg, bit: u8, name: &'static str) -> FeatureBit {
    FeatureBit {
        leaf,
        subleaf,
        reg,
        bit,
        name,
    }
}

/// A named set of CPUID edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTemplate {
    /// Template name.
    pub name: &'static str,
    /// Why it exists.
    pub purpose: &'static str,
    /// Bits cleared.
    pub clear: &'static [FeatureBit],
    /// Bits set.
    pub set: &'static [FeatureBit],
    /// Appended to the kernel command line. On PVM-based KVM the guest kernel's CPUID
    /// reports the host's features whatever KVM_SET_CPUID2 says (measured: the guest
    /// executed POPCNT and XRSTOR that KVM's own supported CPUID does not list), so Linux
    /// is also told on its command line; other guests ignore these words.
    pub cmdline: &'static str,
}

use Reg::*;

/// Passes KVM's supported CPUID through.
pub const HOST: CpuTemplate = CpuTemplate {
    name: "host",
    purpose: "everything KVM supports on this host",
    clear: &[],
    set: &[],
    cmdline: "",
};

/// Hides what an emulated ring 0 cannot execute (measured on PVM hosts, see
/// shared/linux-guest/RECIPE.md), and sets XSAVEERPTR so Linux skips its `fnclex` workaround.
pub const MINIMAL: CpuTemplate = CpuTemplate {
    name: "minimal",
    purpose: "no instructions that KVM's ring-0 emulator lacks (for PVM-based KVM)",
    clear: &[
        f(1, 0, Ecx, 13, "cx16"),
        f(1, 0, Ecx, 17, "pcid"),
        f(1, 0, Ecx, 22, "movbe"),
        f(1, 0, Ecx, 23, "popcnt"),
        f(1, 0, Ecx, 26, "xsave"),
        f(1, 0, Ecx, 27, "osxsave"),
        f(1, 0, Ecx, 28, "avx"),
        f(1, 0, Ecx, 29, "f16c"),
        f(1, 0, Ecx, 12, "fma"),
        f(1, 0, Ecx, 30, "rdrand"),
        f(7, 0, Ebx, 0, "fsgsbase"),
        f(7, 0, Ebx, 3, "bmi1"),
        f(7, 0, Ebx, 5, "avx2"),
        f(7, 0, Ebx, 8, "bmi2"),
        f(7, 0, Ebx, 10, "invpcid"),
        f(7, 0, Ebx, 16, "avx512f"),
        f(7, 0, Ebx, 17, "avx512dq"),
        f(7, 0, Ebx, 18, "rdseed"),
        f(7, 0, Ebx, 20, "smap"),
        f(7, 0, Ebx, 21, "avx512ifma"),
        f(7, 0, Ebx, 23, "clflushopt"),
        f(7, 0, Ebx, 24, "clwb"),
        f(7, 0, Ebx, 28, "avx512cd"),
        f(7, 0, Ebx, 30, "avx512bw"),
        f(7, 0, Ebx, 31, "avx512vl"),
        f(7, 0, Ecx, 1, "avx512vbmi"),
        f(7, 0, Ecx, 2, "umip"),
        f(7, 0, Ecx, 3, "pku"),
        f(7, 0, Ecx, 4, "ospke"),
        f(7, 0, Ecx, 6, "avx512_vbmi2"),
        f(7, 0, Ecx, 11, "avx512_vnni"),
        f(7, 0, Ecx, 12, "avx512_bitalg"),
        f(7, 0, Ecx, 14, "avx512_vpopcntdq"),
        f(7, 0, Ecx, 22, "rdpid"),
        f(7, 1, Eax, 5, "avx512_bf16"),
        f(0x8000_0001, 0, Edx, 27, "rdtscp"),
    ],
    set: &[f(0x8000_0008, 0, Ebx, 2, "xsaveerptr")],
    // The same list for Linux: smap fsgsbase umip pku popcnt rdrand rdseed movbe avx avx2
    // bmi1 bmi2 clflushopt clwb rdpid rdtscp (shared/linux-guest/RECIPE.md).
    cmdline: "noxsave nopcid noinvpcid nofsgsbase clearcpuid=308,288,514,515,151,158,306,150,156,293,291,296,311,312,534,59",
};

/// Every template, by name.
pub const TEMPLATES: [CpuTemplate; 2] = [HOST, MINIMAL];

/// Looks a template up by name.
pub fn by_name(name: &str) -> Option<CpuTemplate> {
    TEMPLATES.iter().copied().find(|t| t.name == name)
}

/// What this host's KVM is, for picking a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKind {
    /// `kvm_pvm` is loaded.
    pub pvm: bool,
    /// The host CPU shows vmx or svm.
    pub hw_virt: bool,
}

impl HostKind {
    /// Reads /sys/module and /proc/cpuinfo.
    pub fn detect() -> Self {
        let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
        let hw_virt = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| {
                c.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|w| w == "vmx" || w == "svm"))
            })
            .unwrap_or(false);
        Self { pvm, hw_virt }
    }

    /// The template `auto` resolves to, and why.
    pub fn auto(&self) -> (CpuTemplate, &'static str) {
        if self.pvm && !self.hw_virt {
            (
                MINIMAL,
                "kvm_pvm is loaded and the CPU has no vmx/svm: guest ring 0 is emulated",
            )
        } else {
            (HOST, "hardware-assisted KVM")
        }
    }
}

impl CpuTemplate {
    /// `cmdline` with the template's kernel parameters appended (if any).
    pub fn kernel_cmdline(&self, cmdline: &str) -> String {
        match (cmdline.is_empty(), self.cmdline.is_empty()) {
            (_, true) => cmdline.to_string(),
            (true, false) => self.cmdline.to_string(),
            (false, false) => format!("{cmdline} {}", self.cmdline),
        }
    }

    /// Applies the template to one vCPU's CPUID.
    pub fn apply(&self, cpuid: &mut CpuId) {
        for e in cpuid.as_mut_slice() {
            for (bits, on) in [(self.clear, false), (self.set, true)] {
                for b in bits
                    .iter()
                    .filter(|b| b.leaf == e.function && b.subleaf == e.index)
                {
                    let reg = match b.reg {
                        Eax => &mut e.eax,
                        Ebx => &mut e.ebx,
                        Ecx => &mut e.ecx,
                        Edx => &mut e.edx,
                    };
                    if on {
                        *reg |= 1 << b.bit;
                    } else {
                        *reg &= !(1 << b.bit);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn minimal_clears_and_sets() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0008,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).expect("cpuid");
        MINIMAL.apply(&mut c);
        let s = c.as_slice();
        assert_eq!(s[0].ecx & (1 << 13), 0, "cx16 hidden");
        assert_eq!(s[0].ecx & (1 << 26), 0, "xsave hidden");
        assert_ne!(s[0].ecx & 1, 0, "sse3 kept");
        assert_ne!(s[1].ebx & (1 << 2), 0, "xsaveerptr set");
        assert_eq!(by_name("minimal"), Some(MINIMAL));
        assert_eq!(by_name("bogus"), None);
    }
}
