//! kvtier: the tiered block store. Blocks leave the engine's KV cache (G1) for a pinned DRAM
//! pool (G2) and spill from there to NVMe (G3) through io_uring, and come back on demand.
//! Built on `kvcore`; never depends on `kvnet`.

pub mod admission;
pub mod copy;
pub mod cuda;
pub mod engine;
pub mod error;
mod health;
pub mod index;
mod lanes;
pub mod memory;
pub mod namespace;
pub mod nvme;
pub mod policy;
pub mod pool;

pub use admission::{Admission, AdmissionCounters, WriteBudget};
pub use copy::{CopyCallback, CopyEngine, HostCopy};
pub use engine::{
    BlockResult, G1Id, Lookup, RequestId, RequestKind, TierCompletion, TierConfig, TierCounters,
    TierEngine, TierEvent, TierStats,
};
pub use error::{CopyError, TierError};
pub use index::{BlockIndex, Entry, Tier};
pub use kvcore;
pub use memory::{plan_pairs, CopyPair, MemoryRegistry};
pub use nvme::{IoDone, IoMode, IoOp, IoRequest, NvmeConfig, NvmeStore, ScannedSlot};
pub use policy::{Access, EvictionPolicy, Lfu, Lru, PolicyKind, S3Fifo};
pub use pool::PinnedPool;
