//! The legacy devices every VM has, on the port-I/O bus: COM1 16550 serial, the i8042
//! keyboard controller (reset line and Ctrl-Alt-Del, [`crate::i8042`]), the shutdown-request
//! port and the test-guest debug-exit port.

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::i8042::{I8042Action, I8042};
use crate::layout::ports;
use crate::pci::{PciBus, CONFIG_ADDRESS, CONFIG_DATA};
use crate::virtio_pci::VhostUserPciDevice;

/// An eventfd as a vm-superio interrupt/reset trigger.
#[derive(Debug)]
pub struct EventTrigger(pub EventFd);

impl Trigger for EventTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes (stdout standalone, the control channel under
/// `bulkheadd`). Writers must not block the vCPU for long and must not fail the guest.
pub type ConsoleOut = Box<dyn Write + Send>;

/// Serial output to a file descriptor. Write errors (a reader that went away) drop the
/// output and never stop the guest.
#[derive(Debug)]
pub struct FdConsole(pub OwnedFd);

impl Write for FdConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match nix::unistd::write(self.0.as_fd(), buf) {
            Ok(n) => Ok(n),
            Err(_) => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The serial device as the vCPUs and the console input thread share it.
pub type SharedSerial = Arc<Mutex<Serial<EventTrigger, vm_superio::serial::NoEvents, ConsoleOut>>>;

/// What a port access asked the VM to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Nothing: keep running.
    None,
    /// The guest wrote V to the debug-exit port.
    DebugExit(u8),
}

/// The port-I/O bus of one VM.
pub struct LegacyDevices {
    /// COM1.
    pub serial: SharedSerial,
    i8042: Mutex<I8042>,
    reset: EventFd,
    shutdown_requested: AtomicBool,
    /// PCI bus 0 (config mechanism #1 and BARs).
    pub pci: PciBus,
    /// The vhost-user devices on that bus, by slot order (for reconnecting backends).
    pub vhost: Vec<Arc<Mutex<VhostUserPciDevice>>>,
}

impl LegacyDevices {
    /// Builds the devices; `serial_irq` is raised for COM1 interrupts, `kbd_irq` for the
    /// i8042 keyboard's (IRQ 1), `reset` on i8042 reset.
    pub fn new(
        serial_irq: EventFd,
        kbd_irq: EventFd,
        reset: EventFd,
        console: ConsoleOut,
        pci: PciBus,
        vhost: Vec<Arc<Mutex<VhostUserPciDevice>>>,
    ) -> Self {
        Self {
            serial: Arc::new(Mutex::new(Serial::new(EventTrigger(serial_irq), console))),
            i8042: Mutex::new(I8042::new(Some(kbd_irq))),
            reset,
            shutdown_requested: AtomicBool::new(false),
            pci,
            vhost,
        }
    }

    /// Raises the shutdown request that guests read from [`ports::SHUTDOWN_REQUEST`].
    pub fn request_shutdown(&self) {
        self.shutdown_requested.store(true, Ordering::SeqCst);
    }

    /// Presses Ctrl-Alt-Del on the i8042 keyboard (how `bulkhead shutdown` and `reboot` ask
    /// a Linux guest). False if the guest left no room for it in the keyboard buffer.
    pub fn ctrl_alt_del(&self) -> bool {
        match self.i8042.lock() {
            Ok(mut k) => k.ctrl_alt_del(),
            Err(_) => false,
        }
    }

    /// The vhost-user device called `name`.
    pub fn vhost_device(&self, name: &str) -> Option<Arc<Mutex<VhostUserPciDevice>>> {
        self.vhost
            .iter()
            .find(|d| d.lock().map(|d| d.name() == name).unwrap_or(false))
            .cloned()
    }

    /// COM1's registers and receive FIFO, for a snapshot.
    pub fn serial_state(&self) -> vm_superio::serial::SerialState {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
    }

    /// Puts back COM1's registers and FIFO from a snapshot (same interrupt line and output).
    pub fn restore_serial(&self, state: &vm_superio::serial::SerialState) -> Result<(), String> {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let irq = serial
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("serial eventfd: {e}"))?;
        let placeholder: ConsoleOut = Box::new(io::sink());
        let old = std::mem::replace(
            &mut *serial,
            Serial::new(
                EventTrigger(
                    irq.try_clone()
                        .map_err(|e| format!("serial eventfd: {e}"))?,
                ),
                placeholder,
            ),
        );
        let out = old.into_writer();
        *serial = Serial::from_state(state, EventTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(())
    }

    /// Feeds console input to COM1's receive FIFO; returns how many bytes fit.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        match self.serial.lock() {
            Ok(mut s) => s.enqueue_raw_bytes(bytes).unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// A guest `in` from `port`; unclaimed ports read as all ones.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            p if (ports::COM1..ports::COM1 + 8).contains(&p) => {
                // `rep insb` arrives as several bytes: one register read each.
                if let Ok(mut s) = self.serial.lock() {
                    for b in data.iter_mut() {
                        *b = s.read((p - ports::COM1) as u8);
                    }
                }
            }
            ports::I8042_DATA | ports::I8042_COMMAND => {
                if let (Some(first), Ok(mut k)) = (data.first_mut(), self.i8042.lock()) {
                    *first = k.read((port - ports::I8042_DATA) as u8);
                }
            }
            p if (CONFIG_ADDRESS..CONFIG_DATA + 4).contains(&p) => self.pci.pio_read(p, data),
            ports::SHUTDOWN_REQUEST => {
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = u8::from(self.shutdown_requested.load(Ordering::SeqCst));
                }
            }
            _ => {}
        }
    }

    /// A guest `out` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioAction {
        let Some(&value) = data.first() else {
            return PioAction::None;
        };
        match port {
            p if (ports::COM1..ports::COM1 + 8).contains(&p) => {
                if let Ok(mut s) = self.serial.lock() {
                    // `rep outsb` arrives as several bytes. A failed interrupt trigger only
                    // delays output; never fatal.
                    for b in data {
                        let _ = s.write((p - ports::COM1) as u8, *b);
                    }
                }
            }
            ports::I8042_DATA | ports::I8042_COMMAND => {
                if let Ok(mut k) = self.i8042.lock() {
                    if k.write((port - ports::I8042_DATA) as u8, value) == I8042Action::Reset {
                        // The vCPU that wrote it sees the eventfd set and stops the VM.
                        let _ = self.reset.write(1);
                    }
                }
            }
            ports::DEBUG_EXIT => return PioAction::DebugExit(value),
            p if (CONFIG_ADDRESS..CONFIG_DATA + 4).contains(&p) => self.pci.pio_write(p, data),
            _ => {}
        }
        PioAction::None
    }
}
