//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, ControlMessage, MsgFlags};

/// A pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().expect("pipe")
}

/// Send raw bytes as one datagram on `fd`, bypassing the framing, with `fds` attached.
pub fn raw_send(fd: RawFd, bytes: &[u8], fds: &[RawFd]) {
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let n = socket::sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).expect("sendmsg");
    assert_eq!(n, bytes.len());
}

/// A frame with a correct header around `payload`.
pub fn framed(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Write `msg` into `w` (a received pipe write end) and check it comes out of `r`.
pub fn check_pipe(w: OwnedFd, r: &OwnedFd, msg: &[u8]) {
    let mut wf = File::from(w);
    wf.write_all(msg).expect("write through received fd");
    drop(wf);
    let mut rf = File::from(r.try_clone().expect("dup"));
    let mut buf = vec![0u8; msg.len()];
    rf.read_exact(&mut buf).expect("read pipe");
    assert_eq!(buf, msg);
}

/// True if every write end of the pipe whose read end is `r` has been closed (the read end
/// reports hang-up), waiting up to a second.
pub fn all_writers_closed(r: BorrowedFd<'_>) -> bool {
    let mut pfd = [PollFd::new(r, PollFlags::POLLIN)];
    match poll(&mut pfd, PollTimeout::from(1000u16)) {
        Ok(0) => false,
        Ok(_) => pfd[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        Err(e) => panic!("poll: {e}"),
    }
}

/// Borrow a slice of owned fds.
pub fn borrow(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

/// Raw fds of a slice of owned fds.
pub fn raw(fds: &[OwnedFd]) -> Vec<RawFd> {
    fds.iter().map(|f| f.as_raw_fd()).collect()
}

pub const SHORT: Duration = Duration::from_secs(5);
