//! CPU discovery (MP table, else ACPI MADT) and AP bring-up (INIT, SIPI, SIPI) through
//! the xAPIC, all from ring 3 (the LAPIC page is mapped user-accessible).

use crate::boot;
use crate::println;
use core::ptr::{read_unaligned, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Where the AP trampoline is copied (SIPI vector 0x08). Must match boot.S.
pub const TRAMPOLINE_ADDR: u64 = 0x8000;
const DEFAULT_LAPIC: u64 = 0xfee0_0000;
const MAX_IDS: usize = 256;

/// CPUs that reached ring 3 (the BSP included).
static UP: AtomicU32 = AtomicU32::new(0);

/// Where the CPU list came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    MpTable,
    Madt,
    None,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::MpTable => "mptable",
            Source::Madt => "madt",
            Source::None => "none",
        }
    }
}

/// The enabled CPUs' APIC IDs.
pub struct CpuList {
    pub source: Source,
    pub lapic: u64,
    ids: [u32; MAX_IDS],
    count: usize,
}

impl CpuList {
    fn new(source: Source) -> CpuList {
        CpuList {
            source,
            lapic: DEFAULT_LAPIC,
            ids: [0; MAX_IDS],
            count: 0,
        }
    }

    fn push(&mut self, id: u32) {
        if self.count < MAX_IDS {
            self.ids[self.count] = id;
            self.count += 1;
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.count]
    }

    /// Number of CPUs expected (at least the BSP).
    pub fn expected(&self) -> usize {
        self.count.max(1)
    }
}

fn rd8(a: u64) -> u8 {
    // SAFETY: firmware tables live in identity-mapped low memory / RAM.
    unsafe { read_volatile(a as *const u8) }
}
fn rd16(a: u64) -> u16 {
    // SAFETY: as for rd8.
    unsafe { read_unaligned(a as *const u16) }
}
fn rd32(a: u64) -> u32 {
    // SAFETY: as for rd8.
    unsafe { read_unaligned(a as *const u32) }
}
fn rd64(a: u64) -> u64 {
    // SAFETY: as for rd8.
    unsafe { read_unaligned(a as *const u64) }
}

fn sum(a: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd8(a + i)))
}

fn sig(a: u64, s: &[u8]) -> bool {
    s.iter().enumerate().all(|(i, &b)| rd8(a + i as u64) == b)
}

fn find_mp_floating() -> Option<u64> {
    for (start, end) in [(0x9fc00u64, 0xa0000u64), (0xf0000, 0x100000)] {
        let mut a = start;
        while a + 16 <= end {
            if sig(a, b"_MP_") {
                let len = rd8(a + 8) as u64 * 16;
                if len >= 16 && sum(a, len) == 0 {
                    return Some(a);
                }
            }
            a += 16;
        }
    }
    None
}

fn from_mptable() -> Option<CpuList> {
    let mpf = find_mp_floating()?;
    let cfg = rd32(mpf + 4) as u64;
    if cfg == 0 || !sig(cfg, b"PCMP") {
        return None;
    }
    let len = rd16(cfg + 4) as u64;
    if sum(cfg, len) != 0 {
        return None;
    }
    let mut list = CpuList::new(Source::MpTable);
    let lapic = rd32(cfg + 36) as u64;
    if lapic != 0 {
        list.lapic = lapic;
    }
    let entries = rd16(cfg + 34);
    let mut p = cfg + 44;
    let end = cfg + len;
    for _ in 0..entries {
        if p >= end {
            break;
        }
        match rd8(p) {
            0 => {
                if rd8(p + 3) & 1 != 0 {
                    list.push(rd8(p + 1) as u32);
                }
                p += 20;
            }
            1..=4 => p += 8,
            _ => break,
        }
    }
    if list.count == 0 {
        None
    } else {
        Some(list)
    }
}

fn find_rsdp() -> Option<u64> {
    let mut a = 0xe0000u64;
    while a < 0x100000 {
        if sig(a, b"RSD PTR ") && sum(a, 20) == 0 {
            return Some(a);
        }
        a += 16;
    }
    None
}

fn from_madt(rsdp_hint: u64) -> Option<CpuList> {
    let rsdp = if rsdp_hint != 0 && sig(rsdp_hint, b"RSD PTR ") {
        rsdp_hint
    } else {
        find_rsdp()?
    };
    let rev = rd8(rsdp + 15);
    let (root, entry_size) = if rev >= 2 && rd64(rsdp + 24) != 0 {
        (rd64(rsdp + 24), 8u64)
    } else {
        (rd32(rsdp + 16) as u64, 4u64)
    };
    if root == 0 || root >= 1 << 32 {
        return None;
    }
    let root_len = rd32(root + 4) as u64;
    let n = root_len.saturating_sub(36) / entry_size;
    let mut madt = None;
    for i in 0..n {
        let a = root + 36 + i * entry_size;
        let t = if entry_size == 8 {
            rd64(a)
        } else {
            rd32(a) as u64
        };
        if t != 0 && t < 1 << 32 && sig(t, b"APIC") {
            madt = Some(t);
            break;
        }
    }
    let madt = madt?;
    let len = rd32(madt + 4) as u64;
    let mut list = CpuList::new(Source::Madt);
    let lapic = rd32(madt + 36) as u64;
    if lapic != 0 {
        list.lapic = lapic;
    }
    let mut p = madt + 44;
    while p + 2 <= madt + len {
        let (t, l) = (rd8(p), rd8(p + 1) as u64);
        if l < 2 {
            break;
        }
        match t {
            0 if rd32(p + 4) & 1 != 0 => list.push(rd8(p + 3) as u32),
            9 if rd32(p + 8) & 1 != 0 => list.push(rd32(p + 4)),
            5 => list.lapic = rd64(p + 4), // local APIC address override
            _ => {}
        }
        p += l;
    }
    if list.count == 0 {
        None
    } else {
        Some(list)
    }
}

/// Finds the CPU list: the MP table, else the ACPI MADT. If both exist and the MADT
/// lists more enabled CPUs, the MADT wins: SeaBIOS builds its MP table from the CPUs it
/// saw answer its own SIPI, which on slow (emulated) hosts can miss APs, while the MADT
/// comes from QEMU's configuration.
pub fn discover(rsdp_hint: u64) -> CpuList {
    match (from_mptable(), from_madt(rsdp_hint)) {
        (Some(mp), Some(madt)) if madt.count > mp.count => madt,
        (Some(mp), _) => mp,
        (None, Some(madt)) => madt,
        (None, None) => CpuList::new(Source::None),
    }
}

fn tsc() -> u64 {
    crate::tsc::now()
}

/// Best guess of the TSC frequency (only used for bounded delays; 3 GHz if unknown, so
/// that the delays err on the long side).
pub fn tsc_hz() -> u64 {
    match crate::tsc::detect() {
        Some((khz, _)) => khz * 1000,
        None => 3_000_000_000,
    }
}

fn delay_us(hz: u64, us: u64) {
    let end = tsc() + hz / 1_000_000 * us;
    while tsc() < end {
        core::hint::spin_loop();
    }
}

struct Lapic(u64);

impl Lapic {
    fn read(&self, reg: u64) -> u32 {
        // SAFETY: the LAPIC MMIO page is identity mapped, user-accessible, uncached.
        unsafe { read_volatile((self.0 + reg) as *const u32) }
    }
    fn write(&self, reg: u64, v: u32) {
        // SAFETY: as for read.
        unsafe { write_volatile((self.0 + reg) as *mut u32, v) }
    }
    fn ipi(&self, dest: u32, icr_low: u32) {
        self.write(0x310, dest << 24);
        self.write(0x300, icr_low);
        for _ in 0..1_000_000 {
            if self.read(0x300) & (1 << 12) == 0 {
                break;
            }
            core::hint::spin_loop();
        }
    }
}

static LAPIC_BASE: AtomicU64 = AtomicU64::new(DEFAULT_LAPIC);

/// This CPU's APIC ID, from the xAPIC ID register. (Not CPUID: on PVM hosts ring-3
/// CPUID runs natively and reports the host CPU.)
pub fn my_apic_id() -> u32 {
    Lapic(LAPIC_BASE.load(Ordering::Relaxed)).read(0x20) >> 24
}

/// Brings up every AP in `cpus`; prints `cpu <id> up` (BSP first) and `cpus: <N> up`.
pub fn start_aps(cpus: &CpuList) {
    LAPIC_BASE.store(cpus.lapic, Ordering::SeqCst);
    let bsp = my_apic_id();
    println!("cpu {} up", bsp);
    UP.fetch_add(1, Ordering::SeqCst);

    let tramp = boot::ap_trampoline();
    // SAFETY: low memory at TRAMPOLINE_ADDR is free RAM once the start info has been
    // copied out; nothing else of ours lives below 1 MiB.
    unsafe {
        core::ptr::copy_nonoverlapping(tramp.as_ptr(), TRAMPOLINE_ADDR as *mut u8, tramp.len());
    }

    let aps = || {
        cpus.ids()
            .iter()
            .copied()
            .filter(move |&id| id != bsp && id < 0xff)
            .take(boot::MAX_CPUS - 1)
    };
    let expected = 1 + aps().count() as u32;
    if expected > 1 {
        let hz = tsc_hz();
        let lapic = Lapic(cpus.lapic);
        lapic.write(0xf0, lapic.read(0xf0) | 0x1ff); // software-enable, spurious vector 0xff
        for id in aps() {
            lapic.ipi(id, 0x0000_4500); // INIT, assert
        }
        delay_us(hz, 10_000);
        let sipi = 0x0000_4600 | (TRAMPOLINE_ADDR >> 12) as u32;
        for id in aps() {
            lapic.ipi(id, sipi);
        }
        delay_us(hz, 200);
        if UP.load(Ordering::SeqCst) < expected {
            for id in aps() {
                lapic.ipi(id, sipi); // ignored by CPUs already running
            }
        }
        let deadline = tsc() + 2 * hz;
        while UP.load(Ordering::SeqCst) < expected && tsc() < deadline {
            core::hint::spin_loop();
        }
    }
    println!("cpus: {} up", UP.load(Ordering::SeqCst));
}

/// Ring-3 body of an AP: report in, then halt.
pub fn ap_main(_idx: u64) -> ! {
    println!("cpu {} up", my_apic_id());
    UP.fetch_add(1, Ordering::SeqCst);
    boot::halt_forever()
}
