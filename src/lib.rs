//! kvferry moves paged LLM KV-cache blocks: between memory tiers of one node (device HBM, pinned
//! host DRAM, NVMe) and between nodes (prefill pool to decode pool), and plugs into vLLM as its KV
//! connector.
//!
//! This facade re-exports the layers:
//! - [`kvcore`]: the data model and sans-IO wire codecs (geometry, layouts, block hashes,
//!   regions, transfer plans).
//! - [`kvtier`]: tiers, block store, copy engines.
//! - [`kvnet`]: agents and transports.
//!
//! and adds the engine-agnostic state machine under vLLM's `KVFerryConnector`: [`Scheduler`]
//! decides what to load, save, pull and offer from the engine's request state; [`Connector`]
//! carries it out next to the KV cache (tiers, agent, frees, timeouts).

pub mod connector;
pub mod described;
pub mod lease;
pub mod rendezvous;
pub mod scheduler;
mod served;
mod staging;

pub use connector::{
    Connector, ConnectorConfig, Finished, LeaseTarget, OffloadConfig, PdConfig, PullSpec,
};
pub use kvcore;
pub use kvnet;
pub use kvtier;
pub use scheduler::{Offer, RemoteParams, Scheduler, SchedulerConfig, StepPlan};

/// The types most users need.
pub mod prelude {
    pub use kvcore::{
        tp_reads, BlockHash, CacheLayout, Descriptor, Dtype, Geometry, HeadSlice, MemKind,
        PlanBuilder, PrefixHasher, Region, RegionId, RegionTable, StrideOrder, TransferPlan,
    };
}
