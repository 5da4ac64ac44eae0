//! The loaders against Debian's real kernel files (linux-image-*-cloud-amd64, fetched and
//! unpacked by scripts/debian-kernel.sh): bzImage header and zero-page layout, PVH note
//! discovery in the vmlinux, and the vmlinux reaching its first serial output on the runner.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use core_vmm::boot::{self, e820_map, KernelFormat, BZIMAGE_64BIT_ENTRY_OFFSET};
use core_vmm::cpu::EntryMode;
use core_vmm::layout::{CMDLINE_START, HIGH_RAM_START};
use core_vmm::memory::GuestRam;
use core_vmm::VmConfig;
use vm_memory::{Bytes, GuestAddress};

/// The cached Debian kernel directory (fetched before the tests by scripts/test.sh), or None
/// (skip) when it is not there outside CI. Tests never fetch it themselves: `--no-fetch`.
fn debian_kernel(test: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("scripts/debian-kernel.sh"))
        .arg("--no-fetch")
        .output()
        .expect("run scripts/debian-kernel.sh");
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        if std::env::var_os("CI").is_some() {
            panic!("{test}: scripts/debian-kernel.sh failed: {msg}");
        }
        eprintln!("\n*** SKIPPED {test}: Debian's kernel is not cached: {msg} ***\n");
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

const RAM: u64 = 512 << 20;

#[test]
fn bzimage_zero_page_layout() {
    let Some(dir) = debian_kernel("bzimage_zero_page_layout") else {
        return;
    };
    let kernel = dir.join("vmlinuz");
    let initrd = std::env::temp_dir().join(format!("bulkhead-initrd-{}", std::process::id()));
    let initrd_bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&initrd, &initrd_bytes).expect("initrd");
    let cmdline = "console=ttyS0 reboot=k panic=-1 bulkhead.test=1";
    let cfg = VmConfig {
        kernel: kernel.clone(),
        initrd: Some(initrd.clone()),
        cmdline: cmdline.into(),
        memory: RAM,
        vcpus: 2,
    };
    let ram = GuestRam::create(RAM, core_vmm::memory::RamBacking::Shmem).expect("ram");
    let setup = boot::load(ram.mem(), RAM, &cfg).expect("load bzImage");
    let _ = std::fs::remove_file(&initrd);
    assert_eq!(setup.format, KernelFormat::BzImage);

    let image = std::fs::read(&kernel).expect("read vmlinuz");
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let pm_offset = (setup_sects + 1) * 512;
    // The protected-mode kernel sits at 1 MiB, byte for byte, and entry is its 64-bit entry.
    let mut head = vec![0u8; 4096];
    ram.mem()
        .read_slice(&mut head, GuestAddress(HIGH_RAM_START))
        .expect("read");
    assert_eq!(&head[..], &image[pm_offset..pm_offset + 4096]);
    assert_eq!(
        setup.entry,
        EntryMode::Linux64 {
            entry: HIGH_RAM_START + BZIMAGE_64BIT_ENTRY_OFFSET
        }
    );

    let zp = boot::read_zero_page(ram.mem()).expect("zero page");
    let hdr = zp.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448, "HdrS magic");
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    assert_eq!(
        { hdr.version },
        version,
        "boot protocol version copied from the image"
    );
    assert!(
        version >= 0x020c,
        "Debian kernels speak boot protocol >= 2.12, got {version:#x}"
    );
    assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
    let mut cl = vec![0u8; cmdline.len() + 1];
    ram.mem()
        .read_slice(&mut cl, GuestAddress(CMDLINE_START))
        .expect("cmdline");
    assert_eq!(&cl[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(cl[cmdline.len()], 0, "NUL-terminated");

    let (rd_addr, rd_size) = ({ hdr.ramdisk_image }, { hdr.ramdisk_size });
    assert_eq!(rd_size as usize, initrd_bytes.len());
    assert_eq!(rd_addr % 4096, 0, "initrd page-aligned");
    assert!(
        u64::from(rd_addr) >= setup.kernel_end,
        "initrd above the kernel"
    );
    assert!(u64::from(rd_addr) + u64::from(rd_size) <= u64::from(hdr.initrd_addr_max) + 1);
    let mut rd = vec![0u8; initrd_bytes.len()];
    ram.mem()
        .read_slice(&mut rd, GuestAddress(rd_addr.into()))
        .expect("initrd");
    assert!(
        rd == initrd_bytes,
        "initrd bytes in guest RAM match the file"
    );

    let want = e820_map(RAM);
    assert_eq!(zp.e820_entries as usize, want.len());
    for (got, (addr, size, kind)) in zp.e820_table.iter().zip(want.iter()) {
        assert_eq!(
            ({ got.addr }, { got.size }, { got.r#type }),
            (*addr, *size, *kind)
        );
    }
}

#[test]
fn vmlinux_pvh_note_is_found() {
    let Some(dir) = debian_kernel("vmlinux_pvh_note_is_found") else {
        return;
    };
    let vmlinux = dir.join("vmlinux");
    let note_entry = pvh_note_entry(&std::fs::read(&vmlinux).expect("read vmlinux"))
        .expect("Debian's vmlinux has a PVH note");
    let cfg = VmConfig {
        kernel: vmlinux,
        initrd: None,
        cmdline: "console=ttyS0".into(),
        memory: RAM,
        vcpus: 1,
    };
    let ram = GuestRam::create(RAM, core_vmm::memory::RamBacking::Shmem).expect("ram");
    let setup = boot::load(ram.mem(), RAM, &cfg).expect("load vmlinux");
    assert_eq!(setup.format, KernelFormat::Elf);
    assert_eq!(setup.entry, EntryMode::Pvh { entry: note_entry });
    let info = boot::read_pvh_start_info(ram.mem()).expect("start info");
    assert_eq!({ info.magic }, 0x336e_c578);
    assert_eq!({ info.cmdline_paddr }, CMDLINE_START);
    assert_eq!({ info.memmap_entries } as usize, e820_map(RAM).len());
}

/// An independent reading of XEN_ELFNOTE_PHYS32_ENTRY (type 18) from the ELF's PT_NOTEs.
fn pvh_note_entry(elf: &[u8]) -> Option<u64> {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (
        u64_at(0x20) as usize,
        u16_at(0x36) as usize,
        u16_at(0x38) as usize,
    );
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph) != 4 {
            continue;
        }
        let (mut off, end) = (
            u64_at(ph + 8) as usize,
            (u64_at(ph + 8) + u64_at(ph + 32)) as usize,
        );
        while off + 12 <= end {
            let (namesz, descsz, kind) = (
                u32_at(off) as usize,
                u32_at(off + 4) as usize,
                u32_at(off + 8),
            );
            let name = &elf[off + 12..off + 12 + namesz];
            let desc = off + 12 + namesz.div_ceil(4) * 4;
            if kind == 18 && name.starts_with(b"Xen") {
                return Some(if descsz >= 8 {
                    u64_at(desc)
                } else {
                    u64::from(u32_at(desc))
                });
            }
            off = desc + descsz.div_ceil(4) * 4;
        }
    }
    None
}

#[test]
fn debian_vmlinux_reaches_first_serial_output() {
    if !kvm_available("debian_vmlinux_reaches_first_serial_output") {
        return;
    }
    let Some(dir) = debian_kernel("debian_vmlinux_reaches_first_serial_output") else {
        return;
    };
    let mut c = Command::new(bin("bulkhead-runner"));
    c.arg("--kernel").arg(dir.join("vmlinux")).args([
        "--memory",
        "512M",
        "--cmdline",
        "earlyprintk=serial,ttyS0 console=ttyS0",
    ]);
    let r = Running::spawn(c);
    let seen = r.stdout.wait_for("Linux version", Duration::from_secs(90));
    assert!(
        seen,
        "no serial output from Debian's vmlinux\n{}\n{}",
        r.stdout.text(),
        r.stderr.text()
    );
    assert!(
        r.stdout.wait_for(
            "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
            Duration::from_secs(30)
        ),
        "the kernel read our e820 map\n{}",
        r.stdout.text()
    );
}
