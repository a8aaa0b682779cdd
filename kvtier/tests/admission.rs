//! Admission to G3 and the write budget on the real engine (real pool, real files): what is
//! rejected or dropped is simply not on G3 (a miss, then a recompute), what is admitted comes
//! back bit-exact, and the counters say which happened.

mod common;

use common::*;
use kvtier::{Admission, IoMode, NvmeConfig, Tier, TierConfig, TierEngine, WriteBudget};

fn engine(dir: &std::path::Path, admission: Admission, budget: Option<WriteBudget>) -> TierEngine {
    let g = geometry();
    let mut n = NvmeConfig::new(dir, 8);
    n.io = IoMode::Auto;
    let mut cfg = TierConfig::new(g, 4);
    cfg.nvme = Some(n);
    cfg.admission = admission;
    cfg.write_budget = budget;
    TierEngine::new(cfg).expect("engine")
}

/// Saves `ids` one call each, waiting for every save.
fn save(t: &TierEngine, g1: kvtier::G1Id, ids: impl IntoIterator<Item = u64>) {
    for i in ids {
        let c = wait(
            t,
            t.offload(g1, &[(hash(i), (i % 32) as u32)])
                .expect("queued"),
        );
        assert!(c.all_ok(), "{c:?}");
    }
}

#[test]
fn frequency_admission_keeps_one_use_blocks_off_a_g3_of_reused_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = engine(dir.path(), Admission::Frequency(4), None);
    let mut src = G1::new(geometry(), 32, 11);
    let mut dst = G1::new(geometry(), 32, 12);
    let (s, d) = (src.register(&t), dst.register(&t));
    // Blocks 0..8, each used twice (saved, then loaded), fill G3 while it has room.
    save(&t, s, 0..8);
    for i in 0..8u64 {
        let c = wait(&t, t.onboard(d, &[(hash(i), i as u32)]).expect("queued"));
        assert!(c.all_ok(), "{c:?}");
        assert_eq!(src.block((i % 32) as u32), dst.block(i as u32), "block {i}");
    }
    let before = t.stats().admission;
    assert!(before.admitted >= 4, "{before:?}");
    // A scan of blocks used once: leaving G2, they lose to G3's twice-used victims.
    save(&t, s, 100..116);
    let after = t.stats().admission;
    assert!(after.rejected > 0, "{after:?}");
    // Looked up one by one (a lookup stops at the first miss).
    let on_g3 = (0..8)
        .filter(|&i| t.lookup(&[hash(i)]).tiers == [Tier::Nvme])
        .count();
    assert!(on_g3 >= 4, "the reused blocks stay on G3: {on_g3} of 8");
    for i in 0..8u64 {
        if t.lookup(&[hash(i)]).hits == 1 {
            let c = wait(
                &t,
                t.onboard(d, &[(hash(i), 8 + i as u32)]).expect("queued"),
            );
            assert!(c.all_ok(), "{c:?}");
            assert_eq!(
                src.block((i % 32) as u32),
                dst.block(8 + i as u32),
                "block {i}"
            );
        }
    }
    t.check_consistent().expect("consistent");
}

#[test]
fn writes_over_the_budget_are_dropped_not_queued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let block = geometry().block_bytes();
    // Two blocks' worth of burst and a trickle: the test's writes all land in the same second.
    let budget = WriteBudget {
        bytes_per_sec: 1,
        burst_bytes: 2 * block,
    };
    let t = engine(dir.path(), Admission::Always, Some(budget));
    let mut src = G1::new(geometry(), 32, 21);
    let mut dst = G1::new(geometry(), 32, 22);
    let (s, d) = (src.register(&t), dst.register(&t));
    save(&t, s, 0..12);
    let a = t.stats().admission;
    assert_eq!(a.admitted, 2, "{a:?}");
    assert!(a.dropped > 0, "{a:?}");
    assert_eq!(a.bytes_admitted, 2 * block);
    // Whatever is still found loads bit-exact; the rest misses.
    let hashes: Vec<_> = (0..12).map(hash).collect();
    let found = hashes.iter().filter(|h| t.lookup(&[**h]).hits == 1).count();
    assert!(
        found >= 2,
        "the two written blocks (and G2's) are found: {found}"
    );
    for (i, h) in hashes.iter().enumerate() {
        if t.lookup(&[*h]).hits == 1 {
            let c = wait(&t, t.onboard(d, &[(*h, i as u32)]).expect("queued"));
            assert!(c.all_ok(), "{c:?}");
            assert_eq!(src.block((i % 32) as u32), dst.block(i as u32), "block {i}");
        }
    }
    t.check_consistent().expect("consistent");
}
