//! kvcore: kvferry's data model and wire codecs. No I/O, no threads: every byte that arrives from
//! a peer or a disk is decoded here, by functions that return `Result`, before any other layer
//! acts on it.
//!
//! - [`geometry`]: what a KV block holds ([`Geometry`], [`Dtype`]).
//! - [`layout`]: where its cells live in memory ([`CacheLayout`], vLLM's named [`StrideOrder`]s).
//! - [`hash`]: block identity ([`BlockHash`], [`PrefixHasher`]).
//! - [`region`]: registered memory and bounds-checked [`Descriptor`]s.
//! - [`plan`]: [`TransferPlan`]s, the fewest contiguous copies between two layouts.
//! - [`tp`]: head mapping between tensor-parallel sizes.
//! - [`slot`]: the header of an on-disk block slot.
//! - [`nixl`]: NIXL's own bytes (serializer, metadata, notifications, side channel) for interop.
//! - [`wire`]: versioned, checksummed frames for everything agents say to each other.

pub mod auth;
pub mod error;
pub mod geometry;
pub mod hash;
pub mod layout;
pub mod nixl;
pub mod plan;
pub mod region;
pub mod slot;
mod strided;
pub mod tp;
pub mod wire;

pub use error::{
    GeometryError, HashError, LayoutError, PlanError, RegionError, SlotError, WireError,
};
pub use geometry::{Dtype, Geometry, HeadShape};
pub use hash::{BlockHash, PrefixHasher};
pub use layout::{CacheLayout, LayerPlacement, StrideOrder};
pub use plan::{Copy, HeadSlice, PlanBuilder, TransferPlan};
pub use region::{Descriptor, MemKind, Region, RegionId, RegionTable, Resolved};
pub use tp::{rank_heads, tp_reads, TpRead};
