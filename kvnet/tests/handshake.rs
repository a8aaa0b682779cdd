//! In-process handshake checks: geometry mismatches are named, exported layouts travel with the
//! metadata, and a metadata frame from elsewhere loads like a handshake.

use std::time::Duration;

use kvnet::kvcore::wire::ExportedCache;
use kvnet::kvcore::{CacheLayout, Dtype, Geometry, MemKind, Region, StrideOrder};
use kvnet::{Agent, AgentConfig, NetError, TransportKind};

fn agent(name: &str) -> Agent {
    let mut cfg = AgentConfig::new(name);
    cfg.transports = vec![TransportKind::Tcp];
    cfg.timeout = Duration::from_secs(5);
    Agent::new(cfg).expect("agent")
}

#[test]
fn geometry_mismatch_names_the_field() {
    let prefill = agent("prefill");
    let decode = agent("decode");
    let g = Geometry::mha(4, 8, 128, Dtype::Bf16, 16).expect("valid");
    let layout = CacheLayout::named(g, 32, StrideOrder::Lbhnc).expect("valid");
    let mut mem = vec![0u8; layout.span_bytes() as usize];
    // SAFETY: `mem` outlives both agents (dropped last) and is not touched meanwhile.
    let region = unsafe {
        prefill.register(Region {
            kind: MemKind::Host,
            base: mem.as_mut_ptr() as u64,
            len: mem.len() as u64,
        })
    }
    .expect("register");
    prefill
        .export_cache(ExportedCache {
            region,
            layout: layout.clone(),
            tp_size: 1,
            tp_rank: 0,
            staged: false,
        })
        .expect("fits its region");
    assert_eq!(
        decode.connect(prefill.listen_addr()).expect("handshake"),
        "prefill"
    );
    let md = decode.peer_metadata("prefill").expect("loaded");
    assert_eq!(
        md.caches[0].layout, layout,
        "the layout travels with the metadata"
    );
    // Another TP size is fine (heads differ); another dtype is not.
    let tp2 = Geometry::mha(4, 4, 128, Dtype::Bf16, 16).expect("valid");
    decode
        .check_peer_geometry("prefill", &tp2)
        .expect("heads may differ");
    let fp16 = Geometry::mha(4, 4, 128, Dtype::Fp16, 16).expect("valid");
    let err = decode
        .check_peer_geometry("prefill", &fp16)
        .expect_err("dtype differs");
    assert!(matches!(err, NetError::Geometry(_)));
    let msg = err.to_string();
    assert!(
        msg.contains("dtype") && msg.contains("bf16") && msg.contains("fp16"),
        "{msg}"
    );
    // Metadata handed over out of band loads the same way.
    let third = agent("third");
    assert_eq!(
        third.load_remote(&prefill.local_metadata()).expect("loads"),
        "prefill"
    );
    assert!(third.load_remote(b"not a frame").is_err());
    drop((prefill, decode, third));
    drop(mem);
}
