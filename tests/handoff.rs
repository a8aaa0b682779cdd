//! Cross-crate: a prefill agent's metadata crosses the wire format, the decode side plans reads
//! of its tensor-parallel head slice against the decoded layout, and the bytes that land equal
//! the source's; corrupted metadata and mismatched geometries are refused before any copy.

use kvferry::kvcore::wire::{
    AgentMetadata, ExportedCache, ExportedRegion, Message, PROTOCOL_VERSION,
};
use kvferry::prelude::*;

fn prefill(order: StrideOrder) -> (CacheLayout, Vec<u8>, Vec<u8>) {
    let geo = Geometry::mha(3, 4, 32, Dtype::Fp16, 16).expect("valid");
    let layout = CacheLayout::named(geo, 32, order).expect("valid");
    let mem: Vec<u8> = (0..layout.span_bytes())
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let frame = Message::Metadata(AgentMetadata {
        name: "prefill-0".into(),
        protocol_version: PROTOCOL_VERSION,
        endpoints: vec![],
        regions: vec![ExportedRegion {
            id: RegionId(7),
            region: Region {
                kind: MemKind::Host,
                base: 0x1000,
                len: layout.span_bytes(),
            },
            keys: vec![],
        }],
        caches: vec![ExportedCache {
            region: RegionId(7),
            layout: layout.clone(),
            tp_size: 1,
            tp_rank: 0,
            staged: false,
        }],
    })
    .encode();
    (layout, mem, frame)
}

#[test]
fn decode_ranks_assemble_their_heads_from_published_metadata() {
    for src_order in StrideOrder::ALL {
        let (src_layout, src_mem, frame) = prefill(src_order);
        let Ok(Message::Metadata(md)) = Message::decode(&frame) else {
            panic!("metadata frame must decode");
        };
        assert_eq!(md.caches[0].layout, src_layout);
        for dst_rank in 0..2 {
            let geo = Geometry::mha(3, 2, 32, Dtype::Fp16, 16).expect("valid");
            let dst = CacheLayout::named(geo, 8, StrideOrder::Lbhnc).expect("valid");
            let mut dst_mem = vec![0u8; dst.span_bytes() as usize];
            for read in tp_reads(4, 1, 2, dst_rank).expect("valid split") {
                PlanBuilder::new(&md.caches[0].layout, &dst)
                    .and_then(|b| b.heads(read.heads))
                    .and_then(|b| b.build(&[30, 2, 3], &[5, 6, 7]))
                    .expect("valid plan")
                    .apply(&src_mem, &mut dst_mem)
                    .expect("buffers fit");
            }
            for (s, d) in [(30, 5), (2, 6), (3, 7)] {
                for (l, h, t) in
                    (0..3).flat_map(|l| (0..2).flat_map(move |h| (0..16).map(move |t| (l, h, t))))
                {
                    let so = src_layout
                        .offset(l, s, dst_rank * 2 + h, t)
                        .expect("in range") as usize;
                    let dof = dst.offset(l, d, h, t).expect("in range") as usize;
                    assert_eq!(
                        src_mem[so..so + 128],
                        dst_mem[dof..dof + 128],
                        "{src_order} rank {dst_rank}"
                    );
                }
            }
        }
    }
}

#[test]
fn corrupted_metadata_and_wrong_geometry_are_refused() {
    let (_, _, mut frame) = prefill(StrideOrder::Lbnhc);
    let mid = frame.len() / 2;
    frame[mid] ^= 0x40;
    assert!(Message::decode(&frame).is_err());

    let (src_layout, _, _) = prefill(StrideOrder::Lbnhc);
    let other = Geometry::mha(3, 4, 32, Dtype::Bf16, 16).expect("valid");
    let dst = CacheLayout::named(other, 8, StrideOrder::Lbhnc).expect("valid");
    let err = PlanBuilder::new(&src_layout, &dst)
        .expect_err("dtype differs")
        .to_string();
    assert!(
        err.contains("dtype") && err.contains("fp16") && err.contains("bf16"),
        "{err}"
    );
}

#[test]
fn descriptors_outside_registered_memory_are_refused() {
    let mut table = RegionTable::new();
    let id = table
        .insert(Region {
            kind: MemKind::PinnedHost,
            base: 1 << 20,
            len: 4096,
        })
        .expect("fresh table");
    let ok = Descriptor {
        region: id,
        offset: 0,
        len: 4096,
    };
    assert!(table.resolve_all(&[ok]).is_ok());
    for bad in [
        Descriptor { offset: 1, ..ok },
        Descriptor {
            region: RegionId(id.0 + 1),
            ..ok
        },
        Descriptor {
            offset: u64::MAX,
            len: 1,
            ..ok
        },
    ] {
        assert!(table.resolve_all(&[ok, bad]).is_err(), "{bad:?}");
    }
}
