use std::io;

use kvcore::{GeometryError, RegionError, WireError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error("{op} with {peer}: {source}")]
    Io {
        op: &'static str,
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} with {peer} timed out after {secs:.1} s")]
    Timeout {
        op: &'static str,
        peer: String,
        secs: f64,
    },
    #[error("peer {0} is not known; load its metadata first")]
    UnknownPeer(String),
    #[error("peer {peer} refused the request: {message} (code {code})")]
    Remote {
        peer: String,
        code: u16,
        message: String,
    },
    #[error("authentication with {peer} failed: {reason}")]
    Auth { peer: String, reason: String },
    #[error("protocol version mismatch with {peer}: ours is {ours}, theirs is {theirs}")]
    Version {
        peer: String,
        ours: u16,
        theirs: u16,
    },
    #[error("unexpected message from {peer}: expected {expected}")]
    Unexpected {
        peer: String,
        expected: &'static str,
    },
    #[error("descriptor lists differ: {0}")]
    Descriptors(String),
    #[error("peer {peer} offers no transport we can use ({offered})")]
    NoTransport { peer: String, offered: String },
    #[error("region {0} is still in use by transfers")]
    Busy(u32),
    #[error("transport unavailable: {0}")]
    Unavailable(String),
    #[error("agent is shut down")]
    Shutdown,
    #[error("{0}")]
    Config(String),
}

/// Error codes carried in `Completion::Failed` frames.
pub mod code {
    pub const BAD_DESCRIPTOR: u16 = 1;
    pub const BAD_REQUEST: u16 = 2;
    pub const INTERNAL: u16 = 3;
}
