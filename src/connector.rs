//! The engine-agnostic connector: what an inference engine's KV connector does, minus the engine.
//! It owns the tier engine (offload to G2/G3 by block hash) and the agent (prefill→decode pulls),
//! tracks every request's saves, loads and pulls, and answers the engine's three questions —
//! which requests may free their blocks, which finished loading, which blocks failed to load.
//! vLLM's `KVFerryConnector` is a thin adapter over it; a Rust engine can drive it directly.
//!
//! The protocol for prefill/decode is vLLM's NixlConnector's: the prefill side finishes a request
//! and keeps its blocks; the decode side reads them (`pull`) and notifies the prefill side, which
//! then frees them — or frees them after `free_timeout` if no decoder comes.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Sender};
use kvcore::wire::ExportedCache;
use kvcore::{
    tp_reads, BlockHash, CacheLayout, Descriptor, MemKind, PlanBuilder, Region, RegionId,
};
use kvnet::{Agent, AgentConfig, NetError, Transport};
use kvtier::{G1Id, NvmeConfig, Tier, TierConfig, TierEngine, TierError, TierEvent};
use parking_lot::Mutex;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Prefix of the notification a decoder sends once it has pulled a request's blocks.
const PULLED: &str = "kvferry-pulled:";

/// Requests tracked at once; beyond it, notifications for unknown requests are dropped.
const MAX_TRACKED: usize = 1 << 20;

/// How long a decoder's notification is kept for a request the engine has not finished yet.
const EARLY_NOTE_TTL: Duration = Duration::from_secs(600);

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
}

#[derive(Clone, Debug)]
pub struct PdConfig {
    /// Where this engine's agent listens for decoders (port 0: any free port).
    pub listen: SocketAddr,
    pub transport: Transport,
    pub token: Option<String>,
    /// A prefill request whose decoder never pulls frees its blocks after this long.
    pub free_timeout: Duration,
    /// Connecting to a prefill engine and each transfer step give up after this long.
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct ConnectorConfig {
    pub engine_id: String,
    pub offload: Option<OffloadConfig>,
    pub pd: Option<PdConfig>,
    pub tp_size: u32,
    pub tp_rank: u32,
}

/// What the decode side needs to pull one request's blocks (vLLM's `kv_transfer_params`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullSpec {
    pub remote_host: String,
    pub remote_port: u16,
    pub remote_request_id: String,
    pub remote_tp_size: u32,
    /// Blocks on the prefill side, and where each lands here (same length; a full local prefix
    /// hit leaves both empty and only notifies the prefill side).
    pub remote_blocks: Vec<u32>,
    pub local_blocks: Vec<u32>,
}

/// The engine's answer for one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Finished {
    /// Requests whose blocks may be freed now (saves done, pull served or timed out).
    pub sending: Vec<String>,
    /// Requests whose loads (onboard or pull) are over, successfully or not.
    pub recving: Vec<String>,
    /// Local block ids that did not load: the engine recomputes them.
    pub load_errors: Vec<u32>,
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
    /// Prefill side: requests a decoder pulled and released.
    pub pulls_served: u64,
    /// Prefill side: requests freed because no decoder came in time.
    pub free_timeouts: u64,
    pub lookups: u64,
    pub lookup_hits: u64,
}

#[derive(Default)]
struct Req {
    saves: usize,
    loads: usize,
    finishing: bool,
    await_pull: Option<Instant>,
    /// Prefill side: decoder notifications received, and how many the decoders said to expect
    /// (one per decode rank). They can arrive before the engine tells us the request finished.
    notified: u32,
    expected: u32,
    /// When the first early notification came (to drop ones whose request never finishes).
    noted_at: Option<Instant>,
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
    Pull {
        req: String,
        blocks: Vec<u32>,
        /// A pull from several prefill ranks posts several reads into the same blocks: only
        /// the first counts them as pulled.
        first: bool,
    },
}

struct Cache {
    layout: CacheLayout,
    tiers: Option<(TierEngine, G1Id)>,
    region: Option<RegionId>,
}

#[derive(Default)]
struct State {
    reqs: HashMap<String, Req>,
    tier_ops: HashMap<u64, Op>,
    net_ops: HashMap<u64, Op>,
    /// Reads that finished before the pull thread recorded them.
    early: HashMap<u64, std::result::Result<u64, NetError>>,
    /// Prefill engines we pulled from, by address.
    peers: HashMap<SocketAddr, String>,
    done: Finished,
    counters: ConnectorCounters,
    events: Vec<TierEvent>,
}

/// The connector: [`Core`] (reachable through `Deref`) plus the thread that connects to prefill
/// engines and posts pulls, so that a slow or unreachable prefill engine never stalls the caller
/// (the engine's forward pass) for its connect timeout.
pub struct Connector {
    core: Arc<Core>,
    pulls: Mutex<Option<Sender<(String, PullSpec)>>>,
    puller: Mutex<Option<JoinHandle<()>>>,
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
        let core = Arc::new(Core::new(cfg)?);
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
        })
    }

    /// Decode side: pulls a request's blocks from its prefill engine, then notifies it; returns
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
    }
}

/// Everything the connector does besides scheduling pulls.
pub struct Core {
    cfg: ConnectorConfig,
    agent: Option<Agent>,
    cache: Mutex<Option<Cache>>,
    st: Mutex<State>,
}

impl Core {
    fn new(cfg: ConnectorConfig) -> Result<Core> {
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
                a.timeout = pd.timeout;
                a.transports = match pd.transport {
                    Transport::Tcp => vec![Transport::Tcp],
                    Transport::Ucx => vec![Transport::Ucx, Transport::Tcp],
                };
                let agent = Agent::new(a)?;
                if pd.transport == Transport::Ucx && agent.ucx_library().is_none() {
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
        Ok(Core {
            cfg,
            agent,
            cache: Mutex::new(None),
            st: Mutex::new(State::default()),
        })
    }

    pub fn engine_id(&self) -> &str {
        &self.cfg.engine_id
    }

    /// The address decoders pull from (P/D only).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.agent.as_ref().map(Agent::listen_addr)
    }

    /// Registers the engine's KV cache (host memory: CPU engines, or a host mirror).
    ///
    /// # Safety
    /// `base..base + layout.span_bytes()` must stay valid until the connector is dropped, and the
    /// engine must not write a block while it is being saved or pulled by a peer, nor touch a
    /// block being loaded, until the connector reports the request finished.
    pub unsafe fn register_cache(&self, layout: CacheLayout, base: *mut u8) -> Result<()> {
        let mut slot = self.cache.lock();
        if slot.is_some() {
            return Err(ConnectorError::Config(
                "the KV cache is already registered".into(),
            ));
        }
        let tiers = match &self.cfg.offload {
            Some(o) => {
                let mut tc = TierConfig::new(*layout.geometry(), o.dram_blocks);
                if let Some((dir, blocks)) = &o.nvme {
                    tc.nvme = Some(NvmeConfig::new(dir.clone(), *blocks));
                }
                let t = TierEngine::new(tc)?;
                // SAFETY: forwarded from this function's contract.
                let g1 = unsafe { t.register_g1(layout.clone(), base) }?;
                // Blocks recovered from G3 are announced like new ones, so a scheduler that
                // mirrors the tiers from events knows them after a restart.
                self.st.lock().events.extend(t.snapshot());
                Some((t, g1))
            }
            None => None,
        };
        let region = match &self.agent {
            Some(a) => {
                // SAFETY: forwarded from this function's contract.
                let id = unsafe {
                    a.register(Region {
                        kind: MemKind::Host,
                        base: base as u64,
                        len: layout.span_bytes(),
                    })
                }?;
                a.export_cache(ExportedCache {
                    region: id,
                    layout: layout.clone(),
                    tp_size: self.cfg.tp_size,
                    tp_rank: self.cfg.tp_rank,
                })?;
                Some(id)
            }
            None => None,
        };
        *slot = Some(Cache {
            layout,
            tiers,
            region,
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

    /// Saves blocks `(hash, local block)` of `req` to the tiers, asynchronously.
    pub fn save(&self, req: &str, blocks: &[(BlockHash, u32)]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let id = self.tiers(|t, g1| Ok(t.offload(g1, blocks)?))?;
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
                st.done.recving.push(req.to_string());
            }
        }
    }

    /// Connects, plans and posts one pull (on the pull thread), replacing the placeholder load
    /// that [`Connector::pull`] counted by the reads posted.
    fn run_pull(&self, req: &str, spec: &PullSpec) {
        let r = self.start_pull(spec);
        let mut st = self.st.lock();
        let st = &mut *st;
        match r {
            Ok(ids) => {
                if let Some(r) = st.reqs.get_mut(req) {
                    r.loads += ids.len();
                }
                for (i, (id, blocks)) in ids.into_iter().enumerate() {
                    st.net_ops.insert(
                        id,
                        Op::Pull {
                            req: req.to_string(),
                            blocks,
                            first: i == 0,
                        },
                    );
                    if let Some(result) = st.early.remove(&id) {
                        pull_done(st, id, result);
                    }
                }
            }
            Err(e) => {
                log::warn!(
                    "kvferry: pulling {req} from {}:{} failed: {e}",
                    spec.remote_host,
                    spec.remote_port
                );
                // The prefill engine may have restarted: connect afresh next time.
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
                st.counters.pull_failures += 1;
                st.done.load_errors.extend(&spec.local_blocks);
            }
        }
        // The placeholder: done now (the request finishes here if no read was posted).
        load_done(st, req);
    }

    fn peer_for(&self, agent: &Agent, host: &str, port: u16) -> Result<String> {
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| ConnectorError::Config(format!("{host}:{port}: {e}")))?
            .next()
            .ok_or_else(|| ConnectorError::Config(format!("{host}:{port} resolves to nothing")))?;
        if let Some(p) = self.st.lock().peers.get(&addr) {
            return Ok(p.clone());
        }
        let p = agent.connect(addr)?;
        self.st.lock().peers.insert(addr, p.clone());
        Ok(p)
    }

    /// Posts the reads of one pull; returns the transfer ids and the local blocks of each.
    fn start_pull(&self, spec: &PullSpec) -> Result<Vec<(u64, Vec<u32>)>> {
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
        // Every decode rank tells every prefill rank, which frees once all decode ranks did.
        let payload =
            format!("{PULLED}{}:{}", spec.remote_request_id, self.cfg.tp_size).into_bytes();
        let mut peers = Vec::with_capacity(remote_tp as usize);
        for q in 0..remote_tp {
            let port = u16::try_from(u32::from(spec.remote_port) + q)
                .map_err(|_| ConnectorError::Config("remote port + rank exceeds 65535".into()))?;
            peers.push(self.peer_for(agent, &spec.remote_host, port)?);
        }
        if spec.local_blocks.is_empty() {
            for p in &peers {
                agent.notify(p, payload.clone())?;
            }
            return Ok(Vec::new());
        }
        let (layout, region) = {
            let c = self.cache.lock();
            let c = c
                .as_ref()
                .ok_or_else(|| ConnectorError::Config("no KV cache registered".into()))?;
            (
                c.layout.clone(),
                c.region
                    .ok_or_else(|| ConnectorError::Config("no exported region".into()))?,
            )
        };
        let total_heads = layout.geometry().kv_heads * self.cfg.tp_size;
        let reads = tp_reads(total_heads, remote_tp, self.cfg.tp_size, self.cfg.tp_rank)?;
        // Plan every read before posting any, so a bad peer fails the pull before bytes move.
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
        let mut ids = Vec::new();
        for (q, peer) in peers.iter().enumerate() {
            let mine: Vec<_> = posts.iter().filter(|p| p.0 == q).collect();
            if mine.is_empty() {
                // A rank we read nothing from (its heads are replicated elsewhere) still waits.
                agent.notify(peer, payload.clone())?;
                continue;
            }
            let last = mine.len() - 1;
            for (i, (_, local, remote)) in mine.into_iter().enumerate() {
                // The last read from each rank carries its notification: it frees on it.
                let notify = (i == last).then(|| payload.clone());
                let id = agent.read(local, peer, remote, notify)?;
                ids.push((id, spec.local_blocks.clone()));
            }
        }
        Ok(ids)
    }

    /// The engine finished `req`: report it in `sending` once its saves are done and, on the
    /// prefill side (`await_pull`), once its decoder pulled it or `free_timeout` passed.
    pub fn finish(&self, req: &str, await_pull: bool) {
        let timeout = self.cfg.pd.as_ref().map(|p| p.free_timeout);
        let mut st = self.st.lock();
        let st = &mut *st;
        let r = st.reqs.entry(req.to_string()).or_default();
        r.finishing = true;
        if await_pull {
            if r.expected > 0 && r.notified >= r.expected {
                // Every decoder was done before the engine told us: nothing to wait for.
                st.counters.pulls_served += 1;
            } else {
                r.await_pull = Some(Instant::now() + timeout.unwrap_or_default());
            }
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
        let (net_done, notes) = match &self.agent {
            Some(a) => (a.poll(), a.notifications()),
            None => (Vec::new(), Vec::new()),
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
                    if let Some(r) = st.reqs.get_mut(&req) {
                        r.saves -= 1;
                    }
                }
                Some(Op::Load { req, blocks }) => {
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
                Some(Op::Pull { .. }) | None => {}
            }
        }
        for t in net_done {
            pull_done(st, t.id, t.result);
        }
        let now = Instant::now();
        for n in notes {
            let text = String::from_utf8_lossy(&n.payload);
            let Some(rest) = text.strip_prefix(PULLED) else {
                continue;
            };
            // "<request>:<decode ranks>"; a request id may itself contain ':'.
            let (id, expected) = match rest.rsplit_once(':') {
                Some((id, n)) => match n.parse::<u32>() {
                    Ok(n) if n > 0 => (id, n),
                    _ => (rest, 1),
                },
                None => (rest, 1),
            };
            if !st.reqs.contains_key(id) && st.reqs.len() >= MAX_TRACKED {
                // Notifications for requests we do not know cannot grow memory without bound.
                log::warn!("kvferry: ignoring a notification for unknown request {id}");
                continue;
            }
            let r = st.reqs.entry(id.to_string()).or_default();
            r.notified += 1;
            r.expected = expected;
            r.noted_at.get_or_insert(now);
            if r.notified >= r.expected && r.await_pull.take().is_some() {
                st.counters.pulls_served += 1;
            }
        }
        let mut ready = Vec::new();
        for (id, r) in st.reqs.iter_mut() {
            if r.await_pull.is_some_and(|d| d <= now) {
                r.await_pull = None;
                st.counters.free_timeouts += 1;
                log::warn!("kvferry: no decoder pulled {id} in time; freeing its blocks");
            }
            if r.finishing && r.saves == 0 && r.await_pull.is_none() && r.loads == 0 {
                ready.push(id.clone());
            }
        }
        for id in &ready {
            st.reqs.remove(id);
        }
        st.done.sending.extend(ready);
        // Requests whose loads ended and that are not finishing need no state.
        st.reqs.retain(|_, r| {
            let early = r
                .noted_at
                .is_some_and(|t| now.duration_since(t) < EARLY_NOTE_TTL);
            r.finishing || r.saves > 0 || r.loads > 0 || r.await_pull.is_some() || early
        });
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
            let busy = {
                let st = self.st.lock();
                !st.tier_ops.is_empty() || !st.net_ops.is_empty()
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

/// One posted read of a pull finished. A read can finish before the pull thread has recorded
/// it (it posts, then takes the state lock): such results wait in `early` until it does.
fn pull_done(st: &mut State, id: u64, result: std::result::Result<u64, NetError>) {
    let Some(Op::Pull { req, blocks, first }) = st.net_ops.remove(&id) else {
        st.early.insert(id, result);
        return;
    };
    match result {
        Ok(bytes) => {
            if first {
                st.counters.pulled_blocks += blocks.len() as u64;
            }
            st.counters.pulled_bytes += bytes;
        }
        Err(e) => {
            log::warn!("kvferry: pull of {req} failed: {e}");
            st.counters.pull_failures += 1;
            st.done.load_errors.extend(blocks);
        }
    }
    load_done(st, &req);
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
        Tier::Nvme => "DISK",
    }
}
