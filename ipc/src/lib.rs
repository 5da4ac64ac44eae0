//! The wire protocol between the CLI, `bulkheadd`, runners and backends.
//!
//! Every connection is a `SOCK_SEQPACKET` unix socket ([`Channel`]), so message boundaries
//! are kept by the kernel: one datagram is one frame, a 4-byte little-endian payload length
//! followed by a `postcard`-encoded message of at most [`transport::MAX_FRAME`] bytes, with
//! up to [`transport::MAX_FDS`] file descriptors passed alongside as `SCM_RIGHTS`. Every
//! connection opens with the versioned handshake in [`hello`]; then the messages of
//! [`control`] (CLI ↔ `bulkheadd`) or [`runner`] (`bulkheadd` ↔ runner) follow. Anything
//! malformed that arrives is an [`IpcError`], never a panic.

pub mod control;
pub mod devstats;
pub mod hello;
pub mod runner;
pub mod transport;

pub use hello::{Role, PROTOCOL_VERSION};
pub use transport::{Channel, Credentials, IpcError, Listener};
