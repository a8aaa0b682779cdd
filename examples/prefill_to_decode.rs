//! A prefill rank (TP 1) hands a prompt's KV blocks to a decode rank (TP 2) through host memory:
//! the prefill side publishes its metadata as a wire frame, the decode side decodes it, checks the
//! geometry, plans the reads of its head slice and copies. Every byte is checked afterwards.
//!
//! `cargo run --example prefill_to_decode`

use kvferry::kvcore::wire::{
    AgentMetadata, ExportedCache, ExportedRegion, Message, PROTOCOL_VERSION,
};
use kvferry::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total_heads = 8;
    let prefill_geo = Geometry::mha(4, total_heads, 64, Dtype::Bf16, 16)?;
    let prefill_layout = CacheLayout::named(prefill_geo, 64, StrideOrder::Lbhnc)?;
    let mut prefill_mem = vec![0u8; prefill_layout.span_bytes() as usize];
    for (i, b) in prefill_mem.iter_mut().enumerate() {
        *b = (i as u64).wrapping_mul(0x9e37_79b9) as u8;
    }

    // The prompt: 100 tokens → 6 full blocks, hashed the way a Rust engine would key them.
    let tokens: Vec<u32> = (1000..1100).collect();
    let hashes = PrefixHasher::new(16).hash_prefix(&tokens);
    let prefill_blocks = [40u32, 3, 17, 18, 19, 62];

    let metadata = Message::Metadata(AgentMetadata {
        name: "prefill-0".into(),
        protocol_version: PROTOCOL_VERSION,
        endpoints: vec![],
        regions: vec![ExportedRegion {
            id: RegionId(0),
            region: Region {
                kind: MemKind::Host,
                base: prefill_mem.as_ptr() as u64,
                len: prefill_layout.span_bytes(),
            },
            keys: vec![],
        }],
        caches: vec![ExportedCache {
            region: RegionId(0),
            layout: prefill_layout.clone(),
            tp_size: 1,
            tp_rank: 0,
            staged: false,
        }],
    })
    .encode();

    // Decode side: rank 1 of TP 2 holds heads 4..8.
    let Message::Metadata(remote) = Message::decode(&metadata)? else {
        return Err("expected agent metadata".into());
    };
    let remote_layout = &remote.caches[0].layout;
    let decode_geo = Geometry::mha(4, total_heads / 2, 64, Dtype::Bf16, 16)?;
    remote_layout
        .geometry()
        .check_same_except_heads(&decode_geo)?;
    let decode_layout = CacheLayout::named(decode_geo, 32, StrideOrder::Lbhnc)?;
    let mut decode_mem = vec![0u8; decode_layout.span_bytes() as usize];
    let decode_blocks = [0u32, 1, 2, 3, 4, 5];
    let mut moved = 0;
    let mut copies = 0;
    for read in tp_reads(total_heads, remote.caches[0].tp_size, 2, 1)? {
        let plan = PlanBuilder::new(remote_layout, &decode_layout)?
            .heads(read.heads)?
            .build(&prefill_blocks, &decode_blocks)?;
        plan.apply(&prefill_mem, &mut decode_mem)?;
        moved += plan.bytes();
        copies += plan.len();
    }

    // Verify every cell against the source.
    let cell = decode_geo.cell_bytes() as usize;
    for (s, d) in prefill_blocks.iter().zip(decode_blocks) {
        for l in 0..4 {
            for h in 0..4 {
                for t in 0..16 {
                    let so = prefill_layout.offset(l, *s, h + 4, t)? as usize;
                    let dof = decode_layout.offset(l, d, h, t)? as usize;
                    if prefill_mem[so..so + cell] != decode_mem[dof..dof + cell] {
                        return Err(
                            format!("mismatch at layer {l} block {d} head {h} token {t}").into(),
                        );
                    }
                }
            }
        }
    }
    println!(
        "moved {} blocks ({} bytes, {} copies) for prompt blocks {}..{}; all cells verified",
        decode_blocks.len(),
        moved,
        copies,
        hashes[0],
        hashes[hashes.len() - 1]
    );
    Ok(())
}
