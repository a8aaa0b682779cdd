//! What the prefill side lets decoders read over TCP: the bytes of blocks under live grants, and
//! nothing else of the exported cache (not the gaps between layer tensors, not the blocks of
//! running requests, not blocks already handed back to the engine). Two grants can hold the
//! same block (a shared prefix), so each byte run is counted.

use std::collections::BTreeMap;

/// Byte runs `[start, end)` of granted blocks, with how many grants hold each.
#[derive(Default)]
pub struct Granted {
    runs: BTreeMap<u64, (u64, u32)>,
}

impl Granted {
    pub fn add(&mut self, runs: &[(u64, u64)]) {
        for &(off, len) in runs {
            let e = self.runs.entry(off).or_insert((off + len, 0));
            e.0 = e.0.max(off + len);
            e.1 += 1;
        }
    }

    pub fn remove(&mut self, runs: &[(u64, u64)]) {
        for &(off, _) in runs {
            if let Some(e) = self.runs.get_mut(&off) {
                e.1 -= 1;
                if e.1 == 0 {
                    self.runs.remove(&off);
                }
            }
        }
    }

    /// Whether `[off, off + len)` lies wholly inside granted runs (adjacent runs count as one).
    pub fn covers(&self, off: u64, len: u64) -> bool {
        let Some(end) = off.checked_add(len) else {
            return false;
        };
        let mut pos = off;
        while pos < end {
            match self.runs.range(..=pos).next_back() {
                Some((_, &(run_end, _))) if run_end > pos => pos = run_end,
                _ => return false,
            }
        }
        len > 0
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_granted_runs_only_and_counts_shared_ones() {
        let mut g = Granted::default();
        g.add(&[(100, 50), (150, 50), (400, 10)]);
        assert!(g.covers(100, 100), "adjacent runs");
        assert!(g.covers(120, 10));
        assert!(!g.covers(90, 20), "starts before");
        assert!(!g.covers(190, 20), "runs past");
        assert!(!g.covers(200, 1));
        assert!(!g.covers(405, 10));
        assert!(!g.covers(u64::MAX - 1, 5));
        assert!(!g.covers(100, 0));
        // A second grant on the same block keeps it readable until both end.
        g.add(&[(400, 10)]);
        g.remove(&[(400, 10)]);
        assert!(g.covers(400, 10));
        g.remove(&[(400, 10)]);
        assert!(!g.covers(400, 10));
        g.remove(&[(100, 50), (150, 50)]);
        assert!(g.is_empty());
    }
}
