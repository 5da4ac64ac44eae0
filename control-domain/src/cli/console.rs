//! `bulkhead console`: attach to a VM's serial console.
//!
//! On a terminal, the history the daemon kept is cut to the last screenful (the terminal's
//! height, from its window size), so a reattach shows what a screen showed, not 64 KiB.
//! The main thread streams [`Reply::ConsoleOutput`] to stdout; a second thread, on its own
//! handle of the socket ([`Channel::try_clone`]), forwards stdin as
//! [`Request::ConsoleInput`] and turns Ctrl-] (0x1d) into [`Request::ConsoleDetach`]. A
//! terminal on stdin is put in raw mode by [`RawMode`], restored when it drops (every
//! return path, errors included) and by a signal handler if SIGINT, SIGTERM, SIGHUP or
//! SIGQUIT ends the process first.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_ipc::control::{Reply, Request};
use bulkhead_ipc::{Channel, IpcError};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

use super::{connect, one_line, recv_reply, send, Failure, Streams, REPLY_TIMEOUT};

/// The byte that detaches: Ctrl-], as in `xl console`, `virsh console` and telnet.
pub const DETACH_BYTE: u8 = 0x1d;

/// How often the output loop looks up from waiting to see whether input asked to detach.
const POLL: Duration = Duration::from_millis(200);

/// How long to wait for `ConsoleClosed` after sending `ConsoleDetach`.
const DETACH_WAIT: Duration = Duration::from_secs(5);

/// Attach to `name`'s console through the daemon at `socket` and run the session.
pub fn attach(socket: &Path, name: &str, io: &mut Streams<'_>) -> Result<(), Failure> {
    let ch = connect(socket)?;
    send(
        &ch,
        &Request::Console {
            name: name.to_owned(),
        },
    )?;
    let history = match recv_reply(&ch, REPLY_TIMEOUT)? {
        Reply::ConsoleAttached { history } => history,
        other => return Err(Failure::unexpected("console", &other)),
    };
    let history = if io.stdin_is_tty {
        match terminal_rows() {
            Some(rows) => last_screenful(&history, rows).to_vec(),
            None => history,
        }
    } else {
        history
    };
    let raw = if io.stdin_is_tty {
        let _ = writeln!(
            io.stderr,
            "[attached to {}; detach with Ctrl-]]",
            one_line(name)
        );
        let _ = io.stderr.flush();
        Some(RawMode::enter()?)
    } else {
        None
    };
    let result = session(&ch, history, io);
    drop(raw);
    match result? {
        End::Closed(reason) => {
            let _ = write!(io.stderr, "\r\n[console closed: {}]\r\n", one_line(&reason));
        }
        End::Detached => {
            let _ = write!(io.stderr, "\r\n[detached]\r\n");
        }
    }
    let _ = io.stderr.flush();
    Ok(())
}

/// The height of the terminal on stdin, if it is one and says.
fn terminal_rows() -> Option<usize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `ws`, which lives across the call.
    let r = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some(usize::from(ws.ws_row))
}

/// The end of `history` that fills a screen of `rows` lines: the last `rows - 1` complete
/// lines and the unfinished line after them (where the cursor is).
pub fn last_screenful(history: &[u8], rows: usize) -> &[u8] {
    let mut newlines = 0;
    for (i, b) in history.iter().enumerate().rev() {
        if *b == b'\n' {
            newlines += 1;
            if newlines >= rows {
                return history.get(i + 1..).unwrap_or_default();
            }
        }
    }
    history
}

/// How a session ended well.
enum End {
    /// The daemon closed the console, for this reason.
    Closed(String),
    /// We detached and the daemon did not confirm in time.
    Detached,
}

/// Stream output until the console closes; input goes on another thread.
fn session(ch: &Channel, history: Vec<u8>, io: &mut Streams<'_>) -> Result<End, Failure> {
    output(io.stdout, &history)?;
    let detached = Arc::new(AtomicBool::new(false));
    if let Some(input) = io.stdin.take() {
        let tx = ch
            .try_clone()
            .map_err(|e| Failure::new(format!("cannot forward console input: {e}")))?;
        let flag = Arc::clone(&detached);
        std::thread::Builder::new()
            .name("console-input".into())
            .spawn(move || pump_input(input, &tx, &flag))
            .map_err(|e| Failure::new(format!("cannot start the console input thread: {e}")))?;
        // Not joined: it may be blocked reading stdin; it ends with the process.
    }
    let mut deadline: Option<Instant> = None;
    loop {
        match ch.recv_timeout::<Reply>(POLL) {
            Ok((Reply::ConsoleOutput { data }, _fds)) => output(io.stdout, &data)?,
            Ok((Reply::ConsoleClosed { reason }, _fds)) => return Ok(End::Closed(reason)),
            Ok((Reply::Error { code, message }, _fds)) => {
                return Err(Failure::from_reply(code, &message))
            }
            Ok((other, _fds)) => return Err(Failure::unexpected("console", &other)),
            Err(IpcError::Timeout) => {}
            Err(IpcError::Closed) => {
                return Err(Failure::new("bulkheadd closed the console connection"))
            }
            Err(e) => return Err(Failure::new(format!("console connection failed: {e}"))),
        }
        if detached.load(Ordering::SeqCst) {
            let d = *deadline.get_or_insert_with(|| Instant::now() + DETACH_WAIT);
            if Instant::now() >= d {
                return Ok(End::Detached);
            }
        }
    }
}

fn output(out: &mut dyn Write, data: &[u8]) -> Result<(), Failure> {
    out.write_all(data)
        .and_then(|()| out.flush())
        .map_err(|e| Failure::stdout(&e))
}

/// Forward `input` to the console until it ends, a send fails, or Ctrl-] detaches (then
/// `detached` is set).
fn pump_input(mut input: Box<dyn Read + Send>, tx: &Channel, detached: &AtomicBool) {
    let mut buf = [0u8; 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let chunk = buf.get(..n).unwrap_or_default();
        let (keys, detach) = match chunk.iter().position(|&b| b == DETACH_BYTE) {
            Some(i) => (chunk.get(..i).unwrap_or_default(), true),
            None => (chunk, false),
        };
        if !keys.is_empty()
            && tx
                .send(
                    &Request::ConsoleInput {
                        data: keys.to_vec(),
                    },
                    &[],
                )
                .is_err()
        {
            return;
        }
        if detach {
            detached.store(true, Ordering::SeqCst);
            let _ = tx.send(&Request::ConsoleDetach, &[]);
            return;
        }
    }
}

/// The terminal settings to restore from a signal handler; null when no [`RawMode`] is
/// active. Points at a leaked `termios` so a handler running at any moment reads valid
/// memory.
static SAVED: AtomicPtr<libc::termios> = AtomicPtr::new(std::ptr::null_mut());

/// The signals that would end the process while the terminal is raw.
const SIGNALS: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Restore the terminal, then die of `sig` as if we had not caught it.
extern "C" fn restore_and_die(sig: libc::c_int) {
    let saved = SAVED.load(Ordering::SeqCst);
    if !saved.is_null() {
        // SAFETY: `saved` points at a termios leaked by `RawMode::enter`, never freed;
        // tcsetattr is async-signal-safe.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
    // SAFETY: signal and raise are async-signal-safe; with the default action restored,
    // the re-raised signal (delivered when this handler returns) ends the process.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Stdin (a terminal) in raw mode, so every key reaches the guest; restored on drop.
pub struct RawMode {
    saved: Termios,
    old_actions: Vec<(Signal, SigAction)>,
}

impl RawMode {
    /// Put the terminal on stdin in raw mode (output post-processing kept, so a guest's
    /// bare `\n` still starts a new line) and install the restoring signal handlers.
    pub fn enter() -> Result<RawMode, Failure> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)
            .map_err(|e| Failure::new(format!("cannot read the terminal's settings: {e}")))?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        raw.output_flags = saved.output_flags;
        // Publish the settings before any handler can run. The old value (from an earlier
        // session) is leaked on purpose: a handler might still be reading it.
        let published = Box::into_raw(Box::new(libc::termios::from(saved.clone())));
        SAVED.store(published, Ordering::SeqCst);
        let mut mode = RawMode {
            saved,
            old_actions: Vec::new(),
        };
        let action = SigAction::new(
            SigHandler::Handler(restore_and_die),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in SIGNALS {
            // SAFETY: `restore_and_die` only calls async-signal-safe functions (an atomic
            // load, tcsetattr, signal, raise).
            match unsafe { sigaction(sig, &action) } {
                Ok(old) => mode.old_actions.push((sig, old)),
                Err(e) => return Err(Failure::new(format!("cannot install a {sig} handler: {e}"))),
            }
        }
        tcsetattr(&stdin, SetArg::TCSANOW, &raw)
            .map_err(|e| Failure::new(format!("cannot put the terminal in raw mode: {e}")))?;
        Ok(mode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
        for (sig, old) in self.old_actions.drain(..).rev() {
            // SAFETY: puts back the action that was installed before `enter`.
            let _ = unsafe { sigaction(sig, &old) };
        }
        SAVED.store(std::ptr::null_mut(), Ordering::SeqCst);
    }
}

#[cfg(test)]
mod screen_tests {
    use super::last_screenful;

    #[test]
    fn last_screenful_keeps_the_last_rows_lines() {
        let h = b"one\r\ntwo\r\nthree\r\nfour\r\nprompt# ";
        assert_eq!(last_screenful(h, 3), b"three\r\nfour\r\nprompt# ");
        assert_eq!(last_screenful(h, 1), b"prompt# ");
        assert_eq!(last_screenful(h, 50), &h[..]);
        assert_eq!(last_screenful(b"a\nb\n", 2), b"b\n");
        assert_eq!(last_screenful(b"", 24), b"");
    }
}
