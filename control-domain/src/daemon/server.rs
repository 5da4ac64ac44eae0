//! The control socket: accepts connections, checks each client's hello, reads its peer
//! credentials and serves its requests one after the other through [`super::api`]. A
//! connection that attached a console also sends guest input and gets output pushed by the
//! VM's console. No locks of its own.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_ipc::control::{ErrorCode, Reply, Request};
use bulkhead_ipc::hello::server_hello;
use bulkhead_ipc::runner::RunnerCommand;
use bulkhead_ipc::{Channel, IpcError, Listener};

use super::policy::{Action, Caller};
use super::vm::VmEntry;
use super::{fail, log, Daemon, Failure};

/// How long a client has for its hello.
const HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// How long a connection without a console may sit between requests before it is closed.
const IDLE_DEADLINE: Duration = Duration::from_secs(120);

/// How much console output may wait in a client's socket before the client is taken for
/// one that does not read and is cut off.
const CONSOLE_SEND_BUFFER: usize = 1 << 20;

impl Daemon {
    /// Serves clients on the socket forever.
    pub fn serve(self: &Arc<Self>) -> anyhow::Result<()> {
        use anyhow::Context;
        use std::os::unix::fs::PermissionsExt;
        if let Some(dir) = self.cfg.socket.parent().filter(|d| !d.exists()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            // Every user may reach the socket (the umask made the directory root's only).
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
        let listener = Listener::bind(&self.cfg.socket)
            .with_context(|| format!("listening on {}", self.cfg.socket.display()))?;
        // Anyone may connect; the policy decides what they may do.
        std::fs::set_permissions(&self.cfg.socket, std::fs::Permissions::from_mode(0o666))?;
        log(&format!("listening on {}", self.cfg.socket.display()));
        loop {
            match listener.accept() {
                Ok(ch) => {
                    // Admission happens here, before any thread or buffer is spent on the
                    // connection: a user over the limits is closed at once.
                    let uid = match ch.peer_credentials() {
                        Ok(c) => c.uid,
                        Err(e) => {
                            log(&format!("no peer credentials: {e}"));
                            continue;
                        }
                    };
                    let Ok(place) = self.connections.admit(uid) else {
                        continue;
                    };
                    let me = self.clone();
                    let _ = std::thread::Builder::new()
                        .name("client".into())
                        .spawn(move || {
                            me.serve_client(ch);
                            drop(place);
                        });
                }
                Err(e) => {
                    log(&format!("accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Serves one connection until it closes.
    fn serve_client(self: Arc<Self>, ch: Channel) {
        if let Err(e) = server_hello(&ch, HELLO_DEADLINE) {
            log(&format!("client refused: {e}"));
            return;
        }
        let caller = match ch
            .peer_credentials()
            .and_then(|c| Ok((c, ch.peer_groups()?)))
        {
            Ok((c, groups)) => Caller::from_peer(c.uid, c.gid, &groups),
            Err(e) => {
                log(&format!("no peer credentials: {e}"));
                return;
            }
        };
        let client_id = self.next_client.fetch_add(1, Ordering::SeqCst);
        let mut console: Option<Arc<VmEntry>> = None;
        loop {
            // A console client may sit silent for as long as it likes; any other
            // connection has a deadline for its next request.
            let next = match &console {
                Some(_) => ch.recv::<Request>(),
                None => ch.recv_timeout::<Request>(IDLE_DEADLINE),
            };
            let req = match next {
                Ok((req, fds)) => (req, fds),
                Err(IpcError::Closed) => break,
                Err(IpcError::Timeout) => {
                    let _ = ch.send(
                        &Reply::Error {
                            code: ErrorCode::Protocol,
                            message: format!(
                                "no request in {} s: connection closed",
                                IDLE_DEADLINE.as_secs()
                            ),
                        },
                        &[],
                    );
                    break;
                }
                Err(
                    e @ (IpcError::Decode(_)
                    | IpcError::Truncated
                    | IpcError::Oversized
                    | IpcError::TooManyFds),
                ) => {
                    let _ = ch.send(
                        &Reply::Error {
                            code: ErrorCode::Protocol,
                            message: format!("bad request frame: {e}"),
                        },
                        &[],
                    );
                    continue;
                }
                Err(_) => break,
            };
            let (req, fds) = req;
            let reply = match req {
                Request::Console { name } => {
                    match self.attach_console(&caller, &name, client_id, &ch) {
                        Ok(vm) => {
                            // `ConsoleAttached` was sent by the console itself.
                            console = Some(vm);
                            continue;
                        }
                        Err((code, message)) => Reply::Error { code, message },
                    }
                }
                Request::ConsoleInput { data } => match &console {
                    Some(vm) => {
                        let _ = vm.send(&RunnerCommand::ConsoleInput(data));
                        continue;
                    }
                    None => Reply::Error {
                        code: ErrorCode::WrongState,
                        message: "no console attached: send Console first".into(),
                    },
                },
                Request::ConsoleDetach => match console.take() {
                    Some(vm) => {
                        vm.console.unsubscribe(client_id);
                        Reply::ConsoleClosed {
                            reason: "detached".into(),
                        }
                    }
                    None => Reply::Error {
                        code: ErrorCode::WrongState,
                        message: "no console attached".into(),
                    },
                },
                other => match self.handle(&caller, other, fds) {
                    Ok(r) => r,
                    Err((code, message)) => Reply::Error { code, message },
                },
            };
            if ch.send(&reply, &[]).is_err() {
                break;
            }
        }
        if let Some(vm) = console {
            vm.console.unsubscribe(client_id);
        }
    }

    /// Attaches connection `client_id` to `name`'s console (the console sends it the
    /// history); returns the VM.
    fn attach_console(
        &self,
        caller: &Caller,
        name: &str,
        client_id: u64,
        ch: &Channel,
    ) -> Result<Arc<VmEntry>, Failure> {
        let vm = self.find(caller, name, Action::Console)?;
        if !vm.is_live() {
            return Err(fail(
                ErrorCode::WrongState,
                format!("VM '{name}' is not running"),
            ));
        }
        let sender = ch
            .try_clone()
            .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?;
        // Room for a few seconds of a chatty guest's output, so a client that is merely
        // slow for a moment (a loaded host) is not taken for one that does not read.
        let _ = sender.set_send_buffer(CONSOLE_SEND_BUFFER);
        vm.console
            .subscribe(client_id, sender)
            .map_err(|e| fail(ErrorCode::Internal, format!("console: {e}")))?;
        Ok(vm)
    }
}
