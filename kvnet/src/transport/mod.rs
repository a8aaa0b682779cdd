//! What every transport does for the agent, and the transfer it is handed. A transport has its
//! own state (UCX its worker, endpoints and mappings; TCP its connection pools) and reaches our
//! memory only through the [`Hold`] inside a [`Transfer`]: it owns the transfer, and with it the
//! right to touch that memory, until it calls [`Transfer::finish`] — or, when it can no longer
//! tell whether the memory is still being touched, [`Transfer::abandon`], which never gives the
//! memory back. The agent composes transports; no transport knows the agent or another one.
//!
//! Connecting is each transport's own business (UCX endpoints are made on first use, TCP
//! connections come from the side channel's handshake), and completion is pushed, not polled:
//! both transports progress on their own threads and finish transfers as they complete.

mod kind;

use std::sync::Arc;
use std::time::Duration;

use kvcore::wire::Op;
use kvcore::{Descriptor, Region, RegionId};

pub use kind::TransportKind;

use crate::error::NetError;
use crate::peers::Peer;
use crate::registry::Hold;

pub type TransferId = u64;

#[derive(Debug)]
pub struct TransferDone {
    pub id: TransferId,
    /// Bytes moved, or why the transfer failed.
    pub result: Result<u64, NetError>,
}

/// A transfer a transport would not start, and why.
pub(crate) type Refused = Box<(NetError, Transfer)>;

type Done = Box<dyn FnOnce(Result<u64, NetError>) + Send + Sync>;

/// One posted READ or WRITE, owned by the transport carrying it.
pub(crate) struct Transfer {
    pub id: TransferId,
    pub op: Op,
    pub peer: Arc<Peer>,
    /// Checked against the peer's regions when posted.
    pub remote: Vec<Descriptor>,
    pub notification: Option<Vec<u8>>,
    /// Shared with the pieces of the transfer that run apart (the TCP transport's parts): the
    /// memory is given back when the last of them let go, never while one may touch it.
    hold: Option<Arc<Hold>>,
    done: Option<Done>,
}

impl Transfer {
    pub fn new(
        id: TransferId,
        op: Op,
        peer: Arc<Peer>,
        hold: Hold,
        remote: Vec<Descriptor>,
        notification: Option<Vec<u8>>,
        done: Done,
    ) -> Transfer {
        Transfer {
            id,
            op,
            peer,
            remote,
            notification,
            hold: Some(Arc::new(hold)),
            done: Some(done),
        }
    }

    /// Our side's memory, resolved (one entry per remote descriptor, pairwise).
    pub fn local(&self) -> &[kvcore::Resolved] {
        self.hold.as_deref().map_or(&[], |h| h.resolved())
    }

    /// A share of the hold, for a piece of the transfer that runs on its own (it keeps the
    /// memory held until it is dropped, whatever happens to the transfer).
    pub fn share_hold(&self) -> Option<Arc<Hold>> {
        self.hold.clone()
    }

    pub fn bytes(&self) -> u64 {
        self.local().iter().map(|r| r.len).sum()
    }

    /// The transport no longer touches the memory: the hold is released, then the result
    /// reported.
    pub fn finish(mut self, result: Result<u64, NetError>) {
        drop(self.hold.take());
        if let Some(done) = self.done.take() {
            done(result);
        }
    }

    /// The result is reported but the memory never given back (something may still write it).
    pub fn abandon(mut self, result: Result<u64, NetError>) {
        if let Some(h) = self.hold.take() {
            // One share never dropped: the hold lives for ever.
            std::mem::forget(h);
        }
        if let Some(done) = self.done.take() {
            done(result);
        }
    }

    /// Never started: the hold is released and nothing is reported (the poster returns the
    /// error instead).
    pub fn cancel(mut self) {
        drop(self.hold.take());
        self.done = None;
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        // Dropped without an ending (a transport shut down under it): whoever dropped it may
        // have left an operation on the memory, so the hold is leaked, not released.
        if let Some(h) = self.hold.take() {
            std::mem::forget(h);
        }
        if let Some(done) = self.done.take() {
            done(Err(NetError::Shutdown));
        }
    }
}

pub(crate) trait Transport: Send + Sync {
    fn kind(&self) -> TransportKind;

    /// Makes a registered region reachable by peers; the key they must present, if any. It runs
    /// before the region is visible to anyone.
    fn map(&self, id: RegionId, region: &Region) -> Result<Option<Vec<u8>>, NetError>;

    /// Makes a region unreachable, and returns only when it is (or fails: the memory must then
    /// be kept).
    fn unmap(&self, id: RegionId, timeout: Duration) -> Result<(), NetError>;

    /// Whether this transport can carry transfers to `p`.
    fn reaches(&self, p: &Peer) -> bool;

    /// Starts a transfer, which it owns from now on; a transfer it refuses to start comes back
    /// with the reason.
    fn post(&self, t: Transfer) -> Result<(), Refused>;

    /// Delivers a notification to `p` (waits until it was handed to the network).
    fn notify(&self, p: &Arc<Peer>, payload: Vec<u8>) -> Result<(), NetError>;

    /// Lets go of what it keeps for `peer` (endpoints, connections) once no transfer uses it.
    fn close(&self, peer: &str);
}
