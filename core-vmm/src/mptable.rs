//! The Intel MultiProcessor table (spec 1.4) that tells the guest its CPUs, bus and I/O APIC.
//!
//! Placed at 0xf0000, in the BIOS area that guests scan for the floating pointer.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{HIGH_RAM_START, IOAPIC_START, LAPIC_START, MPTABLE_START};

/// Number of I/O APIC input pins KVM's in-kernel I/O APIC has.
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// The table does not fit or cannot be written.
#[derive(Debug, Error)]
pub enum MpTableError {
    /// Too many CPUs for the EBDA.
    #[error("MP table for {0} vCPUs does not fit below 1 MiB")]
    TooLarge(u8),
    /// Guest memory write failed.
    #[error("cannot write the MP table: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer plus configuration table as one byte image located at `base`.
pub fn build(vcpus: u8, base: u64) -> Vec<u8> {
    let table_addr = base + 16;
    let ioapic_id = vcpus; // after the CPUs' APIC IDs 0..vcpus-1
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type 3 (I/O interrupt), INT, default polarity/trigger, ISA bus irq = pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every CPU.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"BULKHEAD");
    table.extend_from_slice(b"VM          ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16 + table.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

/// Writes the MP table for `vcpus` CPUs into the BIOS area.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MpTableError> {
    let image = build(vcpus, MPTABLE_START);
    if MPTABLE_START + image.len() as u64 > HIGH_RAM_START {
        return Err(MpTableError::TooLarge(vcpus));
    }
    mem.write_slice(&image, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_cpus() {
        let img = build(4, MPTABLE_START);
        assert_eq!(&img[0..4], b"_MP_");
        assert_eq!(sum(&img[0..16]), 0);
        let len = u16::from_le_bytes([img[20], img[21]]) as usize;
        assert_eq!(&img[16..20], b"PCMP");
        assert_eq!(sum(&img[16..16 + len]), 0);
        let cpus = img[16 + 44..]
            .chunks(20)
            .take(4)
            .filter(|e| e[0] == 0)
            .count();
        assert_eq!(cpus, 4);
        assert_eq!(img[16 + 44 + 3] & 2, 2, "first CPU is the BSP");
    }

    #[test]
    fn max_vcpus_fit() {
        assert!(
            MPTABLE_START + build(crate::config::MAX_VCPUS, MPTABLE_START).len() as u64
                <= HIGH_RAM_START
        );
    }
}
