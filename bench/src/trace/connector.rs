//! The replay as vLLM runs kvferry (`KVFerryConnector`): the scheduler owns eviction. It keeps
//! at most G3's capacity of distinct blocks (G2's without G3) in its mirror and discards its
//! policy's victims; the worker's tiers drop nothing on their own — a G2 block leaves for G3
//! (written) or, when admission says it is not worth a write, is reported unwanted and goes
//! with the scheduler's discard at the next step (`TierEvent::Unwanted`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use kvferry::kvcore::BlockHash;
use kvferry::kvtier::admission::{Gate, Verdict};
use kvferry::kvtier::{Admission, BlockIndex, EvictionPolicy};

use super::replay::{Config, Outcome};
use super::Trace;

struct Worker {
    idx: BlockIndex,
    gate: Gate,
    frequency: bool,
    g2_free: Vec<u32>,
    g3_free: Vec<u64>,
    has_g3: bool,
    /// The engine's free-slot target, which also bounds blocks marked unwanted at once.
    spill_free: usize,
    unwanted: Vec<BlockHash>,
    now: Duration,
    writes: u64,
}

impl Worker {
    fn g2_slot(&mut self) -> Option<u32> {
        loop {
            if let Some(s) = self.g2_free.pop() {
                return Some(s);
            }
            let g3_room = self.has_g3 && !self.g3_free.is_empty();
            let v = self
                .idx
                .g2_victim_where(&|e| !e.unwanted && (e.g3.is_some() || g3_room))?;
            if !self.evict_g2(v) {
                return None;
            }
        }
    }

    /// As the engine's `evict_g2` with `caller_evicts`.
    fn evict_g2(&mut self, v: BlockHash) -> bool {
        let Some(e) = self.idx.get(&v).copied() else {
            return false;
        };
        if e.g3.is_none() && self.has_g3 {
            if self.unwanted.len() >= self.spill_free {
                return false;
            }
            let g3_victim = if self.frequency {
                self.idx.g3_victim()
            } else {
                None
            };
            let verdict = self.gate.judge(&v, e.hits, g3_victim.as_ref(), self.now);
            if verdict == Verdict::Write {
                if let Some(s) = self.g3_free.pop() {
                    self.gate.wrote();
                    self.idx.set_g3(&v, Some(s));
                    self.writes += 1;
                }
            } else {
                if let Some(en) = self.idx.entry_mut(&v) {
                    en.unwanted = true;
                }
                self.unwanted.push(v);
                return false;
            }
        }
        if let Some(s) = e.g2 {
            self.idx.set_g2(&v, None);
            self.g2_free.push(s);
        }
        true
    }

    /// The scheduler's discard.
    fn drop_block(&mut self, h: &BlockHash) {
        let Some(e) = self.idx.get(h).copied() else {
            return;
        };
        if let Some(s) = e.g2 {
            self.idx.set_g2(h, None);
            self.g2_free.push(s);
        }
        if let Some(s) = e.g3 {
            self.idx.set_g3(h, None);
            self.g3_free.push(s);
        }
    }
}

pub fn replay(t: &Trace, c: &Config) -> Outcome {
    let start = Instant::now();
    let capacity = if c.g3_blocks > 0 {
        c.g3_blocks
    } else {
        c.g2_blocks
    };
    let mut sched: Box<dyn EvictionPolicy> = c.policy.build(capacity);
    let mut mirror: HashSet<BlockHash> = HashSet::new();
    let mut w = Worker {
        idx: BlockIndex::with_policy(c.policy, c.g2_blocks, c.g3_blocks),
        gate: Gate::new(c.admission, c.budget, c.g3_blocks, c.block_bytes),
        frequency: matches!(c.admission, Admission::Frequency(_)),
        g2_free: (0..c.g2_blocks.min(u64::from(u32::MAX)) as u32)
            .rev()
            .collect(),
        g3_free: (0..c.g3_blocks).rev().collect(),
        has_g3: c.g3_blocks > 0,
        spill_free: (c.g2_blocks / 8).max(1) as usize,
        unwanted: Vec::new(),
        now: Duration::ZERO,
        writes: 0,
    };
    let mut out = Outcome::default();
    for r in &t.requests {
        w.now = Duration::from_millis(r.at_ms);
        // The step begins with the discards of blocks the worker reported unwanted.
        for h in std::mem::take(&mut w.unwanted) {
            mirror.remove(&h);
            sched.remove(&h);
            w.drop_block(&h);
        }
        let hashes: Vec<BlockHash> = r.blocks.iter().map(|&b| BlockHash::from_u64(b)).collect();
        out.references += hashes.len() as u64;
        let cached = hashes.iter().take_while(|h| mirror.contains(h)).count();
        sched.begin_batch();
        w.idx.begin_batch();
        for h in &hashes[..cached] {
            w.idx.pin(h);
        }
        for (d, h) in hashes[..cached].iter().enumerate() {
            sched.touch(h, kvferry::kvtier::Access::at(d as u32));
            w.gate.record(h);
            w.idx.touch(h, d as u32);
            match w.idx.get(h).map(|e| (e.g2, e.g3)) {
                Some((Some(_), _)) => out.g2_hits += 1,
                Some((None, Some(_))) => {
                    out.g3_hits += 1;
                    if let Some(s) = w.g2_slot() {
                        w.idx.set_g2(h, Some(s));
                    }
                }
                _ => {}
            }
            if let Some(e) = w.idx.entry_mut(h) {
                e.hits += 1;
            }
        }
        for h in &hashes[..cached] {
            w.idx.unpin(h);
        }
        // Saves of the blocks the mirror lacks, after room is made under the capacity.
        let new: Vec<(usize, BlockHash)> = hashes
            .iter()
            .enumerate()
            .skip(cached)
            .filter(|(_, h)| !mirror.contains(h))
            .map(|(d, h)| (d, *h))
            .collect();
        let mut over = (mirror.len() + new.len()).saturating_sub(capacity as usize);
        while over > 0 {
            let Some(v) = sched.victim(&|_| true) else {
                break;
            };
            sched.remove(&v);
            mirror.remove(&v);
            w.drop_block(&v);
            over -= 1;
        }
        w.idx.begin_batch();
        let mut pinned = Vec::new();
        for &(d, h) in &new {
            w.gate.record(&h);
            if w.idx.get(&h).is_some() {
                continue;
            }
            // G3 must be able to take every block not on it (the engine refuses otherwise).
            let need = w.idx.len() - w.idx.g3_len();
            if w.has_g3 && need >= w.g3_free.len() {
                continue;
            }
            w.idx.pin_new(h, d as u32);
            pinned.push((d, h));
        }
        let slots: Vec<Option<u32>> = pinned.iter().map(|_| w.g2_slot()).collect();
        sched.begin_batch();
        for ((d, h), slot) in pinned.iter().zip(slots) {
            if let Some(s) = slot {
                w.idx.set_g2(h, Some(s));
                mirror.insert(*h);
                sched.touch(h, kvferry::kvtier::Access::at(*d as u32));
            }
            w.idx.unpin(h);
        }
    }
    out.finish(&w.gate, w.writes, c.block_bytes, start);
    out
}

#[cfg(test)]
mod tests {
    use super::super::{belady, synth};
    use super::*;
    use kvferry::kvtier::PolicyKind;

    fn cfg(policy: PolicyKind, admission: Admission, g2: u64, g3: u64) -> Config {
        Config::for_test(policy, admission, g2, g3)
    }

    #[test]
    fn the_scheduler_bounds_what_is_kept_and_admission_writes_less() {
        let t = synth::generate(9, 3000);
        let (g2, g3) = (t.distinct() / 50, t.distinct() / 10);
        for p in PolicyKind::ALL {
            let all = replay(&t, &cfg(p, Admission::Always, g2, g3));
            // Everything kept is within G3's capacity: no more hits than the optimum there.
            assert!(all.g2_hits + all.g3_hits <= belady::hits(&t, g3), "{p}");
            assert!(all.g3_hits > 0 && all.rejected == 0, "{p}: {all:?}");
            let some = replay(&t, &cfg(p, Admission::Frequency(4), g2, g3));
            assert!(some.rejected > 0, "{p}: {some:?}");
            assert!(some.nvme_writes < all.nvme_writes, "{p}");
        }
    }
}
