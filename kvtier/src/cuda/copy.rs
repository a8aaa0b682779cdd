//! `CudaCopy`: the kvtier `CopyEngine` for device memory. Batches of scattered blocks move
//! between HBM and pinned DRAM on two streams (offload: out of the device; onboard: into it), so
//! saving one request's KV never queues behind loading another's. Three ways to issue a batch —
//! one `cuMemcpyAsync` per contiguous run, the driver's batched copy, or the NVRTC copy kernel —
//! and with [`MethodChoice::Auto`] each batch takes the one that measured fastest on this machine
//! for its direction, piece size and count (measured once per device per process).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Sender};
use cudarc::driver::{sys, CudaEvent, CudaStream};
use kvcore::{MemKind, RegionId};
use parking_lot::Mutex;

use super::kernel::{Kernel, PIECE};
use super::{driver_error, Gpu};
use crate::copy::{CopyCallback, CopyEngine};
use crate::error::CopyError;
use crate::memory::{CopyPair, MemoryRegistry};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyMethod {
    /// One `cuMemcpyAsync` per contiguous run (after kvcore's coalescing).
    PerRun,
    /// `cuMemcpyBatchAsync` (driver 12.8+): one call for the whole batch.
    Batch,
    /// The NVRTC gather/scatter kernel, reading and writing mapped pinned DRAM directly.
    Kernel,
}

impl CopyMethod {
    pub const ALL: [CopyMethod; 3] = [CopyMethod::PerRun, CopyMethod::Batch, CopyMethod::Kernel];

    pub const fn name(self) -> &'static str {
        match self {
            CopyMethod::PerRun => "memcpy-per-run",
            CopyMethod::Batch => "memcpy-batch",
            CopyMethod::Kernel => "kernel",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodChoice {
    /// The fastest measured method for each batch's shape.
    Auto,
    Fixed(CopyMethod),
}

#[derive(Clone, Copy, Debug)]
pub struct CudaCopyConfig {
    pub choice: MethodChoice,
}

impl Default for CudaCopyConfig {
    fn default() -> Self {
        CudaCopyConfig {
            choice: MethodChoice::Auto,
        }
    }
}

/// Out of the device (or within it) vs into the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lane {
    Offload = 0,
    Onboard = 1,
}

/// A resolved piece of a batch: addresses in the unified address space.
#[derive(Clone, Copy, Debug)]
struct Run {
    src: u64,
    dst: u64,
    len: u64,
    src_dev: bool,
    dst_dev: bool,
}

type BatchV1 = unsafe extern "C" fn(
    *mut sys::CUdeviceptr,
    *mut sys::CUdeviceptr,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    sys::CUstream,
) -> sys::CUresult;
type BatchV2 = unsafe extern "C" fn(
    *mut sys::CUdeviceptr,
    *mut sys::CUdeviceptr,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    sys::CUstream,
) -> sys::CUresult;

/// The driver's batched copy, in whichever signature this driver exports.
#[derive(Clone, Copy)]
enum BatchFn {
    /// CUDA 12.8–12.9: with a failure index.
    V1(BatchV1),
    /// CUDA 13: `cuMemcpyBatchAsync_v2`, without it.
    V2(BatchV2),
}

fn load_batch_fn(driver_version: i32) -> Option<BatchFn> {
    if driver_version < 12080 {
        return None;
    }
    // SAFETY: the driver library is loaded (Gpu::open checked); the symbols are looked up by
    // name and typed with the signatures of the CUDA headers of the versions that export them.
    unsafe {
        let lib = sys::culib();
        if let Ok(f) = lib.get::<BatchV2>(b"cuMemcpyBatchAsync_v2\0") {
            return Some(BatchFn::V2(*f));
        }
        if driver_version < 13000 {
            if let Ok(f) = lib.get::<BatchV1>(b"cuMemcpyBatchAsync\0") {
                return Some(BatchFn::V1(*f));
            }
        }
    }
    None
}

struct Pending {
    event: Option<CudaEvent>,
    outcome: Result<u64, CopyError>,
    done: CopyCallback,
    /// Host arrays the driver may still read until the event completes.
    _keep: Vec<Box<dyn std::any::Any + Send>>,
}

struct LaneState {
    /// Device copy of the kernel's piece table; grows, never shrinks.
    scratch: Option<super::DeviceBuffer>,
}

struct LaneIo {
    stream: Arc<CudaStream>,
    state: Mutex<LaneState>,
    tx: Mutex<Option<Sender<Pending>>>,
    waiter: Mutex<Option<JoinHandle<()>>>,
}

/// What was learnt about a registered region the first time a batch named it.
#[derive(Clone)]
struct Checked {
    base: u64,
    len: u64,
    /// Device regions: allocations already checked to hold the descriptors seen so far.
    allocs: Vec<(u64, u64)>,
    /// Index into `allocs` of the last hit (scattered blocks mostly stay in one layer tensor).
    hint: usize,
    /// Host regions: page-locked and mapped, so the kernel may touch them.
    mapped: bool,
    host_checked: bool,
}

/// Which method won for one direction, piece size and count bucket.
#[derive(Clone, Copy, Debug)]
pub struct Pick {
    pub onboard: bool,
    pub piece_bytes: u64,
    pub count: u64,
    pub method: CopyMethod,
    pub gbps: f64,
}

pub struct CudaCopy {
    gpu: Gpu,
    memory: MemoryRegistry,
    lanes: [LaneIo; 2],
    kernel: Result<Kernel, String>,
    batch: Option<BatchFn>,
    choice: MethodChoice,
    picks: OnceLock<Vec<Pick>>,
    checked: Mutex<HashMap<RegionId, Checked>>,
}

impl CudaCopy {
    pub fn new(
        gpu: &Gpu,
        memory: MemoryRegistry,
        cfg: CudaCopyConfig,
    ) -> Result<CudaCopy, CopyError> {
        gpu.bind()?;
        let lane = |name: &str| -> Result<LaneIo, CopyError> {
            let stream = gpu
                .context()
                .new_stream()
                .map_err(|e| driver_error("cuStreamCreate", e))?;
            let (tx, rx) = unbounded::<Pending>();
            let waiter = std::thread::Builder::new()
                .name(format!("kvferry-cuda-{name}"))
                .spawn(move || {
                    for p in rx {
                        let synced = match &p.event {
                            Some(e) => e
                                .synchronize()
                                .map_err(|e| driver_error("copy failed on the device", e)),
                            None => Ok(()),
                        };
                        (p.done)(synced.and(p.outcome));
                    }
                })
                .map_err(|e| CopyError::Failed(format!("cannot start a CUDA waiter: {e}")))?;
            Ok(LaneIo {
                stream,
                state: Mutex::new(LaneState { scratch: None }),
                tx: Mutex::new(Some(tx)),
                waiter: Mutex::new(Some(waiter)),
            })
        };
        let kernel = Kernel::build(gpu).map_err(|e| e.to_string());
        if let Err(e) = &kernel {
            log::warn!("kvferry: {e}");
        }
        Ok(CudaCopy {
            gpu: gpu.clone(),
            memory,
            lanes: [lane("offload")?, lane("onboard")?],
            kernel,
            batch: load_batch_fn(gpu.info().driver_version),
            choice: cfg.choice,
            picks: OnceLock::new(),
            checked: Mutex::new(HashMap::new()),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Whether `method` can run here, or why not.
    pub fn supports(&self, method: CopyMethod) -> Result<(), String> {
        match method {
            CopyMethod::PerRun => Ok(()),
            CopyMethod::Batch => self.batch.map(|_| ()).ok_or_else(|| {
                format!(
                    "driver {} has no cuMemcpyBatchAsync (needs 12.8+)",
                    self.gpu.info().driver_version
                )
            }),
            CopyMethod::Kernel => self.kernel.as_ref().map(|_| ()).map_err(Clone::clone),
        }
    }

    /// Submits with one method, whatever the configured choice (benchmarks compare them).
    pub fn submit_with(
        &self,
        method: CopyMethod,
        pairs: &[CopyPair],
        done: CopyCallback,
    ) -> Result<(), CopyError> {
        let (lane, runs, mapped) = self.resolve(pairs)?;
        if method == CopyMethod::Kernel && !mapped {
            return Err(CopyError::Failed(
                "the copy kernel needs device memory or mapped pinned host memory on both sides"
                    .into(),
            ));
        }
        self.issue(lane, method, &runs, done)
    }

    /// The measured winners, measuring first if nobody has on this device in this process.
    pub fn picks(&self) -> &[Pick] {
        self.picks.get_or_init(|| {
            static CACHE: OnceLock<Mutex<HashMap<u32, Vec<Pick>>>> = OnceLock::new();
            let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
            let mut c = cache.lock();
            c.entry(self.gpu.ordinal())
                .or_insert_with(|| {
                    self.calibrate().unwrap_or_else(|e| {
                        log::warn!("kvferry: copy calibration failed ({e}); using memcpy per run");
                        Vec::new()
                    })
                })
                .clone()
        })
    }

    fn resolve(&self, pairs: &[CopyPair]) -> Result<(Lane, Vec<Run>, bool), CopyError> {
        let resolved = self.memory.resolve_pairs(pairs)?;
        let mut runs = Vec::with_capacity(resolved.len());
        let mut mapped = true;
        let mut onboard = false;
        let mut checked = self.checked.lock();
        // Regions seen in this batch: each is looked up in the registry once per batch, not
        // once per descriptor (batches of scattered blocks run to hundreds of thousands).
        let mut fresh: Vec<(RegionId, bool)> = Vec::new();
        for (i, (s, d)) in resolved.iter().enumerate() {
            let pair = &pairs[i];
            let mut sides = [false; 2];
            for (k, (r, desc)) in [(s, &pair.src), (d, &pair.dst)].into_iter().enumerate() {
                let id = desc.region;
                let host_mapped = match fresh.iter().find(|f| f.0 == id) {
                    Some(f) => f.1,
                    None => {
                        let e = self.region_entry(&mut checked, id)?;
                        let m = match r.kind {
                            MemKind::Host | MemKind::PinnedHost => self.check_host(e),
                            _ => true,
                        };
                        fresh.push((id, m));
                        m
                    }
                };
                match r.kind {
                    MemKind::Device { ordinal } if ordinal == self.gpu.ordinal() => {
                        let e = checked
                            .get_mut(&id)
                            .ok_or_else(|| CopyError::Failed(format!("region {id:?} vanished")))?;
                        self.check_device(e, r.addr, r.len)?;
                        sides[k] = true;
                    }
                    MemKind::Host | MemKind::PinnedHost => mapped &= host_mapped,
                    other => {
                        return Err(CopyError::Unreachable {
                            engine: self.name(),
                            kind: format!("{other:?}"),
                        })
                    }
                }
            }
            onboard |= !sides[0] && sides[1];
            runs.push(Run {
                src: s.addr,
                dst: d.addr,
                len: s.len,
                src_dev: sides[0],
                dst_dev: sides[1],
            });
        }
        let lane = if onboard {
            Lane::Onboard
        } else {
            Lane::Offload
        };
        Ok((lane, runs, mapped))
    }

    fn region_entry<'a>(
        &self,
        checked: &'a mut HashMap<RegionId, Checked>,
        id: RegionId,
    ) -> Result<&'a mut Checked, CopyError> {
        let region = self.memory.get(id).ok_or_else(|| {
            CopyError::Failed(format!("region {id:?} was deregistered during the batch"))
        })?;
        let fresh = |base, len| Checked {
            base,
            len,
            allocs: Vec::new(),
            hint: 0,
            mapped: false,
            host_checked: false,
        };
        let e = checked
            .entry(id)
            .or_insert_with(|| fresh(region.base, region.len));
        // Region ids can be reused after deregistration: start over if this is another region.
        if e.base != region.base || e.len != region.len {
            *e = fresh(region.base, region.len);
        }
        Ok(e)
    }

    fn check_device(&self, e: &mut Checked, addr: u64, len: u64) -> Result<(), CopyError> {
        let inside = |&(start, size): &(u64, u64)| addr >= start && addr + len <= start + size;
        if e.allocs.get(e.hint).is_some_and(inside) {
            return Ok(());
        }
        if let Some(i) = e.allocs.iter().position(inside) {
            e.hint = i;
            return Ok(());
        }
        // The first descriptor in an allocation we have not seen: ask the driver which
        // allocation holds it, and that it holds all of it. A region can span several
        // allocations (one per layer tensor); each is checked once.
        e.allocs.push(self.gpu.check_device_range(addr, len)?);
        e.hint = e.allocs.len() - 1;
        Ok(())
    }

    fn check_host(&self, e: &mut Checked) -> bool {
        if !e.host_checked {
            // Checked once per region: both ends pinned and mapped (cuMemHostAlloc or
            // cuMemHostRegister ranges are all-or-nothing).
            e.mapped = e.len > 0
                && self.gpu.is_mapped_host(e.base)
                && self.gpu.is_mapped_host(e.base + e.len - 1);
            e.host_checked = true;
        }
        e.mapped
    }

    fn auto_method(&self, lane: Lane, runs: &[Run], mapped: bool) -> CopyMethod {
        let total: u64 = runs.iter().map(|r| r.len).sum();
        let piece = total / runs.len().max(1) as u64;
        let onboard = lane == Lane::Onboard;
        let score = |p: &Pick| {
            let d = |a: u64, b: u64| (a.max(1) as f64).log2() - (b.max(1) as f64).log2();
            d(p.piece_bytes, piece).abs() + d(p.count, runs.len() as u64).abs()
        };
        self.picks()
            .iter()
            .filter(|p| p.onboard == onboard && (mapped || p.method != CopyMethod::Kernel))
            .min_by(|a, b| score(a).total_cmp(&score(b)))
            .map_or(CopyMethod::PerRun, |p| p.method)
    }

    /// Enqueues `runs` on the lane's stream and hands the completion to the lane's waiter. An
    /// error after some copies were enqueued still waits for those before reporting it, so the
    /// caller never reuses memory a copy is still touching.
    fn issue(
        &self,
        lane: Lane,
        method: CopyMethod,
        runs: &[Run],
        done: CopyCallback,
    ) -> Result<(), CopyError> {
        self.supports(method).map_err(CopyError::Failed)?;
        let io = &self.lanes[lane as usize];
        let total: u64 = runs.iter().map(|r| r.len).sum();
        if runs.is_empty() {
            done(Ok(0));
            return Ok(());
        }
        let mut st = io.state.lock();
        let mut keep = Vec::new();
        let outcome = self
            .enqueue(&io.stream, &mut st, method, runs, &mut keep)
            .map(|()| total);
        let event = match io.stream.record_event(None) {
            Ok(e) => Some(e),
            Err(e) => {
                // Without an event the only safe wait is for the whole stream.
                let synced = io.stream.synchronize();
                drop(st);
                done(Err(driver_error(
                    "cuEventRecord",
                    format!("{e}; stream sync: {synced:?}"),
                )));
                return Ok(());
            }
        };
        drop(st);
        let tx = io.tx.lock().clone().ok_or(CopyError::Shutdown)?;
        let pending = Pending {
            event,
            outcome,
            done,
            _keep: keep,
        };
        if let Err(crossbeam_channel::SendError(p)) = tx.send(pending) {
            if let Some(e) = &p.event {
                let _ = e.synchronize();
            }
            (p.done)(Err(CopyError::Shutdown));
        }
        Ok(())
    }

    fn enqueue(
        &self,
        stream: &CudaStream,
        st: &mut LaneState,
        method: CopyMethod,
        runs: &[Run],
        keep: &mut Vec<Box<dyn std::any::Any + Send>>,
    ) -> Result<(), CopyError> {
        self.gpu.bind()?;
        let cu = stream.cu_stream();
        match method {
            CopyMethod::PerRun => {
                for r in runs {
                    // SAFETY: both ranges were bounds-checked against registered regions (and
                    // device ranges against their allocations); the registrants vouch for them
                    // until completion.
                    unsafe { sys::cuMemcpyAsync(r.dst, r.src, r.len as usize, cu) }
                        .result()
                        .map_err(|e| driver_error("cuMemcpyAsync", e))?;
                }
                Ok(())
            }
            CopyMethod::Batch => {
                let f = self
                    .batch
                    .ok_or_else(|| CopyError::Failed("no batched copy".into()))?;
                let mut dsts: Vec<u64> = runs.iter().map(|r| r.dst).collect();
                let mut srcs: Vec<u64> = runs.iter().map(|r| r.src).collect();
                let mut sizes: Vec<usize> = runs.iter().map(|r| r.len as usize).collect();
                // One attribute entry per stretch of runs with the same pair of locations.
                let mut attrs: Vec<sys::CUmemcpyAttributes> = Vec::new();
                let mut idxs: Vec<usize> = Vec::new();
                let mut last = None;
                for (i, r) in runs.iter().enumerate() {
                    let class = (r.src_dev, r.dst_dev);
                    if last != Some(class) {
                        last = Some(class);
                        attrs.push(self.attr(r.src_dev, r.dst_dev));
                        idxs.push(i);
                    }
                }
                let mut fail = usize::MAX;
                // SAFETY: the arrays hold `runs.len()` entries each and `attrs.len()` attribute
                // entries, live across the call (and kept until completion below); the ranges
                // were checked as for PerRun.
                let r = unsafe {
                    match f {
                        BatchFn::V2(f) => f(
                            dsts.as_mut_ptr(),
                            srcs.as_mut_ptr(),
                            sizes.as_mut_ptr(),
                            runs.len(),
                            attrs.as_mut_ptr(),
                            idxs.as_mut_ptr(),
                            attrs.len(),
                            cu,
                        ),
                        BatchFn::V1(f) => f(
                            dsts.as_mut_ptr(),
                            srcs.as_mut_ptr(),
                            sizes.as_mut_ptr(),
                            runs.len(),
                            attrs.as_mut_ptr(),
                            idxs.as_mut_ptr(),
                            attrs.len(),
                            &mut fail,
                            cu,
                        ),
                    }
                };
                keep.push(Box::new((dsts, srcs, sizes, attrs, idxs)));
                r.result().map_err(|e| {
                    driver_error(
                        &format!(
                            "cuMemcpyBatchAsync ({} copies{})",
                            runs.len(),
                            if fail == usize::MAX {
                                String::new()
                            } else {
                                format!(", failed at {fail}")
                            }
                        ),
                        e,
                    )
                })
            }
            CopyMethod::Kernel => {
                let kernel = self
                    .kernel
                    .as_ref()
                    .map_err(|e| CopyError::Failed(e.clone()))?;
                let mut table: Vec<u64> = Vec::with_capacity(runs.len() * 3);
                for r in runs {
                    let mut off = 0;
                    while off < r.len {
                        let n = (r.len - off).min(PIECE);
                        table.extend_from_slice(&[r.src + off, r.dst + off, n]);
                        off += n;
                    }
                }
                let pieces = table.len() as u64 / 3;
                let bytes = table.len() as u64 * 8;
                if st.scratch.as_ref().is_none_or(|s| s.len() < bytes) {
                    // The old table may still be read by a running kernel: drain the stream
                    // before freeing it.
                    stream
                        .synchronize()
                        .map_err(|e| driver_error("cuStreamSynchronize", e))?;
                    st.scratch = None;
                    st.scratch = Some(self.gpu.alloc(bytes.next_power_of_two().max(1 << 16))?);
                }
                let scratch = st
                    .scratch
                    .as_ref()
                    .ok_or_else(|| CopyError::Failed("no kernel scratch".into()))?;
                // SAFETY: `table` is kept alive until the batch completes (pushed to `keep`), the
                // scratch buffer holds `bytes`, and stream order puts this upload after the
                // previous kernel's reads of the same scratch.
                unsafe {
                    sys::cuMemcpyHtoDAsync_v2(
                        scratch.ptr(),
                        table.as_ptr().cast(),
                        bytes as usize,
                        cu,
                    )
                }
                .result()
                .map_err(|e| driver_error("cuMemcpyHtoDAsync (piece table)", e))?;
                let at = scratch.ptr();
                keep.push(Box::new(table));
                // SAFETY: the piece table was uploaded above in stream order; every piece lies in
                // checked device memory or mapped pinned host memory (the caller checked
                // `mapped` before choosing the kernel).
                unsafe { kernel.launch(cu, at, pieces) }
            }
        }
    }

    fn attr(&self, src_dev: bool, dst_dev: bool) -> sys::CUmemcpyAttributes {
        let loc = |dev: bool| sys::CUmemLocation {
            type_: if dev {
                sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
            } else {
                sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST
            },
            id: if dev { self.gpu.ordinal() as i32 } else { 0 },
        };
        sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: loc(src_dev),
            dstLocHint: loc(dst_dev),
            flags: 0,
        }
    }

    /// Times every method on scratch memory for a grid of piece sizes and counts in each
    /// direction; the winners drive [`MethodChoice::Auto`].
    fn calibrate(&self) -> Result<Vec<Pick>, CopyError> {
        const SPAN: u64 = 64 << 20;
        let dev = self.gpu.alloc(SPAN)?;
        let host =
            super::pinned_pool(&self.gpu, SPAN, 1).map_err(|e| CopyError::Failed(e.to_string()))?;
        let mut picks = Vec::new();
        for onboard in [false, true] {
            for piece in [4u64 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20] {
                for count in [1u64, 8, 64, 512] {
                    // Every other piece, so runs stay scattered as in a real cache.
                    if piece * count * 2 > SPAN {
                        continue;
                    }
                    let runs: Vec<Run> = (0..count)
                        .map(|i| {
                            let (d, h) = (dev.ptr() + 2 * i * piece, host.base() + 2 * i * piece);
                            let (src, dst) = if onboard { (h, d) } else { (d, h) };
                            Run {
                                src,
                                dst,
                                len: piece,
                                src_dev: !onboard,
                                dst_dev: onboard,
                            }
                        })
                        .collect();
                    let lane = if onboard {
                        Lane::Onboard
                    } else {
                        Lane::Offload
                    };
                    let mut best: Option<(CopyMethod, f64)> = None;
                    for m in CopyMethod::ALL {
                        if self.supports(m).is_err() {
                            continue;
                        }
                        let t = self.time_runs(lane, m, &runs, 3)?;
                        let gbps = (piece * count) as f64 / t.as_secs_f64() / 1e9;
                        if best.is_none_or(|(_, g)| gbps > g) {
                            best = Some((m, gbps));
                        }
                    }
                    if let Some((method, gbps)) = best {
                        picks.push(Pick {
                            onboard,
                            piece_bytes: piece,
                            count,
                            method,
                            gbps,
                        });
                    }
                }
            }
        }
        Ok(picks)
    }

    /// Median wall time of `reps` runs of a batch (after one warm-up), submit to completion.
    fn time_runs(
        &self,
        lane: Lane,
        method: CopyMethod,
        runs: &[Run],
        reps: usize,
    ) -> Result<Duration, CopyError> {
        let mut times = Vec::with_capacity(reps);
        for i in 0..=reps {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let t0 = Instant::now();
            self.issue(
                lane,
                method,
                runs,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )?;
            rx.recv_timeout(Duration::from_secs(30))
                .map_err(|_| CopyError::Failed("calibration copy did not finish".into()))??;
            if i > 0 {
                times.push(t0.elapsed());
            }
        }
        times.sort();
        Ok(times[times.len() / 2])
    }
}

impl CopyEngine for CudaCopy {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn memory(&self) -> &MemoryRegistry {
        &self.memory
    }

    fn submit(&self, pairs: &[CopyPair], done: CopyCallback) -> Result<(), CopyError> {
        let (lane, runs, mapped) = self.resolve(pairs)?;
        let method = match self.choice {
            MethodChoice::Fixed(m) => m,
            MethodChoice::Auto => self.auto_method(lane, &runs, mapped),
        };
        // Pageable host memory: only plain DMA copies take it (the driver stages them).
        let method = if mapped { method } else { CopyMethod::PerRun };
        self.issue(lane, method, &runs, done)
    }
}

impl Drop for CudaCopy {
    fn drop(&mut self) {
        // Closing each queue lets its waiter finish what was submitted, then exit.
        for lane in &self.lanes {
            lane.tx.lock().take();
            if let Some(w) = lane.waiter.lock().take() {
                let _ = w.join();
            }
        }
    }
}
