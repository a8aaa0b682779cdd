//! Where each (layer, block, head, token) cell of a KV cache lives in memory.
//!
//! vLLM (0.32 and later) allocates a logical `[L, B, H, N, C]` tensor under a named stride order
//! and hands the connector one `[B, H, N, C]` view per layer; `C` (K‖V channels, or the MLA latent)
//! is always innermost and contiguous. A [`CacheLayout`] is the byte-level form of that: per-layer
//! origins plus block, head and token strides, derived from a name or taken as explicit strides.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::error::LayoutError;
use crate::geometry::Geometry;
use crate::strided::{Dim, Nest};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Axis {
    L,
    B,
    H,
    N,
}

/// The named stride orders of vLLM's standardised KV layouts, outermost dimension first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StrideOrder {
    /// vLLM's default (the former "NHD"): per layer, block, token, head.
    Lbnhc,
    /// The former "HND": per layer, block, head, token; tokens of one head are contiguous, which
    /// is what head slicing across tensor-parallel sizes needs. The CPU backend requires it.
    Lbhnc,
    Lhbnc,
    /// Block-outermost packed: every layer of a block together. kvferry's own tiers use it.
    Blhnc,
    Blnhc,
    Bhlnc,
}

impl StrideOrder {
    pub const ALL: [StrideOrder; 6] = [
        StrideOrder::Lbnhc,
        StrideOrder::Lbhnc,
        StrideOrder::Lhbnc,
        StrideOrder::Blhnc,
        StrideOrder::Blnhc,
        StrideOrder::Bhlnc,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            StrideOrder::Lbnhc => "LBNHC",
            StrideOrder::Lbhnc => "LBHNC",
            StrideOrder::Lhbnc => "LHBNC",
            StrideOrder::Blhnc => "BLHNC",
            StrideOrder::Blnhc => "BLNHC",
            StrideOrder::Bhlnc => "BHLNC",
        }
    }

    pub const fn code(self) -> u8 {
        match self {
            StrideOrder::Lbnhc => 1,
            StrideOrder::Lbhnc => 2,
            StrideOrder::Lhbnc => 3,
            StrideOrder::Blhnc => 4,
            StrideOrder::Blnhc => 5,
            StrideOrder::Bhlnc => 6,
        }
    }

    pub fn from_code(code: u8) -> Option<StrideOrder> {
        StrideOrder::ALL.into_iter().find(|o| o.code() == code)
    }

    const fn axes(self) -> [Axis; 4] {
        use Axis::*;
        match self {
            StrideOrder::Lbnhc => [L, B, N, H],
            StrideOrder::Lbhnc => [L, B, H, N],
            StrideOrder::Lhbnc => [L, H, B, N],
            StrideOrder::Blhnc => [B, L, H, N],
            StrideOrder::Blnhc => [B, L, N, H],
            StrideOrder::Bhlnc => [B, H, L, N],
        }
    }
}

impl FromStr for StrideOrder {
    type Err = LayoutError;

    /// Accepts the names, case-insensitively, and the pre-standardisation aliases NHD and HND.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.trim().to_ascii_uppercase();
        match upper.as_str() {
            "NHD" => return Ok(StrideOrder::Lbnhc),
            "HND" => return Ok(StrideOrder::Lbhnc),
            _ => {}
        }
        StrideOrder::ALL
            .into_iter()
            .find(|o| o.name() == upper)
            .ok_or_else(|| LayoutError::UnknownName(s.to_string()))
    }
}

impl fmt::Display for StrideOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where each layer's `[B, H, N, C]` view starts, in bytes from the cache's base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerPlacement {
    /// Layer `l` starts at `first + l * stride`.
    Strided { first: u64, stride: u64 },
    /// Arbitrary origins (separately placed layer tensors); their byte ranges must not overlap.
    Explicit(Vec<u64>),
}

/// The byte-level layout of one rank's KV cache. Always validated: no two cells overlap and the
/// whole cache spans at most `u64::MAX` bytes, so offset arithmetic on it cannot overflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheLayout {
    geometry: Geometry,
    num_blocks: u32,
    layers: LayerPlacement,
    block_stride: u64,
    head_stride: u64,
    token_stride: u64,
    order: Option<StrideOrder>,
    span: u64,
}

impl CacheLayout {
    /// Strides derived from a named order, densely packed.
    pub fn named(
        geometry: Geometry,
        num_blocks: u32,
        order: StrideOrder,
    ) -> Result<CacheLayout, LayoutError> {
        let geometry = geometry.validated()?;
        check_blocks(num_blocks)?;
        let count = |a: Axis| -> u64 {
            match a {
                Axis::L => u64::from(geometry.layers),
                Axis::B => u64::from(num_blocks),
                Axis::H => u64::from(geometry.kv_heads),
                Axis::N => u64::from(geometry.block_tokens),
            }
        };
        let mut strides = [0u64; 4];
        let mut next = geometry.cell_bytes();
        for axis in order.axes().into_iter().rev() {
            strides[axis as usize] = next;
            next = next.checked_mul(count(axis)).ok_or(LayoutError::TooLarge)?;
        }
        let mut layout = CacheLayout::from_strides(
            geometry,
            num_blocks,
            LayerPlacement::Strided {
                first: 0,
                stride: strides[Axis::L as usize],
            },
            strides[Axis::B as usize],
            strides[Axis::H as usize],
            strides[Axis::N as usize],
        )?;
        layout.order = Some(order);
        Ok(layout)
    }

    /// kvferry's own tier layout: block-outermost (`BLHNC`), so a block is one contiguous run of
    /// [`Geometry::block_bytes`], a layer of it a contiguous sub-run, and a head slice of a layer a
    /// contiguous sub-sub-run.
    pub fn block_packed(geometry: Geometry, num_blocks: u32) -> Result<CacheLayout, LayoutError> {
        CacheLayout::named(geometry, num_blocks, StrideOrder::Blhnc)
    }

    /// Explicit byte strides (the channel dimension is contiguous by definition).
    pub fn from_strides(
        geometry: Geometry,
        num_blocks: u32,
        layers: LayerPlacement,
        block_stride: u64,
        head_stride: u64,
        token_stride: u64,
    ) -> Result<CacheLayout, LayoutError> {
        let geometry = geometry.validated()?;
        check_blocks(num_blocks)?;
        let layers = normalise_layers(layers, geometry.layers)?;
        let cell = geometry.cell_bytes();
        let mut dims = vec![
            ("block", u64::from(num_blocks), block_stride),
            ("head", u64::from(geometry.kv_heads), head_stride),
            ("token", u64::from(geometry.block_tokens), token_stride),
        ];
        let layer_extent = extent_of(&dims, cell)?;
        let span = match &layers {
            LayerPlacement::Strided { first, stride } => {
                dims.push(("layer", u64::from(geometry.layers), *stride));
                first
                    .checked_add(extent_of(&dims, cell)?)
                    .ok_or(LayoutError::TooLarge)?
            }
            LayerPlacement::Explicit(offsets) => {
                let mut sorted: Vec<(u64, usize)> =
                    offsets.iter().copied().zip(0..).collect::<Vec<_>>();
                sorted.sort_unstable();
                for w in sorted.windows(2) {
                    let end = w[0]
                        .0
                        .checked_add(layer_extent)
                        .ok_or(LayoutError::TooLarge)?;
                    if w[1].0 < end {
                        return Err(LayoutError::Overlap {
                            detail: format!(
                                "layer {} at {} overlaps layer {} at {} (each layer spans {} bytes)",
                                w[1].1, w[1].0, w[0].1, w[0].0, layer_extent
                            ),
                        });
                    }
                }
                let last = sorted.last().map_or(0, |l| l.0);
                last.checked_add(layer_extent)
                    .ok_or(LayoutError::TooLarge)?
            }
        };
        Ok(CacheLayout {
            geometry,
            num_blocks,
            layers,
            block_stride,
            head_stride,
            token_stride,
            order: None,
            span,
        })
    }

    /// The form PyTorch reports: per-layer byte origins and element strides of the `[B, H, N, C]`
    /// view. The channel stride must be 1.
    pub fn from_element_strides(
        geometry: Geometry,
        num_blocks: u32,
        layer_offsets: Vec<u64>,
        strides: [u64; 4],
    ) -> Result<CacheLayout, LayoutError> {
        if strides[3] != 1 {
            return Err(LayoutError::Invalid {
                field: "channel_stride",
                value: strides[3],
                reason: "the channel dimension must be contiguous (stride 1)",
            });
        }
        let elem = u64::from(geometry.dtype.size());
        let bytes = |s: u64| s.checked_mul(elem).ok_or(LayoutError::TooLarge);
        CacheLayout::from_strides(
            geometry,
            num_blocks,
            LayerPlacement::Explicit(layer_offsets),
            bytes(strides[0])?,
            bytes(strides[1])?,
            bytes(strides[2])?,
        )
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn num_blocks(&self) -> u32 {
        self.num_blocks
    }

    pub fn order(&self) -> Option<StrideOrder> {
        self.order
    }

    pub fn layers(&self) -> &LayerPlacement {
        &self.layers
    }

    /// `(block, head, token)` byte strides.
    pub fn strides(&self) -> (u64, u64, u64) {
        (self.block_stride, self.head_stride, self.token_stride)
    }

    /// Bytes from the base to one past the last byte of any cell: the memory to register.
    pub fn span_bytes(&self) -> u64 {
        self.span
    }

    /// Bytes the cells occupy (equal to `span_bytes` for densely packed layouts).
    pub fn data_bytes(&self) -> u64 {
        self.geometry.block_bytes() * u64::from(self.num_blocks)
    }

    /// Bytes one layer's `[B, H, N, C]` view reaches from its origin (the memory each separately
    /// allocated layer tensor must hold).
    pub fn layer_extent(&self) -> u64 {
        let dims = [
            ("block", u64::from(self.num_blocks), self.block_stride),
            ("head", u64::from(self.geometry.kv_heads), self.head_stride),
            (
                "token",
                u64::from(self.geometry.block_tokens),
                self.token_stride,
            ),
        ];
        // Validated at construction, so this cannot fail; the fallback is the whole span.
        extent_of(&dims, self.geometry.cell_bytes()).unwrap_or(self.span)
    }

    pub fn layer_offset(&self, layer: u32) -> Result<u64, LayoutError> {
        check("layer", layer, self.geometry.layers)?;
        Ok(self.layer_origin(layer))
    }

    fn layer_origin(&self, layer: u32) -> u64 {
        match &self.layers {
            LayerPlacement::Strided { first, stride } => first + u64::from(layer) * stride,
            LayerPlacement::Explicit(v) => v[layer as usize],
        }
    }

    /// Byte offset of one cell.
    pub fn offset(
        &self,
        layer: u32,
        block: u32,
        head: u32,
        token: u32,
    ) -> Result<u64, LayoutError> {
        check("layer", layer, self.geometry.layers)?;
        check("block", block, self.num_blocks)?;
        check("head", head, self.geometry.kv_heads)?;
        check("token", token, self.geometry.block_tokens)?;
        Ok(self.cell_offset(layer, block, head, token))
    }

    /// Unchecked arithmetic for indices already known to be in range.
    pub(crate) fn cell_offset(&self, layer: u32, block: u32, head: u32, token: u32) -> u64 {
        self.layer_origin(layer)
            + u64::from(block) * self.block_stride
            + u64::from(head) * self.head_stride
            + u64::from(token) * self.token_stride
    }

    /// The contiguous byte runs `(offset, len)` holding one layer of one block, restricted to a
    /// head range and a token range, in increasing address order and as few as the layout allows.
    pub fn runs(
        &self,
        layer: u32,
        block: u32,
        heads: Range<u32>,
        tokens: Range<u32>,
    ) -> Result<Vec<(u64, u64)>, LayoutError> {
        check("layer", layer, self.geometry.layers)?;
        check("block", block, self.num_blocks)?;
        check_range("head", &heads, self.geometry.kv_heads)?;
        check_range("token", &tokens, self.geometry.block_tokens)?;
        let nest = Nest::coalesce(
            vec![
                Dim {
                    count: u64::from(heads.end - heads.start),
                    stride: [self.head_stride; 2],
                },
                Dim {
                    count: u64::from(tokens.end - tokens.start),
                    stride: [self.token_stride; 2],
                },
            ],
            self.geometry.cell_bytes(),
        );
        let base = self.cell_offset(layer, block, heads.start, tokens.start);
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(nest.runs() as usize);
        nest.for_each([base; 2], |off, _, len| push_run(&mut out, off, len));
        out.sort_unstable();
        Ok(out)
    }

    /// All bytes of one block (every layer, head and token), as contiguous runs.
    pub fn block_runs(&self, block: u32) -> Result<Vec<(u64, u64)>, LayoutError> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for layer in 0..self.geometry.layers {
            for (off, len) in self.runs(
                layer,
                block,
                0..self.geometry.kv_heads,
                0..self.geometry.block_tokens,
            )? {
                push_run(&mut out, off, len);
            }
        }
        Ok(out)
    }
}

fn check_blocks(num_blocks: u32) -> Result<(), LayoutError> {
    if num_blocks == 0 {
        return Err(LayoutError::Invalid {
            field: "num_blocks",
            value: 0,
            reason: "must be positive",
        });
    }
    Ok(())
}

fn push_run(out: &mut Vec<(u64, u64)>, off: u64, len: u64) {
    if let Some(last) = out.last_mut() {
        if last.0 + last.1 == off {
            last.1 += len;
            return;
        }
    }
    out.push((off, len));
}

fn normalise_layers(layers: LayerPlacement, count: u32) -> Result<LayerPlacement, LayoutError> {
    match layers {
        LayerPlacement::Strided { .. } => Ok(layers),
        LayerPlacement::Explicit(v) => {
            if v.len() != count as usize {
                return Err(LayoutError::LayerCount {
                    expected: count,
                    got: v.len(),
                });
            }
            // Evenly spaced origins are the common case (views into one allocation); keeping
            // them as a stride lets plans fold the layer loop.
            if v.len() == 1 {
                return Ok(LayerPlacement::Strided {
                    first: v[0],
                    stride: 0,
                });
            }
            let step = v[1].wrapping_sub(v[0]);
            let affine = v[1] > v[0] && v.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] == step);
            if affine {
                Ok(LayerPlacement::Strided {
                    first: v[0],
                    stride: step,
                })
            } else {
                Ok(LayerPlacement::Explicit(v))
            }
        }
    }
}

/// Bytes reached by a strided set of cells, or an error if two distinct cells could overlap.
/// Sorting by stride and requiring each stride to clear everything inside it is sufficient for
/// distinct cells never to share a byte.
fn extent_of(dims: &[(&'static str, u64, u64)], cell: u64) -> Result<u64, LayoutError> {
    let mut live: Vec<_> = dims.iter().filter(|d| d.1 > 1).copied().collect();
    live.sort_by_key(|d| d.2);
    let mut ext = cell;
    for (name, count, stride) in live {
        if stride < ext {
            return Err(LayoutError::Overlap {
                detail: format!("{name} stride {stride} is smaller than the {ext} bytes inside it"),
            });
        }
        ext = stride
            .checked_mul(count - 1)
            .and_then(|x| x.checked_add(ext))
            .ok_or(LayoutError::TooLarge)?;
    }
    Ok(ext)
}

fn check(what: &'static str, value: u32, bound: u32) -> Result<(), LayoutError> {
    if value < bound {
        Ok(())
    } else {
        Err(LayoutError::OutOfRange {
            what,
            value: u64::from(value),
            bound: u64::from(bound),
        })
    }
}

fn check_range(what: &'static str, r: &Range<u32>, bound: u32) -> Result<(), LayoutError> {
    if r.start < r.end && r.end <= bound {
        Ok(())
    } else {
        Err(LayoutError::OutOfRange {
            what,
            value: u64::from(r.end),
            bound: u64::from(bound),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Dtype;

    fn g() -> Geometry {
        Geometry::mha(3, 4, 8, Dtype::Fp16, 16).expect("valid")
    }

    #[test]
    fn names_parse_with_aliases() {
        for o in StrideOrder::ALL {
            assert_eq!(o.name().parse::<StrideOrder>(), Ok(o));
            assert_eq!(o.name().to_lowercase().parse::<StrideOrder>(), Ok(o));
            assert_eq!(StrideOrder::from_code(o.code()), Some(o));
        }
        assert_eq!("HND".parse::<StrideOrder>(), Ok(StrideOrder::Lbhnc));
        assert_eq!("NHD".parse::<StrideOrder>(), Ok(StrideOrder::Lbnhc));
        assert!("LBXHC".parse::<StrideOrder>().is_err());
    }

    #[test]
    fn named_strides_match_hand_computation() {
        let cell = 16 * 2;
        let l = CacheLayout::named(g(), 10, StrideOrder::Lbhnc).expect("valid");
        assert_eq!(l.strides(), (4 * 16 * cell, 16 * cell, cell));
        assert_eq!(
            l.layers(),
            &LayerPlacement::Strided {
                first: 0,
                stride: 10 * 4 * 16 * cell
            }
        );
        let l = CacheLayout::named(g(), 10, StrideOrder::Lbnhc).expect("valid");
        assert_eq!(l.strides(), (4 * 16 * cell, cell, 4 * cell));
        let l = CacheLayout::named(g(), 10, StrideOrder::Bhlnc).expect("valid");
        assert_eq!(l.strides(), (3 * 4 * 16 * cell, 3 * 16 * cell, cell));
        for o in StrideOrder::ALL {
            let l = CacheLayout::named(g(), 10, o).expect("valid");
            assert_eq!(l.span_bytes(), l.data_bytes(), "{o} is dense");
        }
    }

    #[test]
    fn hnd_head_slices_are_single_runs_and_nhd_ones_are_not() {
        let hnd = CacheLayout::named(g(), 10, StrideOrder::Lbhnc).expect("valid");
        assert_eq!(hnd.runs(1, 2, 1..3, 0..16).expect("in range").len(), 1);
        let nhd = CacheLayout::named(g(), 10, StrideOrder::Lbnhc).expect("valid");
        assert_eq!(nhd.runs(1, 2, 1..3, 0..16).expect("in range").len(), 16);
        assert_eq!(nhd.runs(1, 2, 0..4, 0..16).expect("in range").len(), 1);
        let packed = CacheLayout::block_packed(g(), 10).expect("valid");
        assert_eq!(
            packed.block_runs(7).expect("in range"),
            vec![(7 * g().block_bytes(), g().block_bytes())]
        );
    }

    #[test]
    fn explicit_strides_are_checked_for_overlap() {
        // Element strides as torch reports them for a padded HND view.
        let ok = CacheLayout::from_element_strides(
            g(),
            4,
            vec![0, 1 << 20, 2 << 20],
            [1024, 256, 16, 1],
        )
        .expect("padded is fine");
        assert_eq!(ok.strides(), (2048, 512, 32));
        assert!(
            matches!(ok.layers(), LayerPlacement::Strided { stride, .. } if *stride == 1 << 20)
        );
        let overlapping =
            CacheLayout::from_element_strides(g(), 4, vec![0, 1 << 20, 2 << 20], [64, 256, 16, 1]);
        assert!(
            matches!(overlapping, Err(LayoutError::Overlap { .. })),
            "{overlapping:?}"
        );
        let non_contig =
            CacheLayout::from_element_strides(g(), 4, vec![0, 1, 2], [1024, 256, 16, 2]);
        assert!(non_contig.is_err());
        let layers_overlap =
            CacheLayout::from_element_strides(g(), 4, vec![0, 100, 1 << 20], [1024, 256, 16, 1]);
        assert!(matches!(layers_overlap, Err(LayoutError::Overlap { .. })));
        let wrong_count = CacheLayout::from_element_strides(g(), 4, vec![0], [1024, 256, 16, 1]);
        assert!(matches!(wrong_count, Err(LayoutError::LayerCount { .. })));
        let scattered = CacheLayout::from_element_strides(
            g(),
            4,
            vec![1 << 22, 0, 1 << 21],
            [1024, 256, 16, 1],
        )
        .expect("non-affine but disjoint");
        assert!(matches!(scattered.layers(), LayerPlacement::Explicit(_)));
        assert_eq!(scattered.offset(0, 0, 0, 0), Ok(1 << 22));
    }

    #[test]
    fn out_of_range_indices_are_errors() {
        let l = CacheLayout::named(g(), 10, StrideOrder::Lbhnc).expect("valid");
        assert!(l.offset(3, 0, 0, 0).is_err());
        assert!(l.offset(0, 10, 0, 0).is_err());
        assert!(l.runs(0, 0, 2..5, 0..16).is_err());
        assert!(l.runs(0, 0, 2..2, 0..16).is_err());
        let huge = CacheLayout::named(
            Geometry::mha(4096, 4096, 65536, Dtype::F32, 65536).expect("valid"),
            u32::MAX,
            StrideOrder::Lbnhc,
        );
        assert_eq!(huge, Err(LayoutError::TooLarge));
    }
}
