//! The VM's GSI routing table: the default I/O APIC and PIC routes, plus one MSI route per
//! MSI-X vector of each device, pushed to KVM whenever a route changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// First GSI handed out for MSI routes (after the 24 I/O APIC pins).
pub const FIRST_MSI_GSI: u32 = 24;

/// The routing table and the GSI allocator.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: BTreeMap<u32, (u64, u32)>,
    next: u32,
}

impl GsiRouter {
    /// A router with only the default irqchip routes.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi: BTreeMap::new(),
            next: FIRST_MSI_GSI,
        }
    }

    /// Reserves `n` consecutive GSIs for MSI routes.
    pub fn allocate(&mut self, n: u32) -> u32 {
        let base = self.next;
        self.next += n;
        base
    }

    /// Routes `gsi` to the MSI message (address, data), or removes the route with `None`.
    pub fn set_msi(&mut self, gsi: u32, msg: Option<(u64, u32)>) -> Result<(), kvm_ioctls::Error> {
        match msg {
            Some(m) => {
                if self.msi.get(&gsi) == Some(&m) {
                    return Ok(());
                }
                self.msi.insert(gsi, m);
            }
            None => {
                if self.msi.remove(&gsi).is_none() {
                    return Ok(());
                }
            }
        }
        self.commit()
    }

    fn commit(&self) -> Result<(), kvm_ioctls::Error> {
        let mut entries = Vec::new();
        for pin in 0..24u32 {
            let mut e = kvm_irq_routing_entry {
                gsi: pin,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
            e.u.irqchip.pin = pin;
            entries.push(e);
            if pin < 16 {
                let mut p = kvm_irq_routing_entry {
                    gsi: pin,
                    type_: KVM_IRQ_ROUTING_IRQCHIP,
                    ..Default::default()
                };
                p.u.irqchip.irqchip = if pin < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                p.u.irqchip.pin = pin % 8;
                entries.push(p);
            }
        }
        for (gsi, (addr, data)) in &self.msi {
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = *addr as u32;
            e.u.msi.address_hi = (*addr >> 32) as u32;
            e.u.msi.data = *data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        self.vm.set_gsi_routing(&table)
    }
}
