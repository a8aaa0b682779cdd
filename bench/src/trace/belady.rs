//! The offline optimum the replay is measured against: Belady's MIN with bypass — evict the
//! block used furthest in the future, never keep one that is not used again — counting only
//! prefix hits, as the replay does; ties (blocks next used by the same request) go deepest
//! first. It is the classic offline optimum for hits of single blocks; with prefix hits it is a
//! reference, not a proven bound (no policy here has come within a few percent of it).

use std::collections::{BinaryHeap, HashMap};

use super::{prefix_hits, Trace};

/// For every reference (in trace order), the request that next uses the same block
/// (`u32::MAX`: none).
fn next_uses(t: &Trace) -> Vec<u32> {
    let refs = t.references() as usize;
    let mut next = vec![u32::MAX; refs];
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut k = refs;
    for (i, r) in t.requests.iter().enumerate().rev() {
        for b in r.blocks.iter().rev() {
            k -= 1;
            if let Some(&n) = seen.get(b) {
                next[k] = n;
            }
            seen.insert(*b, i as u32);
        }
    }
    next
}

/// Prefix hits at `capacity` blocks.
pub fn hits(t: &Trace, capacity: u64) -> u64 {
    let next = next_uses(t);
    // Among blocks next used by the same request, the deepest goes first: what stays is a
    // prefix of that request, the only part of it a prefix cache can use.
    let mut cache: HashMap<u64, (u32, u32)> = HashMap::new();
    let mut heap: BinaryHeap<((u32, u32), u64)> = BinaryHeap::new();
    let mut total = 0u64;
    let mut k = 0;
    for r in &t.requests {
        total += prefix_hits(&r.blocks, |b| cache.contains_key(&b)) as u64;
        for (d, b) in r.blocks.iter().enumerate() {
            let n = next[k];
            k += 1;
            if n == u32::MAX {
                cache.remove(b);
                continue;
            }
            let key = (n, d as u32);
            cache.insert(*b, key);
            heap.push((key, *b));
            while cache.len() as u64 > capacity {
                let Some((key, v)) = heap.pop() else { break };
                if cache.get(&v) == Some(&key) {
                    cache.remove(&v);
                }
            }
        }
    }
    total
}

/// Prefix hits of LRU told, for each block, whether it is used again (blocks that are not are
/// never kept): what perfect admission alone gives, without knowing when. An online policy
/// that cannot predict reuse better than this stays below it.
pub fn oracle_lru_hits(t: &Trace, capacity: u64) -> u64 {
    let next = next_uses(t);
    let mut at: HashMap<u64, u64> = HashMap::new();
    let mut order: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    let (mut clock, mut total, mut k) = (0u64, 0u64, 0usize);
    for r in &t.requests {
        total += prefix_hits(&r.blocks, |b| at.contains_key(&b)) as u64;
        for b in &r.blocks {
            let n = next[k];
            k += 1;
            if let Some(old) = at.remove(b) {
                order.remove(&old);
            }
            if n == u32::MAX {
                continue;
            }
            clock += 1;
            at.insert(*b, clock);
            order.insert(clock, *b);
            while at.len() as u64 > capacity {
                let Some((_, v)) = order.pop_first() else {
                    break;
                };
                at.remove(&v);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::super::Request;
    use super::*;

    #[test]
    fn keeps_what_comes_back_soonest_and_skips_what_never_does() {
        // Capacity 1: block 1 is used again next, block 2 never, block 3 much later.
        let t = Trace {
            name: "t".into(),
            block_tokens: 1,
            requests: [vec![1], vec![2], vec![1], vec![3], vec![1], vec![3]]
                .into_iter()
                .map(|blocks| Request { at_ms: 0, blocks })
                .collect(),
        };
        assert_eq!(hits(&t, 1), 2, "1 twice; keeping 3 would cost a hit on 1");
        assert_eq!(hits(&t, 2), 3);
        // LRU that skips block 2 (and 1 after its last use): 1 hits once, then 3 pushes it
        // out and hits itself.
        assert_eq!(oracle_lru_hits(&t, 1), 2);
        assert_eq!(oracle_lru_hits(&t, 2), 3);
    }
}
