//! Loop nests over strided memory on two sides at once (source and destination), reduced to the
//! fewest contiguous runs. The same machinery answers "where are the bytes of this slice" for one
//! layout (both sides equal) and "which copies move this slice" for two.

/// One loop dimension: `count` steps of `stride[side]` bytes on each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dim {
    pub count: u64,
    pub stride: [u64; 2],
}

/// The outer loops left after coalescing, outermost first, and the contiguous run each
/// iteration moves. At most five dimensions ever exist (layer, block, head, token, and the run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Nest {
    pub dims: Vec<Dim>,
    pub run: u64,
}

impl Nest {
    /// Drops unit loops, orders loops by side-0 stride (so runs come out in increasing source
    /// address order), merges neighbouring loops that are contiguous on both sides, then folds
    /// inner loops into the run while both sides stay contiguous.
    pub fn coalesce(mut dims: Vec<Dim>, mut run: u64) -> Nest {
        dims.retain(|d| d.count > 1);
        dims.sort_by(|a, b| {
            b.stride[0]
                .cmp(&a.stride[0])
                .then(b.stride[1].cmp(&a.stride[1]))
        });
        let mut merged: Vec<Dim> = Vec::with_capacity(dims.len());
        for d in dims {
            if let Some(prev) = merged.last_mut() {
                if prev.stride[0] == d.count.wrapping_mul(d.stride[0])
                    && prev.stride[1] == d.count.wrapping_mul(d.stride[1])
                {
                    prev.count *= d.count;
                    prev.stride = d.stride;
                    continue;
                }
            }
            merged.push(d);
        }
        while let Some(last) = merged.last() {
            if last.stride[0] == run && last.stride[1] == run {
                run *= last.count;
                merged.pop();
            } else {
                break;
            }
        }
        Nest { dims: merged, run }
    }

    /// Runs in loop order: `f(src_offset, dst_offset, len)`.
    pub fn for_each(&self, base: [u64; 2], mut f: impl FnMut(u64, u64, u64)) {
        let n = self.dims.len();
        let mut idx = [0u64; 8];
        let mut off = base;
        loop {
            f(off[0], off[1], self.run);
            let mut k = n;
            loop {
                if k == 0 {
                    return;
                }
                k -= 1;
                let d = &self.dims[k];
                idx[k] += 1;
                // Offsets stay inside validated layouts, whose spans fit in u64; wrapping ops keep
                // the one-past-the-end step from tripping debug overflow checks.
                off[0] = off[0].wrapping_add(d.stride[0]);
                off[1] = off[1].wrapping_add(d.stride[1]);
                if idx[k] < d.count {
                    break;
                }
                idx[k] = 0;
                off[0] = off[0].wrapping_sub(d.stride[0].wrapping_mul(d.count));
                off[1] = off[1].wrapping_sub(d.stride[1].wrapping_mul(d.count));
            }
        }
    }

    /// Number of runs `for_each` yields.
    pub fn runs(&self) -> u64 {
        self.dims.iter().map(|d| d.count).product()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(count: u64, s: u64, t: u64) -> Dim {
        Dim {
            count,
            stride: [s, t],
        }
    }

    #[test]
    fn contiguous_loops_fold_into_one_run() {
        let n = Nest::coalesce(vec![d(4, 64, 64), d(8, 8, 8)], 8);
        assert_eq!(
            n,
            Nest {
                dims: vec![],
                run: 256
            }
        );
    }

    #[test]
    fn transposed_sides_keep_cell_runs() {
        // Source is [4][8] row-major, destination column-major: nothing merges.
        let n = Nest::coalesce(vec![d(4, 64, 8), d(8, 8, 32)], 8);
        assert_eq!(n.runs(), 32);
        let mut seen = vec![];
        n.for_each([0, 0], |s, t, len| seen.push((s, t, len)));
        assert_eq!(seen.len(), 32);
        assert_eq!(seen[1], (8, 32, 8));
    }

    #[test]
    fn outer_loops_merge_when_both_sides_agree() {
        let n = Nest::coalesce(vec![d(3, 1000, 2000), d(2, 500, 1000)], 100);
        assert_eq!(n.dims, vec![d(6, 500, 1000)]);
        assert_eq!(n.run, 100);
    }
}
