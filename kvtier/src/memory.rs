//! The registry of memory that copy engines may touch. Registering raw memory is the one unsafe
//! act; every copy afterwards is a pair of descriptors bounds-checked against this registry.

use std::sync::Arc;

use kvcore::{Descriptor, Region, RegionId, RegionTable, Resolved};
use parking_lot::RwLock;

use crate::error::CopyError;

#[derive(Clone, Default)]
pub struct MemoryRegistry {
    table: Arc<RwLock<RegionTable>>,
}

impl MemoryRegistry {
    pub fn new() -> MemoryRegistry {
        MemoryRegistry::default()
    }

    /// Registers `region` (for host kinds, `base` is a pointer in this process).
    ///
    /// # Safety
    /// The memory must stay valid, and must not be freed, until [`MemoryRegistry::deregister`]
    /// returns and no copy that names it is still running. While a copy runs, nothing else may
    /// write the bytes it reads or access the bytes it writes.
    pub unsafe fn register(&self, region: Region) -> Result<RegionId, CopyError> {
        Ok(self.table.write().insert(region)?)
    }

    pub fn deregister(&self, id: RegionId) -> Result<Region, CopyError> {
        Ok(self.table.write().remove(id)?)
    }

    pub fn get(&self, id: RegionId) -> Option<Region> {
        self.table.read().get(id).copied()
    }

    /// Resolves and bounds-checks pairs of descriptors; the first bad pair fails them all.
    pub fn resolve_pairs(
        &self,
        pairs: &[CopyPair],
    ) -> Result<Vec<(Resolved, Resolved)>, CopyError> {
        let t = self.table.read();
        pairs
            .iter()
            .enumerate()
            .map(|(index, p)| {
                let s = t.resolve(&p.src)?;
                let d = t.resolve(&p.dst)?;
                if s.len != d.len {
                    return Err(CopyError::LengthMismatch {
                        index,
                        src: s.len,
                        dst: d.len,
                    });
                }
                let same_space = matches!(
                    (s.kind, d.kind),
                    (
                        kvcore::MemKind::Host | kvcore::MemKind::PinnedHost,
                        kvcore::MemKind::Host | kvcore::MemKind::PinnedHost
                    )
                ) || s.kind == d.kind;
                if same_space && s.addr < d.addr + d.len && d.addr < s.addr + s.len {
                    return Err(CopyError::Overlap { index });
                }
                Ok((s, d))
            })
            .collect()
    }
}

/// Copy `src` to `dst`; both in registered memory, equal lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyPair {
    pub src: Descriptor,
    pub dst: Descriptor,
}

/// Turns a kvcore plan between two registered regions into copy pairs.
pub fn plan_pairs(plan: &kvcore::TransferPlan, src: RegionId, dst: RegionId) -> Vec<CopyPair> {
    plan.copies()
        .iter()
        .map(|c| CopyPair {
            src: Descriptor {
                region: src,
                offset: c.src,
                len: c.len,
            },
            dst: Descriptor {
                region: dst,
                offset: c.dst,
                len: c.len,
            },
        })
        .collect()
}
