//! Replays a trace through kvtier's own bookkeeping — its `BlockIndex` with the policy under
//! test and its admission `Gate` — the way `TierEngine` drives them: a request onboards its
//! leading cached blocks (G3 hits are read into G2), then saves the rest; a full G2 lets
//! its policy's victim go, to G3 if the gate admits it there; G3 lets its own victim go for it.
//! No payloads move, so a day of traffic replays in seconds. (The engine also keeps a few G2
//! slots free ahead of demand, `spill_free_slots`; the replay gives the policy the whole tier.)

use std::time::{Duration, Instant};

use kvferry::kvcore::BlockHash;
use kvferry::kvtier::admission::{Gate, Verdict};
use kvferry::kvtier::{Admission, BlockIndex, PolicyKind, Tier, WriteBudget};

use super::Trace;

#[derive(Clone, Debug)]
pub struct Config {
    pub policy: PolicyKind,
    pub g2_blocks: u64,
    pub g3_blocks: u64,
    pub admission: Admission,
    pub budget: Option<WriteBudget>,
    pub block_bytes: u64,
}

#[cfg(test)]
impl Config {
    /// Unit-sized blocks, no budget.
    pub fn for_test(policy: PolicyKind, admission: Admission, g2: u64, g3: u64) -> Config {
        Config {
            policy,
            g2_blocks: g2,
            g3_blocks: g3,
            admission,
            budget: None,
            block_bytes: 1,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub references: u64,
    pub g2_hits: u64,
    pub g3_hits: u64,
    pub nvme_writes: u64,
    pub nvme_bytes_written: u64,
    pub rejected: u64,
    pub dropped: u64,
    pub elapsed: Duration,
}

impl Outcome {
    /// Fills in what the gate counted and how long the replay took.
    pub fn finish(&mut self, gate: &Gate, writes: u64, block_bytes: u64, start: Instant) {
        self.nvme_writes = writes;
        self.nvme_bytes_written = writes.saturating_mul(block_bytes);
        self.rejected = gate.counters.rejected;
        self.dropped = gate.counters.dropped;
        self.elapsed = start.elapsed();
    }

    pub fn hit_ratio(&self) -> f64 {
        (self.g2_hits + self.g3_hits) as f64 / self.references.max(1) as f64
    }
}

struct Sim {
    idx: BlockIndex,
    admission: Admission,
    gate: Gate,
    g2_free: Vec<u32>,
    g3_free: Vec<u64>,
    has_g3: bool,
    now: Duration,
    writes: u64,
}

impl Sim {
    /// A free G2 slot, making room by the policy's victim.
    fn g2_slot(&mut self) -> Option<u32> {
        loop {
            if let Some(s) = self.g2_free.pop() {
                return Some(s);
            }
            let v = self.idx.g2_victim()?;
            self.evict_g2(v);
        }
    }

    fn evict_g2(&mut self, v: BlockHash) {
        let Some(e) = self.idx.get(&v).copied() else {
            return;
        };
        if e.g3.is_none() && self.has_g3 {
            // As `evict_g2` in the engine: only TinyLFU compares with G3's coldest block.
            let compare =
                matches!(self.admission, Admission::Frequency(_)) && self.g3_free.is_empty();
            let g3_victim = if compare { self.idx.g3_victim() } else { None };
            if self.gate.judge(&v, e.hits, g3_victim.as_ref(), self.now) == Verdict::Write {
                let slot = match self.g3_free.pop() {
                    Some(s) => Some(s),
                    None => self.idx.g3_victim().and_then(|w| {
                        let s = self.idx.get(&w).and_then(|e| e.g3);
                        self.idx.set_g3(&w, None);
                        s
                    }),
                };
                if let Some(s) = slot {
                    self.gate.wrote();
                    self.idx.set_g3(&v, Some(s));
                    self.writes += 1;
                }
            }
        }
        if let Some(s) = e.g2 {
            self.idx.set_g2(&v, None);
            self.g2_free.push(s);
        }
    }
}

pub fn replay(t: &Trace, c: &Config) -> Outcome {
    let start = Instant::now();
    let mut sim = Sim {
        idx: BlockIndex::with_policy(c.policy, c.g2_blocks, c.g3_blocks),
        admission: c.admission,
        gate: Gate::new(c.admission, c.budget, c.g3_blocks, c.block_bytes),
        g2_free: (0..c.g2_blocks.min(u64::from(u32::MAX)) as u32)
            .rev()
            .collect(),
        g3_free: (0..c.g3_blocks).rev().collect(),
        has_g3: c.g3_blocks > 0,
        now: Duration::ZERO,
        writes: 0,
    };
    let mut out = Outcome::default();
    let mut hashes = Vec::new();
    for r in &t.requests {
        sim.now = Duration::from_millis(r.at_ms);
        hashes.clear();
        hashes.extend(r.blocks.iter().map(|&b| BlockHash::from_u64(b)));
        out.references += hashes.len() as u64;
        let cached = hashes
            .iter()
            .take_while(|h| sim.idx.tier_of(h).is_some())
            .count();
        // Onboard the cached prefix, pinned as the engine pins an onboard's blocks (a G3 hit's
        // read needs a G2 slot, which must not cost a later block of the same prefix).
        sim.idx.begin_batch();
        for h in &hashes[..cached] {
            sim.idx.pin(h);
        }
        for (d, h) in hashes[..cached].iter().enumerate() {
            sim.gate.record(h);
            sim.idx.touch(h, d as u32);
            match sim.idx.tier_of(h) {
                Some(Tier::Dram) => out.g2_hits += 1,
                Some(Tier::Nvme) => {
                    out.g3_hits += 1;
                    // Read back through G2, where it stays (and on G3) until evicted.
                    if let Some(s) = sim.g2_slot() {
                        sim.idx.set_g2(h, Some(s));
                    }
                }
                None => {}
            }
            if let Some(e) = sim.idx.entry_mut(h) {
                e.hits += 1;
            }
        }
        for h in &hashes[..cached] {
            sim.idx.unpin(h);
        }
        // Save the rest, as the connector does (the loaded prefix is not saved again): cached
        // blocks after the first miss are used again, new ones filled (pinned meanwhile, as
        // the engine pins blocks whose copies are in flight). One use per block per request.
        sim.idx.begin_batch();
        let mut new = Vec::new();
        for (d, h) in hashes.iter().enumerate().skip(cached) {
            sim.gate.record(h);
            if sim.idx.get(h).is_some() {
                sim.idx.touch(h, d as u32);
            } else {
                sim.idx.pin_new(*h, d as u32);
                new.push(*h);
            }
        }
        // As in the engine: every slot is taken (evicting as needed) before the call's copies
        // land and its blocks become resident together.
        let slots: Vec<Option<u32>> = new.iter().map(|_| sim.g2_slot()).collect();
        for (h, slot) in new.iter().zip(slots) {
            if let Some(s) = slot {
                sim.idx.set_g2(h, Some(s));
            }
            sim.idx.unpin(h);
        }
    }
    out.finish(&sim.gate, sim.writes, c.block_bytes, start);
    out
}

#[cfg(test)]
mod tests {
    use super::super::{belady, synth};
    use super::*;

    fn cfg(policy: PolicyKind, g2: u64, g3: u64) -> Config {
        Config::for_test(policy, Admission::Always, g2, g3)
    }

    #[test]
    fn no_policy_beats_the_optimum_and_g3_adds_hits() {
        let t = synth::generate(3, 3000);
        let cap = t.distinct() / 20;
        let limit = belady::hits(&t, cap);
        for p in PolicyKind::ALL {
            let o = replay(&t, &cfg(p, cap, 0));
            assert!(
                o.g2_hits <= limit,
                "{p}: {} hits over the optimum {limit}",
                o.g2_hits
            );
            assert_eq!(o.g3_hits, 0);
            let two = replay(&t, &cfg(p, cap, cap * 4));
            assert!(two.g3_hits > 0, "{p}: G3 served nothing");
            assert!(two.g2_hits + two.g3_hits >= o.g2_hits, "{p}: G3 cost hits");
            assert!(two.g2_hits + two.g3_hits <= belady::hits(&t, cap * 5));
        }
    }

    #[test]
    fn frequency_admission_writes_less() {
        let t = synth::generate(5, 3000);
        let cap = t.distinct() / 50;
        let always = replay(&t, &cfg(PolicyKind::Lru, cap, cap * 3));
        let freq = replay(
            &t,
            &Config {
                admission: Admission::Frequency(4),
                ..cfg(PolicyKind::Lru, cap, cap * 3)
            },
        );
        assert!(freq.nvme_writes < always.nvme_writes);
        assert!(freq.rejected > 0);
        assert_eq!(always.rejected, 0);
    }
}
