//! `kvferry-bench tier --dir DIR`: G1(host)↔G2 through the tier engine and G2↔G3 through the
//! NVMe store, per block size and batch, each next to its limit measured in the same run:
//! memcpy with the same number of threads for host copies, fio (O_DIRECT, io_uring, same
//! directory, block size and queue depth) for NVMe.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use kvferry::kvcore::{BlockHash, CacheLayout, Dtype, Geometry, StrideOrder};
use kvferry::kvtier::{
    IoDone, IoMode, IoOp, IoRequest, NvmeConfig, NvmeStore, PinnedPool, TierConfig, TierEngine,
};

use crate::limits::pieces_memcpy_gbps;
use crate::limits::spread;
use crate::report::{Row, Value};

#[derive(Args, Debug)]
pub struct TierArgs {
    /// Directory for the NVMe files (and fio's file).
    #[arg(long)]
    dir: PathBuf,
    /// Block sizes in KiB.
    #[arg(long, value_delimiter = ',', default_values_t = [16u64, 64, 256, 1024, 2048, 4096])]
    block_kib: Vec<u64>,
    /// Batch sizes (blocks per request).
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 16, 256, 1024])]
    batch: Vec<u32>,
    /// Cap on the bytes one row moves (the batch shrinks to fit).
    #[arg(long, default_value_t = 512)]
    max_mib: u64,
    /// Copy threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// NVMe queue depth.
    #[arg(long, default_value_t = 32)]
    queue_depth: u32,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Only G1↔G2, or only G2↔G3.
    #[arg(long)]
    only: Option<String>,
}

/// A vLLM-like geometry with blocks of `bytes`: 64 KiB per layer fragment (8 KV heads x 128 x
/// bf16 x 16 tokens), fewer heads for smaller blocks.
fn geometry_for(bytes: u64) -> Result<Geometry, String> {
    let layers = (bytes / (64 << 10)).max(1) as u32;
    let per_layer = bytes / u64::from(layers);
    let heads = (per_layer / (16 * 512)).max(1) as u32;
    Geometry::mha(layers, heads, 128, Dtype::Bf16, 16).map_err(|e| e.to_string())
}

fn hashes(n: u32, salt: u64) -> Vec<BlockHash> {
    (0..n)
        .map(|i| BlockHash::from_u64(salt << 32 | u64::from(i)))
        .collect()
}

pub fn run(a: &TierArgs) -> Result<Vec<Row>, String> {
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let fio = Command::new("fio").arg("--version").output().is_ok();
    if !fio {
        eprintln!(
            "tier: fio is not installed; NVMe rows have no limit (install the `fio` package)"
        );
    }
    let only = a.only.as_deref().unwrap_or("all");
    let mut rows = Vec::new();
    for &kib in &a.block_kib {
        let g = geometry_for(kib << 10)?;
        for &want in &a.batch {
            let batch = want.min(((a.max_mib << 20) / g.block_bytes()).max(1) as u32);
            if only == "all" || only == "host" {
                rows.extend(host_rows(a, g, batch)?);
            }
            if only == "all" || only == "nvme" {
                rows.extend(nvme_rows(a, g, batch, fio)?);
            }
        }
    }
    Ok(rows)
}

fn host_rows(a: &TierArgs, g: Geometry, batch: u32) -> Result<Vec<Row>, String> {
    let e = |e: kvferry::kvtier::TierError| e.to_string();
    let mut cfg = TierConfig::new(g, batch);
    cfg.copy_threads = a.threads;
    let t = TierEngine::new(cfg).map_err(e)?;
    // The engine side: vLLM's CPU layout, twice the batch, blocks scattered.
    let n = batch * 2;
    let layout = CacheLayout::named(g, n, StrideOrder::Lbhnc).map_err(|e| e.to_string())?;
    let span = layout.span_bytes() as usize;
    let mut g1 = vec![0x5au8; span];
    // SAFETY: `g1` outlives `t` (dropped at the end of this function, after `t`) and is not
    // touched while copies run.
    let id = unsafe { t.register_g1(layout, g1.as_mut_ptr()) }.map_err(e)?;
    let src: Vec<u32> = (0..batch).map(|i| (i * 2 + 1) % n).collect();
    let dst: Vec<u32> = (0..batch).map(|i| i * 2 % n).collect();
    let bytes = g.block_bytes() * u64::from(batch);
    let (mut off, mut on) = (Vec::new(), Vec::new());
    // Offload and onboard in turn, until both settled (or the cap: the rows are marked noisy).
    let most = (a.repeat.max(3) * 4).min(64);
    for rep in 0..=most {
        let hs = hashes(batch, rep as u64 + 1);
        // One timed request (offload or onboard) of the whole batch; any failed block fails it.
        let timed = |onboard: bool, ids: &[u32]| -> Result<f64, String> {
            let blocks: Vec<_> = hs.iter().copied().zip(ids.iter().copied()).collect();
            let t0 = Instant::now();
            let req = if onboard {
                t.onboard(id, &blocks)
            } else {
                t.offload(id, &blocks)
            };
            let c = t
                .wait(req.map_err(e)?, Duration::from_secs(120))
                .ok_or("request timed out")?;
            let secs = t0.elapsed().as_secs_f64();
            match c.blocks.iter().find(|b| b.result.is_err()) {
                Some(b) => Err(format!(
                    "{} failed: {:?}",
                    if onboard { "onboard" } else { "offload" },
                    b.result
                )),
                None => Ok(secs),
            }
        };
        let t1 = timed(false, &src)?;
        let t2 = timed(true, &dst)?;
        if rep > 0 {
            off.push(t1);
            on.push(t2);
        }
        let settled = |v: &[f64]| spread(v).1 <= crate::limits::NOISY;
        if off.len() >= a.repeat.max(3) && settled(&off) && settled(&on) {
            break;
        }
    }
    drop(t);
    drop(g1);
    // The limit makes the engine's copies, without the engine: each block's per-layer fragments
    // from their places in the LBHNC cache to their places in a block-packed slot.
    let frag = g.layer_block_bytes() as usize;
    let layers = (g.block_bytes() as usize) / frag;
    let pieces: Vec<(usize, usize, usize)> = src
        .iter()
        .enumerate()
        .flat_map(|(i, &b)| {
            (0..layers).map(move |l| {
                (
                    (l * n as usize + b as usize) * frag,
                    i * layers * frag + l * frag,
                    frag,
                )
            })
        })
        .collect();
    let limit = pieces_memcpy_gbps(span, bytes as usize, &pieces, a.threads, a.repeat.max(3));
    let runs = off.len() as u64;
    let row = |path: &str, times: &[f64]| {
        let (secs, spread) = spread(times);
        Row {
            path: path.into(),
            block_bytes: g.block_bytes(),
            batch: u64::from(batch),
            gbps: bytes as f64 / secs / 1e9,
            limit_gbps: limit,
            extra: vec![
                ("us_per_block", Value::Float(secs * 1e6 / f64::from(batch))),
                ("spread", Value::Float(spread)),
                ("runs", Value::Int(runs)),
                ("fragment_bytes", Value::Int(g.layer_block_bytes())),
                (
                    "limit",
                    Value::Text(format!("memcpy x{}, same pieces", a.threads)),
                ),
            ],
        }
    };
    Ok(vec![row("g1->g2", &off), row("g2->g1", &on)])
}

fn nvme_rows(a: &TierArgs, g: Geometry, batch: u32, fio: bool) -> Result<Vec<Row>, String> {
    let e = |e: kvferry::kvtier::TierError| e.to_string();
    let slot_bytes = 4096 + g.block_bytes().div_ceil(4096) * 4096;
    let qd = a.queue_depth.min(batch).max(1);
    let dir = a.dir.join(format!("kvferry-bench-{}", g.block_bytes()));
    let pool = PinnedPool::new(slot_bytes, batch).map_err(e)?;
    for s in 0..batch {
        // SAFETY: nothing else uses the pool yet.
        unsafe { pool.slot_mut(s).fill(s as u8 | 1) };
    }
    let (tx, rx) = crossbeam_channel::unbounded::<IoDone>();
    let mut cfg = NvmeConfig::new(&dir, u64::from(batch));
    cfg.queue_depth = qd;
    cfg.io = IoMode::Auto;
    let store = NvmeStore::open(&cfg, slot_bytes, Some(&pool), tx).map_err(e)?;
    let mut times = [Vec::new(), Vec::new()];
    let most = (a.repeat.max(3) * 4).min(64);
    for rep in 0..=most {
        let settled = |v: &[f64]| v.len() >= a.repeat.max(3) && spread(v).1 <= crate::limits::NOISY;
        if settled(&times[0]) && settled(&times[1]) {
            break;
        }
        for (k, op) in [IoOp::Write, IoOp::Read].into_iter().enumerate() {
            let t0 = Instant::now();
            for s in 0..batch {
                let req = IoRequest {
                    op,
                    slot: u64::from(s),
                    buf: pool.slot_ptr(s) as u64,
                    tag: u64::from(s),
                };
                // SAFETY: each pool slot is named by exactly one request of this round, and the
                // round waits for every completion before the next starts.
                unsafe { store.submit(req) }.map_err(e)?;
            }
            for _ in 0..batch {
                let d = rx
                    .recv_timeout(Duration::from_secs(120))
                    .map_err(|_| "NVMe I/O timed out")?;
                d.result.map_err(e)?;
            }
            if rep > 0 {
                times[k].push(t0.elapsed().as_secs_f64());
            }
        }
    }
    let backend = store.backend();
    let direct = store.is_direct();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    let bytes = g.block_bytes() * u64::from(batch);
    let mut rows = Vec::new();
    for (k, (path, rw)) in [("g2->g3", "write"), ("g3->g2", "read")]
        .into_iter()
        .enumerate()
    {
        let limit = if fio {
            fio_gbps(
                &a.dir,
                rw,
                slot_bytes,
                slot_bytes * u64::from(batch),
                qd,
                direct,
                backend.ends_with("+fixed"),
            )?
        } else {
            0.0
        };
        let (secs, spread) = spread(&times[k]);
        rows.push(Row {
            path: path.into(),
            block_bytes: g.block_bytes(),
            batch: u64::from(batch),
            gbps: bytes as f64 / secs / 1e9,
            limit_gbps: limit,
            extra: vec![
                ("us_per_block", Value::Float(secs * 1e6 / f64::from(batch))),
                ("spread", Value::Float(spread)),
                ("runs", Value::Int(times[k].len() as u64)),
                ("fragment_bytes", Value::Int(slot_bytes)),
                (
                    "limit",
                    Value::Text(format!(
                        "fio qd{qd} {backend}{}",
                        if direct { " direct" } else { " buffered" }
                    )),
                ),
            ],
        });
    }
    Ok(rows)
}

/// fio's bandwidth for the same pattern: io_uring, one job, same block size, queue depth, file
/// size, directory and O_DIRECT as the store got, passes over the file like batches (at least
/// 64 MiB in all). Best of six runs (the first lays the file out).
fn fio_gbps(
    dir: &Path,
    rw: &str,
    bs: u64,
    size: u64,
    qd: u32,
    direct: bool,
    fixed: bool,
) -> Result<f64, String> {
    let file = dir.join("kvferry-bench-fio.dat");
    let mut best: f64 = 0.0;
    // One pass over the file per run, as one batch of the store's is: a sustained run measures
    // another thing on a virtual disk whose cache absorbs bursts. The file is laid out by a
    // first, untimed pass.
    for _ in 0..6 {
        let out = Command::new("fio")
            .args([
                "--name=limit",
                &format!("--filename={}", file.display()),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                &format!("--size={size}"),
                &format!("--iodepth={qd}"),
                "--ioengine=io_uring",
                // As the store opened its files: where the file system refuses O_DIRECT both go
                // through the page cache (the store says so, and the row's limit is named so).
                if direct { "--direct=1" } else { "--direct=0" },
                // Registered buffers and files, as the store's ring has when it says "+fixed".
                if fixed {
                    "--fixedbufs=1"
                } else {
                    "--fixedbufs=0"
                },
                if fixed {
                    "--registerfiles=1"
                } else {
                    "--registerfiles=0"
                },
                "--numjobs=1",
                // Small batches are passed over several times, so fio's first I/O does not
                // dominate its figure (the store's batches are timed one after another too).
                &format!("--loops={}", ((64u64 << 20) / size.max(1)).clamp(1, 64)),
                "--output-format=json",
            ])
            .output()
            .map_err(|e| format!("fio: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "fio failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let bw = fio_bw_bytes(&String::from_utf8_lossy(&out.stdout), rw)
            .ok_or("cannot read fio's bandwidth")?;
        best = best.max(bw / 1e9);
    }
    let _ = std::fs::remove_file(&file);
    Ok(best)
}

/// `jobs[0].<rw>.bw_bytes` from fio's JSON output, without a JSON parser: the section is the
/// object that follows the key `"<rw>" : {`.
fn fio_bw_bytes(json: &str, rw: &str) -> Option<f64> {
    let start = json.find(&format!("\"{rw}\" : {{"))?;
    let rest = &json[start..];
    let i = rest.find("\"bw_bytes\"")?;
    rest[i + 10..]
        .trim_start_matches([' ', ':'])
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn fio_sections_are_told_apart() {
        let j = r#"{"jobs" : [{"job options" : {"rw" : "write"}, "read" : {"bw_bytes" : 0}, "write" : {"io_bytes" : 5, "bw_bytes" : 1900000000}}]}"#;
        assert_eq!(super::fio_bw_bytes(j, "write"), Some(1.9e9));
        assert_eq!(super::fio_bw_bytes(j, "read"), Some(0.0));
    }
}
