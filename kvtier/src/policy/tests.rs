use std::collections::HashSet;

use proptest::prelude::*;

use super::*;

fn h(i: u64) -> BlockHash {
    BlockHash::from_u64(i)
}

fn id(v: &BlockHash) -> u64 {
    u64::from_le_bytes(v.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// A cache of `cap` blocks run by `p`: each request's blocks are used in order, missing ones
/// inserted, victims removed. Returns the blocks resident at the end and how many uses hit.
fn run(p: &mut dyn EvictionPolicy, cap: usize, reqs: &[Vec<u64>]) -> (HashSet<u64>, u64) {
    let mut resident = HashSet::new();
    let mut hits = 0;
    for r in reqs {
        p.begin_batch();
        for (d, &b) in r.iter().enumerate() {
            let at = Access::at(d as u32);
            if resident.contains(&b) {
                hits += 1;
                p.touch(&h(b), at);
                continue;
            }
            while resident.len() >= cap {
                let v = p.victim(&|_| true).expect("a victim while full");
                p.remove(&v);
                assert!(
                    resident.remove(&id(&v)),
                    "victim {} was not resident",
                    id(&v)
                );
            }
            p.insert(h(b), at);
            resident.insert(b);
        }
        assert_eq!(p.len(), resident.len());
    }
    (resident, hits)
}

#[test]
fn names_parse_back() {
    for k in PolicyKind::ALL {
        assert_eq!(k.name().parse::<PolicyKind>(), Ok(k));
    }
    assert!("belady".parse::<PolicyKind>().is_err());
}

#[test]
fn lfu_evicts_a_chains_tail_before_its_head() {
    let mut p = Lfu::new(100);
    p.begin_batch();
    for d in 0..10 {
        p.insert(h(d), Access::at(d as u32));
    }
    assert_eq!(p.victim(&|_| true), Some(h(9)));
    assert_eq!(p.victim(&|v| *v != h(9)), Some(h(8)));
}

#[test]
fn frequency_aware_policies_keep_a_hot_block_through_a_burst_that_flushes_lru() {
    // Block 0 is used by every request (a shared system prompt), the rest once, and every tenth
    // request a burst of new blocks longer than the cache; the trace ends on a burst.
    let mut reqs: Vec<Vec<u64>> = Vec::new();
    let mut fresh = 1000u64;
    for i in 0..300 {
        reqs.push(vec![0, fresh]);
        fresh += 1;
        if i % 10 == 9 {
            reqs.push((fresh..fresh + 16).collect());
            fresh += 16;
        }
    }
    for kind in PolicyKind::ALL {
        let mut p = kind.build(8);
        let (left, _) = run(p.as_mut(), 8, &reqs);
        assert_eq!(
            left.contains(&0),
            kind != PolicyKind::Lru,
            "{kind}: the hot block after the burst"
        );
    }
}

#[test]
fn s3fifo_finds_an_evictable_block_behind_a_pinned_one_in_main() {
    // Found by review: main = [2 (pinned), 3 (used once)], small empty.
    let mut p = S3Fifo::new(16);
    let a = Access::default();
    p.insert(h(2), a);
    p.remove(&h(2));
    p.insert(h(2), a);
    p.begin_batch();
    p.insert(h(3), a);
    p.remove(&h(3));
    p.insert(h(3), a);
    p.touch(&h(3), a);
    assert_eq!(p.victim(&|v| *v != h(2)), Some(h(3)));
}

#[test]
fn s3fifo_memory_follows_what_is_resident() {
    let mut p = S3Fifo::new(64);
    for i in 0..100_000u64 {
        p.insert(h(i), Access::default());
        p.remove(&h(i));
    }
    assert_eq!(p.len(), 0);
    assert!(
        p.queued() < 1000,
        "{} queue entries for nothing resident",
        p.queued()
    );
}

#[test]
fn s3fifo_sends_a_block_used_again_to_main() {
    let mut p = S3Fifo::new(20);
    p.insert(h(1), Access::default());
    p.touch(&h(1), Access::default());
    for i in 2..30 {
        while p.len() >= 20 {
            let v = p.victim(&|_| true).expect("a victim");
            assert_ne!(v, h(1), "a block used twice outlives one-use blocks");
            p.remove(&v);
        }
        p.insert(h(i), Access::default());
    }
}

#[test]
fn lfu_lengthens_its_memory_when_a_hot_set_returns_after_long_scans() {
    // Rounds of: a hot set of 300 blocks, then 600 blocks used once. A 512-block cache with
    // short memory forgets the hot set during each scan; long memory keeps it.
    let mut reqs = Vec::new();
    for round in 0..30u64 {
        reqs.extend(
            (0..300u64)
                .collect::<Vec<_>>()
                .chunks(10)
                .map(|c| c.to_vec()),
        );
        let scan: Vec<u64> = (0..600).map(|i| 1_000_000 + round * 1000 + i).collect();
        reqs.extend(scan.chunks(10).map(|c| c.to_vec()));
    }
    let mut lfu = Lfu::new(512);
    let (_, lfu_hits) = run(&mut lfu, 512, &reqs);
    let (_, lru_hits) = run(&mut Lru::default(), 512, &reqs);
    assert!(
        lfu.period_multiple() > 2,
        "period {}",
        lfu.period_multiple()
    );
    assert!(
        lfu_hits > 2 * lru_hits,
        "lfu {lfu_hits} hits, lru {lru_hits}"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u8, u8),
    Touch(u8, u8),
    Remove(u8),
    Victim(u8),
    Batch,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..40, 0u8..8).prop_map(|(b, d)| Op::Insert(b, d)),
        (0u8..40, 0u8..8).prop_map(|(b, d)| Op::Touch(b, d)),
        (0u8..40).prop_map(Op::Remove),
        (0u8..4).prop_map(Op::Victim),
        Just(Op::Batch),
    ]
}

proptest! {
    /// Whatever the sequence, every policy tracks exactly the inserted, unremoved blocks and
    /// only ever names one of them that the caller accepts.
    #[test]
    fn policies_track_their_blocks(ops in proptest::collection::vec(op(), 1..300)) {
        for kind in PolicyKind::ALL {
            let mut p = kind.build(16);
            let mut model: HashSet<u64> = HashSet::new();
            for o in &ops {
                match *o {
                    Op::Insert(b, d) => {
                        p.insert(h(b.into()), Access::at(d.into()));
                        model.insert(b.into());
                    }
                    Op::Touch(b, d) => {
                        p.touch(&h(b.into()), Access::at(d.into()));
                        model.insert(b.into());
                    }
                    Op::Remove(b) => {
                        p.remove(&h(b.into()));
                        model.remove(&u64::from(b));
                    }
                    Op::Victim(m) => {
                        // Blocks whose id is divisible by m+2 are "pinned".
                        let m = u64::from(m) + 2;
                        let ok = |v: &BlockHash| id(v) % m != 0;
                        let v = p.victim(&ok);
                        let any = model.iter().any(|&b| b % m != 0);
                        match v {
                            Some(v) => {
                                let v = id(&v);
                                prop_assert!(model.contains(&v), "{kind}: victim {v} not tracked");
                                prop_assert!(v % m != 0, "{kind}: victim {v} is pinned");
                            }
                            None => prop_assert!(!any, "{kind}: no victim among {model:?}"),
                        }
                    }
                    Op::Batch => p.begin_batch(),
                }
                prop_assert_eq!(p.len(), model.len(), "{}", kind);
            }
        }
    }
}
