//! Physical limits measured in the same run as the figures they are compared with.

use std::hint::black_box;
use std::time::Instant;

/// The median of a non-empty list of timings.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One-thread memcpy bandwidth in GB/s (best of `reps`) over buffers of `bytes`, touched first so
/// page faults stay out of the figure.
pub fn memcpy_gbps(bytes: usize, reps: usize) -> f64 {
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0xa5u8; bytes];
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

/// memcpy bandwidth with `threads` threads each copying an equal share of one `bytes` buffer:
/// the host-copy engine's ceiling at the same thread count. Best of `reps`, and never below the
/// one-thread figure.
pub fn memcpy_threads_gbps(bytes: usize, threads: usize, reps: usize) -> f64 {
    let threads = threads.max(1);
    let bytes = bytes.max(threads * 4096);
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0xa5u8; bytes];
    let share = bytes.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        std::thread::scope(|s| {
            for (d, sr) in dst.chunks_mut(share).zip(src.chunks(share)) {
                s.spawn(move || d.copy_from_slice(black_box(sr)));
            }
        });
        black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (bytes as f64 / best / 1e9).max(memcpy_gbps(bytes, reps))
}
