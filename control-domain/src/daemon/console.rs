//! A VM's console: the ring of recent guest output (for late attachers) and the clients
//! attached to it. Owns its lock; callers only push output, subscribe and unsubscribe.
//! May call: the ipc channel of each subscriber (a send that never waits), nothing else.

use std::collections::VecDeque;
use std::sync::Mutex;

use bulkhead_ipc::control::Reply;
use bulkhead_ipc::{Channel, IpcError};

use super::log;
use super::vm::lock;

/// How much console output is kept for late attachers.
pub const CONSOLE_RING: usize = 64 * 1024;

/// The console of one VM: recent output and who is watching.
#[derive(Default)]
pub struct ConsoleRing {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    ring: VecDeque<u8>,
    subscribers: Vec<(u64, Channel)>,
}

impl ConsoleRing {
    /// Keeps guest output and sends it to every subscriber without waiting: one whose
    /// socket fails has gone, and one that does not read (its socket is full) is cut off, so
    /// no client can stall the VM's event thread.
    pub fn push(&self, data: &[u8]) {
        let mut c = lock(&self.inner);
        c.ring.extend(data);
        let excess = c.ring.len().saturating_sub(CONSOLE_RING);
        c.ring.drain(..excess);
        let reply = Reply::ConsoleOutput {
            data: data.to_vec(),
        };
        c.subscribers
            .retain(|(id, ch)| match ch.try_send(&reply, &[]) {
                Ok(()) => true,
                Err(IpcError::WouldBlock) => {
                    log(&format!(
                        "console client {id} does not read its output; disconnecting it"
                    ));
                    let _ = ch.shutdown();
                    false
                }
                Err(_) => false,
            });
    }

    /// Adds subscriber `id` and sends it `ConsoleAttached` with the buffered history, before
    /// any later output (a send that never waits: the history fits a fresh socket).
    pub fn subscribe(&self, id: u64, ch: Channel) -> Result<(), IpcError> {
        // The history goes out first, under the lock: no output can overtake it.
        let mut c = lock(&self.inner);
        let attached = Reply::ConsoleAttached {
            history: c.ring.iter().copied().collect(),
        };
        ch.try_send(&attached, &[])?;
        c.subscribers.push((id, ch));
        Ok(())
    }

    /// Removes subscriber `id`.
    pub fn unsubscribe(&self, id: u64) {
        lock(&self.inner).subscribers.retain(|(i, _)| *i != id);
    }

    /// Tells every subscriber the console closed (the VM stopped) and drops them.
    pub fn close_all(&self, reason: String) {
        let subscribers = std::mem::take(&mut lock(&self.inner).subscribers);
        let closed = Reply::ConsoleClosed { reason };
        for (_, ch) in subscribers {
            let _ = ch.try_send(&closed, &[]);
        }
    }
}
