//! Who a G3 directory belongs to: one process per directory (a second one is refused), a
//! namespace per identity (TP rank, model and weights) so ranks and models never read each
//! other's slots, and `clear` retiring every slot for good — in the process and after restarts.

mod common;

use common::*;
use kvtier::{IoMode, NvmeConfig, TierConfig, TierEngine};

fn cfg(dir: &std::path::Path, ns: Option<&str>) -> TierConfig {
    let mut c = TierConfig::new(geometry(), 16);
    let mut n = NvmeConfig::new(dir, 32);
    n.io = IoMode::Auto;
    c.nvme = Some(n);
    c.namespace = ns.map(str::to_string);
    c
}

/// Saves blocks `hashes[i] <- src block i` and writes them to G3.
fn save(t: &TierEngine, src: &mut G1, hashes: &[u64]) -> kvtier::G1Id {
    let g1 = src.register(t);
    save_from(t, g1, hashes);
    g1
}

fn save_from(t: &TierEngine, g1: kvtier::G1Id, hashes: &[u64]) {
    let blocks: Vec<_> = hashes
        .iter()
        .enumerate()
        .map(|(i, &h)| (hash(h), i as u32))
        .collect();
    assert!(wait(t, t.offload(g1, &blocks).expect("queued")).all_ok());
    t.flush(WAIT).expect("flush");
}

#[test]
fn a_second_process_on_the_same_directory_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = TierEngine::new(cfg(dir.path(), None)).expect("first");
    let err = match TierEngine::new(cfg(dir.path(), None)) {
        Ok(_) => panic!("two engines opened one G3 directory"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("in use by another kvferry process"), "{err}");
    drop(first);
    // Released with the engine (and by the kernel if the process dies).
    TierEngine::new(cfg(dir.path(), None)).expect("after the first closed");
}

#[test]
fn tp_ranks_sharing_a_directory_each_read_their_own_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r0 = TierEngine::new(cfg(dir.path(), Some("model tp 0/2"))).expect("rank 0");
    let r1 = TierEngine::new(cfg(dir.path(), Some("model tp 1/2"))).expect("rank 1");
    // The same block hash on both ranks, with each rank's own heads.
    let (mut s0, mut s1) = (G1::new(geometry(), 4, 10), G1::new(geometry(), 4, 11));
    save(&r0, &mut s0, &[1, 2]);
    save(&r1, &mut s1, &[1, 2]);
    drop((r0, r1));
    for (ns, src) in [("model tp 0/2", &s0), ("model tp 1/2", &s1)] {
        let t = TierEngine::new(cfg(dir.path(), Some(ns))).expect("restart");
        assert_eq!(t.stats().recovered, 2, "{ns}");
        let mut dst = G1::new(geometry(), 4, 99);
        let d = dst.register(&t);
        let c = wait(
            &t,
            t.onboard(d, &[(hash(1), 3), (hash(2), 2)]).expect("queued"),
        );
        assert!(c.all_ok(), "{c:?}");
        drop(t);
        assert_eq!(dst.block(3), src.block(0), "{ns}: another rank's bytes");
        assert_eq!(dst.block(2), src.block(1), "{ns}");
    }
}

#[test]
fn a_new_model_on_the_same_directory_sees_none_of_the_old_ones_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = TierEngine::new(cfg(dir.path(), Some("llama rev 1"))).expect("old");
    save(&old, &mut G1::new(geometry(), 4, 3), &[5, 6, 7]);
    drop(old);
    let new = TierEngine::new(cfg(dir.path(), Some("llama rev 2"))).expect("new");
    let hashes = [hash(5), hash(6), hash(7)];
    assert_eq!(new.lookup(&hashes).hits, 0, "served another model's KV");
    drop(new);
    // The bare directory (no namespace) never sees namespaced slots either.
    let bare = TierEngine::new(cfg(dir.path(), None)).expect("bare");
    assert_eq!(bare.lookup(&hashes).hits, 0);
    drop(bare);
    let back = TierEngine::new(cfg(dir.path(), Some("llama rev 1"))).expect("back");
    assert_eq!(
        back.lookup(&hashes).hits,
        3,
        "its own blocks are still there"
    );
}

#[test]
fn clear_retires_every_block_now_and_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = TierEngine::new(cfg(dir.path(), Some("m"))).expect("engine");
    let mut src = G1::new(geometry(), 8, 4);
    let g1 = save(&t, &mut src, &[1, 2, 3]);
    let hashes = [hash(1), hash(2), hash(3)];
    assert_eq!(t.lookup(&hashes).hits, 3);
    assert_eq!(t.clear().expect("clear"), 3);
    assert_eq!(t.lookup(&hashes).hits, 0);
    let removed = t
        .events()
        .iter()
        .filter(|e| matches!(e, kvtier::TierEvent::Removed { .. }))
        .count();
    assert!(removed >= 3, "{removed} removal events");
    // New blocks after the reset are kept, across a restart; the old ones never come back.
    save_from(&t, g1, &[9]);
    t.check_consistent().expect("consistent");
    drop(t);
    let t = TierEngine::new(cfg(dir.path(), Some("m"))).expect("restart");
    assert_eq!(t.lookup(&hashes).hits, 0, "a cleared block came back");
    assert_eq!(t.lookup(&[hash(9)]).hits, 1);
}

#[test]
fn clear_while_an_offload_is_in_flight_drops_it_when_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = TierEngine::new(cfg(dir.path(), None)).expect("engine");
    let mut src = G1::new(geometry(), 8, 5);
    let g1 = src.register(&t);
    let blocks: Vec<_> = (0..8u32).map(|i| (hash(100 + u64::from(i)), i)).collect();
    let id = t.offload(g1, &blocks).expect("queued");
    t.clear().expect("clear");
    // Each block either failed (the driver had not started the save) or was dropped once its
    // copy ended; none may stay.
    let _ = wait(&t, id);
    // Whatever was in flight at the reset is gone once its copy ended.
    for _ in 0..100 {
        if t.lookup(&[blocks[0].0]).hits == 0 && t.stats().dram.blocks == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let hashes: Vec<_> = blocks.iter().map(|b| b.0).collect();
    assert_eq!(t.lookup(&hashes).hits, 0);
    assert_eq!(t.stats().dram.blocks, 0);
    t.check_consistent().expect("consistent");
}
