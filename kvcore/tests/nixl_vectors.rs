//! Golden tests on metadata blobs a stock NIXL 1.5.1 agent produced.
use kvcore::nixl::{NixlMem, NixlMetadata};

fn vector(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/vectors/nixl-1.5.1/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn full_metadata_decodes_exactly_and_re_encodes_to_the_same_bytes() {
    let blob = vector("agentA.md");
    assert_eq!(blob.len(), 500);
    let md = NixlMetadata::decode(&blob).expect("NIXL's own metadata must decode");
    assert_eq!(md.agent, "agentA");
    assert_eq!(md.conns.len(), 1);
    assert_eq!(md.conns[0].backend, "UCX");
    assert_eq!(md.conns[0].info.len(), 213);
    assert_eq!(md.conn("UCX").map(<[u8]>::len), Some(213));
    assert_eq!(md.sections.len(), 1);
    let s = &md.sections[0];
    assert_eq!((s.backend.as_str(), s.mem), ("UCX", NixlMem::Dram));
    let descs: Vec<(u64, u64, u64, usize)> = s
        .descs
        .iter()
        .map(|d| (d.addr, d.len, d.dev_id, d.meta.len()))
        .collect();
    assert_eq!(
        descs,
        vec![
            (0x7fcc_16a2_b010, 1 << 20, 0, 11),
            (0x560e_e2c9_1aa0, 4096, 7, 11)
        ]
    );
    assert_eq!(md.encode(), blob);
}

#[test]
fn partial_metadata_decodes_exactly_and_re_encodes_to_the_same_bytes() {
    let blob = vector("agentA_partial.md");
    let md = NixlMetadata::decode(&blob).expect("NIXL's partial metadata must decode");
    assert_eq!(md.agent, "agentA");
    assert!(md.conns.is_empty());
    assert_eq!(md.sections.len(), 1);
    assert_eq!(md.sections[0].descs.len(), 1);
    let d = &md.sections[0].descs[0];
    assert_eq!((d.addr, d.len, d.dev_id), (0x560e_e2c9_1aa0, 4096, 7));
    // The same descriptor and rkey as in the full blob.
    let full = NixlMetadata::decode(&vector("agentA.md")).expect("test value");
    assert_eq!(&full.sections[0].descs[1], d);
    assert_eq!(md.encode(), blob);
}

#[test]
fn every_truncation_and_every_single_byte_flip_is_handled() {
    for name in ["agentA.md", "agentA_partial.md"] {
        let blob = vector(name);
        for cut in 0..blob.len() {
            assert!(
                NixlMetadata::decode(&blob[..cut]).is_err(),
                "{name} cut at {cut}"
            );
        }
        for i in 0..blob.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = blob.clone();
                b[i] ^= bit;
                // Opaque bytes (addresses, rkeys) may change and still decode; then the result
                // must re-encode to exactly the mutated input.
                if let Ok(md) = NixlMetadata::decode(&b) {
                    assert_eq!(md.encode(), b, "{name} byte {i}");
                }
            }
        }
    }
}

mod props {
    use kvcore::nixl::{
        NixlComm, NixlConn, NixlDesc, NixlMem, NixlMetadata, NixlNotif, NixlSection,
    };
    use proptest::prelude::*;

    fn mem() -> impl Strategy<Value = NixlMem> {
        (0u32..5).prop_map(|c| NixlMem::from_code(c).expect("test value"))
    }

    fn metadata() -> impl Strategy<Value = NixlMetadata> {
        let desc = (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(addr, len, dev_id, meta)| NixlDesc {
                addr,
                len,
                dev_id,
                meta,
            });
        let section = ("[A-Z]{1,6}", mem(), prop::collection::vec(desc, 0..5)).prop_map(
            |(backend, mem, descs)| NixlSection {
                backend,
                mem,
                descs,
            },
        );
        let conn = ("[A-Z]{1,6}", prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(backend, info)| NixlConn { backend, info });
        (
            "[a-zA-Z0-9_|-]{1,20}",
            prop::collection::vec(conn, 0..3),
            prop::collection::vec(section, 0..3),
        )
            .prop_map(|(agent, conns, sections)| NixlMetadata {
                agent,
                conns,
                sections,
            })
    }

    proptest! {
        #[test]
        fn metadata_round_trips(md in metadata()) {
            prop_assert_eq!(NixlMetadata::decode(&md.encode()), Ok(md));
        }

        #[test]
        fn mutated_metadata_never_panics(md in metadata(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut b = md.encode();
            let i = at.index(b.len());
            b[i] = byte;
            if let Ok(m) = NixlMetadata::decode(&b) {
                prop_assert_eq!(m.encode(), b);
            }
        }

        #[test]
        fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = NixlMetadata::decode(&b);
            let _ = NixlNotif::decode(&b);
            let _ = NixlComm::decode(&b);
            let mut p = b"nixlSerDes|".to_vec();
            p.extend_from_slice(&b);
            let _ = NixlMetadata::decode(&p);
            let _ = NixlNotif::decode(&p);
        }

        #[test]
        fn notifications_round_trip(from in "[a-z|]{1,12}", msg in prop::collection::vec(any::<u8>(), 0..100)) {
            let n = NixlNotif { from, msg };
            prop_assert_eq!(NixlNotif::decode(&n.encode()), Ok(n));
        }
    }
}
