//! A count-min sketch of recent access frequency in bounded memory (TinyLFU's, Einziger et al.,
//! 2017): four rows of saturating counters, halved every `period` increments so old popularity
//! fades.

use kvcore::BlockHash;

use super::mix;

const ROWS: usize = 4;
/// Counters saturate here: past a handful of uses, more precision does not change decisions.
pub const MAX_COUNT: u8 = 15;

pub struct FrequencySketch {
    counters: Vec<u8>,
    mask: u64,
    period: u64,
    since_aging: u64,
    agings: u64,
}

impl FrequencySketch {
    /// Sized for about `keys` distinct keys between agings (one byte per key and row, at least
    /// 64); ages every `period` increments.
    pub fn new(keys: u64, period: u64) -> FrequencySketch {
        // At most 2^24 counters a row (64 MiB in all): past that, collisions cost less than
        // the memory would.
        let width = keys.clamp(64, 1 << 24).next_power_of_two();
        FrequencySketch {
            counters: vec![0; ROWS * width as usize],
            mask: width - 1,
            period: period.max(1),
            since_aging: 0,
            agings: 0,
        }
    }

    fn slots(&self, h: &BlockHash) -> [usize; ROWS] {
        let x = mix(h);
        // Four indexes from one 64-bit hash (Kirsch–Mitzenmacher double hashing).
        let (a, b) = (x, (x >> 32) | 1);
        let width = self.mask + 1;
        std::array::from_fn(|i| {
            (i as u64 * width + (a.wrapping_add((i as u64).wrapping_mul(b)) & self.mask)) as usize
        })
    }

    /// Counts one use; returns true when this use aged the sketch (every count halved).
    pub fn increment(&mut self, h: &BlockHash) -> bool {
        let slots = self.slots(h);
        let min = slots.iter().map(|&s| self.counters[s]).min().unwrap_or(0);
        if min < MAX_COUNT {
            // Conservative update: only the counters at the minimum grow, which keeps the
            // overestimate from collisions small.
            for s in slots {
                if self.counters[s] == min {
                    self.counters[s] += 1;
                }
            }
        }
        self.since_aging += 1;
        if self.since_aging >= self.period {
            self.since_aging = 0;
            self.agings += 1;
            for c in &mut self.counters {
                *c /= 2;
            }
            return true;
        }
        false
    }

    pub fn estimate(&self, h: &BlockHash) -> u8 {
        self.slots(h)
            .iter()
            .map(|&s| self.counters[s])
            .min()
            .unwrap_or(0)
    }

    pub fn set_period(&mut self, period: u64) {
        self.period = period.max(1);
    }

    pub fn period(&self) -> u64 {
        self.period
    }

    /// How many times the sketch has aged.
    pub fn agings(&self) -> u64 {
        self.agings
    }

    /// Bytes of counters (bounded by the capacity it was made for).
    pub fn memory(&self) -> usize {
        self.counters.len()
    }
}
