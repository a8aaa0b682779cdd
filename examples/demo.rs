//! The main job on an embedded default, no cluster and no GPU: a prefill process exports a
//! prompt's KV blocks; this (decode) process pulls them over loopback — kvferry's TCP transport,
//! then UCX when a libucp is present — into a cache with another tensor-parallel size, verifies
//! every byte and notifies the prefill side; then it offloads the blocks through pinned DRAM to
//! NVMe files and onboards them back, verified by checksum. It prints what moved and how fast.
//!
//! `cargo run --release --example demo`

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvferry::kvcore::wire::ExportedCache;
use kvferry::kvnet::{Agent, AgentConfig, TransportKind};
use kvferry::kvtier::{NvmeConfig, TierConfig, TierEngine};
use kvferry::prelude::*;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A Llama-3.1-8B-shaped cache, cut to 8 layers: 8 KV heads x 128 x bf16, 16-token blocks.
fn geometry(kv_heads: u32) -> Res<Geometry> {
    Ok(Geometry::mha(8, kv_heads, 128, Dtype::Bf16, 16)?)
}

const PROMPT_TOKENS: usize = 16 * 512;
const CACHE_BLOCKS: u32 = 1024;

fn main() -> Res<()> {
    if std::env::args().nth(1).as_deref() == Some("--prefill") {
        return prefill();
    }
    decode()
}

/// The prefill side: fills its cache, exports it, prints its address, serves until stdin closes.
fn prefill() -> Res<()> {
    let layout = CacheLayout::named(geometry(8)?, CACHE_BLOCKS, StrideOrder::Lbhnc)?;
    let mut cache: Vec<u8> = (0..layout.span_bytes())
        .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 11) as u8)
        .collect();
    let agent = Agent::new(AgentConfig::new("prefill-0"))?;
    // SAFETY: `cache` outlives `agent` (dropped first, below) and is not written while serving.
    let region = unsafe {
        agent.register(Region {
            kind: MemKind::Host,
            base: cache.as_mut_ptr() as u64,
            len: cache.len() as u64,
        })
    }?;
    agent.export_cache(ExportedCache {
        region,
        layout,
        tp_size: 1,
        tp_rank: 0,
        staged: false,
    })?;
    println!("{}", agent.listen_addr());
    std::io::stdout().flush()?;
    // Serve until the decode side says quit (or closes stdin), reporting notifications.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::stdin()
            .read_line(&mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
            && line.trim() != "quit"
        {
            line.clear();
        }
        let _ = tx.send(());
    });
    while rx.try_recv() == Err(std::sync::mpsc::TryRecvError::Empty) {
        for n in agent.wait_notifications(Duration::from_millis(50)) {
            eprintln!(
                "prefill: notified by {}: {}",
                n.from,
                String::from_utf8_lossy(&n.payload)
            );
        }
    }
    drop(agent);
    drop(cache);
    Ok(())
}

fn decode() -> Res<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--prefill")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut addr = String::new();
    out.read_line(&mut addr)?;
    let addr = addr.trim().parse()?;

    // The prompt and its blocks on the prefill side (scattered, as an engine allocates them).
    let tokens: Vec<u32> = (0..PROMPT_TOKENS as u32).map(|t| t * 7 % 32000).collect();
    let hashes = PrefixHasher::new(16).hash_prefix(&tokens);
    let n = hashes.len() as u32;
    let prefill_blocks: Vec<u32> = (0..n).map(|i| (i * 389 + 17) % CACHE_BLOCKS).collect();
    let decode_blocks: Vec<u32> = (0..n).collect();
    // This decode rank: rank 1 of TP 2, so it holds KV heads 4..8.
    let dst_layout = CacheLayout::named(geometry(4)?, n, StrideOrder::Lbhnc)?;
    let mut dst = vec![0u8; dst_layout.span_bytes() as usize];
    println!(
        "prompt: {} tokens = {} blocks; prefill TP 1 (8 KV heads) -> decode rank 1 of TP 2 (heads 4..8)",
        tokens.len(),
        n
    );

    for transport in [TransportKind::Tcp, TransportKind::Ucx] {
        let mut cfg = AgentConfig::new(format!("decode-{}", transport.name()));
        cfg.transports = vec![transport];
        let agent = Agent::new(cfg)?;
        if transport == TransportKind::Ucx && agent.ucx_library().is_none() {
            println!("ucx: no libucp found here (install libucx0 or set KVFERRY_UCX_LIB); skipped");
            continue;
        }
        dst.fill(0);
        // SAFETY: `dst` outlives `agent` (dropped at the end of this iteration) and is only read
        // after the transfers complete.
        let local = unsafe {
            agent.register(Region {
                kind: MemKind::Host,
                base: dst.as_mut_ptr() as u64,
                len: dst.len() as u64,
            })
        }?;
        if let Some(lib) = agent.ucx_library() {
            println!("ucx: using {lib}");
        }
        let peer = agent.connect(addr)?;
        agent.check_peer_geometry(&peer, dst_layout.geometry())?;
        let md = agent.peer_metadata(&peer).ok_or("peer vanished")?;
        let src = md.caches.first().ok_or("prefill exports no cache")?;
        let t = Instant::now();
        let mut moved = 0;
        let mut copies = 0;
        for read in tp_reads(8, src.tp_size, 2, 1)? {
            let plan = PlanBuilder::new(&src.layout, &dst_layout)?
                .heads(read.heads)?
                .build(&prefill_blocks, &decode_blocks)?;
            let remote: Vec<Descriptor> = plan
                .copies()
                .iter()
                .map(|c| Descriptor {
                    region: src.region,
                    offset: c.src,
                    len: c.len,
                })
                .collect();
            let mine: Vec<Descriptor> = plan
                .copies()
                .iter()
                .map(|c| Descriptor {
                    region: local,
                    offset: c.dst,
                    len: c.len,
                })
                .collect();
            let id = agent.read(
                &mine,
                &peer,
                &remote,
                Some(format!("request 42: {} blocks pulled", n).into_bytes()),
            )?;
            let done = agent
                .wait(id, Duration::from_secs(60))
                .ok_or("transfer timed out")?;
            moved += done.result?;
            copies += plan.len();
        }
        let secs = t.elapsed().as_secs_f64();
        // Verify against what the prefill side computed for every cell.
        let src_layout = &src.layout;
        let cell = dst_layout.geometry().cell_bytes() as usize;
        for (i, (&s, &d)) in prefill_blocks.iter().zip(&decode_blocks).enumerate() {
            for l in 0..8 {
                for h in 0..4 {
                    for tok in 0..16 {
                        let so = src_layout.offset(l, s, h + 4, tok)?;
                        let dof = dst_layout.offset(l, d, h, tok)? as usize;
                        let want: Vec<u8> = (so..so + cell as u64)
                            .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 11) as u8)
                            .collect();
                        if dst[dof..dof + cell] != want[..] {
                            return Err(format!("block {i} differs after the pull").into());
                        }
                    }
                }
            }
        }
        println!(
            "{}: pulled {} blocks ({:.1} MB in {} copies) in {:.1} ms = {:.2} GB/s; every byte verified",
            transport.name(),
            n,
            moved as f64 / 1e6,
            copies,
            secs * 1e3,
            moved as f64 / secs / 1e9
        );
        drop(agent);
    }

    // Offload round trip: decode cache -> pinned DRAM -> NVMe files -> back, by block hash.
    let dir = std::env::temp_dir().join(format!("kvferry-demo-{}", std::process::id()));
    let mut cfg = TierConfig::new(*dst_layout.geometry(), 64);
    cfg.nvme = Some(NvmeConfig::new(&dir, u64::from(n) + 64));
    let tiers = TierEngine::new(cfg)?;
    // SAFETY: `dst` outlives `tiers` (dropped below) and is not written while tiers run.
    let g1 = unsafe { tiers.register_g1(dst_layout.clone(), dst.as_mut_ptr()) }?;
    let blocks: Vec<(BlockHash, u32)> = hashes
        .iter()
        .copied()
        .zip(decode_blocks.iter().copied())
        .collect();
    let t = Instant::now();
    for chunk in blocks.chunks(64) {
        let done = tiers
            .wait(tiers.offload(g1, chunk)?, Duration::from_secs(60))
            .ok_or("offload timed out")?;
        if !done.all_ok() {
            return Err("offload failed".into());
        }
    }
    tiers.flush(Duration::from_secs(60))?;
    let off = t.elapsed().as_secs_f64();
    let s = tiers.stats();
    let bytes = u64::from(n) * dst_layout.geometry().block_bytes();
    println!(
        "offload: {} blocks ({:.1} MB) to DRAM and NVMe ({}{}) in {:.1} ms = {:.2} GB/s",
        n,
        bytes as f64 / 1e6,
        s.io_backend,
        if s.direct_io { ", O_DIRECT" } else { "" },
        off * 1e3,
        bytes as f64 / off / 1e9
    );
    let mut back = vec![0u8; dst.len()];
    let g1b = {
        // SAFETY: `back` outlives `tiers` and is only read after the onboard completes.
        unsafe { tiers.register_g1(dst_layout.clone(), back.as_mut_ptr()) }?
    };
    let found = tiers.lookup(&hashes).hits;
    let t = Instant::now();
    for chunk in blocks.chunks(64) {
        let done = tiers
            .wait(tiers.onboard(g1b, chunk)?, Duration::from_secs(60))
            .ok_or("onboard timed out")?;
        if let Some(b) = done.blocks.iter().find(|b| b.result.is_err()) {
            return Err(format!("block {} failed to load: {:?}", b.hash, b.result).into());
        }
    }
    let on = t.elapsed().as_secs_f64();
    let s = tiers.stats();
    drop(tiers);
    if back != dst {
        return Err("onboarded blocks differ from the originals".into());
    }
    println!(
        "onboard: {found} of {n} blocks found by hash, {} from DRAM and {} from NVMe, in {:.1} ms = {:.2} GB/s; identical to the originals",
        s.dram.hits,
        s.nvme.hits,
        on * 1e3,
        bytes as f64 / on / 1e9
    );
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = writeln!(stdin, "quit");
    }
    let _ = child.wait();
    Ok(())
}
