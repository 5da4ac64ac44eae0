//! The i8042 PS/2 controller with an AT keyboard behind it: enough of it for Linux's i8042
//! and atkbd drivers to find a keyboard (boot the guest with `i8042.noaux i8042.nomux
//! i8042.nopnp i8042.dumbkbd`, as Firecracker's guests do), so that the control domain can
//! press Ctrl-Alt-Del ([`I8042::ctrl_alt_del`], Firecracker's `SendCtrlAltDel`) and the
//! guest's init runs its shutdown; and the reset line (command 0xFE, Linux `reboot=k`).
//!
//! Model: a 16-byte output buffer read through the data port (0x60) with the status
//! register's "output full" bit; controller commands on 0x64: read/write the configuration
//! byte (0x20/0x60), read/write the output port (0xD0/0xD1), self-tests (0xAA → 0x55, 0xAB →
//! 0x00), enable/disable the keyboard (0xAE/0xAD), reset (0xFE). A byte written to the data
//! port with no command pending goes to the keyboard, which answers ACK (0xFA). Keys are
//! scan code set 2, untranslated (the configuration byte's translate bit is clear, so Linux
//! reads set 2 directly). The keyboard interrupt (IRQ 1) is raised while the buffer holds
//! bytes and the configuration byte enables it.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

/// Offset of the data port (0x60) from the controller's base.
pub const DATA: u8 = 0;
/// Offset of the command/status port (0x64).
pub const COMMAND: u8 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xA7;
const CMD_ENABLE_AUX: u8 = 0xA8;
const CMD_SELFTEST: u8 = 0xAA;
const CMD_KBD_TEST: u8 = 0xAB;
const CMD_DISABLE_KBD: u8 = 0xAD;
const CMD_ENABLE_KBD: u8 = 0xAE;
const CMD_READ_OUTP: u8 = 0xD0;
const CMD_WRITE_OUTP: u8 = 0xD1;
const CMD_RESET_CPU: u8 = 0xFE;

/// Status: output buffer full (a byte waits on 0x60).
const SB_OUT_FULL: u8 = 0x01;
/// Status: system flag (self-test passed).
const SB_SYSTEM: u8 = 0x04;
/// Status: the last write was a command (0x64), its data byte is awaited.
const SB_CMD_DATA: u8 = 0x08;
/// Status: keyboard not inhibited (no keylock).
const SB_KBD_UNLOCKED: u8 = 0x10;

/// Configuration byte: keyboard interrupt enabled.
const CB_KBD_INT: u8 = 0x01;
/// Configuration byte: system flag.
const CB_POST_OK: u8 = 0x04;

const SELFTEST_OK: u8 = 0x55;
const KBD_ACK: u8 = 0xFA;
const BUF_SIZE: usize = 16;

/// Scan code set 2: left Ctrl, left Alt, Delete (0xE0-prefixed).
const KEY_CTRL: &[u8] = &[0x14];
const KEY_ALT: &[u8] = &[0x11];
const KEY_DEL: &[u8] = &[0xE0, 0x71];
/// The release prefix of set 2.
const RELEASE: u8 = 0xF0;

/// What a write to the controller asked of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8042Action {
    /// Nothing beyond the device itself.
    None,
    /// The guest pulsed the reset line (command 0xFE).
    Reset,
}

/// The controller and its keyboard.
#[derive(Debug)]
pub struct I8042 {
    irq: Option<EventFd>,
    status: u8,
    control: u8,
    outp: u8,
    /// A controller command that waits for its data byte.
    pending: Option<u8>,
    buf: VecDeque<u8>,
}

impl I8042 {
    /// A controller raising `irq` (IRQ 1) for keyboard bytes; `None` for no interrupt line.
    pub fn new(irq: Option<EventFd>) -> Self {
        Self {
            irq,
            status: SB_KBD_UNLOCKED | SB_SYSTEM,
            control: CB_POST_OK | CB_KBD_INT,
            outp: 0,
            pending: None,
            buf: VecDeque::with_capacity(BUF_SIZE),
        }
    }

    /// Presses and releases Ctrl-Alt-Del. Linux's VT keyboard handler turns it into SIGINT
    /// for init (busybox init runs its `ctrlaltdel` action). False when the buffer had no
    /// room for the whole sequence (the guest is not reading its keyboard).
    pub fn ctrl_alt_del(&mut self) -> bool {
        let mut seq: Vec<u8> = Vec::new();
        for key in [KEY_CTRL, KEY_ALT, KEY_DEL] {
            seq.extend_from_slice(key);
        }
        for key in [KEY_DEL, KEY_ALT, KEY_CTRL] {
            let (last, prefix) = key.split_last().unwrap_or((&0, &[]));
            seq.extend_from_slice(prefix);
            seq.push(RELEASE);
            seq.push(*last);
        }
        if self.buf.len() + seq.len() > BUF_SIZE {
            return false;
        }
        for b in seq {
            self.push(b);
        }
        self.interrupt();
        true
    }

    /// A guest read at `offset` ([`DATA`] or [`COMMAND`]).
    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            COMMAND => self.status,
            DATA => {
                let byte = self.buf.pop_front().unwrap_or(0);
                if self.buf.is_empty() {
                    self.status &= !SB_OUT_FULL;
                } else {
                    // One byte per interrupt: Linux's handler reads one and returns.
                    self.interrupt();
                }
                byte
            }
            _ => 0xff,
        }
    }

    /// A guest write of `value` at `offset`.
    pub fn write(&mut self, offset: u8, value: u8) -> I8042Action {
        match offset {
            COMMAND => {
                self.pending = None;
                self.status &= !SB_CMD_DATA;
                match value {
                    CMD_RESET_CPU => return I8042Action::Reset,
                    CMD_READ_CTR => self.answer(self.control),
                    CMD_READ_OUTP => self.answer(self.outp),
                    CMD_SELFTEST => self.answer(SELFTEST_OK),
                    CMD_KBD_TEST => self.answer(0x00),
                    CMD_WRITE_CTR | CMD_WRITE_OUTP => {
                        self.pending = Some(value);
                        self.status |= SB_CMD_DATA;
                    }
                    CMD_DISABLE_KBD | CMD_ENABLE_KBD | CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
                    _ => {}
                }
            }
            DATA => {
                self.status &= !SB_CMD_DATA;
                match self.pending.take() {
                    Some(CMD_WRITE_CTR) => self.control = value,
                    Some(CMD_WRITE_OUTP) => self.outp = value,
                    _ => {
                        // A byte for the keyboard: it acknowledges every command.
                        self.buf.clear();
                        self.push(KBD_ACK);
                        self.interrupt();
                    }
                }
            }
            _ => {}
        }
        I8042Action::None
    }

    /// Whether a byte waits in the output buffer.
    pub fn has_output(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Replaces the buffer with the answer to a controller command (no interrupt: the
    /// driver polls for command answers).
    fn answer(&mut self, byte: u8) {
        self.buf.clear();
        self.push(byte);
    }

    fn push(&mut self, byte: u8) {
        if self.buf.len() < BUF_SIZE {
            self.buf.push_back(byte);
            self.status |= SB_OUT_FULL;
        }
    }

    fn interrupt(&self) {
        if self.control & CB_KBD_INT == 0 || self.buf.is_empty() {
            return;
        }
        if let Some(irq) = &self.irq {
            // A lost edge only delays the key until the next one; never fatal.
            let _ = irq.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(k: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while k.read(COMMAND) & SB_OUT_FULL != 0 {
            out.push(k.read(DATA));
        }
        out
    }

    #[test]
    fn controller_commands_answer_as_linux_expects() {
        let mut k = I8042::new(None);
        assert_eq!(k.read(COMMAND) & SB_OUT_FULL, 0, "empty at start");
        assert_eq!(k.write(COMMAND, CMD_SELFTEST), I8042Action::None);
        assert_eq!(drain(&mut k), vec![SELFTEST_OK]);
        k.write(COMMAND, CMD_READ_CTR);
        assert_eq!(drain(&mut k), vec![CB_POST_OK | CB_KBD_INT]);
        k.write(COMMAND, CMD_WRITE_CTR);
        assert_ne!(k.read(COMMAND) & SB_CMD_DATA, 0);
        k.write(DATA, 0x30);
        k.write(COMMAND, CMD_READ_CTR);
        assert_eq!(drain(&mut k), vec![0x30]);
        k.write(DATA, 0xF4); // to the keyboard: enable scanning
        assert_eq!(drain(&mut k), vec![KBD_ACK]);
        assert_eq!(k.write(COMMAND, CMD_RESET_CPU), I8042Action::Reset);
    }

    #[test]
    fn ctrl_alt_del_is_set_2_press_then_release_and_raises_irq1() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
        let mut k = I8042::new(Some(irq.try_clone().expect("clone")));
        assert!(k.ctrl_alt_del());
        assert!(irq.read().is_ok(), "IRQ 1 raised");
        assert_eq!(
            drain(&mut k),
            vec![0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
        );
        let _ = irq.read(); // the drain raised it again after each byte but the last
                            // With the keyboard interrupt disabled the bytes wait, without an interrupt.
        k.write(COMMAND, CMD_WRITE_CTR);
        k.write(DATA, CB_POST_OK);
        assert!(k.ctrl_alt_del());
        assert!(irq.read().is_err(), "no IRQ while disabled");
        assert!(k.has_output());
        // A full buffer refuses a second sequence rather than cutting it.
        assert!(!k.ctrl_alt_del());
    }
}
