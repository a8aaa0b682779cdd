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

/// Runs being served right now, by start, counted: a request whose grant ended is handed back
/// to the engine only once none of its runs is (the engine would write what a peer reads).
pub type Serving = std::sync::Arc<parking_lot::Mutex<std::collections::HashMap<u64, u32>>>;

/// Counts its runs as being served until dropped (when the transfer is over).
pub struct ServeGuard {
    serving: Serving,
    runs: Vec<u64>,
}

impl ServeGuard {
    pub fn new(serving: &Serving, runs: Vec<u64>) -> ServeGuard {
        let mut s = serving.lock();
        for r in &runs {
            *s.entry(*r).or_default() += 1;
        }
        drop(s);
        ServeGuard {
            serving: serving.clone(),
            runs,
        }
    }
}

impl Drop for ServeGuard {
    fn drop(&mut self) {
        let mut s = self.serving.lock();
        for r in &self.runs {
            if let Some(n) = s.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    s.remove(r);
                }
            }
        }
    }
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
    #[cfg(test)]
    pub fn covers(&self, off: u64, len: u64) -> bool {
        self.covering(off, len).is_some()
    }

    /// The starts of the granted runs `[off, off + len)` lies in, if it lies wholly in them.
    pub fn covering(&self, off: u64, len: u64) -> Option<Vec<u64>> {
        let end = off.checked_add(len)?;
        if len == 0 {
            return None;
        }
        let mut pos = off;
        let mut starts = Vec::new();
        while pos < end {
            match self.runs.range(..=pos).next_back() {
                Some((&start, &(run_end, _))) if run_end > pos => {
                    starts.push(start);
                    pos = run_end;
                }
                _ => return None,
            }
        }
        Some(starts)
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

    #[test]
    fn serve_guards_count_the_runs_they_use_until_dropped() {
        let mut g = Granted::default();
        g.add(&[(0, 10), (10, 10), (40, 10)]);
        assert_eq!(g.covering(5, 10), Some(vec![0, 10]));
        assert_eq!(g.covering(20, 1), None);
        let serving = Serving::default();
        let a = ServeGuard::new(&serving, vec![0, 10]);
        let b = ServeGuard::new(&serving, vec![10]);
        assert_eq!(serving.lock().get(&10), Some(&2));
        drop(a);
        assert_eq!(serving.lock().get(&0), None);
        assert_eq!(serving.lock().get(&10), Some(&1));
        drop(b);
        assert!(serving.lock().is_empty());
    }
}
