//! The replay again, through a real `TierEngine` with payloads: a pinned G2 pool, G3 files
//! through io_uring, a host G1 cache. Slower than the bookkeeping replay, it times the engine
//! per request and checks the one promise that matters: every block the engine reports loaded
//! holds the bytes saved under its hash, whatever was evicted, spilled or dropped meanwhile.

use std::path::Path;
use std::time::{Duration, Instant};

use kvferry::kvcore::{BlockHash, CacheLayout, Dtype, Geometry, StrideOrder};
use kvferry::kvtier::{NvmeConfig, TierConfig, TierEngine};

use super::replay::Config;
use super::Trace;

/// Tokens per block here: small blocks keep a day of traffic to seconds of copies.
const BLOCK_TOKENS: u32 = 16;
const WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub references: u64,
    pub hits: u64,
    pub failed_loads: u64,
    pub elapsed: Duration,
    pub requests: u64,
}

impl Outcome {
    pub fn hit_ratio(&self) -> f64 {
        self.hits as f64 / self.references.max(1) as f64
    }
    pub fn us_per_request(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }
}

/// What block `id` holds: a pattern only its id produces.
fn fill(buf: &mut [u8], id: u64) {
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

pub fn replay(t: &Trace, c: &Config, dir: &Path) -> Result<Outcome, String> {
    let geometry = Geometry::mha(1, 1, 64, Dtype::Fp16, BLOCK_TOKENS).map_err(|e| e.to_string())?;
    let longest = t.requests.iter().map(|r| r.blocks.len()).max().unwrap_or(1);
    let g1_blocks = u32::try_from(longest.max(1)).map_err(|_| "a request is too long")?;
    let mut cfg = TierConfig::new(
        geometry,
        u32::try_from(c.g2_blocks).map_err(|_| "G2 capacity over 2^32 blocks")?,
    );
    cfg.eviction = c.policy;
    cfg.admission = c.admission;
    cfg.write_budget = c.budget;
    if c.g3_blocks > 0 {
        let sub = dir.join(format!("{}-{}-{}", c.policy, c.g2_blocks, c.g3_blocks));
        std::fs::create_dir_all(&sub).map_err(|e| format!("{}: {e}", sub.display()))?;
        cfg.nvme = Some(NvmeConfig::new(sub, c.g3_blocks));
    }
    let engine = TierEngine::new(cfg).map_err(|e| e.to_string())?;
    let layout =
        CacheLayout::named(geometry, g1_blocks, StrideOrder::Lbhnc).map_err(|e| e.to_string())?;
    let runs: Vec<Vec<(u64, u64)>> = (0..g1_blocks)
        .map(|b| layout.block_runs(b).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut g1 = vec![0u8; layout.span_bytes() as usize];
    // SAFETY: `g1` outlives `engine` (dropped first, below) and is touched only between
    // operations, each of which this loop waits for before reading or writing the buffer.
    let id = unsafe { engine.register_g1(layout, g1.as_mut_ptr()) }.map_err(|e| e.to_string())?;
    let block_bytes = geometry.block_bytes() as usize;
    let mut scratch = vec![0u8; block_bytes];
    let mut out = Outcome::default();
    let start = Instant::now();
    for r in &t.requests {
        let hashes: Vec<BlockHash> = r.blocks.iter().map(|&b| BlockHash::from_u64(b)).collect();
        out.references += hashes.len() as u64;
        out.requests += 1;
        let cached = engine.lookup(&hashes).hits;
        if cached > 0 {
            let blocks: Vec<(BlockHash, u32)> =
                (0..cached).map(|d| (hashes[d], d as u32)).collect();
            let done = engine
                .wait(
                    engine.onboard(id, &blocks).map_err(|e| e.to_string())?,
                    WAIT,
                )
                .ok_or("an onboard did not complete in time")?;
            let at: std::collections::HashMap<BlockHash, usize> = hashes[..cached]
                .iter()
                .enumerate()
                .map(|(d, h)| (*h, d))
                .collect();
            let mut ok = vec![false; cached];
            for b in &done.blocks {
                let Some(&d) = at.get(&b.hash) else { continue };
                if b.result.is_err() {
                    out.failed_loads += 1;
                    continue;
                }
                ok[d] = true;
                fill(&mut scratch, r.blocks[d]);
                let mut pos = 0;
                for &(o, l) in &runs[d] {
                    let (o, l) = (o as usize, l as usize);
                    if g1[o..o + l] != scratch[pos..pos + l] {
                        return Err(format!(
                            "block {} loaded with bytes that are not its own",
                            r.blocks[d]
                        ));
                    }
                    pos += l;
                }
            }
            // A prefix cache uses the loaded blocks up to the first that failed.
            out.hits += ok.iter().take_while(|&&x| x).count() as u64;
        }
        let rest: Vec<(BlockHash, u32)> = (cached..hashes.len())
            .map(|d| (hashes[d], d as u32))
            .collect();
        if !rest.is_empty() {
            for (id, block_runs) in r.blocks.iter().zip(&runs).skip(cached) {
                fill(&mut scratch, *id);
                let mut at = 0;
                for &(o, l) in block_runs {
                    let (o, l) = (o as usize, l as usize);
                    g1[o..o + l].copy_from_slice(&scratch[at..at + l]);
                    at += l;
                }
            }
            // A failed save (a full tier) is a miss later, not an error.
            engine
                .wait(engine.offload(id, &rest).map_err(|e| e.to_string())?, WAIT)
                .ok_or("an offload did not complete in time")?;
        }
    }
    out.elapsed = start.elapsed();
    drop(engine);
    drop(g1);
    Ok(out)
}
