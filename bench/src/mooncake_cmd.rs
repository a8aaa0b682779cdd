//! `kvferry-bench net --peer mooncake`: kvferry's TCP transport against Mooncake's Transfer
//! Engine over TCP, each as an initiator and a target in separate processes on loopback, on the
//! same pattern (local block i <- remote block (i*7) % n) in the same run, row by row in turn.
//! kvferry's target is `kvferry-peer` (built next to this binary); Mooncake's target and
//! initiator are `bench/mooncake_peer.py` (P2P handshake, protocol tcp). Each row's limit is
//! physical: as many loopback TCP streams as kvferry opens per peer, on the same bytes.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use kvferry::kvcore::{Descriptor, MemKind, Region, RegionId};
use kvferry::kvnet::{Agent, AgentConfig, TransportKind};

use crate::child::LineProc;
use crate::limits::{settle, tcp_streams_gbps};
use crate::report::{Row, Value};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/mooncake_peer.py");

pub struct Sweep<'a> {
    pub blocks: &'a [u64],
    pub batches: &'a [u32],
    pub max_bytes: u64,
    pub repeat: usize,
}

/// `kvferry-peer` beside this binary (cargo puts both in the same target directory), or where
/// `KVFERRY_PEER` says.
fn peer_binary() -> Result<std::path::PathBuf, String> {
    if let Some(p) = std::env::var_os("KVFERRY_PEER") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe.with_file_name("kvferry-peer");
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: build it with `cargo build --release -p kvnet --bin kvferry-peer` \
             (or set KVFERRY_PEER)",
            p.display()
        ))
    }
}

pub fn rows(s: &Sweep) -> Result<Vec<Row>, String> {
    let biggest = s.blocks.iter().max().copied().unwrap_or(4096);
    let bytes = s.max_bytes.max(biggest);
    // Mooncake: target, then an initiator that reaches it.
    let mut cmd = Command::new("python3");
    cmd.args([SCRIPT, "target", &bytes.to_string()]);
    let mut mc_target = LineProc::spawn(cmd, "Mooncake's target")?;
    let ready = mc_target.line()?;
    let f: Vec<&str> = ready.split_whitespace().collect();
    let (Some(port), Some(addr)) = (f.get(1), f.get(2)) else {
        return Err(format!(
            "Mooncake's target did not start (pip install mooncake-transfer-engine-non-cuda): \
             {ready}"
        ));
    };
    let mut cmd = Command::new("python3");
    cmd.args([SCRIPT, "initiator", port, addr, &bytes.to_string()]);
    let mut mc = LineProc::spawn(cmd, "Mooncake's initiator")?;
    let ready = mc.line()?;
    if !ready.starts_with("ready") {
        return Err(format!("Mooncake's initiator did not start: {ready}"));
    }

    // kvferry: a kvferry-peer target serving over TCP, this process the initiator.
    let mut cmd = Command::new(peer_binary()?);
    cmd.args([
        "--name",
        "kvferry-target",
        "--bytes",
        &bytes.to_string(),
        "--transports",
        "tcp",
    ]);
    let mut kv_target = LineProc::spawn(cmd, "kvferry-peer")?;
    let ready = kv_target.line()?;
    let f: Vec<&str> = ready.split_whitespace().collect();
    let listen: SocketAddr = f
        .get(1)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("kvferry-peer did not start: {ready}"))?;
    let region = RegionId(
        f.get(2)
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| format!("kvferry-peer: no region in {ready}"))?,
    );
    let mut cfg = AgentConfig::new("kvferry-initiator");
    cfg.transports = vec![TransportKind::Tcp];
    cfg.timeout = Duration::from_secs(30);
    let streams = cfg.connections_per_peer;
    let agent = Agent::new(cfg).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; bytes as usize];
    // SAFETY: `buf` outlives `agent` (dropped first, below) and is not touched while transfers
    // run.
    let local = unsafe {
        agent.register(Region {
            kind: MemKind::Host,
            base: buf.as_mut_ptr() as u64,
            len: bytes,
        })
    }
    .map_err(|e| e.to_string())?;
    let peer = agent.connect(listen).map_err(|e| e.to_string())?;

    let mut rows = Vec::new();
    for &block in s.blocks {
        let mut seen = Vec::new();
        for &want in s.batches {
            let n = u64::from(want).min((bytes / block).max(1));
            if seen.contains(&n) {
                continue;
            }
            seen.push(n);
            let ours: Vec<Descriptor> = (0..n)
                .map(|i| Descriptor {
                    region: local,
                    offset: i * block,
                    len: block,
                })
                .collect();
            let remote: Vec<Descriptor> = (0..n)
                .map(|i| Descriptor {
                    region,
                    offset: ((i * 7) % n) * block,
                    len: block,
                })
                .collect();
            let total = block * n;
            let streams = streams.min(n as usize);
            let limit = tcp_streams_gbps(total as usize, streams, s.repeat.max(3))?;
            let limit_name = format!("loopback TCP x{streams}, same bytes");
            for op in ["read", "write"] {
                let answer = mc.ok(&format!("row {op} {block} {n} {}", s.repeat))?;
                let f: Vec<f64> = answer
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let [mc_secs, mc_spread, mc_runs] = f[..] else {
                    return Err(format!("Mooncake's initiator answered {answer}"));
                };
                let mc_gbps = total as f64 / mc_secs / 1e9;
                rows.push(Row {
                    path: format!("mooncake->mooncake:{op}"),
                    block_bytes: block,
                    batch: n,
                    gbps: mc_gbps,
                    limit_gbps: limit,
                    extra: vec![
                        ("us", Value::Float(mc_secs * 1e6)),
                        ("spread", Value::Float(mc_spread)),
                        ("runs", Value::Int(mc_runs as u64)),
                        ("limit", Value::Text(limit_name.clone())),
                        ("vs_mooncake", Value::Float(1.0)),
                    ],
                });
                let ours_t = settle(s.repeat, || {
                    let t = Instant::now();
                    let id = if op == "read" {
                        agent.read(&ours, &peer, &remote, None)
                    } else {
                        agent.write(&ours, &peer, &remote, None)
                    }
                    .map_err(|e| e.to_string())?;
                    agent
                        .wait(id, Duration::from_secs(120))
                        .ok_or("transfer timed out")?
                        .result
                        .map_err(|e| e.to_string())?;
                    Ok(t.elapsed().as_secs_f64())
                })?;
                let gbps = total as f64 / ours_t.median / 1e9;
                rows.push(Row {
                    path: format!("kvferry->kvferry:{op}"),
                    block_bytes: block,
                    batch: n,
                    gbps,
                    limit_gbps: limit,
                    extra: vec![
                        ("us", Value::Float(ours_t.median * 1e6)),
                        ("spread", Value::Float(ours_t.spread)),
                        ("runs", Value::Int(ours_t.runs as u64)),
                        ("limit", Value::Text(limit_name.clone())),
                        ("vs_mooncake", Value::Float(gbps / mc_gbps)),
                    ],
                });
            }
        }
    }
    drop(agent);
    drop(buf);
    drop(kv_target);
    Ok(rows)
}
