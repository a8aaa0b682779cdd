//! Device memory over the network: two agents on loopback, the source's blocks in HBM. With a
//! UCX built with CUDA the decode side reads device memory directly into device memory (UCX's
//! cuda_copy / cuda_ipc / GPUDirect transports); otherwise each side stages through CUDA pinned
//! DRAM with kvtier's CudaCopy, and the test says which path ran. Bytes are compared bit for bit.
//! Skips with a printed reason without a GPU or without libucp.

use std::time::Duration;

use kvferry::kvcore::{Descriptor, MemKind, Region, RegionId};
use kvferry::kvnet::{Agent, AgentConfig, TransportKind};
use kvferry::kvtier::cuda::{pinned_pool, CudaCopy, CudaCopyConfig, DeviceBuffer, Gpu};
use kvferry::kvtier::{CopyEngine, CopyPair, MemoryRegistry, PinnedPool};

const PIECE: u64 = 64 << 10;
const PIECES: u64 = 128;

fn skip(why: &str) {
    eprintln!("kvferry-test skipped device_memory_crosses_ucx_bit_exact: {why}");
}

/// One side's memory: a device buffer, and a pinned pool for staging, both known to a copy
/// engine.
struct Side {
    dev: DeviceBuffer,
    pool: PinnedPool,
    copy: CudaCopy,
    dev_id: RegionId,
    pool_id: RegionId,
}

fn side(gpu: &Gpu) -> Side {
    let bytes = PIECE * PIECES;
    let dev = gpu.alloc(bytes).expect("device memory");
    let pool = pinned_pool(gpu, bytes, 1).expect("pinned pool");
    let memory = MemoryRegistry::new();
    // SAFETY: both live in the `Side`, which outlives its copy engine's work (copies are waited
    // for before the test goes on).
    let (dev_id, pool_id) = unsafe {
        (
            memory
                .register(Region {
                    kind: MemKind::Device {
                        ordinal: gpu.ordinal(),
                    },
                    base: dev.ptr(),
                    len: bytes,
                })
                .expect("register device"),
            memory.register(pool.region()).expect("register pool"),
        )
    };
    let copy = CudaCopy::new(gpu, memory, CudaCopyConfig::default()).expect("copy engine");
    Side {
        dev,
        pool,
        copy,
        dev_id,
        pool_id,
    }
}

impl Side {
    /// The whole device buffer to or from the staging pool.
    fn stage(&self, to_device: bool) {
        let len = self.dev.len();
        let (d, h) = (
            Descriptor {
                region: self.dev_id,
                offset: 0,
                len,
            },
            Descriptor {
                region: self.pool_id,
                offset: 0,
                len,
            },
        );
        let pair = if to_device {
            CopyPair { src: h, dst: d }
        } else {
            CopyPair { src: d, dst: h }
        };
        self.copy
            .copy_blocking(&[pair], Duration::from_secs(30))
            .expect("staging copy");
    }

    /// What this side exports to (or reads into with) `agent`: the device buffer when UCX has
    /// CUDA, else the pinned pool.
    fn register(&self, agent: &Agent) -> (RegionId, bool) {
        let direct = agent.device_memory();
        let region = if direct {
            Region {
                kind: MemKind::Device {
                    ordinal: self.copy.gpu().ordinal(),
                },
                base: self.dev.ptr(),
                len: self.dev.len(),
            }
        } else {
            self.pool.region()
        };
        // SAFETY: the memory outlives the agent (the test drops agents first).
        let id = unsafe { agent.register(region) }.expect("register with the agent");
        (id, direct)
    }
}

#[test]
fn device_memory_crosses_ucx_bit_exact() {
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e) => return skip(&e.to_string()),
    };
    let prefill = Agent::new(AgentConfig::new("gpu-prefill")).expect("agent");
    let Some(lib) = prefill.ucx_library().map(str::to_string) else {
        return skip("no libucp found (install libucx0 or set KVFERRY_UCX_LIB)");
    };
    let mut cfg = AgentConfig::new("gpu-decode");
    cfg.transports = vec![TransportKind::Ucx];
    let decode = Agent::new(cfg).expect("agent");
    let (src, dst) = (side(&gpu), side(&gpu));
    let data: Vec<u8> = {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        (0..src.dev.len())
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    src.dev.upload(0, &data).expect("upload");
    dst.dev.fill(0xC3).expect("poison");
    let (src_region, src_direct) = src.register(&prefill);
    if !src_direct {
        src.stage(false);
    }
    let (dst_region, dst_direct) = dst.register(&decode);
    eprintln!(
        "gpu_net: UCX {lib}: {}",
        if src_direct && dst_direct {
            "device memory registered with UCX, read HBM to HBM directly"
        } else {
            "this UCX has no CUDA support: staged through pinned DRAM with CudaCopy on each side"
        }
    );
    let peer = decode.connect(prefill.listen_addr()).expect("connect");
    assert_eq!(decode.transport_for(&peer), Some(TransportKind::Ucx));
    // Scattered pieces, in shuffled order, each landing where it came from.
    let mut order: Vec<u64> = (0..PIECES).collect();
    order.sort_by_key(|i| (i * 0x9E37_79B9) % 1009);
    let desc = |region, i: u64| Descriptor {
        region,
        offset: i * PIECE,
        len: PIECE,
    };
    let local: Vec<Descriptor> = order.iter().map(|&i| desc(dst_region, i)).collect();
    let remote: Vec<Descriptor> = order.iter().map(|&i| desc(src_region, i)).collect();
    let id = decode
        .read(
            &local,
            &peer,
            &remote,
            Some(b"device blocks pulled".to_vec()),
        )
        .expect("post read");
    let done = decode
        .wait(id, Duration::from_secs(60))
        .expect("read finishes");
    assert_eq!(done.result.expect("read ok"), PIECE * PIECES);
    if !dst_direct {
        dst.stage(true);
    }
    let mut got = vec![0u8; data.len()];
    dst.dev.download(0, &mut got).expect("download");
    assert!(got == data, "device bytes differ after the transfer");
    drop(decode);
    drop(prefill);
}
