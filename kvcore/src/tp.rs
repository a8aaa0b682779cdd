//! Tensor-parallel head mapping. Each rank of a TP group holds a contiguous slice of the KV heads
//! (or, when there are fewer KV heads than ranks, a replica of one head). A decode rank whose TP
//! size differs from the prefill side's reads its heads from one or several prefill ranks.

use std::ops::Range;

use crate::error::PlanError;
use crate::plan::HeadSlice;

/// The global KV heads rank `rank` of a `tp`-way group holds, the way vLLM splits them: an even
/// split when `total >= tp`, otherwise `tp / total` ranks share (replicate) each head.
pub fn rank_heads(total: u32, tp: u32, rank: u32) -> Result<Range<u32>, PlanError> {
    let bad = |msg: String| Err(PlanError::TensorParallel(msg));
    if total == 0 || tp == 0 {
        return bad(format!(
            "total KV heads {total} and TP size {tp} must be positive"
        ));
    }
    if rank >= tp {
        return bad(format!("rank {rank} is out of range for TP size {tp}"));
    }
    if total >= tp {
        if total % tp != 0 {
            return bad(format!(
                "{total} KV heads do not split evenly over TP size {tp}"
            ));
        }
        let per = total / tp;
        Ok(rank * per..(rank + 1) * per)
    } else {
        if tp % total != 0 {
            return bad(format!(
                "TP size {tp} is not a multiple of {total} KV heads"
            ));
        }
        let head = rank / (tp / total);
        Ok(head..head + 1)
    }
}

/// One read a destination rank makes: this head slice from source rank `src_rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpRead {
    pub src_rank: u32,
    pub heads: HeadSlice,
}

/// The reads that fill destination rank `dst_rank` (of `dst_tp`) from a source group of
/// `src_tp`, fewest first: consecutive heads from one source rank form one read. Where heads are
/// replicated on the source side, destination ranks spread their reads over the replicas.
pub fn tp_reads(
    total_kv_heads: u32,
    src_tp: u32,
    dst_tp: u32,
    dst_rank: u32,
) -> Result<Vec<TpRead>, PlanError> {
    let want = rank_heads(total_kv_heads, dst_tp, dst_rank)?;
    // Validates the source split too.
    rank_heads(total_kv_heads, src_tp, 0)?;
    let mut reads: Vec<TpRead> = Vec::new();
    for g in want.clone() {
        let (src_rank, local) = if total_kv_heads >= src_tp {
            let per = total_kv_heads / src_tp;
            (g / per, g % per)
        } else {
            let replicas = src_tp / total_kv_heads;
            (g * replicas + dst_rank % replicas, 0)
        };
        let dst_local = g - want.start;
        if let Some(last) = reads.last_mut() {
            let h = &mut last.heads;
            if last.src_rank == src_rank
                && h.src_start + h.count == local
                && h.dst_start + h.count == dst_local
            {
                h.count += 1;
                continue;
            }
        }
        reads.push(TpRead {
            src_rank,
            heads: HeadSlice {
                src_start: local,
                dst_start: dst_local,
                count: 1,
            },
        });
    }
    Ok(reads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(src_rank: u32, src_start: u32, dst_start: u32, count: u32) -> TpRead {
        TpRead {
            src_rank,
            heads: HeadSlice {
                src_start,
                dst_start,
                count,
            },
        }
    }

    #[test]
    fn splits_follow_vllm() {
        assert_eq!(rank_heads(8, 4, 3), Ok(6..8));
        assert_eq!(rank_heads(8, 16, 5), Ok(2..3));
        assert!(rank_heads(6, 4, 0).is_err());
        assert!(rank_heads(8, 4, 4).is_err());
    }

    #[test]
    fn smaller_decode_tp_reads_from_several_prefill_ranks() {
        // 8 heads: prefill TP 4 (2 heads each), decode TP 2 (4 heads each).
        assert_eq!(
            tp_reads(8, 4, 2, 1),
            Ok(vec![read(2, 0, 0, 2), read(3, 0, 2, 2)])
        );
    }

    #[test]
    fn larger_decode_tp_reads_a_slice_of_one_prefill_rank() {
        // 8 heads: prefill TP 2 (4 each), decode TP 8 (1 each).
        assert_eq!(tp_reads(8, 2, 8, 5), Ok(vec![read(1, 1, 0, 1)]));
        assert_eq!(tp_reads(8, 1, 1, 0), Ok(vec![read(0, 0, 0, 8)]));
    }

    #[test]
    fn replicated_heads_spread_over_replicas() {
        // 2 heads, prefill TP 8: ranks 0-3 hold head 0, 4-7 head 1. Decode TP 2 rank 1 wants head 1.
        assert_eq!(tp_reads(2, 8, 2, 1), Ok(vec![read(5, 0, 0, 1)]));
        assert_eq!(tp_reads(2, 8, 4, 3), Ok(vec![read(7, 0, 0, 1)]));
    }
}
