//! The tier engine: offload (G1→G2), spill (G2→G3) under pressure, lookup, and onboard
//! (G3→G2→G1), with bounded queues and polled completions that carry a result per block.
//!
//! One driver thread owns every state change; copy engines and the NVMe store report back to it
//! through a channel. Callers talk to it with requests and read completions, events and counters.
//! Correctness rules: a block is visible to `lookup` only once its bytes are complete in a tier;
//! a block read from G3 reaches G1 only after its header and checksum verify; a slot with an
//! operation in flight is never evicted or reused.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver, Sender};
use kvcore::slot::{SlotHeader, SLOT_HEADER_LEN};
use kvcore::{
    BlockHash, CacheLayout, Geometry, LayerPlacement, MemKind, PlanBuilder, Region, RegionId,
    StrideOrder,
};
use parking_lot::{Condvar, Mutex};

use crate::admission::{Admission, AdmissionCounters, Gate, Verdict, WriteBudget};
use crate::copy::{CopyEngine, HostCopy};
use crate::cuda::{CudaCopy, CudaCopyConfig, Gpu};
use crate::error::{CopyError, TierError};
use crate::health::G3Health;
use crate::index::{BlockIndex, Entry, Tier};
use crate::memory::{plan_pairs, MemoryRegistry};
use crate::nvme::{IoDone, IoOp, IoRequest, NvmeConfig, NvmeStore, ScannedSlot, HEADER_PAGE};
use crate::policy::PolicyKind;
use crate::pool::{round_up, PinnedPool, ALIGN};

#[derive(Clone, Debug)]
pub struct TierConfig {
    pub geometry: Geometry,
    /// G2 capacity in blocks.
    pub dram_slots: u32,
    /// G3, if any.
    pub nvme: Option<NvmeConfig>,
    pub copy_threads: usize,
    /// Which blocks leaving G2 are written to G3.
    pub admission: Admission,
    /// At most this many bytes a second written to G3 when making room in G2 (`flush` is not
    /// limited): a write over it is dropped, not delayed.
    pub write_budget: Option<WriteBudget>,
    /// Which block each tier lets go when full.
    pub eviction: PolicyKind,
    /// Offload/onboard requests in flight before new ones get `TierError::Busy`.
    pub max_requests: usize,
    /// Spilling starts when fewer G2 slots than this are free.
    pub spill_free_slots: u32,
    /// Read and checksum every payload when recovering G3 (otherwise each is verified when read).
    pub verify_on_recover: bool,
    /// G1 is device memory of this CUDA device: the G2 pool is then CUDA pinned memory and
    /// blocks move with [`crate::cuda::CudaCopy`]; G1 caches register with
    /// [`TierEngine::register_g1_device`].
    pub gpu: Option<u32>,
    /// Byte order inside each G2/G3 block: `Blhnc` (head-major, what head slicing across TP
    /// sizes wants) or `Blnhc` (token-major, the order of vLLM's NHD caches on GPUs, so that
    /// offloading one is a few large copies per block instead of a transposition cell by cell).
    /// Part of the G3 format: files written with one order are not recovered with the other.
    pub block_order: StrideOrder,
    /// Who the blocks belong to (model and weights, dtypes, layout, block size, TP size and
    /// rank, PP rank, block-hash scheme): G3 then lives in a subdirectory of `nvme.dir` named
    /// for it, and it is folded into every slot's fingerprint, so a slot written under another
    /// identity is never recovered or read. Without it the directory is used as it is.
    pub namespace: Option<String>,
    /// Blocks leave the tiers only when the caller says so (`discard`, `clear`): a full tier
    /// refuses new blocks (`Full`) instead of evicting one. G2 copies of blocks G3 holds (or can
    /// take) still make room, since the block stays loadable. For callers that own eviction —
    /// a scheduler that promises loads from its own view of the tiers must not see a promised
    /// block vanish under it.
    pub caller_evicts: bool,
}

impl TierConfig {
    pub fn new(geometry: Geometry, dram_slots: u32) -> TierConfig {
        TierConfig {
            geometry,
            dram_slots,
            nvme: None,
            copy_threads: 2,
            admission: Admission::default(),
            write_budget: None,
            eviction: PolicyKind::default(),
            max_requests: 1024,
            spill_free_slots: (dram_slots / 8).max(1),
            verify_on_recover: false,
            gpu: None,
            block_order: StrideOrder::Blhnc,
            namespace: None,
            caller_evicts: false,
        }
    }
}

pub type RequestId = u64;

/// A registered G1 cache (the engine's own KV memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct G1Id(u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Offload,
    Onboard,
}

#[derive(Debug)]
pub struct BlockResult {
    pub hash: BlockHash,
    pub result: Result<(), TierError>,
}

#[derive(Debug)]
pub struct TierCompletion {
    pub id: RequestId,
    pub kind: RequestKind,
    pub blocks: Vec<BlockResult>,
}

impl TierCompletion {
    pub fn all_ok(&self) -> bool {
        self.blocks.iter().all(|b| b.result.is_ok())
    }
}

/// Answer to `lookup`: how many leading blocks are cached, and where each of them is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub hits: usize,
    pub tiers: Vec<Tier>,
}

/// For cache-aware routers: a block became available in, or left, a tier. And, for a caller
/// that owns eviction, `Unwanted`: G2 needs room and this block (on no other tier) is not worth
/// an NVMe write; it stays loadable until the caller discards it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierEvent {
    Stored { hash: BlockHash, tier: Tier },
    Removed { hash: BlockHash, tier: Tier },
    Unwanted { hash: BlockHash },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierCounters {
    /// Onboards served from this tier.
    pub hits: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub evictions: u64,
    pub errors: u64,
    /// Blocks resident now.
    pub blocks: u64,
    pub capacity: u64,
}

#[derive(Clone, Debug, Default)]
pub struct TierStats {
    pub dram: TierCounters,
    pub nvme: TierCounters,
    /// Onboard requests for blocks found in no tier.
    pub misses: u64,
    pub io_backend: String,
    pub direct_io: bool,
    pub pool_locked: bool,
    /// G3 slots recovered at start, and dropped (torn, stale, corrupt).
    pub recovered: u64,
    pub dropped: u64,
    /// Blocks leaving G2 written to G3, rejected by admission, dropped over the write budget.
    pub admission: AdmissionCounters,
    pub eviction: String,
    /// G3 is configured and in service (not taken out by errors or a stall).
    pub nvme_in_service: bool,
    /// Why G3 was taken out of service, once it was.
    pub nvme_out_of_service: Option<String>,
    /// G3 reads and writes that missed their deadline.
    pub nvme_timeouts: u64,
}

enum Event {
    Offload {
        id: RequestId,
        g1: G1Id,
        blocks: Vec<(BlockHash, u32)>,
        /// One per block, or none at all.
        notes: Vec<Vec<u8>>,
    },
    Onboard {
        id: RequestId,
        g1: G1Id,
        blocks: Vec<(BlockHash, u32)>,
    },
    Copied {
        op: u64,
        result: Result<u64, CopyError>,
    },
    Flush {
        reply: Sender<Result<usize, TierError>>,
    },
    Shutdown,
}

/// One block of a batched copy between G1 and G2.
struct Item {
    req: RequestId,
    hash: BlockHash,
    block: u32,
    slot: u32,
}

enum Op {
    /// G1→G2 copies of blocks whose slots are reserved but not yet visible.
    Offload {
        items: Vec<Item>,
    },
    /// G2→G3; `evict` frees the G2 copy once written (spills under pressure, not flushes).
    Spill {
        hash: BlockHash,
        g2: u32,
        g3: u64,
        evict: bool,
    },
    Read {
        hash: BlockHash,
        g2: u32,
        g3: u64,
    },
    /// G2→G1 copies of pinned blocks.
    Onboard {
        items: Vec<Item>,
    },
}

/// A block waiting for a free G2 slot.
enum Waiting {
    Offload {
        req: RequestId,
        g1: G1Id,
        hash: BlockHash,
        block: u32,
        note: Vec<u8>,
    },
    Read {
        hash: BlockHash,
    },
}

/// A flush waiting for its spills: who to answer, which ops are left, how many it started.
type FlushWait = (Sender<Result<usize, TierError>>, HashSet<u64>, usize);

struct Req {
    kind: RequestKind,
    pending: usize,
    results: Vec<BlockResult>,
}

struct State {
    index: BlockIndex,
    g1: Vec<(RegionId, CacheLayout)>,
    requests: HashMap<RequestId, Req>,
    ops: HashMap<u64, Op>,
    next_op: u64,
    waiting: VecDeque<Waiting>,
    /// Onboards waiting for a G3 read of their block already in flight.
    loading: HashMap<BlockHash, Vec<(RequestId, G1Id, u32)>>,
    g3_free: Vec<u64>,
    seq: u64,
    spills: usize,
    flushes: Vec<FlushWait>,
    events: Vec<TierEvent>,
    /// The notes of the blocks recovered from G3, until their owner takes them.
    recovered_notes: Vec<(BlockHash, Vec<u8>)>,
    stats: TierStats,
    shutting_down: bool,
    /// What every slot header written now carries and every read must match: the geometry,
    /// block order, namespace and epoch.
    fingerprint: u64,
    /// Bumped by [`TierEngine::clear`] (and persisted with G3): slots of an earlier epoch fail
    /// the fingerprint, in this process and after a restart.
    epoch: u64,
    /// Blocks [`TierEngine::clear`] found in use: dropped as soon as their operation ends, and
    /// never served meanwhile (their bytes are from before the clear).
    doomed: HashSet<BlockHash>,
    /// Blocks `discard` found in use: dropped when their operation ends, unless saved again
    /// meanwhile (their bytes are still right for their hash; the caller changed its mind).
    discarded: HashSet<BlockHash>,
    /// Offload requests numbered below this were made before the last `clear`: their blocks
    /// are not stored.
    cleared_below: RequestId,
    /// Admission to G3 and the write budget.
    gate: Gate,
    started: Instant,
    /// Blocks marked `unwanted` (caller-owned eviction) and not yet discarded: room that is
    /// coming, so no more are marked than the free-slot target needs.
    unwanted: HashSet<BlockHash>,
    /// What the driver decided under this lock and does after releasing it ([`Effect`]).
    deferred: Vec<Effect>,
    /// Deadlines of G3 operations, requests a full queue refused, whether G3 is in service.
    g3: G3Health,
    /// G3 operations past their deadline: failed to their callers, but the memory they name is
    /// the kernel's until the store reports them done (then it is freed, or unpinned).
    abandoned: HashMap<u64, Op>,
}

/// Work the driver does with the state lock released, so that lookups, saves and loads from
/// vLLM's step never wait behind it: starting copies (a small host copy runs right there),
/// checksumming a spill's payload for its slot header, and queueing NVMe I/O (which blocks
/// while the store's queue is full). Everything that makes the work safe is settled under the
/// lock before: the operation is registered in `ops`, its blocks pinned and its slots owned,
/// so nothing can free or reuse them until its completion is handled, under the lock again.
enum Effect {
    Copy {
        op: u64,
        to_g1: bool,
        pairs: Vec<crate::memory::CopyPair>,
    },
    Spill {
        op: u64,
        hash: BlockHash,
        g2: u32,
        g3: u64,
        fingerprint: u64,
        seq: u64,
    },
    /// Queue a read (or a refused request again).
    Io { req: IoRequest },
}

/// An effect that could not be started, handled under the lock again.
enum Failed {
    Copy {
        op: u64,
        to_g1: bool,
        why: String,
    },
    Io(IoDone),
    /// The store's queue is full: kept, and queued again when an operation completes.
    Busy(IoRequest),
}

struct Inner {
    // Field order is drop order: the store's I/O threads and the copy workers finish before the
    // pool's memory goes away.
    store: Option<NvmeStore>,
    copy: Box<dyn CopyEngine>,
    gpu: Option<Gpu>,
    pool: PinnedPool,
    pool_region: RegionId,
    pool_layout: CacheLayout,
    geometry: Geometry,
    /// The fingerprint without the namespace and the epoch.
    base_fingerprint: u64,
    /// The G3 directory actually used (the namespace's), when G3 is configured.
    store_dir: Option<std::path::PathBuf>,
    cfg: TierConfig,
    state: Mutex<State>,
    done: Mutex<VecDeque<TierCompletion>>,
    done_cv: Condvar,
    tx: Sender<Event>,
    next_req: AtomicU64,
}

pub struct TierEngine {
    inner: Arc<Inner>,
    driver: Option<JoinHandle<bool>>,
}

impl TierEngine {
    /// Builds the pool, opens (and recovers) the NVMe store if configured, starts the driver.
    pub fn new(cfg: TierConfig) -> Result<TierEngine, TierError> {
        if cfg.write_budget.is_some_and(|b| b.bytes_per_sec == 0) {
            return Err(TierError::Config(
                "write_budget: bytes_per_sec must be at least 1".into(),
            ));
        }
        let geometry = cfg
            .geometry
            .validated()
            .map_err(kvcore::LayoutError::from)?;
        if cfg.dram_slots == 0 {
            return Err(TierError::Config("dram_slots must be positive".into()));
        }
        let payload = geometry.block_bytes();
        let slot_bytes = HEADER_PAGE + round_up(payload, ALIGN as u64);
        let gpu = cfg.gpu.map(Gpu::open).transpose()?;
        let pool = match &gpu {
            Some(g) => crate::cuda::pinned_pool(g, slot_bytes, cfg.dram_slots)?,
            None => PinnedPool::new(slot_bytes, cfg.dram_slots)?,
        };
        let memory = MemoryRegistry::new();
        // SAFETY: the pool lives in `Inner` and is dropped after the copy engine and the store,
        // so no copy or I/O outlives it.
        let pool_region = unsafe { memory.register(pool.region()) }?;
        // Each slot: a header page, then the block in kvferry's block-packed order.
        let cell = geometry.cell_bytes();
        let (head_stride, token_stride) = match cfg.block_order {
            StrideOrder::Blhnc => (u64::from(geometry.block_tokens) * cell, cell),
            StrideOrder::Blnhc => (cell, u64::from(geometry.kv_heads) * cell),
            other => {
                return Err(TierError::Config(format!(
                    "block_order {other}: G2/G3 blocks are BLHNC or BLNHC"
                )))
            }
        };
        let pool_layout = CacheLayout::from_strides(
            geometry,
            cfg.dram_slots,
            LayerPlacement::Strided {
                first: HEADER_PAGE,
                stride: geometry.layer_block_bytes(),
            },
            slot_bytes,
            head_stride,
            token_stride,
        )?;
        let (io_tx, io_rx) = unbounded::<IoDone>();
        let nvme = match (&cfg.nvme, &cfg.namespace) {
            (Some(n), Some(ns)) => Some(NvmeConfig {
                dir: crate::namespace::dir_for(&n.dir, ns)?,
                ..n.clone()
            }),
            (n, _) => n.clone(),
        };
        let store = match &nvme {
            Some(n) => Some(NvmeStore::open(n, slot_bytes, Some(&pool), io_tx)?),
            None => None,
        };
        let store_dir = nvme.as_ref().map(|n| n.dir.clone());
        // Read under the store's lock: no other process changes it meanwhile.
        let epoch = match &store_dir {
            Some(d) => crate::namespace::read_epoch(d)?,
            None => 0,
        };
        let copy: Box<dyn CopyEngine> = match &gpu {
            Some(g) => Box::new(CudaCopy::new(g, memory, CudaCopyConfig::default())?),
            None => Box::new(HostCopy::new(memory, cfg.copy_threads)),
        };
        let (tx, rx) = unbounded();
        let mut stats = TierStats {
            pool_locked: pool.is_locked(),
            eviction: cfg.eviction.to_string(),
            ..TierStats::default()
        };
        stats.dram.capacity = u64::from(cfg.dram_slots);
        if let Some(s) = &store {
            stats.io_backend = s.backend().to_string();
            stats.direct_io = s.is_direct();
            stats.nvme.capacity = s.slots();
        }
        let g3_blocks = store.as_ref().map_or(0, NvmeStore::slots);
        let mut state = State {
            index: BlockIndex::with_policy(cfg.eviction, u64::from(cfg.dram_slots), g3_blocks),
            g1: Vec::new(),
            requests: HashMap::new(),
            ops: HashMap::new(),
            next_op: 0,
            waiting: VecDeque::new(),
            loading: HashMap::new(),
            g3_free: Vec::new(),
            seq: 1,
            spills: 0,
            flushes: Vec::new(),
            events: Vec::new(),
            recovered_notes: Vec::new(),
            stats,
            shutting_down: false,
            fingerprint: 0,
            epoch,
            doomed: HashSet::new(),
            discarded: HashSet::new(),
            cleared_below: 0,
            gate: Gate::new(
                cfg.admission,
                cfg.write_budget,
                g3_blocks,
                geometry.block_bytes(),
            ),
            started: Instant::now(),
            unwanted: HashSet::new(),
            deferred: Vec::new(),
            g3: {
                let d = NvmeConfig::new("", 1);
                let n = cfg.nvme.as_ref().unwrap_or(&d);
                G3Health::new(n.timeout, n.fail_limit)
            },
            abandoned: HashMap::new(),
        };
        // The default order keeps the fingerprint of files written before the order was a
        // choice; another order changes it, so recovery never reads blocks in the wrong order.
        let base_fingerprint = match cfg.block_order {
            StrideOrder::Blhnc => geometry.fingerprint(),
            o => geometry.fingerprint() ^ (u64::from(o.code()) << 56) ^ 0x9e37_79b9_7f4a_7c15,
        };
        let fingerprint =
            crate::namespace::fingerprint(base_fingerprint, cfg.namespace.as_deref(), epoch);
        state.fingerprint = fingerprint;
        if let Some(s) = &store {
            recover(s, &mut state, fingerprint, payload, cfg.verify_on_recover)?;
        }
        let inner = Arc::new(Inner {
            store,
            copy,
            gpu,
            pool,
            pool_region,
            pool_layout,
            geometry,
            base_fingerprint,
            store_dir,
            cfg,
            state: Mutex::new(state),
            done: Mutex::new(VecDeque::new()),
            done_cv: Condvar::new(),
            tx,
            next_req: AtomicU64::new(1),
        });
        let d = inner.clone();
        let driver = std::thread::Builder::new()
            .name("kvferry-tier".into())
            .spawn(move || drive(&d, rx, io_rx))
            .map_err(|e| TierError::Config(format!("cannot start the tier driver: {e}")))?;
        Ok(TierEngine {
            inner,
            driver: Some(driver),
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.inner.geometry
    }

    /// Registers the engine's KV cache (G1) so blocks can be copied out of and into it.
    ///
    /// # Safety
    /// `base..base + layout.span_bytes()` must be valid host memory until the tier engine is
    /// dropped; the caller must not write a block while an offload of it runs, nor touch a block
    /// while an onboard into it runs (both end at their completion).
    pub unsafe fn register_g1(
        &self,
        layout: CacheLayout,
        base: *mut u8,
    ) -> Result<G1Id, TierError> {
        if self.inner.gpu.is_some() {
            return Err(TierError::Config(
                "this tier engine's G1 is device memory: use register_g1_device".into(),
            ));
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { self.add_g1(layout, MemKind::Host, base as u64) }
    }

    /// Registers a G1 cache in device memory (the engine's KV cache tensors on the GPU named in
    /// [`TierConfig::gpu`]). Each layer's extent is checked to lie inside one device allocation,
    /// so a wrong pointer or geometry is refused here, not discovered as a fault in a copy.
    ///
    /// # Safety
    /// The device memory must stay allocated until the tier engine is dropped; the caller must
    /// not write a block while an offload of it runs, nor touch a block while an onboard into it
    /// runs (both end at their completion).
    pub unsafe fn register_g1_device(
        &self,
        layout: CacheLayout,
        device_ptr: u64,
    ) -> Result<G1Id, TierError> {
        let gpu = self.inner.gpu.as_ref().ok_or_else(|| {
            TierError::Config("this tier engine has no GPU (TierConfig::gpu is None)".into())
        })?;
        gpu.check_cache(&layout, device_ptr)?;
        let kind = MemKind::Device {
            ordinal: gpu.ordinal(),
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { self.add_g1(layout, kind, device_ptr) }
    }

    /// # Safety
    /// As for [`TierEngine::register_g1`], for memory of `kind`.
    unsafe fn add_g1(
        &self,
        layout: CacheLayout,
        kind: MemKind,
        base: u64,
    ) -> Result<G1Id, TierError> {
        layout
            .geometry()
            .check_same(&self.inner.geometry)
            .map_err(kvcore::LayoutError::from)?;
        let region = Region {
            kind,
            base,
            len: layout.span_bytes(),
        };
        // SAFETY: forwarded from this function's contract.
        let id = unsafe { self.inner.copy.memory().register(region) }?;
        let mut st = self.inner.state.lock();
        st.g1.push((id, layout));
        Ok(G1Id(st.g1.len() as u32 - 1))
    }

    fn start(
        &self,
        kind: RequestKind,
        g1: G1Id,
        blocks: &[(BlockHash, u32)],
        notes: Vec<Vec<u8>>,
    ) -> Result<RequestId, TierError> {
        if !notes.is_empty() && notes.len() != blocks.len() {
            return Err(TierError::Config(format!(
                "{} notes for {} blocks",
                notes.len(),
                blocks.len()
            )));
        }
        {
            let st = self.inner.state.lock();
            let (_, layout) = st
                .g1
                .get(g1.0 as usize)
                .ok_or_else(|| TierError::Config(format!("G1 cache {} is not registered", g1.0)))?;
            if let Some(&(_, b)) = blocks.iter().find(|(_, b)| *b >= layout.num_blocks()) {
                return Err(kvcore::PlanError::BlockOutOfRange {
                    side: "G1",
                    id: b,
                    num_blocks: layout.num_blocks(),
                }
                .into());
            }
            if st.shutting_down {
                return Err(TierError::Shutdown);
            }
            if st.requests.len() >= self.inner.cfg.max_requests {
                return Err(TierError::Busy(st.requests.len()));
            }
        }
        let id = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        let blocks = blocks.to_vec();
        let ev = match kind {
            RequestKind::Offload => Event::Offload {
                id,
                g1,
                blocks,
                notes,
            },
            RequestKind::Onboard => Event::Onboard { id, g1, blocks },
        };
        // Registered before the driver sees the event, so `Busy` accounting is exact.
        self.inner.state.lock().requests.insert(
            id,
            Req {
                kind,
                pending: usize::MAX,
                results: Vec::new(),
            },
        );
        self.inner.tx.send(ev).map_err(|_| TierError::Shutdown)?;
        Ok(id)
    }

    /// Copies blocks `(hash, G1 block id)` from G1 into G2. Blocks already cached complete at
    /// once; G2 spills to G3 as it fills.
    pub fn offload(&self, g1: G1Id, blocks: &[(BlockHash, u32)]) -> Result<RequestId, TierError> {
        self.start(RequestKind::Offload, g1, blocks, Vec::new())
    }

    /// [`TierEngine::offload`], with a note per block (or none: empty) that the tiers keep with
    /// the block — in its slot's header page, written to G3 with it — and hand back when they
    /// recover the block after a restart ([`TierEngine::take_recovered_notes`]). A note longer
    /// than `kvcore::slot::max_note_len` of a 4 KiB page is not kept. A block already cached
    /// keeps the note it has.
    pub fn offload_noted(
        &self,
        g1: G1Id,
        blocks: &[(BlockHash, u32)],
        notes: Vec<Vec<u8>>,
    ) -> Result<RequestId, TierError> {
        self.start(RequestKind::Offload, g1, blocks, notes)
    }

    /// Copies cached blocks into G1 blocks, reading G3 through G2 where needed. Each block's
    /// result says whether its bytes landed, verified; any error means: recompute it.
    pub fn onboard(&self, g1: G1Id, blocks: &[(BlockHash, u32)]) -> Result<RequestId, TierError> {
        self.start(RequestKind::Onboard, g1, blocks, Vec::new())
    }

    /// How many leading blocks of `hashes` are cached, and in which tier.
    pub fn lookup(&self, hashes: &[BlockHash]) -> Lookup {
        let st = self.inner.state.lock();
        // A block a clear or discard doomed is gone already, even while its last operation
        // runs.
        let tiers: Vec<Tier> = hashes
            .iter()
            .map_while(|h| {
                if st.doomed.contains(h) || st.discarded.contains(h) {
                    None
                } else {
                    // A G3 out of service serves nothing (its blocks go as their operations end).
                    st.index
                        .tier_of(h)
                        .filter(|t| *t != Tier::Nvme || st.g3.in_service())
                }
            })
            .collect();
        Lookup {
            hits: tiers.len(),
            tiers,
        }
    }

    /// Completed requests, oldest first.
    pub fn poll(&self) -> Vec<TierCompletion> {
        self.inner.done.lock().drain(..).collect()
    }

    /// Waits for one request; other completions stay queued for `poll`.
    pub fn wait(&self, id: RequestId, timeout: Duration) -> Option<TierCompletion> {
        let start = Instant::now();
        let deadline = start + timeout;
        // A small request completes within tens of microseconds, about what waking a sleeping
        // thread costs: look again, yielding the core, for a short while before sleeping.
        let spin_until = start + Duration::from_micros(100).min(timeout);
        while Instant::now() < spin_until {
            {
                let mut done = self.inner.done.lock();
                if let Some(pos) = done.iter().position(|c| c.id == id) {
                    return done.remove(pos);
                }
            }
            std::thread::yield_now();
        }
        let mut done = self.inner.done.lock();
        loop {
            if let Some(pos) = done.iter().position(|c| c.id == id) {
                return done.remove(pos);
            }
            if self
                .inner
                .done_cv
                .wait_until(&mut done, deadline)
                .timed_out()
            {
                return done
                    .iter()
                    .position(|c| c.id == id)
                    .and_then(|p| done.remove(p));
            }
        }
    }

    /// Writes every G2 block not yet on G3 to G3 (admission bypassed) and waits; returns how many
    /// were written.
    pub fn flush(&self, timeout: Duration) -> Result<usize, TierError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.inner
            .tx
            .send(Event::Flush { reply: tx })
            .map_err(|_| TierError::Shutdown)?;
        rx.recv_timeout(timeout)
            .map_err(|_| TierError::Config(format!("flush did not finish within {timeout:?}")))?
    }

    /// Stored/removed events since the last call.
    /// Drops blocks from every tier, for callers that own eviction themselves (vLLM's offloading
    /// manager decides what stays). A block being read or written goes as soon as that ends;
    /// returns how many were dropped at once. Freed G3 slots keep their bytes until reused: a restart may recover such a
    /// block, which is still the right data for its hash.
    pub fn discard(&self, hashes: &[BlockHash]) -> usize {
        let mut st = self.inner.state.lock();
        let st = &mut *st;
        let mut dropped = 0;
        for h in hashes {
            if drop_entry(&self.inner, st, h) {
                dropped += 1;
            } else {
                // In use: it goes when its operation ends, so a caller that owns eviction
                // never leaks the slot.
                st.discarded.insert(*h);
            }
        }
        dropped
    }

    /// Empties every tier for good (a reset after new weights, say): blocks not in use are
    /// dropped now, blocks with an operation in flight as soon as it ends, and the epoch is
    /// bumped — persisted next to G3 before anything is dropped — so no slot written before this
    /// call is ever read again, in this process or after a restart. Returns how many blocks were
    /// dropped now.
    pub fn clear(&self) -> Result<usize, TierError> {
        let mut st = self.inner.state.lock();
        let st = &mut *st;
        let epoch = st.epoch + 1;
        if let Some(d) = &self.inner.store_dir {
            crate::namespace::write_epoch(d, epoch)?;
        }
        st.epoch = epoch;
        // Offloads queued to the driver but not yet started copied G1 before the reset.
        st.cleared_below = self.inner.next_req.load(Ordering::SeqCst);
        st.fingerprint = crate::namespace::fingerprint(
            self.inner.base_fingerprint,
            self.inner.cfg.namespace.as_deref(),
            epoch,
        );
        let mut hashes: Vec<BlockHash> = st.index.resident().into_iter().map(|r| r.0).collect();
        hashes.extend(st.index.pinned());
        hashes.sort_unstable();
        hashes.dedup();
        let mut dropped = 0;
        for h in hashes {
            if drop_entry(&self.inner, st, &h) {
                dropped += 1;
            } else {
                st.doomed.insert(h);
            }
        }
        Ok(dropped)
    }

    /// A `Stored` event for every block the tiers hold now: what a subscriber that starts late
    /// (a scheduler after a restart that recovered G3) needs before the incremental events.
    pub fn snapshot(&self) -> Vec<TierEvent> {
        self.inner
            .state
            .lock()
            .index
            .resident()
            .into_iter()
            .map(|(hash, tier)| TierEvent::Stored { hash, tier })
            .collect()
    }

    /// The notes ([`TierEngine::offload_noted`]) of the blocks recovered from G3 when the
    /// engine started, once: `(hash, note)` for those that had one, whole.
    pub fn take_recovered_notes(&self) -> Vec<(BlockHash, Vec<u8>)> {
        std::mem::take(&mut self.inner.state.lock().recovered_notes)
    }

    pub fn events(&self) -> Vec<TierEvent> {
        std::mem::take(&mut self.inner.state.lock().events)
    }

    pub fn stats(&self) -> TierStats {
        let st = self.inner.state.lock();
        let mut s = st.stats.clone();
        s.admission = st.gate.counters;
        s.dram.blocks = st.index.g2_len() as u64;
        s.nvme.blocks = st.index.g3_len() as u64;
        s.nvme_in_service = self.inner.store.is_some() && st.g3.in_service();
        s.nvme_out_of_service = st.g3.out_of_service().map(str::to_string);
        s.nvme_timeouts = st.g3.timeouts;
        s
    }

    /// Index invariants, for tests.
    pub fn check_consistent(&self) -> Result<(), String> {
        let st = self.inner.state.lock();
        st.index.check_consistent()?;
        let used = st.index.g2_len()
            + st.ops
                .values()
                .filter(|o| matches!(o, Op::Offload { .. } | Op::Read { .. }))
                .count();
        let free = self.inner.pool.free_slots() as usize;
        if st.ops.is_empty() && used + free != self.inner.pool.slots() as usize {
            return Err(format!(
                "G2 accounting: {used} used + {free} free != {} slots",
                self.inner.pool.slots()
            ));
        }
        Ok(())
    }
}

impl Drop for TierEngine {
    fn drop(&mut self) {
        let _ = self.inner.tx.send(Event::Shutdown);
        if let Some(d) = self.driver.take() {
            // The driver answers whether copies or I/O may still be in flight (a stalled disk,
            // a copy that never ended): their memory is the pool's, which must then outlive
            // them. It is leaked (with the store, whose threads may be blocked in the kernel),
            // rather than freed under the kernel or a copy engine.
            if d.join().unwrap_or(true) {
                log::error!(
                    "kvferry: tier engine shut down with I/O or copies still in flight; \
                     leaking its DRAM pool and store rather than freeing memory they may touch"
                );
                std::mem::forget(self.inner.clone());
            }
        }
    }
}

fn recover(
    store: &NvmeStore,
    st: &mut State,
    fingerprint: u64,
    payload: u64,
    verify: bool,
) -> Result<(), TierError> {
    let mut best: HashMap<BlockHash, (u64, SlotHeader, Option<Vec<u8>>)> = HashMap::new();
    let mut free = Vec::new();
    let scratch = if verify {
        Some(PinnedPool::new(store.slot_bytes(), 1)?)
    } else {
        None
    };
    for ScannedSlot { slot, header, note } in store.scan()? {
        let h = match header {
            Ok(h) if h.geometry == fingerprint && h.payload_len == payload => h,
            Ok(_) => {
                st.stats.dropped += 1;
                free.push(slot);
                continue;
            }
            Err(kvcore::SlotError::Empty) => {
                free.push(slot);
                continue;
            }
            Err(e) => {
                log::warn!("kvferry: dropping G3 slot {slot}: {e}");
                st.stats.dropped += 1;
                free.push(slot);
                continue;
            }
        };
        if let Some(s) = &scratch {
            store.read_slot(slot, s)?;
            // SAFETY: the scratch pool is private to this function.
            let bytes = unsafe { s.slot(0) };
            let body = &bytes[HEADER_PAGE as usize..(HEADER_PAGE + payload) as usize];
            if let Err(e) = h.verify(&h.hash, fingerprint, body) {
                log::warn!("kvferry: dropping G3 slot {slot}: {e}");
                st.stats.dropped += 1;
                free.push(slot);
                continue;
            }
        }
        // Two slots claiming one block: the later write wins, the other is stale.
        let stale = match best.get(&h.hash) {
            Some((_, older, _)) if older.seq >= h.seq => slot,
            _ => match best.insert(h.hash, (slot, h, note)) {
                Some((other, _, _)) => other,
                None => continue,
            },
        };
        st.stats.dropped += 1;
        free.push(stale);
    }
    let mut found: Vec<_> = best.into_values().collect();
    found.sort_by_key(|(_, h, _)| h.seq);
    for (slot, h, note) in found {
        if let Some(note) = note {
            st.recovered_notes.push((h.hash, note));
        }
        st.seq = st.seq.max(h.seq + 1);
        // Where it sat in its chain is not recorded: recovered blocks count as heads.
        st.index.pin_new(h.hash, 0);
        st.index.set_g3(&h.hash, Some(slot));
        st.index.unpin(&h.hash);
        st.stats.recovered += 1;
    }
    free.reverse();
    st.g3_free = free;
    Ok(())
}

/// The driver thread; returns whether copies or I/O may still be in flight when it ends.
fn drive(inner: &Inner, rx: Receiver<Event>, mut io_rx: Receiver<IoDone>) -> bool {
    let mut shutdown_at: Option<Instant> = None;
    loop {
        let ev = select! {
            recv(rx) -> e => e.ok(),
            recv(io_rx) -> d => {
                match d {
                    Ok(d) => {
                        let mut st = inner.state.lock();
                        on_io(inner, &mut st, d);
                        // Room in the store's queue: what it refused goes again.
                        retry_refused(&mut st);
                        check_deadlines(inner, &mut st);
                        reap_doomed(inner, &mut st);
                        after_change(inner, &mut st);
                        drop(run_deferred(inner, st));
                    }
                    // No store (or it is gone): a closed channel would wake us forever.
                    Err(_) => io_rx = crossbeam_channel::never(),
                }
                continue;
            },
            default(Duration::from_millis(100)) => None,
        };
        let mut st = inner.state.lock();
        match ev {
            Some(Event::Offload {
                id,
                g1,
                blocks,
                notes,
            }) => start_offload(inner, &mut st, id, g1, blocks, notes),
            Some(Event::Onboard { id, g1, blocks }) => {
                start_onboard(inner, &mut st, id, g1, blocks)
            }
            Some(Event::Copied { op, result }) => on_copied(inner, &mut st, op, result),
            Some(Event::Flush { reply }) => start_flush(inner, &mut st, reply),
            Some(Event::Shutdown) => {
                st.shutting_down = true;
                shutdown_at.get_or_insert_with(Instant::now);
            }
            None => retry_refused(&mut st),
        }
        check_deadlines(inner, &mut st);
        reap_doomed(inner, &mut st);
        after_change(inner, &mut st);
        let st = run_deferred(inner, st);
        if let Some(t) = shutdown_at {
            // Let in-flight copies and I/O finish: they point into memory about to be freed.
            // G3 operations end within their deadline (or are abandoned, still in flight).
            if st.ops.is_empty() {
                return !st.abandoned.is_empty();
            }
            if t.elapsed() > Duration::from_secs(30) {
                return true;
            }
        }
    }
}

/// Does what the driver deferred ([`Effect`]) with the lock released, then handles what could
/// not be started under it again (which may defer more); returns holding the lock.
fn run_deferred<'a>(
    inner: &'a Inner,
    mut st: parking_lot::MutexGuard<'a, State>,
) -> parking_lot::MutexGuard<'a, State> {
    loop {
        let effects = std::mem::take(&mut st.deferred);
        if effects.is_empty() {
            return st;
        }
        drop(st);
        let failed: Vec<Failed> = effects
            .into_iter()
            .filter_map(|e| execute(inner, e))
            .collect();
        st = inner.state.lock();
        if failed.is_empty() {
            continue;
        }
        for f in failed {
            match f {
                Failed::Copy { op, to_g1, why } => {
                    if let Some(Op::Offload { items } | Op::Onboard { items }) = st.ops.remove(&op)
                    {
                        fail_items(inner, &mut st, to_g1, items, &why);
                    }
                }
                Failed::Io(d) => on_io(inner, &mut st, d),
                Failed::Busy(req) => st.g3.defer(req),
            }
        }
        reap_doomed(inner, &mut st);
        after_change(inner, &mut st);
    }
}

/// One deferred effect, without the state lock; what failed to start.
fn execute(inner: &Inner, e: Effect) -> Option<Failed> {
    match e {
        Effect::Copy { op, to_g1, pairs } => {
            submit_copy(inner, op, &pairs).err().map(|e| Failed::Copy {
                op,
                to_g1,
                why: e.to_string(),
            })
        }
        Effect::Spill {
            op,
            hash,
            g2,
            g3,
            fingerprint,
            seq,
        } => {
            let store = inner.store.as_ref()?;
            let payload = inner.geometry.block_bytes() as usize;
            let base = inner.pool.slot_ptr(g2);
            // SAFETY: the slot is pinned for this spill (`spill`), so no operation writes it or
            // frees it until the write's completion is handled; other readers (an onboard of the
            // same block) read the payload only, which is read here too, and the header bytes
            // written here are disjoint from it (the payload starts at HEADER_PAGE).
            unsafe {
                let body = std::slice::from_raw_parts(
                    base.add(HEADER_PAGE as usize) as *const u8,
                    payload,
                );
                let h = SlotHeader::new(hash, fingerprint, body, seq);
                std::slice::from_raw_parts_mut(base, SLOT_HEADER_LEN).copy_from_slice(&h.encode());
            }
            let req = IoRequest {
                op: IoOp::Write,
                slot: g3,
                buf: base as u64,
                tag: op,
            };
            queue_io(store, req)
        }
        Effect::Io { req } => queue_io(inner.store.as_ref()?, req),
    }
}

/// Queues one G3 operation without waiting; a full queue gives it back to be kept.
fn queue_io(store: &NvmeStore, req: IoRequest) -> Option<Failed> {
    // SAFETY: `req.buf` is a slot of the pool, aligned, whose operation (registered in `ops`)
    // owns it: a spill's slot is pinned, a read's was allocated for it alone; neither is freed
    // or reused until its IoDone is handled (or, abandoned past its deadline, until the store
    // reports it done all the same), and the pool outlives the store.
    match unsafe { store.try_submit(req) } {
        Ok(None) => None,
        Ok(Some(req)) => Some(Failed::Busy(req)),
        Err(e) => Some(Failed::Io(IoDone {
            tag: req.tag,
            op: req.op,
            slot: req.slot,
            result: Err(e),
        })),
    }
}

/// Requests the store's queue refused, queued again (reads first); at most a few at a time,
/// since each completion frees one place.
fn retry_refused(st: &mut State) {
    for req in st.g3.retry(8) {
        st.deferred.push(Effect::Io { req });
    }
}

/// G3 operations past their deadline: one that never reached the disk fails as it would have;
/// one the disk holds is failed to its callers and abandoned (its memory stays the kernel's).
/// Either takes G3 out of service: a disk that stalls once will again.
fn check_deadlines(inner: &Inner, st: &mut State) {
    if inner.store.is_none() {
        return;
    }
    let late = st.g3.expired(Instant::now());
    if late.is_empty() {
        return;
    }
    let after = st.g3.timeout();
    let mut what = "";
    for op in late {
        let name = match st.ops.get(&op) {
            Some(Op::Read { .. }) => "read",
            Some(Op::Spill { .. }) => "write",
            _ => continue,
        };
        what = name;
        if let Some(req) = st.g3.unqueue(op) {
            let result = Err(TierError::Timeout {
                op: name,
                slot: req.slot,
                after,
            });
            on_io(
                inner,
                st,
                IoDone {
                    tag: op,
                    op: req.op,
                    slot: req.slot,
                    result,
                },
            );
        } else {
            abandon(inner, st, op, after);
        }
    }
    if !what.is_empty() {
        take_g3_out(
            inner,
            st,
            format!("a G3 {what} did not finish within {after:?}"),
        );
    }
}

/// Fails operation `op` (in the disk's hands past its deadline) to its callers and keeps what
/// it names until the store reports it done ([`finish_abandoned`]).
fn abandon(inner: &Inner, st: &mut State, op: u64, after: Duration) {
    let Some(o) = st.ops.remove(&op) else { return };
    st.stats.nvme.errors += 1;
    match &o {
        Op::Read { hash, g3, .. } => {
            let hash = *hash;
            let waiters = st.loading.remove(&hash).unwrap_or_default();
            st.index.unpin(&hash);
            drop_g3_copy(st, &hash);
            for (req, _, _) in waiters {
                let e = TierError::Timeout {
                    op: "read",
                    slot: *g3,
                    after,
                };
                finish_block(inner, st, req, hash, Err(e));
            }
        }
        Op::Spill { .. } => {
            // Still in flight, but no longer room on its way, and no flush waits for it.
            st.spills -= 1;
            flush_op_done(st, op);
        }
        _ => {}
    }
    st.abandoned.insert(op, o);
}

/// The store reported an abandoned operation done: what it held is free now.
fn finish_abandoned(inner: &Inner, st: &mut State, o: Op) {
    match o {
        // Its slot was never made visible: the read's result is not used.
        Op::Read { g2, .. } => inner.pool.free(g2),
        // The G2 copy stays (the block is loadable from there); the G3 slot is not reused.
        Op::Spill { hash, .. } => {
            st.index.unpin(&hash);
            if !st.g3.in_service() {
                drop_g3_copy(st, &hash);
            }
        }
        _ => {}
    }
}

/// Forgets block `hash`'s G3 copy, when no operation uses the block.
fn drop_g3_copy(st: &mut State, hash: &BlockHash) {
    if st
        .index
        .get(hash)
        .is_some_and(|e| e.refs == 0 && e.g3.is_some())
    {
        st.index.set_g3(hash, None);
        st.events.push(TierEvent::Removed {
            hash: *hash,
            tier: Tier::Nvme,
        });
    }
}

/// Takes G3 out of service (once, with a log line): refused requests fail (they never reached
/// the disk), blocks only G3 holds are forgotten, and nothing new goes to G3. Operations the disk
/// holds end as they end, or at their deadline.
fn take_g3_out(inner: &Inner, st: &mut State, why: String) {
    if !st.g3.take_out(why.clone()) {
        return;
    }
    let dir = inner
        .store_dir
        .as_ref()
        .map_or_else(String::new, |d| d.display().to_string());
    log::error!(
        "kvferry: G3 ({dir}) taken out of service: {why}; serving from DRAM and recompute until restart"
    );
    for req in st.g3.drain_backlog() {
        let result = Err(TierError::OutOfService(why.clone()));
        on_io(
            inner,
            st,
            IoDone {
                tag: req.tag,
                op: req.op,
                slot: req.slot,
                result,
            },
        );
    }
    for (h, tier) in st.index.resident() {
        if tier == Tier::Nvme {
            drop_g3_copy(st, &h);
        }
    }
}

/// G3 is configured and in service.
fn g3_up(inner: &Inner, st: &State) -> bool {
    inner.store.is_some() && st.g3.in_service()
}

/// Drops an unpinned block from every tier; `false` (and nothing changed) when it is in use.
fn drop_entry(inner: &Inner, st: &mut State, h: &BlockHash) -> bool {
    let Some(e) = st.index.get(h).copied() else {
        return true;
    };
    if e.refs > 0 {
        return false;
    }
    st.unwanted.remove(h);
    if let Some(slot) = e.g2 {
        st.index.set_g2(h, None);
        inner.pool.free(slot);
        st.events.push(TierEvent::Removed {
            hash: *h,
            tier: Tier::Dram,
        });
    }
    if let Some(slot) = e.g3 {
        st.index.set_g3(h, None);
        st.g3_free.push(slot);
        st.events.push(TierEvent::Removed {
            hash: *h,
            tier: Tier::Nvme,
        });
    }
    true
}

/// Blocks a `clear` found in use go once their operations ended.
fn reap_doomed(inner: &Inner, st: &mut State) {
    if st.doomed.is_empty() && st.discarded.is_empty() {
        return;
    }
    let sets: [fn(&mut State) -> &mut HashSet<BlockHash>; 2] =
        [|st| &mut st.doomed, |st| &mut st.discarded];
    for set in sets {
        let hashes: Vec<BlockHash> = set(st).iter().copied().collect();
        for h in hashes {
            if drop_entry(inner, st, &h) {
                set(st).remove(&h);
            }
        }
    }
}

fn new_op(st: &mut State, op: Op) -> u64 {
    st.next_op += 1;
    st.ops.insert(st.next_op, op);
    st.next_op
}

fn finish_block(
    inner: &Inner,
    st: &mut State,
    req: RequestId,
    hash: BlockHash,
    result: Result<(), TierError>,
) {
    let Some(r) = st.requests.get_mut(&req) else {
        return;
    };
    r.results.push(BlockResult { hash, result });
    r.pending = r.pending.saturating_sub(1);
    if r.pending == 0 {
        complete(inner, st, req);
    }
}

fn complete(inner: &Inner, st: &mut State, req: RequestId) {
    if let Some(r) = st.requests.remove(&req) {
        inner.done.lock().push_back(TierCompletion {
            id: req,
            kind: r.kind,
            blocks: r.results,
        });
        inner.done_cv.notify_all();
    }
}

fn begin(inner: &Inner, st: &mut State, id: RequestId, n: usize) -> bool {
    match st.requests.get_mut(&id) {
        Some(r) => {
            r.pending = n;
            if n == 0 {
                complete(inner, st, id);
                return false;
            }
            true
        }
        None => false,
    }
}

fn start_offload(
    inner: &Inner,
    st: &mut State,
    id: RequestId,
    g1: G1Id,
    blocks: Vec<(BlockHash, u32)>,
    notes: Vec<Vec<u8>>,
) {
    if !begin(inner, st, id, blocks.len()) {
        return;
    }
    if id < st.cleared_below {
        for (hash, _) in blocks {
            let e = TierError::Config("the tiers were cleared after this save was made".into());
            finish_block(inner, st, id, hash, Err(e));
        }
        return;
    }
    st.index.begin_batch();
    let mut notes = notes.into_iter();
    for (depth, (hash, block)) in blocks.into_iter().enumerate() {
        let depth = depth as u32;
        let note = notes.next().unwrap_or_default();
        st.gate.record(&hash);
        if st.doomed.contains(&hash) {
            // The old copy is still in use and goes when that ends: this save cannot take
            // its place yet (it would be "already cached" as the doomed bytes).
            let e = TierError::Config(format!("block {hash} is being dropped; saved later"));
            finish_block(inner, st, id, hash, Err(e));
            continue;
        }
        if st.unwanted.contains(&hash) {
            // Its owner was asked to drop it and may have already: keeping it now would leave
            // a block the owner no longer knows of, and out of the victims, for good.
            let e = TierError::Config(format!("block {hash} is being dropped; saved later"));
            finish_block(inner, st, id, hash, Err(e));
            continue;
        }
        // Discarded while in use and saved again: the copy is right for its hash; keep it.
        st.discarded.remove(&hash);
        if st.index.get(&hash).is_some() {
            // Already cached, or being cached by an earlier offload.
            st.index.touch(&hash, depth);
            finish_block(inner, st, id, hash, Ok(()));
            continue;
        }
        if inner.cfg.caller_evicts && g3_up(inner, st) {
            // Every block must be able to reach G3: a DRAM tier full of blocks G3 has no room
            // for could evict nothing, and reads from G3 (which pass through DRAM) would stall.
            // A block being spilled already has its G3 slot (out of the free list).
            let need = (st.index.len() - st.index.g3_len()).saturating_sub(st.spills);
            if need >= st.g3_free.len() {
                let slots = inner.store.as_ref().map_or(0, NvmeStore::slots);
                finish_block(
                    inner,
                    st,
                    id,
                    hash,
                    Err(TierError::Full {
                        tier: "NVMe",
                        slots,
                    }),
                );
                continue;
            }
        }
        st.index.pin_new(hash, depth);
        st.waiting.push_back(Waiting::Offload {
            req: id,
            g1,
            hash,
            block,
            note,
        });
    }
}

fn start_onboard(
    inner: &Inner,
    st: &mut State,
    id: RequestId,
    g1: G1Id,
    blocks: Vec<(BlockHash, u32)>,
) {
    if !begin(inner, st, id, blocks.len()) {
        return;
    }
    let mut ready = Vec::new();
    st.index.begin_batch();
    for (depth, (hash, block)) in blocks.into_iter().enumerate() {
        st.gate.record(&hash);
        if st.doomed.contains(&hash) || st.discarded.contains(&hash) {
            // Its bytes are from before a clear, or its owner discarded it: never served.
            finish_block(inner, st, id, hash, Err(TierError::Miss(hash.to_string())));
            continue;
        }
        if let Some(waiters) = st.loading.get_mut(&hash) {
            waiters.push((id, g1, block));
            continue;
        }
        let entry = st.index.get(&hash).copied();
        match entry {
            Some(Entry { g2: Some(slot), .. }) => {
                st.stats.dram.hits += 1;
                st.index.pin(&hash);
                st.index.touch(&hash, depth as u32);
                ready.push((
                    g1,
                    Item {
                        req: id,
                        hash,
                        block,
                        slot,
                    },
                ));
            }
            Some(e) if e.g3.is_some() && g3_up(inner, st) => {
                st.stats.nvme.hits += 1;
                st.index.pin(&hash);
                st.index.touch(&hash, depth as u32);
                st.loading.insert(hash, vec![(id, g1, block)]);
                st.waiting.push_back(Waiting::Read { hash });
            }
            _ => {
                st.stats.misses += 1;
                finish_block(inner, st, id, hash, Err(TierError::Miss(hash.to_string())));
            }
        }
    }
    submit_grouped(inner, st, true, ready);
}

fn submit_copy(inner: &Inner, op: u64, pairs: &[crate::memory::CopyPair]) -> Result<(), CopyError> {
    let tx = inner.tx.clone();
    inner.copy.submit(
        pairs,
        Box::new(move |result| {
            let _ = tx.send(Event::Copied { op, result });
        }),
    )
}

/// Copies a batch of blocks between one G1 cache and G2 with one plan and one submission: the
/// per-block cost is then a few copy descriptors, not a round trip through the driver.
fn submit_batch(inner: &Inner, st: &mut State, to_g1: bool, g1: G1Id, items: Vec<Item>) {
    if items.is_empty() {
        return;
    }
    let pairs = (|| {
        let (g1_region, g1_layout) = st
            .g1
            .get(g1.0 as usize)
            .ok_or_else(|| TierError::Config(format!("G1 cache {} is not registered", g1.0)))?;
        let blocks: Vec<u32> = items.iter().map(|i| i.block).collect();
        let slots: Vec<u32> = items.iter().map(|i| i.slot).collect();
        Ok::<_, TierError>(if to_g1 {
            let p = PlanBuilder::new(&inner.pool_layout, g1_layout)?.build(&slots, &blocks)?;
            plan_pairs(&p, inner.pool_region, *g1_region)
        } else {
            let p = PlanBuilder::new(g1_layout, &inner.pool_layout)?.build(&blocks, &slots)?;
            plan_pairs(&p, *g1_region, inner.pool_region)
        })
    })();
    let pairs = match pairs {
        Ok(p) => p,
        Err(e) => return fail_items(inner, st, to_g1, items, &e.to_string()),
    };
    let op = new_op(
        st,
        if to_g1 {
            Op::Onboard { items }
        } else {
            Op::Offload { items }
        },
    );
    st.deferred.push(Effect::Copy { op, to_g1, pairs });
}

fn fail_items(inner: &Inner, st: &mut State, to_g1: bool, items: Vec<Item>, msg: &str) {
    for it in items {
        if !to_g1 {
            inner.pool.free(it.slot);
        }
        st.index.unpin(&it.hash);
        st.stats.dram.errors += 1;
        let err = TierError::Copy(CopyError::Failed(msg.to_string()));
        finish_block(inner, st, it.req, it.hash, Err(err));
    }
}

/// Groups items by G1 cache and submits one batch per cache.
fn submit_grouped(inner: &Inner, st: &mut State, to_g1: bool, items: Vec<(G1Id, Item)>) {
    let mut groups: HashMap<G1Id, Vec<Item>> = HashMap::new();
    for (g1, it) in items {
        groups.entry(g1).or_default().push(it);
    }
    for (g1, items) in groups {
        submit_batch(inner, st, to_g1, g1, items);
    }
}

/// A free G2 slot, evicting if needed. `None` means: wait (a spill is on its way) or nothing
/// can be evicted now.
fn g2_slot(inner: &Inner, st: &mut State, for_load: bool) -> Option<u32> {
    loop {
        if let Some(s) = inner.pool.alloc() {
            return Some(s);
        }
        let victim = g2_victim(inner, st)?;
        if !evict_g2(inner, st, victim, for_load) {
            return None;
        }
    }
}

/// The next G2 block to make room with. When the caller owns eviction, only one that stays
/// loadable: already on G3, or spilled to a free G3 slot.
fn g2_victim(inner: &Inner, st: &mut State) -> Option<BlockHash> {
    if !inner.cfg.caller_evicts {
        return st.index.g2_victim();
    }
    let up = g3_up(inner, st);
    let g3_room = up && !st.g3_free.is_empty();
    st.index
        .g2_victim_where(&|e| !e.unwanted && ((up && e.g3.is_some()) || g3_room))
}

/// Makes room in G2 by letting `victim` go: dropped if G3 has it or will not take it, else
/// spilled (asynchronously; returns false because no slot is free yet). When the caller owns
/// eviction, a block not written is marked unwanted instead (false: its room comes with the
/// caller's discard), and no more are marked than the free-slot target asks for.
///
/// `force`: written whatever admission says (room for a load from G3: a load that failed for
/// want of room would be a load error, where a declined write costs only a write).
fn evict_g2(inner: &Inner, st: &mut State, victim: BlockHash, force: bool) -> bool {
    let Some(e) = st.index.get(&victim).copied() else {
        return false;
    };
    let Some(slot) = e.g2 else { return false };
    let g3 = g3_up(inner, st);
    if e.g3.is_none() && g3 && force && write_to_g3(inner, st, victim, slot) {
        return false;
    }
    if e.g3.is_none() && g3 {
        if inner.cfg.caller_evicts && st.unwanted.len() as u32 >= inner.cfg.spill_free_slots {
            // Enough room is on its way already.
            return false;
        }
        // Only TinyLFU compares with a G3 block (asking a policy for its victim may reorder it).
        // A caller that owns eviction keeps G3's free slots for blocks its capacity already
        // counts: room there says nothing about worth, so the comparison is always made.
        let compare = matches!(inner.cfg.admission, Admission::Frequency(_))
            && (st.g3_free.is_empty() || inner.cfg.caller_evicts);
        let g3_victim = if compare { st.index.g3_victim() } else { None };
        let now = st.started.elapsed();
        let verdict = st.gate.judge(&victim, e.hits, g3_victim.as_ref(), now);
        if verdict == Verdict::Write && write_to_g3(inner, st, victim, slot) {
            return false;
        }
        if inner.cfg.caller_evicts {
            // Not written, and only the caller may drop it (it may have promised a load of it):
            // it asks, and the block stays loadable and out of the victims until the discard.
            if let Some(en) = st.index.entry_mut(&victim) {
                en.unwanted = true;
            }
            st.unwanted.insert(victim);
            st.events.push(TierEvent::Unwanted { hash: victim });
            return false;
        }
    }
    st.index.set_g2(&victim, None);
    inner.pool.free(slot);
    st.stats.dram.evictions += 1;
    st.events.push(TierEvent::Removed {
        hash: victim,
        tier: Tier::Dram,
    });
    true
}

/// Starts spilling `victim` (G2 slot `slot`) to a G3 slot, if one can be had; counts the write.
fn write_to_g3(inner: &Inner, st: &mut State, victim: BlockHash, slot: u32) -> bool {
    let Some(g3) = g3_slot(inner, st) else {
        return false;
    };
    st.gate.wrote();
    spill(inner, st, victim, slot, g3, true);
    true
}

fn g3_slot(inner: &Inner, st: &mut State) -> Option<u64> {
    if let Some(s) = st.g3_free.pop() {
        return Some(s);
    }
    if inner.cfg.caller_evicts {
        return None;
    }
    let victim = st.index.g3_victim()?;
    let slot = st.index.get(&victim).and_then(|e| e.g3)?;
    st.index.set_g3(&victim, None);
    st.stats.nvme.evictions += 1;
    st.events.push(TierEvent::Removed {
        hash: victim,
        tier: Tier::Nvme,
    });
    Some(slot)
}

fn spill(inner: &Inner, st: &mut State, hash: BlockHash, g2: u32, g3: u64, evict: bool) {
    if !g3_up(inner, st) {
        return;
    }
    st.seq += 1;
    // Pinned until the write completes: no operation frees or reuses this slot meanwhile.
    st.index.pin(&hash);
    st.spills += 1;
    let op = new_op(
        st,
        Op::Spill {
            hash,
            g2,
            g3,
            evict,
        },
    );
    st.g3.started(op, Instant::now());
    st.deferred.push(Effect::Spill {
        op,
        hash,
        g2,
        g3,
        fingerprint: st.fingerprint,
        seq: st.seq,
    });
}

fn start_flush(inner: &Inner, st: &mut State, reply: Sender<Result<usize, TierError>>) {
    if inner.store.is_none() {
        let _ = reply.send(Err(TierError::Config("no NVMe tier is configured".into())));
        return;
    }
    if let Some(why) = st.g3.out_of_service() {
        let _ = reply.send(Err(TierError::OutOfService(why.to_string())));
        return;
    }
    let before: HashSet<u64> = st.ops.keys().copied().collect();
    let candidates = st.index.unspilled();
    let mut n = 0;
    for (v, g2) in candidates {
        let Some(g3) = g3_slot(inner, st) else { break };
        spill(inner, st, v, g2, g3, false);
        n += 1;
    }
    let mine: HashSet<u64> = st
        .ops
        .iter()
        .filter(|(k, o)| !before.contains(k) && matches!(o, Op::Spill { .. }))
        .map(|(k, _)| *k)
        .collect();
    if mine.is_empty() {
        let _ = reply.send(Ok(n));
    } else {
        st.flushes.push((reply, mine, n));
    }
}

fn on_copied(inner: &Inner, st: &mut State, op: u64, result: Result<u64, CopyError>) {
    match st.ops.remove(&op) {
        Some(Op::Offload { items }) => match result {
            Ok(bytes) => {
                st.stats.dram.bytes_in += bytes;
                for it in items {
                    st.index.set_g2(&it.hash, Some(it.slot));
                    st.index.unpin(&it.hash);
                    st.events.push(TierEvent::Stored {
                        hash: it.hash,
                        tier: Tier::Dram,
                    });
                    finish_block(inner, st, it.req, it.hash, Ok(()));
                }
            }
            Err(e) => fail_items(inner, st, false, items, &e.to_string()),
        },
        Some(Op::Onboard { items }) => match result {
            Ok(bytes) => {
                st.stats.dram.bytes_out += bytes;
                for it in items {
                    st.index.unpin(&it.hash);
                    if let Some(e) = st.index.entry_mut(&it.hash) {
                        e.hits += 1;
                    }
                    finish_block(inner, st, it.req, it.hash, Ok(()));
                }
            }
            Err(e) => fail_items(inner, st, true, items, &e.to_string()),
        },
        _ => {}
    }
}

fn on_io(inner: &Inner, st: &mut State, d: IoDone) {
    if let Some(o) = st.abandoned.remove(&d.tag) {
        finish_abandoned(inner, st, o);
        return;
    }
    st.g3.finished(d.tag);
    if let Some(why) = st.g3.record(&d.result) {
        take_g3_out(inner, st, why);
    }
    match st.ops.remove(&d.tag) {
        Some(Op::Spill {
            hash,
            g2,
            g3,
            evict,
        }) => {
            st.spills -= 1;
            // A write that lands after G3 went out of service is not used: nothing reads G3.
            let up = st.g3.in_service();
            let failed = d.result.is_err() || !up;
            match d.result {
                Ok(()) if !up => {}
                Ok(()) => {
                    st.stats.nvme.bytes_in += inner.geometry.block_bytes();
                    st.index.set_g3(&hash, Some(g3));
                    st.events.push(TierEvent::Stored {
                        hash,
                        tier: Tier::Nvme,
                    });
                }
                Err(e) => {
                    // The slot may be bad (or the disk full): keep it out of use.
                    log::warn!("kvferry: writing block {hash} to G3 slot {g3} failed: {e}");
                    st.stats.nvme.errors += 1;
                }
            }
            st.index.unpin(&hash);
            // Spills run under pressure: the G2 copy goes now (it is on G3, or G3 failed). When
            // the caller owns eviction a failed write keeps it: the block must stay loadable.
            let keep = inner.cfg.caller_evicts && failed;
            if evict
                && !keep
                && st
                    .index
                    .get(&hash)
                    .is_some_and(|e| e.refs == 0 && e.g2 == Some(g2))
            {
                st.index.set_g2(&hash, None);
                inner.pool.free(g2);
                st.stats.dram.evictions += 1;
                st.events.push(TierEvent::Removed {
                    hash,
                    tier: Tier::Dram,
                });
            }
            if !up {
                drop_g3_copy(st, &hash);
            }
            flush_op_done(st, d.tag);
        }
        Some(Op::Read { hash, g2, g3 }) => {
            let waiters = st.loading.remove(&hash).unwrap_or_default();
            let fingerprint = st.fingerprint;
            let verified = d.result.and_then(|()| {
                // SAFETY: the read into this slot has completed and the slot is not yet visible
                // to anyone else.
                let bytes = unsafe { inner.pool.slot(g2) };
                let payload = inner.geometry.block_bytes() as usize;
                SlotHeader::decode(&bytes[..SLOT_HEADER_LEN])
                    .and_then(|h| {
                        h.verify(
                            &hash,
                            fingerprint,
                            &bytes[HEADER_PAGE as usize..HEADER_PAGE as usize + payload],
                        )
                    })
                    .map_err(|source| TierError::Slot { slot: g3, source })
            });
            match verified {
                Ok(()) => {
                    st.stats.nvme.bytes_out += inner.geometry.block_bytes();
                    st.index.set_g2(&hash, Some(g2));
                    st.events.push(TierEvent::Stored {
                        hash,
                        tier: Tier::Dram,
                    });
                    // The read's pin becomes the first waiter's; the others take their own.
                    let mut items = Vec::with_capacity(waiters.len());
                    for (i, (req, g1, block)) in waiters.into_iter().enumerate() {
                        if i > 0 {
                            st.index.pin(&hash);
                        }
                        items.push((
                            g1,
                            Item {
                                req,
                                hash,
                                block,
                                slot: g2,
                            },
                        ));
                    }
                    submit_grouped(inner, st, true, items);
                }
                Err(e) => {
                    log::warn!("kvferry: dropping block {hash} from G3 slot {g3}: {e}");
                    st.stats.nvme.errors += 1;
                    inner.pool.free(g2);
                    st.index.set_g3(&hash, None);
                    st.g3_free.push(g3);
                    st.events.push(TierEvent::Removed {
                        hash,
                        tier: Tier::Nvme,
                    });
                    st.index.unpin(&hash);
                    let msg = e.to_string();
                    let mut first = Some(e);
                    for (req, _, _) in waiters {
                        let err = first
                            .take()
                            .unwrap_or_else(|| TierError::Miss(format!("{hash}: {msg}")));
                        finish_block(inner, st, req, hash, Err(err));
                    }
                }
            }
        }
        _ => {}
    }
}

/// Spill `op` is over (written, failed or abandoned): flushes waiting for nothing else answer.
fn flush_op_done(st: &mut State, op: u64) {
    for (_, ops, _) in st.flushes.iter_mut() {
        ops.remove(&op);
    }
    let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut st.flushes)
        .into_iter()
        .partition(|(_, ops, _)| ops.is_empty());
    st.flushes = rest;
    for (reply, _, n) in ready {
        let _ = reply.send(Ok(n));
    }
}

/// Serves blocks waiting for G2 slots and keeps free slots ahead of demand.
fn after_change(inner: &Inner, st: &mut State) {
    let mut offloads = Vec::new();
    while let Some(w) = st.waiting.pop_front() {
        // A load must not fail for room admission declined to make: it writes its victim.
        let for_load = matches!(w, Waiting::Read { .. });
        let Some(slot) = g2_slot(inner, st, for_load) else {
            let in_flight = !st.ops.is_empty() || !offloads.is_empty();
            if in_flight {
                st.waiting.push_front(w);
                break;
            }
            // Nothing in flight will free a slot: fail instead of waiting forever.
            let err = || TierError::Full {
                tier: "DRAM",
                slots: u64::from(inner.pool.slots()),
            };
            match w {
                Waiting::Offload { req, hash, .. } => {
                    st.index.unpin(&hash);
                    finish_block(inner, st, req, hash, Err(err()));
                }
                Waiting::Read { hash } => {
                    st.index.unpin(&hash);
                    for (req, _, _) in st.loading.remove(&hash).unwrap_or_default() {
                        finish_block(inner, st, req, hash, Err(err()));
                    }
                }
            }
            continue;
        };
        match w {
            Waiting::Offload {
                req,
                g1,
                hash,
                block,
                note,
            } => {
                // SAFETY: the slot was just allocated and no operation names it yet; the copy
                // submitted below writes the payload only, after the header page.
                let page = unsafe { &mut inner.pool.slot_mut(slot)[..HEADER_PAGE as usize] };
                // Always written, empty or not: the slot's last block left its note there.
                kvcore::slot::write_note(&mut page[kvcore::slot::NOTE_OFFSET..], &hash, &note);
                offloads.push((
                    g1,
                    Item {
                        req,
                        hash,
                        block,
                        slot,
                    },
                ))
            }
            Waiting::Read { hash } => {
                let g3 = st.index.get(&hash).and_then(|e| e.g3);
                let Some(g3) = g3.filter(|_| g3_up(inner, st)) else {
                    inner.pool.free(slot);
                    st.index.unpin(&hash);
                    for (req, _, _) in st.loading.remove(&hash).unwrap_or_default() {
                        finish_block(inner, st, req, hash, Err(TierError::Miss(hash.to_string())));
                    }
                    continue;
                };
                let op = new_op(st, Op::Read { hash, g2: slot, g3 });
                st.g3.started(op, Instant::now());
                st.deferred.push(Effect::Io {
                    req: IoRequest {
                        op: IoOp::Read,
                        slot: g3,
                        buf: inner.pool.slot_ptr(slot) as u64,
                        tag: op,
                    },
                });
            }
        }
    }
    submit_grouped(inner, st, false, offloads);
    // Keep some slots free so offloads rarely wait for a spill.
    if st.waiting.is_empty() && g3_up(inner, st) {
        while inner.pool.free_slots() + ((st.spills + st.unwanted.len()) as u32)
            < inner.cfg.spill_free_slots
        {
            let Some(v) = g2_victim(inner, st) else { break };
            let (spills, unwanted) = (st.spills, st.unwanted.len());
            let freed = evict_g2(inner, st, v, false);
            if !freed && st.spills == spills && st.unwanted.len() == unwanted {
                break;
            }
        }
    }
}
