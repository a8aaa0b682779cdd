//! `kvferry-bench gpu`: HBM↔pinned DRAM for vLLM-shaped caches. Per model geometry, dtype,
//! direction and batch of randomly scattered 16-token blocks, every copy method of `CudaCopy`
//! (and what `Auto` picks) next to two figures measured in the same run: the limit, one large
//! contiguous `cuMemcpyAsync` between the same memories, and the naive baseline, one copy per
//! block per K/V plane of each layer as vLLM's own swap does.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use clap::Args;
use kvferry::kvcore::{
    CacheLayout, Descriptor, Dtype, Geometry, LayerPlacement, MemKind, PlanBuilder, Region,
    RegionId, StrideOrder,
};
use kvferry::kvtier::cuda::{
    pinned_pool, CopyMethod, CudaCopy, CudaCopyConfig, DeviceBuffer, Gpu, MethodChoice,
};
use kvferry::kvtier::{plan_pairs, CopyEngine, CopyPair, MemoryRegistry, PinnedPool};

use crate::limits::median;
use crate::report::{Row, Value};

#[derive(Args, Debug)]
pub struct GpuArgs {
    /// Model geometries: 8b (Llama-3.1-8B: 32 layers, 8 KV heads x 128), 70b (80 layers, 8 KV
    /// heads), 70b-tp8 (80 layers, 1 KV head per GPU).
    #[arg(long, value_delimiter = ',', default_values_t = ["8b".to_string(), "70b".to_string()])]
    model: Vec<String>,
    /// KV cache dtypes: bf16, fp8.
    #[arg(long, value_delimiter = ',', default_values_t = ["bf16".to_string(), "fp8".to_string()])]
    dtype: Vec<String>,
    /// Blocks per batch.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 16, 64, 256, 1024, 4096])]
    batch: Vec<u32>,
    /// Cap on the bytes one batch moves (the batch shrinks to fit), and on the pinned pool.
    #[arg(long, default_value_t = 8)]
    max_gib: u64,
    /// Blocks in the device cache the batches are scattered over.
    #[arg(long, default_value_t = 8192)]
    cache_blocks: u32,
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    #[arg(long, default_value_t = 0)]
    device: u32,
}

/// vLLM's flash-attention layout on GPUs: per layer one tensor `[2, blocks, 16, heads, dim]`,
/// i.e. a K plane and a V plane, each block a contiguous run of `16 * heads * dim` elements.
/// Modelled as a kvcore geometry with a "layer" per plane and half-width cells (a cell then holds
/// one head's K or V vector).
fn planes(model: &str, dtype: Dtype) -> Result<(Geometry, u32), String> {
    let (layers, heads) = match model {
        "8b" => (32, 8),
        "70b" => (80, 8),
        "70b-tp8" => (80, 1),
        other => return Err(format!("unknown model {other} (8b, 70b, 70b-tp8)")),
    };
    let g = Geometry::mha(2 * layers, heads, 64, dtype, 16).map_err(|e| e.to_string())?;
    Ok((g, layers))
}

struct Rig {
    engine: CudaCopy,
    g1: CacheLayout,
    g1_id: RegionId,
    g2: CacheLayout,
    pool: PinnedPool,
    pool_id: RegionId,
    _tensors: Vec<DeviceBuffer>,
}

fn build(
    gpu: &Gpu,
    geometry: Geometry,
    layers: u32,
    blocks: u32,
    slots: u32,
) -> Result<Rig, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let plane = CacheLayout::named(
        Geometry {
            layers: 1,
            ..geometry
        },
        blocks,
        StrideOrder::Lbnhc,
    )
    .map_err(|x| e(&x))?;
    let plane_bytes = plane.span_bytes();
    let tensors: Vec<DeviceBuffer> = (0..layers)
        .map(|_| gpu.alloc(2 * plane_bytes))
        .collect::<Result<_, _>>()
        .map_err(|x| e(&x))?;
    for t in &tensors {
        t.fill(0x5a).map_err(|x| e(&x))?;
    }
    let base = tensors
        .iter()
        .map(DeviceBuffer::ptr)
        .min()
        .ok_or("no layers")?;
    let end = tensors
        .iter()
        .map(|t| t.ptr() + t.len())
        .max()
        .ok_or("no layers")?;
    let offsets: Vec<u64> = tensors
        .iter()
        .flat_map(|t| [t.ptr() - base, t.ptr() - base + plane_bytes])
        .collect();
    let (bs, hs, ts) = plane.strides();
    let g1 = CacheLayout::from_strides(
        geometry,
        blocks,
        LayerPlacement::Explicit(offsets),
        bs,
        hs,
        ts,
    )
    .map_err(|x| e(&x))?;
    // The pool keeps vLLM's token-major order inside each block (the tier engine's
    // `block_order: Blnhc`), so a block is one run per plane, not a transposition.
    let g2 = CacheLayout::named(geometry, slots, StrideOrder::Blnhc).map_err(|x| e(&x))?;
    let pool = pinned_pool(gpu, geometry.block_bytes(), slots).map_err(|x| e(&x))?;
    let memory = MemoryRegistry::new();
    // SAFETY: the tensors and the pool live in the rig next to the engine; the engine is dropped
    // first (field order), after every copy it ran has completed.
    let (g1_id, pool_id) = unsafe {
        (
            memory
                .register(Region {
                    kind: MemKind::Device {
                        ordinal: gpu.ordinal(),
                    },
                    base,
                    len: end - base,
                })
                .map_err(|x| e(&x))?,
            memory.register(pool.region()).map_err(|x| e(&x))?,
        )
    };
    let engine = CudaCopy::new(
        gpu,
        memory,
        CudaCopyConfig {
            choice: MethodChoice::Auto,
        },
    )
    .map_err(|x| e(&x))?;
    Ok(Rig {
        engine,
        g1,
        g1_id,
        g2,
        pool,
        pool_id,
        _tensors: tensors,
    })
}

/// `k` distinct random block ids below `n` (xorshift; fixed seed so runs compare).
fn scattered(k: u32, n: u32, seed: u64) -> Vec<u32> {
    let mut x = seed | 1;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(k as usize);
    while out.len() < k as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = (x % u64::from(n)) as u32;
        if seen.insert(b) {
            out.push(b);
        }
    }
    out
}

/// Median seconds of `reps` timed runs after one warm-up, submit to completion.
fn time(reps: usize, mut run: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    run()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        run()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

fn copy_with(
    engine: &CudaCopy,
    method: Option<CopyMethod>,
    pairs: &[CopyPair],
) -> Result<(), String> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let done = Box::new(move |r| {
        let _ = tx.send(r);
    });
    match method {
        Some(m) => engine.submit_with(m, pairs, done),
        None => engine.submit(pairs, done),
    }
    .map_err(|e| e.to_string())?;
    rx.recv_timeout(Duration::from_secs(120))
        .map_err(|_| "copy did not finish in 120 s".to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn pair(src: (RegionId, u64), dst: (RegionId, u64), len: u64) -> CopyPair {
    CopyPair {
        src: Descriptor {
            region: src.0,
            offset: src.1,
            len,
        },
        dst: Descriptor {
            region: dst.0,
            offset: dst.1,
            len,
        },
    }
}

pub fn run(a: &GpuArgs) -> Result<Vec<Row>, String> {
    let gpu = Gpu::open(a.device).map_err(|e| e.to_string())?;
    let info = gpu.info().clone();
    eprintln!(
        "gpu: {} (device {}, compute {}.{}, driver {}, {} GiB)",
        info.name,
        info.ordinal,
        info.compute_capability.0,
        info.compute_capability.1,
        info.driver_version,
        info.total_mem >> 30
    );
    let mut rows = Vec::new();
    for model in &a.model {
        for dt in &a.dtype {
            let dtype = match dt.as_str() {
                "bf16" => Dtype::Bf16,
                "fp8" => Dtype::Fp8E4m3,
                other => return Err(format!("unknown dtype {other} (bf16, fp8)")),
            };
            let (geometry, layers) = planes(model, dtype)?;
            let block = geometry.block_bytes();
            let max_blocks = ((a.max_gib << 30) / block).max(1) as u32;
            let slots = a
                .batch
                .iter()
                .copied()
                .max()
                .unwrap_or(1)
                .min(max_blocks)
                .min(a.cache_blocks);
            let t0 = Instant::now();
            let rig = build(&gpu, geometry, layers, a.cache_blocks, slots)?;
            let piece = rig
                .g1
                .runs(0, 0, 0..geometry.kv_heads, 0..16)
                .map_err(|e| e.to_string())?[0]
                .1;
            eprintln!(
                "gpu: {model} {dt}: {} KiB per block ({} planes of {} KiB), {} cache blocks, {slots} pinned slots, set up in {:.1} s",
                block >> 10,
                geometry.layers,
                piece >> 10,
                a.cache_blocks,
                t0.elapsed().as_secs_f64()
            );
            for m in CopyMethod::ALL {
                if let Err(why) = rig.engine.supports(m) {
                    eprintln!("gpu: {} unavailable: {why}", m.name());
                }
            }
            // The limit: one contiguous copy of the whole pool each way.
            let span = u64::from(slots) * rig.pool.slot_bytes();
            let whole = |onboard: bool| {
                let (d, h) = (
                    (rig.g1_id, rig.g1.layer_offset(0).unwrap_or(0)),
                    (rig.pool_id, 0),
                );
                let len = span.min(rig.g1.layer_extent());
                if onboard {
                    pair(h, d, len)
                } else {
                    pair(d, h, len)
                }
            };
            for onboard in [false, true] {
                let limit_pair = whole(onboard);
                let limit_s = time(a.repeat, || {
                    copy_with(&rig.engine, Some(CopyMethod::PerRun), &[limit_pair])
                })?;
                let limit = limit_pair.src.len as f64 / limit_s / 1e9;
                let path = if onboard { "dram->hbm" } else { "hbm->dram" };
                for &want in &a.batch {
                    let n = want.min(slots);
                    let blocks = scattered(n, a.cache_blocks, 0x5eed ^ u64::from(n));
                    let slot_ids: Vec<u32> = (0..n).collect();
                    let pairs = if onboard {
                        let p = PlanBuilder::new(&rig.g2, &rig.g1)
                            .and_then(|b| b.build(&slot_ids, &blocks));
                        plan_pairs(&p.map_err(|e| e.to_string())?, rig.pool_id, rig.g1_id)
                    } else {
                        let p = PlanBuilder::new(&rig.g1, &rig.g2)
                            .and_then(|b| b.build(&blocks, &slot_ids));
                        plan_pairs(&p.map_err(|e| e.to_string())?, rig.g1_id, rig.pool_id)
                    };
                    // vLLM's swap: one copy per block per plane, in block order.
                    let mut naive = Vec::with_capacity(n as usize * geometry.layers as usize);
                    for (i, &b) in blocks.iter().enumerate() {
                        for l in 0..geometry.layers {
                            let d = rig.g1.offset(l, b, 0, 0).map_err(|e| e.to_string())?;
                            let h = rig
                                .g2
                                .offset(l, i as u32, 0, 0)
                                .map_err(|e| e.to_string())?;
                            let (d, h) = ((rig.g1_id, d), (rig.pool_id, h));
                            naive.push(if onboard {
                                pair(h, d, piece)
                            } else {
                                pair(d, h, piece)
                            });
                        }
                    }
                    let bytes = u64::from(n) * block;
                    let gbps = |s: f64| bytes as f64 / s / 1e9;
                    let naive_gbps = gbps(time(a.repeat, || {
                        copy_with(&rig.engine, Some(CopyMethod::PerRun), &naive)
                    })?);
                    let mut emit = |method: String, g: f64| {
                        rows.push(Row {
                            path: path.to_string(),
                            block_bytes: block,
                            batch: u64::from(n),
                            gbps: g,
                            limit_gbps: limit,
                            extra: vec![
                                ("model", Value::Text(model.clone())),
                                ("dtype", Value::Text(dt.clone())),
                                ("method", Value::Text(method)),
                                ("piece_bytes", Value::Int(piece)),
                                ("copies", Value::Int(pairs.len() as u64)),
                                ("naive_gbps", Value::Float(naive_gbps)),
                                ("vs_naive", Value::Float(g / naive_gbps)),
                            ],
                        });
                    };
                    emit("naive-per-block".into(), naive_gbps);
                    for m in CopyMethod::ALL.map(Some).into_iter().chain([None]) {
                        if m.is_some_and(|m| rig.engine.supports(m).is_err()) {
                            continue;
                        }
                        let name = m.map_or("auto", CopyMethod::name);
                        // One method failing (a driver limit, say) is reported, not fatal.
                        match time(a.repeat, || copy_with(&rig.engine, m, &pairs)) {
                            Ok(s) => emit(name.into(), gbps(s)),
                            Err(e) => eprintln!("gpu: {path} {name} batch {n}: {e}"),
                        }
                    }
                }
            }
            for p in rig.engine.picks() {
                eprintln!(
                    "gpu: auto {} piece {} KiB x {}: {} ({:.1} GB/s)",
                    if p.onboard { "onboard" } else { "offload" },
                    p.piece_bytes >> 10,
                    p.count,
                    p.method.name(),
                    p.gbps
                );
            }
        }
    }
    Ok(rows)
}
