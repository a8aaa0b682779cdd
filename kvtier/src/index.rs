//! Where each block lives (G2 slot, G3 slot, both), who is using it, and which block goes when a
//! tier is full. A block with readers or writers in flight is never a victim.

use std::collections::HashMap;

use kvcore::BlockHash;

use crate::policy::{Access, EvictionPolicy, Lru, PolicyKind};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// G2 slot, once the block's bytes are complete there.
    pub g2: Option<u32>,
    /// G3 slot, once written and durable there.
    pub g3: Option<u64>,
    /// Operations in flight that read or write this block's slots.
    pub refs: u32,
    /// Times the block was onboarded.
    pub hits: u32,
    /// Its position in the chain of the save that brought it (what prefix-aware policies see
    /// when it becomes resident).
    pub depth: u32,
    /// Judged not worth an NVMe write while its caller owns eviction: no longer a victim, it
    /// waits for the caller's discard.
    pub unwanted: bool,
}

/// The tiers a block can be found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    Dram,
    Nvme,
}

pub struct BlockIndex {
    entries: HashMap<BlockHash, Entry>,
    g2: Box<dyn EvictionPolicy>,
    g3: Box<dyn EvictionPolicy>,
}

impl Default for BlockIndex {
    fn default() -> Self {
        BlockIndex::new(Box::<Lru>::default(), Box::<Lru>::default())
    }
}

impl BlockIndex {
    /// Both tiers run `kind`, sized for their capacities in blocks.
    pub fn with_policy(kind: PolicyKind, g2_blocks: u64, g3_blocks: u64) -> BlockIndex {
        BlockIndex::new(kind.build(g2_blocks), kind.build(g3_blocks.max(1)))
    }

    pub fn new(g2: Box<dyn EvictionPolicy>, g3: Box<dyn EvictionPolicy>) -> BlockIndex {
        BlockIndex {
            entries: HashMap::new(),
            g2,
            g3,
        }
    }

    pub fn get(&self, h: &BlockHash) -> Option<&Entry> {
        self.entries.get(h)
    }

    pub fn entry_mut(&mut self, h: &BlockHash) -> Option<&mut Entry> {
        self.entries.get_mut(h)
    }

    /// The fastest tier holding a complete copy.
    pub fn tier_of(&self, h: &BlockHash) -> Option<Tier> {
        let e = self.entries.get(h)?;
        match (e.g2, e.g3) {
            (Some(_), _) => Some(Tier::Dram),
            (None, Some(_)) => Some(Tier::Nvme),
            _ => None,
        }
    }

    /// Creates (or returns) the entry of a block about to be filled, holding one reference;
    /// `depth` is its position in the chain of the call filling it.
    pub fn pin_new(&mut self, h: BlockHash, depth: u32) -> &mut Entry {
        let e = self.entries.entry(h).or_default();
        e.refs += 1;
        e.depth = depth;
        e
    }

    /// The blocks of one call follow (one request's chain, in order).
    pub fn begin_batch(&mut self) {
        self.g2.begin_batch();
        self.g3.begin_batch();
    }

    pub fn pin(&mut self, h: &BlockHash) {
        if let Some(e) = self.entries.get_mut(h) {
            e.refs += 1;
        }
    }

    /// Drops a reference; an entry with no slot and no reference disappears.
    pub fn unpin(&mut self, h: &BlockHash) {
        if let Some(e) = self.entries.get_mut(h) {
            e.refs = e.refs.saturating_sub(1);
            if e.refs == 0 && e.g2.is_none() && e.g3.is_none() {
                self.entries.remove(h);
            }
        }
    }

    pub fn set_g2(&mut self, h: &BlockHash, slot: Option<u32>) {
        if let Some(e) = self.entries.get_mut(h) {
            match (e.g2, slot) {
                (None, Some(_)) => self.g2.insert(*h, Access::at(e.depth)),
                (Some(_), None) => self.g2.remove(h),
                _ => {}
            }
            e.g2 = slot;
            if e.refs == 0 && e.g2.is_none() && e.g3.is_none() {
                self.entries.remove(h);
            }
        }
    }

    pub fn set_g3(&mut self, h: &BlockHash, slot: Option<u64>) {
        if let Some(e) = self.entries.get_mut(h) {
            match (e.g3, slot) {
                (None, Some(_)) => self.g3.insert(*h, Access::at(e.depth)),
                (Some(_), None) => self.g3.remove(h),
                _ => {}
            }
            e.g3 = slot;
            if e.refs == 0 && e.g2.is_none() && e.g3.is_none() {
                self.entries.remove(h);
            }
        }
    }

    /// A use of a resident block, at `depth` in the chain of the call using it.
    pub fn touch(&mut self, h: &BlockHash, depth: u32) {
        if let Some(e) = self.entries.get(h) {
            let at = Access::at(depth);
            if e.g2.is_some() {
                self.g2.touch(h, at);
            }
            if e.g3.is_some() {
                self.g3.touch(h, at);
            }
        }
    }

    /// The G2 block to evict next: resident, unreferenced.
    pub fn g2_victim(&mut self) -> Option<BlockHash> {
        let entries = &self.entries;
        self.g2.victim(&|h| {
            entries
                .get(h)
                .is_some_and(|e| e.refs == 0 && e.g2.is_some())
        })
    }

    /// The G2 block to evict next among those `also` accepts.
    pub fn g2_victim_where(&mut self, also: &dyn Fn(&Entry) -> bool) -> Option<BlockHash> {
        let entries = &self.entries;
        self.g2.victim(&|h| {
            entries
                .get(h)
                .is_some_and(|e| e.refs == 0 && e.g2.is_some() && also(e))
        })
    }

    /// The G3 block to evict next: resident, unreferenced.
    pub fn g3_victim(&mut self) -> Option<BlockHash> {
        let entries = &self.entries;
        self.g3.victim(&|h| {
            entries
                .get(h)
                .is_some_and(|e| e.refs == 0 && e.g3.is_some())
        })
    }

    /// Blocks resident in G2 only, unreferenced: what a flush writes to G3.
    pub fn unspilled(&self) -> Vec<(BlockHash, u32)> {
        self.entries
            .iter()
            .filter_map(|(h, e)| match (e.g2, e.g3, e.refs) {
                (Some(s), None, 0) => Some((*h, s)),
                _ => None,
            })
            .collect()
    }

    /// Every block with a complete copy, and the tiers holding it.
    /// Blocks with an operation in flight.
    pub fn pinned(&self) -> Vec<BlockHash> {
        self.entries
            .iter()
            .filter(|(_, e)| e.refs > 0)
            .map(|(h, _)| *h)
            .collect()
    }

    pub fn resident(&self) -> Vec<(BlockHash, Tier)> {
        let mut out = Vec::with_capacity(self.entries.len());
        for (h, e) in &self.entries {
            if e.g2.is_some() {
                out.push((*h, Tier::Dram));
            }
            if e.g3.is_some() {
                out.push((*h, Tier::Nvme));
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn g2_len(&self) -> usize {
        self.g2.len()
    }

    pub fn g3_len(&self) -> usize {
        self.g3.len()
    }

    /// Internal consistency: each policy tracks exactly the blocks resident in its tier.
    pub fn check_consistent(&self) -> Result<(), String> {
        let g2 = self.entries.values().filter(|e| e.g2.is_some()).count();
        let g3 = self.entries.values().filter(|e| e.g3.is_some()).count();
        if g2 != self.g2.len() || g3 != self.g3.len() {
            return Err(format!(
                "index has {g2} G2 / {g3} G3 blocks, policies track {} / {}",
                self.g2.len(),
                self.g3.len()
            ));
        }
        if let Some((h, _)) = self
            .entries
            .iter()
            .find(|(_, e)| e.refs == 0 && e.g2.is_none() && e.g3.is_none())
        {
            return Err(format!("entry {h} has no slot and no reference"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> BlockHash {
        BlockHash::from_u64(i)
    }

    #[test]
    fn lru_skips_referenced_blocks() {
        let mut idx = BlockIndex::default();
        for i in 0..3 {
            idx.pin_new(h(i), 0);
            idx.set_g2(&h(i), Some(i as u32));
            idx.unpin(&h(i));
        }
        idx.touch(&h(0), 0);
        assert_eq!(idx.g2_victim(), Some(h(1)));
        idx.pin(&h(1));
        assert_eq!(idx.g2_victim(), Some(h(2)));
        idx.set_g2(&h(2), None);
        assert!(idx.get(&h(2)).is_none(), "no slot, no reference: gone");
        idx.unpin(&h(1));
        assert_eq!(idx.g2_victim(), Some(h(1)));
        idx.check_consistent().expect("consistent");
    }

    #[test]
    fn blocks_move_between_tiers() {
        let mut idx = BlockIndex::default();
        idx.pin_new(h(9), 0);
        idx.set_g2(&h(9), Some(0));
        idx.set_g3(&h(9), Some(5));
        idx.unpin(&h(9));
        assert_eq!(idx.tier_of(&h(9)), Some(Tier::Dram));
        idx.set_g2(&h(9), None);
        assert_eq!(idx.tier_of(&h(9)), Some(Tier::Nvme));
        assert_eq!(idx.g3_victim(), Some(h(9)));
        idx.check_consistent().expect("consistent");
    }
}
