//! PCI: the host bridge's configuration mechanism #1 (ports 0xCF8/0xCFC), a type-0
//! configuration space with BAR sizing, and the bus that routes config and BAR accesses.

use std::sync::{Arc, Mutex};

/// First config address port.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// Config data ports 0xCFC..=0xCFF.
pub const CONFIG_DATA: u16 = 0xcfc;
/// Where BARs are placed: the top of the 32-bit MMIO gap, below the I/O APIC.
pub const BAR_WINDOW_START: u64 = 0xe000_0000;
/// End of the BAR window.
pub const BAR_WINDOW_END: u64 = 0xfec0_0000;

/// One BAR of a function: a 64-bit memory BAR.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bar {
    /// Register index (0..=4; uses index and index+1).
    pub index: usize,
    /// Size, a power of two.
    pub size: u64,
}

/// A type-0 configuration space: 256 bytes, with write masks and 64-bit memory BARs.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    regs: [u32; 64],
    wmask: [u32; 64],
    bars: Vec<Bar>,
}

impl ConfigSpace {
    /// A header for `vendor:device` with class code `class` (base, sub, prog-if).
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8, subsystem: (u16, u16)) -> Self {
        let mut c = Self {
            regs: [0; 64],
            wmask: [0; 64],
            bars: Vec::new(),
        };
        c.regs[0] = u32::from(vendor) | (u32::from(device) << 16);
        c.regs[2] = (class << 8) | u32::from(revision);
        c.regs[11] = u32::from(subsystem.0) | (u32::from(subsystem.1) << 16);
        // Command: I/O, memory, bus master, interrupt disable are writable.
        c.wmask[1] = 0x0000_0407;
        // Interrupt line is writable.
        c.wmask[15] = 0xff;
        c
    }

    /// Adds a 64-bit memory BAR at register `index` of `size` bytes at `addr`.
    pub fn add_bar64(&mut self, index: usize, size: u64, addr: u64) {
        self.bars.push(Bar { index, size });
        self.regs[4 + index] = (addr as u32 & !0xf) | 0b100;
        self.regs[5 + index] = (addr >> 32) as u32;
        self.wmask[4 + index] = !((size - 1) as u32) & !0xf;
        self.wmask[5 + index] = !(((size - 1) >> 32) as u32);
    }

    /// Appends raw bytes (capabilities) at `offset` and makes `write_mask` bytes writable.
    pub fn write_raw(&mut self, offset: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let o = offset + i;
            let shift = (o % 4) * 8;
            self.regs[o / 4] = (self.regs[o / 4] & !(0xff << shift)) | (u32::from(*b) << shift);
        }
    }

    /// Makes `len` bytes at `offset` writable.
    pub fn set_writable(&mut self, offset: usize, len: usize) {
        for o in offset..offset + len {
            self.wmask[o / 4] |= 0xff << ((o % 4) * 8);
        }
    }

    /// Sets the capability pointer and the capability-list status bit.
    pub fn set_capabilities(&mut self, first: u8) {
        self.regs[13] = u32::from(first);
        self.regs[1] |= 1 << 20;
    }

    /// Every register, for a snapshot.
    pub fn regs(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Puts back registers a snapshot took ([`Self::regs`]); false if the count is wrong.
    pub fn set_regs(&mut self, regs: &[u32]) -> bool {
        if regs.len() != self.regs.len() {
            return false;
        }
        self.regs.copy_from_slice(regs);
        true
    }

    /// Reads a dword register.
    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Writes `value` into the bytes of dword `reg` selected by `mask`, honouring write masks.
    pub fn write(&mut self, reg: usize, value: u32, mask: u32) {
        if reg >= self.regs.len() {
            return;
        }
        let w = self.wmask[reg] & mask;
        self.regs[reg] = (self.regs[reg] & !w) | (value & w);
    }

    /// The current address of BAR `index`, if memory decoding is on.
    pub fn bar_addr(&self, index: usize) -> u64 {
        (u64::from(self.regs[5 + index]) << 32) | u64::from(self.regs[4 + index] & !0xf)
    }

    /// Whether memory space decoding is enabled.
    pub fn memory_enabled(&self) -> bool {
        self.regs[1] & 0x2 != 0
    }

    /// Which BAR (and offset in it) `addr` falls in.
    pub fn bar_for(&self, addr: u64) -> Option<(usize, u64)> {
        if !self.memory_enabled() {
            return None;
        }
        self.bars.iter().find_map(|b| {
            let base = self.bar_addr(b.index);
            (base != 0 && addr >= base && addr < base + b.size).then_some((b.index, addr - base))
        })
    }
}

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    /// The configuration space, for reads.
    fn config(&self) -> &ConfigSpace;
    /// A config write (the device may react, e.g. to BAR moves or MSI-X control).
    fn config_write(&mut self, reg: usize, value: u32, mask: u32);
    /// A read from one of its BARs.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write to one of its BARs.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// Function 00:00.0, the host bridge.
struct HostBridge(ConfigSpace);

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_write(&mut self, reg: usize, value: u32, mask: u32) {
        self.0.write(reg, value, mask);
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// A shared PCI device.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Bus 0: slot 0 is the host bridge, the rest are devices in the order added.
pub struct PciBus {
    address: Mutex<u32>,
    slots: Vec<SharedPciDevice>,
    next_bar: u64,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge(ConfigSpace::new(
            0x8086,
            0x29c0,
            0x060000,
            0,
            (0x1af4, 0x1100),
        ))));
        Self {
            address: Mutex::new(0),
            slots: vec![bridge],
            next_bar: BAR_WINDOW_START,
        }
    }

    /// The config address register (0xCF8), for a snapshot.
    pub fn config_address(&self) -> u32 {
        *self.address.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts back the config address register (a snapshot's).
    pub fn set_config_address(&self, value: u32) {
        *self.address.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }

    /// Reserves `size` bytes (a power of two, naturally aligned) of BAR space.
    pub fn allocate_bar(&mut self, size: u64) -> Option<u64> {
        let addr = self.next_bar.checked_add(size - 1)? & !(size - 1);
        if addr + size > BAR_WINDOW_END {
            return None;
        }
        self.next_bar = addr + size;
        Some(addr)
    }

    /// Plugs a device into the next slot; returns the slot number.
    pub fn add(&mut self, dev: SharedPciDevice) -> Option<u8> {
        if self.slots.len() >= 32 {
            return None;
        }
        self.slots.push(dev);
        Some((self.slots.len() - 1) as u8)
    }

    fn target(&self, address: u32) -> Option<(&SharedPciDevice, usize)> {
        if address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (address >> 16) & 0xff;
        let dev = ((address >> 11) & 0x1f) as usize;
        let func = (address >> 8) & 0x7;
        if bus != 0 || func != 0 {
            return None;
        }
        let reg = ((address >> 2) & 0x3f) as usize;
        self.slots.get(dev).map(|d| (d, reg))
    }

    /// Port reads of 0xCF8..=0xCFF.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let address = *self.address.lock().unwrap_or_else(|e| e.into_inner());
        let value = match port {
            CONFIG_ADDRESS if data.len() == 4 => address,
            p if (CONFIG_DATA..CONFIG_DATA + 4).contains(&p) => {
                let shift = u32::from(p - CONFIG_DATA) * 8;
                match self.target(address) {
                    Some((d, reg)) => {
                        d.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .config()
                            .read(reg)
                            >> shift
                    }
                    None => 0xffff_ffff,
                }
            }
            _ => 0xffff_ffff,
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (value >> (i * 8)) as u8;
        }
    }

    /// Port writes of 0xCF8..=0xCFF.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let mut raw = [0u8; 4];
        let n = data.len().min(4);
        raw[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(raw);
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                *self.address.lock().unwrap_or_else(|e| e.into_inner()) = value
            }
            p if (CONFIG_DATA..CONFIG_DATA + 4).contains(&p) => {
                let address = *self.address.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((d, reg)) = self.target(address) {
                    let shift = u32::from(p - CONFIG_DATA) * 8;
                    let mask = (if n >= 4 {
                        u32::MAX
                    } else {
                        (1u32 << (n * 8)) - 1
                    }) << shift;
                    d.lock().unwrap_or_else(|e| e.into_inner()).config_write(
                        reg,
                        value << shift,
                        mask,
                    );
                }
            }
            _ => {}
        }
    }

    /// An MMIO access: routed to the BAR it hits. Returns false if nothing claims it.
    pub fn mmio(&self, addr: u64, read: Option<&mut [u8]>, write: Option<&[u8]>) -> bool {
        for d in &self.slots[1..] {
            let mut dev = d.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((bar, off)) = dev.config().bar_for(addr) {
                if let Some(buf) = read {
                    dev.bar_read(bar, off, buf);
                } else if let Some(buf) = write {
                    dev.bar_write(bar, off, buf);
                }
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_and_config_io() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x018000, 1, (0x1af4, 0x40));
        c.add_bar64(0, 0x10000, 0xe000_0000);
        // Sizing: write all ones, read back the size mask.
        let saved = c.read(4);
        c.write(4, 0xffff_ffff, u32::MAX);
        assert_eq!(c.read(4) & !0xf, !0xffffu32 & !0xf);
        c.write(4, saved, u32::MAX);
        c.write(1, 0x2, u32::MAX);
        assert_eq!(c.bar_for(0xe000_1234), Some((0, 0x1234)));
        assert_eq!(c.bar_for(0xe001_0000), None);

        let mut bus = PciBus::new();
        assert_eq!(bus.allocate_bar(0x10000), Some(0xe000_0000));
        let dev: SharedPciDevice = Arc::new(Mutex::new(HostBridge(c)));
        assert_eq!(bus.add(dev), Some(1));
        bus.pio_write(CONFIG_ADDRESS, &(0x8000_0800u32).to_le_bytes());
        let mut id = [0u8; 4];
        bus.pio_read(CONFIG_DATA, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
        let mut hi = [0u8; 2];
        bus.pio_read(CONFIG_DATA + 2, &mut hi);
        assert_eq!(u16::from_le_bytes(hi), 0x1042);
        // An absent slot reads all ones.
        bus.pio_write(CONFIG_ADDRESS, &(0x8000_1800u32).to_le_bytes());
        bus.pio_read(CONFIG_DATA, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0xffff_ffff);
    }
}
