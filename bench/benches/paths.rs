//! Criterion benches for the data paths' hot operations, so a regression shows in review:
//! a G1→G2 batch and a G2→G1 batch through the tier engine, and one small transfer (post, then
//! wait) between two agents on loopback over TCP and, when libucp loads, over UCX.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvferry::kvcore::{BlockHash, CacheLayout, Descriptor, Dtype, Geometry, MemKind, Region};
use kvferry::kvnet::{Agent, AgentConfig, TransportKind};
use kvferry::kvtier::{TierConfig, TierEngine};

fn tiers(c: &mut Criterion) {
    // 64 KiB blocks: one layer of 8 KV heads x 128 x bf16 x 16 tokens.
    let g = Geometry::mha(1, 8, 128, Dtype::Bf16, 16).expect("valid");
    let mut group = c.benchmark_group("tier");
    for batch in [1u32, 16] {
        let mut cfg = TierConfig::new(g, batch);
        cfg.copy_threads = 2;
        let t = TierEngine::new(cfg).expect("engine");
        let n = batch * 2;
        let layout = CacheLayout::named(g, n, kvferry::kvcore::StrideOrder::Lbhnc).expect("layout");
        let mut g1 = vec![0x5au8; layout.span_bytes() as usize];
        // SAFETY: `g1` outlives `t` (dropped after it, below) and is not touched while copies run.
        let id = unsafe { t.register_g1(layout, g1.as_mut_ptr()) }.expect("register");
        let blocks: Vec<(BlockHash, u32)> = (0..batch)
            .map(|i| (BlockHash::from_u64(u64::from(i) + 1), i * 2 % n))
            .collect();
        group.throughput(Throughput::Bytes(g.block_bytes() * u64::from(batch)));
        let mut salt = 1u64 << 40;
        group.bench_with_input(BenchmarkId::new("g1-to-g2", batch), &batch, |b, _| {
            b.iter(|| {
                // New hashes each time: an offload of cached blocks would copy nothing.
                salt += 1 << 20;
                let fresh: Vec<_> = blocks
                    .iter()
                    .enumerate()
                    .map(|(i, (_, blk))| (BlockHash::from_u64(salt | i as u64), *blk))
                    .collect();
                let r = t.offload(id, &fresh).expect("offload");
                let done = t.wait(r, Duration::from_secs(30)).expect("completes");
                assert!(done.all_ok());
            })
        });
        let r = t.offload(id, &blocks).expect("offload");
        assert!(t
            .wait(r, Duration::from_secs(30))
            .expect("completes")
            .all_ok());
        group.bench_with_input(BenchmarkId::new("g2-to-g1", batch), &batch, |b, _| {
            b.iter(|| {
                let r = t.onboard(id, &blocks).expect("onboard");
                let done = t.wait(r, Duration::from_secs(30)).expect("completes");
                assert!(done.all_ok());
            })
        });
        drop(t);
        drop(g1);
    }
    group.finish();
}

/// Two agents on loopback, their buffers (dropped after them), and a 4 KiB descriptor in each.
struct Pair {
    init: Agent,
    target: Agent,
    bufs: (Vec<u8>, Vec<u8>),
    local: Descriptor,
    remote: Descriptor,
}

/// Two agents on loopback over `t`, each with a registered 1 MiB buffer; `None` if `t` is
/// not available here.
fn pair(t: TransportKind) -> Option<Pair> {
    let cfg = |name: &str| {
        let mut c = AgentConfig::new(name);
        c.transports = vec![t];
        c.timeout = Duration::from_secs(10);
        c
    };
    let init = Agent::new(cfg("bench-initiator")).ok()?;
    let target = Agent::new(cfg("bench-target")).ok()?;
    if t == TransportKind::Ucx && init.ucx_library().is_none() {
        eprintln!("paths: UCX is not available here; its bench is skipped");
        return None;
    }
    let (mut a, mut b) = (vec![1u8; 1 << 20], vec![2u8; 1 << 20]);
    let reg = |agent: &Agent, buf: &mut Vec<u8>| {
        // SAFETY: the buffers are returned with the agents and dropped after them.
        unsafe {
            agent.register(Region {
                kind: MemKind::Host,
                base: buf.as_mut_ptr() as u64,
                len: buf.len() as u64,
            })
        }
        .ok()
    };
    let l = reg(&init, &mut a)?;
    let r = reg(&target, &mut b)?;
    init.connect(target.listen_addr()).ok()?;
    let d = |region| Descriptor {
        region,
        offset: 0,
        len: 4096,
    };
    Some(Pair {
        init,
        target,
        bufs: (a, b),
        local: d(l),
        remote: d(r),
    })
}

fn transfers(c: &mut Criterion) {
    let mut group = c.benchmark_group("transfer");
    group.throughput(Throughput::Bytes(4096));
    for (name, t) in [("tcp", TransportKind::Tcp), ("ucx", TransportKind::Ucx)] {
        if t == TransportKind::Ucx && std::env::var_os("UCX_NET_DEVICES").is_none() {
            std::env::set_var("UCX_NET_DEVICES", "lo");
        }
        let Some(Pair {
            init,
            target,
            bufs,
            local: l,
            remote: r,
        }) = pair(t)
        else {
            continue;
        };
        group.bench_function(BenchmarkId::new("read-4KiB", name), |bch| {
            bch.iter(|| {
                let id = init.read(&[l], "bench-target", &[r], None).expect("posted");
                let done = init.wait(id, Duration::from_secs(30)).expect("completes");
                assert!(done.result.is_ok());
            })
        });
        drop(init);
        drop(target);
        drop(bufs);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3));
    targets = tiers, transfers
}
criterion_main!(benches);
