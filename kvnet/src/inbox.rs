//! What the agent hands its user: completed transfers and received notifications, each queue
//! with its condition variable. Notifications are bounded in number and bytes (a peer that
//! floods them, or a user that never takes them, costs the oldest, counted and logged).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvcore::wire::Notification;
use parking_lot::{Condvar, Mutex};

use crate::error::NetError;
use crate::transport::{TransferDone, TransferId};

/// Notifications queued and not yet taken, in number and in payload bytes; beyond either the
/// oldest are dropped (and counted).
pub const MAX_QUEUED_NOTIFICATIONS: usize = 65536;
pub const MAX_QUEUED_NOTIFICATION_BYTES: usize = 64 << 20;

/// How long `wait` looks for a completion before it sleeps.
const SPIN: Duration = Duration::from_micros(100);

#[derive(Default)]
pub(crate) struct Inbox {
    done: Mutex<VecDeque<TransferDone>>,
    done_cv: Condvar,
    /// With the payload bytes it holds.
    notifications: Mutex<(VecDeque<Notification>, usize)>,
    notif_cv: Condvar,
    dropped: AtomicU64,
}

impl Inbox {
    pub fn finish(&self, id: TransferId, result: Result<u64, NetError>) {
        self.done.lock().push_back(TransferDone { id, result });
        self.done_cv.notify_all();
    }

    pub fn poll(&self) -> Vec<TransferDone> {
        self.done.lock().drain(..).collect()
    }

    /// Waits for one transfer; others stay queued for `poll`.
    pub fn wait(&self, id: TransferId, timeout: Duration) -> Option<TransferDone> {
        let start = Instant::now();
        let deadline = start + timeout;
        // A short transfer ends within tens of microseconds, about what a sleeping thread takes
        // to be woken: look again, yielding the core, for a short while before sleeping.
        let spin_until = start + SPIN.min(timeout);
        while Instant::now() < spin_until {
            {
                let mut done = self.done.lock();
                if let Some(pos) = done.iter().position(|d| d.id == id) {
                    return done.remove(pos);
                }
            }
            std::thread::yield_now();
        }
        let mut done = self.done.lock();
        loop {
            if let Some(pos) = done.iter().position(|d| d.id == id) {
                return done.remove(pos);
            }
            if self.done_cv.wait_until(&mut done, deadline).timed_out() {
                return done
                    .iter()
                    .position(|d| d.id == id)
                    .and_then(|p| done.remove(p));
            }
        }
    }

    /// Queues a notification whose sender the transport it came on authenticated.
    pub fn deliver(&self, n: Notification) {
        let mut g = self.notifications.lock();
        let (q, bytes) = &mut *g;
        *bytes += n.payload.len();
        while !q.is_empty()
            && (q.len() >= MAX_QUEUED_NOTIFICATIONS || *bytes > MAX_QUEUED_NOTIFICATION_BYTES)
        {
            if let Some(old) = q.pop_front() {
                *bytes -= old.payload.len();
            }
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed);
            if dropped.is_power_of_two() {
                log::warn!(
                    "kvferry: {} notifications dropped: nobody takes them ({MAX_QUEUED_NOTIFICATIONS} queued)",
                    dropped + 1
                );
            }
        }
        q.push_back(n);
        drop(g);
        self.notif_cv.notify_all();
    }

    /// Waits until at least one notification is queued (or the timeout passes), then drains.
    pub fn notifications(&self, timeout: Duration) -> Vec<Notification> {
        let deadline = Instant::now() + timeout;
        let mut g = self.notifications.lock();
        while g.0.is_empty() && !timeout.is_zero() {
            if self.notif_cv.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        g.1 = 0;
        g.0.drain(..).collect()
    }
}
