//! The KVM state of a VM and its vCPUs as snapshot records: taken with the KVM_GET_*
//! ioctls while the vCPUs are paused, and given back with KVM_SET_* to a freshly created VM
//! before its vCPUs first run. KVM's structs travel as their bytes (they are the kernel's
//! ABI); MSRs as (index, value) pairs.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A state ioctl that failed, or a record that does not fit.
#[derive(Debug, Error)]
pub enum KvmStateError {
    /// A KVM ioctl refused.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl (and vCPU).
        what: String,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A record's bytes do not have the size of the struct they hold.
    #[error("state record {what}: {len} bytes, expected {expected}")]
    Size {
        /// Which struct.
        what: &'static str,
        /// Found.
        len: usize,
        /// Wanted.
        expected: usize,
    },
}

/// KVM ABI structs that are plain data: fixed size, no pointers, every byte pattern valid.
pub trait KvmPod: Default {
    /// For messages.
    const NAME: &'static str;
}

macro_rules! pod {
    ($($t:ty),*) => {$(impl KvmPod for $t { const NAME: &'static str = stringify!($t); })*};
}
pod!(
    kvm_regs,
    kvm_sregs,
    kvm_fpu,
    kvm_xsave,
    kvm_xcrs,
    kvm_debugregs,
    kvm_lapic_state,
    kvm_vcpu_events,
    kvm_irqchip,
    kvm_pit_state2,
    kvm_clock_data
);

/// The bytes of a KVM struct.
pub fn to_bytes<T: KvmPod>(v: &T) -> Vec<u8> {
    let len = std::mem::size_of::<T>();
    // SAFETY: `T` is a `#[repr(C)]` kernel ABI struct (`KvmPod`) that KVM filled in whole
    // (or `Default` zeroed); `v` is valid for `len` bytes for the life of this borrow.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), len) }.to_vec()
}

/// A KVM struct from its bytes (as [`to_bytes`] made them).
pub fn from_bytes<T: KvmPod>(b: &[u8]) -> Result<T, KvmStateError> {
    let len = std::mem::size_of::<T>();
    if b.len() != len {
        return Err(KvmStateError::Size {
            what: T::NAME,
            len: b.len(),
            expected: len,
        });
    }
    let mut v = T::default();
    // SAFETY: `b` has exactly `size_of::<T>()` bytes and `v` is a distinct, writable `T`;
    // every byte pattern is a valid `T` (`KvmPod`: plain integers and arrays).
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), len);
    }
    Ok(v)
}

/// One vCPU's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub index: u8,
    /// General registers (`kvm_regs`).
    pub regs: Vec<u8>,
    /// Segment and control registers (`kvm_sregs`).
    pub sregs: Vec<u8>,
    /// x87/SSE state (`kvm_fpu`), for hosts without XSAVE.
    pub fpu: Vec<u8>,
    /// Extended state (`kvm_xsave`), if KVM gave it.
    pub xsave: Option<Vec<u8>>,
    /// XCR0 (`kvm_xcrs`), if KVM gave it.
    pub xcrs: Option<Vec<u8>>,
    /// Debug registers (`kvm_debugregs`), if KVM gave them.
    pub debugregs: Option<Vec<u8>>,
    /// MSRs KVM would read, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC (`kvm_lapic_state`).
    pub lapic: Vec<u8>,
    /// Multiprocessing state (running, halted, waiting for SIPI...).
    pub mp_state: u32,
    /// Pending exceptions, interrupts, NMIs (`kvm_vcpu_events`), if KVM gave them.
    pub events: Option<Vec<u8>>,
    /// TSC frequency in kHz, if KVM told it.
    pub tsc_khz: Option<u32>,
}

/// The VM-wide state: interrupt controllers, PIT, clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmKvmState {
    /// PIC master, PIC slave, I/O APIC (`kvm_irqchip` each).
    pub irqchips: Vec<Vec<u8>>,
    /// PIT (`kvm_pit_state2`).
    pub pit: Vec<u8>,
    /// kvmclock (`kvm_clock_data`).
    pub clock: Vec<u8>,
}

fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    let what = what.into();
    move |source| KvmStateError::Kvm { what, source }
}

/// The MSRs worth saving: every one KVM lists.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, KvmStateError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// Reads the MSRs in `indices` that KVM will read (KVM stops at the first it refuses: that
/// one is skipped and the rest read on).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(200)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            break;
        };
        let n = vcpu.get_msrs(&mut msrs).unwrap_or(0).min(chunk.len());
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Skip the one refused (if any).
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    out
}

/// Writes `msrs`; returns those KVM refused.
fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Vec<u32> {
    let mut refused = Vec::new();
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(200)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let Ok(list) = Msrs::from_entries(&entries) else {
            break;
        };
        let n = vcpu.set_msrs(&list).unwrap_or(0).min(chunk.len());
        if n < chunk.len() {
            refused.push(chunk[n].0);
        }
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    refused
}

/// Takes vCPU `index`'s state (its thread must be out of KVM_RUN).
pub fn save_vcpu(vcpu: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<VcpuState, KvmStateError> {
    let w = |what: &str| format!("vCPU {index}: {what}");
    // Pending events first: KVM_GET_VCPU_EVENTS/MP_STATE flush what KVM holds back.
    let mp_state = vcpu
        .get_mp_state()
        .map_err(kvm_err(w("KVM_GET_MP_STATE")))?
        .mp_state;
    let events = vcpu.get_vcpu_events().ok().map(|e| to_bytes(&e));
    Ok(VcpuState {
        index,
        regs: to_bytes(&vcpu.get_regs().map_err(kvm_err(w("KVM_GET_REGS")))?),
        sregs: to_bytes(&vcpu.get_sregs().map_err(kvm_err(w("KVM_GET_SREGS")))?),
        fpu: to_bytes(&vcpu.get_fpu().map_err(kvm_err(w("KVM_GET_FPU")))?),
        xsave: vcpu.get_xsave().ok().map(|x| to_bytes(&x)),
        xcrs: vcpu.get_xcrs().ok().map(|x| to_bytes(&x)),
        debugregs: vcpu.get_debug_regs().ok().map(|x| to_bytes(&x)),
        msrs: read_msrs(vcpu, msr_list),
        lapic: to_bytes(&vcpu.get_lapic().map_err(kvm_err(w("KVM_GET_LAPIC")))?),
        mp_state,
        events,
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

/// Gives a freshly created vCPU (CPUID already set) the state `s`. Returns the MSRs KVM
/// refused (for the log).
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<Vec<u32>, KvmStateError> {
    let i = s.index;
    let w = |what: &str| format!("vCPU {i}: {what}");
    if let Some(khz) = s.tsc_khz {
        // The same frequency as before; a host that cannot scale keeps its own.
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            let _ = vcpu.set_tsc_khz(khz);
        }
    }
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: s.mp_state,
    })
    .map_err(kvm_err(w("KVM_SET_MP_STATE")))?;
    vcpu.set_regs(&from_bytes::<kvm_regs>(&s.regs)?)
        .map_err(kvm_err(w("KVM_SET_REGS")))?;
    vcpu.set_sregs(&from_bytes::<kvm_sregs>(&s.sregs)?)
        .map_err(kvm_err(w("KVM_SET_SREGS")))?;
    match &s.xsave {
        Some(x) => {
            let xsave = from_bytes::<kvm_xsave>(x)?;
            // SAFETY: a plain kvm_xsave (no trailing FAM data), as KVM_GET_XSAVE gave it.
            unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm_err(w("KVM_SET_XSAVE")))?;
        }
        None => vcpu
            .set_fpu(&from_bytes::<kvm_fpu>(&s.fpu)?)
            .map_err(kvm_err(w("KVM_SET_FPU")))?,
    }
    if let Some(x) = &s.xcrs {
        vcpu.set_xcrs(&from_bytes::<kvm_xcrs>(x)?)
            .map_err(kvm_err(w("KVM_SET_XCRS")))?;
    }
    if let Some(d) = &s.debugregs {
        vcpu.set_debug_regs(&from_bytes::<kvm_debugregs>(d)?)
            .map_err(kvm_err(w("KVM_SET_DEBUGREGS")))?;
    }
    vcpu.set_lapic(&from_bytes::<kvm_lapic_state>(&s.lapic)?)
        .map_err(kvm_err(w("KVM_SET_LAPIC")))?;
    let refused = write_msrs(vcpu, &s.msrs);
    if let Some(e) = &s.events {
        vcpu.set_vcpu_events(&from_bytes::<kvm_vcpu_events>(e)?)
            .map_err(kvm_err(w("KVM_SET_VCPU_EVENTS")))?;
    }
    Ok(refused)
}

/// Takes the VM's interrupt controllers, PIT and clock.
pub fn save_vm(vm: &VmFd) -> Result<VmKvmState, KvmStateError> {
    let mut irqchips = Vec::new();
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(kvm_err(format!("KVM_GET_IRQCHIP {chip_id}")))?;
        irqchips.push(to_bytes(&chip));
    }
    Ok(VmKvmState {
        irqchips,
        pit: to_bytes(&vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?),
        clock: to_bytes(&vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?),
    })
}

/// Gives a freshly created VM (irqchip and PIT created) the state `s`.
pub fn restore_vm(vm: &VmFd, s: &VmKvmState) -> Result<(), KvmStateError> {
    for chip in &s.irqchips {
        let chip = from_bytes::<kvm_irqchip>(chip)?;
        vm.set_irqchip(&chip)
            .map_err(kvm_err(format!("KVM_SET_IRQCHIP {}", chip.chip_id)))?;
    }
    vm.set_pit2(&from_bytes::<kvm_pit_state2>(&s.pit)?)
        .map_err(kvm_err("KVM_SET_PIT2"))?;
    let mut clock = from_bytes::<kvm_clock_data>(&s.clock)?;
    // Only the clock's value is given back; KVM refuses flags it did not expect.
    clock.flags = 0;
    clock.realtime = 0;
    clock.host_tsc = 0;
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_size_check() {
        let regs = kvm_regs {
            rax: 1,
            rip: 0x1234,
            rflags: 2,
            ..Default::default()
        };
        let b = to_bytes(&regs);
        assert_eq!(b.len(), std::mem::size_of::<kvm_regs>());
        let back: kvm_regs = from_bytes(&b).expect("same size");
        assert_eq!((back.rax, back.rip, back.rflags), (1, 0x1234, 2));
        assert!(from_bytes::<kvm_regs>(&b[1..]).is_err());
    }

    /// The experiment the design leans on: every state ioctl this module uses works on this
    /// host's KVM, and a second VM takes what the first gave.
    #[test]
    fn kvm_state_round_trip() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("SKIPPED: no /dev/kvm");
            return;
        };
        let make = || {
            let vm = kvm.create_vm().expect("vm");
            vm.set_tss_address(0xfffb_d000).expect("tss");
            vm.create_irq_chip().expect("irqchip");
            vm.create_pit2(kvm_bindings::kvm_pit_config::default())
                .expect("pit");
            let vcpu = vm.create_vcpu(0).expect("vcpu");
            let cpuid = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .expect("cpuid");
            vcpu.set_cpuid2(&cpuid).expect("set cpuid");
            (vm, vcpu)
        };
        let (vm, vcpu) = make();
        let mut regs = vcpu.get_regs().expect("regs");
        regs.rip = 0xabc0;
        regs.rbx = 77;
        vcpu.set_regs(&regs).expect("set regs");
        let list = msr_indices(&kvm).expect("msr list");
        let s = save_vcpu(&vcpu, 0, &list).expect("save vcpu");
        let v = save_vm(&vm).expect("save vm");
        eprintln!(
            "xsave {} xcrs {} debugregs {} events {} tsc_khz {:?} msrs {}/{}",
            s.xsave.is_some(),
            s.xcrs.is_some(),
            s.debugregs.is_some(),
            s.events.is_some(),
            s.tsc_khz,
            s.msrs.len(),
            list.len()
        );
        let (vm2, vcpu2) = make();
        restore_vm(&vm2, &v).expect("restore vm");
        let refused = restore_vcpu(&vcpu2, &s).expect("restore vcpu");
        eprintln!("refused MSRs: {refused:x?}");
        let r2 = vcpu2.get_regs().expect("regs");
        assert_eq!((r2.rip, r2.rbx), (0xabc0, 77));
    }
}
