//! The versioned handshake that opens every connection.
//!
//! The client sends a [`Hello`]; the server answers [`HelloReply::Welcome`] or
//! [`HelloReply::Refused`] (with a reason for people) and, if refused, drops the
//! connection. The server reads the magic and version before the rest, so a client of a
//! later version whose `Hello` has grown fields is still told which version it needs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::transport::{decode, Channel, IpcError, Result};

/// The protocol version this build speaks (2: runner requests carry ids, `RunnerRequest`).
pub const PROTOCOL_VERSION: u16 = 2;

/// The first bytes of every [`Hello`].
pub const MAGIC: [u8; 8] = *b"BULKHEAD";

/// Which kind of program is connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// The `bulkhead` CLI (or another management client).
    Cli,
    /// `bulkheadd`.
    Daemon,
    /// A per-VM runner.
    Runner,
    /// A device backend.
    Backend,
}

/// The first frame a client sends. New fields may only be appended, and only with a new
/// [`PROTOCOL_VERSION`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// The client's [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Who is connecting.
    pub role: Role,
}

impl Hello {
    /// This build's hello for `role`.
    pub fn new(role: Role) -> Hello {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            role,
        }
    }
}

/// The server's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Accepted; requests may follow.
    Welcome {
        /// The server's protocol version (equal to the client's).
        version: u16,
    },
    /// Refused; the server closes the connection.
    Refused {
        /// The server's protocol version.
        server_version: u16,
        /// Why, for people.
        reason: String,
    },
}

/// The part of [`Hello`] that every version shares. postcard encodes struct fields in
/// order, so this decodes from the front of any version's hello.
#[derive(Deserialize)]
struct HelloPrefix {
    magic: [u8; 8],
    version: u16,
}

/// Open a connection as a client: send our hello as `role`, wait up to `timeout` for the
/// answer.
///
/// Errors: [`IpcError::Refused`] if the server refused (its reason inside),
/// [`IpcError::VersionMismatch`] if it welcomed us with another version, or the transport
/// error.
pub fn client_hello(ch: &Channel, role: Role, timeout: Duration) -> Result<()> {
    ch.send(&Hello::new(role), &[])?;
    let (reply, _fds) = ch.recv_timeout::<HelloReply>(timeout)?;
    match reply {
        HelloReply::Welcome { version } if version == PROTOCOL_VERSION => Ok(()),
        HelloReply::Welcome { version } => Err(IpcError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        }),
        HelloReply::Refused {
            server_version,
            reason,
        } => Err(IpcError::Refused {
            reason,
            server_version,
        }),
    }
}

/// Open a connection as a server: read the client's hello (waiting up to `timeout`),
/// answer it, and return the client's role.
///
/// A first frame that is not a valid hello with the right magic is answered with
/// `Refused` and returns [`IpcError::BadHello`]; a hello of another version is answered
/// with `Refused` and returns [`IpcError::VersionMismatch`]. Timeouts and a closed
/// connection are returned as they are. The caller should drop the channel on any error.
pub fn server_hello(ch: &Channel, timeout: Duration) -> Result<Role> {
    let payload = match ch.recv_raw_timeout(timeout) {
        // Descriptors with a hello mean nothing; they close here.
        Ok((payload, _fds)) => payload,
        Err(e @ (IpcError::Oversized | IpcError::Truncated | IpcError::TooManyFds)) => {
            refuse(ch, &format!("not a Bulkhead client: bad first frame ({e})"));
            return Err(IpcError::BadHello);
        }
        Err(e) => return Err(e),
    };
    let prefix = match postcard::take_from_bytes::<HelloPrefix>(&payload) {
        Ok((prefix, _rest)) if prefix.magic == MAGIC => prefix,
        _ => {
            refuse(
                ch,
                "not a Bulkhead client: the first frame is not a Bulkhead hello",
            );
            return Err(IpcError::BadHello);
        }
    };
    if prefix.version != PROTOCOL_VERSION {
        refuse(
            ch,
            &format!(
                "protocol version {} is not supported; this bulkheadd speaks version {}",
                prefix.version, PROTOCOL_VERSION
            ),
        );
        return Err(IpcError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: prefix.version,
        });
    }
    let hello = match decode::<Hello>(&payload) {
        Ok(hello) => hello,
        Err(e) => {
            refuse(ch, &format!("not a Bulkhead client: malformed hello ({e})"));
            return Err(IpcError::BadHello);
        }
    };
    ch.send(
        &HelloReply::Welcome {
            version: PROTOCOL_VERSION,
        },
        &[],
    )?;
    Ok(hello.role)
}

/// Tell the client why; it may already be gone, which changes nothing.
fn refuse(ch: &Channel, reason: &str) {
    let _ = ch.send(
        &HelloReply::Refused {
            server_version: PROTOCOL_VERSION,
            reason: reason.to_owned(),
        },
        &[],
    );
}
