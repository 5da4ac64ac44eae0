//! A running VM's whole state as the runner saves it — the machine (irqchip, PIT, clock,
//! COM1, the PCI config address), each vCPU, each virtio-pci transport with its drained
//! backend's ring bases and in-flight region — and its records (`vm`, `vcpuN`,
//! `dev:NAME`, each postcard), as they travel to `bulkheadd` and into the snapshot file.

use bulkhead_ipc::runner::StateRecord;
use serde::{Deserialize, Serialize};

use super::kvm::{VcpuState, VmKvmState};
use crate::virtio_pci::TransportState;

/// COM1's registers and receive FIFO (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRecord {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// Bytes waiting in the receive FIFO.
    pub in_buffer: Vec<u8>,
}

impl From<&vm_superio::serial::SerialState> for SerialRecord {
    fn from(s: &vm_superio::serial::SerialState) -> Self {
        Self {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialRecord> for vm_superio::serial::SerialState {
    fn from(r: &SerialRecord) -> Self {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            r.registers;
        Self {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: r.in_buffer.clone(),
        }
    }
}

/// The VM-wide state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// vCPU count.
    pub vcpus: u8,
    /// irqchip, PIT, clock.
    pub kvm: VmKvmState,
    /// COM1.
    pub serial: SerialRecord,
    /// The PCI config address register.
    pub pci_address: u32,
    /// The vCPUs were paused before the save (a restore leaves them paused).
    pub paused: bool,
}

/// Everything the runner saves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSnapshot {
    /// The machine.
    pub machine: MachineState,
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// Each virtio device, in PCI slot order.
    pub devices: Vec<TransportState>,
}

fn enc<T: Serialize>(name: String, v: &T) -> Result<StateRecord, String> {
    postcard::to_allocvec(v)
        .map(|data| StateRecord {
            name: name.clone(),
            data,
        })
        .map_err(|e| format!("encoding {name}: {e}"))
}

fn dec<'a, T: Deserialize<'a>>(r: &'a StateRecord) -> Result<T, String> {
    postcard::from_bytes(&r.data).map_err(|e| format!("state record {}: {e}", r.name))
}

impl VmSnapshot {
    /// The records, in order: `vm`, `vcpu0..`, `dev:NAME..`.
    pub fn to_records(&self) -> Result<Vec<StateRecord>, String> {
        let mut out = vec![enc("vm".into(), &self.machine)?];
        for v in &self.vcpus {
            out.push(enc(format!("vcpu{}", v.index), v)?);
        }
        for d in &self.devices {
            out.push(enc(format!("dev:{}", d.name), d)?);
        }
        Ok(out)
    }

    /// Reads records back; every vCPU of the machine must be there, in order.
    pub fn from_records(records: &[StateRecord]) -> Result<Self, String> {
        let vm = records
            .iter()
            .find(|r| r.name == "vm")
            .ok_or("the snapshot has no 'vm' record")?;
        let machine: MachineState = dec(vm)?;
        let mut vcpus = Vec::new();
        for i in 0..machine.vcpus {
            let name = format!("vcpu{i}");
            let r = records
                .iter()
                .find(|r| r.name == name)
                .ok_or_else(|| format!("the snapshot has no '{name}' record"))?;
            let v: VcpuState = dec(r)?;
            if v.index != i {
                return Err(format!("record '{name}' holds vCPU {}", v.index));
            }
            vcpus.push(v);
        }
        let devices = records
            .iter()
            .filter(|r| r.name.starts_with("dev:"))
            .map(dec::<TransportState>)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            machine,
            vcpus,
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::kvm::VmKvmState;

    fn vcpu(index: u8) -> VcpuState {
        VcpuState {
            index,
            regs: vec![index; 8],
            sregs: vec![1; 4],
            fpu: vec![2; 4],
            xsave: Some(vec![3; 16]),
            xcrs: None,
            debugregs: None,
            msrs: vec![(0x10, 12345), (0xc000_0080, 0x500)],
            lapic: vec![4; 16],
            mp_state: 0,
            events: None,
            tsc_khz: Some(2_000_000),
        }
    }

    fn snap(vcpus: u8) -> VmSnapshot {
        VmSnapshot {
            machine: MachineState {
                vcpus,
                kvm: VmKvmState {
                    irqchips: vec![vec![0; 8]; 3],
                    pit: vec![5; 8],
                    clock: vec![6; 8],
                },
                serial: SerialRecord {
                    registers: [1, 2, 3, 4, 5, 6, 7, 8, 9],
                    in_buffer: b"abc".to_vec(),
                },
                pci_address: 0x8000_0800,
                paused: true,
            },
            vcpus: (0..vcpus).map(vcpu).collect(),
            devices: Vec::new(),
        }
    }

    #[test]
    fn records_round_trip() {
        let s = snap(2);
        let records = s.to_records().expect("encode");
        let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["vm", "vcpu0", "vcpu1"]);
        assert_eq!(VmSnapshot::from_records(&records).expect("decode"), s);
    }

    #[test]
    fn a_missing_or_garbled_record_is_named() {
        let mut records = snap(2).to_records().expect("encode");
        records.retain(|r| r.name != "vcpu1");
        let e = VmSnapshot::from_records(&records).unwrap_err();
        assert!(e.contains("'vcpu1'"), "{e}");
        let mut records = snap(1).to_records().expect("encode");
        records[0].data.truncate(3);
        let e = VmSnapshot::from_records(&records).unwrap_err();
        assert!(e.contains("state record vm"), "{e}");
    }

    #[test]
    fn serial_state_round_trips() {
        let r = SerialRecord {
            registers: [1, 2, 3, 4, 5, 6, 7, 8, 9],
            in_buffer: b"xyz".to_vec(),
        };
        let s: vm_superio::serial::SerialState = (&r).into();
        assert_eq!(SerialRecord::from(&s), r);
    }
}
