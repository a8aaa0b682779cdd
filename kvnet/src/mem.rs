//! The one place kvnet turns registered addresses into slices. Registration (`Agent::register`)
//! carries the safety contract; everything here works on descriptors already bounds-checked
//! against the region table, while the regions are held in use (`InUse`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcore::{RegionId, Resolved};
use parking_lot::Mutex;

/// Counts the transfers touching each region, so deregistration waits for them.
#[derive(Default)]
pub(crate) struct UseCounts {
    counts: Mutex<HashMap<RegionId, usize>>,
}

/// Holds regions in use until dropped.
pub(crate) struct InUse {
    counts: Arc<UseCounts>,
    ids: Vec<RegionId>,
}

impl UseCounts {
    pub fn hold(self: &Arc<Self>, ids: impl IntoIterator<Item = RegionId>) -> InUse {
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

    /// Waits until no transfer holds `id`; false on timeout.
    pub fn wait_idle(&self, id: RegionId, timeout: Duration) -> bool {
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

/// Refuses descriptors of device memory on paths that move bytes with the CPU.
pub(crate) fn host_only(rs: &[Resolved], side: &str) -> Result<(), crate::NetError> {
    match rs.iter().position(|r| {
        matches!(
            r.kind,
            kvcore::MemKind::Device { .. } | kvcore::MemKind::File { .. }
        )
    }) {
        Some(i) => Err(crate::NetError::Descriptors(format!(
            "{side} descriptor {i} is {:?} memory, which the TCP transport cannot reach (device \
             memory moves over UCX with CUDA, or is staged through pinned DRAM)",
            rs[i].kind
        ))),
        None => Ok(()),
    }
}

/// A resolved local descriptor as bytes to send.
///
/// # Safety
/// `r` must come from the agent's region table, and its region must be held in use.
pub(crate) unsafe fn bytes<'a>(r: &Resolved) -> &'a [u8] {
    // SAFETY: the region was registered under `Agent::register`'s contract (valid until
    // deregistered) and is held in use, so deregistration waits for us.
    unsafe { std::slice::from_raw_parts(r.addr as *const u8, r.len as usize) }
}

/// A resolved local descriptor as bytes to fill.
///
/// # Safety
/// As for [`bytes`]; the registrant promised nothing else accesses the memory during transfers.
pub(crate) unsafe fn bytes_mut<'a>(r: &Resolved) -> &'a mut [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts_mut(r.addr as *mut u8, r.len as usize) }
}
