//! G3's health: a deadline on every NVMe operation, the operations a full queue refused (kept
//! in order, never blocking the driver), and when the disk is taken out of service.
//!
//! A disk that stalls must not stall the engine: the driver never waits on the store's queue
//! (a refused request waits here, and goes again when an operation completes), and an operation
//! past its deadline is failed to its callers (who recompute) while the memory it names stays
//! the kernel's until the store reports it done, however late. A disk that fails again and again,
//! or stalls once, is taken out of service until restart: new spills and reads stop, G2 and
//! recompute serve, and the engine says so once in its log and in its stats.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::error::TierError;
use crate::nvme::{IoOp, IoRequest};

pub(crate) struct G3Health {
    timeout: Duration,
    fail_limit: u32,
    /// Disk failures in a row (an I/O error, a short transfer), reset by a success.
    streak: u32,
    /// Why G3 was taken out of service, once it was.
    out: Option<String>,
    /// When each operation not yet done was queued.
    since: HashMap<u64, Instant>,
    /// Requests the store's queue refused (full), oldest first.
    backlog: VecDeque<IoRequest>,
    pub timeouts: u64,
}

impl G3Health {
    pub fn new(timeout: Duration, fail_limit: u32) -> G3Health {
        G3Health {
            timeout,
            fail_limit: fail_limit.max(1),
            streak: 0,
            out: None,
            since: HashMap::new(),
            backlog: VecDeque::new(),
            timeouts: 0,
        }
    }

    pub fn in_service(&self) -> bool {
        self.out.is_none()
    }

    pub fn out_of_service(&self) -> Option<&str> {
        self.out.as_deref()
    }

    /// Operation `op` was queued now.
    pub fn started(&mut self, op: u64, now: Instant) {
        self.since.insert(op, now);
    }

    /// Operation `op` is done (or abandoned); it has no deadline any more.
    pub fn finished(&mut self, op: u64) {
        self.since.remove(&op);
    }

    /// The outcome of an operation the disk carried out. A slot that fails its checks is the
    /// slot's fault, not the disk's: only I/O errors and short transfers count. Returns why G3
    /// goes out of service now, when this failure makes `fail_limit` in a row.
    pub fn record(&mut self, result: &Result<(), TierError>) -> Option<String> {
        match result {
            Ok(()) => {
                self.streak = 0;
                None
            }
            Err(e @ (TierError::Io { .. } | TierError::ShortIo { .. })) => {
                self.streak += 1;
                (self.streak >= self.fail_limit && self.out.is_none())
                    .then(|| format!("{} I/O errors in a row, the last: {e}", self.streak))
            }
            Err(_) => None,
        }
    }

    /// Marks G3 out of service; true the first time.
    pub fn take_out(&mut self, why: String) -> bool {
        if self.out.is_some() {
            return false;
        }
        self.out = Some(why);
        true
    }

    /// The operations past their deadline at `now`, no longer tracked.
    pub fn expired(&mut self, now: Instant) -> Vec<u64> {
        let timeout = self.timeout;
        let late: Vec<u64> = self
            .since
            .iter()
            .filter(|(_, t)| now.duration_since(**t) > timeout)
            .map(|(op, _)| *op)
            .collect();
        for op in &late {
            self.since.remove(op);
        }
        self.timeouts += late.len() as u64;
        late
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A request the store's queue refused: it goes again when an operation completes.
    pub fn defer(&mut self, req: IoRequest) {
        self.backlog.push_back(req);
    }

    /// Removes operation `op` from the backlog, if it waits there (it never reached the disk).
    pub fn unqueue(&mut self, op: u64) -> Option<IoRequest> {
        let i = self.backlog.iter().position(|r| r.tag == op)?;
        self.backlog.remove(i)
    }

    /// Up to `n` refused requests to try again, reads first (a request waits on those).
    pub fn retry(&mut self, n: usize) -> Vec<IoRequest> {
        let mut out = Vec::with_capacity(n.min(self.backlog.len()));
        for want in [IoOp::Read, IoOp::Write] {
            let mut i = 0;
            while out.len() < n && i < self.backlog.len() {
                if self.backlog[i].op == want {
                    if let Some(r) = self.backlog.remove(i) {
                        out.push(r);
                    }
                } else {
                    i += 1;
                }
            }
        }
        out
    }

    /// Every refused request, for failing them all.
    pub fn drain_backlog(&mut self) -> Vec<IoRequest> {
        self.backlog.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_err() -> Result<(), TierError> {
        Err(TierError::io(
            "read",
            std::path::Path::new("/x"),
            std::io::Error::from_raw_os_error(libc::EIO),
        ))
    }

    fn req(op: IoOp, tag: u64) -> IoRequest {
        IoRequest {
            op,
            slot: tag,
            buf: 0,
            tag,
        }
    }

    #[test]
    fn failures_in_a_row_take_g3_out_once_and_a_success_resets_the_count() {
        let mut h = G3Health::new(Duration::from_secs(1), 3);
        assert!(h.record(&io_err()).is_none());
        assert!(h.record(&io_err()).is_none());
        assert!(h.record(&Ok(())).is_none());
        assert!(h.record(&io_err()).is_none());
        assert!(h.record(&io_err()).is_none());
        let why = h.record(&io_err()).expect("the third in a row");
        assert!(why.contains("3 I/O errors"), "{why}");
        assert!(h.take_out(why));
        assert!(!h.in_service());
        assert!(h.record(&io_err()).is_none(), "reported once");
        assert!(!h.take_out("again".into()));
    }

    #[test]
    fn a_bad_slot_is_not_a_bad_disk() {
        let mut h = G3Health::new(Duration::from_secs(1), 1);
        let bad = Err(TierError::Slot {
            slot: 3,
            source: kvcore::SlotError::Empty,
        });
        assert!(h.record(&bad).is_none());
        assert!(h.in_service());
    }

    #[test]
    fn operations_past_their_deadline_expire_once_and_done_ones_never() {
        let mut h = G3Health::new(Duration::from_millis(10), 3);
        let t0 = Instant::now();
        h.started(1, t0);
        h.started(2, t0);
        h.started(3, t0 + Duration::from_millis(15));
        h.finished(2);
        assert!(h.expired(t0 + Duration::from_millis(5)).is_empty());
        assert_eq!(h.expired(t0 + Duration::from_millis(20)), vec![1]);
        assert!(h.expired(t0 + Duration::from_millis(20)).is_empty());
        assert_eq!(h.expired(t0 + Duration::from_millis(30)), vec![3]);
        assert_eq!(h.timeouts, 2);
    }

    #[test]
    fn refused_requests_go_again_reads_first_in_order() {
        let mut h = G3Health::new(Duration::from_secs(1), 3);
        for (op, tag) in [
            (IoOp::Write, 1),
            (IoOp::Read, 2),
            (IoOp::Write, 3),
            (IoOp::Read, 4),
        ] {
            h.defer(req(op, tag));
        }
        assert_eq!(h.unqueue(3).map(|r| r.tag), Some(3));
        assert!(h.unqueue(3).is_none());
        let tags: Vec<u64> = h.retry(2).iter().map(|r| r.tag).collect();
        assert_eq!(tags, vec![2, 4]);
        let tags: Vec<u64> = h.retry(8).iter().map(|r| r.tag).collect();
        assert_eq!(tags, vec![1]);
        assert!(h.drain_backlog().is_empty());
    }
}
