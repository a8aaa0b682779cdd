//! The NVMe store's submission queue, in two lanes: reads (a request waiting on them, vLLM
//! onboarding from G3) are taken before writes (spills, which only make room). Each lane is
//! bounded on its own, so a backlog of spills never holds a read back, nor blocks its
//! submitter.

use crossbeam_channel::{bounded, select, Receiver, Sender, TryRecvError, TrySendError};

use crate::nvme::{IoOp, IoRequest};

/// The submitting side.
pub(crate) struct LaneTx {
    reads: Sender<IoRequest>,
    writes: Sender<IoRequest>,
}

/// The serving side (cloned by each I/O thread of the thread-pool backend).
#[derive(Clone)]
pub(crate) struct LaneRx {
    reads: Receiver<IoRequest>,
    writes: Receiver<IoRequest>,
}

/// Both lanes, each holding up to `depth` requests.
pub(crate) fn lanes(depth: usize) -> (LaneTx, LaneRx) {
    let (rt, rr) = bounded(depth);
    let (wt, wr) = bounded(depth);
    (
        LaneTx {
            reads: rt,
            writes: wt,
        },
        LaneRx {
            reads: rr,
            writes: wr,
        },
    )
}

impl LaneTx {
    /// Queues a request in its lane; blocks while that lane is full (back-pressure). Fails
    /// once the serving side is gone.
    pub fn send(&self, req: IoRequest) -> Result<(), IoRequest> {
        let lane = match req.op {
            IoOp::Read => &self.reads,
            IoOp::Write => &self.writes,
        };
        lane.send(req).map_err(|e| e.into_inner())
    }

    /// Queues a request in its lane if it has room, never waiting: a stalled disk must not
    /// stall the tier engine's driver, which keeps what a full lane refuses and tries again.
    pub fn try_send(&self, req: IoRequest) -> Result<(), TrySendError<IoRequest>> {
        match req.op {
            IoOp::Read => self.reads.try_send(req),
            IoOp::Write => self.writes.try_send(req),
        }
    }
}

impl LaneRx {
    /// The next request without waiting, reads first; `Disconnected` once both lanes are closed
    /// and drained.
    pub fn try_recv(&self) -> Result<IoRequest, TryRecvError> {
        match self.reads.try_recv() {
            Ok(r) => return Ok(r),
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => {
                return self.writes.try_recv();
            }
        }
        match self.writes.try_recv() {
            Err(TryRecvError::Disconnected) => Err(TryRecvError::Empty),
            r => r,
        }
    }

    /// The next request, waiting for one; `None` once both lanes are closed and drained.
    pub fn recv(&self) -> Option<IoRequest> {
        match self.try_recv() {
            Ok(r) => return Some(r),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {}
        }
        // Both empty: wait for either. A closed lane (both close together, with the store's
        // sender) leaves the other to drain.
        select! {
            recv(self.reads) -> r => match r {
                Ok(r) => Some(r),
                Err(_) => self.writes.recv().ok(),
            },
            recv(self.writes) -> w => match w {
                Ok(w) => Some(w),
                Err(_) => self.reads.recv().ok(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: IoOp, tag: u64) -> IoRequest {
        IoRequest {
            op,
            slot: tag,
            buf: 0,
            tag,
        }
    }

    #[test]
    fn a_read_queued_behind_writes_is_served_first() {
        let (tx, rx) = lanes(8);
        for t in 0..4 {
            assert!(tx.send(req(IoOp::Write, t)).is_ok());
        }
        assert!(tx.send(req(IoOp::Read, 9)).is_ok());
        let order: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| r.tag)
            .collect();
        assert_eq!(order, vec![9, 0, 1, 2, 3]);
    }

    #[test]
    fn a_full_write_lane_does_not_hold_a_read_back() {
        let (tx, rx) = lanes(2);
        assert!(tx.send(req(IoOp::Write, 1)).is_ok());
        assert!(tx.send(req(IoOp::Write, 2)).is_ok());
        // The write lane is full; a read still goes in at once, and comes out first.
        assert!(tx.send(req(IoOp::Read, 3)).is_ok());
        assert_eq!(rx.recv().map(|r| r.tag), Some(3));
    }

    #[test]
    fn a_full_lane_refuses_without_waiting_and_the_other_still_takes() {
        let (tx, rx) = lanes(1);
        assert!(tx.try_send(req(IoOp::Write, 1)).is_ok());
        match tx.try_send(req(IoOp::Write, 2)) {
            Err(TrySendError::Full(r)) => assert_eq!(r.tag, 2),
            other => panic!("{other:?}"),
        }
        assert!(tx.try_send(req(IoOp::Read, 3)).is_ok());
        drop(rx);
        assert!(matches!(
            tx.try_send(req(IoOp::Read, 4)),
            Err(TrySendError::Disconnected(_))
        ));
    }

    #[test]
    fn closed_lanes_drain_then_end() {
        let (tx, rx) = lanes(4);
        assert!(tx.send(req(IoOp::Write, 1)).is_ok());
        assert!(tx.send(req(IoOp::Read, 2)).is_ok());
        drop(tx);
        assert_eq!(rx.recv().map(|r| r.tag), Some(2));
        assert_eq!(rx.recv().map(|r| r.tag), Some(1));
        assert!(rx.recv().is_none());
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
    }
}
