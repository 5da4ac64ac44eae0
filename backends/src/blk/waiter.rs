//! Sleeps a queue worker that has requests in flight until its I/O engine completes one or
//! the guest posts more, so that a request the guest adds meanwhile goes to the engine at
//! once instead of after the next completion.

use std::io;
use std::os::fd::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const COMPLETION: u64 = 0;
const KICK: u64 = 1;

/// One queue worker's epoll set: the engine's completion eventfd, always; the queue's kick
/// eventfd, one-shot, re-armed for each wait (the frontend may replace it at any time).
pub struct IoWaiter {
    epoll: Epoll,
    completion: Option<RawFd>,
}

impl IoWaiter {
    /// An empty set.
    pub fn new() -> io::Result<IoWaiter> {
        Ok(IoWaiter {
            epoll: Epoll::new()?,
            completion: None,
        })
    }

    /// Sleeps until `completion` (level-triggered) or `kick` (if given) is readable, a signal
    /// or task work interrupts, or `timeout_ms` passes. True if the kick fd is readable
    /// (the caller consumes it).
    pub fn wait(
        &mut self,
        completion: RawFd,
        kick: Option<RawFd>,
        timeout_ms: i32,
    ) -> io::Result<bool> {
        if self.completion != Some(completion) {
            if let Some(old) = self.completion.take() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, old, EpollEvent::default());
            }
            self.epoll.ctl(
                ControlOperation::Add,
                completion,
                EpollEvent::new(EventSet::IN, COMPLETION),
            )?;
            self.completion = Some(completion);
        }
        if let Some(kick) = kick {
            let ev = EpollEvent::new(EventSet::IN | EventSet::ONE_SHOT, KICK);
            // Modify re-arms a registration that fired; a kick fd never seen (or closed
            // and replaced since, which drops its registration) is added.
            match self.epoll.ctl(ControlOperation::Modify, kick, ev) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    self.epoll.ctl(ControlOperation::Add, kick, ev)?;
                }
                Err(e) => return Err(e),
            }
        }
        let mut events = [EpollEvent::default(); 2];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => 0,
            Err(e) => return Err(e),
        };
        Ok(events.iter().take(n).any(|ev| ev.data() == KICK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn wakes_for_a_completion_or_a_kick_and_times_out_otherwise() {
        let done = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut w = IoWaiter::new().expect("epoll");
        let t = std::time::Instant::now();
        let r = w
            .wait(done.as_raw_fd(), Some(kick.as_raw_fd()), 50)
            .expect("wait");
        assert!(!r, "nothing is ready");
        assert!(t.elapsed() >= std::time::Duration::from_millis(40));
        kick.write(1).expect("kick");
        let r = w
            .wait(done.as_raw_fd(), Some(kick.as_raw_fd()), 5000)
            .expect("wait");
        assert!(r);
        kick.read().expect("consume");
        done.write(1).expect("complete");
        let r = w
            .wait(done.as_raw_fd(), Some(kick.as_raw_fd()), 5000)
            .expect("wait");
        assert!(!r, "only the completion is ready");
        done.read().expect("consume");
        // A replaced kick fd (the old one closed) is picked up.
        drop(kick);
        let kick2 = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        kick2.write(1).expect("kick");
        let r = w
            .wait(done.as_raw_fd(), Some(kick2.as_raw_fd()), 5000)
            .expect("wait");
        assert!(r);
    }
}
