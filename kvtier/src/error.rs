use std::io;

use kvcore::{LayoutError, PlanError, RegionError, SlotError};
use thiserror::Error;

/// Errors of copy engines.
#[derive(Debug, Error)]
pub enum CopyError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("copy pair {index}: source is {src} bytes but destination is {dst}")]
    LengthMismatch { index: usize, src: u64, dst: u64 },
    #[error("copy pair {index}: source and destination overlap")]
    Overlap { index: usize },
    #[error("{engine} cannot reach {kind} memory")]
    Unreachable { engine: &'static str, kind: String },
    /// No usable GPU: no driver, no such device, or the driver refused to start.
    #[error("no GPU: {0}")]
    NoGpu(String),
    #[error("copy engine is shut down")]
    Shutdown,
    #[error("copy engine failed: {0}")]
    Failed(String),
}

/// Errors of the tier engine and its stores. Each names what failed so the caller can recompute.
#[derive(Debug, Error)]
pub enum TierError {
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("slot {slot}: {source}")]
    Slot {
        slot: u64,
        #[source]
        source: SlotError,
    },
    #[error("{op} on {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("short {op} at slot {slot}: {done} of {want} bytes")]
    ShortIo {
        op: &'static str,
        slot: u64,
        done: u64,
        want: u64,
    },
    #[error("not enough space in {path}: the store needs {need} bytes, {have} are free")]
    NoSpace { path: String, need: u64, have: u64 },
    #[error("block {0} is not cached in any tier")]
    Miss(String),
    #[error("the {tier} tier has no free slot (all {slots} are in use and none can be evicted)")]
    Full { tier: &'static str, slots: u64 },
    #[error("queue is full ({0} requests in flight); retry later")]
    Busy(usize),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("tier engine is shut down")]
    Shutdown,
    /// A G3 read or write past its deadline; G3 is out of service from then on.
    #[error("G3 {op} of slot {slot} did not finish within {after:?}")]
    Timeout {
        op: &'static str,
        slot: u64,
        after: std::time::Duration,
    },
    #[error("G3 is out of service: {0}")]
    OutOfService(String),
}

impl TierError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: io::Error) -> TierError {
        TierError::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}
