//! Codec properties on the stable toolchain: every message round-trips; random, truncated and
//! mutated frames decode to `Ok` or `WireError` and never panic; a stream decoder fed any
//! chunking yields the same messages.

use kvcore::wire::{
    Abort, AgentMetadata, Completion, Endpoint, ExportedCache, ExportedRegion, FrameDecoder, Kind,
    Message, Notification, Op, Status, TransferNotice, TransportKey, PROTOCOL_VERSION,
};
use kvcore::{
    CacheLayout, Descriptor, Dtype, Geometry, MemKind, Region, RegionId, StrideOrder, WireError,
};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,24}"
}

fn blob(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn metadata() -> impl Strategy<Value = AgentMetadata> {
    (
        name(),
        prop::collection::vec((name(), blob(64)), 0..3),
        prop::collection::vec(
            (
                1u64..1 << 20,
                prop::collection::vec((name(), blob(40)), 0..2),
            ),
            0..4,
        ),
        prop::sample::select(StrideOrder::ALL.to_vec()),
        prop::option::of(Just(())),
    )
        .prop_map(|(name, eps, regions, order, with_cache)| {
            // Regions laid out one after another so they never overlap.
            let mut base = 0x10_000u64;
            let regions: Vec<ExportedRegion> = regions
                .into_iter()
                .enumerate()
                .map(|(i, (len, keys))| {
                    let r = ExportedRegion {
                        id: RegionId(i as u32 * 3),
                        region: Region {
                            kind: if i % 2 == 0 {
                                MemKind::Host
                            } else {
                                MemKind::Device { ordinal: i as u32 }
                            },
                            base,
                            len,
                        },
                        keys: keys
                            .into_iter()
                            .map(|(transport, key)| TransportKey { transport, key })
                            .collect(),
                    };
                    base += len;
                    r
                })
                .collect();
            let g = Geometry::mha(2, 2, 4, Dtype::Bf16, 4).expect("valid");
            let layout = CacheLayout::named(g, 8, order).expect("valid");
            let caches = match (with_cache, regions.first()) {
                (Some(()), Some(r)) if r.region.len >= layout.span_bytes() => vec![ExportedCache {
                    region: r.id,
                    layout,
                    tp_size: 2,
                    tp_rank: 1,
                    // Which one varies with the layout's order, so both round-trip.
                    staged: order.code() % 2 == 0,
                }],
                _ => vec![],
            };
            AgentMetadata {
                name,
                protocol_version: PROTOCOL_VERSION,
                endpoints: eps
                    .into_iter()
                    .map(|(transport, address)| Endpoint { transport, address })
                    .collect(),
                regions,
                caches,
            }
        })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        metadata().prop_map(Message::Metadata),
        (
            any::<u64>(),
            any::<bool>(),
            name(),
            prop::collection::vec((any::<u32>(), 0u64..1 << 40, 1u64..1 << 20), 0..20),
            prop::option::of(blob(100))
        )
            .prop_map(
                |(id, read, initiator, descs, notification)| Message::Transfer(TransferNotice {
                    transfer_id: id,
                    op: if read { Op::Read } else { Op::Write },
                    initiator,
                    descriptors: descs
                        .into_iter()
                        .map(|(r, offset, len)| Descriptor {
                            region: RegionId(r),
                            offset,
                            len
                        })
                        .collect(),
                    notification,
                })
            ),
        (name(), blob(200))
            .prop_map(|(from, payload)| Message::Notification(Notification { from, payload })),
        (
            any::<u64>(),
            prop::option::of((any::<u16>(), "[ -~]{0,60}"))
        )
            .prop_map(|(transfer_id, failed)| Message::Completion(Completion {
                transfer_id,
                status: match failed {
                    None => Status::Ok,
                    Some((code, message)) => Status::Failed { code, message },
                },
            })),
        (any::<u64>(), "[ -~]{0,60}").prop_map(|(transfer_id, reason)| Message::Abort(Abort {
            transfer_id,
            reason
        })),
    ]
}

/// Decoding must be a pure function: Ok or a WireError, and anything that decodes re-encodes to
/// something that decodes to the same value.
fn check_body(kind: Kind, body: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(m) = Message::decode_body(kind, body) {
        let again = Message::decode_body(kind, &m.encode_body());
        prop_assert_eq!(again, Ok(m));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn messages_round_trip(m in message()) {
        let frame = m.encode();
        prop_assert_eq!(Message::decode(&frame), Ok(m.clone()));
        prop_assert_eq!(Message::decode_body(m.kind(), &m.encode_body()), Ok(m));
    }

    #[test]
    fn mutated_frames_fail_cleanly(m in message(), flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)) {
        let mut frame = m.encode();
        for (i, x) in &flips {
            let i = i.index(frame.len());
            frame[i] ^= x;
        }
        // The checksum covers every byte, so any flip is caught.
        prop_assert!(Message::decode(&frame).is_err());
        // Behind the checksum, the payload decoders must hold on their own.
        let body = &frame[12..frame.len() - 8];
        check_body(m.kind(), body)?;
    }

    #[test]
    fn truncated_and_extended_frames_fail_cleanly(m in message(), cut in any::<prop::sample::Index>(), extra in blob(16)) {
        let frame = m.encode();
        let short = &frame[..cut.index(frame.len())];
        prop_assert!(Message::decode(short).is_err());
        let mut long = frame.clone();
        long.extend_from_slice(&extra);
        if !extra.is_empty() {
            prop_assert_eq!(Message::decode(&long), Err(WireError::TrailingBytes(extra.len())));
        }
        let body = m.encode_body();
        for k in Kind::ALL {
            check_body(k, &body[..cut.index(body.len() + 1).min(body.len())])?;
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in blob(512), kind in prop::sample::select(Kind::ALL.to_vec())) {
        let _ = Message::decode(&bytes);
        check_body(kind, &bytes)?;
        let mut d = FrameDecoder::default();
        d.push(&bytes);
        let _ = d.next_message();
    }

    #[test]
    fn stream_decoder_is_chunking_independent(msgs in prop::collection::vec(message(), 1..5), cuts in prop::collection::vec(1usize..64, 1..40)) {
        let stream: Vec<u8> = msgs.iter().flat_map(|m| m.encode()).collect();
        let mut d = FrameDecoder::default();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut cuts = cuts.into_iter().cycle();
        while pos < stream.len() {
            let n = cuts.next().unwrap_or(1).min(stream.len() - pos);
            d.push(&stream[pos..pos + n]);
            pos += n;
            while let Some(m) = d.next_message().expect("valid stream") {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(d.buffered(), 0);
    }
}

#[test]
fn oversized_header_is_refused_before_the_payload_arrives() {
    let mut d = FrameDecoder::new(1024);
    let mut head = Vec::from(*b"KVFR");
    head.extend_from_slice(&1u16.to_le_bytes());
    head.extend_from_slice(&[3, 0]);
    head.extend_from_slice(&u32::MAX.to_le_bytes());
    d.push(&head);
    assert!(matches!(d.next_message(), Err(WireError::TooLarge { .. })));
    // The stream stays failed.
    d.push(
        &Message::Abort(Abort {
            transfer_id: 1,
            reason: String::new(),
        })
        .encode(),
    );
    assert!(d.next_message().is_err());
}

#[test]
fn garbage_is_refused_at_the_first_byte() {
    let mut d = FrameDecoder::default();
    d.push(b"G");
    assert!(matches!(d.next_message(), Err(WireError::BadMagic { .. })));
}

#[test]
fn declared_counts_cannot_force_allocation() {
    // A transfer notice claiming 2^20 descriptors in a 30-byte body.
    let mut body = Vec::new();
    body.extend_from_slice(&7u64.to_le_bytes());
    body.push(1);
    body.extend_from_slice(&1u32.to_le_bytes());
    body.push(b'a');
    body.extend_from_slice(&(1u32 << 20).to_le_bytes());
    let err = Message::decode_body(Kind::Transfer, &body).expect_err("truncated");
    assert!(
        matches!(
            err,
            WireError::Truncated {
                field: "descriptors",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn metadata_semantics_are_checked() {
    let g = Geometry::mha(2, 2, 4, Dtype::Bf16, 4).expect("valid");
    let layout = CacheLayout::named(g, 8, StrideOrder::Lbhnc).expect("valid");
    let region = |id, base, len| ExportedRegion {
        id: RegionId(id),
        region: Region {
            kind: MemKind::Host,
            base,
            len,
        },
        keys: vec![],
    };
    let md = |regions, caches| {
        Message::Metadata(AgentMetadata {
            name: "p".into(),
            protocol_version: PROTOCOL_VERSION,
            endpoints: vec![],
            regions,
            caches,
        })
    };
    let overlap = md(vec![region(0, 0, 100), region(1, 50, 100)], vec![]);
    assert!(Message::decode(&overlap.encode()).is_err());
    let dup = md(vec![region(0, 0, 100), region(0, 500, 100)], vec![]);
    assert!(Message::decode(&dup.encode()).is_err());
    let cache = ExportedCache {
        region: RegionId(0),
        layout: layout.clone(),
        tp_size: 1,
        tp_rank: 0,
        staged: false,
    };
    let too_small = md(
        vec![region(0, 0, layout.span_bytes() - 1)],
        vec![cache.clone()],
    );
    let err = Message::decode(&too_small.encode()).expect_err("layout outside region");
    assert!(err.to_string().contains("spans"), "{err}");
    let missing = md(vec![region(1, 0, layout.span_bytes())], vec![cache.clone()]);
    assert!(Message::decode(&missing.encode()).is_err());
    let ok = md(vec![region(0, 0, layout.span_bytes())], vec![cache]);
    assert!(Message::decode(&ok.encode()).is_ok());
}

#[test]
fn frame_layout_is_stable() {
    let frame = Message::Notification(Notification {
        from: "a".into(),
        payload: vec![0xee],
    })
    .encode();
    assert_eq!(
        &frame[..12],
        &[b'K', b'V', b'F', b'R', 1, 0, 3, 0, 10, 0, 0, 0]
    );
    assert_eq!(&frame[12..22], &[1, 0, 0, 0, b'a', 1, 0, 0, 0, 0xee]);
    let sum = xxhash_rust_sum(&frame[..22]);
    assert_eq!(&frame[22..], &sum.to_le_bytes());
}

fn xxhash_rust_sum(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}
