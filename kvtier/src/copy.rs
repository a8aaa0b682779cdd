//! Copy engines: move a batch of descriptor pairs asynchronously and report once, when the whole
//! batch is done. `HostCopy` does it with memcpy on worker threads — on CPU inference engines that
//! is the real G1↔G2 path; the CUDA engine implements the same trait.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Sender};
use kvcore::MemKind;
use parking_lot::Mutex;

use crate::error::CopyError;
use crate::memory::{CopyPair, MemoryRegistry};

/// Called once per batch with the bytes moved, or the error that stopped it.
pub type CopyCallback = Box<dyn FnOnce(Result<u64, CopyError>) + Send>;

pub trait CopyEngine: Send + Sync {
    fn name(&self) -> &'static str;

    /// The registry whose regions the descriptors name.
    fn memory(&self) -> &MemoryRegistry;

    /// Checks every pair against the registry, then starts the batch. A bad pair fails the call
    /// before any byte moves, and `done` is not called; otherwise `done` runs exactly once —
    /// possibly before `submit` returns, on the caller's thread (a small host copy is done
    /// there), so it must not take a lock the caller holds.
    fn submit(&self, pairs: &[CopyPair], done: CopyCallback) -> Result<(), CopyError>;

    /// Submits and waits (for tests, tools and callers without their own event loop).
    fn copy_blocking(&self, pairs: &[CopyPair], timeout: Duration) -> Result<u64, CopyError> {
        let (tx, rx) = bounded(1);
        self.submit(
            pairs,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        rx.recv_timeout(timeout)
            .map_err(|_| CopyError::Failed(format!("no completion within {timeout:?}")))?
    }
}

struct Batch {
    remaining: AtomicUsize,
    bytes: u64,
    done: Mutex<Option<CopyCallback>>,
}

struct Job {
    pieces: Vec<(u64, u64, u64)>,
    batch: Arc<Batch>,
}

/// memcpy on a pool of worker threads. A batch is split into shares of roughly equal bytes so
/// one large batch uses every worker, while a small one stays on one thread.
pub struct HostCopy {
    memory: MemoryRegistry,
    tx: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
}

/// Below this, splitting a batch costs more in hand-offs than it gains.
const MIN_SHARE: u64 = 256 << 10;

/// A batch up to this size is copied on the submitter's thread: about 10-20 µs of memcpy,
/// less than waking a copy thread and being woken back by it.
const INLINE_MAX: u64 = 256 << 10;

impl HostCopy {
    pub fn new(memory: MemoryRegistry, threads: usize) -> HostCopy {
        let threads = threads.max(1);
        let (tx, rx) = unbounded::<Job>();
        let workers = (0..threads)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("kvferry-copy-{i}"))
                    .spawn(move || {
                        for job in rx {
                            run_job(job);
                        }
                    })
                    .expect("spawning a copy thread")
            })
            .collect();
        HostCopy {
            memory,
            tx: Some(tx),
            workers,
            threads,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

fn run_job(job: Job) {
    for (src, dst, len) in &job.pieces {
        // SAFETY: every piece lies inside registered host regions (checked in `submit`), whose
        // owners promised validity and exclusive access for the copy's duration
        // (`MemoryRegistry::register`); source and destination were checked not to overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(*src as *const u8, *dst as *mut u8, *len as usize);
        }
    }
    if job.batch.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        if let Some(cb) = job.batch.done.lock().take() {
            cb(Ok(job.batch.bytes));
        }
    }
}

impl CopyEngine for HostCopy {
    fn name(&self) -> &'static str {
        "host-memcpy"
    }

    fn memory(&self) -> &MemoryRegistry {
        &self.memory
    }

    fn submit(&self, pairs: &[CopyPair], done: CopyCallback) -> Result<(), CopyError> {
        let resolved = self.memory.resolve_pairs(pairs)?;
        for (s, d) in &resolved {
            for r in [s, d] {
                if !matches!(r.kind, MemKind::Host | MemKind::PinnedHost) {
                    return Err(CopyError::Unreachable {
                        engine: self.name(),
                        kind: format!("{:?}", r.kind),
                    });
                }
            }
        }
        let tx = self.tx.as_ref().ok_or(CopyError::Shutdown)?;
        let total: u64 = resolved.iter().map(|(s, _)| s.len).sum();
        let shares = ((total / MIN_SHARE) as usize).clamp(1, self.threads);
        let share = total.div_ceil(shares as u64).max(1);
        let mut jobs: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new()];
        let mut filled = 0u64;
        for (s, d) in &resolved {
            let (mut off, mut left) = (0u64, s.len);
            while left > 0 {
                let take = left.min(share - filled);
                jobs.last_mut().expect("jobs starts non-empty").push((
                    s.addr + off,
                    d.addr + off,
                    take,
                ));
                off += take;
                left -= take;
                filled += take;
                if filled == share {
                    jobs.push(Vec::new());
                    filled = 0;
                }
            }
        }
        jobs.retain(|j| !j.is_empty());
        if jobs.is_empty() {
            done(Ok(0));
            return Ok(());
        }
        if jobs.len() == 1 && total <= INLINE_MAX {
            let pieces = jobs.pop().unwrap_or_default();
            run_job(Job {
                pieces,
                batch: Arc::new(Batch {
                    remaining: AtomicUsize::new(1),
                    bytes: total,
                    done: Mutex::new(Some(done)),
                }),
            });
            return Ok(());
        }
        let batch = Arc::new(Batch {
            remaining: AtomicUsize::new(jobs.len()),
            bytes: total,
            done: Mutex::new(Some(done)),
        });
        for pieces in jobs {
            let job = Job {
                pieces,
                batch: batch.clone(),
            };
            if tx.send(job).is_err() {
                if let Some(cb) = batch.done.lock().take() {
                    cb(Err(CopyError::Shutdown));
                }
                break;
            }
        }
        Ok(())
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        // Closing the queue lets the workers finish what was submitted, then exit.
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcore::{Descriptor, Region};

    fn register(m: &MemoryRegistry, buf: &mut [u8]) -> kvcore::RegionId {
        // SAFETY: the buffers outlive the engine in each test and are not touched during copies.
        unsafe {
            m.register(Region {
                kind: MemKind::Host,
                base: buf.as_mut_ptr() as u64,
                len: buf.len() as u64,
            })
        }
        .expect("disjoint buffers")
    }

    #[test]
    fn batches_move_exact_bytes_across_threads() {
        let m = MemoryRegistry::new();
        let mut src: Vec<u8> = (0..(4 << 20)).map(|i| (i * 7 % 253) as u8).collect();
        let mut dst = vec![0u8; 4 << 20];
        let (s, d) = (register(&m, &mut src), register(&m, &mut dst));
        let engine = HostCopy::new(m, 3);
        let pairs: Vec<CopyPair> = (0..64u64)
            .map(|i| CopyPair {
                src: Descriptor {
                    region: s,
                    offset: i * 65536,
                    len: 65536,
                },
                dst: Descriptor {
                    region: d,
                    offset: (63 - i) * 65536,
                    len: 65536,
                },
            })
            .collect();
        let moved = engine
            .copy_blocking(&pairs, Duration::from_secs(10))
            .expect("valid batch");
        assert_eq!(moved, 4 << 20);
        for i in 0..64usize {
            assert_eq!(
                src[i * 65536..(i + 1) * 65536],
                dst[(63 - i) * 65536..(64 - i) * 65536]
            );
        }
    }

    #[test]
    fn bad_pairs_fail_before_any_byte_moves() {
        let m = MemoryRegistry::new();
        let mut src = vec![1u8; 4096];
        let mut dst = vec![0u8; 4096];
        let (s, d) = (register(&m, &mut src), register(&m, &mut dst));
        let engine = HostCopy::new(m, 2);
        let good = CopyPair {
            src: Descriptor {
                region: s,
                offset: 0,
                len: 4096,
            },
            dst: Descriptor {
                region: d,
                offset: 0,
                len: 4096,
            },
        };
        let outside = CopyPair {
            dst: Descriptor {
                region: d,
                offset: 1,
                len: 4096,
            },
            ..good
        };
        let unequal = CopyPair {
            dst: Descriptor {
                region: d,
                offset: 0,
                len: 100,
            },
            ..good
        };
        let overlap = CopyPair {
            src: Descriptor {
                region: s,
                offset: 0,
                len: 100,
            },
            dst: Descriptor {
                region: s,
                offset: 50,
                len: 100,
            },
        };
        for bad in [outside, unequal, overlap] {
            let r = engine.submit(&[good, bad], Box::new(|_| panic!("must not run")));
            assert!(r.is_err(), "{bad:?}");
        }
        assert!(dst.iter().all(|&b| b == 0));
    }
}
