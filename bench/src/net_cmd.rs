//! `kvferry-bench net`: READ and WRITE bandwidth between two agents on loopback, per transport,
//! block size and batch, and small-transfer latency, each next to a limit measured in the same
//! run on the same bytes: for UCX, `ucx_perftest` when kvferry loaded the same libucp as it (the
//! system's), else one memcpy of the same scattered blocks (shared memory and cma move each byte
//! once); for the TCP backend, as many loopback TCP streams as it opens per peer. Every timing
//! is repeated until stable or marked noisy, and a row above its physical limit is flagged.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use kvferry::kvcore::{Descriptor, MemKind, Region, RegionId};
use kvferry::kvnet::{Agent, AgentConfig, TransportKind};

use crate::limits::{scattered_memcpy_gbps, settle, Settled};
use crate::report::{Row, Value};

#[derive(Args, Debug)]
pub struct NetArgs {
    /// Transports to measure: tcp (kvferry's TCP backend, no token), tcp-sealed (the same with a
    /// token: authenticated, every frame and byte sealed), ucx (UCX with its environment).
    #[arg(long, value_delimiter = ',', default_values_t = ["tcp".to_string(), "ucx".to_string()])]
    transports: Vec<String>,
    #[arg(long, value_delimiter = ',', default_values_t = [4u64, 64, 256, 2048, 4096])]
    block_kib: Vec<u64>,
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 16, 256, 1024])]
    batch: Vec<u32>,
    /// Cap on the bytes one transfer moves (the batch shrinks to fit).
    #[arg(long, default_value_t = 256)]
    max_mib: u64,
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Skip the ucx_perftest limits.
    #[arg(long)]
    no_limit: bool,
    /// UCX endpoints without error mode PEER (faster transports, slower failure detection).
    #[arg(long)]
    ucx_no_peer_errors: bool,
    /// Also run NIXL's own agents (pip nixl-cu12) on the same pattern, next to the UCX rows.
    #[arg(long)]
    nixl: bool,
    /// The far side: `kvferry` (two kvferry agents, against ucx_perftest) or `nixl` (a stock
    /// NIXL agent in another process, read and written by kvferry and by a second NIXL agent).
    /// `mooncake`: kvferry's TCP transport and Mooncake's Transfer Engine over TCP, each with
    /// its initiator and target in separate processes (pip mooncake-transfer-engine-non-cuda).
    #[arg(long, default_value = "kvferry", value_parser = ["kvferry", "nixl", "mooncake"])]
    peer: String,
}

struct Pair {
    init: Agent,
    /// Kept alive (and its memory registered) while the initiator uses it.
    _target: Agent,
    local: RegionId,
    remote: RegionId,
    _bufs: (Vec<u8>, Vec<u8>),
}

fn pair(
    t: TransportKind,
    bytes: u64,
    peer_errors: bool,
    token: Option<&str>,
) -> Result<Pair, String> {
    let cfg = |name: &str| {
        let mut c = AgentConfig::new(name);
        c.token = token.map(str::to_string);
        c.transports = vec![t];
        c.timeout = Duration::from_secs(30);
        c.ucx_peer_errors = peer_errors;
        c
    };
    let init = Agent::new(cfg("bench-initiator")).map_err(|e| e.to_string())?;
    let target = Agent::new(cfg("bench-target")).map_err(|e| e.to_string())?;
    if t == TransportKind::Ucx && init.ucx_library().is_none() {
        return Err("UCX is not available here (install libucx0 or set KVFERRY_UCX_LIB)".into());
    }
    let mut a = vec![1u8; bytes as usize];
    let mut b = vec![2u8; bytes as usize];
    let reg = |agent: &Agent, buf: &mut Vec<u8>| {
        // SAFETY: the buffers live in the returned Pair next to the agents, which are dropped
        // first (field order), and are not touched while transfers run.
        unsafe {
            agent.register(Region {
                kind: MemKind::Host,
                base: buf.as_mut_ptr() as u64,
                len: buf.len() as u64,
            })
        }
        .map_err(|e| e.to_string())
    };
    let local = reg(&init, &mut a)?;
    let remote = reg(&target, &mut b)?;
    init.connect(target.listen_addr())
        .map_err(|e| e.to_string())?;
    Ok(Pair {
        init,
        _target: target,
        local,
        remote,
        _bufs: (a, b),
    })
}

/// Seconds of one transfer of `batch` blocks of `block` bytes (scattered on the target),
/// repeated until stable.
fn time_transfer(
    p: &Pair,
    read: bool,
    block: u64,
    batch: u32,
    repeat: usize,
) -> Result<Settled, String> {
    let n = u64::from(batch);
    let local: Vec<Descriptor> = (0..n)
        .map(|i| Descriptor {
            region: p.local,
            offset: i * block,
            len: block,
        })
        .collect();
    let remote: Vec<Descriptor> = (0..n)
        .map(|i| Descriptor {
            region: p.remote,
            offset: ((i * 7) % n) * block,
            len: block,
        })
        .collect();
    settle(repeat, || {
        let t = Instant::now();
        let id = if read {
            p.init.read(&local, "bench-target", &remote, None)
        } else {
            p.init.write(&local, "bench-target", &remote, None)
        }
        .map_err(|e| e.to_string())?;
        let done = p
            .init
            .wait(id, Duration::from_secs(120))
            .ok_or("transfer timed out")?;
        done.result.map_err(|e| e.to_string())?;
        Ok(t.elapsed().as_secs_f64())
    })
}

struct Perftest {
    server: Child,
}

impl Drop for Perftest {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// `ucx_perftest` on loopback with the same UCX environment: overall bandwidth in GB/s and
/// median latency in µs of `test` at message size `size`.
fn perftest(
    test: &str,
    size: u64,
    iters: u64,
    tls: Option<&str>,
    peer_errors: bool,
) -> Result<(f64, f64), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port()
        .to_string();
    let env = |c: &mut Command| {
        if let Some(t) = tls {
            c.env("UCX_TLS", t);
        }
        if std::env::var_os("UCX_NET_DEVICES").is_none() {
            c.env("UCX_NET_DEVICES", "lo");
        }
    };
    let mut server = Command::new("ucx_perftest");
    server
        .args(["-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // `-e`: endpoints with error handling, as kvferry's agents use by default.
    if peer_errors {
        server.arg("-e");
    }
    env(&mut server);
    let _server = Perftest {
        server: server.spawn().map_err(|e| format!("ucx_perftest: {e}"))?,
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut client = Command::new("ucx_perftest");
    client.args([
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        test,
        "-s",
        &size.to_string(),
        "-n",
        &iters.to_string(),
    ]);
    if peer_errors {
        client.arg("-e");
    }
    env(&mut client);
    let out = client.output().map_err(|e| format!("ucx_perftest: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fin = text
        .lines()
        .find(|l| l.starts_with("Final:"))
        .ok_or_else(|| {
            format!(
                "ucx_perftest printed no result: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let f: Vec<f64> = fin
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 6 {
        return Err(format!("cannot read ucx_perftest's line: {fin}"));
    }
    // Columns: iterations, p50 latency, avg latency, overall latency (µs), avg BW, overall BW (MB/s,
    // 2^20 bytes), message rates.
    Ok((f[5] * 1048576.0 / 1e9, f[1]))
}

/// NIXL's agents on the same pattern (bench/nixl_peer.py): (op, block, batch) -> GB/s.
fn nixl_rows(a: &NetArgs) -> Result<Vec<(String, u64, u64, f64)>, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/nixl_peer.py");
    let join = |v: Vec<String>| v.join(",");
    let out = Command::new("python3")
        .arg(script)
        .arg(join(
            a.block_kib.iter().map(|k| (k << 10).to_string()).collect(),
        ))
        .arg(join(a.batch.iter().map(|b| b.to_string()).collect()))
        .arg(a.repeat.to_string())
        .arg((a.max_mib << 20).to_string())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |l: &str, k: &str| -> Option<String> {
        let i = l.find(&format!("\"{k}\": "))? + k.len() + 4;
        Some(
            l[i..]
                .split([',', '}'])
                .next()?
                .trim()
                .trim_matches('"')
                .to_string(),
        )
    };
    let rows: Vec<_> = text
        .lines()
        .filter_map(|l| {
            Some((
                field(l, "op")?,
                field(l, "block_bytes")?.parse().ok()?,
                field(l, "batch")?.parse().ok()?,
                field(l, "gbps")?.parse().ok()?,
            ))
        })
        .collect();
    if rows.is_empty() {
        return Err(format!(
            "NIXL printed no rows (is nixl-cu12 installed?): {}",
            text.trim()
        ));
    }
    Ok(rows)
}

pub fn run(a: &NetArgs) -> Result<Vec<Row>, String> {
    if a.peer == "mooncake" {
        let blocks: Vec<u64> = a.block_kib.iter().map(|k| k << 10).collect();
        return crate::mooncake_cmd::rows(&crate::mooncake_cmd::Sweep {
            blocks: &blocks,
            batches: &a.batch,
            max_bytes: a.max_mib << 20,
            repeat: a.repeat,
        });
    }
    if a.peer == "nixl" {
        let blocks: Vec<u64> = a.block_kib.iter().map(|k| k << 10).collect();
        return crate::nixl_cmd::rows(&crate::nixl_cmd::Sweep {
            blocks: &blocks,
            batches: &a.batch,
            max_bytes: a.max_mib << 20,
            repeat: a.repeat,
        });
    }
    // UCX on loopback: shared memory and cma, as NIXL's agents use, over `lo` unless the user
    // chose devices (the in-process pair would otherwise spread TCP lanes over every NIC).
    if std::env::var_os("UCX_NET_DEVICES").is_none() {
        std::env::set_var("UCX_NET_DEVICES", "lo");
    }
    let nixl = if a.nixl {
        match nixl_rows(a) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("net: NIXL rows skipped: {e}");
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    let perftest_ok = !a.no_limit && Command::new("ucx_perftest").arg("-h").output().is_ok();
    let mut rows = Vec::new();
    for tname in &a.transports {
        let (t, token) = match tname.as_str() {
            "tcp" => (TransportKind::Tcp, None),
            "tcp-sealed" => (TransportKind::Tcp, Some("kvferry-bench")),
            "ucx" => (TransportKind::Ucx, None),
            o => return Err(format!("unknown transport {o}")),
        };
        let pe = !a.ucx_no_peer_errors;
        let max = a.max_mib << 20;
        let biggest = a.block_kib.iter().max().copied().unwrap_or(4) << 10;
        let p = match pair(t, max.max(biggest), !a.ucx_no_peer_errors, token) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("net: skipping {tname}: {e}");
                continue;
            }
        };
        // ucx_perftest is the system's UCX: it measures the same thing only when kvferry
        // loaded that library too.
        let lib = p.init.ucx_library().unwrap_or("").to_string();
        let same_ucx = t == TransportKind::Ucx && perftest_ok && lib.starts_with(SYSTEM_UCX);
        if t == TransportKind::Ucx {
            eprintln!(
                "net: kvferry's UCX transport uses {lib}; UCX_TLS={}, UCX_NET_DEVICES={}; limit: {}",
                std::env::var("UCX_TLS").unwrap_or_else(|_| "(UCX's choice)".into()),
                std::env::var("UCX_NET_DEVICES").unwrap_or_default(),
                if same_ucx {
                    "ucx_perftest on the same library"
                } else {
                    "one scattered memcpy of the same blocks (ucx_perftest is the system's UCX, \
                     not this one; set KVFERRY_UCX_LIB to it to compare against it)"
                }
            );
        }
        let label = match (t, std::env::var("UCX_TLS")) {
            (TransportKind::Tcp, _) if token.is_some() => "kvferry-tcp-sealed".to_string(),
            (TransportKind::Tcp, _) => "kvferry-tcp".to_string(),
            (TransportKind::Ucx, Ok(tls)) => format!("ucx[{tls}]"),
            (TransportKind::Ucx, Err(_)) => "ucx".to_string(),
        };
        // Latency: one 8-byte READ.
        let lat = time_transfer(&p, true, 8, 1, a.repeat.max(20))?;
        let lat_limit = if same_ucx {
            perftest("ucp_get", 8, 20000, None, pe)
                .map(|x| x.1)
                .unwrap_or(0.0)
        } else {
            0.0
        };
        rows.push(Row {
            path: format!("{label}:read-latency"),
            block_bytes: 8,
            batch: 1,
            gbps: 8.0 / lat.median / 1e9,
            limit_gbps: 0.0,
            extra: vec![
                ("us", Value::Float(lat.median * 1e6)),
                ("spread", Value::Float(lat.spread)),
                ("runs", Value::Int(lat.runs as u64)),
                ("limit_us", Value::Float(lat_limit)),
                (
                    "limit",
                    Value::Text(if same_ucx {
                        "ucx_perftest ucp_get p50".into()
                    } else {
                        "none".into()
                    }),
                ),
            ],
        });
        for &kib in &a.block_kib {
            let block = kib << 10;
            let mut seen = Vec::new();
            for &want in &a.batch {
                let batch = want.min((max / block).max(1) as u32);
                // Batches the byte cap shrank to one already measured are measured once.
                if seen.contains(&batch) {
                    continue;
                }
                seen.push(batch);
                let bytes = block * u64::from(batch);
                // ucx_perftest moves the batch's bytes as one message (up to 16 MiB): it reuses
                // one buffer, so a block-sized message would measure the CPU cache.
                let size = bytes.min(16 << 20);
                let iters = ((128u64 << 20) / size).clamp(8, 1000);
                let limit = |read: bool| -> (f64, String) {
                    let reps = a.repeat.max(3);
                    match t {
                        TransportKind::Tcp => {
                            // As many streams as the agent splits a transfer over.
                            let streams = AgentConfig::new("x")
                                .connections_per_peer
                                .min(batch as usize);
                            (
                                crate::limits::tcp_streams_gbps(bytes as usize, streams, reps)
                                    .unwrap_or(0.0),
                                format!("loopback TCP x{streams}, same bytes"),
                            )
                        }
                        _ if same_ucx => {
                            let test = if read { "ucp_get" } else { "ucp_put_bw" };
                            (
                                perftest(test, size, iters, None, pe)
                                    .map(|x| x.0)
                                    .unwrap_or(0.0),
                                format!("ucx_perftest {test}{}", if pe { " -e" } else { "" }),
                            )
                        }
                        _ => (
                            scattered_memcpy_gbps(block as usize, batch as usize, reps),
                            "memcpy, same blocks (one copy)".into(),
                        ),
                    }
                };
                for read in [true, false] {
                    let (limit, limit_name) = if a.no_limit {
                        (0.0, "none".to_string())
                    } else {
                        limit(read)
                    };
                    let secs = time_transfer(&p, read, block, batch, a.repeat)?;
                    let op = if read { "read" } else { "write" };
                    if t == TransportKind::Ucx {
                        if let Some(n) = nixl
                            .iter()
                            .find(|n| n.0 == op && n.1 == block && n.2 == u64::from(batch))
                        {
                            rows.push(Row {
                                path: format!("nixl:{op}"),
                                block_bytes: block,
                                batch: u64::from(batch),
                                gbps: n.3,
                                limit_gbps: limit,
                                extra: vec![
                                    ("us", Value::Float(bytes as f64 / n.3 / 1e3)),
                                    ("spread", Value::Float(0.0)),
                                    ("runs", Value::Int(a.repeat as u64)),
                                    ("limit", Value::Text(limit_name.clone())),
                                ],
                            });
                        }
                    }
                    rows.push(Row {
                        path: format!("{label}:{op}"),
                        block_bytes: block,
                        batch: u64::from(batch),
                        gbps: bytes as f64 / secs.median / 1e9,
                        limit_gbps: limit,
                        extra: vec![
                            ("us", Value::Float(secs.median * 1e6)),
                            ("spread", Value::Float(secs.spread)),
                            ("runs", Value::Int(secs.runs as u64)),
                            ("limit", Value::Text(limit_name)),
                        ],
                    });
                }
            }
        }
    }
    Ok(rows)
}

/// Where Debian's libucx0 puts libucp, the library `ucx_perftest` (ucx-utils) runs on.
const SYSTEM_UCX: &str = "/usr/lib/x86_64-linux-gnu/libucp.so";
