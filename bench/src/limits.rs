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

/// A timing repeated until it is stable: its median, the interquartile range relative to the
/// median, and how many runs it took.
#[derive(Clone, Copy, Debug)]
pub struct Settled {
    pub median: f64,
    pub spread: f64,
    pub runs: usize,
}

/// Above this relative spread a figure is marked noisy rather than trusted.
pub const NOISY: f64 = 0.10;

/// Runs `f` once to warm up, then `min` times, then more (up to four times `min`, at most 64)
/// until the interquartile range is within [`NOISY`] of the median. A row that never settles
/// keeps its spread, and the report marks it noisy.
pub fn settle(min: usize, mut f: impl FnMut() -> Result<f64, String>) -> Result<Settled, String> {
    let min = min.max(3);
    f()?;
    let mut v = Vec::with_capacity(min);
    let max = (min * 4).min(64).max(min);
    loop {
        v.push(f()?);
        if v.len() >= min {
            let s = spread(&v);
            if s.1 <= NOISY || v.len() >= max {
                return Ok(Settled {
                    median: s.0,
                    spread: s.1,
                    runs: v.len(),
                });
            }
        }
    }
}

/// (median, (q3 - q1) / median) of a non-empty sample.
pub fn spread(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let q = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize];
    let m = q(0.5);
    (
        m,
        if m > 0.0 {
            (q(0.75) - q(0.25)) / m
        } else {
            0.0
        },
    )
}

/// One block-by-block memcpy of `batch` blocks of `block` bytes on one thread, the source
/// blocks scattered as the benchmarks scatter the far side's: what a one-copy transport
/// (shared memory, cma) cannot beat on this machine. Best of `reps`, in GB/s.
pub fn scattered_memcpy_gbps(block: usize, batch: usize, reps: usize) -> f64 {
    let n = batch.max(1);
    let src = vec![0x5au8; block * n];
    let mut dst = vec![0xa5u8; block * n];
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        for i in 0..n {
            let j = (i * 7) % n;
            dst[i * block..(i + 1) * block]
                .copy_from_slice(black_box(&src[j * block..(j + 1) * block]));
        }
        black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (block * n) as f64 / best / 1e9
}

/// What a TCP transport with `streams` connections per peer can reach here moving `bytes` over
/// loopback: the better of the bytes split over `streams` connections in parallel (threads
/// started once and woken per run, as a transport's pooled connections are; the kernel's
/// default buffers) and the bytes through one connection by one thread that writes a piece and
/// reads it back (no wake-up at all). Best of `reps` each, in GB/s.
pub fn tcp_streams_gbps(bytes: usize, streams: usize, reps: usize) -> Result<f64, String> {
    use std::io::{Read, Write};
    use std::sync::mpsc::channel;
    let streams = streams.clamp(1, 64);
    let share = bytes.div_ceil(streams).max(1);
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let mut pairs = Vec::new();
    for _ in 0..streams {
        let tx = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let (rx, _) = l.accept().map_err(|e| e.to_string())?;
        let _ = tx.set_nodelay(true);
        pairs.push((tx, rx));
    }
    // The same bytes through one connection by one thread, writing a piece and reading it back
    // at once: no thread is woken, which for a small transfer is most of the cost.
    let mut inline = f64::INFINITY;
    if let Some((tx, rx)) = pairs.first_mut() {
        let piece = 64usize << 10;
        let src = vec![0x5au8; piece.min(bytes.max(1))];
        let mut dst = vec![0u8; src.len()];
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(src.len());
                tx.write_all(&src[..n]).map_err(|e| e.to_string())?;
                rx.read_exact(&mut dst[..n]).map_err(|e| e.to_string())?;
                left -= n;
            }
            inline = inline.min(t.elapsed().as_secs_f64());
        }
    }
    let (done_tx, done_rx) = channel::<Result<(), String>>();
    let mut gos = Vec::new();
    let mut threads = Vec::new();
    for (mut tx, mut rx) in pairs {
        let (wgo, wgo_rx) = channel::<bool>();
        let (rgo, rgo_rx) = channel::<bool>();
        let done = done_tx.clone();
        threads.push(std::thread::spawn(move || {
            let src = vec![0x5au8; share.min(4 << 20)];
            while let Ok(true) = wgo_rx.recv() {
                let mut left = share;
                while left > 0 {
                    let n = left.min(src.len());
                    if tx.write_all(&src[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            }
        }));
        threads.push(std::thread::spawn(move || {
            let mut dst = vec![0u8; share.min(4 << 20)];
            while let Ok(true) = rgo_rx.recv() {
                let mut got = 0;
                let r = loop {
                    if got >= share {
                        break Ok(());
                    }
                    match rx.read(&mut dst) {
                        Ok(0) => break Err("a loopback stream closed".to_string()),
                        Ok(n) => got += n,
                        Err(e) => break Err(e.to_string()),
                    }
                };
                if done.send(r).is_err() {
                    return;
                }
            }
        }));
        gos.push((wgo, rgo));
    }
    let mut best = f64::INFINITY;
    let mut result = Ok(());
    'runs: for _ in 0..reps.max(1) {
        let t = Instant::now();
        for (w, r) in &gos {
            let _ = r.send(true);
            let _ = w.send(true);
        }
        for _ in 0..streams {
            match done_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    result = Err(e);
                    break 'runs;
                }
                Err(_) => {
                    result = Err("a stream thread died".into());
                    break 'runs;
                }
            }
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    for (w, r) in &gos {
        let _ = w.send(false);
        let _ = r.send(false);
    }
    drop(gos);
    for t in threads {
        let _ = t.join();
    }
    result.map(|()| ((share * streams) as f64 / best).max(bytes as f64 / inline) / 1e9)
}

/// memcpy of `pieces` (source offset, destination offset, length) from a buffer of `src_len`
/// bytes into one of `dst_len`, the pieces shared out over `threads` threads in equal runs:
/// the same copies a host tier copy makes, without the engine around them. Both buffers are
/// written once first (no page faults in the figure); best of `reps`, in GB/s.
pub fn pieces_memcpy_gbps(
    src_len: usize,
    dst_len: usize,
    pieces: &[(usize, usize, usize)],
    threads: usize,
    reps: usize,
) -> f64 {
    let src = vec![0x5au8; src_len];
    let mut dst = vec![0xa5u8; dst_len];
    let bytes: usize = pieces.iter().map(|p| p.2).sum();
    let threads = threads.clamp(1, pieces.len().max(1));
    let per = pieces.len().div_ceil(threads);
    let dst_addr = dst.as_mut_ptr() as usize;
    let copy = |run: &[(usize, usize, usize)]| {
        for &(so, d, len) in run {
            // SAFETY: every piece lies inside `dst` (built from the same layout as the
            // source), pieces never overlap, and each thread writes its own.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    black_box(src[so..so + len].as_ptr()),
                    (dst_addr + d) as *mut u8,
                    len,
                )
            };
        }
    };
    // One thread first (no thread is started: for a small batch, starting one costs more than
    // the copy), then `threads`; the better of the two.
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        copy(pieces);
        black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        std::thread::scope(|s| {
            let copy = &copy;
            for run in pieces.chunks(per) {
                s.spawn(move || copy(run));
            }
        });
        black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

/// This machine in one line (CPU model, cores, memory), carried by every JSON row.
pub fn machine() -> &'static str {
    static M: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mem_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib >> 20);
        format!("{cpu}, {cores} cores, {mem_gib} GiB")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_timing_settles_at_the_minimum_and_a_wild_one_is_kept_noisy() {
        let s = settle(5, || Ok(1.0)).expect("settles");
        assert_eq!((s.median, s.spread, s.runs), (1.0, 0.0, 5));
        let mut k = 0u32;
        let s = settle(5, || {
            k += 1;
            Ok(if k % 2 == 0 { 1.0 } else { 3.0 })
        })
        .expect("ends");
        assert_eq!(s.runs, 20);
        assert!(s.spread > NOISY, "{s:?}");
    }
}
