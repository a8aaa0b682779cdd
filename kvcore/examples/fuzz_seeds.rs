//! Writes one valid input per fuzz target into `<dir>/<target>/`, so the fuzzers start from
//! well-formed frames and mutate inward. `cargo run -p kvcore --example fuzz_seeds -- kvcore/fuzz/corpus`

use std::fs;
use std::path::Path;

use kvcore::wire::{
    encode_geometry, Abort, AgentMetadata, Completion, Endpoint, ExportedCache, ExportedRegion,
    Message, Notification, Op, Status, TransferNotice, TransportKey, PROTOCOL_VERSION,
};
use kvcore::{CacheLayout, Descriptor, Dtype, Geometry, MemKind, Region, RegionId, StrideOrder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: fuzz_seeds DIR")?;
    let g = Geometry::mha(2, 2, 8, Dtype::Bf16, 16)?;
    let mla = Geometry::mla(2, 16, Dtype::Fp8E4m3, 16)?;
    let named = CacheLayout::named(g, 4, StrideOrder::Lbhnc)?;
    let explicit = CacheLayout::from_element_strides(g, 4, vec![3 << 16, 0], [512, 256, 16, 1])?;
    let metadata = Message::Metadata(AgentMetadata {
        name: "prefill-0".into(),
        protocol_version: PROTOCOL_VERSION,
        endpoints: vec![Endpoint {
            transport: "tcp".into(),
            address: b"127.0.0.1:7000".to_vec(),
        }],
        regions: vec![
            ExportedRegion {
                id: RegionId(0),
                region: Region {
                    kind: MemKind::Host,
                    base: 1 << 20,
                    len: 1 << 20,
                },
                keys: vec![TransportKey {
                    transport: "ucx".into(),
                    key: vec![1, 2, 3],
                }],
            },
            ExportedRegion {
                id: RegionId(1),
                region: Region {
                    kind: MemKind::Device { ordinal: 0 },
                    base: 0,
                    len: 1 << 20,
                },
                keys: vec![],
            },
        ],
        caches: vec![
            ExportedCache {
                region: RegionId(0),
                layout: named,
                tp_size: 2,
                tp_rank: 1,
                staged: false,
            },
            ExportedCache {
                region: RegionId(1),
                layout: explicit,
                tp_size: 1,
                tp_rank: 0,
                staged: false,
            },
        ],
    });
    let transfer = Message::Transfer(TransferNotice {
        transfer_id: 9,
        op: Op::Write,
        initiator: "decode-1".into(),
        descriptors: vec![Descriptor {
            region: RegionId(0),
            offset: 4096,
            len: 8192,
        }],
        notification: Some(b"done".to_vec()),
    });
    let notification = Message::Notification(Notification {
        from: "decode-1".into(),
        payload: b"req-7".to_vec(),
    });
    let completion = Message::Completion(Completion {
        transfer_id: 9,
        status: Status::Failed {
            code: 3,
            message: "peer gone".into(),
        },
    });
    let abort = Message::Abort(Abort {
        transfer_id: 9,
        reason: "timeout".into(),
    });
    let all = [&metadata, &transfer, &notification, &completion, &abort];
    let write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let d = Path::new(&dir).join(target);
        fs::create_dir_all(&d)?;
        fs::write(d.join(name), bytes)
    };
    for (i, m) in all.iter().enumerate() {
        write("frame", &format!("seed{i}"), &m.encode())?;
    }
    let stream: Vec<u8> = all.iter().flat_map(|m| m.encode()).collect();
    write("stream", "seed", &[&[7u8][..], &stream].concat())?;
    write("metadata", "seed", &metadata.encode_body())?;
    write("transfer", "seed", &transfer.encode_body())?;
    write("notification", "seed", &notification.encode_body())?;
    write("completion", "seed", &completion.encode_body())?;
    write("abort", "seed", &abort.encode_body())?;
    write("geometry", "mha", &encode_geometry(&g))?;
    let nonce = [5u8; 32];
    write(
        "challenge",
        "seed",
        &Message::Challenge(kvcore::wire::Challenge {
            nonce,
            name: "prefill-1".into(),
        })
        .encode_body(),
    )?;
    let dialer_nonce = [6u8; 32];
    let proof = kvcore::auth::Transcript {
        listener_nonce: &nonce,
        dialer_nonce: &dialer_nonce,
        listener_name: "prefill-1",
        dialer_name: "decode-1",
    }
    .mac(b"secret", kvcore::auth::Role::Dialer)
    .map(|p| p.to_vec())
    .unwrap_or_default();
    let hello = kvcore::wire::Hello {
        name: "decode-1".into(),
        protocol_version: PROTOCOL_VERSION,
        nonce: dialer_nonce,
        proof,
    };
    write("hello", "seed", &Message::Hello(hello).encode_body())?;
    write("geometry", "mla", &encode_geometry(&mla))?;
    let header = kvcore::slot::SlotHeader::new(
        kvcore::BlockHash::from_u64(7),
        g.fingerprint(),
        b"payload",
        3,
    );
    write("slot", "seed", &header.encode())?;
    // NIXL's own bytes: the vectors a stock NIXL agent produced, and one of each command.
    let vectors = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/nixl-1.5.1");
    for v in ["agentA.md", "agentA_partial.md"] {
        write("nixl_metadata", v, &fs::read(Path::new(vectors).join(v))?)?;
    }
    let notif = kvcore::nixl::NixlNotif {
        from: "agentA".into(),
        msg: b"done".to_vec(),
    };
    write("nixl_notif", "seed", &notif.encode())?;
    for (i, c) in [
        kvcore::nixl::NixlComm::Send,
        kvcore::nixl::NixlComm::Invalidate("agentA".into()),
        kvcore::nixl::NixlComm::Load(fs::read(Path::new(vectors).join("agentA_partial.md"))?),
    ]
    .iter()
    .enumerate()
    {
        write("nixl_comm", &format!("seed{i}"), &c.encode())?;
    }
    println!("seeds written under {dir}");
    Ok(())
}
