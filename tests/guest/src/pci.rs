//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC, through the port gate on PVM
//! hosts), a bus-0 scan, BAR sizing/assignment and the virtio-pci capability walk.

use crate::boot::{inb, inl, inw, outb, outl, outw};
use crate::println;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Where this guest assigns BARs that firmware/VMM left at 0 (or put out of reach,
/// above 4 GiB: only the first 4 GiB are mapped): upwards from here, below the I/O APIC.
pub const BAR_WINDOW_START: u64 = 0xe000_0000;
pub const BAR_WINDOW_END: u64 = 0xfec0_0000;

const CMD_MEM: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;
const STATUS_CAP_LIST: u16 = 1 << 4;
const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;

/// Bus/device/function (bus 0 only in practice).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}

fn address(b: Bdf, off: u8) -> u32 {
    0x8000_0000
        | (b.bus as u32) << 16
        | (b.dev as u32 & 0x1f) << 11
        | (b.func as u32 & 7) << 8
        | (off as u32 & 0xfc)
}

pub fn read32(b: Bdf, off: u8) -> u32 {
    outl(CONFIG_ADDRESS, address(b, off));
    inl(CONFIG_DATA)
}

pub fn read16(b: Bdf, off: u8) -> u16 {
    outl(CONFIG_ADDRESS, address(b, off));
    inw(CONFIG_DATA + (off as u16 & 2))
}

pub fn read8(b: Bdf, off: u8) -> u8 {
    outl(CONFIG_ADDRESS, address(b, off));
    inb(CONFIG_DATA + (off as u16 & 3))
}

pub fn write32(b: Bdf, off: u8, v: u32) {
    outl(CONFIG_ADDRESS, address(b, off));
    outl(CONFIG_DATA, v);
}

pub fn write16(b: Bdf, off: u8, v: u16) {
    outl(CONFIG_ADDRESS, address(b, off));
    outw(CONFIG_DATA + (off as u16 & 2), v);
}

#[allow(dead_code)]
pub fn write8(b: Bdf, off: u8, v: u8) {
    outl(CONFIG_ADDRESS, address(b, off));
    outb(CONFIG_DATA + (off as u16 & 3), v);
}

/// One present function.
#[derive(Clone, Copy, Default)]
#[allow(dead_code)]
pub struct Func {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// class << 16 | subclass << 8 | prog-if
    pub class: u32,
    pub header_type: u8,
}

pub const MAX_FUNCS: usize = 64;
const MAX_USED: usize = 64;

/// The bus-0 scan, plus the memory ranges BARs already occupy in the BAR window.
pub struct Bus {
    funcs: [Func; MAX_FUNCS],
    nfuncs: usize,
    used: [(u64, u64); MAX_USED],
    nused: usize,
    next_bar: u64,
}

/// A memory BAR as probed.
#[derive(Clone, Copy, Default)]
pub struct BarInfo {
    pub base: u64,
    pub size: u64,
    pub is64: bool,
    /// Original low dword (type bits).
    lo: u32,
}

/// Sizes memory BAR `idx` (memory decoding off during the probe). None: I/O BAR,
/// unimplemented, or the upper half of a 64-bit BAR.
pub fn probe_bar(b: Bdf, idx: u8) -> Option<BarInfo> {
    if idx > 5 {
        return None;
    }
    let off = 0x10 + 4 * idx;
    let lo = read32(b, off);
    if lo & 1 != 0 {
        return None;
    }
    let is64 = (lo >> 1) & 3 == 2;
    if is64 && idx == 5 {
        return None;
    }
    let hi = if is64 { read32(b, off + 4) } else { 0 };
    let cmd = read16(b, 4);
    write16(b, 4, cmd & !(CMD_MEM | 1));
    write32(b, off, 0xffff_ffff);
    let slo = read32(b, off);
    write32(b, off, lo);
    let shi = if is64 {
        write32(b, off + 4, 0xffff_ffff);
        let v = read32(b, off + 4);
        write32(b, off + 4, hi);
        v
    } else {
        0xffff_ffff
    };
    write16(b, 4, cmd);
    if slo & !0xf == 0 && (!is64 || shi == 0) {
        return None;
    }
    let mask = (shi as u64) << 32 | (slo & !0xf) as u64;
    let size = (!mask).wrapping_add(1);
    Some(BarInfo {
        base: (hi as u64) << 32 | (lo & !0xf) as u64,
        size,
        is64,
        lo,
    })
}

impl Bus {
    /// Scans bus 0 (devices 0..31, functions 0..7 if multifunction) and prints
    /// `pci: 00:DD.F VVVV:DDDD class CCSSPP` per function.
    pub fn scan() -> Bus {
        Bus::scan_with(true)
    }

    /// [`Bus::scan`] without the `pci:` lines.
    pub fn scan_quiet() -> Bus {
        Bus::scan_with(false)
    }

    fn scan_with(print: bool) -> Bus {
        let mut bus = Bus {
            funcs: [Func::default(); MAX_FUNCS],
            nfuncs: 0,
            used: [(0, 0); MAX_USED],
            nused: 0,
            next_bar: BAR_WINDOW_START,
        };
        for dev in 0..32u8 {
            for func in 0..8u8 {
                let bdf = Bdf { bus: 0, dev, func };
                let id = read32(bdf, 0);
                let vendor = id as u16;
                if vendor == 0xffff || vendor == 0 {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                let class = read32(bdf, 8) >> 8;
                let header_type = read8(bdf, 0x0e);
                let f = Func {
                    bdf,
                    vendor,
                    device: (id >> 16) as u16,
                    class,
                    header_type,
                };
                if print {
                    println!(
                        "pci: {} {:04x}:{:04x} class {:06x}",
                        bdf, f.vendor, f.device, class
                    );
                }
                if bus.nfuncs < MAX_FUNCS {
                    bus.funcs[bus.nfuncs] = f;
                    bus.nfuncs += 1;
                }
                if header_type & 0x7f == 0 {
                    bus.note_assigned_bars(bdf);
                }
                if func == 0 && header_type & 0x80 == 0 {
                    break;
                }
            }
        }
        bus
    }

    pub fn funcs(&self) -> &[Func] {
        &self.funcs[..self.nfuncs]
    }

    /// Records the assigned memory BARs of `bdf` that lie in the BAR window, so that
    /// our own assignments avoid them.
    fn note_assigned_bars(&mut self, bdf: Bdf) {
        let mut idx = 0u8;
        while idx < 6 {
            let off = 0x10 + 4 * idx;
            let lo = read32(bdf, off);
            let is64 = lo & 1 == 0 && (lo >> 1) & 3 == 2;
            if lo & 1 == 0 && lo & !0xf != 0 {
                let hi = if is64 { read32(bdf, off + 4) } else { 0 };
                if hi == 0 && ((lo & !0xf) as u64) < BAR_WINDOW_END {
                    if let Some(info) = probe_bar(bdf, idx) {
                        self.reserve(info.base, info.size);
                    }
                }
            }
            idx += if is64 { 2 } else { 1 };
        }
    }

    fn reserve(&mut self, base: u64, size: u64) {
        if self.nused < MAX_USED && size != 0 {
            self.used[self.nused] = (base, base.saturating_add(size));
            self.nused += 1;
        }
    }

    /// A free, naturally aligned range of `size` bytes in the BAR window.
    fn allocate(&mut self, size: u64) -> Option<u64> {
        let align = size.max(0x1000);
        let mut addr = (self.next_bar + align - 1) & !(align - 1);
        'retry: loop {
            if addr.checked_add(size)? > BAR_WINDOW_END {
                return None;
            }
            for &(s, e) in &self.used[..self.nused] {
                if addr < e && s < addr + size {
                    addr = (e + align - 1) & !(align - 1);
                    continue 'retry;
                }
            }
            break;
        }
        self.next_bar = addr + size;
        self.reserve(addr, size);
        Some(addr)
    }

    /// The address of memory BAR `idx` of `bdf`; assigns it from the window when it is
    /// unassigned (0) or out of reach (above 4 GiB). Prints a `pci-bar:` line.
    pub fn bar_address(&mut self, bdf: Bdf, idx: u8) -> Option<u64> {
        let info = probe_bar(bdf, idx)?;
        if info.size == 0 || info.size > 1 << 30 {
            return None;
        }
        if info.base != 0 && info.base + info.size <= 1 << 32 {
            println!(
                "pci-bar: {} bar{} {:#x} size {:#x}",
                bdf, idx, info.base, info.size
            );
            return Some(info.base);
        }
        let addr = self.allocate(info.size)?;
        let cmd = read16(bdf, 4);
        write16(bdf, 4, cmd & !CMD_MEM);
        let off = 0x10 + 4 * idx;
        write32(bdf, off, addr as u32 | (info.lo & 0xf));
        if info.is64 {
            write32(bdf, off + 4, (addr >> 32) as u32);
        }
        write16(bdf, 4, cmd);
        println!(
            "pci-bar: {} bar{} {:#x} size {:#x} assigned",
            bdf, idx, addr, info.size
        );
        Some(addr)
    }
}

/// Turns on memory decoding and bus mastering.
pub fn enable_mem_and_master(bdf: Bdf) {
    let cmd = read16(bdf, 4);
    write16(bdf, 4, cmd | CMD_MEM | CMD_BUS_MASTER);
}

/// A virtio-pci (modern) device's structures, as addresses.
#[derive(Clone, Copy, Default)]
pub struct VirtioPci {
    pub bdf: Bdf,
    pub common: u64,
    pub notify: u64,
    pub notify_mult: u32,
    pub isr: u64,
    pub device: u64,
    pub device_len: u32,
    /// MSI-X capability offset (0: none) and table size.
    pub msix_cap: u8,
    pub msix_size: u16,
}

#[derive(Clone, Copy, Default)]
struct Cap {
    found: bool,
    bar: u8,
    offset: u32,
    length: u32,
}

/// Walks the capability list of `f` for the virtio vendor capabilities and MSI-X, maps
/// the BARs they point at, enables memory + bus mastering. None if the common, notify
/// or device structure is missing or unreachable.
pub fn virtio_probe(bus: &mut Bus, f: &Func) -> Option<VirtioPci> {
    let b = f.bdf;
    if read16(b, 6) & STATUS_CAP_LIST == 0 {
        println!("virtio-pci: {} no capabilities, skipped", b);
        return None;
    }
    let mut caps = [Cap::default(); 5];
    let mut v = VirtioPci {
        bdf: b,
        ..VirtioPci::default()
    };
    let mut ptr = read8(b, 0x34) & 0xfc;
    let mut guard = 0;
    while ptr >= 0x40 && guard < 48 {
        guard += 1;
        let id = read8(b, ptr);
        let next = read8(b, ptr + 1) & 0xfc;
        if id == CAP_ID_VENDOR {
            let cfg_type = read8(b, ptr + 3);
            let bar = read8(b, ptr + 4);
            if (1..=4).contains(&cfg_type) && bar <= 5 && !caps[cfg_type as usize].found {
                caps[cfg_type as usize] = Cap {
                    found: true,
                    bar,
                    offset: read32(b, ptr + 8),
                    length: read32(b, ptr + 12),
                };
                if cfg_type == 2 {
                    v.notify_mult = read32(b, ptr + 16);
                }
            }
        } else if id == CAP_ID_MSIX && v.msix_cap == 0 {
            v.msix_cap = ptr;
            v.msix_size = (read16(b, ptr + 2) & 0x7ff) + 1;
        }
        ptr = next;
    }
    if !(caps[1].found && caps[2].found && caps[4].found) {
        println!("virtio-pci: {} no modern capabilities, skipped", b);
        return None;
    }
    let mut bars = [None::<u64>; 6];
    for c in caps.iter().filter(|c| c.found) {
        if bars[c.bar as usize].is_none() {
            bars[c.bar as usize] = Some(bus.bar_address(b, c.bar)?);
        }
    }
    let at = |c: &Cap| bars[c.bar as usize].unwrap_or(0) + c.offset as u64;
    v.common = at(&caps[1]);
    v.notify = at(&caps[2]);
    v.isr = if caps[3].found { at(&caps[3]) } else { 0 };
    v.device = at(&caps[4]);
    v.device_len = caps[4].length;
    enable_mem_and_master(b);
    println!(
        "virtio-pci: {} common {:#x} notify {:#x} mult {} isr {:#x} device {:#x} msix {}",
        b,
        v.common,
        v.notify,
        v.notify_mult,
        v.isr,
        v.device,
        if v.msix_cap != 0 { v.msix_size } else { 0 }
    );
    Some(v)
}

/// Whether `f` is a virtio-blk function worth probing (modern 0x1042, or transitional
/// 0x1001 — which is only used if it has the modern capabilities).
pub fn is_virtio_blk(f: &Func) -> bool {
    f.vendor == 0x1af4 && (f.device == 0x1042 || f.device == 0x1001)
}

/// Whether `f` is a virtio-net function worth probing (modern 0x1041, or transitional
/// 0x1000 — which is only used if it has the modern capabilities).
pub fn is_virtio_net(f: &Func) -> bool {
    f.vendor == 0x1af4 && (f.device == 0x1041 || f.device == 0x1000)
}
