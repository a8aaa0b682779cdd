//! The export registry: the one owner of every registered region's life, from registration to
//! the return of `deregister`. Transports and the side channel reach our memory only through a
//! [`Hold`] taken here; nothing else in kvnet turns an address into a slice.
//!
//! The invariants, and the lock that keeps each:
//! - A region is visible (to metadata, to bounds checks, to peers) only once every transport
//!   mapped it: `register` keeps the table write-locked from insertion until the transports'
//!   keys are in, and removes the region untouched when one of them fails.
//! - A hold is taken in the same read-locked section as the bounds check of its descriptors, and
//!   its claim on the bytes (see [`Claims`]) with it; `deregister` removes the region under the
//!   write lock first, so a transfer either holds the region before that (and `deregister` waits
//!   for it) or fails its bounds check after — never a transfer into memory already given back.
//! - `deregister` returns Ok only after no hold is left and every transport's unmap completed
//!   (UCX's `ucp_mem_unmap` done, not queued); on an error the memory must be kept until the
//!   agent drops (the region stays unreachable to new transfers either way).
//! - A hold lives as long as the transfer can touch the memory: transports own it with the
//!   transfer and drop it at completion, or leak it when they cannot know (UCX after a panic).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcore::wire::{ExportedCache, ExportedRegion, TransportKey};
use kvcore::{Descriptor, Region, RegionId, RegionTable, Resolved};
use parking_lot::{Mutex, RwLock};

use crate::error::NetError;
use crate::mem::{Access, Claimed, Claims};

#[derive(Default)]
struct Table {
    regions: RegionTable,
    /// Each transport's key for a region (UCX's packed rkey), as published to peers.
    keys: HashMap<RegionId, Vec<TransportKey>>,
    caches: Vec<ExportedCache>,
}

#[derive(Default)]
pub(crate) struct Exports {
    table: RwLock<Table>,
    uses: Arc<UseCounts>,
    claims: Arc<Claims>,
    /// Set when the agent drops: no hold is taken after it.
    closed: std::sync::atomic::AtomicBool,
}

/// Why a hold was not taken.
pub(crate) enum NoHold {
    /// Outside our exports (or malformed): never servable.
    Bounds(NetError),
    /// Bytes a transfer in flight writes (or reads, for a writer): servable once it ended.
    Contended(String),
}

/// A transfer's right to touch the bytes it resolved: the regions stay registered and the bytes
/// claimed (no other transfer writes what this one reads, or touches what it writes) until it
/// drops.
pub(crate) struct Hold {
    resolved: Vec<Resolved>,
    _in_use: InUse,
    _claimed: Claimed,
}

impl Hold {
    /// The descriptors, as the addresses they name in this process.
    pub fn resolved(&self) -> &[Resolved] {
        &self.resolved
    }
}

impl Exports {
    /// Registers `region`; `map` makes it reachable through the transports (it runs with the
    /// table write-locked, so nothing sees the region before it returned Ok) and returns their
    /// keys.
    pub fn register(
        &self,
        region: Region,
        map: impl FnOnce(RegionId) -> Result<Vec<TransportKey>, NetError>,
    ) -> Result<RegionId, NetError> {
        let mut t = self.table.write();
        let id = t.regions.insert(region)?;
        match map(id) {
            Ok(keys) => {
                t.keys.insert(id, keys);
                Ok(id)
            }
            Err(e) => {
                t.regions.remove(id)?;
                Err(e)
            }
        }
    }

    /// Stops exporting `id`: unreachable at once, then waits (up to `timeout`) for the holds on
    /// it, then `unmap`s it from the transports. Ok means the memory is ours again.
    pub fn deregister(
        &self,
        id: RegionId,
        timeout: Duration,
        unmap: impl FnOnce() -> Result<(), NetError>,
    ) -> Result<Region, NetError> {
        let r = {
            let mut t = self.table.write();
            let r = t.regions.remove(id)?;
            t.caches.retain(|c| c.region != id);
            t.keys.remove(&id);
            r
        };
        if !self.uses.wait_idle(id, timeout) {
            return Err(NetError::Busy(id.0));
        }
        unmap()?;
        Ok(r)
    }

    /// Resolves `descs` against our exports and holds them for a transfer that does `access` to
    /// our memory, in one critical section.
    pub fn hold(&self, access: Access, descs: &[Descriptor]) -> Result<Hold, NetError> {
        self.try_hold(access, descs).map_err(|r| match r {
            NoHold::Bounds(e) => e,
            NoHold::Contended(why) => NetError::Descriptors(why),
        })
    }

    /// As [`Exports::hold`], telling a claim conflict (which ends when the transfer in flight
    /// does) from descriptors that can never be served.
    pub fn try_hold(&self, access: Access, descs: &[Descriptor]) -> Result<Hold, NoHold> {
        let t = self.table.read();
        // Checked under the table lock that `close` takes too: a hold is either taken before
        // the close (and waited for) or refused.
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(NoHold::Bounds(NetError::Shutdown));
        }
        let resolved = t
            .regions
            .resolve_all(descs)
            .map_err(|e| NoHold::Bounds(e.into()))?;
        let claimed = self
            .claims
            .claim(access, &resolved)
            .map_err(NoHold::Contended)?;
        let in_use = self.uses.hold(descs.iter().map(|d| d.region));
        Ok(Hold {
            resolved,
            _in_use: in_use,
            _claimed: claimed,
        })
    }

    /// Refuses every hold from now on (the agent is going away).
    pub fn close(&self) {
        let _t = self.table.write();
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Waits (up to `timeout`) until no hold is left on any region; false if one is.
    pub fn wait_unheld(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.uses.counts.lock().is_empty() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Publishes a KV cache layout living in a registered region.
    pub fn export_cache(&self, cache: ExportedCache) -> Result<(), NetError> {
        let mut t = self.table.write();
        let r = t
            .regions
            .get(cache.region)
            .ok_or(kvcore::RegionError::UnknownRegion(cache.region.0))?;
        if cache.layout.span_bytes() > r.len {
            return Err(NetError::Descriptors(format!(
                "cache layout spans {} bytes, region {} has {}",
                cache.layout.span_bytes(),
                cache.region,
                r.len
            )));
        }
        t.caches.push(cache);
        Ok(())
    }

    /// Every region with its keys, and the caches: what metadata publishes.
    pub fn snapshot(&self) -> (Vec<ExportedRegion>, Vec<ExportedCache>) {
        let t = self.table.read();
        let regions = t
            .regions
            .iter()
            .map(|(id, r)| ExportedRegion {
                id,
                region: *r,
                keys: t.keys.get(&id).cloned().unwrap_or_default(),
            })
            .collect();
        (regions, t.caches.clone())
    }
}

/// Counts the transfers touching each region, so deregistration waits for them.
#[derive(Default)]
struct UseCounts {
    counts: Mutex<HashMap<RegionId, usize>>,
}

struct InUse {
    counts: Arc<UseCounts>,
    ids: Vec<RegionId>,
}

impl UseCounts {
    fn hold(self: &Arc<Self>, ids: impl IntoIterator<Item = RegionId>) -> InUse {
        let mut ids: Vec<RegionId> = ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        let mut c = self.counts.lock();
        for id in &ids {
            *c.entry(*id).or_default() += 1;
        }
        InUse {
            counts: self.clone(),
            ids,
        }
    }

    fn wait_idle(&self, id: RegionId, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.counts.lock().get(&id).copied().unwrap_or(0) == 0 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut c = self.counts.counts.lock();
        for id in &self.ids {
            if let Some(n) = c.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    c.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcore::MemKind;

    fn region(base: u64, len: u64) -> Region {
        Region {
            kind: MemKind::Host,
            base,
            len,
        }
    }

    fn desc(region: RegionId, offset: u64, len: u64) -> Descriptor {
        Descriptor {
            region,
            offset,
            len,
        }
    }

    #[test]
    fn a_region_whose_mapping_failed_was_never_visible_and_is_gone() {
        let e = Exports::default();
        let r = e.register(region(4096, 4096), |_| {
            Err(NetError::Unavailable("map failed".into()))
        });
        assert!(r.is_err());
        assert!(e.snapshot().0.is_empty());
        assert!(e.hold(Access::Read, &[desc(RegionId(0), 0, 8)]).is_err());
    }

    #[test]
    fn deregister_waits_for_holds_and_unmaps_only_after_them() {
        let e = Arc::new(Exports::default());
        let id = e
            .register(region(4096, 4096), |_| Ok(Vec::new()))
            .expect("register");
        let h = e.hold(Access::Read, &[desc(id, 0, 64)]).expect("hold");
        let unmapped = std::sync::atomic::AtomicBool::new(false);
        // Busy while held: unmap never ran, and the region is no longer reachable.
        let r = e.deregister(id, Duration::from_millis(20), || {
            unmapped.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        });
        assert!(matches!(r, Err(NetError::Busy(_))));
        assert!(!unmapped.load(std::sync::atomic::Ordering::SeqCst));
        assert!(e.hold(Access::Read, &[desc(id, 0, 64)]).is_err());
        drop(h);
        // A second region: released holds let deregistration finish, unmap last.
        let id2 = e
            .register(region(1 << 20, 4096), |_| Ok(Vec::new()))
            .expect("register");
        let h2 = e.hold(Access::Write, &[desc(id2, 0, 64)]).expect("hold");
        let e2 = e.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            drop(h2);
        });
        let order = Mutex::new(Vec::new());
        e2.deregister(id2, Duration::from_secs(5), || {
            order.lock().push("unmap");
            Ok(())
        })
        .expect("deregister");
        t.join().expect("join");
        assert_eq!(*order.lock(), vec!["unmap"]);
    }

    #[test]
    fn holds_claim_their_bytes() {
        let e = Exports::default();
        let id = e
            .register(region(4096, 4096), |_| Ok(Vec::new()))
            .expect("register");
        let w = e.hold(Access::Write, &[desc(id, 0, 128)]).expect("write");
        assert!(e.hold(Access::Read, &[desc(id, 64, 8)]).is_err());
        drop(w);
        e.hold(Access::Read, &[desc(id, 64, 8)])
            .expect("free again");
    }
}
