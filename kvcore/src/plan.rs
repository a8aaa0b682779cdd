//! Transfer plans: which contiguous byte copies move a list of blocks from one cache layout to
//! another. Adjacent runs are merged, so a plan between identical dense layouts with consecutive
//! block ids collapses to a handful of large copies, while a layout change or a head slice expands
//! into exactly the sub-ranges it needs.

use std::ops::Range;

use crate::error::{GeometryError, PlanError};
use crate::layout::{CacheLayout, LayerPlacement};
use crate::strided::{Dim, Nest};

/// Copy `len` bytes from `src` to `dst`, both offsets from their cache's base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Copy {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// A contiguous range of KV heads taken from the source and placed in the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HeadSlice {
    pub src_start: u32,
    pub dst_start: u32,
    pub count: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransferPlan {
    copies: Vec<Copy>,
    bytes: u64,
}

impl TransferPlan {
    pub fn copies(&self) -> &[Copy] {
        &self.copies
    }

    pub fn into_copies(self) -> Vec<Copy> {
        self.copies
    }

    /// Total bytes moved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.copies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// Largest offset + length on each side: the memory each side must hold for the plan.
    pub fn extents(&self) -> (u64, u64) {
        self.copies.iter().fold((0, 0), |(s, d), c| {
            (s.max(c.src + c.len), d.max(c.dst + c.len))
        })
    }

    /// Runs the plan between two host buffers; checks every copy against both lengths first, so
    /// a plan applied to the wrong buffers fails without writing anything.
    pub fn apply(&self, src: &[u8], dst: &mut [u8]) -> Result<(), PlanError> {
        let (s, d) = self.extents();
        if s > src.len() as u64 || d > dst.len() as u64 {
            return Err(PlanError::BufferTooSmall {
                src_need: s,
                src_have: src.len() as u64,
                dst_need: d,
                dst_have: dst.len() as u64,
            });
        }
        for c in &self.copies {
            let (s, d, n) = (c.src as usize, c.dst as usize, c.len as usize);
            dst[d..d + n].copy_from_slice(&src[s..s + n]);
        }
        Ok(())
    }

    fn push(&mut self, src: u64, dst: u64, len: u64) {
        self.bytes += len;
        if let Some(last) = self.copies.last_mut() {
            if last.src + last.len == src && last.dst + last.len == dst {
                last.len += len;
                return;
            }
        }
        self.copies.push(Copy { src, dst, len });
    }
}

/// Builds plans between a source and a destination layout whose geometries agree on everything
/// but (possibly) the number of KV heads.
#[derive(Clone, Debug)]
pub struct PlanBuilder<'a> {
    src: &'a CacheLayout,
    dst: &'a CacheLayout,
    layers: Range<u32>,
    tokens: Range<u32>,
    heads: Option<HeadSlice>,
}

impl<'a> PlanBuilder<'a> {
    pub fn new(src: &'a CacheLayout, dst: &'a CacheLayout) -> Result<Self, PlanError> {
        let (sg, dg) = (src.geometry(), dst.geometry());
        sg.check_same_except_heads(dg)?;
        let heads = (sg.kv_heads == dg.kv_heads).then_some(HeadSlice {
            src_start: 0,
            dst_start: 0,
            count: sg.kv_heads,
        });
        Ok(PlanBuilder {
            src,
            dst,
            layers: 0..sg.layers,
            tokens: 0..sg.block_tokens,
            heads,
        })
    }

    /// Only these layers (layer-by-layer transfers).
    pub fn layers(mut self, layers: Range<u32>) -> Result<Self, PlanError> {
        check_range("source", "layer", &layers, self.src.geometry().layers)?;
        self.layers = layers;
        Ok(self)
    }

    /// Only these token positions of every block (a partially filled last block).
    pub fn tokens(mut self, tokens: Range<u32>) -> Result<Self, PlanError> {
        check_range("source", "token", &tokens, self.src.geometry().block_tokens)?;
        self.tokens = tokens;
        Ok(self)
    }

    /// Move a head slice (tensor-parallel size differs between the two sides).
    pub fn heads(mut self, slice: HeadSlice) -> Result<Self, PlanError> {
        let end = |start: u32| start.saturating_add(slice.count);
        check_range(
            "source",
            "head",
            &(slice.src_start..end(slice.src_start)),
            self.src.geometry().kv_heads,
        )?;
        check_range(
            "destination",
            "head",
            &(slice.dst_start..end(slice.dst_start)),
            self.dst.geometry().kv_heads,
        )?;
        self.heads = Some(slice);
        Ok(self)
    }

    /// The copies that move `src_blocks[i]` into `dst_blocks[i]` for every `i`.
    pub fn build(&self, src_blocks: &[u32], dst_blocks: &[u32]) -> Result<TransferPlan, PlanError> {
        let heads = self.heads.ok_or_else(|| {
            PlanError::Geometry(GeometryError::Mismatch {
                field: "kv_heads",
                ours: self.src.geometry().kv_heads.to_string(),
                theirs: self.dst.geometry().kv_heads.to_string(),
            })
        })?;
        if src_blocks.len() != dst_blocks.len() {
            return Err(PlanError::BlockCount {
                src: src_blocks.len(),
                dst: dst_blocks.len(),
            });
        }
        check_blocks("source", src_blocks, self.src.num_blocks())?;
        check_blocks("destination", dst_blocks, self.dst.num_blocks())?;

        let (s, d) = (self.src, self.dst);
        let (sb, sh, st) = s.strides();
        let (db, dh, dt) = d.strides();
        let cell = s.geometry().cell_bytes();
        let n_layers = u64::from(self.layers.end - self.layers.start);
        let inner = [
            Dim {
                count: u64::from(heads.count),
                stride: [sh, dh],
            },
            Dim {
                count: u64::from(self.tokens.end - self.tokens.start),
                stride: [st, dt],
            },
        ];
        let layer_dim = match (s.layers(), d.layers()) {
            (
                LayerPlacement::Strided { stride: ls, .. },
                LayerPlacement::Strided { stride: ld, .. },
            ) => Some(Dim {
                count: n_layers,
                stride: [*ls, *ld],
            }),
            _ => None,
        };
        let nest_for = |run_blocks: u64| {
            let mut dims = vec![
                Dim {
                    count: run_blocks,
                    stride: [sb, db],
                },
                inner[0],
                inner[1],
            ];
            dims.extend(layer_dim);
            Nest::coalesce(dims, cell)
        };
        let single = nest_for(1);

        let mut plan = TransferPlan::default();
        plan.copies
            .reserve(src_blocks.len() * single.runs() as usize);
        let mut i = 0;
        while i < src_blocks.len() {
            // Consecutive on both sides: one loop dimension instead of many iterations.
            let mut n = 1;
            while i + n < src_blocks.len()
                && src_blocks[i + n] == src_blocks[i] + n as u32
                && dst_blocks[i + n] == dst_blocks[i] + n as u32
            {
                n += 1;
            }
            let nest = if n == 1 {
                single.clone()
            } else {
                nest_for(n as u64)
            };
            let layer_iter = if layer_dim.is_some() {
                self.layers.start..self.layers.start + 1
            } else {
                self.layers.clone()
            };
            for layer in layer_iter {
                let base = [
                    s.cell_offset(layer, src_blocks[i], heads.src_start, self.tokens.start),
                    d.cell_offset(layer, dst_blocks[i], heads.dst_start, self.tokens.start),
                ];
                nest.for_each(base, |so, dofs, len| plan.push(so, dofs, len));
            }
            i += n;
        }
        Ok(plan)
    }
}

fn check_range(
    side: &'static str,
    what: &'static str,
    r: &Range<u32>,
    bound: u32,
) -> Result<(), PlanError> {
    if r.start < r.end && r.end <= bound {
        Ok(())
    } else {
        Err(PlanError::RangeOutOfBounds {
            side,
            what,
            start: r.start,
            end: r.end,
            bound,
        })
    }
}

fn check_blocks(side: &'static str, ids: &[u32], num_blocks: u32) -> Result<(), PlanError> {
    match ids.iter().find(|&&b| b >= num_blocks) {
        Some(&id) => Err(PlanError::BlockOutOfRange {
            side,
            id,
            num_blocks,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Dtype, Geometry};
    use crate::layout::StrideOrder;

    fn geo(heads: u32) -> Geometry {
        Geometry::mha(4, heads, 8, Dtype::Bf16, 16).expect("valid")
    }

    #[test]
    fn identical_layouts_with_consecutive_blocks_collapse() {
        let a = CacheLayout::named(geo(2), 64, StrideOrder::Lbhnc).expect("valid");
        let plan = PlanBuilder::new(&a, &a)
            .expect("same")
            .build(&[3, 4, 5, 6], &[10, 11, 12, 13])
            .expect("in range");
        // One copy per layer: four blocks are contiguous within a layer.
        assert_eq!(plan.len(), 4);
        assert_eq!(plan.bytes(), 4 * geo(2).block_bytes());
        let packed = CacheLayout::block_packed(geo(2), 64).expect("valid");
        let plan = PlanBuilder::new(&packed, &packed)
            .expect("same")
            .build(&[3, 4, 5, 6], &[10, 11, 12, 13])
            .expect("in range");
        assert_eq!(
            plan.copies(),
            &[Copy {
                src: 3 * geo(2).block_bytes(),
                dst: 10 * geo(2).block_bytes(),
                len: 4 * geo(2).block_bytes()
            }]
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let a = CacheLayout::named(geo(2), 8, StrideOrder::Lbhnc).expect("valid");
        let b = CacheLayout::named(geo(4), 8, StrideOrder::Lbhnc).expect("valid");
        let pb = PlanBuilder::new(&a, &a).expect("same");
        assert!(matches!(
            pb.build(&[1], &[1, 2]),
            Err(PlanError::BlockCount { .. })
        ));
        assert!(matches!(
            pb.build(&[8], &[1]),
            Err(PlanError::BlockOutOfRange {
                side: "source",
                id: 8,
                ..
            })
        ));
        let err = PlanBuilder::new(&a, &b)
            .expect("heads may differ")
            .build(&[0], &[0]);
        assert!(err
            .expect_err("needs a head slice")
            .to_string()
            .contains("kv_heads"));
        let sliced = PlanBuilder::new(&a, &b)
            .expect("ok")
            .heads(HeadSlice {
                src_start: 0,
                dst_start: 2,
                count: 2,
            })
            .expect("fits");
        assert_eq!(
            sliced.build(&[0], &[0]).expect("ok").bytes(),
            geo(2).block_bytes()
        );
        assert!(PlanBuilder::new(&a, &b)
            .expect("ok")
            .heads(HeadSlice {
                src_start: 1,
                dst_start: 0,
                count: 2
            })
            .is_err());
        let other = CacheLayout::named(
            Geometry::mha(4, 2, 8, Dtype::Fp16, 16).expect("valid"),
            8,
            StrideOrder::Lbhnc,
        )
        .expect("valid");
        let msg = PlanBuilder::new(&a, &other).expect_err("dtype").to_string();
        assert!(
            msg.contains("dtype") && msg.contains("bf16") && msg.contains("fp16"),
            "{msg}"
        );
    }

    #[test]
    fn apply_refuses_short_buffers() {
        let a = CacheLayout::named(geo(2), 8, StrideOrder::Lbhnc).expect("valid");
        let plan = PlanBuilder::new(&a, &a)
            .expect("same")
            .build(&[7], &[7])
            .expect("ok");
        let src = vec![1u8; a.span_bytes() as usize];
        let mut dst = vec![0u8; a.span_bytes() as usize - 1];
        assert!(matches!(
            plan.apply(&src, &mut dst),
            Err(PlanError::BufferTooSmall { .. })
        ));
        assert!(dst.iter().all(|&b| b == 0), "nothing written");
    }
}
