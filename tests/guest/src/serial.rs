//! 16550 UART on COM1 (0x3f8), polled, shared by all CPUs behind a spinlock.

use crate::boot::{inb, outb};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;

static LOCK: AtomicBool = AtomicBool::new(false);
static READY: AtomicBool = AtomicBool::new(false);

/// 115200 8N1, FIFO enabled and cleared, DTR/RTS.
pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // divisor 1 = 115200
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xC7); // FIFO on, clear, 14-byte threshold
    outb(COM1 + 4, 0x03); // DTR | RTS
    READY.store(true, Ordering::Release);
}

fn putb(b: u8) {
    while inb(COM1 + 5) & LSR_THR_EMPTY == 0 {
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// Writes raw bytes ('\n' becomes "\r\n"); caller holds the lock.
fn write_bytes(s: &[u8]) {
    for &b in s {
        if b == b'\n' {
            putb(b'\r');
        }
        putb(b);
    }
}

/// A received byte, if any.
pub fn try_read() -> Option<u8> {
    if inb(COM1 + 5) & LSR_DATA_READY != 0 {
        Some(inb(COM1))
    } else {
        None
    }
}

struct Guard;

impl Guard {
    fn lock() -> Guard {
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        Guard
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

struct Writer;

impl Write for Writer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints one line (appends "\r\n") atomically with respect to other CPUs.
pub fn print_line(args: fmt::Arguments) {
    let _g = Guard::lock();
    let _ = Writer.write_fmt(args);
    write_bytes(b"\n");
}

/// Echoes raw bytes (with '\n' → "\r\n").
pub fn write_raw(s: &[u8]) {
    let _g = Guard::lock();
    write_bytes(s);
}

/// On the panic/exception path: make sure the UART is usable and the lock cannot
/// deadlock us (if its holder is this very CPU, or dead, take it over after a while).
pub fn force_unlock_after_spin() {
    if !READY.load(Ordering::Acquire) {
        crate::boot::init_io();
        init();
    }
    for _ in 0..10_000_000u32 {
        if !LOCK.load(Ordering::Relaxed) {
            return;
        }
        core::hint::spin_loop();
    }
    LOCK.store(false, Ordering::Release);
}

/// `println!` to the serial console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::serial::print_line(format_args!($($arg)*)) };
}
