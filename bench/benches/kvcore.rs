//! Criterion benches for kvcore's hot functions: plan building, frame codecs, prefix hashing.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvferry::kvcore::wire::{Message, Op, TransferNotice};
use kvferry::kvcore::{
    CacheLayout, Descriptor, Dtype, Geometry, PlanBuilder, PrefixHasher, RegionId, StrideOrder,
};

fn scattered(n: u32, k: usize) -> Vec<u32> {
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut ids: Vec<u32> = (0..n).collect();
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids.truncate(k);
    ids
}

fn plans(c: &mut Criterion) {
    let g = Geometry::mha(32, 8, 128, Dtype::Bf16, 16).expect("valid");
    let engine = CacheLayout::named(g, 4096, StrideOrder::Lbhnc).expect("valid");
    let tier = CacheLayout::block_packed(g, 1024).expect("valid");
    let mut group = c.benchmark_group("plan");
    for blocks in [16usize, 256, 1024] {
        let src = scattered(4096, blocks);
        let dst: Vec<u32> = (0..blocks as u32).collect();
        group.throughput(Throughput::Bytes(g.block_bytes() * blocks as u64));
        group.bench_with_input(
            BenchmarkId::new("engine-to-tier", blocks),
            &blocks,
            |b, _| {
                let pb = PlanBuilder::new(&engine, &tier).expect("same geometry");
                b.iter(|| pb.build(black_box(&src), black_box(&dst)).expect("valid"))
            },
        );
    }
    group.finish();
}

fn codecs(c: &mut Criterion) {
    let notice = Message::Transfer(TransferNotice {
        transfer_id: 1,
        op: Op::Read,
        initiator: "decode-0".into(),
        descriptors: (0..4096u64)
            .map(|i| Descriptor {
                region: RegionId((i % 32) as u32),
                offset: i * 65536,
                len: 65536,
            })
            .collect(),
        notification: Some(b"req".to_vec()),
    });
    let frame = notice.encode();
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Bytes(frame.len() as u64));
    group.bench_function("encode-transfer-4096", |b| {
        b.iter(|| black_box(&notice).encode())
    });
    group.bench_function("decode-transfer-4096", |b| {
        b.iter(|| Message::decode(black_box(&frame)).expect("valid"))
    });
    group.finish();
}

fn hashing(c: &mut Criterion) {
    let tokens: Vec<u32> = (0..8192).collect();
    let h = PrefixHasher::new(16);
    let mut group = c.benchmark_group("hash");
    group.throughput(Throughput::Elements(tokens.len() as u64));
    group.bench_function("prefix-8192-tokens", |b| {
        b.iter(|| h.hash_prefix(black_box(&tokens)))
    });
    group.finish();
}

criterion_group!(benches, plans, codecs, hashing);
criterion_main!(benches);
