//! The CUDA copy engine on a real GPU: bit-exact round trips of random scattered blocks between
//! HBM and pinned DRAM for every layout kvcore knows and every copy method, the tier engine with
//! a device G1, and refusals of bad descriptors. Without a GPU each test prints why it skipped
//! (`.ci/test` counts those lines) and passes.

use std::collections::HashSet;
use std::time::Duration;

use kvcore::BlockHash;
use kvcore::{CacheLayout, Descriptor, Dtype, Geometry, MemKind, PlanBuilder, Region, StrideOrder};
use kvtier::cuda::{
    pinned_pool, CopyMethod, CudaCopy, CudaCopyConfig, DeviceBuffer, Gpu, MethodChoice,
};
use kvtier::{plan_pairs, CopyEngine, CopyError, CopyPair, MemoryRegistry, PinnedPool};
use kvtier::{TierCompletion, TierConfig, TierEngine};

const BLOCKS: u32 = 96;

fn gpu(test: &str) -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("kvferry-test skipped {test}: {e}");
            None
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: u64) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// `k` distinct block ids below `n`, in random order.
    fn blocks(&mut self, k: usize, n: u32) -> Vec<u32> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        while out.len() < k {
            let b = (self.next() % u64::from(n)) as u32;
            if seen.insert(b) {
                out.push(b);
            }
        }
        out
    }
}

fn geometry() -> Geometry {
    // 3 layers, 4 KV heads of 32 channels, bf16, 16-token blocks: 8 KiB per layer-block, with
    // 256-byte cells so that head-major and token-major orders really differ.
    Geometry::mha(3, 4, 32, Dtype::Bf16, 16).expect("valid geometry")
}

/// The bytes of each cell of `blocks` in a host copy of a cache, in a fixed order.
fn cells(layout: &CacheLayout, bytes: &[u8], blocks: &[u32]) -> Vec<u8> {
    let g = layout.geometry();
    let cell = g.cell_bytes() as usize;
    let mut out = Vec::new();
    for &b in blocks {
        for l in 0..g.layers {
            for h in 0..g.kv_heads {
                for t in 0..g.block_tokens {
                    let o = layout.offset(l, b, h, t).expect("in range") as usize;
                    out.extend_from_slice(&bytes[o..o + cell]);
                }
            }
        }
    }
    out
}

fn host_bytes(pool: &PinnedPool) -> Vec<u8> {
    // SAFETY: no copy is running when the tests read the pool.
    (0..pool.slots())
        .flat_map(|s| unsafe { pool.slot(s) }.to_vec())
        .collect()
}

fn fill_pool(pool: &PinnedPool, byte: u8) {
    for s in 0..pool.slots() {
        // SAFETY: no copy is running; the slot is in range.
        unsafe { std::ptr::write_bytes(pool.slot_ptr(s), byte, pool.slot_bytes() as usize) };
    }
}

struct Rig {
    engine: CudaCopy,
    dev: DeviceBuffer,
    dev_id: kvcore::RegionId,
    pool: PinnedPool,
    pool_id: kvcore::RegionId,
}

fn rig(gpu: &Gpu, span: u64, slot: u64, slots: u32, choice: MethodChoice) -> Rig {
    let memory = MemoryRegistry::new();
    let dev = gpu.alloc(span).expect("device memory");
    let pool = pinned_pool(gpu, slot, slots).expect("pinned pool");
    // SAFETY: both allocations live in the rig, which outlives every copy of the test.
    let (dev_id, pool_id) = unsafe {
        (
            memory
                .register(Region {
                    kind: MemKind::Device { ordinal: 0 },
                    base: dev.ptr(),
                    len: span,
                })
                .expect("register device"),
            memory.register(pool.region()).expect("register pool"),
        )
    };
    let engine = CudaCopy::new(gpu, memory, CudaCopyConfig { choice }).expect("copy engine");
    Rig {
        engine,
        dev,
        dev_id,
        pool,
        pool_id,
    }
}

#[test]
fn scattered_blocks_round_trip_bit_exact_for_every_layout_and_method() {
    let Some(gpu) = gpu("scattered_blocks_round_trip_bit_exact_for_every_layout_and_method") else {
        return;
    };
    let g = geometry();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let choices = [
        MethodChoice::Fixed(CopyMethod::PerRun),
        MethodChoice::Fixed(CopyMethod::Batch),
        MethodChoice::Fixed(CopyMethod::Kernel),
        MethodChoice::Auto,
    ];
    for order in StrideOrder::ALL {
        let g1 = CacheLayout::named(g, BLOCKS, order).expect("layout");
        let g2 = CacheLayout::block_packed(g, BLOCKS).expect("layout");
        for choice in choices {
            let r = rig(&gpu, g1.span_bytes(), g.block_bytes(), BLOCKS, choice);
            if let MethodChoice::Fixed(m) = choice {
                if let Err(why) = r.engine.supports(m) {
                    eprintln!("note: {} not run on {order}: {why}", m.name());
                    continue;
                }
            }
            let reference = rng.bytes(g1.span_bytes());
            r.dev.upload(0, &reference).expect("upload");
            fill_pool(&r.pool, 0xEE);
            // Offload 40 random blocks into 40 random slots.
            let blocks = rng.blocks(40, BLOCKS);
            let slots = rng.blocks(40, BLOCKS);
            let plan = PlanBuilder::new(&g1, &g2)
                .expect("plan")
                .build(&blocks, &slots)
                .expect("plan");
            let moved = r
                .engine
                .copy_blocking(
                    &plan_pairs(&plan, r.dev_id, r.pool_id),
                    Duration::from_secs(30),
                )
                .expect("offload");
            assert_eq!(moved, 40 * g.block_bytes());
            let pooled = host_bytes(&r.pool);
            assert!(
                cells(&g2, &pooled, &slots) == cells(&g1, &reference, &blocks),
                "offload {order} {choice:?}: bytes differ"
            );
            // Poison the device, onboard the slots into other random blocks.
            r.dev
                .upload(0, &vec![0xAB; g1.span_bytes() as usize])
                .expect("poison");
            let back = rng.blocks(40, BLOCKS);
            let plan = PlanBuilder::new(&g2, &g1)
                .expect("plan")
                .build(&slots, &back)
                .expect("plan");
            r.engine
                .copy_blocking(
                    &plan_pairs(&plan, r.pool_id, r.dev_id),
                    Duration::from_secs(30),
                )
                .expect("onboard");
            let mut after = vec![0u8; g1.span_bytes() as usize];
            r.dev.download(0, &mut after).expect("download");
            assert!(
                cells(&g1, &after, &back) == cells(&g1, &reference, &blocks),
                "onboard {order} {choice:?}: bytes differ"
            );
            // Blocks not onboarded were not touched.
            let untouched: Vec<u32> = (0..BLOCKS).filter(|b| !back.contains(b)).collect();
            assert!(cells(&g1, &after, &untouched).iter().all(|&b| b == 0xAB));
        }
    }
}

#[test]
fn bad_descriptors_fail_before_any_byte_moves() {
    let Some(gpu) = gpu("bad_descriptors_fail_before_any_byte_moves") else {
        return;
    };
    let r = rig(&gpu, 1 << 20, 1 << 20, 1, MethodChoice::Auto);
    fill_pool(&r.pool, 0x11);
    let pair = |src_off: u64, len: u64| CopyPair {
        src: Descriptor {
            region: r.dev_id,
            offset: src_off,
            len,
        },
        dst: Descriptor {
            region: r.pool_id,
            offset: 0,
            len,
        },
    };
    // Outside the registered device region.
    let e = r
        .engine
        .submit(
            &[pair(0, 4096), pair((1 << 20) - 100, 4096)],
            Box::new(|_| {}),
        )
        .expect_err("outside the region");
    assert!(matches!(e, CopyError::Region(_)), "{e}");
    // A device region registered past the end of its allocation is refused at first use.
    let memory = r.engine.memory().clone();
    // SAFETY: the region is never copied to; the test only checks that it is refused.
    let too_long = unsafe {
        memory.register(Region {
            kind: MemKind::Device { ordinal: 0 },
            base: r.dev.ptr() + (1 << 40),
            len: 4096,
        })
    };
    {
        let id = too_long.expect("disjoint from the other regions");
        let p = CopyPair {
            src: Descriptor {
                region: id,
                offset: 0,
                len: 4096,
            },
            dst: pair(0, 4096).dst,
        };
        let e = r
            .engine
            .submit(&[p], Box::new(|_| {}))
            .expect_err("not this allocation");
        eprintln!("refused as expected: {e}");
    }
    // Device memory of another ordinal is unreachable.
    // SAFETY: never copied; only the refusal is checked.
    let other = unsafe {
        memory.register(Region {
            kind: MemKind::Device { ordinal: 7 },
            base: 1 << 60,
            len: 4096,
        })
    }
    .expect("disjoint");
    let p = CopyPair {
        src: Descriptor {
            region: other,
            offset: 0,
            len: 4096,
        },
        dst: pair(0, 4096).dst,
    };
    assert!(matches!(
        r.engine.submit(&[p], Box::new(|_| {})),
        Err(CopyError::Unreachable { .. })
    ));
    // The kernel refuses pageable host memory it cannot reach.
    let mut pageable = vec![0u8; 4096];
    // SAFETY: `pageable` outlives the (refused) submission.
    let pid = unsafe {
        memory.register(Region {
            kind: MemKind::Host,
            base: pageable.as_mut_ptr() as u64,
            len: 4096,
        })
    }
    .expect("disjoint");
    let p = CopyPair {
        src: pair(0, 4096).src,
        dst: Descriptor {
            region: pid,
            offset: 0,
            len: 4096,
        },
    };
    if r.engine.supports(CopyMethod::Kernel).is_ok() {
        assert!(r
            .engine
            .submit_with(CopyMethod::Kernel, &[p], Box::new(|_| {}))
            .is_err());
    }
    // ...but DMA reaches it, and the bytes arrive.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    r.dev.upload(0, &data).expect("upload");
    r.engine
        .copy_blocking(&[p], Duration::from_secs(10))
        .expect("pageable copy");
    assert_eq!(pageable, data);
    // Nothing reached the pool.
    assert!(host_bytes(&r.pool).iter().all(|&b| b == 0x11));
}

#[test]
fn tier_engine_offloads_and_onboards_a_device_g1() {
    let Some(gpu) = gpu("tier_engine_offloads_and_onboards_a_device_g1") else {
        return;
    };
    let g = geometry();
    // vLLM's shape on GPUs: one allocation per layer, token-major (NHD) inside each.
    let per_layer = CacheLayout::named(Geometry { layers: 1, ..g }, BLOCKS, StrideOrder::Lbnhc)
        .expect("layout")
        .span_bytes();
    let tensors: Vec<DeviceBuffer> = (0..g.layers)
        .map(|_| gpu.alloc(per_layer).expect("layer tensor"))
        .collect();
    let base = tensors.iter().map(|t| t.ptr()).min().expect("layers");
    let offsets: Vec<u64> = tensors.iter().map(|t| t.ptr() - base).collect();
    let (bs, hs, ts) = CacheLayout::named(Geometry { layers: 1, ..g }, BLOCKS, StrideOrder::Lbnhc)
        .expect("layout")
        .strides();
    let layout = CacheLayout::from_strides(
        g,
        BLOCKS,
        kvcore::LayerPlacement::Explicit(offsets),
        bs,
        hs,
        ts,
    )
    .expect("layout");
    let mut cfg = TierConfig::new(g, 64);
    cfg.gpu = Some(0);
    // Token-major blocks in G2, like the NHD cache: whole planes per copy.
    cfg.block_order = StrideOrder::Blnhc;
    let tier = TierEngine::new(cfg).expect("tier engine on the GPU");
    // A cache that claims more blocks than its tensors hold is refused at registration.
    let too_big = CacheLayout::from_strides(
        g,
        BLOCKS * 2,
        kvcore::LayerPlacement::Explicit(tensors.iter().map(|t| t.ptr() - base).collect()),
        bs,
        hs,
        ts,
    );
    if let Ok(l) = too_big {
        // SAFETY: refused before anything is registered.
        assert!(unsafe { tier.register_g1_device(l, base) }.is_err());
    }
    // SAFETY: the tensors outlive the tier engine (dropped at the end of the test, after it).
    let g1 = unsafe { tier.register_g1_device(layout.clone(), base) }.expect("register");
    let mut rng = Rng(42);
    let mut reference = Vec::new();
    for t in &tensors {
        let b = rng.bytes(per_layer);
        t.upload(0, &b).expect("upload");
        reference.push(b);
    }
    let host_view = |bufs: &[Vec<u8>]| -> Vec<u8> {
        // The layers laid out at their offsets, so `cells` can read them with `layout`.
        let mut v = vec![0u8; layout.span_bytes() as usize];
        for (t, b) in tensors.iter().zip(bufs) {
            let o = (t.ptr() - base) as usize;
            v[o..o + b.len()].copy_from_slice(b);
        }
        v
    };
    let blocks = rng.blocks(48, BLOCKS);
    let items: Vec<(BlockHash, u32)> = blocks
        .iter()
        .map(|&b| (BlockHash::from_u64(u64::from(b) + 1000), b))
        .collect();
    let id = tier.offload(g1, &items).expect("offload");
    let done: TierCompletion = tier
        .wait(id, Duration::from_secs(30))
        .expect("offload done");
    assert!(done.all_ok(), "{done:?}");
    for t in &tensors {
        t.upload(0, &vec![0x5A; per_layer as usize])
            .expect("poison");
    }
    let back = rng.blocks(48, BLOCKS);
    let items: Vec<(BlockHash, u32)> = blocks
        .iter()
        .zip(&back)
        .map(|(&b, &to)| (BlockHash::from_u64(u64::from(b) + 1000), to))
        .collect();
    let id = tier.onboard(g1, &items).expect("onboard");
    let done = tier
        .wait(id, Duration::from_secs(30))
        .expect("onboard done");
    assert!(done.all_ok(), "{done:?}");
    let after: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| {
            let mut v = vec![0u8; per_layer as usize];
            t.download(0, &mut v).expect("download");
            v
        })
        .collect();
    assert!(
        cells(&layout, &host_view(&after), &back)
            == cells(&layout, &host_view(&reference), &blocks),
        "blocks came back different"
    );
    drop(tier);
}

#[test]
fn without_a_gpu_every_entry_point_says_so() {
    match Gpu::open(0) {
        Ok(g) => {
            // With a GPU: a device that does not exist is still a clear error.
            assert!(matches!(Gpu::open(1000), Err(CopyError::NoGpu(_))));
            eprintln!("GPU present: {:?}", g.info());
        }
        Err(e) => {
            assert!(matches!(e, CopyError::NoGpu(_)), "{e}");
            let mut cfg = TierConfig::new(geometry(), 4);
            cfg.gpu = Some(0);
            let err = TierEngine::new(cfg)
                .err()
                .expect("no tier engine without a GPU");
            assert!(err.to_string().contains("no GPU"), "{err}");
            // The host tier engine is unaffected.
            TierEngine::new(TierConfig::new(geometry(), 4)).expect("host tiers work");
        }
    }
}
