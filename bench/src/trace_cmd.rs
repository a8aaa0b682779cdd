//! `kvferry-bench trace`: eviction and admission policies replayed on request traces, next to
//! the offline optimum at the same capacity in the same run.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use kvferry::kvtier::{Admission, PolicyKind, WriteBudget};

use crate::report::{json_f64, json_str, print_cells};
use crate::trace::{belady, connector, load, payload, replay, synth, Trace};

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Trace files: Mooncake's JSONL (`hash_ids`), or prompts as token ids (`tokens`), one JSON
    /// object per line or a JSON array.
    files: Vec<PathBuf>,
    /// Also replay generated traces with these seeds (another reuse shape; see `trace/synth.rs`).
    #[arg(long, value_delimiter = ',')]
    synthetic: Vec<u64>,
    /// Requests per generated trace.
    #[arg(long, default_value_t = 12_000)]
    synthetic_requests: usize,
    /// Write each generated trace here (Mooncake's format), `{seed}` replaced by its seed.
    #[arg(long)]
    write_synthetic: Option<String>,
    /// Tokens per block when hashing token-id prompts.
    #[arg(long, default_value_t = 16)]
    block_tokens: u64,
    /// G2 capacities: a fraction of the trace's distinct blocks (with a '.') or blocks.
    #[arg(long, value_delimiter = ',', default_value = "0.02,0.05,0.10,0.25")]
    capacity: Vec<String>,
    /// G3 capacities, same form (each with every G2 capacity); none: DRAM only.
    #[arg(long, value_delimiter = ',')]
    g3: Vec<String>,
    /// Eviction policies.
    #[arg(long, value_delimiter = ',', default_value = "lru,s3fifo,lfu")]
    policies: Vec<String>,
    /// G3 admission (rows with a G3 only).
    #[arg(long, value_delimiter = ',', default_value = "always,frequency")]
    admission: Vec<String>,
    /// G3 write budget in MiB/s of trace time (writes over it are dropped).
    #[arg(long)]
    write_budget_mib_s: Option<f64>,
    /// Replay as vLLM's KVFerryConnector runs the tiers: the scheduler owns eviction (at G3's
    /// capacity), blocks not admitted to NVMe are discarded at the next step. Default: the tier
    /// engine evicting on its own, as Rust users and vLLM's OffloadingConnector run it.
    #[arg(long)]
    connector: bool,
    /// Also replay each row through a real tier engine with (4 KiB) payloads, G3 files in this
    /// directory: per-request time and a check that every loaded block holds its own bytes.
    #[arg(long)]
    payload: Option<PathBuf>,
    /// KV bytes per token, for bytes written (default: Llama-3-8B in bf16).
    #[arg(long, default_value_t = 131_072)]
    bytes_per_token: u64,
}

pub struct TraceRow {
    trace: String,
    mode: &'static str,
    policy: PolicyKind,
    admission: Option<Admission>,
    capacity_fraction: f64,
    g2_blocks: u64,
    g3_fraction: f64,
    g3_blocks: u64,
    out: replay::Outcome,
    limit_hit_ratio: f64,
    /// LRU with perfect admission (told which blocks are used again), same capacity.
    oracle_lru_hit_ratio: f64,
    engine: Option<payload::Outcome>,
}

impl TraceRow {
    fn is_default(&self) -> bool {
        self.policy == PolicyKind::default()
            && self.admission.is_none_or(|a| a == Admission::default())
    }

    fn ratio(&self) -> f64 {
        if self.limit_hit_ratio > 0.0 {
            self.out.hit_ratio() / self.limit_hit_ratio
        } else {
            0.0
        }
    }

    fn ns_per_ref(&self) -> f64 {
        self.out.elapsed.as_nanos() as f64 / self.out.references.max(1) as f64
    }

    fn ratio_of(&self, n: u64) -> f64 {
        n as f64 / self.out.references.max(1) as f64
    }

    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        let _ = write!(
            s,
            "\"trace\":{},\"mode\":{},\"policy\":{},\"admission\":{},\"capacity_fraction\":{},\"g2_blocks\":{},\
             \"g3_fraction\":{},\"g3_blocks\":{},\"hit_ratio\":{},\"g2_hit_ratio\":{},\
             \"g3_hit_ratio\":{},\"limit_hit_ratio\":{},\"oracle_lru_hit_ratio\":{},\"ratio\":{},\"nvme_bytes_written\":{},\
             \"nvme_writes\":{},\"rejected\":{},\"dropped\":{},\"ns_per_ref\":{},\"default\":{}}}",
            json_str(&self.trace),
            json_str(self.mode),
            json_str(self.policy.name()),
            self.admission
                .map_or("null".to_string(), |a| json_str(&a.to_string())),
            json_f64(self.capacity_fraction),
            self.g2_blocks,
            json_f64(self.g3_fraction),
            self.g3_blocks,
            json_f64(self.out.hit_ratio()),
            json_f64(self.ratio_of(self.out.g2_hits)),
            json_f64(self.ratio_of(self.out.g3_hits)),
            json_f64(self.limit_hit_ratio),
            json_f64(self.oracle_lru_hit_ratio),
            json_f64(self.ratio()),
            self.out.nvme_bytes_written,
            self.out.nvme_writes,
            self.out.rejected,
            self.out.dropped,
            json_f64(self.ns_per_ref()),
            self.is_default()
        );
        if let Some(e) = &self.engine {
            s.pop();
            let _ = write!(
                s,
                ",\"engine_hit_ratio\":{},\"engine_us_per_request\":{},\"engine_failed_loads\":{}}}",
                json_f64(e.hit_ratio()),
                json_f64(e.us_per_request()),
                e.failed_loads
            );
        }
        s
    }
}

/// "0.05" is a fraction of `distinct`; "4096" is blocks. More than `distinct` holds as much as
/// `distinct` (everything fits), so it is cut there (and so is what the replay allocates).
fn capacity(spec: &str, distinct: u64) -> Result<(u64, f64), String> {
    let (blocks, fraction) = capacity_spec(spec, distinct)?;
    Ok((blocks.min(distinct.max(1)), fraction))
}

fn capacity_spec(spec: &str, distinct: u64) -> Result<(u64, f64), String> {
    let spec = spec.trim();
    if spec.contains('.') {
        let f: f64 = spec
            .parse()
            .map_err(|e| format!("capacity {spec:?}: {e}"))?;
        if !(f > 0.0 && f.is_finite()) {
            return Err(format!("capacity {spec:?}: a positive fraction"));
        }
        Ok((((distinct as f64) * f).round().max(1.0) as u64, f))
    } else {
        let n: u64 = spec
            .parse()
            .map_err(|e| format!("capacity {spec:?}: {e}"))?;
        Ok((n.max(1), n as f64 / distinct.max(1) as f64))
    }
}

fn traces(a: &TraceArgs) -> Result<Vec<Trace>, String> {
    let mut out = Vec::new();
    for f in &a.files {
        out.push(load::load(f, a.block_tokens)?);
    }
    for &seed in &a.synthetic {
        let t = synth::generate(seed, a.synthetic_requests);
        if let Some(p) = &a.write_synthetic {
            let p = p.replace("{seed}", &seed.to_string());
            std::fs::write(&p, synth::to_jsonl(&t)).map_err(|e| format!("{p}: {e}"))?;
        }
        out.push(t);
    }
    if out.is_empty() {
        return Err("no trace: name a file or --synthetic SEED".into());
    }
    Ok(out)
}

pub fn rows(a: &TraceArgs) -> Result<Vec<TraceRow>, String> {
    let policies: Vec<PolicyKind> = a
        .policies
        .iter()
        .map(|p| p.parse())
        .collect::<Result<_, _>>()?;
    let admissions: Vec<Admission> = a
        .admission
        .iter()
        .map(|p| p.parse())
        .collect::<Result<_, _>>()?;
    if a.connector && a.payload.is_some() {
        return Err(
            "--payload replays the engine evicting on its own; not with --connector".into(),
        );
    }
    let mut rows = Vec::new();
    for t in traces(a)? {
        let distinct = t.distinct();
        if distinct == 0 {
            return Err(format!("{}: no blocks in the trace", t.name));
        }
        let block_bytes = t.block_tokens.saturating_mul(a.bytes_per_token);
        let budget = match a.write_budget_mib_s {
            Some(m) if m.is_finite() && m > 0.0 => {
                let per_sec = ((m * 1024.0 * 1024.0) as u64).max(1);
                Some(WriteBudget {
                    bytes_per_sec: per_sec,
                    burst_bytes: per_sec.max(block_bytes),
                })
            }
            Some(m) => return Err(format!("--write-budget-mib-s {m}: a positive number")),
            None => None,
        };
        let refs = t.references() as f64;
        let mut limits: HashMap<u64, (f64, f64)> = HashMap::new();
        let g3s: Vec<Option<&String>> = if a.g3.is_empty() {
            vec![None]
        } else {
            a.g3.iter().map(Some).collect()
        };
        for spec in &a.capacity {
            let (g2, frac) = capacity(spec, distinct)?;
            for g3spec in &g3s {
                let (g3, g3_frac) = match g3spec {
                    Some(s) => capacity(s, distinct)?,
                    None => (0, 0.0),
                };
                let total = g2.saturating_add(g3);
                let (limit, oracle) = *limits.entry(total).or_insert_with(|| {
                    (
                        belady::hits(&t, total) as f64 / refs,
                        belady::oracle_lru_hits(&t, total) as f64 / refs,
                    )
                });
                let adm: Vec<Option<Admission>> = if g3 == 0 {
                    vec![None]
                } else {
                    admissions.iter().copied().map(Some).collect()
                };
                for &policy in &policies {
                    for admission in &adm {
                        let cfg = replay::Config {
                            policy,
                            g2_blocks: g2,
                            g3_blocks: g3,
                            admission: admission.unwrap_or_default(),
                            budget,
                            block_bytes,
                        };
                        let engine = match &a.payload {
                            Some(dir) => Some(payload::replay(&t, &cfg, dir)?),
                            None => None,
                        };
                        let out = if a.connector {
                            connector::replay(&t, &cfg)
                        } else {
                            replay::replay(&t, &cfg)
                        };
                        rows.push(TraceRow {
                            trace: t.name.clone(),
                            mode: if a.connector { "connector" } else { "engine" },
                            policy,
                            admission: *admission,
                            capacity_fraction: frac,
                            g2_blocks: g2,
                            g3_fraction: g3_frac,
                            g3_blocks: g3,
                            out,
                            limit_hit_ratio: limit,
                            oracle_lru_hit_ratio: oracle,
                            engine,
                        });
                    }
                }
            }
        }
    }
    Ok(rows)
}

pub fn print(rows: &[TraceRow], json: bool) {
    if json {
        for r in rows {
            println!("{}", r.to_json());
        }
        return;
    }
    let mut cells = vec![[
        "trace",
        "policy",
        "admission",
        "g2",
        "g3",
        "hit",
        "g2_hit",
        "g3_hit",
        "limit",
        "oracle",
        "ratio",
        "nvme_GB",
        "rejected",
        "dropped",
        "ns/ref",
    ]
    .map(String::from)
    .to_vec()];
    let engine = rows.iter().any(|r| r.engine.is_some());
    if engine {
        cells[0].extend(["engine_hit".to_string(), "us/req".to_string()]);
    }
    for r in rows {
        let mark = if r.is_default() { "*" } else { "" };
        cells.push(vec![
            r.trace.clone(),
            format!("{}{mark}", r.policy),
            r.admission.map_or("-".into(), |a| a.to_string()),
            format!("{:.3}", r.capacity_fraction),
            format!("{:.3}", r.g3_fraction),
            format!("{:.3}", r.out.hit_ratio()),
            format!("{:.3}", r.ratio_of(r.out.g2_hits)),
            format!("{:.3}", r.ratio_of(r.out.g3_hits)),
            format!("{:.3}", r.limit_hit_ratio),
            format!("{:.3}", r.oracle_lru_hit_ratio),
            format!("{:.2}", r.ratio()),
            format!("{:.1}", r.out.nvme_bytes_written as f64 / 1e9),
            r.out.rejected.to_string(),
            r.out.dropped.to_string(),
            format!("{:.0}", r.ns_per_ref()),
        ]);
        if let (true, Some(last)) = (engine, cells.last_mut()) {
            match &r.engine {
                Some(e) => last.extend([
                    format!("{:.3}", e.hit_ratio()),
                    format!("{:.0}", e.us_per_request()),
                ]),
                None => last.extend(["-".to_string(), "-".to_string()]),
            }
        }
    }
    print_cells(&cells);
    println!(
        "* kvferry's default; limit: Belady's optimum (with bypass) at the same total capacity"
    );
}
