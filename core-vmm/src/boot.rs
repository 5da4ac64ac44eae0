//! Kernel loading: ELF (PVH entry note, or 64-bit entry) and bzImage (Linux boot protocol),
//! with the e820 map, command line, initrd, PVH start info or zero page, and MP table.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::VmConfig;
use crate::cpu::EntryMode;
use crate::layout::{
    CMDLINE_START, EBDA_START, HIGH_RAM_START, MMIO_GAP_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::memory::ram_regions;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// Offset of the 64-bit entry point from a bzImage's protected-mode load address.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PVH_MAGIC: u32 = 0x336e_c578;

/// A kernel or initrd that cannot be booted, and why.
#[derive(Debug, Error)]
pub enum BootError {
    /// File missing or unreadable.
    #[error("cannot read {what} {path}: {source}")]
    Open {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("{0} is not a kernel: expected an ELF (vmlinux, PVH) or a bzImage")]
    UnknownFormat(PathBuf),
    /// ELF or bzImage that linux-loader rejects (truncated, bad headers, out of RAM).
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The path given.
        path: PathBuf,
        /// Loader error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel's segments do not fit in guest RAM.
    #[error(
        "kernel {path} needs RAM up to {end:#x}, beyond the {ram_mib} MiB of guest RAM below 3 GiB"
    )]
    KernelTooLarge {
        /// The path given.
        path: PathBuf,
        /// End address the kernel needs.
        end: u64,
        /// Low RAM in MiB.
        ram_mib: u64,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM above the kernel")]
    InitrdTooLarge {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Writing boot structures failed.
    #[error("cannot write boot structures: {0}")]
    Setup(String),
}

/// What kind of image a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF executable (vmlinux or the test guest).
    Elf,
    /// A Linux bzImage.
    BzImage,
}

/// Identifies an image by its magic numbers.
pub fn detect_format(header: &[u8]) -> Option<KernelFormat> {
    if header.len() >= 4 && &header[..4] == b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    if header.len() >= 0x206 && &header[0x202..0x206] == b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// The guest's e820 map for `ram_size` bytes: low RAM up to the EBDA, a reserved hole for
/// the BIOS area, RAM from 1 MiB to the MMIO gap, and any rest above 4 GiB.
pub fn e820_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
    ];
    for r in ram_regions(ram_size) {
        let start = r.guest_addr.max(HIGH_RAM_START);
        let end = r.guest_addr + r.size;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Where the kernel went and how to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootSetup {
    /// Image format.
    pub format: KernelFormat,
    /// How the boot vCPU starts.
    pub entry: EntryMode,
    /// End of the loaded kernel (guest-physical).
    pub kernel_end: u64,
    /// Initrd placement, if any: (address, size).
    pub initrd: Option<(u64, u64)>,
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    let err = |source| BootError::Open {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(err(std::io::Error::other("not a regular file")));
    }
    Ok(file)
}

/// An opened kernel or initrd and the name to use for it in messages.
#[derive(Debug)]
pub struct ImageFile {
    /// The open file (read-only is enough).
    pub file: File,
    /// Its path or name, for messages.
    pub name: PathBuf,
}

impl ImageFile {
    /// Opens `path`, which must be a regular file.
    pub fn open(what: &'static str, path: &Path) -> Result<Self, BootError> {
        Ok(Self {
            file: open(what, path)?,
            name: path.to_path_buf(),
        })
    }
}

/// Opens the kernel and initrd named in `config` and loads them (see [`load_images`]).
pub fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    config: &VmConfig,
) -> Result<BootSetup, BootError> {
    let mut kernel = ImageFile::open("kernel", &config.kernel)?;
    let mut initrd = config
        .initrd
        .as_deref()
        .map(|p| ImageFile::open("initrd", p))
        .transpose()?;
    load_images(
        mem,
        ram_size,
        &mut kernel,
        initrd.as_mut(),
        &config.cmdline,
        config.vcpus,
    )
}

/// Loads a kernel, optional initrd and command line into `mem` and writes every boot
/// structure (e820, PVH start info or zero page, MP table for `vcpus`, GDT, page tables).
pub fn load_images(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel_image: &mut ImageFile,
    initrd_image: Option<&mut ImageFile>,
    cmdline_text: &str,
    vcpus: u8,
) -> Result<BootSetup, BootError> {
    let path = &kernel_image.name;
    let kernel = &mut kernel_image.file;
    let mut header = vec![0u8; 0x400];
    let n = read_up_to(kernel, &mut header).map_err(|source| BootError::Open {
        what: "kernel",
        path: path.clone(),
        source,
    })?;
    header.truncate(n);
    let format = detect_format(&header).ok_or_else(|| BootError::UnknownFormat(path.clone()))?;
    let load_err = |source| BootError::Load {
        path: path.clone(),
        source,
    };
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, kernel, Some(GuestAddress(HIGH_RAM_START))),
        KernelFormat::BzImage => {
            BzImage::load(mem, None, kernel, Some(GuestAddress(HIGH_RAM_START)))
        }
    }
    .map_err(load_err)?;
    let low_ram_end = ram_size.min(MMIO_GAP_START);
    if result.kernel_end > low_ram_end {
        return Err(BootError::KernelTooLarge {
            path: path.clone(),
            end: result.kernel_end,
            ram_mib: low_ram_end >> 20,
        });
    }

    let initrd_max = match &result.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max) + 1,
        _ => low_ram_end,
    }
    .min(low_ram_end);
    let initrd = match initrd_image {
        Some(img) => Some(load_initrd(mem, img, result.kernel_end, initrd_max)?),
        None => None,
    };

    let mut cmdline = cmdline_text.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::Setup(format!("command line: {e}")))?;
    crate::mptable::write(mem, vcpus).map_err(|e| BootError::Setup(e.to_string()))?;

    let entry = match (format, result.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(addr)) => {
            write_pvh_start_info(mem, ram_size, initrd)?;
            EntryMode::Pvh { entry: addr.0 }
        }
        (KernelFormat::Elf, _) => {
            write_zero_page(mem, ram_size, cmdline_text, None, initrd)?;
            EntryMode::Linux64 {
                entry: result.kernel_load.0,
            }
        }
        (KernelFormat::BzImage, _) => {
            write_zero_page(mem, ram_size, cmdline_text, result.setup_header, initrd)?;
            EntryMode::Linux64 {
                entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            }
        }
    };
    crate::cpu::write_boot_tables(mem, entry).map_err(|e| BootError::Setup(e.to_string()))?;
    Ok(BootSetup {
        format,
        entry,
        kernel_end: result.kernel_end,
        initrd,
    })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    f.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Places the initrd page-aligned at the top of low RAM (below `max`), above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    img: &mut ImageFile,
    kernel_end: u64,
    max: u64,
) -> Result<(u64, u64), BootError> {
    let path = img.name.clone();
    let io_err = |source| BootError::Open {
        what: "initrd",
        path: path.clone(),
        source,
    };
    let size = img.file.metadata().map_err(io_err)?.len();
    let too_large = || BootError::InitrdTooLarge {
        path: path.clone(),
        size,
    };
    let addr = max.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    img.file.seek(SeekFrom::Start(0)).map_err(&io_err)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut img.file, len)
        .map_err(|e| io_err(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(ram_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::Setup(format!("PVH start info: {e}")))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    cmdline: &str,
    header: Option<linux_loader::loader::bootparam::setup_header>,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448; // "HdrS"
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(ram_size);
    if map.len() > p.e820_table.len() {
        return Err(BootError::Setup("too many e820 entries".into()));
    }
    for (slot, (addr, size, kind)) in p.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    p.e820_entries = map.len() as u8;
    let params = BootParams::new(&p, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::Setup(format!("zero page: {e}")))
}

/// Reads the zero page back from guest memory (for tests and diagnostics).
pub fn read_zero_page(mem: &GuestMemoryMmap) -> Option<boot_params> {
    mem.read_obj(GuestAddress(ZERO_PAGE_START)).ok()
}

/// Reads the PVH start info back from guest memory (for tests and diagnostics).
pub fn read_pvh_start_info(mem: &GuestMemoryMmap) -> Option<hvm_start_info> {
    mem.read_obj(GuestAddress(PVH_INFO_START)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small() {
        let m = e820_map(256 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(
            m[2],
            (HIGH_RAM_START, (256 << 20) - HIGH_RAM_START, E820_RAM)
        );
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn e820_above_gap() {
        let m = e820_map(4 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(m[3].0, 1 << 32);
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (4 << 30) - (HIGH_RAM_START - EBDA_START));
    }

    #[test]
    fn formats() {
        assert_eq!(detect_format(b"\x7fELF...."), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"garbage"), None);
    }
}
