//! PVH `hvm_start_info`: copied out of guest memory early (before the AP trampoline
//! may overwrite low memory).

use core::ptr::read_unaligned;

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;

const MAX_CMDLINE: usize = 2048;
const MAX_MEMMAP: usize = 128;

/// One `hvm_memmap_table_entry`.
#[derive(Clone, Copy, Default)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// What the guest learned from the start info.
pub struct StartInfo {
    pub valid: bool,
    pub magic: u32,
    pub version: u32,
    pub rsdp_paddr: u64,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    memmap: [MemEntry; MAX_MEMMAP],
    memmap_len: usize,
}

impl StartInfo {
    /// Parses the structure at physical address `paddr` (identity mapped).
    pub fn parse(paddr: u64) -> StartInfo {
        let mut si = StartInfo {
            valid: false,
            magic: 0,
            version: 0,
            rsdp_paddr: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            memmap: [MemEntry::default(); MAX_MEMMAP],
            memmap_len: 0,
        };
        if paddr == 0 {
            return si;
        }
        let base = paddr as *const u8;
        // SAFETY: the loader passes a valid hvm_start_info; all of RAM is identity mapped.
        unsafe {
            si.magic = read_unaligned(base as *const u32);
            if si.magic != MAGIC {
                return si;
            }
            si.valid = true;
            si.version = read_unaligned(base.add(4) as *const u32);
            let cmdline_paddr = read_unaligned(base.add(24) as *const u64);
            si.rsdp_paddr = read_unaligned(base.add(32) as *const u64);
            if cmdline_paddr != 0 {
                let p = cmdline_paddr as *const u8;
                while si.cmdline_len < MAX_CMDLINE {
                    let b = p.add(si.cmdline_len).read_volatile();
                    if b == 0 {
                        break;
                    }
                    si.cmdline[si.cmdline_len] = b;
                    si.cmdline_len += 1;
                }
            }
            if si.version >= 1 {
                let memmap_paddr = read_unaligned(base.add(40) as *const u64);
                let entries = read_unaligned(base.add(48) as *const u32) as usize;
                if memmap_paddr != 0 {
                    let p = memmap_paddr as *const u8;
                    for i in 0..entries.min(MAX_MEMMAP) {
                        let e = p.add(i * 24);
                        si.memmap[i] = MemEntry {
                            addr: read_unaligned(e as *const u64),
                            size: read_unaligned(e.add(8) as *const u64),
                            kind: read_unaligned(e.add(16) as *const u32),
                        };
                        si.memmap_len = i + 1;
                    }
                }
            }
        }
        si
    }

    /// The command line as given (lossy: non-UTF-8 bytes are dropped).
    pub fn cmdline(&self) -> &str {
        let bytes = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    /// The e820-style memory map.
    pub fn memmap(&self) -> &[MemEntry] {
        &self.memmap[..self.memmap_len]
    }

    /// End of the highest usable RAM region (0 if unknown).
    pub fn ram_top(&self) -> u64 {
        self.memmap()
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.addr.saturating_add(e.size))
            .max()
            .unwrap_or(0)
    }

    /// Total bytes of usable RAM.
    pub fn ram_usable(&self) -> u64 {
        self.memmap()
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    /// End of the usable region containing `addr` (None if `addr` is not usable RAM).
    pub fn usable_end_containing(&self, addr: u64) -> Option<u64> {
        self.memmap()
            .iter()
            .filter(|e| {
                e.kind == E820_RAM && e.addr <= addr && addr < e.addr.saturating_add(e.size)
            })
            .map(|e| e.addr.saturating_add(e.size))
            .max()
    }
}
