//! The scheduler half of the connector: decides, from an engine's request state, which blocks to
//! load from the tiers, which to save, what to pull from a prefill engine and what to offer a
//! decode engine — and hands each step's decisions to the [`crate::Connector`] (the worker half)
//! as a [`StepPlan`]. No I/O: it may run in another process than the worker, so it keeps a mirror
//! of which block hashes the worker's tiers hold, fed by the worker's stored/removed events. A
//! block evicted between lookup and load fails to load and is recomputed; nothing is lost.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvcore::BlockHash;
use kvtier::{Access, EvictionPolicy, PolicyKind, Tier, TierEvent};

use crate::lease::Generations;
use crate::rendezvous::Posted;
use crate::{LeaseTarget, PullSpec};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub engine_id: String,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Offload to the tiers (save finished requests' blocks, load prefixes from them).
    pub offload: bool,
    /// Prefill/decode disaggregation.
    pub pd: bool,
    /// What this engine advertises to decoders.
    pub host: String,
    /// The agent's port, when fixed by configuration; otherwise learnt from the worker.
    pub port: Option<u16>,
    pub tp_size: u32,
    /// How long a prefill engine holds an offered request's blocks for decoders (NixlConnector's
    /// `kv_lease_duration`); a decode engine extends the leases of requests still waiting.
    pub lease: Duration,
    /// The scheduler owns eviction: the worker's tiers (with `TierConfig::caller_evicts`) drop
    /// nothing on their own, and the scheduler keeps at most this many distinct blocks in them
    /// (G3's capacity, or G2's without G3), discarding its least recently used ones — never one
    /// it promised to a load still in flight. So a block the mirror shows is a block the worker
    /// holds, and a planned load cannot miss (vLLM's default failure policy fails requests whose
    /// loads miss). `None`: the worker evicts, and a load can miss in the window before the
    /// worker's removal reaches the mirror.
    pub capacity: Option<u64>,
    /// How the scheduler chooses what to discard under `capacity`.
    pub eviction: PolicyKind,
    /// Decode side, llm-d's `offloading` protocol: how long a request waits for its prefill
    /// engine's offer before it is computed here.
    pub offer_wait: Duration,
    /// vLLM's KV cache groups (hybrid models: one per attention kind), in vLLM's order; empty:
    /// one group of full attention. Every group's blocks come from one pool of pages of one
    /// size (the worker checks the layout), so a block id names the same page whichever group
    /// holds it, and a group's block is stored under [`BlockHash::in_group`].
    pub groups: Vec<GroupKind>,
    /// Each step's saves carry their blocks' descriptions as notes ([`StepPlan::notes`]), for
    /// the worker to keep with the blocks in G3: a scheduler restarted over the same G3
    /// restores them ([`Scheduler::noted`]) and announces recovered blocks in full. Worth it
    /// only with G3 and routers listening.
    pub notes: bool,
}

/// How one KV cache group attends, which decides the blocks a prefix needs in that group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    Full,
    /// Sliding-window attention over `window` tokens; `retained` more tokens' blocks are kept
    /// below the window (vLLM's `extra_retained_tokens`, for speculative decoding).
    Window {
        window: u32,
        retained: u32,
    },
    /// A recurrent state per block boundary (Mamba, Gated DeltaNet) under vLLM's "align" cache
    /// mode: the block at position `j` holds the state after `(j + 1) × block_size` tokens once
    /// the request is past it, so a prefix of `k` blocks needs only block `k - 1` of this group
    /// (vLLM's `get_num_skipped_tokens` is `total - 1`). vLLM frees those states two steps after
    /// writing them and hands each one to the connector as it is written
    /// ([`Scheduler::boundary_states`]).
    State,
}

impl GroupKind {
    /// The first block a sequence of `total` computed tokens still holds in this group. vLLM
    /// (`SingleTypeKVCacheManager::add_local_computed_blocks`, `get_num_skipped_tokens`) gives
    /// the blocks before it as its null block and allocates real ones from it on, so a hit of
    /// `total` tokens must bring every block from here, and only those.
    pub fn first_held(&self, total: u32, block_size: u32) -> usize {
        match *self {
            GroupKind::Full => 0,
            GroupKind::Window { window, retained } => {
                (total
                    .saturating_add(1)
                    .saturating_sub(window.saturating_add(retained))
                    / block_size.max(1)) as usize
            }
            GroupKind::State => (total.saturating_sub(1) / block_size.max(1)) as usize,
        }
    }
}

/// vLLM's null block: what a group's block list holds where the group keeps no block (before a
/// sliding window). It is never loaded into, saved, offered or pulled.
pub const NULL_BLOCK: u32 = 0;

/// A prefill engine's offer, as the decode engine's request carries it (vLLM's
/// `kv_transfer_params` with `do_remote_prefill`).
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteParams {
    pub host: String,
    pub port: u16,
    pub request_id: String,
    pub engine_id: String,
    pub tp_size: u32,
    /// The prompt's blocks on the prefill engine, from the first: `groups` lists of equal
    /// length one after the other (one per KV cache group).
    pub block_ids: Vec<u32>,
    /// How many KV cache groups `block_ids` holds (1 but for hybrid models).
    pub groups: u32,
    /// The generation of the grant the offer was made under (0: none, which is refused).
    pub grant: u64,
    /// When the prefill engine said the grant ends unless extended (seconds since the Unix
    /// epoch; 0: not said). An offer that arrives after it is refused up front, so a late
    /// request is computed here instead of failing its load.
    pub expires_unix: f64,
    /// Prompt tokens whose KV the offered blocks hold (NixlConnector's `remote_num_tokens`;
    /// 0: not said). A model with state groups goes on from the prefill's state, which must be
    /// after exactly the tokens this engine does not compute.
    pub num_tokens: u32,
}

impl RemoteParams {
    /// Group `g`'s blocks (empty when the list does not split into `groups` equal parts).
    pub fn group(&self, g: usize) -> &[u32] {
        let n = self.groups.max(1) as usize;
        if self.block_ids.len() % n != 0 {
            return &[];
        }
        let len = self.block_ids.len() / n;
        self.block_ids.get(g * len..(g + 1) * len).unwrap_or(&[])
    }

    fn target(&self) -> LeaseTarget {
        LeaseTarget {
            remote_host: self.host.clone(),
            remote_port: self.port,
            remote_tp_size: self.tp_size,
            remote_request_id: self.request_id.clone(),
            grant: self.grant,
        }
    }
}

/// A decode request under llm-d's `offloading` protocol (`remote_prefiller` in its
/// `kv_transfer_params`): which prefill engine to ask for the offer, and under which key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemotePrefiller {
    pub key: String,
    pub host: String,
    pub port: u16,
}

/// Where a decode request's offer under the `offloading` protocol stands.
enum Awaited {
    /// Asked for since then; the offer must be for the prompt with this digest (and this many
    /// tokens).
    Asked {
        since: Instant,
        prompt: u64,
        prompt_tokens: u32,
    },
    Ready(RemoteParams),
    /// None came in time, or it was refused: the prompt is computed here.
    Missed,
}

/// What a prefill engine offers decoders for a finished request.
#[derive(Clone, Debug, PartialEq)]
pub struct Offer {
    pub remote: RemoteParams,
    /// When the lease runs out if no decoder extends it (seconds since the Unix epoch; vLLM
    /// NixlConnector's `remote_blocks_expiry_time`).
    pub expires_unix: f64,
}

/// Where a request's loaded tokens come from, for vLLM's cache-hit metrics split by tier
/// (`CacheHitSource`): DRAM (`host`), NVMe (`disk`), another engine (`p2p`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HitSources {
    pub host: u32,
    pub disk: u32,
    pub p2p: u32,
}

pub use crate::described::Described;

/// A grant's generation and the blocks it offers.
pub type OfferedGrant = (u64, Vec<u32>);

/// One step's decisions for the worker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepPlan {
    pub saves: Vec<(String, Vec<BlockHash>, Vec<u32>)>,
    pub loads: Vec<(String, Vec<BlockHash>, Vec<u32>)>,
    pub pulls: Vec<(String, PullSpec)>,
    /// Requests whose blocks the worker frees only when it says so: (request, the grant's
    /// generation and the blocks offered, when decoders are to pull it).
    pub finished: Vec<(String, Option<OfferedGrant>)>,
    /// Decode side: grants to keep alive (their requests still wait to be scheduled).
    pub extends: Vec<LeaseTarget>,
    /// Decode side: grants whose requests went away (or whose offers were refused) before a
    /// pull: the prefill engine may free them now.
    pub aborts: Vec<LeaseTarget>,
    /// Empty the tiers (the engine reset its prefix cache with the connector's).
    pub reset: bool,
    /// Blocks the worker drops from its tiers before this step's saves (scheduler-owned
    /// eviction).
    pub discards: Vec<BlockHash>,
    /// Decode side: offers to ask prefill engines for (the `offloading` protocol).
    pub asks: Vec<(String, RemotePrefiller)>,
    /// Prefill side: offers to post under their keys (`None`: none will come).
    pub posts: Vec<(String, Option<Posted>)>,
    /// Decode side: asks to stop (their requests went away).
    pub cancels: Vec<String>,
    /// Sliding-window blocks that leave their window after this step: the worker saves them
    /// when the step's forward pass is done and before the step ends (vLLM frees them when it
    /// schedules the next one, without waiting for the connector).
    pub window_saves: Vec<(String, Vec<BlockHash>, Vec<u32>)>,
    /// With [`SchedulerConfig::notes`]: the note of each block saved this step (in `saves` or
    /// `window_saves`) that has a description, by tier key.
    pub notes: HashMap<BlockHash, Vec<u8>>,
}

enum Plan {
    Pull {
        start: usize,
    },
    Load {
        hashes: Vec<BlockHash>,
        start: usize,
    },
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    /// Block hash -> per tier (DRAM, NVMe), the TP ranks whose worker holds it (bit r). A
    /// block is loadable only when every rank holds it: each rank loads its own heads.
    cached: HashMap<BlockHash, [u64; 2]>,
    plans: HashMap<String, Plan>,
    step: StepPlan,
    /// Rank 0's events for routers, with their blocks' descriptions as they were when the
    /// event came (a removed block's leaves with it).
    events: Vec<(TierEvent, Option<Described>)>,
    generations: Generations,
    /// Decode side: requests with an accepted offer not yet allocated, their last heartbeat,
    /// and how often they beat.
    waiting: HashMap<String, (LeaseTarget, Instant, Duration)>,
    /// Decode side: requests whose offer is asked for under the `offloading` protocol.
    awaiting: HashMap<String, Awaited>,
    /// Blocks being saved or in the mirror, described for routers' events (bounded by them).
    described: HashMap<BlockHash, Described>,
    /// The last allocated load's sources (vLLM asks right after the allocation; one slot, so
    /// nothing piles up when it does not ask).
    last_sources: Option<(String, HitSources)>,
    /// Resets asked of the worker, and how many it reported done: in between, `Stored` events
    /// may name blocks of before the reset, and the mirror ignores them.
    resets_sent: u64,
    resets_done: u64,
    /// Orders the mirror's blocks for scheduler-owned eviction.
    policy: Box<dyn EvictionPolicy>,
    /// Blocks of loads in flight, by request: never discarded.
    loading: HashMap<String, Vec<BlockHash>>,
    /// Blocks being saved (not yet reported stored), with when: they will take room.
    /// With their position in the saved chain, for the policy.
    saving: HashMap<BlockHash, (Instant, u32)>,
    /// Blocks the tiers asked to drop (not worth an NVMe write) that a load in flight still
    /// needs.
    unwanted: HashSet<BlockHash>,
    /// Blocks discarded and not yet reported removed: a `Stored` event for one of them was
    /// emitted before the worker dropped it, and must not bring it back into the mirror.
    discarded: HashMap<BlockHash, Instant>,
    /// Running requests of a model with sliding-window groups: per group, the position up to
    /// which its window's departed blocks were saved.
    windows: HashMap<String, Vec<usize>>,
}

/// The most prefill ranks an offer may name (every rank is connected to and called).
pub const MAX_REMOTE_TP: u32 = 256;

/// The most KV cache groups an offer may name (vLLM's hybrid models have two or three).
pub const MAX_GROUPS: u32 = 16;

fn tier_index(t: Tier) -> usize {
    match t {
        Tier::Dram => 0,
        Tier::Nvme => 1,
    }
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        let policy = Self::policy_for(&cfg);
        Scheduler {
            cfg,
            cached: HashMap::new(),
            plans: HashMap::new(),
            step: StepPlan::default(),
            events: Vec::new(),
            generations: Generations::new(),
            waiting: HashMap::new(),
            awaiting: HashMap::new(),
            last_sources: None,
            described: HashMap::new(),
            resets_sent: 0,
            resets_done: 0,
            policy,
            loading: HashMap::new(),
            saving: HashMap::new(),
            unwanted: HashSet::new(),
            discarded: HashMap::new(),
            windows: HashMap::new(),
        }
    }

    fn policy_for(cfg: &SchedulerConfig) -> Box<dyn EvictionPolicy> {
        cfg.eviction.build(cfg.capacity.unwrap_or(1 << 16))
    }

    /// The worker's agent port, learnt from its handshake.
    pub fn set_port(&mut self, port: u16) {
        if self.cfg.port.is_none() {
            self.cfg.port = Some(port);
        }
    }

    /// Updates the mirror from TP rank 0's worker (the only one without tensor parallelism).
    pub fn apply(&mut self, events: &[TierEvent]) {
        self.apply_from(0, events);
    }

    /// Updates the mirror of TP rank `rank`'s tiers; rank 0's events are kept for
    /// [`Scheduler::take_events`] (one event per block, not one per rank).
    pub fn apply_from(&mut self, rank: u32, events: &[TierEvent]) {
        if rank == 0 {
            // Routers hear of blocks stored and removed; `Unwanted` is between us and the worker.
            for e in events {
                let hash = match e {
                    TierEvent::Unwanted { .. } => continue,
                    TierEvent::Stored { hash, .. } | TierEvent::Removed { hash, .. } => hash,
                };
                self.events.push((*e, self.described.get(hash).cloned()));
            }
        }
        let resetting = self.resets_done < self.resets_sent;
        let me = 1u64 << rank.min(63);
        for e in events {
            match *e {
                TierEvent::Stored { .. } if resetting => {}
                TierEvent::Stored { hash, .. } if self.discarded.contains_key(&hash) => {}
                TierEvent::Stored { hash, tier } => {
                    let new = !self.cached.contains_key(&hash);
                    self.cached.entry(hash).or_default()[tier_index(tier)] |= me;
                    let depth = self.saving.get(&hash).map_or(0, |s| s.1);
                    if self.loadable(&hash) {
                        self.saving.remove(&hash);
                    }
                    if new {
                        // One use when it enters the mirror — not one per rank and tier (a
                        // spill's `Stored` on NVMe is no use of the block).
                        self.policy.touch(&hash, Access::at(depth));
                    }
                }
                TierEvent::Unwanted { hash } => {
                    // A rank's tiers would drop it rather than write it to NVMe: dropped from
                    // every rank (a block is loadable only where all hold it), once no load in
                    // flight needs it.
                    self.unwanted.insert(hash);
                }
                TierEvent::Removed { hash, tier } => {
                    self.discarded.remove(&hash);
                    if let Some(m) = self.cached.get_mut(&hash) {
                        m[tier_index(tier)] &= !me;
                        if m[0] | m[1] == 0 {
                            self.cached.remove(&hash);
                            self.policy.remove(&hash);
                            self.described.remove(&hash);
                        }
                    }
                }
            }
        }
        self.drop_unwanted();
    }

    /// Discards the blocks the tiers asked to drop, except those a load in flight still needs
    /// (they go once it is over). Out of the mirror first, so no new load is promised them.
    fn drop_unwanted(&mut self) {
        if self.unwanted.is_empty() {
            return;
        }
        let busy: HashSet<&BlockHash> = self.loading.values().flatten().collect();
        let (keep, go): (HashSet<BlockHash>, HashSet<BlockHash>) =
            std::mem::take(&mut self.unwanted)
                .into_iter()
                .partition(|h| busy.contains(h));
        self.unwanted = keep;
        let now = Instant::now();
        for h in go {
            self.saving.remove(&h);
            self.discard(h, now);
        }
    }

    /// Out of the mirror (no load is promised it from now on) and into this step's discards.
    fn discard(&mut self, h: BlockHash, now: Instant) {
        self.cached.remove(&h);
        self.policy.remove(&h);
        self.discarded.insert(h, now);
        self.step.discards.push(h);
    }

    /// Whether every TP rank's worker holds `h`.
    fn loadable(&self, h: &BlockHash) -> bool {
        let all = self.all_ranks();
        self.cached
            .get(h)
            .is_some_and(|m| (m[0] | m[1]) & all == all)
    }

    /// The mirror's rank bits of every TP rank.
    fn all_ranks(&self) -> u64 {
        let tp = self.cfg.tp_size.clamp(1, 64);
        if tp == 64 {
            u64::MAX
        } else {
            (1u64 << tp) - 1
        }
    }

    /// Whether every rank holds `h` in DRAM (else a load of it reads NVMe somewhere).
    fn in_dram(&self, h: &BlockHash) -> bool {
        let all = self.all_ranks();
        self.cached.get(h).is_some_and(|m| m[0] & all == all)
    }

    /// Where the `tokens` vLLM counts as `req`'s external hit come from (vLLM's
    /// `get_external_cache_hit_sources`, asked right after the allocation); they always add up
    /// to `tokens` (NVMe first: a load is as slow as its slowest tier).
    pub fn hit_sources(&self, req: &str, tokens: u32) -> HitSources {
        match &self.last_sources {
            Some((r, s)) if r == req && s.p2p > 0 => HitSources {
                p2p: tokens,
                ..HitSources::default()
            },
            Some((r, s)) if r == req => {
                let disk = s.disk.min(tokens);
                HitSources {
                    host: tokens - disk,
                    disk,
                    p2p: 0,
                }
            }
            _ => HitSources::default(),
        }
    }

    /// The engine reset its prefix cache and the connector's: nothing in the tiers is loaded
    /// from now on, and the worker empties them at its next step.
    pub fn reset(&mut self) {
        self.cached.clear();
        self.policy = Self::policy_for(&self.cfg);
        self.saving.clear();
        self.unwanted.clear();
        self.described.clear();
        self.resets_sent += 1;
        self.step.reset = true;
    }

    /// The worker reports it carried out `n` resets in all.
    pub fn resets_done(&mut self, n: u64) {
        self.resets_done = self.resets_done.max(n);
    }

    /// The engine learnt of a new request (vLLM's `on_new_request`): a decode request with an
    /// offer starts keeping the prefill engine's grant alive from here, however long it waits.
    pub fn arrived(&mut self, req: &str, remote: Option<&RemoteParams>, prompt_tokens: u32) {
        if let (true, Some(r)) = (self.cfg.pd, remote) {
            self.accept(req, r, prompt_tokens);
        }
    }

    /// The engine learnt of a decode request under the `offloading` protocol: its prefill
    /// engine is asked for the offer (by the worker, which has the network), and until it comes
    /// the request cannot say how many tokens it has (see [`Scheduler::matched`]). `prompt` is
    /// [`crate::rendezvous::prompt_digest`] of the request's prompt.
    pub fn expect(&mut self, req: &str, p: &RemotePrefiller, prompt: u64, prompt_tokens: u32) {
        if !self.cfg.pd || self.awaiting.contains_key(req) {
            return;
        }
        self.awaiting.insert(
            req.to_string(),
            Awaited::Asked {
                since: Instant::now(),
                prompt,
                prompt_tokens,
            },
        );
        self.step.asks.push((req.to_string(), p.clone()));
    }

    /// The worker's answer to an ask: the offer, or `None` (the prefill engine withdrew it, or
    /// did not answer in time). An offer for another prompt, or one that comes after the
    /// request stopped waiting, is not pulled and its grant is aborted; one whose grant another
    /// request here holds already (two requests under one key) is left to that request. An
    /// offer taken is accepted at once, so its heartbeats start now, however long the request
    /// then waits to be scheduled.
    pub fn fetched(&mut self, req: &str, offer: Option<Posted>) {
        let asked = match self.awaiting.get(req) {
            Some(Awaited::Asked {
                prompt,
                prompt_tokens,
                ..
            }) => Some((*prompt, *prompt_tokens)),
            _ => None,
        };
        let Some(p) = offer else {
            if asked.is_some() {
                self.awaiting.insert(req.to_string(), Awaited::Missed);
            }
            return;
        };
        let target = p.remote.target();
        let Some((want, prompt_tokens)) = asked else {
            self.step.aborts.push(target);
            return;
        };
        let held =
            self.waiting
                .iter()
                .any(|(r, (t, ..))| r != req && *t == target)
                || self.awaiting.iter().any(|(r, a)| {
                    r != req && matches!(a, Awaited::Ready(o) if o.target() == target)
                });
        if held {
            log::warn!(
                "kvferry: the offer fetched for {req} is another request's here already (one \
                 key for two requests); computing the prompt here"
            );
            self.awaiting.insert(req.to_string(), Awaited::Missed);
        } else if p.prompt != want {
            log::warn!(
                "kvferry: the offer fetched for {req} is for another prompt (prefill request \
                 {}); computing the prompt here",
                p.remote.request_id
            );
            self.awaiting.insert(req.to_string(), Awaited::Missed);
            self.step.aborts.push(target);
        } else if self.accept(req, &p.remote, prompt_tokens) {
            self.awaiting
                .insert(req.to_string(), Awaited::Ready(p.remote));
        } else {
            self.awaiting.insert(req.to_string(), Awaited::Missed);
        }
    }

    /// Whether an offer can be pulled: it must cover every prompt block and name its grant;
    /// anything else (a client's hand-made params, a prompt the prefill tokenized differently)
    /// would have blocks count as computed that nothing wrote. A refused offer's grant is
    /// aborted and the prompt is computed here.
    fn accept(&mut self, req: &str, r: &RemoteParams, prompt_tokens: u32) -> bool {
        if self.waiting.contains_key(req) {
            return true;
        }
        let prompt_tokens = self.pulled_tokens(prompt_tokens);
        let need = prompt_tokens.div_ceil(self.cfg.block_size.max(1)) as usize;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let groups = self.group_count();
        let bs = self.cfg.block_size.max(1);
        // The blocks vLLM will allocate here for the whole prompt, per group: the offer must
        // have a real block for each (a sliding-window group's window), or the pull could not
        // write them all.
        let lacking = (0..groups).find(|&g| {
            let kind = self.group_kind(g);
            let from = kind.first_held(prompt_tokens, bs).min(need);
            let ids = r.group(g);
            ids.len() < need || (kind != GroupKind::Full && ids[from..need].contains(&NULL_BLOCK))
        });
        let why = if self.has_state() && r.num_tokens != prompt_tokens {
            // A state cannot be wound back (nor brought forward): only the prefill's state
            // after exactly the tokens pulled lets this engine go on.
            Some(format!(
                "its state is after {} prompt tokens, this engine goes on after {prompt_tokens} \
                 (a model with state groups: the prefill computes all but the last)",
                r.num_tokens
            ))
        } else if r.num_tokens != 0 && r.num_tokens < prompt_tokens {
            // Blocks the prefill computed fewer tokens of: the rest of their slots hold
            // whatever their last request left there.
            Some(format!(
                "its blocks hold {} prompt tokens of the {prompt_tokens} this engine would load",
                r.num_tokens
            ))
        } else if self.has_state() && r.tp_size != self.cfg.tp_size {
            // A state page is not laid out by KV heads: it moves whole, between equal ranks.
            Some(format!(
                "a prefill TP size of {} for a model with state groups (this engine's is {})",
                r.tp_size, self.cfg.tp_size
            ))
        } else if r.tp_size == 0 || r.tp_size > MAX_REMOTE_TP {
            Some(format!("a prefill TP size of {}", r.tp_size))
        } else if r.groups as usize != groups {
            Some(format!(
                "{} KV cache groups where this engine has {groups} (another model, or the \
                 hybrid KV cache manager on in one engine only)",
                r.groups
            ))
        } else if let Some(g) = lacking {
            Some(format!(
                "{} remote blocks in KV cache group {g} for {prompt_tokens} prompt tokens \
                 ({need} blocks, the last {} of them real)",
                r.group(g).len(),
                need - self.group_kind(g).first_held(prompt_tokens, bs).min(need)
            ))
        } else if r.grant == 0 {
            Some("it names no grant".to_string())
        } else if r.expires_unix > 0.0 && r.expires_unix < now {
            Some(format!("its lease ended {:.1} s ago", now - r.expires_unix))
        } else {
            None
        };
        if let Some(why) = why {
            log::warn!("kvferry: refusing the offer for {req}: {why}; computing the prompt here");
            self.step.aborts.push(r.target());
            return false;
        }
        // The prefill engine's lease may be shorter than ours: beat three times per what is
        // left of it when the offer arrives (the offer's expiry is the earliest the grant ends).
        let left = if r.expires_unix > 0.0 {
            Duration::try_from_secs_f64((r.expires_unix - now).max(0.0)).unwrap_or(self.cfg.lease)
        } else {
            self.cfg.lease
        };
        let every = (left.min(self.cfg.lease) / 3).max(Duration::from_millis(20));
        self.waiting
            .insert(req.to_string(), (r.target(), Instant::now(), every));
        true
    }

    /// The engine reports `req`'s load over (vLLM's `finished_recving`): its blocks may be
    /// evicted again.
    pub fn loaded(&mut self, req: &str) {
        self.loading.remove(req);
        self.drop_unwanted();
    }

    /// Makes room for `n` more blocks under scheduler-owned eviction: least recently used
    /// blocks go (to `discards`), except those of loads in flight.
    fn make_room(&mut self, n: usize) {
        let Some(cap) = self.cfg.capacity else { return };
        let now = Instant::now();
        // A save that never reported back (it failed) stops holding room after a while.
        self.saving
            .retain(|_, t| now.duration_since(t.0) < Duration::from_secs(120));
        self.discarded
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(120));
        let used = self.cached.len() + self.saving.len() + n;
        let mut over = used.saturating_sub(cap as usize);
        if over == 0 {
            return;
        }
        let busy: std::collections::HashSet<BlockHash> =
            self.loading.values().flatten().copied().collect();
        while over > 0 {
            let Some(h) = self.policy.victim(&|h| !busy.contains(h)) else {
                break;
            };
            self.discard(h, now);
            over -= 1;
        }
    }

    pub fn take_events(&mut self) -> Vec<TierEvent> {
        self.take_described_events()
            .into_iter()
            .map(|(e, _)| e)
            .collect()
    }

    /// [`Scheduler::take_events`] with each block's description (vLLM's hash and group, its
    /// tokens), where this engine saved it.
    pub fn take_described_events(&mut self) -> Vec<(TierEvent, Option<Described>)> {
        std::mem::take(&mut self.events)
    }

    /// Describes the blocks of a finished request that are being saved or held (call after
    /// [`Scheduler::finished`]): `tokens` are all its token ids (block i holds
    /// `tokens[i * block_size..][..block_size]`), `lora` its adapter's name.
    pub fn describe(&mut self, hashes: &[BlockHash], tokens: &[u32], lora: Option<&str>) {
        let bs = self.cfg.block_size.max(1) as usize;
        for g in 0..self.group_count() as u32 {
            for (i, h) in hashes.iter().enumerate().take(tokens.len() / bs) {
                let key = h.in_group(g);
                if self.described.contains_key(&key)
                    || !(self.saving.contains_key(&key) || self.cached.contains_key(&key))
                {
                    continue;
                }
                self.described.insert(
                    key,
                    Described {
                        hash: *h,
                        group: g,
                        parent: i.checked_sub(1).map(|p| hashes[p]),
                        tokens: tokens[i * bs..(i + 1) * bs].to_vec(),
                        lora: lora.map(str::to_string),
                    },
                );
            }
        }
        if self.described.len() > self.cached.len() + self.saving.len() + 1024 {
            // Saves that never reported back (they failed) leave descriptions behind.
            let (cached, saving) = (&self.cached, &self.saving);
            self.described
                .retain(|h, _| cached.contains_key(h) || saving.contains_key(h));
        }
    }

    /// A block's description (by its tier key), if it was saved by this engine (not recovered
    /// from G3).
    pub fn description(&self, h: &BlockHash) -> Option<&Described> {
        self.described.get(h)
    }

    /// vLLM's KV cache groups (one without HMA).
    pub fn group_count(&self) -> usize {
        self.cfg.groups.len().max(1)
    }

    /// The prompt tokens a decode request takes from its prefill engine: all of them, but for
    /// models with a state group the last one, which this engine computes — the prefill
    /// computed all but it, and its state after them is what this engine goes on from (vLLM
    /// would otherwise recompute the last of a whole-prompt hit, applying it to a state that
    /// already holds it).
    fn pulled_tokens(&self, prompt_tokens: u32) -> u32 {
        if self.has_state() {
            prompt_tokens.saturating_sub(1)
        } else {
            prompt_tokens
        }
    }

    /// Whether a KV cache group holds recurrent state ([`GroupKind::State`]).
    pub fn has_state(&self) -> bool {
        self.cfg.groups.contains(&GroupKind::State)
    }

    fn group_kind(&self, g: usize) -> GroupKind {
        self.cfg.groups.get(g).copied().unwrap_or(GroupKind::Full)
    }

    /// The longest prefix, in blocks, that the tiers can bring from block `start` on, up to
    /// block `end`: in a full-attention group every block of it, in a sliding-window group the
    /// blocks vLLM holds for it ([`GroupKind::first_held`]) — so a sliding-window group moves
    /// only its window, and the hit is never longer than what every group can load.
    fn tier_hit(&self, hashes: &[BlockHash], start: usize, end: usize) -> usize {
        let bs = self.cfg.block_size.max(1);
        let groups = self.group_count();
        let mut n = end;
        for g in 0..groups {
            if self.group_kind(g) == GroupKind::Full {
                let run = hashes[start..end]
                    .iter()
                    .take_while(|h| self.loadable(&h.in_group(g as u32)))
                    .count();
                n = n.min(start + run);
            }
        }
        // Shorter hits need other window blocks: try each, longest first (a window is a few
        // blocks, so this is O(blocks × window) at worst).
        while n > start {
            let fits = (0..groups).all(|g| match self.group_kind(g) {
                GroupKind::Full => true,
                kind => {
                    let from = kind.first_held(n as u32 * bs, bs).max(start);
                    hashes[from..n]
                        .iter()
                        .all(|h| self.loadable(&h.in_group(g as u32)))
                }
            });
            if fits {
                break;
            }
            n -= 1;
        }
        n - start
    }

    /// The positions `[start, start + n)` of every group whose blocks are real (not vLLM's null
    /// block in a sliding-window group), as (group, position, block).
    fn held(&self, blocks: &[&[u32]], start: usize, n: usize) -> Vec<(u32, usize, u32)> {
        blocks
            .iter()
            .enumerate()
            .take(self.group_count())
            .flat_map(|(g, ids)| {
                let kind = self.group_kind(g);
                (start..start + n).filter_map(move |i| {
                    let id = *ids.get(i)?;
                    (kind == GroupKind::Full || id != NULL_BLOCK).then_some((g as u32, i, id))
                })
            })
            .collect()
    }

    /// Leading blocks of `hashes` every rank's tiers hold, as far as the mirror knows.
    pub fn lookup(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.loadable(h)).count()
    }

    /// A decode request's offer: the one its params carry (`nixlv2`), else the one fetched for
    /// it (`offloading`). `Err(())`: still asked for, within the wait.
    fn offer_for(
        &mut self,
        req: &str,
        remote: Option<&RemoteParams>,
    ) -> Result<Option<RemoteParams>, ()> {
        if let Some(r) = remote {
            return Ok(Some(r.clone()));
        }
        match self.awaiting.get(req) {
            Some(Awaited::Asked { since, .. }) if since.elapsed() < self.cfg.offer_wait => Err(()),
            Some(Awaited::Asked { .. }) => {
                log::warn!(
                    "kvferry: no offer for {req} came from its prefill engine within {:?}; \
                     computing the prompt here",
                    self.cfg.offer_wait
                );
                self.awaiting.insert(req.to_string(), Awaited::Missed);
                Ok(None)
            }
            Some(Awaited::Ready(r)) => Ok(Some(r.clone())),
            Some(Awaited::Missed) | None => Ok(None),
        }
    }

    /// Tokens beyond the `computed` ones (the engine's own prefix cache) that can be loaded,
    /// asynchronously: the whole rest of the prompt from a prefill engine, or the leading blocks
    /// the tiers hold — always leaving at least one prompt token to compute. `None`: not known
    /// yet (the request's offer is still asked for); vLLM asks again next step.
    pub fn matched(
        &mut self,
        req: &str,
        remote: Option<&RemoteParams>,
        prompt_tokens: u32,
        num_tokens: u32,
        hashes: &[BlockHash],
        computed: u32,
    ) -> Option<u32> {
        let bs = self.cfg.block_size.max(1);
        let start = (computed / bs) as usize;
        let remote = self.offer_for(req, remote).ok()?;
        if let (true, Some(r)) = (self.cfg.pd, remote.as_ref()) {
            if !self.accept(req, r, prompt_tokens) {
                self.plans.remove(req);
                self.awaiting.remove(req);
                return Some(0);
            }
            let count = self.pulled_tokens(prompt_tokens).saturating_sub(computed);
            if count > 0 {
                self.plans.insert(req.to_string(), Plan::Pull { start });
            }
            return Some(count);
        }
        if self.cfg.offload {
            let end = ((num_tokens.saturating_sub(1) / bs) as usize).min(hashes.len());
            let wanted = hashes.get(start..end).unwrap_or(&[]);
            let hits = if start < end {
                self.tier_hit(hashes, start, end)
            } else {
                0
            };
            if hits > 0 {
                self.plans.insert(
                    req.to_string(),
                    Plan::Load {
                        hashes: wanted[..hits].to_vec(),
                        start,
                    },
                );
                return Some(hits as u32 * bs);
            }
        }
        Some(0)
    }

    /// The engine allocated `blocks` (all of the request's, from the first) for `external`
    /// tokens to load: plan the load or the pull. A remote offer with nothing to load (a full
    /// local prefix hit) still becomes a pull, so the prefill engine hears it may free.
    pub fn allocated(
        &mut self,
        req: &str,
        remote: Option<&RemoteParams>,
        blocks: &[u32],
        external: u32,
    ) {
        self.allocated_groups(req, remote, &[blocks], external);
    }

    /// [`Scheduler::allocated`] with the request's blocks in each KV cache group (vLLM's
    /// `KVCacheBlocks.get_block_ids()`). Every real block of the loaded range is written — a
    /// block vLLM allocated that the plan has no KV for is loaded under its key anyway, whose
    /// miss fails the load (recomputed) rather than leaving the block unwritten under a hash.
    pub fn allocated_groups(
        &mut self,
        req: &str,
        remote: Option<&RemoteParams>,
        blocks: &[&[u32]],
        external: u32,
    ) {
        let plan = self.plans.remove(req);
        let bs = self.cfg.block_size.max(1);
        // One transfer per request: a fetched offer is used once (a preempted request that comes
        // back computes its prompt), as `do_remote_prefill` is cleared for one that came along.
        let fetched = match self.awaiting.remove(req) {
            Some(Awaited::Ready(r)) => Some(r),
            _ => None,
        };
        let remote = remote.or(fetched.as_ref());
        let accepted = self.waiting.remove(req).is_some();
        if let (true, Some(r), true, 0) = (self.cfg.pd, remote, accepted, external) {
            // Nothing to load (a full local hit, or vLLM skipping external KV for prompt
            // logprobs): no pull, whose end vLLM would be told of for a request it never
            // waited for; the prefill engine may free now.
            self.step.aborts.push(r.target());
            return;
        }
        if let (true, Some(r), true) = (self.cfg.pd, remote, accepted) {
            let (mut local, mut remote_blocks) = (Vec::new(), Vec::new());
            if let (true, Some(Plan::Pull { start })) = (external > 0, &plan) {
                let n = external.div_ceil(bs) as usize;
                let mut short = false;
                for (g, i, id) in self.held(blocks, *start, n) {
                    local.push(id);
                    match r.group(g as usize).get(i) {
                        Some(&rid)
                            if rid != NULL_BLOCK
                                || self.group_kind(g as usize) == GroupKind::Full =>
                        {
                            remote_blocks.push(rid)
                        }
                        _ => short = true,
                    }
                }
                if short {
                    // The offer lacks a block vLLM allocated here (`accept` checks the window
                    // it expects vLLM to hold): never shortened to fit — a remote list shorter
                    // than the local one fails the pull (every local block a load error), it
                    // does not leave blocks unwritten.
                    log::warn!("kvferry: the offer for {req} lacks blocks this engine allocated");
                    remote_blocks.clear();
                }
            }
            self.last_sources = Some((
                req.to_string(),
                HitSources {
                    p2p: external,
                    ..HitSources::default()
                },
            ));
            self.step.pulls.push((
                req.to_string(),
                PullSpec {
                    remote_host: r.host.clone(),
                    remote_port: r.port,
                    remote_request_id: r.request_id.clone(),
                    remote_tp_size: r.tp_size,
                    grant: r.grant,
                    offer_blocks: crate::lease::blocks_digest(&r.block_ids),
                    remote_blocks,
                    local_blocks: local,
                },
            ));
            return;
        }
        if let (true, Some(Plan::Load { hashes, start })) = (external > 0, plan) {
            let n = ((external / bs) as usize).min(hashes.len());
            let (mut hs, mut ids, mut on_disk) = (Vec::new(), Vec::new(), HashSet::new());
            for (g, i, id) in self.held(blocks, start, n) {
                let key = hashes[i - start].in_group(g);
                if !self.in_dram(&key) {
                    on_disk.insert(i);
                }
                hs.push(key);
                ids.push(id);
            }
            let on_disk = on_disk.len() as u32;
            self.last_sources = Some((
                req.to_string(),
                HitSources {
                    host: (n as u32 - on_disk) * bs,
                    disk: on_disk * bs,
                    p2p: 0,
                },
            ));
            self.policy.begin_batch();
            for (h, (_, i, _)) in hs.iter().zip(self.held(blocks, start, n)) {
                self.policy.touch(h, Access::at(i as u32));
            }
            self.loading.insert(req.to_string(), hs.clone());
            self.step.loads.push((req.to_string(), hs, ids));
        }
    }

    /// The engine finished `req` (`ok`: normally, not aborted). Returns whether the engine must
    /// keep its blocks until the worker reports it (saves in flight, or a decoder to come), and
    /// the offer for decoders when it was a prefill for a remote decode.
    ///
    /// `post`: the request's key and [`crate::rendezvous::prompt_digest`] under the `offloading`
    /// protocol: the offer (or that none will come) is posted under the key for the decoder to
    /// fetch.
    #[allow(clippy::too_many_arguments)]
    pub fn finished(
        &mut self,
        req: &str,
        ok: bool,
        remote_decode: bool,
        hashes: &[BlockHash],
        blocks: &[u32],
        computed_tokens: u32,
        post: Option<(&str, u64)>,
    ) -> (bool, Option<Offer>) {
        self.finished_groups(
            req,
            ok,
            remote_decode,
            hashes,
            &[blocks],
            computed_tokens,
            post,
        )
    }

    /// [`Scheduler::finished`] with the request's blocks in each KV cache group (vLLM's
    /// `request_finished_all_groups`): each group's real blocks are saved under their group's
    /// keys (a sliding-window group holds only its window by now), and offered, all groups'
    /// lists one after the other.
    #[allow(clippy::too_many_arguments)]
    pub fn finished_groups(
        &mut self,
        req: &str,
        ok: bool,
        remote_decode: bool,
        hashes: &[BlockHash],
        blocks: &[&[u32]],
        computed_tokens: u32,
        post: Option<(&str, u64)>,
    ) -> (bool, Option<Offer>) {
        let groups = self.group_count();
        // One length for every group's list, so the offer splits back into them.
        let len = blocks
            .iter()
            .take(groups)
            .map(|b| b.len())
            .min()
            .filter(|_| blocks.len() >= groups)
            .unwrap_or(0);
        self.plans.remove(req);
        self.windows.remove(req);
        // vLLM reports a load over before it finishes the request; an aborted one ends here.
        self.loading.remove(req);
        self.drop_unwanted();
        match self.awaiting.remove(req) {
            Some(Awaited::Ready(r)) if !self.waiting.contains_key(req) => {
                // Fetched, never accepted: the prefill engine may free.
                self.step.aborts.push(r.target());
            }
            // Still asked for: the worker stops asking.
            Some(Awaited::Asked { .. }) => self.step.cancels.push(req.to_string()),
            _ => {}
        }
        if let Some((t, _, _)) = self.waiting.remove(req) {
            // Finished (aborted) while waiting for its pull: the prefill engine may free.
            self.step.aborts.push(t);
        }
        let mut delay = false;
        if ok && self.cfg.offload && len > 0 {
            let n = hashes
                .len()
                .min(len)
                .min((computed_tokens / self.cfg.block_size.max(1)) as usize);
            self.policy.begin_batch();
            // Per group: the blocks the tiers hold from the first on are touched, the rest
            // from the first they lack are saved.
            let (mut keys, mut ids) = (Vec::new(), Vec::new());
            let mut missing = vec![false; groups];
            for (g, i, id) in self.held(blocks, 0, n) {
                let key = hashes[i].in_group(g);
                let m = &mut missing[g as usize];
                *m = *m || !self.loadable(&key);
                if *m {
                    keys.push((key, i as u32));
                    ids.push(id);
                } else {
                    self.policy.touch(&key, Access::at(i as u32));
                }
            }
            let new: Vec<(BlockHash, u32)> = keys
                .iter()
                .filter(|(k, _)| !self.saving.contains_key(k) && !self.loadable(k))
                .copied()
                .collect();
            self.make_room(new.len());
            let now = Instant::now();
            for (h, depth) in new {
                self.saving.insert(h, (now, depth));
            }
            if !keys.is_empty() {
                self.step.saves.push((
                    req.to_string(),
                    keys.into_iter().map(|(k, _)| k).collect(),
                    ids,
                ));
                delay = true;
            }
        }
        let mut offer = None;
        if ok && self.cfg.pd && remote_decode && len > 0 {
            if let Some(port) = self.cfg.port {
                let expires_unix = (SystemTime::now() + self.cfg.lease)
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                offer = Some(Offer {
                    remote: RemoteParams {
                        host: self.cfg.host.clone(),
                        port,
                        request_id: req.to_string(),
                        engine_id: self.cfg.engine_id.clone(),
                        tp_size: self.cfg.tp_size,
                        block_ids: blocks
                            .iter()
                            .take(groups)
                            .flat_map(|b| b[..len].iter().copied())
                            .collect(),
                        groups: groups as u32,
                        grant: self.generations.issue(),
                        expires_unix,
                        num_tokens: computed_tokens
                            .min((len as u32).saturating_mul(self.cfg.block_size)),
                    },
                    expires_unix,
                });
                delay = true;
            } else {
                log::warn!("kvferry: no agent port known yet; {req} is not offered to decoders");
            }
        }
        if let (true, Some((key, prompt))) = (self.cfg.pd, post) {
            let posted = offer.as_ref().map(|o| Posted {
                remote: o.remote.clone(),
                prompt,
            });
            self.step.posts.push((key.to_string(), posted));
        }
        if delay {
            let grant = offer
                .as_ref()
                .map(|o| (o.remote.grant, o.remote.block_ids.clone()));
            self.step.finished.push((req.to_string(), grant));
        }
        (delay, offer)
    }

    /// A running request's step, for models with sliding-window groups: `blocks` is its block
    /// table per group as this step runs it, `computed` its tokens computed before the step,
    /// `scheduled` those the step computes. The blocks its windows leave behind once the step
    /// is done — those at positions from `first_held(computed)` (still held this step) up to
    /// `first_held(computed + scheduled)` (freed when vLLM schedules the next step) — are saved
    /// by the worker at the end of this step ([`StepPlan::window_saves`]). They are full and
    /// written by this step's forward pass or earlier, and no one writes a request's full block
    /// while it holds it, so the bytes saved are the block's. So every position of a window
    /// group reaches the tiers once (the window left at the end with the request's other
    /// blocks), and a later prefix hit finds the window it ends in.
    ///
    /// With asynchronous scheduling vLLM frees on fewer tokens (those in flight are not
    /// counted), never earlier: a block saved here may stay held a step longer, which is fine.
    ///
    /// Returns whether blocks are saved this step (describe them then: their events come
    /// before the request ends).
    pub fn stepped(
        &mut self,
        req: &str,
        hashes: &[BlockHash],
        blocks: &[&[u32]],
        computed: u32,
        scheduled: u32,
    ) -> bool {
        if !self.cfg.offload {
            return false;
        }
        let bs = self.cfg.block_size.max(1);
        let groups = self.group_count();
        let done = computed.saturating_add(scheduled);
        let mut keys = Vec::new();
        let mut ids = Vec::new();
        let mut progress = self.windows.remove(req).unwrap_or_else(|| vec![0; groups]);
        for (g, ids_g) in blocks.iter().enumerate().take(groups) {
            let kind = self.group_kind(g);
            if matches!(kind, GroupKind::Full | GroupKind::State) {
                // A state group's blocks leave the same way but vLLM names them for us: a
                // state block's position says nothing of the state in it until it is complete.
                continue;
            }
            let from = kind.first_held(computed, bs).max(progress[g]);
            let to = kind
                .first_held(done, bs)
                .min((done / bs) as usize)
                .min(hashes.len())
                .min(ids_g.len());
            for i in from..to {
                let key = hashes[i].in_group(g as u32);
                if ids_g[i] != NULL_BLOCK {
                    keys.push((key, i as u32));
                    ids.push(ids_g[i]);
                }
            }
            progress[g] = progress[g].max(to);
        }
        self.windows.insert(req.to_string(), progress);
        self.save_at_step_end(req, keys, ids)
    }

    /// The boundary states vLLM wrote for a running request this step (`(group, block,
    /// boundary tokens)`, vLLM's `boundary_state_offloads`): block `block` of state group
    /// `group` holds the state after `boundary tokens` when this step's forward pass is done,
    /// so it is saved then ([`StepPlan::window_saves`]) under the key of the prefix it ends —
    /// vLLM frees it two steps on, before the request ends. An entry for another kind of group,
    /// off a block boundary or past the request's hashes is ignored. Returns whether blocks are
    /// saved this step.
    pub fn boundary_states(
        &mut self,
        req: &str,
        hashes: &[BlockHash],
        states: &[(u32, u32, u32)],
    ) -> bool {
        if !self.cfg.offload {
            return false;
        }
        let bs = self.cfg.block_size.max(1);
        let (mut keys, mut ids) = (Vec::new(), Vec::new());
        for &(g, block, boundary) in states {
            let Some(j) = (boundary / bs).checked_sub(1) else {
                continue;
            };
            let j = j as usize;
            // `group_kind` is Full for a group past the engine's.
            if self.group_kind(g as usize) != GroupKind::State
                || boundary % bs != 0
                || block == NULL_BLOCK
                || j >= hashes.len()
            {
                continue;
            }
            keys.push((hashes[j].in_group(g), j as u32));
            ids.push(block);
        }
        self.save_at_step_end(req, keys, ids)
    }

    /// Saves `(key, depth)` from block `ids` at the end of this step, but those the tiers
    /// hold or are saving already (and a key named twice, once).
    fn save_at_step_end(&mut self, req: &str, keys: Vec<(BlockHash, u32)>, ids: Vec<u32>) -> bool {
        let mut seen = HashSet::new();
        let (keys, ids): (Vec<_>, Vec<_>) = keys
            .into_iter()
            .zip(ids)
            .filter(|((k, _), _)| {
                !self.loadable(k) && !self.saving.contains_key(k) && seen.insert(*k)
            })
            .unzip();
        if keys.is_empty() {
            return false;
        }
        self.make_room(keys.len());
        let now = Instant::now();
        self.policy.begin_batch();
        for &(k, depth) in &keys {
            self.saving.insert(k, (now, depth));
        }
        self.step.window_saves.push((
            req.to_string(),
            keys.into_iter().map(|(k, _)| k).collect(),
            ids,
        ));
        true
    }

    /// Whether any KV cache group is a sliding window (the engine then reports its steps to
    /// [`Scheduler::stepped`]).
    pub fn has_windows(&self) -> bool {
        self.cfg.offload && self.cfg.groups.iter().any(|g| *g != GroupKind::Full)
    }

    /// This step's decisions; the next step starts empty. Requests waiting for their pull get a
    /// heartbeat every third of the lease.
    pub fn take_step(&mut self) -> StepPlan {
        let now = Instant::now();
        for (t, last, every) in self.waiting.values_mut() {
            if now.duration_since(*last) >= *every {
                *last = now;
                self.step.extends.push(t.clone());
            }
        }
        if self.cfg.notes {
            let step = &mut self.step;
            for (_, hashes, _) in step.saves.iter().chain(&step.window_saves) {
                for h in hashes {
                    if let Some(n) = self.described.get(h).and_then(Described::note) {
                        step.notes.insert(*h, n);
                    }
                }
            }
        }
        std::mem::take(&mut self.step)
    }

    /// Restores descriptions from the notes a worker's tiers recovered with their blocks
    /// (`(tier key, note)`), before the blocks' `Stored` events are applied. Notes that do not
    /// parse, or describe another block than their key, are dropped. Returns how many were
    /// taken.
    pub fn noted(&mut self, notes: &[(BlockHash, Vec<u8>)]) -> usize {
        let mut taken = 0;
        for (key, note) in notes {
            if let Some(d) = Described::from_note(key, note) {
                self.described.insert(*key, d);
                taken += 1;
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(offload: bool, pd: bool) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            engine_id: "e".into(),
            block_size: 4,
            offload,
            pd,
            host: "10.0.0.1".into(),
            port: Some(7000),
            tp_size: 1,
            lease: Duration::from_secs(30),
            capacity: None,
            eviction: PolicyKind::default(),
            offer_wait: Duration::from_secs(30),
            groups: Vec::new(),
            notes: false,
        })
    }

    fn h(i: u64) -> BlockHash {
        BlockHash::from_u64(i)
    }

    #[test]
    fn loads_the_cached_prefix_beyond_the_engines_own_and_leaves_a_token_to_compute() {
        let mut s = sched(true, false);
        let hashes: Vec<BlockHash> = (0..5).map(h).collect();
        s.apply(
            &(0..5)
                .map(|i| TierEvent::Stored {
                    hash: h(i),
                    tier: Tier::Dram,
                })
                .collect::<Vec<_>>(),
        );
        // 20 tokens = 5 full blocks; 1 block computed locally; at most 4 blocks may load and
        // the last one must leave a token: blocks 1..4 (3 blocks = 12 tokens).
        assert_eq!(s.matched("r", None, 20, 20, &hashes, 4), Some(12));
        s.allocated("r", None, &[50, 51, 52, 53, 54], 12);
        let step = s.take_step();
        assert_eq!(
            step.loads,
            vec![("r".into(), vec![h(1), h(2), h(3)], vec![51, 52, 53])]
        );
        // A removed block stops the prefix there.
        s.apply(&[TierEvent::Removed {
            hash: h(2),
            tier: Tier::Dram,
        }]);
        assert_eq!(s.matched("q", None, 20, 20, &hashes, 0), Some(8));
        assert_eq!(s.take_events().len(), 6);
    }

    #[test]
    fn saved_blocks_are_described_until_they_leave_the_mirror() {
        let mut s = sched(true, false);
        let hashes: Vec<BlockHash> = (0..3).map(h).collect();
        let tokens: Vec<u32> = (100..111).collect(); // 2 full blocks of 4, and 3 tokens
        s.finished("r", true, false, &hashes, &[5, 6, 7], 11, None);
        s.describe(&hashes, &tokens, Some("adapter"));
        let d1 = s.description(&h(1)).expect("described").clone();
        assert_eq!(
            d1,
            Described {
                hash: h(1),
                group: 0,
                parent: Some(h(0)),
                tokens: vec![104, 105, 106, 107],
                lora: Some("adapter".into()),
            }
        );
        assert_eq!(s.description(&h(0)).expect("described").parent, None);
        assert!(
            s.description(&h(2)).is_none(),
            "a partial block is not saved"
        );
        s.apply(&[
            TierEvent::Stored {
                hash: h(1),
                tier: Tier::Dram,
            },
            TierEvent::Removed {
                hash: h(1),
                tier: Tier::Dram,
            },
        ]);
        assert!(s.description(&h(1)).is_none());
        s.reset();
        assert!(s.description(&h(0)).is_none());
    }

    #[test]
    fn saves_carry_notes_and_a_restarted_scheduler_announces_recovered_blocks_in_full() {
        let mut s = Scheduler::new(SchedulerConfig {
            notes: true,
            ..sched(true, false).cfg
        });
        let hashes: Vec<BlockHash> = (0..2).map(h).collect();
        let tokens: Vec<u32> = (100..108).collect();
        s.finished("r", true, false, &hashes, &[5, 6], 8, None);
        s.describe(&hashes, &tokens, Some("adapter"));
        let step = s.take_step();
        assert_eq!(step.saves.len(), 1);
        assert_eq!(step.notes.len(), 2, "one note per saved, described block");
        let want = s.description(&h(1)).expect("described").clone();
        // Without notes configured (no G3): none travel.
        let mut plain = sched(true, false);
        plain.finished("r", true, false, &hashes, &[5, 6], 8, None);
        plain.describe(&hashes, &tokens, None);
        assert!(plain.take_step().notes.is_empty());

        // A new scheduler over the recovered tiers: notes first, then the snapshot's events.
        let mut after = sched(true, false);
        let mut notes: Vec<(BlockHash, Vec<u8>)> = step.notes.into_iter().collect();
        // One note came back damaged and one under another block's key: both are dropped.
        notes.push((h(9), notes[0].1.clone()));
        notes.push((h(0), vec![1, 2, 3]));
        assert_eq!(after.noted(&notes), 2);
        after.apply(
            &(0..3)
                .map(|i| TierEvent::Stored {
                    hash: h(i),
                    tier: Tier::Nvme,
                })
                .collect::<Vec<_>>(),
        );
        let events = after.take_described_events();
        assert_eq!(events.len(), 3);
        assert_eq!(events[1].1.as_ref(), Some(&want), "announced in full");
        assert_eq!(events[0].1.as_ref().map(|d| d.parent), Some(None));
        assert!(events[2].1.is_none(), "no note, no description");
    }

    #[test]
    fn hit_sources_split_a_load_by_tier_and_name_pulls_p2p() {
        let mut s = sched(true, true);
        let hashes: Vec<BlockHash> = (0..4).map(h).collect();
        let at = |i, tier| TierEvent::Stored { hash: h(i), tier };
        s.apply(&[
            at(0, Tier::Dram),
            at(1, Tier::Dram),
            at(2, Tier::Nvme),
            at(3, Tier::Dram),
        ]);
        assert_eq!(s.matched("r", None, 17, 17, &hashes, 0), Some(16));
        s.allocated("r", None, &[5, 6, 7, 8, 9], 16);
        let want = HitSources {
            host: 12,
            disk: 4,
            p2p: 0,
        };
        assert_eq!(s.hit_sources("r", 16), want);
        // Always adding up to what vLLM counted; another request is not this one's.
        let fewer = s.hit_sources("r", 3);
        assert_eq!((fewer.host + fewer.disk, fewer.disk), (3, 3));
        assert_eq!(s.hit_sources("q", 16), HitSources::default());
        let o = offer(vec![1, 2, 3], 7);
        assert_eq!(s.matched("d", Some(&o), 10, 10, &[], 0), Some(10));
        s.allocated("d", Some(&o), &[20, 21, 22], 10);
        assert_eq!(s.hit_sources("d", 10).p2p, 10);
    }

    #[test]
    fn saves_only_blocks_the_tiers_lack_and_delays_the_free() {
        let mut s = sched(true, false);
        s.apply(&[TierEvent::Stored {
            hash: h(0),
            tier: Tier::Nvme,
        }]);
        let hashes: Vec<BlockHash> = (0..3).map(h).collect();
        let (delay, offer) = s.finished("r", true, false, &hashes, &[7, 8, 9, 10], 13, None);
        assert!(delay && offer.is_none());
        let step = s.take_step();
        assert_eq!(step.saves, vec![("r".into(), vec![h(1), h(2)], vec![8, 9])]);
        assert_eq!(step.finished, vec![("r".into(), None)]);
        // Aborted requests are neither saved nor delayed.
        assert_eq!(
            s.finished("x", false, false, &hashes, &[1, 2, 3], 12, None),
            (false, None)
        );
    }

    #[test]
    fn prefill_offers_its_blocks_and_decode_pulls_beyond_its_local_hit() {
        let mut p = sched(false, true);
        let (delay, offer) = p.finished("p1", true, true, &[], &[5, 6, 7], 10, None);
        let offer = offer.expect("offer");
        assert!(delay);
        assert_eq!(offer.remote.block_ids, vec![5, 6, 7]);
        assert_eq!(
            (offer.remote.host.as_str(), offer.remote.port),
            ("10.0.0.1", 7000)
        );
        assert_eq!(
            p.take_step().finished,
            vec![("p1".into(), Some((offer.remote.grant, vec![5, 6, 7])))]
        );
        assert_ne!(offer.remote.grant, 0);

        let mut d = sched(false, true);
        // 10 prompt tokens, 4 computed locally (block 0): 6 to pull into blocks 1 and 2.
        assert_eq!(
            d.matched("d1", Some(&offer.remote), 10, 10, &[], 4),
            Some(6)
        );
        d.allocated("d1", Some(&offer.remote), &[20, 21, 22], 6);
        let step = d.take_step();
        let (req, spec) = &step.pulls[0];
        assert_eq!(req, "d1");
        assert_eq!(
            (spec.remote_blocks.clone(), spec.local_blocks.clone()),
            (vec![6, 7], vec![21, 22])
        );
        // A full local hit pulls nothing (vLLM must not hear of a load it did not wait for)
        // and tells the prefill engine it may free.
        assert_eq!(
            d.matched("d2", Some(&offer.remote), 10, 10, &[], 10),
            Some(0)
        );
        d.allocated("d2", Some(&offer.remote), &[20, 21, 22], 0);
        let step = d.take_step();
        assert!(step.pulls.is_empty(), "{:?}", step.pulls);
        assert_eq!(step.aborts, vec![offer.remote.target()]);
    }

    fn prefiller() -> RemotePrefiller {
        RemotePrefiller {
            key: "kv-1".into(),
            host: "10.0.0.1".into(),
            port: 7777,
        }
    }

    #[test]
    fn offloading_protocol_the_prefill_posts_its_offer_and_the_decoder_waits_for_it() {
        use crate::rendezvous::prompt_digest;
        let prompt = prompt_digest(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], b"");
        let mut p = sched(false, true);
        let (_, offer) = p.finished(
            "p1",
            true,
            true,
            &[],
            &[5, 6, 7],
            10,
            Some(("kv-1", prompt)),
        );
        let offer = offer.expect("offer");
        let posts = p.take_step().posts;
        let posted = match posts.as_slice() {
            [(k, Some(posted))] if k == "kv-1" => posted.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!((&posted.remote, posted.prompt), (&offer.remote, prompt));
        // A request that failed posts that none will come.
        p.finished("p2", false, true, &[], &[1], 0, Some(("kv-2", prompt)));
        assert_eq!(p.take_step().posts, vec![("kv-2".to_string(), None)]);

        let mut d = sched(false, true);
        d.expect("d1", &prefiller(), prompt, 10);
        assert_eq!(d.take_step().asks, vec![("d1".to_string(), prefiller())]);
        // Asked twice (vLLM's on_new_request again after a preemption): one ask.
        d.expect("d1", &prefiller(), prompt, 10);
        assert!(d.take_step().asks.is_empty());
        // Nothing is claimed until the offer is here.
        assert_eq!(d.matched("d1", None, 10, 10, &[], 0), None);
        d.fetched("d1", Some(posted.clone()));
        assert_eq!(d.matched("d1", None, 10, 10, &[], 4), Some(6));
        d.allocated("d1", None, &[20, 21, 22], 6);
        let step = d.take_step();
        let (req, spec) = &step.pulls[0];
        assert_eq!(req, "d1");
        assert_eq!(
            (
                spec.remote_blocks.clone(),
                spec.local_blocks.clone(),
                spec.grant
            ),
            (vec![6, 7], vec![21, 22], offer.remote.grant)
        );
        // Used once: after a preemption the prompt is computed here.
        assert_eq!(d.matched("d1", None, 10, 10, &[], 0), Some(0));
    }

    #[test]
    fn offloading_protocol_offers_for_another_prompt_late_or_withdrawn_are_computed_here() {
        use crate::rendezvous::prompt_digest;
        let (mine, theirs) = (prompt_digest(&[1; 10], b""), prompt_digest(&[2; 10], b""));
        let posted = |prompt| Posted {
            remote: RemoteParams {
                num_tokens: 10,
                ..offer(vec![5, 6, 7], 9)
            },
            prompt,
        };
        let mut d = sched(false, true);
        d.expect("other", &prefiller(), mine, 10);
        d.fetched("other", Some(posted(theirs)));
        assert_eq!(d.matched("other", None, 10, 10, &[], 0), Some(0));
        assert_eq!(d.take_step().aborts, vec![offer(vec![5, 6, 7], 9).target()]);

        d.expect("withdrawn", &prefiller(), mine, 10);
        d.fetched("withdrawn", None);
        assert_eq!(d.matched("withdrawn", None, 10, 10, &[], 0), Some(0));

        // Fetched, then the request went away before it was scheduled: the grant is aborted.
        d.expect("gone", &prefiller(), mine, 10);
        d.fetched("gone", Some(posted(mine)));
        d.finished("gone", false, false, &[], &[], 0, None);
        assert_eq!(d.take_step().aborts, vec![offer(vec![5, 6, 7], 9).target()]);
        // An offer arriving for a request no longer waiting is aborted too.
        d.fetched("never-asked", Some(posted(mine)));
        assert_eq!(d.take_step().aborts, vec![offer(vec![5, 6, 7], 9).target()]);

        // Two requests under one key: the second leaves the grant to the first.
        d.expect("one", &prefiller(), mine, 10);
        d.expect("two", &prefiller(), mine, 10);
        d.fetched("one", Some(posted(mine)));
        d.fetched("two", Some(posted(mine)));
        assert_eq!(d.matched("two", None, 10, 10, &[], 0), Some(0));
        assert!(d.take_step().aborts.is_empty());
        assert_eq!(d.matched("one", None, 10, 10, &[], 0), Some(10));
        // A request that goes away while asked for stops the ask.
        d.expect("quit", &prefiller(), mine, 10);
        d.finished("quit", false, false, &[], &[], 0, None);
        assert_eq!(d.take_step().cancels, vec!["quit".to_string()]);

        // Past the wait: computed here, and an offer that comes later is aborted.
        let mut d = Scheduler::new(SchedulerConfig {
            offer_wait: Duration::ZERO,
            ..sched(false, true).cfg
        });
        d.expect("late", &prefiller(), mine, 10);
        assert_eq!(d.matched("late", None, 10, 10, &[], 0), Some(0));
        d.take_step();
        d.fetched("late", Some(posted(mine)));
        assert_eq!(d.take_step().aborts, vec![offer(vec![5, 6, 7], 9).target()]);
        assert_eq!(d.matched("late", None, 10, 10, &[], 0), Some(0));
    }

    fn offer(blocks: Vec<u32>, grant: u64) -> RemoteParams {
        RemoteParams {
            host: "10.0.0.2".into(),
            port: 7100,
            request_id: "p1".into(),
            engine_id: "p".into(),
            tp_size: 1,
            block_ids: blocks,
            groups: 1,
            grant,
            expires_unix: 0.0,
            num_tokens: 0,
        }
    }

    #[test]
    fn a_short_offer_is_refused_and_its_grant_aborted_never_truncated() {
        let mut d = sched(false, true);
        // 10 prompt tokens need 3 blocks of 4; the offer names 2.
        let short = offer(vec![5, 6], 9);
        assert_eq!(d.matched("d1", Some(&short), 10, 10, &[], 0), Some(0));
        d.allocated("d1", Some(&short), &[20, 21, 22], 0);
        let step = d.take_step();
        assert!(step.pulls.is_empty(), "{:?}", step.pulls);
        assert_eq!(step.aborts, vec![short.target()]);
        // No grant: refused too.
        let ungranted = offer(vec![5, 6, 7], 0);
        assert_eq!(d.matched("d2", Some(&ungranted), 10, 10, &[], 0), Some(0));
        // An offer that covers the prompt is pulled whole, remote list and local list alike.
        let good = offer(vec![5, 6, 7], 9);
        assert_eq!(d.matched("d3", Some(&good), 10, 10, &[], 0), Some(10));
        d.allocated("d3", Some(&good), &[20, 21, 22], 10);
        let step = d.take_step();
        assert_eq!(step.pulls[0].1.remote_blocks, vec![5, 6, 7]);
        assert_eq!(step.pulls[0].1.local_blocks, vec![20, 21, 22]);
        assert_eq!(step.pulls[0].1.grant, 9);
    }

    #[test]
    fn waiting_decodes_heartbeat_and_an_abort_before_the_pull_releases_the_grant() {
        let mut d = sched(false, true);
        let mut o = offer(vec![5, 6, 7], 9);
        // The prefill's lease is what paces the heartbeats: 60 ms left, one every 20 ms.
        o.expires_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64()
            + 0.06;
        assert_eq!(d.matched("d1", Some(&o), 10, 10, &[], 0), Some(10));
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(d.take_step().extends, vec![o.target()]);
        assert_eq!(
            d.finished("d1", false, false, &[], &[20, 21, 22], 0, None),
            (false, None)
        );
        let step = d.take_step();
        assert_eq!(step.aborts, vec![o.target()]);
        assert!(step.extends.is_empty());
        // Allocated (pull under way): no heartbeat, and finishing later aborts nothing.
        assert_eq!(d.matched("d2", Some(&o), 10, 10, &[], 0), Some(10));
        d.allocated("d2", Some(&o), &[20, 21, 22], 10);
        d.finished("d2", true, false, &[], &[20, 21, 22], 10, None);
        let step = d.take_step();
        assert!(step.aborts.is_empty() && step.extends.is_empty());
    }

    #[test]
    fn a_reset_empties_the_mirror_and_ignores_stores_until_the_worker_did_it() {
        let mut s = sched(true, false);
        let stored = |i| TierEvent::Stored {
            hash: h(i),
            tier: Tier::Dram,
        };
        s.apply(&[stored(0), stored(1)]);
        assert_eq!(s.lookup(&[h(0), h(1)]), 2);
        s.reset();
        assert_eq!(s.lookup(&[h(0)]), 0);
        assert!(s.take_step().reset);
        // A store the worker reported before it carried the reset out: from before the reset.
        s.apply(&[stored(0)]);
        assert_eq!(s.lookup(&[h(0)]), 0);
        s.resets_done(1);
        s.apply(&[stored(2)]);
        assert_eq!(s.lookup(&[h(2)]), 1);
        assert!(!s.take_step().reset);
    }

    #[test]
    fn an_offer_past_its_lease_is_refused_up_front() {
        let mut d = sched(false, true);
        let mut o = offer(vec![5, 6, 7], 9);
        o.expires_unix = 1.0;
        assert_eq!(d.matched("d1", Some(&o), 10, 10, &[], 0), Some(0));
        assert_eq!(d.take_step().aborts, vec![o.target()]);
        o.expires_unix = 4e9;
        assert_eq!(d.matched("d2", Some(&o), 10, 10, &[], 0), Some(10));
    }

    #[test]
    fn owned_eviction_discards_the_oldest_blocks_but_never_one_being_loaded() {
        let mut s = Scheduler::new(SchedulerConfig {
            capacity: Some(4),
            eviction: PolicyKind::Lru,
            offer_wait: Duration::from_secs(30),
            ..sched(true, false).cfg
        });
        let stored = |i| TierEvent::Stored {
            hash: h(i),
            tier: Tier::Dram,
        };
        s.apply(&[stored(0), stored(1), stored(2), stored(3)]);
        // A load of blocks 0 and 1 is planned (and so in flight until `loaded`).
        let hashes: Vec<BlockHash> = (0..3).map(h).collect();
        assert_eq!(s.matched("l", None, 12, 12, &hashes, 0), Some(8));
        s.allocated("l", None, &[10, 11, 12], 8);
        let _ = s.take_step();
        // Saving two new blocks needs two slots: 2 and 3 go, not 0 and 1.
        let new: Vec<BlockHash> = (10..12).map(h).collect();
        s.finished("r", true, false, &new, &[5, 6], 8, None);
        let step = s.take_step();
        assert_eq!(step.discards, vec![h(2), h(3)]);
        assert_eq!(s.lookup(&[h(2)]), 0);
        // Once the load is over, 0 and 1 are fair game again.
        s.loaded("l");
        s.apply(&[stored(10), stored(11)]);
        let more: Vec<BlockHash> = (20..21).map(h).collect();
        s.finished("q", true, false, &more, &[7], 4, None);
        assert_eq!(s.take_step().discards.len(), 1);
    }

    #[test]
    fn unwanted_blocks_are_discarded_once_no_load_needs_them_and_never_reach_routers() {
        let mut s = Scheduler::new(SchedulerConfig {
            capacity: Some(16),
            ..sched(true, false).cfg
        });
        let stored = |i| TierEvent::Stored {
            hash: h(i),
            tier: Tier::Dram,
        };
        s.apply(&[stored(0), stored(1), stored(2)]);
        let _ = s.take_events();
        // A load of 0 and 1 is in flight.
        let hashes: Vec<BlockHash> = (0..3).map(h).collect();
        assert_eq!(s.matched("l", None, 12, 12, &hashes, 0), Some(8));
        s.allocated("l", None, &[10, 11, 12], 8);
        let _ = s.take_step();
        // The worker would rather drop 1 and 2 than write them to NVMe.
        s.apply(&[
            TierEvent::Unwanted { hash: h(1) },
            TierEvent::Unwanted { hash: h(2) },
        ]);
        assert!(s.take_events().is_empty(), "routers never hear of it");
        assert_eq!(s.take_step().discards, vec![h(2)], "1 is being loaded");
        assert_eq!(
            s.lookup(&[h(2)]),
            0,
            "no load is promised a discarded block"
        );
        assert_eq!(s.lookup(&[h(0), h(1)]), 2);
        s.loaded("l");
        assert_eq!(s.take_step().discards, vec![h(1)]);
        assert_eq!(s.lookup(&[h(0), h(1)]), 1);
    }

    #[test]
    fn with_tensor_parallelism_a_block_loads_only_once_every_rank_holds_it() {
        let mut s = Scheduler::new(SchedulerConfig {
            tp_size: 2,
            ..sched(true, false).cfg
        });
        let stored = |i| TierEvent::Stored {
            hash: h(i),
            tier: Tier::Dram,
        };
        s.apply_from(0, &[stored(0), stored(1)]);
        assert_eq!(s.lookup(&[h(0), h(1)]), 0, "rank 1 has not stored them yet");
        s.apply_from(1, &[stored(0)]);
        assert_eq!(s.lookup(&[h(0), h(1)]), 1);
        // Rank 1 spilled block 0 to NVMe and dropped its DRAM copy: still held.
        s.apply_from(
            1,
            &[
                TierEvent::Stored {
                    hash: h(0),
                    tier: Tier::Nvme,
                },
                TierEvent::Removed {
                    hash: h(0),
                    tier: Tier::Dram,
                },
            ],
        );
        assert_eq!(s.lookup(&[h(0)]), 1);
        // Only rank 0's events are published (one per block, not one per rank).
        assert_eq!(s.take_events().len(), 2);
    }

    /// Blocks of 4 tokens, a sliding window of 8 in group 0 and full attention in group 1: a
    /// prefix of n blocks needs blocks `[(4n + 1 - 8) / 4, n)` of group 0 and all of group 1.
    fn hybrid(pd: bool) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            groups: vec![
                GroupKind::Window {
                    window: 8,
                    retained: 0,
                },
                GroupKind::Full,
            ],
            ..sched(true, pd).cfg
        })
    }

    fn stored_in(s: &mut Scheduler, g: u32, positions: std::ops::Range<u64>) {
        let events: Vec<TierEvent> = positions
            .map(|i| TierEvent::Stored {
                hash: h(i).in_group(g),
                tier: Tier::Dram,
            })
            .collect();
        s.apply(&events);
    }

    #[test]
    fn an_offer_of_fewer_tokens_than_the_prompt_loads_is_refused() {
        // The prefill computed 10 tokens; this prompt has 12 in the same 3 blocks of 4: slots
        // 10 and 11 of the last block were never written for it.
        let mut d = sched(false, true);
        let short = RemoteParams {
            num_tokens: 10,
            ..offer(vec![5, 6, 7], 9)
        };
        assert_eq!(d.matched("d1", Some(&short), 12, 12, &[], 0), Some(0));
        assert_eq!(d.take_step().aborts, vec![short.target()]);
        // As many as the prompt (or not said, as from an older prefill): pulled.
        for n in [12, 0] {
            let ok = RemoteParams {
                num_tokens: n,
                ..offer(vec![5, 6, 7], 10 + u64::from(n))
            };
            assert_eq!(
                d.matched(&format!("d{n}"), Some(&ok), 12, 12, &[], 0),
                Some(12)
            );
        }
    }

    fn state_sched() -> Scheduler {
        Scheduler::new(SchedulerConfig {
            groups: vec![GroupKind::Full, GroupKind::State],
            ..sched(true, false).cfg
        })
    }

    #[test]
    fn a_state_group_saves_the_boundary_states_vllm_names_and_loads_only_the_last() {
        assert_eq!(GroupKind::State.first_held(16, 4), 3);
        assert_eq!(GroupKind::State.first_held(17, 4), 4);
        assert_eq!(GroupKind::State.first_held(0, 4), 0);
        let mut s = state_sched();
        let hashes: Vec<BlockHash> = (0..5).map(h).collect();
        // Boundary 8 (block 1) written into block 61 this step; bad entries are ignored: off a
        // boundary, past the hashes, the full group's, the null block, boundary 0.
        let states = [
            (1, 61, 8),
            (1, 62, 9),
            (1, 63, 40),
            (0, 64, 8),
            (1, 0, 12),
            (1, 65, 0),
        ];
        assert!(s.boundary_states("r", &hashes, &states));
        let step = s.take_step();
        assert_eq!(
            step.window_saves,
            vec![("r".to_string(), vec![h(1).in_group(1)], vec![61])]
        );
        assert!(!s.boundary_states("r", &hashes, &states), "saved once");
        // At the end: the full group's blocks, and of the state group only a block already
        // past (its lagged boundary state at position 2); the running block at position 3
        // holds the state after 15 tokens, mid-block, and is never saved.
        s.finished_groups(
            "r",
            true,
            false,
            &hashes,
            &[&[10, 11, 12, 13], &[0, 0, 72, 73]],
            15,
            None,
        );
        let saves = s.take_step().saves;
        assert_eq!(saves.len(), 1);
        let (_, keys, ids) = &saves[0];
        assert!(
            keys.contains(&h(2).in_group(1)) && ids.contains(&72),
            "{saves:?}"
        );
        assert!(!ids.contains(&73), "{saves:?}");
        let stored: Vec<TierEvent> = keys
            .iter()
            .chain([h(1).in_group(1)].iter())
            .map(|&hash| TierEvent::Stored {
                hash,
                tier: Tier::Dram,
            })
            .collect();
        s.apply(&stored);
        // A prompt of 17 tokens: 3 blocks hit (block 3's state is not in the tiers), loading
        // the full group's 3 and the state group's block 2 alone.
        assert_eq!(s.matched("q", None, 17, 17, &hashes, 0), Some(12));
        s.allocated_groups("q", None, &[&[20, 21, 22, 23, 24], &[0, 0, 32, 33, 0]], 12);
        let loads = s.take_step().loads;
        assert_eq!(loads.len(), 1);
        assert_eq!(loads[0].2, vec![20, 21, 22, 32]);
        assert_eq!(loads[0].1[3], h(2).in_group(1));
    }

    #[test]
    fn a_state_group_pulls_all_but_the_last_prompt_token_and_only_its_state_block() {
        let mut d = Scheduler::new(SchedulerConfig {
            groups: vec![GroupKind::Full, GroupKind::State],
            ..sched(false, true).cfg
        });
        // 13 prompt tokens in blocks of 4: the prefill computed 12 (3 blocks); its state
        // group's last block (position 2) holds the state after them.
        let r = RemoteParams {
            groups: 2,
            num_tokens: 12,
            ..offer(vec![1, 2, 3, 0, 0, 7], 9)
        };
        assert_eq!(d.matched("r", Some(&r), 13, 13, &[], 0), Some(12));
        d.allocated_groups("r", Some(&r), &[&[20, 21, 22, 23], &[0, 0, 32, 33]], 12);
        let pulls = d.take_step().pulls;
        assert_eq!(pulls.len(), 1);
        assert_eq!(pulls[0].1.local_blocks, vec![20, 21, 22, 32]);
        assert_eq!(pulls[0].1.remote_blocks, vec![1, 2, 3, 7]);
        // An offer whose state block is missing, or from another TP size, is refused.
        let lacking = RemoteParams {
            groups: 2,
            num_tokens: 12,
            ..offer(vec![1, 2, 3, 0, 0, 0], 10)
        };
        assert_eq!(d.matched("s", Some(&lacking), 13, 13, &[], 0), Some(0));
        let other_tp = RemoteParams {
            groups: 2,
            tp_size: 2,
            num_tokens: 12,
            ..offer(vec![1, 2, 3, 0, 0, 7], 11)
        };
        assert_eq!(d.matched("t", Some(&other_tp), 13, 13, &[], 0), Some(0));
        // A prefill that computed the whole prompt: its state is one token on.
        let whole = RemoteParams {
            groups: 2,
            num_tokens: 13,
            ..offer(vec![1, 2, 3, 0, 0, 7], 12)
        };
        assert_eq!(d.matched("u", Some(&whole), 13, 13, &[], 0), Some(0));
        assert_eq!(
            d.take_step().aborts.len(),
            3,
            "the prefill engines may free"
        );
    }

    #[test]
    fn first_held_is_where_vllm_stops_padding_a_window_with_null_blocks() {
        let w = GroupKind::Window {
            window: 64,
            retained: 0,
        };
        // vLLM: skipped tokens = total - window + 1; whole skipped blocks are null.
        assert_eq!(w.first_held(192, 32), 4);
        assert_eq!(w.first_held(224, 32), 5);
        assert_eq!(w.first_held(63, 32), 0);
        assert_eq!(GroupKind::Full.first_held(224, 32), 0);
        let retained = GroupKind::Window {
            window: 64,
            retained: 32,
        };
        assert_eq!(retained.first_held(224, 32), 4);
    }

    #[test]
    fn a_hybrid_hit_needs_every_group_and_loads_only_the_window() {
        let mut s = hybrid(false);
        let hashes: Vec<BlockHash> = (0..7).map(h).collect();
        stored_in(&mut s, 1, 0..7);
        // Only the window of a shorter prefix: the hit is that prefix (4 blocks need positions
        // 2 and 3; 6 would need 4 and 5).
        stored_in(&mut s, 0, 2..4);
        assert_eq!(s.matched("r", None, 25, 25, &hashes, 0), Some(16));
        stored_in(&mut s, 0, 4..6);
        assert_eq!(s.matched("r", None, 25, 25, &hashes, 0), Some(24));
        let window = [0, 0, 0, 0, 14, 15, 16];
        let full = [20, 21, 22, 23, 24, 25, 26];
        s.allocated_groups("r", None, &[&window, &full], 24);
        let step = s.take_step();
        let (_, keys, ids) = &step.loads[0];
        assert_eq!(ids, &vec![14, 15, 20, 21, 22, 23, 24, 25]);
        assert_eq!(keys[0], h(4));
        assert_eq!(keys[2], h(0).in_group(1));
        // Without window block 5, the longest hit is 5 blocks, whose window is 3 and 4.
        s.apply(&[TierEvent::Removed {
            hash: h(5),
            tier: Tier::Dram,
        }]);
        assert_eq!(s.matched("q", None, 25, 25, &hashes, 0), Some(20));
    }

    #[test]
    fn a_real_block_outside_the_planned_window_is_loaded_under_its_key_never_left_unwritten() {
        let mut s = hybrid(false);
        let hashes: Vec<BlockHash> = (0..7).map(h).collect();
        stored_in(&mut s, 1, 0..7);
        stored_in(&mut s, 0, 4..6);
        assert_eq!(s.matched("r", None, 25, 25, &hashes, 0), Some(24));
        // Were vLLM to keep block 3 of the window group, it must be written or fail the load.
        s.allocated_groups(
            "r",
            None,
            &[&[0, 0, 0, 13, 14, 15], &[20, 21, 22, 23, 24, 25]],
            24,
        );
        let step = s.take_step();
        let (_, keys, ids) = &step.loads[0];
        assert_eq!((keys[0], ids[0]), (h(3), 13));
        assert_eq!(
            s.lookup(&[h(3)]),
            0,
            "not in the tiers: the worker fails its load"
        );
    }

    #[test]
    fn a_hybrid_finish_saves_each_groups_real_blocks_and_offers_them_group_by_group() {
        let mut s = hybrid(true);
        let hashes: Vec<BlockHash> = (0..4).map(h).collect();
        let window = [0, 0, 12, 13];
        let full = [20, 21, 22, 23];
        let (delay, offer) =
            s.finished_groups("p", true, true, &hashes, &[&window, &full], 16, None);
        assert!(delay);
        let step = s.take_step();
        let (_, keys, ids) = &step.saves[0];
        assert_eq!(ids, &vec![12, 13, 20, 21, 22, 23]);
        assert_eq!(keys[..2], [h(2), h(3)]);
        assert_eq!(keys[2], h(0).in_group(1));
        let o = offer.expect("offered").remote;
        assert_eq!(o.groups, 2);
        assert_eq!(o.group(0), &window);
        assert_eq!(o.group(1), &full);

        // The decoder: 15 prompt tokens need the window's blocks 2 and 3 ((15 + 1 - 8) / 4 = 2)
        // and every full-attention block; an offer whose window lacks one is refused.
        let mut d = hybrid(true);
        let mut short = o.clone();
        short.block_ids = vec![0, 0, 0, 13, 20, 21, 22, 23];
        assert_eq!(d.matched("d1", Some(&short), 15, 15, &[], 0), Some(0));
        assert_eq!(d.take_step().aborts.len(), 1);
        let mut one_group = o.clone();
        one_group.groups = 1;
        assert_eq!(d.matched("d2", Some(&one_group), 15, 15, &[], 0), Some(0));
        assert_eq!(d.matched("d3", Some(&o), 15, 15, &[], 0), Some(15));
        d.allocated_groups("d3", Some(&o), &[&[0, 0, 32, 33], &[40, 41, 42, 43]], 15);
        let pull = &d.take_step().pulls[0].1;
        assert_eq!(pull.local_blocks, vec![32, 33, 40, 41, 42, 43]);
        assert_eq!(pull.remote_blocks, vec![12, 13, 20, 21, 22, 23]);
        assert_eq!(pull.offer_blocks, crate::lease::blocks_digest(&o.block_ids));
    }

    #[test]
    fn window_blocks_are_saved_in_the_step_they_leave_the_window_once() {
        let mut s = hybrid(false);
        assert!(s.has_windows());
        let hashes: Vec<BlockHash> = (0..6).map(h).collect();
        let window = [10, 11, 12, 13, 14, 15];
        let full = [20, 21, 22, 23, 24, 25];
        // A prefill of 20 tokens: after it, vLLM keeps blocks from (21 - 8) / 4 = 3 on, so
        // blocks 0..3 of the window group go, and are saved in this step.
        s.stepped("r", &hashes, &[&window, &full], 0, 20);
        let step = s.take_step();
        assert_eq!(
            step.window_saves,
            vec![("r".into(), vec![h(0), h(1), h(2)], vec![10, 11, 12])]
        );
        // A decode step that moves the window by less than a block saves nothing; the next
        // block is saved when it leaves, once.
        s.stepped("r", &hashes, &[&[0, 0, 0, 13, 14, 15], &full], 20, 1);
        s.stepped("r", &hashes, &[&[0, 0, 0, 13, 14, 15], &full], 21, 1);
        assert!(s.take_step().window_saves.is_empty());
        // After 23 tokens vLLM keeps blocks from 4 on: block 3 is saved in the step that
        // computes the 23rd.
        s.stepped("r", &hashes, &[&[0, 0, 0, 13, 14, 15], &full], 22, 1);
        let step = s.take_step();
        assert_eq!(step.window_saves, vec![("r".into(), vec![h(3)], vec![13])]);
        s.stepped("r", &hashes, &[&[0, 0, 0, 0, 14, 15], &full], 23, 1);
        assert!(s.take_step().window_saves.is_empty());
        // Another request with the same prefix in flight does not save them again.
        s.stepped("q", &hashes, &[&window, &full], 0, 20);
        assert!(s.take_step().window_saves.is_empty());
        // Nothing of the kind without offload, or without a window group.
        let mut plain = sched(true, false);
        assert!(!plain.has_windows());
        plain.stepped("r", &hashes, &[&window], 0, 20);
        assert!(plain.take_step().window_saves.is_empty());
    }
}
