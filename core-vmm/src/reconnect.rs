//! Reconnecting a vhost-user device whose backend went away, in one place: a watcher thread
//! notices the socket closing and, for backends reached by path (standalone use, e.g.
//! qemu-storage-daemon), connects again with a growing back-off — with no give-up timeout —
//! and replays the setup through [`crate::virtio_pci::reconnect`]. Under `bulkheadd` the
//! control domain respawns the backend and hands the runner the new connection instead.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::virtio_pci::VhostUserPciDevice;

/// Blocks until `sock`'s peer has closed (or the socket failed).
pub fn wait_for_hangup(sock: &UnixStream) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(n) if n > 0 => {
                let ev = fds[0].revents().unwrap_or(PollFlags::empty());
                if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                    return;
                }
                // Readable: EOF, or a reply the device's own thread is about to read (the
                // watcher shares the socket). Peek: only EOF or a real error is a hang-up;
                // EAGAIN means that thread took the reply first.
                let mut b = [0u8; 1];
                match nix::sys::socket::recv(
                    std::os::fd::AsRawFd::as_raw_fd(sock),
                    &mut b,
                    nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(0) => return,
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                    Err(_) => return,
                    Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// Watches `dev`'s backend and reconnects to `path` whenever it goes away.
pub fn watch_by_path(dev: Arc<Mutex<VhostUserPciDevice>>, path: PathBuf) {
    let _ = std::thread::Builder::new()
        .name("reconnect".into())
        .spawn(move || loop {
            let (name, watch) = {
                let d = dev.lock().unwrap_or_else(|e| e.into_inner());
                (d.name().to_string(), d.watch_socket())
            };
            let Ok(watch) = watch else {
                return;
            };
            wait_for_hangup(&watch);
            // Make sure the old connection is closed before a new one is made: a standalone
            // backend serves one frontend at a time, and would never answer the new
            // connection while we held the old one.
            let _ = watch.shutdown(std::net::Shutdown::Both);
            eprintln!(
            "bulkhead-runner: {name}: backend went away; reconnecting to {} (I/O waits meanwhile)",
            path.display()
        );
            let mut delay = Duration::from_millis(20);
            loop {
                if let Ok(stream) = UnixStream::connect(&path) {
                    let r = crate::virtio_pci::reconnect(&dev, stream);
                    match r {
                        Ok(()) => break,
                        Err(e) => {
                            eprintln!("bulkhead-runner: {name}: reconnect failed: {e}; retrying")
                        }
                    }
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        });
}
