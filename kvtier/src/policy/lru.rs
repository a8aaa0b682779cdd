use std::collections::{BTreeMap, HashMap};

use kvcore::BlockHash;

use super::{Access, EvictionPolicy};

/// Least recently used, by a logical clock: O(log n) per operation.
#[derive(Default)]
pub struct Lru {
    clock: u64,
    at: HashMap<BlockHash, u64>,
    order: BTreeMap<u64, BlockHash>,
}

impl Lru {
    fn stamp(&mut self, h: &BlockHash) {
        self.clock += 1;
        if let Some(old) = self.at.insert(*h, self.clock) {
            self.order.remove(&old);
        }
        self.order.insert(self.clock, *h);
    }
}

impl EvictionPolicy for Lru {
    fn insert(&mut self, h: BlockHash, _: Access) {
        self.stamp(&h);
    }

    fn touch(&mut self, h: &BlockHash, _: Access) {
        self.stamp(h);
    }

    fn remove(&mut self, h: &BlockHash) {
        if let Some(t) = self.at.remove(h) {
            self.order.remove(&t);
        }
    }

    fn victim(&mut self, evictable: &dyn Fn(&BlockHash) -> bool) -> Option<BlockHash> {
        self.order.values().find(|h| evictable(h)).copied()
    }

    fn len(&self) -> usize {
        self.at.len()
    }
}
