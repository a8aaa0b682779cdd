//! `kvferry-bench net --peer nixl`: a stock NIXL agent in another process is the target. The same
//! READ/WRITE sweep runs twice on identical buffers and the same scattered pattern: from a
//! kvferry agent (this process) and from a second stock NIXL agent (another process). The NIXL
//! initiator's rate is the reference of each kvferry row (ratio = kvferry / NIXL).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use kvferry::kvcore::{Descriptor, MemKind, Region};
use kvferry::kvnet::{Agent, AgentConfig, TransportKind};

use crate::child::LineProc;
use crate::limits::spread;
use crate::report::{Row, Value};

/// The line-driven NIXL agent the interop tests use.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../kvnet/tests/nixl_agent.py");

struct NixlProc {
    proc: LineProc,
    port: u16,
    base: u64,
}

impl NixlProc {
    fn start(name: &str, bytes: u64) -> Result<NixlProc, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let mut cmd = Command::new("python3");
        // No NIXL progress thread: it busy-polls a core, which on a small machine starves whatever
        // else runs (kvferry's threads included). Transfers here use shared memory/cma.
        cmd.args([
            SCRIPT,
            name,
            &port.to_string(),
            &bytes.to_string(),
            "1",
            "noprog",
        ]);
        if std::env::var_os("UCX_NET_DEVICES").is_none() {
            cmd.env("UCX_NET_DEVICES", "lo");
        }
        let mut proc = LineProc::spawn(cmd, "the NIXL agent")?;
        let ready = proc.line()?;
        let base = ready
            .split_whitespace()
            .nth(1)
            .and_then(|b| b.parse().ok())
            .ok_or_else(|| {
                format!("NIXL agent did not start (is nixl-cu12 installed?): {ready}")
            })?;
        Ok(NixlProc { proc, port, base })
    }

    fn ok(&mut self, c: &str) -> Result<String, String> {
        self.proc.ok(c)
    }
}

pub struct Sweep<'a> {
    pub blocks: &'a [u64],
    pub batches: &'a [u32],
    pub max_bytes: u64,
    pub repeat: usize,
}

pub fn rows(s: &Sweep) -> Result<Vec<Row>, String> {
    let biggest = s.blocks.iter().max().copied().unwrap_or(4096);
    let bytes = s.max_bytes.max(biggest);
    let target = NixlProc::start("nixl-target", bytes)?;
    let mut nixl_init = NixlProc::start("nixl-initiator", bytes)?;
    nixl_init.ok(&format!("fetch nixl-target {}", target.port))?;

    let mut cfg = AgentConfig::new("kvferry-initiator");
    cfg.transports = vec![TransportKind::Ucx];
    cfg.timeout = Duration::from_secs(30);
    if std::env::var_os("UCX_NET_DEVICES").is_none() {
        cfg.ucx_options = vec![("NET_DEVICES".into(), "lo".into())];
    }
    let agent = Agent::new(cfg).map_err(|e| e.to_string())?;
    let lib = agent
        .ucx_library()
        .ok_or("UCX is not available (pip install libucx-cu12)")?
        .to_string();
    eprintln!("net: kvferry's UCX transport uses {lib}; the target is a stock NIXL agent");
    let mut buf = vec![1u8; bytes as usize];
    // SAFETY: `buf` outlives `agent` (declared before it, dropped after it: `agent` is dropped
    // explicitly below) and is not touched while transfers run.
    let local = unsafe {
        agent.register(Region {
            kind: MemKind::Host,
            base: buf.as_mut_ptr() as u64,
            len: bytes,
        })
    }
    .map_err(|e| e.to_string())?;
    let sc = SocketAddr::from(([127, 0, 0, 1], target.port));
    let peer = agent.nixl_fetch_metadata(sc).map_err(|e| e.to_string())?;

    let mut rows = Vec::new();
    for &block in s.blocks {
        let mut seen = Vec::new();
        for &want in s.batches {
            let n = u64::from(want).min((bytes / block).max(1));
            // Batches the byte cap shrank to one already measured are not measured twice.
            if seen.contains(&n) {
                continue;
            }
            seen.push(n);
            // The script's pattern: local block i, remote block n-1-i.
            let ours: Vec<Descriptor> = (0..n)
                .map(|i| Descriptor {
                    region: local,
                    offset: i * block,
                    len: block,
                })
                .collect();
            let remote = (0..n)
                .map(|i| {
                    let addr = target.base + (n - 1 - i) * block;
                    agent.remote_descriptor(&peer, MemKind::Host, addr, block)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            for op in ["READ", "WRITE"] {
                let mut nixl = Vec::new();
                let mut ours_t = Vec::new();
                // Interleaved, one NIXL transfer then one of ours, until both settled (or the
                // cap: the rows are then marked noisy).
                let max = (s.repeat.max(3) * 4).min(64);
                for rep in 0..=max {
                    let secs: f64 = nixl_init
                        .ok(&format!(
                            "xfer {op} nixl-target {} {block} {n} -",
                            target.base
                        ))?
                        .parse()
                        .map_err(|_| "bad timing from the NIXL agent".to_string())?;
                    let t = Instant::now();
                    let id = if op == "READ" {
                        agent.read(&ours, &peer, &remote, None)
                    } else {
                        agent.write(&ours, &peer, &remote, None)
                    }
                    .map_err(|e| e.to_string())?;
                    let done = agent
                        .wait(id, Duration::from_secs(120))
                        .ok_or("transfer timed out")?;
                    done.result.map_err(|e| e.to_string())?;
                    if rep > 0 {
                        nixl.push(secs);
                        ours_t.push(t.elapsed().as_secs_f64());
                    }
                    let settled = |v: &[f64]| spread(v).1 <= crate::limits::NOISY;
                    if nixl.len() >= s.repeat.max(3) && settled(&nixl) && settled(&ours_t) {
                        break;
                    }
                }
                let runs = nixl.len() as u64;
                let ((nixl, nixl_spread), (ours_t, ours_spread)) = (spread(&nixl), spread(&ours_t));
                let total = block * n;
                let nixl_gbps = total as f64 / nixl / 1e9;
                let op = op.to_lowercase();
                rows.push(Row {
                    path: format!("nixl->nixl:{op}"),
                    block_bytes: block,
                    batch: n,
                    gbps: nixl_gbps,
                    limit_gbps: 0.0,
                    extra: vec![
                        ("us", Value::Float(nixl * 1e6)),
                        ("spread", Value::Float(nixl_spread)),
                        ("runs", Value::Int(runs)),
                        ("limit", Value::Text("(the reference)".into())),
                    ],
                });
                rows.push(Row {
                    path: format!("kvferry->nixl:{op}"),
                    block_bytes: block,
                    batch: n,
                    gbps: total as f64 / ours_t / 1e9,
                    limit_gbps: nixl_gbps,
                    extra: vec![
                        ("us", Value::Float(ours_t * 1e6)),
                        ("spread", Value::Float(ours_spread)),
                        ("runs", Value::Int(runs)),
                        (
                            "limit",
                            Value::Text("peer: NIXL initiator, same target".into()),
                        ),
                    ],
                });
            }
        }
    }
    drop(agent);
    drop(buf);
    Ok(rows)
}
