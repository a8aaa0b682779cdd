//! Offloads a few thousand KV blocks from an engine cache through pinned DRAM to NVMe files,
//! "restarts" (drops the tier engine and opens the files again), and onboards every block back
//! into a fresh engine cache, checking each against the original with a checksum.
//!
//! `cargo run --release --example offload_restart_onboard -- [DIR]` (default: a temporary dir)

use std::time::{Duration, Instant};

use kvferry::kvcore::{BlockHash, CacheLayout, Dtype, Geometry, PrefixHasher, StrideOrder};
use kvferry::kvtier::{NvmeConfig, TierConfig, TierEngine};

const BLOCKS: u32 = 3000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join(format!("kvferry-example-{}", std::process::id())),
    };
    // A small model: 4 layers x 2 KV heads x 64 x fp16, 16-token blocks = 32 KiB per block.
    let g = Geometry::mha(4, 2, 64, Dtype::Fp16, 16)?;
    let layout = CacheLayout::named(g, BLOCKS, StrideOrder::Lbhnc)?;
    let mut engine_cache: Vec<u8> = (0..layout.span_bytes())
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let tokens: Vec<u32> = (0..BLOCKS * 16).map(|i| i % 50_000).collect();
    let hashes: Vec<BlockHash> = PrefixHasher::new(16).hash_prefix(&tokens);
    let digest = |mem: &[u8], b: u32| -> Result<u64, Box<dyn std::error::Error>> {
        let mut bytes = Vec::with_capacity(g.block_bytes() as usize);
        for (o, l) in layout.block_runs(b)? {
            bytes.extend_from_slice(&mem[o as usize..(o + l) as usize]);
        }
        Ok(kvferry::kvcore::slot::payload_checksum(&bytes))
    };
    let want: Vec<u64> = (0..BLOCKS)
        .map(|b| digest(&engine_cache, b))
        .collect::<Result<_, _>>()?;

    let config = |dram| {
        let mut c = TierConfig::new(g, dram);
        c.nvme = Some(NvmeConfig::new(&dir, u64::from(BLOCKS) + 64));
        c
    };
    let blocks: Vec<(BlockHash, u32)> = hashes.iter().copied().zip(0..).collect();
    {
        let tiers = TierEngine::new(config(256))?;
        // SAFETY: `engine_cache` outlives `tiers` (dropped at the end of this scope) and is not
        // written while the offload runs.
        let g1 = unsafe { tiers.register_g1(layout.clone(), engine_cache.as_mut_ptr()) }?;
        let t = Instant::now();
        for chunk in blocks.chunks(256) {
            let id = tiers.offload(g1, chunk)?;
            let done = tiers
                .wait(id, Duration::from_secs(60))
                .ok_or("offload timed out")?;
            if !done.all_ok() {
                return Err(format!(
                    "offload failed: {:?}",
                    done.blocks.iter().find(|b| b.result.is_err())
                )
                .into());
            }
        }
        let flushed = tiers.flush(Duration::from_secs(120))?;
        let s = tiers.stats();
        let mb = f64::from(BLOCKS) * g.block_bytes() as f64 / 1e6;
        println!(
            "offloaded {BLOCKS} blocks ({mb:.0} MB) in {:.2?}: {} in DRAM, {} on NVMe ({} flushed at the end), I/O {}{}",
            t.elapsed(),
            s.dram.blocks,
            s.nvme.blocks,
            flushed,
            s.io_backend,
            if s.direct_io { " O_DIRECT" } else { "" }
        );
    }

    // Restart: a new engine finds the blocks by scanning the slot headers.
    let tiers = TierEngine::new(config(256))?;
    let s = tiers.stats();
    println!(
        "restarted: recovered {} blocks, dropped {}",
        s.recovered, s.dropped
    );
    let found = tiers.lookup(&hashes).hits;
    if found != BLOCKS as usize {
        return Err(format!("only {found} of {BLOCKS} blocks found after restart").into());
    }
    let mut fresh = vec![0u8; layout.span_bytes() as usize];
    // SAFETY: `fresh` outlives `tiers` (dropped below, before the check) and is only read after.
    let g1 = unsafe { tiers.register_g1(layout.clone(), fresh.as_mut_ptr()) }?;
    let t = Instant::now();
    for chunk in blocks.chunks(256) {
        let id = tiers.onboard(g1, chunk)?;
        let done = tiers
            .wait(id, Duration::from_secs(60))
            .ok_or("onboard timed out")?;
        if let Some(b) = done.blocks.iter().find(|b| b.result.is_err()) {
            return Err(format!("block {} failed to load: {:?}", b.hash, b.result).into());
        }
    }
    let took = t.elapsed();
    drop(tiers);
    for b in 0..BLOCKS {
        if digest(&fresh, b)? != want[b as usize] {
            return Err(format!("block {b} differs after the round trip").into());
        }
    }
    println!("onboarded {BLOCKS} blocks from NVMe in {took:.2?}; all {BLOCKS} checksums match");
    if std::env::args().nth(1).is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
