//! The tier engine on real memory and real files: round trips are bit-exact; pressure evicts
//! and spills while the index stays consistent; a restart recovers the index and drops corrupt
//! or stale slots; faults give errors the caller can act on, never wrong bytes.

mod common;

use common::*;
use kvtier::kvcore::{Dtype, Geometry};
use kvtier::{IoMode, NvmeConfig, Tier, TierConfig, TierEngine, TierError};

fn nvme(dir: &std::path::Path, slots: u64, io: IoMode) -> NvmeConfig {
    let mut n = NvmeConfig::new(dir, slots);
    n.io = io;
    n.files = 2;
    n
}

#[test]
fn dram_round_trip_is_bit_exact() {
    dram_round_trip(kvcore::StrideOrder::Blhnc);
}

#[test]
fn dram_round_trip_is_bit_exact_with_token_major_blocks() {
    dram_round_trip(kvcore::StrideOrder::Blnhc);
}

#[test]
fn g3_files_are_not_recovered_under_another_block_order() {
    let g = geometry();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = G1::new(g, 8, 9);
    fill_store(dir.path(), g, 8, &mut src);
    let mut cfg = TierConfig::new(g, 64);
    cfg.nvme = Some(nvme(dir.path(), 64, IoMode::Auto));
    cfg.block_order = kvcore::StrideOrder::Blnhc;
    let t = TierEngine::new(cfg).expect("engine");
    let hashes: Vec<_> = (0..8u64).map(hash).collect();
    assert_eq!(
        t.lookup(&hashes).hits,
        0,
        "blocks of the other order must not be served"
    );
    let mut bad = TierConfig::new(g, 4);
    bad.block_order = kvcore::StrideOrder::Lbnhc;
    assert!(TierEngine::new(bad).is_err());
}

fn dram_round_trip(order: kvcore::StrideOrder) {
    let g = geometry();
    let mut cfg = TierConfig::new(g, 16);
    cfg.block_order = order;
    let t = TierEngine::new(cfg).expect("engine");
    let mut src = G1::new(g, 32, 1);
    let mut dst = G1::new(g, 32, 2);
    let (s, d) = (src.register(&t), dst.register(&t));
    let blocks: Vec<_> = (0..10u32)
        .map(|i| (hash(u64::from(i)), 3 * i % 32))
        .collect();
    let c = wait(&t, t.offload(s, &blocks).expect("queued"));
    assert!(c.all_ok(), "{c:?}");
    let hashes: Vec<_> = blocks.iter().map(|b| b.0).collect();
    let l = t.lookup(&hashes);
    assert_eq!(l.hits, 10);
    assert!(l.tiers.iter().all(|&x| x == Tier::Dram));
    let targets: Vec<_> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| (b.0, 31 - i as u32))
        .collect();
    let c = wait(&t, t.onboard(d, &targets).expect("queued"));
    assert!(c.all_ok(), "{c:?}");
    drop(t);
    for (i, (_, sb)) in blocks.iter().enumerate() {
        assert_eq!(src.block(*sb), dst.block(31 - i as u32), "block {i}");
    }
}

fn pressure_round_trip(io: IoMode) {
    let g = geometry();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = TierConfig::new(g, 8);
    cfg.nvme = Some(nvme(dir.path(), 64, io));
    let t = TierEngine::new(cfg).expect("engine");
    let backend = t.stats().io_backend;
    match io {
        IoMode::Threads => assert_eq!(backend, "threads"),
        _ => assert!(backend.starts_with("io_uring"), "{backend}"),
    }
    let mut src = G1::new(g, 48, 3);
    let mut dst = G1::new(g, 48, 4);
    let (s, d) = (src.register(&t), dst.register(&t));
    // 40 blocks through an 8-slot DRAM tier: most must spill to NVMe.
    let blocks: Vec<_> = (0..40u32).map(|i| (hash(u64::from(i)), i)).collect();
    for chunk in blocks.chunks(5) {
        let c = wait(&t, t.offload(s, chunk).expect("queued"));
        assert!(c.all_ok(), "{c:?}");
    }
    t.check_consistent()
        .expect("index consistent under pressure");
    let st = t.stats();
    assert!(st.nvme.blocks >= 32, "{st:?}");
    assert!(st.dram.blocks <= 8);
    let hashes: Vec<_> = blocks.iter().map(|b| b.0).collect();
    assert_eq!(t.lookup(&hashes).hits, 40);
    let targets: Vec<_> = blocks.iter().map(|b| (b.0, 47 - b.1)).collect();
    for chunk in targets.chunks(7) {
        let c = wait(&t, t.onboard(d, chunk).expect("queued"));
        assert!(c.all_ok(), "{c:?}");
    }
    t.check_consistent()
        .expect("index consistent after onboarding");
    let st = t.stats();
    assert!(
        st.nvme.hits >= 32 && st.nvme.bytes_out >= 32 * g.block_bytes(),
        "{st:?}"
    );
    assert!(t.events().iter().any(|e| matches!(
        e,
        kvtier::TierEvent::Stored {
            tier: Tier::Nvme,
            ..
        }
    )));
    drop(t);
    for b in 0..40u32 {
        assert_eq!(src.block(b), dst.block(47 - b), "block {b}");
    }
}

#[test]
fn pressure_spills_and_onboards_bit_exact_with_io_uring() {
    pressure_round_trip(IoMode::Uring);
}

#[test]
fn pressure_spills_and_onboards_bit_exact_with_threads() {
    pressure_round_trip(IoMode::Threads);
}

/// Offloads `n` blocks and flushes them to NVMe, then drops the engine.
fn fill_store(dir: &std::path::Path, g: Geometry, n: u32, src: &mut G1) {
    let mut cfg = TierConfig::new(g, 64);
    cfg.nvme = Some(nvme(dir, 64, IoMode::Auto));
    let t = TierEngine::new(cfg).expect("engine");
    let s = src.register(&t);
    let blocks: Vec<_> = (0..n).map(|i| (hash(u64::from(i)), i)).collect();
    assert!(wait(&t, t.offload(s, &blocks).expect("queued")).all_ok());
    assert_eq!(t.flush(WAIT).expect("flush"), n as usize);
}

fn damage(path: &std::path::Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("store file");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).expect("write");
    f.sync_all().expect("sync");
}

/// Finds the slot holding block `i` by scanning headers (as recovery does).
fn slot_of(dir: &std::path::Path, g: Geometry, i: u64) -> (std::path::PathBuf, u64) {
    let (tx, _rx) = crossbeam_channel_unbounded();
    let slot_bytes = 4096 + g.block_bytes().div_ceil(4096) * 4096;
    let store = kvtier::NvmeStore::open(&nvme(dir, 64, IoMode::Threads), slot_bytes, None, tx)
        .expect("reopen");
    let slot = store
        .scan()
        .expect("scan")
        .into_iter()
        .find_map(|s| s.header.ok().filter(|h| h.hash == hash(i)).map(|_| s.slot))
        .expect("block is on disk");
    store.file_of(slot)
}

fn crossbeam_channel_unbounded() -> (
    crossbeam_channel::Sender<kvtier::IoDone>,
    crossbeam_channel::Receiver<kvtier::IoDone>,
) {
    crossbeam_channel::unbounded()
}

#[test]
fn notes_come_back_with_their_blocks_after_a_restart_and_never_with_another() {
    let g = geometry();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = G1::new(g, 32, 5);
    {
        // 8 DRAM slots for 24 blocks: the unnoted blocks 8.. reuse the slots (and the header
        // pages) the noted blocks 0..8 spilled from.
        let mut cfg = TierConfig::new(g, 8);
        cfg.nvme = Some(nvme(dir.path(), 64, IoMode::Auto));
        let t = TierEngine::new(cfg).expect("engine");
        let s = src.register(&t);
        let noted: Vec<_> = (0..8u32).map(|i| (hash(u64::from(i)), i)).collect();
        let notes = (0..8u8)
            .map(|i| vec![i; 1 + usize::from(i) * 100])
            .collect();
        assert!(wait(&t, t.offload_noted(s, &noted, notes).expect("queued")).all_ok());
        for chunk in (8..24u32).collect::<Vec<_>>().chunks(4) {
            let blocks: Vec<_> = chunk.iter().map(|&i| (hash(u64::from(i)), i)).collect();
            assert!(wait(&t, t.offload(s, &blocks).expect("queued")).all_ok());
        }
        t.flush(WAIT).expect("flush");
        assert!(t.take_recovered_notes().is_empty(), "nothing was recovered");
        let short = t.offload_noted(s, &noted[..2], vec![vec![1]]);
        assert!(matches!(short, Err(TierError::Config(_))), "{short:?}");
    }
    let mut cfg = TierConfig::new(g, 8);
    cfg.nvme = Some(nvme(dir.path(), 64, IoMode::Auto));
    let t = TierEngine::new(cfg).expect("reopen");
    assert_eq!(t.stats().recovered, 24);
    let mut notes = t.take_recovered_notes();
    notes.sort_by_key(|(h, n)| (n.len(), *h));
    let want: Vec<_> = (0..8u8)
        .map(|i| (hash(u64::from(i)), vec![i; 1 + usize::from(i) * 100]))
        .collect();
    assert_eq!(
        notes, want,
        "each noted block's own note, and no other block's"
    );
    assert!(t.take_recovered_notes().is_empty(), "handed out once");
}

#[test]
fn restart_recovers_index_and_drops_corrupt_slots() {
    let g = geometry();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = G1::new(g, 32, 5);
    fill_store(dir.path(), g, 20, &mut src);
    // Block 3: header damaged (dropped at recovery). Block 7: payload damaged (caught on read).
    let (p3, o3) = slot_of(dir.path(), g, 3);
    damage(&p3, o3 + 10);
    let (p7, o7) = slot_of(dir.path(), g, 7);
    damage(&p7, o7 + 4096 + 1000);

    let mut cfg = TierConfig::new(g, 8);
    cfg.nvme = Some(nvme(dir.path(), 64, IoMode::Auto));
    let t = TierEngine::new(cfg).expect("reopen");
    let st = t.stats();
    assert_eq!((st.recovered, st.dropped), (19, 1), "{st:?}");
    let hashes: Vec<_> = (0..20).map(hash).collect();
    assert_eq!(
        t.lookup(&hashes).hits,
        3,
        "block 3 is gone, so the prefix stops there"
    );
    assert_eq!(t.lookup(&hashes[4..]).hits, 16);

    let mut dst = G1::new(g, 32, 6);
    let before = dst.mem.clone();
    let d = dst.register(&t);
    let targets: Vec<_> = (0..20u32).map(|i| (hash(u64::from(i)), i)).collect();
    let c = wait(&t, t.onboard(d, &targets).expect("queued"));
    for b in &c.blocks {
        let i = (0..20).find(|&i| hash(i) == b.hash).expect("known") as u32;
        match i {
            3 => assert!(
                matches!(b.result, Err(TierError::Miss(_))),
                "{:?}",
                b.result
            ),
            7 => assert!(
                matches!(
                    &b.result,
                    Err(TierError::Slot {
                        source: kvtier::kvcore::SlotError::PayloadChecksum { .. },
                        ..
                    })
                ),
                "{:?}",
                b.result
            ),
            _ => assert!(b.result.is_ok(), "block {i}: {:?}", b.result),
        }
    }
    assert_eq!(
        t.lookup(&hashes[7..8]).hits,
        0,
        "a corrupt slot is dropped once seen"
    );
    t.check_consistent().expect("consistent");
    drop(t);
    for i in 0..20u32 {
        if i == 3 || i == 7 {
            assert_eq!(
                dst.block(i),
                G1 {
                    layout: dst.layout.clone(),
                    mem: before.clone()
                }
                .block(i),
                "failed block {i} untouched"
            );
        } else {
            assert_eq!(src.block(i), dst.block(i), "block {i}");
        }
    }
}

#[test]
fn verify_on_recover_drops_torn_payloads_up_front() {
    let g = geometry();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = G1::new(g, 32, 7);
    fill_store(dir.path(), g, 6, &mut src);
    let (p, o) = slot_of(dir.path(), g, 2);
    damage(&p, o + 4096 + g.block_bytes() - 1);
    let mut cfg = TierConfig::new(g, 8);
    cfg.nvme = Some(nvme(dir.path(), 64, IoMode::Auto));
    cfg.verify_on_recover = true;
    let t = TierEngine::new(cfg).expect("reopen");
    assert_eq!((t.stats().recovered, t.stats().dropped), (5, 1));
    assert_eq!(t.lookup(&[hash(2)]).hits, 0);
}

#[test]
fn another_geometry_never_sees_old_blocks() {
    let g = geometry();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = G1::new(g, 32, 8);
    fill_store(dir.path(), g, 6, &mut src);
    // Same block size, other dtype: the bytes would fit, but they mean something else.
    let other = Geometry::mha(3, 2, 64, Dtype::Bf16, 32).expect("valid");
    let mut cfg = TierConfig::new(other, 8);
    cfg.nvme = Some(nvme(dir.path(), 64, IoMode::Auto));
    let t = TierEngine::new(cfg).expect("reopen");
    assert_eq!((t.stats().recovered, t.stats().dropped), (0, 6));
    assert_eq!(t.lookup(&[hash(0)]).hits, 0);
    // And a G1 cache of the wrong geometry is refused at registration, naming the field.
    let mut wrong = G1::new(g, 4, 1);
    // SAFETY: the call fails before anything is registered.
    let err = unsafe { t.register_g1(wrong.layout.clone(), wrong.mem.as_mut_ptr()) }
        .expect_err("dtype differs");
    assert!(err.to_string().contains("dtype"), "{err}");
}

#[test]
fn truncated_store_file_gives_an_error_not_bytes() {
    let g = geometry();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = G1::new(g, 32, 9);
    let mut cfg = TierConfig::new(g, 4);
    cfg.nvme = Some(nvme(dir.path(), 64, IoMode::Auto));
    let t = TierEngine::new(cfg).expect("engine");
    let s = src.register(&t);
    let blocks: Vec<_> = (0..12u32).map(|i| (hash(u64::from(i)), i)).collect();
    assert!(wait(&t, t.offload(s, &blocks).expect("queued")).all_ok());
    t.flush(WAIT).expect("flush");
    // Cut every store file to 4 KiB behind the engine's back: reads come up short.
    for e in std::fs::read_dir(dir.path()).expect("dir") {
        let p = e.expect("entry").path();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open")
            .set_len(4096)
            .expect("truncate");
    }
    let mut dst = G1::new(g, 32, 10);
    let d = dst.register(&t);
    let targets: Vec<_> = blocks.iter().map(|b| (b.0, b.1)).collect();
    let c = wait(&t, t.onboard(d, &targets).expect("queued"));
    let on_disk_only: Vec<_> = c.blocks.iter().filter(|b| b.result.is_err()).collect();
    assert!(
        !on_disk_only.is_empty(),
        "blocks evicted to NVMe must fail to load"
    );
    // The first reads come up short; three in a row take G3 out of service, and the blocks
    // behind them are not read at all.
    let short = on_disk_only
        .iter()
        .filter(|b| {
            matches!(
                b.result,
                Err(TierError::ShortIo { .. } | TierError::Io { .. })
            )
        })
        .count();
    assert!(short >= 1, "{on_disk_only:?}");
    for b in &on_disk_only {
        assert!(
            matches!(
                b.result,
                Err(TierError::ShortIo { .. }
                    | TierError::Io { .. }
                    | TierError::OutOfService(_)
                    | TierError::Miss(_))
            ),
            "{:?}",
            b.result
        );
    }
    let s = t.stats();
    assert!(s.nvme.errors >= short as u64);
    if short >= 3 {
        assert!(!s.nvme_in_service, "{s:?}");
        assert!(s.nvme_out_of_service.is_some());
    }
    t.check_consistent().expect("consistent");
    drop(t);
    for b in &c.blocks {
        let i = (0..12).find(|&i| hash(i) == b.hash).expect("known") as u32;
        if b.result.is_ok() {
            assert_eq!(src.block(i), dst.block(i));
        }
    }
}

#[test]
fn unknown_hashes_miss_and_lru_evicts_without_nvme() {
    let g = geometry();
    let t = TierEngine::new(TierConfig::new(g, 4)).expect("engine");
    let mut src = G1::new(g, 16, 11);
    let s = src.register(&t);
    let mut dst = G1::new(g, 16, 12);
    let d = dst.register(&t);
    let c = wait(&t, t.onboard(d, &[(hash(99), 0)]).expect("queued"));
    assert!(matches!(c.blocks[0].result, Err(TierError::Miss(_))));
    for i in 0..6u32 {
        assert!(wait(
            &t,
            t.offload(s, &[(hash(u64::from(i)), i)]).expect("queued")
        )
        .all_ok());
    }
    // Four slots: blocks 0 and 1 were evicted, least recently used first.
    let hashes: Vec<_> = (0..6).map(hash).collect();
    assert_eq!(t.lookup(&hashes).hits, 0);
    assert_eq!(t.lookup(&hashes[2..]).hits, 4);
    assert_eq!(t.stats().dram.evictions, 2);
    assert!(
        t.offload(s, &[(hash(1), 16)]).is_err(),
        "G1 block out of range"
    );
    t.check_consistent().expect("consistent");
    assert_eq!(t.stats().misses, 1);
}

#[test]
fn discarded_blocks_leave_every_tier_and_free_their_slots() {
    let g = geometry();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = TierConfig::new(g, 4);
    cfg.nvme = Some(nvme(dir.path(), 16, IoMode::Auto));
    let t = TierEngine::new(cfg).expect("engine");
    let mut src = G1::new(g, 8, 21);
    let s = src.register(&t);
    let blocks: Vec<_> = (0..4u32).map(|i| (hash(u64::from(i) + 500), i)).collect();
    assert!(wait(&t, t.offload(s, &blocks).expect("queued")).all_ok());
    t.flush(WAIT).expect("flush");
    let hashes: Vec<_> = blocks.iter().map(|b| b.0).collect();
    assert_eq!(t.lookup(&hashes).hits, 4);
    t.events();
    assert_eq!(t.discard(&hashes[..2]), 2);
    assert_eq!(t.lookup(&hashes).hits, 0);
    assert_eq!(t.lookup(&hashes[2..]).hits, 2);
    let mut removed: Vec<_> = t
        .events()
        .iter()
        .filter_map(|e| match e {
            kvtier::TierEvent::Removed { hash, .. } => Some(*hash),
            _ => None,
        })
        .collect();
    removed.dedup();
    assert_eq!(
        removed,
        hashes[..2].to_vec(),
        "a Removed event per copy of each block"
    );
    // The freed slots take new blocks: four more fit in G2 again.
    let more: Vec<_> = (4..8u32).map(|i| (hash(u64::from(i) + 500), i)).collect();
    assert!(wait(&t, t.offload(s, &more).expect("queued")).all_ok());
    t.check_consistent().expect("consistent");
}
