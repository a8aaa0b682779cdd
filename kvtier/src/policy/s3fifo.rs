//! S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP '23).
//!
//! New blocks enter a small FIFO (a tenth of the capacity); one used again before it leaves
//! moves to the main FIFO, the others leave (and are remembered in a ghost list, so one coming
//! back soon goes straight to main). Main reinserts blocks used since they last came round.
//! Chains enter in prompt order, so a chain's head leaves the small queue before its tail; the
//! depth is not used.

use std::collections::{HashMap, VecDeque};

use kvcore::BlockHash;

use super::{Access, EvictionPolicy};

const MAX_FREQ: u8 = 3;

#[derive(Clone, Copy)]
struct Node {
    main: bool,
    freq: u8,
    /// Matches the queue entry that is this node's; older entries are stale.
    seq: u64,
}

pub struct S3Fifo {
    small_cap: usize,
    ghost_cap: usize,
    nodes: HashMap<BlockHash, Node>,
    small: VecDeque<(BlockHash, u64)>,
    main: VecDeque<(BlockHash, u64)>,
    small_len: usize,
    /// Recently evicted from the small queue, in order; `ghost_set` says which entry is live.
    ghost: VecDeque<(BlockHash, u64)>,
    ghost_set: HashMap<BlockHash, u64>,
    seq: u64,
    /// This call's new blocks, in prompt order, not yet queued (their nodes have seq 0).
    pending: Vec<(BlockHash, bool)>,
}

impl S3Fifo {
    pub fn new(capacity: u64) -> S3Fifo {
        let cap = capacity.clamp(1, 1 << 40) as usize;
        S3Fifo {
            small_cap: (cap / 10).max(1),
            ghost_cap: cap,
            nodes: HashMap::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_len: 0,
            ghost: VecDeque::new(),
            ghost_set: HashMap::new(),
            seq: 0,
            pending: Vec::new(),
        }
    }

    /// Queue entries, stale ones included (what the queues cost in memory).
    pub fn queued(&self) -> usize {
        self.small.len() + self.main.len() + self.ghost.len() + self.pending.len()
    }

    /// Queues the call's new blocks, deepest first.
    fn flush(&mut self) {
        for (h, main) in std::mem::take(&mut self.pending).into_iter().rev() {
            let Some(n) = self.nodes.get_mut(&h) else {
                continue;
            };
            if n.seq != 0 {
                continue;
            }
            self.seq += 1;
            n.seq = self.seq;
            if main {
                self.main.push_back((h, self.seq));
            } else {
                self.small.push_back((h, self.seq));
            }
        }
    }

    fn push(&mut self, h: BlockHash, main: bool, freq: u8) {
        self.seq += 1;
        let n = Node {
            main,
            freq,
            seq: self.seq,
        };
        if let Some(old) = self.nodes.insert(h, n) {
            if !old.main {
                self.small_len -= 1;
            }
        }
        if main {
            self.main.push_back((h, self.seq));
        } else {
            self.small_len += 1;
            self.small.push_back((h, self.seq));
        }
    }

    fn remember(&mut self, h: BlockHash) {
        self.seq += 1;
        self.ghost_set.insert(h, self.seq);
        self.ghost.push_back((h, self.seq));
        while self.ghost_set.len() > self.ghost_cap {
            let Some((g, seq)) = self.ghost.pop_front() else {
                break;
            };
            if self.ghost_set.get(&g) == Some(&seq) {
                self.ghost_set.remove(&g);
            }
        }
        if self.ghost.len() > 2 * self.ghost_set.len() + 64 {
            let live = &self.ghost_set;
            self.ghost.retain(|(g, seq)| live.get(g) == Some(seq));
        }
    }

    /// Removed blocks leave their queue entries behind (found stale when they come round);
    /// when those outnumber the live ones, they go, so memory follows what is resident.
    fn compact(&mut self) {
        if self.small.len() + self.main.len() + self.pending.len() > 2 * self.nodes.len() + 64 {
            let nodes = &self.nodes;
            let live = |e: &(BlockHash, u64)| nodes.get(&e.0).is_some_and(|n| n.seq == e.1);
            self.small.retain(live);
            self.main.retain(live);
            self.pending
                .retain(|(h, _)| nodes.get(h).is_some_and(|n| n.seq == 0));
        }
    }

    fn live(&self, e: &(BlockHash, u64)) -> bool {
        self.nodes.get(&e.0).is_some_and(|n| n.seq == e.1)
    }
}

impl EvictionPolicy for S3Fifo {
    fn begin_batch(&mut self) {
        self.flush();
    }

    fn insert(&mut self, h: BlockHash, at: Access) {
        if self.nodes.contains_key(&h) {
            return self.touch(&h, at);
        }
        let main = self.ghost_set.remove(&h).is_some();
        let n = Node {
            main,
            freq: 0,
            seq: 0,
        };
        self.nodes.insert(h, n);
        if !main {
            self.small_len += 1;
        }
        self.pending.push((h, main));
    }

    fn touch(&mut self, h: &BlockHash, at: Access) {
        match self.nodes.get_mut(h) {
            Some(n) => n.freq = (n.freq + 1).min(MAX_FREQ),
            None => self.insert(*h, at),
        }
    }

    fn remove(&mut self, h: &BlockHash) {
        if let Some(n) = self.nodes.remove(h) {
            if !n.main {
                self.small_len -= 1;
                if n.freq == 0 {
                    self.remember(*h);
                }
            }
            self.compact();
        }
    }

    fn victim(&mut self, evictable: &dyn Fn(&BlockHash) -> bool) -> Option<BlockHash> {
        self.flush();
        // Every step either answers or moves one entry (and lowers a count, or drops a stale
        // entry), so this many steps visit every live block more than MAX_FREQ times.
        let budget = (self.small.len() + self.main.len()) * (MAX_FREQ as usize + 2) + 2;
        // Blocks found in use, per queue: once a queue went round with nothing evictable, the
        // other is asked whatever the sizes say.
        let (mut busy_small, mut busy_main) = (0usize, 0usize);
        for _ in 0..budget {
            let small_done = busy_small >= self.small_len;
            let main_done = busy_main >= self.nodes.len() - self.small_len;
            if small_done && main_done {
                break;
            }
            let from_small = !small_done
                && (self.small_len > self.small_cap || self.main.is_empty() || main_done);
            let q = if from_small {
                &mut self.small
            } else {
                &mut self.main
            };
            let Some(e) = q.pop_front() else {
                if self.small.is_empty() && self.main.is_empty() {
                    return None;
                }
                continue;
            };
            if !self.live(&e) {
                continue;
            }
            let n = self.nodes[&e.0];
            if !evictable(&e.0) {
                // In use: it goes round again, as if used now.
                if n.main {
                    busy_main += 1;
                } else {
                    busy_small += 1;
                }
                self.push(e.0, n.main, n.freq);
                continue;
            }
            match (n.main, n.freq) {
                (false, f) if f > 0 => self.push(e.0, true, 0),
                (true, f) if f > 0 => self.push(e.0, true, f - 1),
                _ => {
                    // The victim keeps its place until the caller removes it.
                    if from_small {
                        self.small.push_front(e);
                    } else {
                        self.main.push_front(e);
                    }
                    return Some(e.0);
                }
            }
        }
        // The counts above are a shortcut: whatever they said, the answer is None only when no
        // resident block is evictable. Small queue first, then main, in queue order.
        let nodes = &self.nodes;
        self.small
            .iter()
            .chain(self.main.iter())
            .find(|e| nodes.get(&e.0).is_some_and(|n| n.seq == e.1) && evictable(&e.0))
            .map(|e| e.0)
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }
}
