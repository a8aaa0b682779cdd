//! kvferry-bench: measures kvferry's paths next to the physical limit measured in the same run.

mod child;
mod gpu_cmd;
mod limits;
mod mooncake_cmd;
mod net_cmd;
mod nixl_cmd;
mod plan_cmd;
mod report;
mod tier_cmd;
mod trace;
mod trace_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "kvferry-bench", version, about)]
struct Cli {
    /// One JSON object per row instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Plan building for a long-context transfer, and codec throughput.
    Plan(plan_cmd::PlanArgs),
    /// Tier bandwidth: G1(host)<->G2 against memcpy, G2<->G3 against fio.
    Tier(tier_cmd::TierArgs),
    /// HBM<->pinned DRAM for vLLM-shaped caches, against one contiguous copy and vLLM's per-block
    /// copies (needs an NVIDIA GPU).
    Gpu(gpu_cmd::GpuArgs),
    /// Network bandwidth and latency between two agents on loopback, against ucx_perftest.
    Net(net_cmd::NetArgs),
    /// Cache policies replayed on request traces (hit ratios, NVMe writes) against the offline
    /// optimum at the same capacity.
    Trace(trace_cmd::TraceArgs),
}

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    let table = |rows: Vec<report::Row>| report::print(&rows, json);
    let done = match &cli.cmd {
        Cmd::Plan(a) => plan_cmd::run(a).map(table),
        Cmd::Tier(a) => tier_cmd::run(a).map(table),
        Cmd::Net(a) => net_cmd::run(a).map(table),
        Cmd::Gpu(a) => gpu_cmd::run(a).map(table),
        Cmd::Trace(a) => trace_cmd::rows(a).map(|rows| trace_cmd::print(&rows, json)),
    };
    if let Err(e) = done {
        eprintln!("kvferry-bench: {e}");
        std::process::exit(1);
    }
}
