//! Helpers shared by the tier tests: a host "G1" cache with recognisable contents.
#![allow(dead_code)]

use std::time::Duration;

use kvtier::kvcore::{BlockHash, CacheLayout, Dtype, Geometry, StrideOrder};
use kvtier::{G1Id, TierCompletion, TierEngine};

pub const WAIT: Duration = Duration::from_secs(30);

pub fn geometry() -> Geometry {
    // 3 layers x 2 heads x 32 tokens x (64 + 64) fp16 = 48 KiB per block.
    Geometry::mha(3, 2, 64, Dtype::Fp16, 32).expect("valid")
}

/// An engine-side cache in vLLM's CPU layout, filled with a pattern that differs per block.
pub struct G1 {
    pub layout: CacheLayout,
    pub mem: Vec<u8>,
}

impl G1 {
    pub fn new(g: Geometry, blocks: u32, seed: u64) -> G1 {
        let layout = CacheLayout::named(g, blocks, StrideOrder::Lbhnc).expect("valid");
        let mut x = seed | 1;
        let mem = (0..layout.span_bytes())
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        G1 { layout, mem }
    }

    /// Every byte of one block, in a fixed order.
    pub fn block(&self, b: u32) -> Vec<u8> {
        self.layout
            .block_runs(b)
            .expect("in range")
            .into_iter()
            .flat_map(|(o, l)| self.mem[o as usize..(o + l) as usize].to_vec())
            .collect()
    }

    pub fn register(&mut self, t: &TierEngine) -> G1Id {
        // SAFETY: every test keeps the G1 buffer alive and untouched while the engine copies,
        // and drops the engine before the buffer.
        unsafe { t.register_g1(self.layout.clone(), self.mem.as_mut_ptr()) }.expect("same geometry")
    }
}

pub fn hash(i: u64) -> BlockHash {
    BlockHash::from_bytes(&[&i.to_le_bytes()[..], b"-block-hash-0123456789abcdef0123"].concat())
        .expect("fits")
}

pub fn wait(t: &TierEngine, id: u64) -> TierCompletion {
    t.wait(id, WAIT).expect("request completes in time")
}
