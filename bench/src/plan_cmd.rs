//! `kvferry-bench plan`: how long planning a long-context transfer takes, and codec throughput,
//! next to the memcpy rate measured in the same run. `gbps` is bytes planned (or decoded) per
//! second; the ratio says how many times faster than memory bandwidth planning keeps up, so a
//! ratio well above 1 means planning is never the bottleneck.

use std::time::Instant;

use clap::Args;
use kvferry::kvcore::wire::{
    AgentMetadata, Endpoint, ExportedCache, ExportedRegion, Message, Op, TransferNotice,
    TransportKey, PROTOCOL_VERSION,
};
use kvferry::kvcore::{
    CacheLayout, Descriptor, Dtype, Geometry, HeadSlice, MemKind, PlanBuilder, Region, RegionId,
    StrideOrder, TransferPlan,
};

use crate::limits::median;
use crate::limits::memcpy_gbps;
use crate::report::{Row, Value};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Tokens in the transfer (a 128k-token context by default).
    #[arg(long, default_value_t = 131072)]
    tokens: u32,
    /// Model layers.
    #[arg(long, default_value_t = 80)]
    layers: u32,
    /// KV heads on the source rank.
    #[arg(long, default_value_t = 8)]
    kv_heads: u32,
    #[arg(long, default_value_t = 128)]
    head_size: u32,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 16)]
    block_tokens: u32,
    /// Timed repetitions per row (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Skip the per-token NHD head-slice row (tens of millions of copies).
    #[arg(long)]
    quick: bool,
}

/// Deterministic scattered block ids: a prefix of a pseudo-random permutation of 0..n.
fn scattered(n: u32, k: u32, seed: u64) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids.truncate(k as usize);
    ids
}

fn time<T>(repeat: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut out = f();
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        out = f();
        times.push(t.elapsed().as_secs_f64());
    }
    (median(times), out)
}

pub fn run(a: &PlanArgs) -> Result<Vec<Row>, String> {
    let dtype = Dtype::parse(&a.dtype).ok_or_else(|| format!("unknown dtype {}", a.dtype))?;
    let geo = |heads| {
        Geometry::mha(a.layers, heads, a.head_size, dtype, a.block_tokens)
            .map_err(|e| e.to_string())
    };
    let g = geo(a.kv_heads)?;
    let blocks = a.tokens.div_ceil(a.block_tokens);
    let cache_blocks = blocks.saturating_mul(2);
    let layout = |g: Geometry, n, o| CacheLayout::named(g, n, o).map_err(|e| e.to_string());
    let engine = layout(g, cache_blocks, StrideOrder::Lbhnc)?;
    let engine_nhd = layout(g, cache_blocks, StrideOrder::Lbnhc)?;
    let tier = layout(g, blocks, StrideOrder::Blhnc)?;
    let src_ids = scattered(cache_blocks, blocks, 1);
    let dst_ids = scattered(cache_blocks, blocks, 2);
    let seq: Vec<u32> = (0..blocks).collect();

    let limit = memcpy_gbps(256 << 20, 5);
    eprintln!(
        "plan: {} tokens = {} blocks of {} bytes ({}), memcpy limit {:.2} GB/s",
        a.tokens,
        blocks,
        g.block_bytes(),
        g,
        limit
    );

    let mut rows = Vec::new();
    let mut plan_row = |path: &str,
                        src: &CacheLayout,
                        dst: &CacheLayout,
                        heads: Option<HeadSlice>,
                        s: &[u32],
                        d: &[u32]|
     -> Result<(), String> {
        let mut b = PlanBuilder::new(src, dst).map_err(|e| e.to_string())?;
        if let Some(h) = heads {
            b = b.heads(h).map_err(|e| e.to_string())?;
        }
        let (secs, plan): (f64, Result<TransferPlan, _>) = time(a.repeat, || b.build(s, d));
        let plan = plan.map_err(|e| e.to_string())?;
        let bytes = plan.bytes();
        rows.push(Row {
            path: path.into(),
            block_bytes: bytes / s.len().max(1) as u64,
            batch: s.len() as u64,
            gbps: bytes as f64 / secs / 1e9,
            limit_gbps: limit,
            extra: vec![
                ("plan_ms", Value::Float(secs * 1e3)),
                ("copies", Value::Int(plan.len() as u64)),
                (
                    "mean_copy_bytes",
                    Value::Int(bytes / plan.len().max(1) as u64),
                ),
            ],
        });
        Ok(())
    };
    // The first multi-megabyte plan pays for the allocator's first mmap and page faults; a server
    // building plans all day runs warm, so warm up once before timing.
    PlanBuilder::new(&engine, &tier)
        .and_then(|b| b.build(&src_ids, &seq))
        .map_err(|e| e.to_string())?;
    plan_row("plan:offload-to-tier", &engine, &tier, None, &src_ids, &seq)?;
    plan_row(
        "plan:pd-scattered",
        &engine,
        &engine,
        None,
        &src_ids,
        &dst_ids,
    )?;
    plan_row("plan:pd-contiguous", &engine, &engine, None, &seq, &seq)?;
    plan_row(
        "plan:onboard-from-tier",
        &tier,
        &engine,
        None,
        &seq,
        &dst_ids,
    )?;
    if a.kv_heads >= 2 {
        let half = a.kv_heads / 2;
        let engine_half = layout(geo(half)?, cache_blocks, StrideOrder::Lbhnc)?;
        let slice = HeadSlice {
            src_start: half,
            dst_start: 0,
            count: half,
        };
        plan_row(
            "plan:tp1-to-tp2-hnd",
            &engine,
            &engine_half,
            Some(slice),
            &src_ids,
            &dst_ids,
        )?;
        if !a.quick {
            let engine_half_nhd = layout(geo(half)?, cache_blocks, StrideOrder::Lbnhc)?;
            plan_row(
                "plan:tp1-to-tp2-nhd",
                &engine_nhd,
                &engine_half_nhd,
                Some(slice),
                &src_ids,
                &dst_ids,
            )?;
        }
    }

    // Codecs: a transfer notice naming every block of every layer, and a large agent's metadata.
    let descs: Vec<Descriptor> = src_ids
        .iter()
        .flat_map(|&b| {
            (0..a.layers).map(move |l| Descriptor {
                region: RegionId(l),
                offset: u64::from(b) * g.layer_block_bytes(),
                len: g.layer_block_bytes(),
            })
        })
        .take(1 << 16)
        .collect();
    let notice = Message::Transfer(TransferNotice {
        transfer_id: 42,
        op: Op::Read,
        initiator: "decode-0".into(),
        descriptors: descs,
        notification: Some(b"req-1".to_vec()),
    });
    let region_len = engine.span_bytes() / u64::from(a.layers);
    let metadata = Message::Metadata(AgentMetadata {
        name: "prefill-0".into(),
        protocol_version: PROTOCOL_VERSION,
        endpoints: vec![Endpoint {
            transport: "ucx".into(),
            address: vec![7; 400],
        }],
        regions: (0..a.layers)
            .map(|l| ExportedRegion {
                id: RegionId(l),
                region: Region {
                    kind: MemKind::Device { ordinal: 0 },
                    base: (1 << 40) + u64::from(l) * region_len,
                    len: region_len,
                },
                keys: vec![TransportKey {
                    transport: "ucx".into(),
                    key: vec![9; 200],
                }],
            })
            .collect(),
        caches: vec![ExportedCache {
            region: RegionId(0),
            layout: layout(geo(a.kv_heads)?, 16, StrideOrder::Lbhnc)?,
            tp_size: 1,
            tp_rank: 0,
            staged: false,
        }],
    });
    for (path, msg) in [
        ("codec:transfer-notice", &notice),
        ("codec:agent-metadata", &metadata),
    ] {
        let (enc_s, frame) = time(a.repeat, || msg.encode());
        let (dec_s, back) = time(a.repeat, || Message::decode(&frame));
        if back.as_ref() != Ok(msg) {
            return Err(format!(
                "{path}: decoded message differs from the encoded one"
            ));
        }
        rows.push(Row {
            path: path.into(),
            block_bytes: frame.len() as u64,
            batch: 1,
            gbps: frame.len() as f64 / dec_s / 1e9,
            limit_gbps: limit,
            extra: vec![
                ("decode_ms", Value::Float(dec_s * 1e3)),
                ("encode_ms", Value::Float(enc_s * 1e3)),
                ("frame", Value::Text(format!("{:?}", msg.kind()))),
            ],
        });
    }
    if let Some(r) = rows.iter().find(|r| r.path == "plan:pd-scattered") {
        if let Some((_, Value::Float(ms))) = r.extra.first() {
            eprintln!(
                "planning a {}-token, {}-layer transfer of scattered blocks took {:.3} ms (median of {})",
                a.tokens, a.layers, ms, a.repeat
            );
        }
    }
    Ok(rows)
}
