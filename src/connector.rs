//! The engine-agnostic connector: what an inference engine's KV connector does, minus the engine.
//! It owns the tier engine (offload to G2/G3 by block hash) and the agent (prefill→decode pulls),
//! tracks every request's saves, loads and pulls, and answers the engine's three questions —
//! which requests may free their blocks, which finished loading, which blocks failed to load.
//! vLLM's `KVFerryConnector` is a thin adapter over it; a Rust engine can drive it directly.
//!
//! The protocol for prefill/decode is vLLM's NixlConnector's, with leases: the prefill side
//! finishes a request and holds its blocks under a grant; the decode side reads them (`pull`),
//! then releases the grant and learns whether it was live throughout the reads — only then are
//! the blocks reported loaded (see [`crate::lease`] for why no interleaving lets a reused block
//! through). A grant nobody releases ends when its lease runs out (decoders extend it while their
//! request waits).

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use kvcore::wire::ExportedCache;
use kvcore::{
    tp_reads, BlockHash, CacheLayout, Descriptor, MemKind, PlanBuilder, Region, RegionId,
};
use kvnet::{Agent, AgentConfig, NetError, TransportKind, Verdict};

use crate::lease::{Ended, GrantId, Grants, LeaseCall, LeaseReply};
use crate::rendezvous::{Answer, Board, Posted};
use crate::served::{Granted, ServeGuard, Serving};
use crate::staging::{Direction, Staging};
use kvtier::{G1Id, NvmeConfig, Tier, TierConfig, TierEngine, TierError, TierEvent};
use parking_lot::Mutex;
use std::sync::Arc;
use std::thread::JoinHandle;

mod asking;

/// Threads that talk to prefill engines about leases (release after a pull, heartbeats, aborts):
/// a release waits for its answer, so one slow prefill engine must not hold up the others.
const LEASE_THREADS: usize = 4;

/// How long a failed connect is remembered (see `State::unreachable`).
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

/// Reads that finished before the pull thread recorded them are kept at most this many (each is
/// recorded right after its post returns, so only a handful are ever here).
const MAX_EARLY: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error(transparent)]
    Tier(#[from] TierError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Layout(#[from] kvcore::LayoutError),
    #[error(transparent)]
    Plan(#[from] kvcore::PlanError),
    #[error("{0}")]
    Config(String),
}

type Result<T> = std::result::Result<T, ConnectorError>;

#[derive(Clone, Debug)]
pub struct OffloadConfig {
    /// G2 capacity in blocks.
    pub dram_blocks: u32,
    /// G3: a directory for the block files and their capacity in blocks.
    pub nvme: Option<(PathBuf, u64)>,
    /// What computed the KV (model and weights, dtypes, block-hash scheme, PP rank): G3 lives
    /// in a subdirectory of the directory per identity, and with it the TP rank and size and
    /// size (added here), so a restarted engine with other weights, or another
    /// rank, never loads these blocks.
    pub identity: String,
    /// The tiers drop blocks only when told (`discard`, `reset_cache`): for a scheduler that
    /// owns eviction (see `SchedulerConfig::capacity`).
    pub caller_evicts: bool,
    /// Which block each tier lets go when full.
    pub eviction: kvtier::PolicyKind,
    /// Which blocks leaving DRAM are written to NVMe. With `caller_evicts`, a block not written
    /// is reported `TierEvent::Unwanted` and stays loadable until the scheduler discards it.
    pub admission: kvtier::Admission,
    /// A cap on NVMe writes when making room in DRAM (per TP rank: each rank writes its own
    /// heads), same rule for blocks not written.
    pub write_budget: Option<kvtier::WriteBudget>,
    /// Each G3 read and write finishes within this or fails (its blocks are recomputed) and
    /// takes G3 out of service; `None`: kvtier's default (`NvmeConfig::timeout`).
    pub nvme_timeout: Option<Duration>,
}

#[derive(Clone, Debug)]
pub struct PdConfig {
    /// Where this engine's agent listens for decoders (port 0: any free port).
    pub listen: SocketAddr,
    pub transport: TransportKind,
    pub token: Option<String>,
    /// Accept unauthenticated peers on a non-loopback address (see `AgentConfig::insecure`).
    pub insecure: bool,
    /// How long a prefill request's blocks are held for decoders that have not released them
    /// (vLLM NixlConnector's `kv_lease_duration`); decoders extend it while their request waits.
    pub lease: Duration,
    /// Connecting to a prefill engine and each transfer step give up after this long.
    pub timeout: Duration,
    /// Serve and land blocks through a host copy of the cache ([`crate::staging`]) even when
    /// the cache itself could be exported: NixlConnector's `kv_buffer_device: "cpu"`. A device
    /// cache that no transport here can export is staged whatever this says.
    pub staged: bool,
}

#[derive(Clone, Debug)]
pub struct ConnectorConfig {
    pub engine_id: String,
    pub offload: Option<OffloadConfig>,
    pub pd: Option<PdConfig>,
    pub tp_size: u32,
    pub tp_rank: u32,
    /// The model's KV heads over all TP ranks, when they are not `kv_heads × tp_size` (TP larger
    /// than the KV head count replicates heads). MLA caches hold one latent every rank has.
    pub total_kv_heads: Option<u32>,
}

/// Where a prefill request's grant lives: the prefill engine's ranks and the grant's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseTarget {
    pub remote_host: String,
    pub remote_port: u16,
    pub remote_tp_size: u32,
    pub remote_request_id: String,
    /// The offer's generation (see [`crate::lease`]).
    pub grant: u64,
}

/// What the decode side needs to pull one request's blocks (vLLM's `kv_transfer_params`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullSpec {
    pub remote_host: String,
    pub remote_port: u16,
    pub remote_request_id: String,
    pub remote_tp_size: u32,
    /// The offer's grant generation.
    pub grant: u64,
    /// [`crate::lease::blocks_digest`] of every block the offer named (not only those pulled):
    /// the release proves the grant was over exactly those.
    pub offer_blocks: u64,
    /// Blocks on the prefill side, and where each lands here (same length; empty pulls nothing
    /// and only releases the grant).
    pub remote_blocks: Vec<u32>,
    pub local_blocks: Vec<u32>,
}

/// The engine's answer for one step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Finished {
    /// Requests whose blocks may be freed now (saves done, pull served or timed out).
    pub sending: Vec<String>,
    /// Requests whose loads (onboard or pull) are over, successfully or not.
    pub recving: Vec<String>,
    /// Local block ids that did not load: the engine recomputes them.
    pub load_errors: Vec<u32>,
    /// Requests one of whose blocks did not load (also in `recving`): how an engine whose
    /// block ids are not unique across KV cache groups hears of it (vLLM's `failed_recving`).
    pub failed_recving: Vec<String>,
    /// Decode side, the `offloading` protocol: offers fetched for requests (`None`: the
    /// prefill engine withdrew it, or did not post it within the wait).
    pub offers: Vec<(String, Option<Posted>)>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectorCounters {
    pub saved_blocks: u64,
    pub save_failed_blocks: u64,
    pub onboarded_blocks: u64,
    pub onboard_failed_blocks: u64,
    pub pulled_blocks: u64,
    pub pulled_bytes: u64,
    pub pull_failures: u64,
    /// Decode side: pulls whose reads completed but whose grant had ended (blocks recomputed).
    pub pulls_stale: u64,
    /// Prefill side: requests every decode rank pulled and released.
    pub pulls_served: u64,
    /// Prefill side: grants a decoder aborted (its request went away before pulling).
    pub pulls_aborted: u64,
    /// Prefill side: requests freed because their lease ran out.
    pub lease_expired: u64,
    pub lookups: u64,
    pub lookup_hits: u64,
    /// Times the tiers were emptied by `reset_cache`.
    pub resets: u64,
    /// Prefill side, the `offloading` protocol: offers posted under a decoder's key.
    pub offers_posted: u64,
    /// Decode side: offers fetched, and asks that ended without one.
    pub offers_fetched: u64,
    pub offers_missed: u64,
}

#[derive(Default)]
struct Req {
    saves: usize,
    loads: usize,
    finishing: bool,
    /// Prefill side: its blocks are held under a grant until decoders release it.
    granted: bool,
}

/// A pull in progress. It is reported (finished, with or without load errors) only once every
/// read it posted completed and the grant was released: never while a posted read may still
/// write into the blocks.
struct PullState {
    spec: PullSpec,
    /// Ranks we read from (the grant must have been live on each).
    read_ranks: Vec<usize>,
    /// Still posting reads: the pull cannot end yet even if every posted read completed.
    posting: bool,
    outstanding: usize,
    failed: Option<String>,
    bytes: u64,
    /// The reads land in the staging copy (our cache is staged): copied into the cache after
    /// the release confirmed them.
    staged: bool,
}

/// A pull ready to post: the prefill ranks' peer names, the reads by source rank, and whether
/// either side goes through a staging copy.
struct Prepared {
    peers: Vec<String>,
    posts: Vec<(usize, Vec<Descriptor>, Vec<Descriptor>)>,
    remote_staged: bool,
    local_staged: bool,
}

/// Work for the lease threads.
enum LeaseJob {
    /// Every read of a pull completed (or failed): release the grant, then report the pull.
    Confirm {
        req: String,
    },
    Extend(LeaseTarget),
    Abort(LeaseTarget),
    /// Prefill side: a finished request's blocks reached the staging mirror (or failed to):
    /// its grant goes live (or is abandoned).
    Staged {
        req: String,
        generation: u64,
        digest: u64,
        runs: Vec<(u64, u64)>,
        result: std::result::Result<u64, kvtier::CopyError>,
    },
    /// Decode side: a confirmed pull's blocks were copied from the staging mirror into the
    /// cache (or failed to): report the pull.
    Landed {
        req: String,
        spec: PullSpec,
        bytes: u64,
        result: std::result::Result<u64, kvtier::CopyError>,
    },
    Stop,
}

enum Op {
    Save {
        req: String,
        blocks: usize,
    },
    Load {
        req: String,
        blocks: HashMap<BlockHash, u32>,
    },
    /// One read of the pull of `req`.
    Read {
        req: String,
    },
}

struct Cache {
    layout: CacheLayout,
    tiers: Option<(TierEngine, G1Id)>,
    region: Option<RegionId>,
    /// P/D through a host copy of the cache: `region` is then the copy's.
    staging: Option<Staging>,
}

/// Where the engine's KV cache is.
#[derive(Clone, Copy, Debug)]
enum CacheMemory {
    Host(u64),
    Device { ordinal: u32, ptr: u64 },
}

#[derive(Default)]
struct State {
    reqs: HashMap<String, Req>,
    tier_ops: HashMap<u64, Op>,
    net_ops: HashMap<u64, Op>,
    /// Reads that finished before the pull thread recorded them.
    early: HashMap<u64, std::result::Result<u64, NetError>>,
    pulls: HashMap<String, PullState>,
    /// Requests one of whose saved blocks did not reach the tiers (see `take_failed_saves`).
    failed_saves: Vec<String>,
    /// Prefill side: grants on finished requests' blocks.
    grants: Option<Grants>,
    /// Prefill side: offers posted for decoders that ask by key (the `offloading` protocol).
    board: Board,
    /// Decode side: requests whose offer is being asked for (the `offloading` protocol).
    asking: HashSet<String>,
    /// Prefill side: the byte runs of granted blocks (what TCP peers may read), and each
    /// request's share of them.
    granted: Granted,
    grant_runs: HashMap<String, Vec<(u64, u64)>>,
    /// Runs of grants that ended, kept until no serve of them is in flight.
    draining: HashMap<String, Vec<(u64, u64)>>,
    /// Prefill engines we pulled from, by address.
    peers: HashMap<SocketAddr, String>,
    /// Addresses a connect to failed, and when: asked again only after `RECONNECT_AFTER`, so
    /// one dead prefill engine (or a client's made-up one) costs one connect timeout, not one
    /// per request and rank.
    unreachable: HashMap<SocketAddr, Instant>,
    done: Finished,
    counters: ConnectorCounters,
    events: Vec<TierEvent>,
    /// Notes of the blocks recovered from G3 (see [`Connector::save_noted`]), until taken.
    recovered_notes: Vec<(BlockHash, Vec<u8>)>,
}

/// The connector: [`Core`] (reachable through `Deref`) plus the thread that connects to prefill
/// engines and posts pulls, so that a slow or unreachable prefill engine never stalls the caller
/// (the engine's forward pass) for its connect timeout.
pub struct Connector {
    core: Arc<Core>,
    pulls: Mutex<Option<Sender<(String, PullSpec)>>>,
    puller: Mutex<Option<JoinHandle<()>>>,
    leasers: Mutex<Vec<JoinHandle<()>>>,
}

impl std::ops::Deref for Connector {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

impl Connector {
    /// Starts the agent (P/D) right away, so the listening address is known before the engine
    /// registers its cache; the tier engine starts with the cache, when the geometry is known.
    pub fn new(cfg: ConnectorConfig) -> Result<Connector> {
        let (lease_tx, lease_rx) = unbounded::<LeaseJob>();
        let core = Arc::new(Core::new(cfg, lease_tx)?);
        if let Some(a) = &core.agent {
            // Weak: the agent's runtime must not keep the connector alive.
            let weak = Arc::downgrade(&core);
            a.set_serve_check(Arc::new(
                move |peer: &str, op, descs: &[Descriptor]| match weak.upgrade() {
                    Some(c) => c.may_serve(peer, op, descs),
                    None => Verdict::Refuse("shutting down".into()),
                },
            ));
            let weak = Arc::downgrade(&core);
            a.set_call_handler(Arc::new(move |peer: &str, payload: &[u8]| {
                match (weak.upgrade(), crate::rendezvous::decode_ask(payload)) {
                    (Some(c), Some(ask)) => c.answer_ask(peer, ask),
                    (Some(c), None) => c.answer_lease(peer, payload),
                    (None, Some(_)) => Answer::Withdrawn.encode(),
                    (None, None) => LeaseReply::Gone.encode(),
                }
            }));
        }
        let mut leasers = Vec::new();
        for i in 0..LEASE_THREADS {
            let rx: Receiver<LeaseJob> = lease_rx.clone();
            let c = core.clone();
            let t = std::thread::Builder::new()
                .name(format!("kvferry-lease-{i}"))
                .spawn(move || {
                    for job in rx {
                        if matches!(job, LeaseJob::Stop) {
                            break;
                        }
                        c.run_lease(job);
                    }
                })
                .map_err(|e| ConnectorError::Config(format!("cannot start a lease thread: {e}")))?;
            leasers.push(t);
        }
        let (tx, rx) = unbounded::<(String, PullSpec)>();
        let c = core.clone();
        let puller = std::thread::Builder::new()
            .name("kvferry-pull".into())
            .spawn(move || {
                for (req, spec) in rx {
                    c.run_pull(&req, &spec);
                }
            })
            .map_err(|e| ConnectorError::Config(format!("cannot start the pull thread: {e}")))?;
        Ok(Connector {
            core,
            pulls: Mutex::new(Some(tx)),
            puller: Mutex::new(Some(puller)),
            leasers: Mutex::new(leasers),
        })
    }

    /// Decode side: keeps the prefill engine's grant alive while the request waits (call it
    /// more often than the lease runs out; the answer is not waited for).
    pub fn extend(&self, target: &LeaseTarget) {
        let _ = self.core.lease_tx.send(LeaseJob::Extend(target.clone()));
    }

    /// Decode side: the request went away before pulling: the prefill engine may free now.
    pub fn abort_remote(&self, target: &LeaseTarget) {
        let _ = self.core.lease_tx.send(LeaseJob::Abort(target.clone()));
    }

    /// Decode side: pulls a request's blocks from its prefill engine, then releases its grant
    /// (the blocks count as loaded only if it was live throughout); returns
    /// at once (the connect and the posting happen on the pull thread). Every failure (prefill
    /// engine down, geometry mismatch, peer dying mid-transfer) ends as load errors for the
    /// local blocks, so the engine recomputes them.
    pub fn pull(&self, req: &str, spec: &PullSpec) {
        // A placeholder load, so the request is not reported finished before the pull resolves.
        self.core
            .st
            .lock()
            .reqs
            .entry(req.to_string())
            .or_default()
            .loads += 1;
        let sent = self
            .pulls
            .lock()
            .as_ref()
            .map(|tx| tx.send((req.to_string(), spec.clone())).is_ok());
        if sent != Some(true) {
            self.core.run_pull(req, spec);
        }
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.pulls.lock().take();
        if let Some(t) = self.puller.lock().take() {
            let _ = t.join();
        }
        self.core.stop_asking();
        let leasers = std::mem::take(&mut *self.leasers.lock());
        for _ in &leasers {
            let _ = self.core.lease_tx.send(LeaseJob::Stop);
        }
        for t in leasers {
            let _ = t.join();
        }
    }
}

/// Everything the connector does besides scheduling pulls.
pub struct Core {
    cfg: ConnectorConfig,
    agent: Option<Agent>,
    cache: Mutex<Option<Cache>>,
    st: Mutex<State>,
    lease_tx: Sender<LeaseJob>,
    /// Granted runs being served to peers now (see [`crate::served::ServeGuard`]).
    serving: Serving,
    /// Decode side: one thread per prefill address being asked for offers (`None`: stopped).
    askers: Mutex<Option<asking::Askers>>,
}

impl Core {
    fn new(cfg: ConnectorConfig, lease_tx: Sender<LeaseJob>) -> Result<Core> {
        if cfg.tp_size == 0 || cfg.tp_rank >= cfg.tp_size {
            return Err(ConnectorError::Config(format!(
                "tp_rank {} of tp_size {}",
                cfg.tp_rank, cfg.tp_size
            )));
        }
        let agent = match &cfg.pd {
            Some(pd) => {
                let mut a = AgentConfig::new(format!("{}-rank{}", cfg.engine_id, cfg.tp_rank));
                a.listen = pd.listen;
                // With a fixed port, rank r listens on port + r: decoders find every rank from
                // the one port in kv_transfer_params (NixlConnector's convention).
                if pd.listen.port() != 0 {
                    let port =
                        u16::try_from(u32::from(pd.listen.port()) + cfg.tp_rank).map_err(|_| {
                            ConnectorError::Config("port + tp_rank exceeds 65535".into())
                        })?;
                    a.listen.set_port(port);
                }
                a.token = pd.token.clone();
                a.insecure = pd.insecure;
                a.timeout = pd.timeout;
                a.transports = match pd.transport {
                    TransportKind::Tcp => vec![TransportKind::Tcp],
                    TransportKind::Ucx => vec![TransportKind::Ucx, TransportKind::Tcp],
                };
                let agent = Agent::new(a)?;
                if pd.transport == TransportKind::Ucx && agent.ucx_library().is_none() {
                    return Err(ConnectorError::Config(
                        "transport \"ucx\" was asked for but no libucp loads here (install UCX, \
                         e.g. the libucx-cu12 wheel, or set KVFERRY_UCX_LIB)"
                            .into(),
                    ));
                }
                Some(agent)
            }
            None => None,
        };
        let st = State {
            grants: cfg.pd.as_ref().map(|p| Grants::new(p.lease)),
            ..State::default()
        };
        Ok(Core {
            cfg,
            agent,
            cache: Mutex::new(None),
            st: Mutex::new(st),
            lease_tx,
            serving: Default::default(),
            askers: Mutex::new(Some(asking::Askers::default())),
        })
    }

    pub fn engine_id(&self) -> &str {
        &self.cfg.engine_id
    }

    /// The address decoders pull from (P/D only).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.agent.as_ref().map(Agent::listen_addr)
    }

    /// Registers the engine's KV cache in host memory (CPU engines).
    ///
    /// # Safety
    /// `base..base + layout.span_bytes()` must stay valid until the connector is dropped, and the
    /// engine must not write a block while it is being saved or pulled by a peer, nor touch a
    /// block being loaded, until the connector reports the request finished.
    pub unsafe fn register_cache(&self, layout: CacheLayout, base: *mut u8) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.register(layout, CacheMemory::Host(base as u64)) }
    }

    /// Registers the engine's KV cache in device memory of CUDA device `ordinal` (vLLM on a
    /// GPU): G2 is then CUDA pinned memory and blocks move with kvtier's CUDA copy engine; for
    /// P/D the cache is exported as device memory where UCX has CUDA, and staged through a host
    /// copy otherwise ([`crate::staging`]). Every layer's extent is checked to be device memory
    /// of that device. Without a CUDA driver or device the error says so.
    ///
    /// The engine must order its own work before the connector's copies: a block handed to a
    /// save (or a finish) must hold its final bytes when the call is made — its writes complete,
    /// not merely enqueued on a stream — and a block handed to a load must have no kernel still
    /// reading it. (vLLM's adapter waits on the compute stream where that does not already
    /// hold.)
    ///
    /// # Safety
    /// The device memory `device_ptr..device_ptr + layout.span_bytes()` must stay allocated until
    /// the connector is dropped; otherwise as [`Core::register_cache`].
    pub unsafe fn register_device_cache(
        &self,
        layout: CacheLayout,
        ordinal: u32,
        device_ptr: u64,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe {
            self.register(
                layout,
                CacheMemory::Device {
                    ordinal,
                    ptr: device_ptr,
                },
            )
        }
    }

    /// # Safety
    /// As for [`Core::register_cache`] / [`Core::register_device_cache`].
    unsafe fn register(&self, layout: CacheLayout, mem: CacheMemory) -> Result<()> {
        let mut slot = self.cache.lock();
        if slot.is_some() {
            return Err(ConnectorError::Config(
                "the KV cache is already registered".into(),
            ));
        }
        let gpu = match mem {
            CacheMemory::Device { ordinal, .. } => Some(
                kvtier::cuda::Gpu::open(ordinal)
                    .map_err(|e| ConnectorError::Config(format!("a CUDA KV cache: {e}")))?,
            ),
            CacheMemory::Host(_) => None,
        };
        let tiers = match &self.cfg.offload {
            Some(o) => {
                let mut tc = TierConfig::new(*layout.geometry(), o.dram_blocks);
                tc.caller_evicts = o.caller_evicts;
                tc.eviction = o.eviction;
                tc.admission = o.admission;
                tc.write_budget = o.write_budget;
                tc.gpu = gpu.as_ref().map(kvtier::cuda::Gpu::ordinal);
                if let Some((dir, blocks)) = &o.nvme {
                    let mut n = NvmeConfig::new(dir.clone(), *blocks);
                    if let Some(t) = o.nvme_timeout {
                        n.timeout = t;
                    }
                    tc.nvme = Some(n);
                    // The engine's cache layout is not part of it: tier blocks have kvferry's own
                    // order (in the fingerprint with the geometry), whatever G1's strides.
                    tc.namespace = Some(format!(
                        "{} tp_rank={} tp_size={}",
                        o.identity, self.cfg.tp_rank, self.cfg.tp_size
                    ));
                }
                let t = TierEngine::new(tc)?;
                let g1 = match mem {
                    // SAFETY: forwarded from this function's contract.
                    CacheMemory::Host(base) => {
                        unsafe { t.register_g1(layout.clone(), base as *mut u8) }?
                    }
                    // SAFETY: forwarded from this function's contract.
                    CacheMemory::Device { ptr, .. } => {
                        unsafe { t.register_g1_device(layout.clone(), ptr) }?
                    }
                };
                // Blocks recovered from G3 are announced like new ones, so a scheduler that
                // mirrors the tiers from events knows them after a restart.
                let mut st = self.st.lock();
                st.events.extend(t.snapshot());
                st.recovered_notes.extend(t.take_recovered_notes());
                drop(st);
                Some((t, g1))
            }
            None => None,
        };
        let (region, staging) = match (&self.agent, self.cfg.pd.as_ref()) {
            (Some(a), Some(pd)) => {
                let staging = match (mem, &gpu) {
                    (CacheMemory::Device { ptr, .. }, Some(gpu))
                        if pd.staged || !a.device_memory() =>
                    {
                        log::info!(
                            "kvferry: P/D stages the device KV cache through pinned host memory \
                             ({})",
                            if pd.staged {
                                "as configured".to_string()
                            } else {
                                format!(
                                    "transports {:?} cannot export device memory",
                                    a.transports()
                                )
                            }
                        );
                        // SAFETY: forwarded from this function's contract.
                        Some(unsafe { Staging::device(gpu, &layout, ptr) }?)
                    }
                    // SAFETY: forwarded from this function's contract.
                    (CacheMemory::Host(base), _) if pd.staged => {
                        Some(unsafe { Staging::host(&layout, base) }?)
                    }
                    _ => None,
                };
                let exported = match (&staging, mem) {
                    (Some(s), _) => s.mirror(),
                    (None, CacheMemory::Host(base)) => Region {
                        kind: MemKind::Host,
                        base,
                        len: layout.span_bytes(),
                    },
                    (None, CacheMemory::Device { ordinal, ptr }) => Region {
                        kind: MemKind::Device { ordinal },
                        base: ptr,
                        len: layout.span_bytes(),
                    },
                };
                // SAFETY: forwarded from this function's contract (a staging mirror lives in
                // the cache slot until the connector, and with it the agent, is dropped).
                let id = unsafe { a.register(exported) }?;
                a.export_cache(ExportedCache {
                    region: id,
                    layout: layout.clone(),
                    tp_size: self.cfg.tp_size,
                    tp_rank: self.cfg.tp_rank,
                    staged: staging.is_some(),
                })?;
                (Some(id), staging)
            }
            _ => (None, None),
        };
        *slot = Some(Cache {
            layout,
            tiers,
            region,
            staging,
        });
        Ok(())
    }

    /// How many leading blocks of `hashes` are in G2/G3 (0 before the cache is registered).
    pub fn lookup(&self, hashes: &[BlockHash]) -> usize {
        let hits = self
            .cache
            .lock()
            .as_ref()
            .and_then(|c| c.tiers.as_ref())
            .map_or(0, |(t, _)| t.lookup(hashes).hits);
        let mut st = self.st.lock();
        st.counters.lookups += 1;
        st.counters.lookup_hits += hits as u64;
        hits
    }

    fn tiers<R>(&self, f: impl FnOnce(&TierEngine, G1Id) -> Result<R>) -> Result<R> {
        let c = self.cache.lock();
        let (t, g1) = c
            .as_ref()
            .and_then(|c| c.tiers.as_ref())
            .ok_or_else(|| ConnectorError::Config("offload is not configured".into()))?;
        f(t, *g1)
    }

    /// Drops blocks from the tiers (for engines whose own manager decides eviction).
    pub fn discard(&self, hashes: &[BlockHash]) -> Result<usize> {
        self.tiers(|t, _| Ok(t.discard(hashes)))
    }

    /// Requests reported in `sending` since the last call whose save failed for some block (so
    /// those blocks are not in the tiers). Bounded: kept for callers that ask.
    pub fn take_failed_saves(&self) -> Vec<String> {
        std::mem::take(&mut self.st.lock().failed_saves)
    }

    /// Empties G2 and G3 for good (the engine's weights changed, say): see
    /// [`TierEngine::clear`]. Returns how many blocks were dropped at once.
    pub fn reset_cache(&self) -> Result<usize> {
        let n = self.tiers(|t, _| Ok(t.clear()?))?;
        self.st.lock().counters.resets += 1;
        Ok(n)
    }

    /// Saves blocks `(hash, local block)` of `req` to the tiers, asynchronously.
    pub fn save(&self, req: &str, blocks: &[(BlockHash, u32)]) -> Result<()> {
        self.save_noted(req, blocks, Vec::new())
    }

    /// [`Connector::save`] with a note per block (or none), which the tiers keep with the block
    /// and hand back after a restart that recovers it from G3
    /// ([`Connector::take_recovered_notes`]): the scheduler's description of the block, so that
    /// routers hear of recovered blocks in full.
    pub fn save_noted(
        &self,
        req: &str,
        blocks: &[(BlockHash, u32)],
        notes: Vec<Vec<u8>>,
    ) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let id = self.tiers(|t, g1| Ok(t.offload_noted(g1, blocks, notes)?))?;
        let mut st = self.st.lock();
        st.reqs.entry(req.to_string()).or_default().saves += 1;
        st.tier_ops.insert(
            id,
            Op::Save {
                req: req.to_string(),
                blocks: blocks.len(),
            },
        );
        Ok(())
    }

    /// Saves blocks `(hash, local block)` and returns once their bytes are out of the engine's
    /// cache (copied into G2, or already there), up to `timeout`: for blocks the engine frees
    /// without waiting for the connector (a sliding window's, which vLLM gives back as the
    /// window moves), so they must be read before this step ends — the engine may hand them to
    /// another request in the next. Returns how many were saved.
    ///
    /// It returns only once the copy is over, however long that takes (a warning every
    /// `warn_every`): while the engine's step waits here no one can reuse the blocks, and a copy
    /// that went on after the return could read another request's bytes into these hashes.
    /// (Discarding at a timeout is not enough: an offload still queued has no entry to doom.)
    /// A stalled G2 therefore stalls the step; giving G2 operations their own deadlines is the
    /// reliability work's.
    /// `notes` as in [`Connector::save_noted`].
    pub fn save_now(
        &self,
        blocks: &[(BlockHash, u32)],
        notes: Vec<Vec<u8>>,
        warn_every: Duration,
    ) -> Result<usize> {
        if blocks.is_empty() {
            return Ok(0);
        }
        // Under the cache's lock, which keeps the engine (and the memory it reads) registered
        // while the copy runs; on a CPU cache it is a memcpy.
        let c = self.tiers(|t, g1| {
            let id = t.offload_noted(g1, blocks, notes)?;
            let started = Instant::now();
            loop {
                if let Some(c) = t.wait(id, warn_every.max(Duration::from_millis(100))) {
                    return Ok(c);
                }
                log::warn!(
                    "kvferry: a window save of {} blocks has run for {:?}; the step waits for it",
                    blocks.len(),
                    started.elapsed()
                );
            }
        })?;
        let mut st = self.st.lock();
        let failed = c.blocks.iter().filter(|b| b.result.is_err()).count();
        st.counters.saved_blocks += (blocks.len() - failed) as u64;
        st.counters.save_failed_blocks += failed as u64;
        Ok(blocks.len() - failed)
    }

    /// Loads blocks `(hash, local block)` of `req` from the tiers, asynchronously. A failure to
    /// start fails the blocks (reported as load errors), not the call: the engine recomputes.
    pub fn load(&self, req: &str, blocks: &[(BlockHash, u32)]) {
        let started = self.tiers(|t, g1| Ok(t.onboard(g1, blocks)?));
        let mut st = self.st.lock();
        match started {
            Ok(id) => {
                st.reqs.entry(req.to_string()).or_default().loads += 1;
                st.tier_ops.insert(
                    id,
                    Op::Load {
                        req: req.to_string(),
                        blocks: blocks.iter().copied().collect(),
                    },
                );
            }
            Err(e) => {
                log::warn!("kvferry: onboard for {req} did not start: {e}");
                st.counters.onboard_failed_blocks += blocks.len() as u64;
                st.done.load_errors.extend(blocks.iter().map(|b| b.1));
                st.done.failed_recving.push(req.to_string());
                st.done.recving.push(req.to_string());
            }
        }
    }

    /// Connects, plans and posts one pull (on the pull thread). The placeholder load that
    /// [`Connector::pull`] counted stays until the pull is reported, after its grant's release.
    fn run_pull(&self, req: &str, spec: &PullSpec) {
        let prepared = self.prepare_pull(spec).and_then(|p| {
            if p.remote_staged {
                self.await_staged(spec, &p)?;
            }
            Ok(p)
        });
        let Prepared {
            peers,
            posts,
            local_staged,
            ..
        } = match prepared {
            Ok(p) => p,
            Err(e) => {
                log::warn!(
                    "kvferry: pulling {req} from {}:{} failed: {e}",
                    spec.remote_host,
                    spec.remote_port
                );
                self.forget_stale_peers(spec);
                // Nothing was posted. The prefill engine may still hold the blocks: tell it.
                let _ = self.lease_tx.send(LeaseJob::Abort(spec.target()));
                let mut st = self.st.lock();
                let st = &mut *st;
                st.counters.pull_failures += 1;
                pull_failed(st, req, &spec.local_blocks);
                load_done(st, req);
                return;
            }
        };
        let agent = match &self.agent {
            Some(a) => a,
            None => return,
        };
        let mut read_ranks: Vec<usize> = posts.iter().map(|p| p.0).collect();
        read_ranks.dedup();
        self.st.lock().pulls.insert(
            req.to_string(),
            PullState {
                spec: spec.clone(),
                read_ranks,
                posting: true,
                outstanding: 0,
                failed: None,
                bytes: 0,
                staged: local_staged,
            },
        );
        // Each read is recorded as soon as its post returns; a post that fails stops the
        // posting, and the pull then waits for the reads already posted before it ends.
        for (q, local, remote) in posts {
            let posted = agent.read(&local, &peers[q], &remote, None);
            let mut st = self.st.lock();
            let st = &mut *st;
            match posted {
                Ok(id) => {
                    if let Some(p) = st.pulls.get_mut(req) {
                        p.outstanding += 1;
                    }
                    st.net_ops.insert(
                        id,
                        Op::Read {
                            req: req.to_string(),
                        },
                    );
                    if let Some(result) = st.early.remove(&id) {
                        self.read_done(st, id, result);
                    }
                }
                Err(e) => {
                    if let Some(p) = st.pulls.get_mut(req) {
                        p.failed = Some(format!("posting a read from {}: {e}", peers[q]));
                    }
                    break;
                }
            }
        }
        let mut st = self.st.lock();
        if let Some(p) = st.pulls.get_mut(req) {
            p.posting = false;
            if p.outstanding == 0 {
                let _ = self.lease_tx.send(LeaseJob::Confirm {
                    req: req.to_string(),
                });
            }
        }
    }

    /// Before reading a staged export: waits until the grant is live on every rank read from,
    /// which it is only once the request's blocks are in the copy (see [`crate::staging`]).
    fn await_staged(&self, spec: &PullSpec, p: &Prepared) -> Result<()> {
        let t = spec.target();
        let call = LeaseCall::Extend(t.grant_id());
        for (rank, r) in self.call_ranks(&t, &call, true) {
            if !p.posts.iter().any(|post| post.0 == rank) {
                continue;
            }
            match r? {
                LeaseReply::Live => {}
                other => {
                    return Err(ConnectorError::Config(format!(
                        "prefill rank {rank} stages its blocks and says the grant is {other:?} \
                         before the reads"
                    )))
                }
            }
        }
        Ok(())
    }

    /// One posted read finished.
    fn read_done(&self, st: &mut State, id: u64, result: std::result::Result<u64, NetError>) {
        let Some(Op::Read { req }) = st.net_ops.remove(&id) else {
            // Finished before the pull thread recorded it.
            if st.early.len() < MAX_EARLY {
                st.early.insert(id, result);
            }
            return;
        };
        let Some(p) = st.pulls.get_mut(&req) else {
            return;
        };
        p.outstanding = p.outstanding.saturating_sub(1);
        match result {
            Ok(bytes) => p.bytes += bytes,
            Err(e) => {
                p.failed.get_or_insert(format!("{e}"));
            }
        }
        if p.outstanding == 0 && !p.posting {
            let _ = self.lease_tx.send(LeaseJob::Confirm { req });
        }
    }

    /// The prefill engine may have restarted: connect afresh next time.
    fn forget_stale_peers(&self, spec: &PullSpec) {
        let mut st = self.st.lock();
        let stale: Vec<SocketAddr> = st
            .peers
            .keys()
            .filter(|a| {
                let p = u32::from(a.port());
                let base = u32::from(spec.remote_port);
                p >= base && p < base + spec.remote_tp_size.max(1)
            })
            .copied()
            .collect();
        for a in stale {
            if let (Some(name), Some(agent)) = (st.peers.remove(&a), &self.agent) {
                agent.forget_peer(&name);
            }
        }
    }

    fn run_lease(&self, job: LeaseJob) {
        match job {
            LeaseJob::Confirm { req } => self.confirm(&req),
            // Extends are fire and forget (the next one comes a third of a lease later); an
            // abort asks again while the prefill's worker does not know the grant yet (it learns
            // of finished requests a step later), within the deadline.
            LeaseJob::Extend(t) => self.tell(&t, LeaseCall::Extend(t.grant_id()), false),
            LeaseJob::Abort(t) => self.tell(&t, LeaseCall::Abort(t.grant_id()), true),
            LeaseJob::Staged {
                req,
                generation,
                digest,
                runs,
                result,
            } => self.staged(&req, generation, digest, runs, result),
            LeaseJob::Landed {
                req,
                spec,
                bytes,
                result,
            } => self.landed(&req, &spec, bytes, result),
            LeaseJob::Stop => {}
        }
    }

    /// Sends a lease call whose answer only matters for the log.
    fn tell(&self, t: &LeaseTarget, call: LeaseCall, wait_pending: bool) {
        for (rank, r) in self.call_ranks(t, &call, wait_pending) {
            if let Err(e) = r {
                log::debug!("kvferry: {call:?} on prefill rank {rank}: {e}");
            }
        }
    }

    /// Every read of `req`'s pull completed or failed: release the grant on every prefill rank,
    /// then report the pull — loaded only if no read failed and the grant was live on every
    /// rank read from, when the release arrived (after the reads).
    fn confirm(&self, req: &str) {
        let Some((spec, read_ranks, failed)) = self
            .st
            .lock()
            .pulls
            .get(req)
            .map(|p| (p.spec.clone(), p.read_ranks.clone(), p.failed.clone()))
        else {
            return;
        };
        let call = LeaseCall::Release {
            grant: spec.target().grant_id(),
            rank: self.cfg.tp_rank,
            ranks: self.cfg.tp_size,
            blocks: spec.offer_blocks,
        };
        let replies = self.call_ranks(&spec.target(), &call, true);
        let mut stale = None;
        for (rank, r) in &replies {
            if !read_ranks.contains(rank) {
                continue;
            }
            match r {
                Ok(LeaseReply::Live) => {}
                Ok(other) => {
                    stale.get_or_insert(format!("prefill rank {rank} says the grant is {other:?}"));
                }
                Err(e) => {
                    stale.get_or_insert(format!("releasing on prefill rank {rank}: {e}"));
                }
            }
        }
        if failed.is_none() && stale.is_none() && self.land(req) {
            return;
        }
        let mut st = self.st.lock();
        let st = &mut *st;
        let Some(p) = st.pulls.remove(req) else {
            return;
        };
        match (failed, stale) {
            (None, None) => {
                st.counters.pulled_blocks += p.spec.local_blocks.len() as u64;
                st.counters.pulled_bytes += p.bytes;
            }
            (Some(why), _) => {
                log::warn!("kvferry: pull of {req} failed: {why}");
                st.counters.pull_failures += 1;
                pull_failed(st, req, &p.spec.local_blocks);
            }
            (None, Some(why)) => {
                log::warn!(
                    "kvferry: pull of {req} read {} blocks but cannot prove they were still \
                     {}'s ({why}); they are recomputed",
                    p.spec.local_blocks.len(),
                    p.spec.remote_request_id
                );
                st.counters.pulls_stale += 1;
                pull_failed(st, req, &p.spec.local_blocks);
            }
        }
        load_done(st, req);
    }

    /// A confirmed pull whose reads landed in the staging copy: starts copying its blocks into
    /// the cache, after which it is reported (`LeaseJob::Landed`). Returns false when the pull is
    /// not staged (or is gone), and for a copy that did not start, which then fails the pull.
    fn land(&self, req: &str) -> bool {
        let (spec, bytes) = {
            let mut st = self.st.lock();
            if !st.pulls.get(req).is_some_and(|p| p.staged) {
                return false;
            }
            let Some(p) = st.pulls.remove(req) else {
                return false;
            };
            (p.spec, p.bytes)
        };
        let blocks = spec.local_blocks.clone();
        let tx = self.lease_tx.clone();
        let (r, s2) = (req.to_string(), spec.clone());
        let done: kvtier::CopyCallback = Box::new(move |result| {
            let _ = tx.send(LeaseJob::Landed {
                req: r,
                spec: s2,
                bytes,
                result,
            });
        });
        // The cache's lock before the state's, as everywhere.
        let started = match self.cache.lock().as_ref().and_then(|c| c.staging.as_ref()) {
            Some(s) => s.copy(Direction::In, &blocks, done),
            None => Err(ConnectorError::Config(
                "no staging copy to land from".into(),
            )),
        };
        if let Err(e) = started {
            let _ = self.lease_tx.send(LeaseJob::Landed {
                req: req.to_string(),
                spec,
                bytes,
                result: Err(kvtier::CopyError::Failed(e.to_string())),
            });
        }
        true
    }

    /// Decode side: a confirmed pull's blocks reached the cache from the staging copy, or did
    /// not: the pull is reported either way.
    fn landed(
        &self,
        req: &str,
        spec: &PullSpec,
        bytes: u64,
        result: std::result::Result<u64, kvtier::CopyError>,
    ) {
        let mut st = self.st.lock();
        let st = &mut *st;
        match result {
            Ok(_) => {
                st.counters.pulled_blocks += spec.local_blocks.len() as u64;
                st.counters.pulled_bytes += bytes;
            }
            Err(e) => {
                log::warn!(
                    "kvferry: pull of {req}: copying its blocks from the staging copy into the \
                     cache failed: {e}"
                );
                st.counters.pull_failures += 1;
                pull_failed(st, req, &spec.local_blocks);
            }
        }
        load_done(st, req);
    }

    /// Prefill side: a finished request's blocks reached the staging copy, or did not.
    fn staged(
        &self,
        req: &str,
        generation: u64,
        digest: u64,
        runs: Vec<(u64, u64)>,
        result: std::result::Result<u64, kvtier::CopyError>,
    ) {
        let mut st = self.st.lock();
        let st = &mut *st;
        let Some(grants) = st.grants.as_mut() else {
            return;
        };
        match result {
            Ok(_) => {
                // Superseded by a newer offer of the request (or abandoned): its copy is stale.
                if !grants.grant_staged(req, generation, digest, Instant::now()) {
                    return;
                }
                // `finish` ended the request's earlier grant's runs (and its posted offers,
                // which must stay withdrawn only for that one); this grant's runs go live now.
                st.granted.add(&runs);
                if let Some(old) = st.grant_runs.insert(req.to_string(), runs) {
                    st.granted.remove(&old);
                    st.draining.insert(req.to_string(), old);
                }
            }
            Err(e) => {
                log::warn!(
                    "kvferry: staging {req}'s blocks for decoders failed ({e}); its decoders \
                     recompute"
                );
                grants.abandon(req, generation);
                let held = grants.holds(req);
                if let Some(r) = st.reqs.get_mut(req) {
                    r.granted = held;
                }
            }
        }
    }

    /// Sends `call` to every rank of the prefill engine; with `wait_pending`, asks again while a
    /// rank answers `Pending`, until the transfer timeout.
    fn call_ranks(
        &self,
        t: &LeaseTarget,
        call: &LeaseCall,
        wait_pending: bool,
    ) -> Vec<(usize, Result<LeaseReply>)> {
        let Some(agent) = &self.agent else {
            return Vec::new();
        };
        let deadline = Instant::now() + self.cfg.pd.as_ref().map_or(Duration::ZERO, |p| p.timeout);
        let payload = call.encode();
        (0..t.remote_tp_size.max(1))
            .map(|q| {
                let r = (|| {
                    let port = u16::try_from(u32::from(t.remote_port) + q).map_err(|_| {
                        ConnectorError::Config("remote port + rank exceeds 65535".into())
                    })?;
                    let peer = self.peer_for(agent, &t.remote_host, port)?;
                    let mut backoff = Duration::from_millis(5);
                    loop {
                        let reply = LeaseReply::decode(&agent.call(&peer, payload.clone())?);
                        if reply != LeaseReply::Pending
                            || !wait_pending
                            || Instant::now() >= deadline
                        {
                            return Ok(reply);
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(200));
                    }
                })();
                (q as usize, r)
            })
            .collect()
    }

    /// Prefill side, before the TCP transport serves a peer: only READs, and only of blocks
    /// under a live grant. (UCX reads cannot be refused by the target; the release after them
    /// is what proves them, see [`crate::lease`].)
    fn may_serve(&self, peer: &str, op: kvcore::wire::Op, descs: &[Descriptor]) -> Verdict {
        if op != kvcore::wire::Op::Read {
            return Verdict::Refuse(format!("{peer} may not write into this engine's KV cache"));
        }
        let region = self.cache.lock().as_ref().and_then(|c| c.region);
        let st = self.st.lock();
        let mut runs = Vec::new();
        for (i, d) in descs.iter().enumerate() {
            let why = || {
                format!(
                    "descriptor {i} ({} bytes at {} of region {}) is not part of a block under a \
                     live grant",
                    d.len, d.offset, d.region
                )
            };
            if Some(d.region) != region {
                return Verdict::Refuse(why());
            }
            match st.granted.covering(d.offset, d.len) {
                Some(r) => runs.extend(r),
                // The engine learns of a finished request's grant a step after the offer went
                // out: a fast decoder may be here first.
                None => return Verdict::NotYet(why()),
            }
        }
        runs.sort_unstable();
        runs.dedup();
        // Counted under the state lock, in which grants end: a grant that ends after this
        // point keeps its request from the engine until the serve is over.
        Verdict::Serve(Some(Box::new(ServeGuard::new(&self.serving, runs))))
    }

    /// Prefill side: a decoder's lease call, from the authenticated peer `peer`.
    fn answer_lease(&self, peer: &str, payload: &[u8]) -> Vec<u8> {
        let Some(call) = LeaseCall::decode(payload) else {
            log::warn!("kvferry: a malformed lease call from {peer}");
            return LeaseReply::Gone.encode();
        };
        let mut st = self.st.lock();
        let st = &mut *st;
        let Some(grants) = st.grants.as_mut() else {
            return LeaseReply::Gone.encode();
        };
        let (reply, ended) = grants.answer(&call, crate::lease::engine_of(peer), Instant::now());
        if let Some(how) = ended {
            let req = match &call {
                LeaseCall::Extend(g) | LeaseCall::Abort(g) => &g.request,
                LeaseCall::Release { grant, .. } => &grant.request,
            };
            // One grant per request at a time (a new offer ends the earlier one, staging or
            // not), so this is false; kept exact should that ever change.
            let held = grants.holds(req);
            if let Some(r) = st.reqs.get_mut(req) {
                r.granted = held;
            }
            end_runs(st, req);
            match how {
                Ended::Released => st.counters.pulls_served += 1,
                Ended::Aborted => st.counters.pulls_aborted += 1,
            }
        }
        reply.encode()
    }

    fn peer_for(&self, agent: &Agent, host: &str, port: u16) -> Result<String> {
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| ConnectorError::Config(format!("{host}:{port}: {e}")))?
            .next()
            .ok_or_else(|| ConnectorError::Config(format!("{host}:{port} resolves to nothing")))?;
        {
            let mut st = self.st.lock();
            if let Some(p) = st.peers.get(&addr) {
                return Ok(p.clone());
            }
            let now = Instant::now();
            st.unreachable
                .retain(|_, t| now.duration_since(*t) < RECONNECT_AFTER);
            if st.unreachable.contains_key(&addr) {
                return Err(ConnectorError::Config(format!(
                    "{addr} did not answer a moment ago; not asking again yet"
                )));
            }
        }
        match agent.connect(addr) {
            Ok(p) => {
                self.st.lock().peers.insert(addr, p.clone());
                Ok(p)
            }
            Err(e) => {
                let mut st = self.st.lock();
                if st.unreachable.len() < MAX_EARLY {
                    st.unreachable.insert(addr, Instant::now());
                }
                Err(e.into())
            }
        }
    }

    /// Connects to every prefill rank and plans every read, posting nothing: returns the ranks'
    /// agent names and, per read, (rank, local descriptors, remote descriptors).
    #[allow(clippy::type_complexity)]
    fn prepare_pull(&self, spec: &PullSpec) -> Result<Prepared> {
        let agent = self
            .agent
            .as_ref()
            .ok_or_else(|| ConnectorError::Config("P/D is not configured".into()))?;
        if spec.remote_blocks.len() != spec.local_blocks.len() {
            return Err(ConnectorError::Config(format!(
                "{} remote blocks for {} local ones",
                spec.remote_blocks.len(),
                spec.local_blocks.len()
            )));
        }
        let remote_tp = spec.remote_tp_size.max(1);
        let mut peers = Vec::with_capacity(remote_tp as usize);
        for q in 0..remote_tp {
            let port = u16::try_from(u32::from(spec.remote_port) + q)
                .map_err(|_| ConnectorError::Config("remote port + rank exceeds 65535".into()))?;
            peers.push(self.peer_for(agent, &spec.remote_host, port)?);
        }
        if spec.local_blocks.is_empty() {
            return Ok(Prepared {
                peers,
                posts: Vec::new(),
                remote_staged: false,
                local_staged: false,
            });
        }
        let (layout, region, local_staged) = {
            let c = self.cache.lock();
            let c = c
                .as_ref()
                .ok_or_else(|| ConnectorError::Config("no KV cache registered".into()))?;
            (
                c.layout.clone(),
                c.region
                    .ok_or_else(|| ConnectorError::Config("no exported region".into()))?,
                c.staging.is_some(),
            )
        };
        let mut remote_staged = false;
        let reads = tp_reads(
            self.total_kv_heads(layout.geometry()),
            remote_tp,
            self.cfg.tp_size,
            self.cfg.tp_rank,
        )?;
        let mut posts = Vec::with_capacity(reads.len());
        for read in &reads {
            let peer = peers.get(read.src_rank as usize).ok_or_else(|| {
                ConnectorError::Config(format!("no prefill rank {}", read.src_rank))
            })?;
            agent.check_peer_geometry(peer, layout.geometry())?;
            let md = agent
                .peer_metadata(peer)
                .ok_or_else(|| ConnectorError::Config(format!("{peer} vanished")))?;
            let src = md
                .caches
                .iter()
                .find(|c| c.tp_rank == read.src_rank)
                .ok_or_else(|| {
                    ConnectorError::Config(format!(
                        "{peer} exports no cache for TP rank {}",
                        read.src_rank
                    ))
                })?;
            remote_staged |= src.staged;
            let plan = PlanBuilder::new(&src.layout, &layout)?
                .heads(read.heads)?
                .build(&spec.remote_blocks, &spec.local_blocks)?;
            let (mut remote, mut local) = (Vec::new(), Vec::new());
            for c in plan.copies() {
                remote.push(Descriptor {
                    region: src.region,
                    offset: c.src,
                    len: c.len,
                });
                local.push(Descriptor {
                    region,
                    offset: c.dst,
                    len: c.len,
                });
            }
            posts.push((read.src_rank as usize, local, remote));
        }
        posts.sort_by_key(|p| p.0);
        Ok(Prepared {
            peers,
            posts,
            remote_staged,
            local_staged,
        })
    }

    /// The model's KV heads over every TP rank: one latent for MLA (every rank holds it), the
    /// configured total where heads are replicated, else heads per rank × ranks.
    fn total_kv_heads(&self, g: &kvcore::Geometry) -> u32 {
        if matches!(g.head, kvcore::HeadShape::Mla { .. }) {
            return 1;
        }
        self.cfg
            .total_kv_heads
            .unwrap_or(g.kv_heads * self.cfg.tp_size)
    }

    /// The engine finished `req`: report it in `sending` once its saves are done and, on the
    /// prefill side (`grant`: the offer's generation and the blocks it offers), once its grant
    /// ended (every decode rank released it, a decoder aborted it, or the lease ran out). Until
    /// then decoders may read those blocks, and only those.
    pub fn finish(&self, req: &str, grant: Option<(u64, &[u32])>) {
        let cache = self.cache.lock();
        let runs: Vec<(u64, u64)> = match (grant, cache.as_ref()) {
            (Some((_, blocks)), Some(c)) => blocks
                .iter()
                .filter_map(|&b| c.layout.block_runs(b).ok())
                .flatten()
                .collect(),
            _ => Vec::new(),
        };
        let staging = cache.as_ref().and_then(|c| c.staging.as_ref());
        let mut guard = self.st.lock();
        let st = &mut *guard;
        let r = st.reqs.entry(req.to_string()).or_default();
        r.finishing = true;
        let (Some((g, blocks)), Some(grants)) = (grant, st.grants.as_mut()) else {
            return;
        };
        let digest = crate::lease::blocks_digest(blocks);
        r.granted = true;
        let Some(staging) = staging else {
            grants.grant(req, g, digest, Instant::now());
            // A request id offered again replaces its earlier grant, and that grant's runs.
            end_runs(st, req);
            st.granted.add(&runs);
            st.grant_runs.insert(req.to_string(), runs);
            return;
        };
        // Staged: the grant goes live once its blocks are in the copy decoders read
        // (`Core::staged`); until then calls about it are answered pending. The copy starts
        // after the state lock is released (decoders' lease calls need it meanwhile); the
        // cache's lock keeps the staging alive.
        grants.stage(req, g);
        end_runs(st, req);
        drop(guard);
        let tx = self.lease_tx.clone();
        let (r, done_runs) = (req.to_string(), runs);
        let started = staging.copy(
            Direction::Out,
            blocks,
            Box::new(move |result| {
                let _ = tx.send(LeaseJob::Staged {
                    req: r,
                    generation: g,
                    digest,
                    runs: done_runs,
                    result,
                });
            }),
        );
        if let Err(e) = started {
            let _ = self.lease_tx.send(LeaseJob::Staged {
                req: req.to_string(),
                generation: g,
                digest,
                runs: Vec::new(),
                result: Err(kvtier::CopyError::Failed(e.to_string())),
            });
        }
    }

    /// Collects what finished since the last call. Non-blocking.
    pub fn poll(&self) -> Finished {
        let tier_done = {
            let c = self.cache.lock();
            match c.as_ref().and_then(|c| c.tiers.as_ref()) {
                Some((t, _)) => (t.poll(), t.events()),
                None => (Vec::new(), Vec::new()),
            }
        };
        let net_done = match &self.agent {
            Some(a) => {
                // The connector's protocol uses calls, not notifications: whatever a peer sends
                // as one is dropped here, so it cannot pile up.
                let _ = a.notifications();
                a.poll()
            }
            None => Vec::new(),
        };
        let mut st = self.st.lock();
        let st = &mut *st;
        st.events.extend(tier_done.1);
        for c in tier_done.0 {
            match st.tier_ops.remove(&c.id) {
                Some(Op::Save { req, blocks }) => {
                    let failed = c.blocks.iter().filter(|b| b.result.is_err()).count();
                    st.counters.saved_blocks += (blocks - failed) as u64;
                    st.counters.save_failed_blocks += failed as u64;
                    if failed > 0 && st.failed_saves.len() < MAX_EARLY {
                        st.failed_saves.push(req.clone());
                    }
                    if let Some(r) = st.reqs.get_mut(&req) {
                        r.saves -= 1;
                    }
                }
                Some(Op::Load { req, blocks }) => {
                    if c.blocks.iter().any(|b| b.result.is_err()) {
                        st.done.failed_recving.push(req.clone());
                    }
                    for b in &c.blocks {
                        match (&b.result, blocks.get(&b.hash)) {
                            (Ok(()), _) => st.counters.onboarded_blocks += 1,
                            (Err(_), Some(&local)) => {
                                st.counters.onboard_failed_blocks += 1;
                                st.done.load_errors.push(local);
                            }
                            (Err(_), None) => st.counters.onboard_failed_blocks += 1,
                        }
                    }
                    load_done(st, &req);
                }
                Some(Op::Read { .. }) | None => {}
            }
        }
        for t in net_done {
            self.read_done(st, t.id, t.result);
        }
        let now = Instant::now();
        let expired = st
            .grants
            .as_mut()
            .map(|g| g.expire(now))
            .unwrap_or_default();
        for id in expired {
            st.counters.lease_expired += 1;
            log::warn!("kvferry: no decoder released {id} within its lease; freeing its blocks");
            let held = st.grants.as_ref().is_some_and(|g| g.holds(&id));
            if let Some(r) = st.reqs.get_mut(&id) {
                r.granted = held;
            }
            end_runs(st, &id);
        }
        let mut ready = Vec::new();
        let serving = self.serving.lock();
        st.draining
            .retain(|_, runs| runs.iter().any(|(start, _)| serving.contains_key(start)));
        drop(serving);
        for (id, r) in st.reqs.iter() {
            let drained = !st.draining.contains_key(id);
            if r.finishing && r.saves == 0 && !r.granted && r.loads == 0 && drained {
                ready.push(id.clone());
            }
        }
        for id in &ready {
            st.reqs.remove(id);
        }
        st.done.sending.extend(ready);
        // Requests whose loads ended and that are not finishing need no state.
        st.reqs
            .retain(|_, r| r.finishing || r.saves > 0 || r.loads > 0 || r.granted);
        std::mem::take(&mut st.done)
    }

    /// Waits until nothing is in flight (saves, loads, pulls), or `timeout`.
    pub fn drain(&self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let mut all = Finished::default();
        loop {
            let f = self.poll();
            all.sending.extend(f.sending);
            all.recving.extend(f.recving);
            all.load_errors.extend(f.load_errors);
            all.failed_recving.extend(f.failed_recving);
            all.offers.extend(f.offers);
            let busy = {
                let st = self.st.lock();
                !st.tier_ops.is_empty() || !st.net_ops.is_empty() || !st.pulls.is_empty()
            };
            if !busy || Instant::now() >= deadline {
                return all;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn counters(&self) -> ConnectorCounters {
        self.st.lock().counters
    }

    pub fn tier_stats(&self) -> Option<kvtier::TierStats> {
        self.cache
            .lock()
            .as_ref()
            .and_then(|c| c.tiers.as_ref())
            .map(|(t, _)| t.stats())
    }

    /// Stored/removed events per tier since the last call (for cache-aware routers).
    pub fn take_events(&self) -> Vec<TierEvent> {
        std::mem::take(&mut self.st.lock().events)
    }

    /// The notes of the blocks this connector's tiers recovered from G3 at registration, once
    /// (a scheduler restores its descriptions from them before it applies their events).
    pub fn take_recovered_notes(&self) -> Vec<(BlockHash, Vec<u8>)> {
        std::mem::take(&mut self.st.lock().recovered_notes)
    }

    /// Lets in-flight work finish and, with G3 configured, writes every G2 block to it, so an
    /// engine restarted on the same directory finds them. For orderly engine shutdown.
    pub fn shutdown(&self, timeout: Duration) -> Result<usize> {
        let start = Instant::now();
        self.drain(timeout);
        let has_g3 = self.cfg.offload.as_ref().is_some_and(|o| o.nvme.is_some());
        let registered = self.cache.lock().is_some();
        if has_g3 && registered {
            return self.flush(timeout.saturating_sub(start.elapsed()));
        }
        Ok(0)
    }

    /// Writes every G2 block to G3 (when configured), so a restart finds them.
    pub fn flush(&self, timeout: Duration) -> Result<usize> {
        self.tiers(|t, _| Ok(t.flush(timeout)?))
    }
}

/// A grant ended: its blocks are no longer readable by peers (unless another grant holds them).
fn end_runs(st: &mut State, req: &str) {
    // An offer posted under a key is gone with its grant: a decoder asking again (its own retry
    // under the same key) is told there is none rather than handed a grant that ended.
    st.board.withdraw_request(req);
    if let Some(runs) = st.grant_runs.remove(req) {
        st.granted.remove(&runs);
        // Serves that began under the grant may still be reading: `poll` waits for them.
        st.draining.insert(req.to_string(), runs);
    }
}

/// A pull that loaded nothing: its blocks are load errors and the request failed receiving.
fn pull_failed(st: &mut State, req: &str, blocks: &[u32]) {
    st.done.load_errors.extend(blocks);
    st.done.failed_recving.push(req.to_string());
}

fn load_done(st: &mut State, req: &str) {
    if let Some(r) = st.reqs.get_mut(req) {
        r.loads = r.loads.saturating_sub(1);
        if r.loads == 0 {
            st.done.recving.push(req.to_string());
        }
    }
}

/// The tier a stored/removed event names, as vLLM's KV events spell a medium.
pub fn medium(tier: Tier) -> &'static str {
    match tier {
        Tier::Dram => "CPU",
        Tier::Nvme => "STORAGE",
    }
}

impl PullSpec {
    /// Where this pull's grant lives.
    pub fn target(&self) -> LeaseTarget {
        LeaseTarget {
            remote_host: self.remote_host.clone(),
            remote_port: self.remote_port,
            remote_tp_size: self.remote_tp_size,
            remote_request_id: self.remote_request_id.clone(),
            grant: self.grant,
        }
    }
}

impl LeaseTarget {
    fn grant_id(&self) -> GrantId {
        GrantId {
            request: self.remote_request_id.clone(),
            generation: self.grant,
        }
    }
}
