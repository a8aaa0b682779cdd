//! Applying a plan with plain memcpy gives exactly the bytes a naive per-cell copy gives, for
//! random geometries, layouts (named and explicit strides), block lists and TP pairs.

use kvcore::{
    rank_heads, tp_reads, CacheLayout, Dtype, Geometry, HeadShape, HeadSlice, LayerPlacement,
    PlanBuilder, StrideOrder,
};
use proptest::prelude::*;

fn geometry() -> impl Strategy<Value = Geometry> {
    (
        1u32..4,
        prop::sample::select(vec![1u32, 2, 4]),
        prop_oneof![
            (1u32..6, 1u32..6).prop_map(|(k, v)| HeadShape::Mha {
                k_size: k,
                v_size: v
            }),
            (1u32..10).prop_map(|l| HeadShape::Mla { latent: l }),
        ],
        prop::sample::select(Dtype::ALL.to_vec()),
        1u32..6,
    )
        .prop_map(|(layers, heads, head, dtype, block_tokens)| Geometry {
            layers,
            kv_heads: if matches!(head, HeadShape::Mla { .. }) {
                1
            } else {
                heads
            },
            head,
            dtype,
            block_tokens,
        })
}

/// A named layout, or explicit strides: a random nesting of (L, B, H, N) with padding after each
/// level, and optionally non-affine layer origins.
#[derive(Debug, Clone)]
enum LayoutSpec {
    Named(StrideOrder),
    Explicit {
        perm: Vec<usize>,
        pads: [u64; 4],
        scatter_layers: Option<Vec<usize>>,
    },
}

fn layout_spec() -> impl Strategy<Value = LayoutSpec> {
    prop_oneof![
        prop::sample::select(StrideOrder::ALL.to_vec()).prop_map(LayoutSpec::Named),
        (
            Just(vec![0usize, 1, 2, 3]).prop_shuffle(),
            [0u64..9, 0u64..9, 0u64..9, 0u64..9],
            prop::option::of(Just((0..4).collect::<Vec<usize>>()).prop_shuffle()),
        )
            .prop_map(|(perm, pads, scatter)| LayoutSpec::Explicit {
                perm,
                pads,
                scatter_layers: scatter,
            }),
    ]
}

fn build_layout(spec: &LayoutSpec, g: Geometry, num_blocks: u32) -> CacheLayout {
    match spec {
        LayoutSpec::Named(o) => {
            CacheLayout::named(g, num_blocks, *o).expect("named layouts are valid")
        }
        LayoutSpec::Explicit {
            perm,
            pads,
            scatter_layers,
        } => {
            // Axis ids: 0 L, 1 B, 2 H, 3 N; perm lists them outermost first.
            let count = [g.layers, num_blocks, g.kv_heads, g.block_tokens].map(u64::from);
            let mut strides = [0u64; 4];
            let mut next = g.cell_bytes();
            for &axis in perm.iter().rev() {
                strides[axis] = next;
                next = next * count[axis] + pads[axis];
            }
            let layers = match scatter_layers {
                // Scattered origins need whole, disjoint layers: place them in shuffled slots.
                Some(order) if perm[0] == 0 => {
                    let slot = strides[0] + 7;
                    LayerPlacement::Explicit(
                        (0..g.layers as usize)
                            .map(|l| slot * rank_in(order, l, g.layers as usize))
                            .collect(),
                    )
                }
                _ => LayerPlacement::Strided {
                    first: pads[0] * 3,
                    stride: strides[0],
                },
            };
            CacheLayout::from_strides(g, num_blocks, layers, strides[1], strides[2], strides[3])
                .expect("generated strides never overlap")
        }
    }
}

/// Position of layer `l` when layers are placed in the shuffled order `order` (restricted to
/// the first `n` layers).
fn rank_in(order: &[usize], l: usize, n: usize) -> u64 {
    order
        .iter()
        .filter(|&&x| x < n)
        .position(|&x| x == l)
        .unwrap_or(l) as u64
}

fn fill(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn naive_copy(
    src: &CacheLayout,
    dst: &CacheLayout,
    sb: &[u32],
    db: &[u32],
    heads: HeadSlice,
    src_buf: &[u8],
    dst_buf: &mut [u8],
) {
    let g = src.geometry();
    let cell = g.cell_bytes() as usize;
    for (s, d) in sb.iter().zip(db) {
        for l in 0..g.layers {
            for h in 0..heads.count {
                for t in 0..g.block_tokens {
                    let so = src.offset(l, *s, heads.src_start + h, t).expect("in range") as usize;
                    let dof = dst.offset(l, *d, heads.dst_start + h, t).expect("in range") as usize;
                    dst_buf[dof..dof + cell].copy_from_slice(&src_buf[so..so + cell]);
                }
            }
        }
    }
}

/// Source ids may repeat; destination ids are distinct, so the result does not depend on order.
fn block_lists(src_n: u32, dst_n: u32) -> impl Strategy<Value = (Vec<u32>, Vec<u32>)> {
    let max = src_n.min(dst_n) as usize;
    (0..=max).prop_flat_map(move |k| {
        (
            prop_oneof![
                prop::collection::vec(0..src_n, k),
                (0..src_n)
                    .prop_map(move |start| (0..k as u32).map(|i| (start + i) % src_n).collect()),
            ],
            Just((0..dst_n).collect::<Vec<u32>>())
                .prop_shuffle()
                .prop_map(move |v| {
                    let mut v: Vec<u32> = v.into_iter().take(k).collect();
                    // Sometimes sorted, so runs of consecutive ids appear on both sides.
                    if k % 2 == 0 {
                        v.sort_unstable();
                    }
                    v
                }),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn plan_equals_naive_copy(
        g in geometry(),
        src_spec in layout_spec(),
        dst_spec in layout_spec(),
        seed in any::<u64>(),
        lists in (1u32..9, 1u32..9).prop_flat_map(|(a, b)| (Just((a, b)), block_lists(a, b))),
    ) {
        let ((src_n, dst_n), (sb, db)) = (lists.0, lists.1);
        let src = build_layout(&src_spec, g, src_n);
        let dst = build_layout(&dst_spec, g, dst_n);
        let plan = PlanBuilder::new(&src, &dst).expect("same geometry").build(&sb, &db).expect("valid");
        let src_buf = fill(src.span_bytes(), seed);
        let mut got = fill(dst.span_bytes(), !seed);
        let mut want = got.clone();
        plan.apply(&src_buf, &mut got).expect("plan fits its layouts");
        naive_copy(&src, &dst, &sb, &db, HeadSlice { src_start: 0, dst_start: 0, count: g.kv_heads }, &src_buf, &mut want);
        prop_assert!(got == want, "plan {:?} differs from the naive copy", plan.copies());
        prop_assert_eq!(plan.bytes(), sb.len() as u64 * g.block_bytes());
        // Fewest copies: no two neighbours could have been one.
        for w in plan.copies().windows(2) {
            prop_assert!(!(w[0].src + w[0].len == w[1].src && w[0].dst + w[0].len == w[1].dst));
        }
    }

    #[test]
    fn layer_and_token_subsets_match_naive(
        g in geometry(),
        src_spec in layout_spec(),
        dst_spec in layout_spec(),
        seed in any::<u64>(),
        pick in (any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<prop::sample::Index>()),
    ) {
        let src = build_layout(&src_spec, g, 4);
        let dst = build_layout(&dst_spec, g, 5);
        let l0 = pick.0.index(g.layers as usize) as u32;
        let l1 = l0 + 1 + pick.1.index((g.layers - l0) as usize) as u32;
        let t0 = pick.2.index(g.block_tokens as usize) as u32;
        let t1 = t0 + 1 + pick.3.index((g.block_tokens - t0) as usize) as u32;
        let plan = PlanBuilder::new(&src, &dst).expect("same")
            .layers(l0..l1).expect("in range")
            .tokens(t0..t1).expect("in range")
            .build(&[1, 2, 3], &[4, 0, 1]).expect("valid");
        let src_buf = fill(src.span_bytes(), seed);
        let mut got = vec![0u8; dst.span_bytes() as usize];
        let mut want = got.clone();
        plan.apply(&src_buf, &mut got).expect("fits");
        let cell = g.cell_bytes() as usize;
        for (s, d) in [(1, 4), (2, 0), (3, 1)] {
            for l in l0..l1 { for h in 0..g.kv_heads { for t in t0..t1 {
                let so = src.offset(l, s, h, t).expect("in range") as usize;
                let dof = dst.offset(l, d, h, t).expect("in range") as usize;
                want[dof..dof + cell].copy_from_slice(&src_buf[so..so + cell]);
            }}}
        }
        prop_assert!(got == want);
    }

    /// A decode rank of one TP size assembles exactly its heads from prefill ranks of another.
    #[test]
    fn tensor_parallel_reads_assemble_the_right_heads(
        total in prop::sample::select(vec![1u32, 2, 4, 8]),
        src_tp in prop::sample::select(vec![1u32, 2, 4, 8]),
        dst_tp in prop::sample::select(vec![1u32, 2, 4, 8]),
        dst_rank_pick in any::<prop::sample::Index>(),
        src_order in prop::sample::select(StrideOrder::ALL.to_vec()),
        dst_order in prop::sample::select(StrideOrder::ALL.to_vec()),
        (layers, head_size, block_tokens) in (1u32..3, 1u32..4, 1u32..5),
        seed in any::<u64>(),
    ) {
        let dst_rank = dst_rank_pick.index(dst_tp as usize) as u32;
        let geo = |heads: u32| Geometry::mha(layers, heads, head_size, Dtype::Fp16, block_tokens).expect("valid");
        let per = |tp: u32| rank_heads(total, tp, 0).expect("valid split").len() as u32;
        // The "global" cache: every head, in one dense LBHNC layout.
        let global = CacheLayout::named(geo(total), 3, StrideOrder::Lbhnc).expect("valid");
        let global_buf = fill(global.span_bytes(), seed);
        // Each prefill rank's cache holds its heads, copied out of the global one.
        let src_caches: Vec<(CacheLayout, Vec<u8>)> = (0..src_tp).map(|r| {
            let heads = rank_heads(total, src_tp, r).expect("valid");
            let l = CacheLayout::named(geo(per(src_tp)), 3, src_order).expect("valid");
            let mut buf = vec![0u8; l.span_bytes() as usize];
            PlanBuilder::new(&global, &l).expect("ok")
                .heads(HeadSlice { src_start: heads.start, dst_start: 0, count: heads.len() as u32 }).expect("fits")
                .build(&[0, 1, 2], &[0, 1, 2]).expect("ok")
                .apply(&global_buf, &mut buf).expect("fits");
            (l, buf)
        }).collect();
        let dst = CacheLayout::named(geo(per(dst_tp)), 4, dst_order).expect("valid");
        let mut got = vec![0u8; dst.span_bytes() as usize];
        for read in tp_reads(total, src_tp, dst_tp, dst_rank).expect("valid") {
            let (src, buf) = &src_caches[read.src_rank as usize];
            PlanBuilder::new(src, &dst).expect("ok").heads(read.heads).expect("fits")
                .build(&[2, 0], &[1, 3]).expect("ok")
                .apply(buf, &mut got).expect("fits");
        }
        let mine = rank_heads(total, dst_tp, dst_rank).expect("valid");
        let mut want = vec![0u8; dst.span_bytes() as usize];
        PlanBuilder::new(&global, &dst).expect("ok")
            .heads(HeadSlice { src_start: mine.start, dst_start: 0, count: mine.len() as u32 }).expect("fits")
            .build(&[2, 0], &[1, 3]).expect("ok")
            .apply(&global_buf, &mut want).expect("fits");
        prop_assert!(got == want);
    }
}
