//! Sleeps a queue worker that has requests in flight until its I/O engine completes one or
//! the guest posts more, so that a request the guest adds meanwhile goes to the engine at
//! once instead of after the next completion.
//!
//! The queue's kick eventfd is watched edge-triggered and never read here: only
//! vhost-user-backend's worker loop reads it. That loop may have been told the kick was
//! readable (in the same `epoll_wait` batch as the event being handled now) and reads it
//! after this handler returns; a read that finds the count already taken fails with
//! EAGAIN, and the loop then ends the queue's thread for good, silently: the queue is
//! never served again (seen in CI: one queue of two stopped for the rest of the run).

use std::io;
use std::os::fd::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const COMPLETION: u64 = 0;
const KICK: u64 = 1;

/// One queue worker's epoll set: the engine's completion eventfd (level-triggered; the
/// engine's own, reset by the caller) and the queue's kick eventfd (edge-triggered: each
/// guest notification wakes a wait once, and the count is left for vhost-user-backend).
pub struct IoWaiter {
    epoll: Epoll,
    completion: Option<RawFd>,
    /// The kick fd registered, if any.
    kick: Option<RawFd>,
}

impl IoWaiter {
    /// An empty set.
    pub fn new() -> io::Result<IoWaiter> {
        Ok(IoWaiter {
            epoll: Epoll::new()?,
            completion: None,
            kick: None,
        })
    }

    /// Drops the kick registration; the next wait registers the kick fd it is given afresh.
    /// For a frontend that may have replaced the kick (a new connection, a reset ring): a
    /// new file under the number of the old would otherwise go unwatched.
    pub fn forget_kick(&mut self) {
        unwatch(&self.epoll, &mut self.kick);
    }

    /// Sleeps until `completion` is readable, `kick` (if given) is notified after it was
    /// registered, a signal or task work interrupts, or `timeout_ms` passes. True if a kick
    /// came. The kick's count is not read (see the module's doc).
    pub fn wait(
        &mut self,
        completion: RawFd,
        kick: Option<RawFd>,
        timeout_ms: i32,
    ) -> io::Result<bool> {
        watch(
            &self.epoll,
            &mut self.completion,
            completion,
            EventSet::IN,
            COMPLETION,
        )?;
        if let Some(k) = kick {
            watch(
                &self.epoll,
                &mut self.kick,
                k,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                KICK,
            )?;
        }
        let mut events = [EpollEvent::default(); 2];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => 0,
            Err(e) => return Err(e),
        };
        Ok(kick.is_some() && events.iter().take(n).any(|ev| ev.data() == KICK))
    }
}

/// Makes `fd` the one registered in `slot` (with `events`, reported as `data`), dropping
/// the one there before; nothing to do if it is already.
fn watch(
    epoll: &Epoll,
    slot: &mut Option<RawFd>,
    fd: RawFd,
    events: EventSet,
    data: u64,
) -> io::Result<()> {
    if *slot == Some(fd) {
        return Ok(());
    }
    unwatch(epoll, slot);
    match epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, data)) {
        Ok(()) => {}
        // Registered under this number before and not forgotten: the same file.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    *slot = Some(fd);
    Ok(())
}

/// Removes the registration in `slot`, if any (an fd closed since has lost it already).
fn unwatch(epoll: &Epoll, slot: &mut Option<RawFd>) {
    if let Some(old) = slot.take() {
        let _ = epoll.ctl(ControlOperation::Delete, old, EpollEvent::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn wakes_for_a_completion_or_a_new_kick_and_times_out_otherwise() {
        let done = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut w = IoWaiter::new().expect("epoll");
        let t = Instant::now();
        let r = w
            .wait(done.as_raw_fd(), Some(kick.as_raw_fd()), 50)
            .expect("wait");
        assert!(!r, "nothing is ready");
        assert!(t.elapsed() >= Duration::from_millis(40));
        kick.write(1).expect("kick");
        let r = w
            .wait(done.as_raw_fd(), Some(kick.as_raw_fd()), 5000)
            .expect("wait");
        assert!(r);
        done.write(1).expect("complete");
        let r = w
            .wait(done.as_raw_fd(), Some(kick.as_raw_fd()), 5000)
            .expect("wait");
        assert!(
            !r,
            "only the completion is ready: the kick was seen already"
        );
        done.read().expect("consume");
        // Not asked to watch the kick: a kick does not count.
        kick.write(1).expect("kick");
        let r = w.wait(done.as_raw_fd(), None, 50).expect("wait");
        assert!(!r);
        // A replaced kick fd (the old one closed) is picked up once forgotten.
        drop(kick);
        w.forget_kick();
        let kick2 = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        kick2.write(1).expect("kick");
        let r = w
            .wait(done.as_raw_fd(), Some(kick2.as_raw_fd()), 5000)
            .expect("wait");
        assert!(r);
    }

    /// The regression: vhost-user-backend's loop, told a kick was readable, reads it after
    /// this handler slept on it; the count must still be there (a failed read ends the
    /// queue's thread).
    #[test]
    fn a_kick_that_woke_the_wait_is_left_for_the_vhost_user_loop() {
        let done = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut w = IoWaiter::new().expect("epoll");
        kick.write(1).expect("kick");
        let t = Instant::now();
        assert!(w
            .wait(done.as_raw_fd(), Some(kick.as_raw_fd()), 5000)
            .expect("wait"));
        assert!(t.elapsed() < Duration::from_secs(4), "woke at once");
        // Seen once: the next wait sleeps until its timeout despite the unread count.
        let t = Instant::now();
        assert!(!w
            .wait(done.as_raw_fd(), Some(kick.as_raw_fd()), 50)
            .expect("wait"));
        assert!(t.elapsed() >= Duration::from_millis(40), "no busy wake-ups");
        // The loop's read finds the count (EventFd::read fails with EAGAIN on zero).
        assert_eq!(kick.read().expect("the kick is still readable"), 1);
        // A kick after the loop took the count wakes the next wait again.
        kick.write(1).expect("kick");
        assert!(w
            .wait(done.as_raw_fd(), Some(kick.as_raw_fd()), 5000)
            .expect("wait"));
    }
}
