//! P/D through a host copy of the cache, for engines whose KV cache no transport here can reach:
//! device memory without a UCX built with CUDA (or over TCP), which is how NixlConnector's
//! `kv_buffer_device: "cpu"` works. The CPU engine can run the same path (`PdConfig::staged`),
//! which is how it is tested without a GPU.
//!
//! The mirror has the cache's layout byte for byte (block `b` of layer `l` at the same offset
//! from its base as in the cache), so plans, grants and TCP serve checks are the same as for a
//! cache exported directly; only the region differs. Two copies move blocks across:
//! - prefill: a finished request's offered blocks go cache → mirror before its grant goes live;
//! - decode: pulled blocks go mirror → cache before the pull is reported loaded.
//!
//! Why a mirror block holds the right bytes while a decoder may read it (the argument the
//! connector's use rests on): mirror block `b` is written only by staging a grant that offers
//! cache block `b`, and the engine holds cache block `b` unchanged while any grant on it is live
//! (vLLM does not write a full block that a finished request still holds). Two live grants on one
//! block therefore stage the same bytes, and a grant's staging can differ from what is in the
//! mirror only after every earlier grant on the block ended — a decoder of an ended grant is
//! answered `gone` and recomputes. A decoder reads a staged export only after the grant answered
//! `live` (it is installed once staging completed) and reports the blocks loaded only after a
//! second `live` (its release): grants never come back to life, so the grant was live, and the
//! staging complete, throughout its reads.

use kvcore::{CacheLayout, Descriptor, MemKind, Region, RegionId};
use kvtier::{CopyCallback, CopyEngine, CopyPair, HostCopy, MemoryRegistry, PinnedPool};

use crate::connector::ConnectorError;

/// Copy threads for host staging (a CPU engine's memcpy; the engine itself keeps the rest).
const HOST_COPY_THREADS: usize = 2;

/// The host copy of a registered cache and the engine that copies blocks across.
pub(crate) struct Staging {
    // Dropped first: its threads finish the copies in flight (which touch the mirror and the
    // cache) before the mirror goes.
    copy: Box<dyn CopyEngine>,
    mirror: PinnedPool,
    cache: RegionId,
    mirror_id: RegionId,
    layout: CacheLayout,
}

/// Which way a staging copy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Cache → mirror (a prefill's blocks, before decoders may read them).
    Out,
    /// Mirror → cache (a decoder's pulled blocks, before the engine reads them).
    In,
}

impl Staging {
    /// A mirror of a host cache.
    ///
    /// # Safety
    /// `base..base + layout.span_bytes()` must stay valid until the staging is dropped, and the
    /// engine must not write a block while a copy out of it runs nor touch one while a copy into
    /// it runs (the connector's callers' contract, [`crate::connector::Core::register_cache`]).
    pub(crate) unsafe fn host(layout: &CacheLayout, base: u64) -> Result<Staging, ConnectorError> {
        let mirror = PinnedPool::new(layout.span_bytes(), 1)?;
        let memory = MemoryRegistry::new();
        let region = Region {
            kind: MemKind::Host,
            base,
            len: layout.span_bytes(),
        };
        // SAFETY: forwarded from this function's contract.
        let cache = unsafe { memory.register(region) }.map_err(kvtier::TierError::from)?;
        let copy = Box::new(HostCopy::new(memory, HOST_COPY_THREADS));
        // SAFETY: the mirror is owned by the staging and dropped after its copy engine.
        unsafe { Staging::with(copy, mirror, cache, layout) }
    }

    /// A mirror of a device cache on `gpu`, in CUDA pinned memory, copied with kvtier's CUDA
    /// copy engine.
    ///
    /// # Safety
    /// As for [`Staging::host`], for device memory at `device_ptr`.
    pub(crate) unsafe fn device(
        gpu: &kvtier::cuda::Gpu,
        layout: &CacheLayout,
        device_ptr: u64,
    ) -> Result<Staging, ConnectorError> {
        gpu.check_cache(layout, device_ptr)?;
        let mirror = kvtier::cuda::pinned_pool(gpu, layout.span_bytes(), 1)?;
        let memory = MemoryRegistry::new();
        let region = Region {
            kind: MemKind::Device {
                ordinal: gpu.ordinal(),
            },
            base: device_ptr,
            len: layout.span_bytes(),
        };
        // SAFETY: forwarded from this function's contract; every layer's extent was checked to
        // lie in device memory of this GPU above.
        let cache = unsafe { memory.register(region) }.map_err(kvtier::TierError::from)?;
        let copy = kvtier::cuda::CudaCopy::new(gpu, memory, Default::default())
            .map_err(kvtier::TierError::from)?;
        // SAFETY: as in `host`.
        unsafe { Staging::with(Box::new(copy), mirror, cache, layout) }
    }

    /// # Safety
    /// `mirror` is registered with `copy`'s registry here and must outlive every copy: the
    /// staging owns both and drops the engine first.
    unsafe fn with(
        copy: Box<dyn CopyEngine>,
        mirror: PinnedPool,
        cache: RegionId,
        layout: &CacheLayout,
    ) -> Result<Staging, ConnectorError> {
        // SAFETY: the mirror lives in the staging beside the engine (see above).
        let mirror_id =
            unsafe { copy.memory().register(mirror.region()) }.map_err(kvtier::TierError::from)?;
        Ok(Staging {
            copy,
            mirror,
            cache,
            mirror_id,
            layout: layout.clone(),
        })
    }

    /// The mirror as a region to export to peers.
    pub(crate) fn mirror(&self) -> Region {
        Region {
            len: self.layout.span_bytes(),
            ..self.mirror.region()
        }
    }

    /// Starts copying `blocks` (every layer and head) one way; `done` runs once, when all of
    /// them are across or the copy failed. Returns the error without calling `done` if the copy
    /// cannot start (a block out of range).
    pub(crate) fn copy(
        &self,
        dir: Direction,
        blocks: &[u32],
        done: CopyCallback,
    ) -> Result<(), ConnectorError> {
        let pairs = self.pairs(dir, blocks)?;
        if pairs.is_empty() {
            done(Ok(0));
            return Ok(());
        }
        self.copy
            .submit(&pairs, done)
            .map_err(|e| ConnectorError::Tier(e.into()))
    }

    /// Every byte run of `blocks`, from one side to the other.
    fn pairs(&self, dir: Direction, blocks: &[u32]) -> Result<Vec<CopyPair>, ConnectorError> {
        let mut pairs = Vec::new();
        for &b in blocks {
            for (offset, len) in self.layout.block_runs(b)? {
                let at = |region| Descriptor {
                    region,
                    offset,
                    len,
                };
                let (src, dst) = match dir {
                    Direction::Out => (at(self.cache), at(self.mirror_id)),
                    Direction::In => (at(self.mirror_id), at(self.cache)),
                };
                pairs.push(CopyPair { src, dst });
            }
        }
        Ok(pairs)
    }

    /// [`Staging::copy`], waiting up to `timeout` (tests).
    #[cfg(test)]
    pub(crate) fn copy_blocking(
        &self,
        dir: Direction,
        blocks: &[u32],
        timeout: std::time::Duration,
    ) -> Result<u64, ConnectorError> {
        let pairs = self.pairs(dir, blocks)?;
        self.copy
            .copy_blocking(&pairs, timeout)
            .map_err(|e| ConnectorError::Tier(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcore::{Dtype, Geometry, StrideOrder};

    /// Blocks copied out land in the mirror at the cache's offsets, copied in land back, and
    /// only the blocks named move.
    #[test]
    fn blocks_cross_both_ways_at_the_same_offsets_and_no_others() -> Result<(), ConnectorError> {
        let g = Geometry::mha(3, 2, 8, Dtype::Bf16, 4).map_err(kvcore::LayoutError::from)?;
        let layout = CacheLayout::named(g, 6, StrideOrder::Lbnhc)?;
        let span = layout.span_bytes() as usize;
        let mut cache: Vec<u8> = (0..span).map(|i| (i * 7 % 251) as u8).collect();
        // SAFETY: `cache` outlives the staging (dropped at the end of the test, after it).
        let s = unsafe { Staging::host(&layout, cache.as_mut_ptr() as u64)? };
        let t = std::time::Duration::from_secs(10);
        s.copy_blocking(Direction::Out, &[1, 4], t)?;
        let mirror = s.mirror();
        // SAFETY: the mirror is live while `s` is and no copy runs now.
        let m = unsafe { std::slice::from_raw_parts(mirror.base as *const u8, span) };
        for b in 0..6u32 {
            for (off, len) in layout.block_runs(b)? {
                let r = off as usize..(off + len) as usize;
                if b == 1 || b == 4 {
                    assert_eq!(m[r.clone()], cache[r], "block {b} at {off}");
                } else {
                    assert!(m[r].iter().all(|&x| x == 0), "block {b} was not staged");
                }
            }
        }
        let before = cache.clone();
        for (off, len) in layout.block_runs(1)? {
            cache[off as usize..(off + len) as usize].fill(0xee);
        }
        s.copy_blocking(Direction::In, &[1], t)?;
        assert_eq!(cache, before, "block 1 came back, nothing else changed");
        assert!(s.copy_blocking(Direction::In, &[6], t).is_err());
        drop(s);
        Ok(())
    }
}
