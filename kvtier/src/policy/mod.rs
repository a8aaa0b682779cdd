//! Eviction policies: which resident block of a tier goes when the tier is full.
//!
//! A policy sees every insert, access and removal of its tier, with where the block sits in its
//! request's chain ([`Access::depth`]) and which call it came with ([`EvictionPolicy::begin_batch`]:
//! one offload or onboard is one request's blocks, in prompt order). That is what lets a policy be
//! prefix-aware: a prefix cache can only use a block while every block before it in the chain is
//! resident too, so the tail of a chain is worth less than its head and should go first.
//!
//! `kvferry-bench trace` replays real and synthetic traces through these policies against the
//! offline optimum; `bench/RESULTS.md` has the figures that chose [`PolicyKind::default`].

use std::fmt;
use std::str::FromStr;

use kvcore::BlockHash;

mod lfu;
mod lru;
mod s3fifo;
pub mod sketch;

pub use lfu::Lfu;
pub use lru::Lru;
pub use s3fifo::S3Fifo;

/// Where a block sits in the chain of the call that touches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Position in the call's chain: 0 is its first block. A call that starts mid-prompt (a
    /// save of a continuation) counts from its own first block.
    pub depth: u32,
}

impl Access {
    pub fn at(depth: u32) -> Access {
        Access { depth }
    }
}

/// Chooses victims. Implementations see every insert, access and removal of their tier.
pub trait EvictionPolicy: Send {
    /// A new call's blocks follow: one request's chain, in order.
    fn begin_batch(&mut self) {}
    fn insert(&mut self, h: BlockHash, at: Access);
    fn touch(&mut self, h: &BlockHash, at: Access);
    fn remove(&mut self, h: &BlockHash);
    /// The first candidate (in the policy's order) that `evictable` accepts. Not removed: the
    /// caller removes it when it actually leaves (a spill may take a while, or fail).
    fn victim(&mut self, evictable: &dyn Fn(&BlockHash) -> bool) -> Option<BlockHash>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The policies a configuration can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// S3-FIFO (Yang et al., SOSP '23): a small FIFO for new blocks, a main FIFO for blocks used
    /// again, a ghost list of recent small-queue evictions.
    S3Fifo,
    /// Prefix-aware LFU with adaptive aging (kvferry's default; see [`Lfu`]).
    Lfu,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Lru, PolicyKind::S3Fifo, PolicyKind::Lfu];

    /// A policy for a tier of `capacity` blocks.
    pub fn build(self, capacity: u64) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru => Box::<Lru>::default(),
            PolicyKind::S3Fifo => Box::new(S3Fifo::new(capacity)),
            PolicyKind::Lfu => Box::new(Lfu::new(capacity)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::S3Fifo => "s3fifo",
            PolicyKind::Lfu => "lfu",
        }
    }
}

impl Default for PolicyKind {
    /// Chosen by replay (`bench/RESULTS.md`, "Cache policy"): ahead of LRU at small capacities
    /// on the production trace and on the synthetic one, never behind it at large ones.
    fn default() -> Self {
        PolicyKind::Lfu
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<_> = PolicyKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown eviction policy {s:?}; one of {}", names.join(", "))
            })
    }
}

/// A block hash folded to 64 well-mixed bits (hashes from integer ids are not mixed at all).
pub(crate) fn mix(h: &BlockHash) -> u64 {
    xxhash_rust::xxh3::xxh3_64(h.as_bytes())
}

#[cfg(test)]
mod tests;
