//! Prefix-aware LFU with adaptive aging: kvferry's default eviction.
//!
//! Order: least frequently used first (a count-min sketch of recent uses, halved every `period`
//! uses), then least recently used (by call), then deepest in its chain first. Prefix-aware by
//! construction: every use of a chain's tail is also a use of its head, so a head is never less
//! frequent than its tail, and among equals the tail goes first — a prefix cache keeps what it
//! can still hit.
//!
//! How fast popularity fades decides everything on real traces: short memory behaves like LRU
//! (best when the cache is large against the working set), long memory like LFU (best when it is
//! small). Which is right depends on the capacity and the workload, so the period is not a
//! constant: shadow caches (one per candidate period) replay a hash-sampled 1/S of the keys at
//! 1/S of the capacity (spatial sampling, Waldspurger et al., FAST '15) and the real cache takes
//! the period of the shadow with the most hits over the recent past.

use std::collections::{BTreeSet, HashMap};

use kvcore::BlockHash;

use super::sketch::FrequencySketch;
use super::{Access, EvictionPolicy};

/// Candidate aging periods, in multiples of the capacity; 0 is no frequency at all (prefix-aware
/// LRU), the right answer when the cache is large against the working set.
const PERIODS: [u64; 6] = [0, 1, 2, 4, 8, 16];
/// The sketch is as wide as the longest period has distinct keys at most: narrower, and
/// collisions turn long memory into noise (64 bytes per cached block; a block is megabytes).
const SKETCH_KEYS_PER_BLOCK: u64 = 16;
const START_PERIOD: u64 = 0;
/// Another period is taken only when its shadow beats the current one's by this fraction:
/// shadows are samples, and near-equal scores are noise.
const SWITCH_MARGIN: f64 = 1.0 / 32.0;
/// Shadows hold at least this many blocks each, or the sample is noise.
const MIN_SHADOW: u64 = 256;
const MAX_SAMPLE: u64 = 16;
/// Seeds the sampling hash apart from the sketch's, so sampled keys spread over the sketch.
const SAMPLE_SEED: u64 = 0x6b76_6665_7272_7921;
/// Capacities beyond this (2^40 blocks) are treated as this.
const MAX_CAPACITY: u64 = 1 << 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    freq: u8,
    batch: u64,
    /// `u32::MAX - depth`: deeper sorts first.
    tail: u32,
}

/// The ordering itself, without adaptation (what the shadows are made of).
struct Core {
    cap: u64,
    /// The aging period in multiples of `cap`; 0: frequency ignored.
    mult: u64,
    sketch: FrequencySketch,
    batch: u64,
    keys: HashMap<BlockHash, Key>,
    order: BTreeSet<(Key, BlockHash)>,
}

impl Core {
    fn new(cap: u64, period_mult: u64) -> Core {
        let cap = cap.clamp(1, MAX_CAPACITY);
        Core {
            cap,
            mult: period_mult,
            sketch: FrequencySketch::new(
                cap.saturating_mul(SKETCH_KEYS_PER_BLOCK),
                cap.saturating_mul(period_mult.max(1)),
            ),
            batch: 0,
            keys: HashMap::new(),
            order: BTreeSet::new(),
        }
    }

    fn set_period_mult(&mut self, m: u64) {
        if m != self.mult {
            self.mult = m;
            self.sketch.set_period(self.cap.saturating_mul(m.max(1)));
            // Turning frequency off (or on) reorders every resident block.
            self.rekey();
        }
    }

    fn freq(&self, h: &BlockHash) -> u8 {
        if self.mult == 0 {
            0
        } else {
            self.sketch.estimate(h)
        }
    }

    /// Counts a use of `h`; (re)keys it when resident or `insert`. Returns whether it was
    /// resident before.
    fn access(&mut self, h: &BlockHash, at: Access, insert: bool) -> bool {
        // Aging reorders resident blocks only when their order depends on frequency. (It costs
        // O(n log n) once per `mult` × capacity uses: amortized O(log n) per use.)
        if self.sketch.increment(h) && self.mult > 0 {
            self.rekey();
        }
        let old = self.keys.get(h).copied();
        if old.is_none() && !insert {
            return false;
        }
        if let Some(k) = old {
            self.order.remove(&(k, *h));
        }
        let k = Key {
            freq: self.freq(h),
            batch: self.batch,
            tail: u32::MAX - at.depth,
        };
        self.keys.insert(*h, k);
        self.order.insert((k, *h));
        old.is_some()
    }

    /// After aging every frequency halved: resident keys take their new counts.
    fn rekey(&mut self) {
        self.order.clear();
        let keys = std::mem::take(&mut self.keys);
        for (h, mut k) in keys {
            k.freq = self.freq(&h);
            self.order.insert((k, h));
            self.keys.insert(h, k);
        }
    }

    fn remove(&mut self, h: &BlockHash) {
        if let Some(k) = self.keys.remove(h) {
            self.order.remove(&(k, *h));
        }
    }

    fn first(&self, evictable: &dyn Fn(&BlockHash) -> bool) -> Option<BlockHash> {
        self.order.iter().map(|(_, h)| *h).find(|h| evictable(h))
    }
}

/// One candidate period, replayed on the sampled keys.
struct Shadow {
    mult: u64,
    core: Core,
    hits: u64,
    /// This call's sampled chain missed here already: later blocks of it are no prefix hits.
    broken: bool,
}

impl Shadow {
    fn reference(&mut self, h: &BlockHash, at: Access) {
        let was = self.core.access(h, at, true);
        if was && !self.broken {
            self.hits += 1;
        }
        self.broken |= !was;
        while self.core.keys.len() as u64 > self.core.cap {
            let Some(v) = self.core.first(&|v| v != h) else {
                break;
            };
            self.core.remove(&v);
        }
    }
}

pub struct Lfu {
    core: Core,
    mult: u64,
    shadows: Vec<Shadow>,
    sample: u64,
    sampled: u64,
}

impl Lfu {
    /// For a tier of `capacity` blocks.
    pub fn new(capacity: u64) -> Lfu {
        let capacity = capacity.clamp(1, MAX_CAPACITY);
        let sample = (capacity / MIN_SHADOW).clamp(1, MAX_SAMPLE);
        let shadow_cap = (capacity / sample).max(1);
        Lfu {
            core: Core::new(capacity, START_PERIOD),
            mult: START_PERIOD,
            shadows: PERIODS
                .iter()
                .map(|&mult| Shadow {
                    mult,
                    core: Core::new(shadow_cap, mult),
                    hits: 0,
                    broken: false,
                })
                .collect(),
            sample,
            sampled: 0,
        }
    }

    /// The aging period in use, in multiples of the capacity.
    pub fn period_multiple(&self) -> u64 {
        self.mult
    }

    fn observe(&mut self, h: &BlockHash, at: Access) {
        let x = xxhash_rust::xxh3::xxh3_64_with_seed(h.as_bytes(), SAMPLE_SEED);
        if x % self.sample != 0 {
            return;
        }
        for s in &mut self.shadows {
            s.reference(h, at);
        }
        self.sampled += 1;
        // Decide once per shadow capacity of sampled uses, then let the past fade by half.
        let every = self.shadows.first().map_or(1, |s| s.core.cap);
        if self.sampled >= every {
            self.sampled = 0;
            let current = self.shadows.iter().find(|s| s.mult == self.mult);
            let bar = current.map_or(0.0, |s| s.hits as f64 * (1.0 + SWITCH_MARGIN));
            if let Some(best) = self.shadows.iter().max_by_key(|s| s.hits) {
                if best.hits as f64 > bar {
                    self.mult = best.mult;
                }
            }
            self.core.set_period_mult(self.mult);
            for s in &mut self.shadows {
                s.hits /= 2;
            }
        }
    }
}

impl EvictionPolicy for Lfu {
    fn begin_batch(&mut self) {
        self.core.batch += 1;
        for s in &mut self.shadows {
            s.core.batch += 1;
            s.broken = false;
        }
    }

    fn insert(&mut self, h: BlockHash, at: Access) {
        self.observe(&h, at);
        self.core.access(&h, at, true);
    }

    fn touch(&mut self, h: &BlockHash, at: Access) {
        self.observe(h, at);
        self.core.access(h, at, true);
    }

    fn remove(&mut self, h: &BlockHash) {
        self.core.remove(h);
    }

    fn victim(&mut self, evictable: &dyn Fn(&BlockHash) -> bool) -> Option<BlockHash> {
        self.core.first(evictable)
    }

    fn len(&self) -> usize {
        self.core.keys.len()
    }
}
