//! `kvferry._native`: the Rust connector for Python. Every call into the worker half releases the
//! GIL — it may wait (transfers, polls, connecting to a peer), and its background threads log
//! through Python's `logging` (pyo3-log), which needs the GIL: a Python thread holding the GIL
//! while waiting for one of their locks would deadlock. Rust errors become `KvferryError` with
//! the Rust message.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kvferry::connector::{medium, ConnectorCounters};
use kvferry::kvcore::{BlockHash, CacheLayout, Dtype, Geometry};
use kvferry::kvnet::TransportKind;
use kvferry::kvtier::{Tier, TierEvent};
use kvferry::rendezvous::{prompt_digest, Posted};
use kvferry::scheduler::{GroupKind, RemotePrefiller, MAX_GROUPS};
use kvferry::{
    Connector as Inner, ConnectorConfig, LeaseTarget, OffloadConfig, PdConfig, PullSpec,
    RemoteParams, Scheduler as SchedInner, SchedulerConfig,
};
use parking_lot::Mutex;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

pyo3::create_exception!(
    _native,
    KvferryError,
    PyException,
    "An error from kvferry's Rust core."
);

fn err(e: impl std::fmt::Display) -> PyErr {
    KvferryError::new_err(e.to_string())
}

fn hashes(raw: Vec<Vec<u8>>) -> PyResult<Vec<BlockHash>> {
    raw.iter()
        .map(|h| BlockHash::from_bytes(h).map_err(err))
        .collect()
}

fn pairs(hs: Vec<Vec<u8>>, blocks: Vec<u32>) -> PyResult<Vec<(BlockHash, u32)>> {
    if hs.len() != blocks.len() {
        return Err(err(format!(
            "{} hashes for {} blocks",
            hs.len(),
            blocks.len()
        )));
    }
    Ok(hashes(hs)?.into_iter().zip(blocks).collect())
}

/// One engine's connector: offload tiers and/or a prefill/decode agent.
#[pyclass(frozen, module = "kvferry._native")]
struct Connector {
    inner: Inner,
    /// Offers fetched that `poll` collected, until `take_offers`.
    offers: Mutex<Vec<(String, Option<Posted>)>>,
    /// Requests whose loads failed, polled but not yet taken (`take_failed_recving`).
    failed_recving: Mutex<Vec<String>>,
}

#[pymethods]
impl Connector {
    #[new]
    #[pyo3(signature = (
        engine_id, *, dram_blocks = 0, nvme_dir = None, nvme_blocks = 0, pd = false,
        host = "127.0.0.1".to_string(), port = 0, transport = "tcp".to_string(), token = None,
        insecure = false,
        lease_s = 30.0, timeout_s = 10.0, tp_size = 1, tp_rank = 0, total_kv_heads = None,
        identity = String::new(), caller_evicts = false, eviction = None, nvme_admission = None,
        nvme_write_mib_s = None, staged = false, nvme_timeout_s = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        engine_id: String,
        dram_blocks: u32,
        nvme_dir: Option<PathBuf>,
        nvme_blocks: u64,
        pd: bool,
        host: String,
        port: u16,
        transport: String,
        token: Option<String>,
        insecure: bool,
        lease_s: f64,
        timeout_s: f64,
        tp_size: u32,
        tp_rank: u32,
        total_kv_heads: Option<u32>,
        identity: String,
        caller_evicts: bool,
        eviction: Option<String>,
        nvme_admission: Option<String>,
        nvme_write_mib_s: Option<f64>,
        staged: bool,
        nvme_timeout_s: Option<f64>,
    ) -> PyResult<Connector> {
        let eviction = match eviction {
            Some(e) => e.parse::<kvferry::kvtier::PolicyKind>().map_err(err)?,
            None => kvferry::kvtier::PolicyKind::default(),
        };
        let admission = match nvme_admission {
            Some(a) => a.parse::<kvferry::kvtier::Admission>().map_err(err)?,
            None => kvferry::kvtier::Admission::default(),
        };
        let write_budget = match nvme_write_mib_s {
            Some(m) if m.is_finite() && m > 0.0 => {
                let per_sec = (m * 1024.0 * 1024.0) as u64;
                Some(kvferry::kvtier::WriteBudget {
                    bytes_per_sec: per_sec,
                    // A second of writes at once: eviction bursts with the batch.
                    burst_bytes: per_sec,
                })
            }
            Some(m) => return Err(err(format!("nvme_write_mib_s = {m}: a positive number"))),
            None => None,
        };
        let transport = match transport.as_str() {
            "tcp" => TransportKind::Tcp,
            "ucx" => TransportKind::Ucx,
            other => return Err(err(format!("transport {other:?}: use \"tcp\" or \"ucx\""))),
        };
        let secs = |s: f64, what: &str| {
            Duration::try_from_secs_f64(s).map_err(|_| err(format!("{what} = {s} seconds")))
        };
        let nvme_timeout = nvme_timeout_s
            .map(|s| secs(s, "nvme_timeout_s"))
            .transpose()?;
        let listen: SocketAddr = format!("{host}:{port}")
            .parse()
            .map_err(|e| err(format!("listen address {host}:{port}: {e}")))?;
        let cfg = ConnectorConfig {
            engine_id,
            offload: (dram_blocks > 0).then(|| OffloadConfig {
                dram_blocks,
                nvme: nvme_dir.map(|d| (d, nvme_blocks)),
                identity,
                caller_evicts,
                eviction,
                admission,
                write_budget,
                nvme_timeout,
            }),
            pd: if pd {
                Some(PdConfig {
                    listen,
                    transport,
                    token,
                    insecure,
                    lease: secs(lease_s, "kv_lease_duration")?,
                    timeout: secs(timeout_s, "timeout")?,
                    staged,
                })
            } else {
                None
            },
            tp_size,
            tp_rank,
            total_kv_heads,
        };
        let inner = py.detach(|| Inner::new(cfg)).map_err(err)?;
        Ok(Connector {
            inner,
            offers: Mutex::new(Vec::new()),
            failed_recving: Mutex::new(Vec::new()),
        })
    }

    /// The port decoders pull from (None without P/D).
    fn listen_port(&self) -> Option<u16> {
        self.inner.listen_addr().map(|a| a.port())
    }

    /// Registers the engine's KV cache: `num_blocks` blocks of the geometry, each layer's
    /// `[blocks, heads, tokens, channels]` view at `base + layer_offsets[l]` with `strides` in
    /// elements. The caller (the vLLM adapter) keeps the tensors alive for the connector's life.
    #[allow(clippy::too_many_arguments)]
    /// `device`: the CUDA device ordinal when the cache is in device memory (None: host).
    #[pyo3(signature = (
        kv_heads, head_size, dtype, block_tokens, num_blocks, base, layer_offsets, strides,
        device = None
    ))]
    fn register_cache(
        &self,
        py: Python<'_>,
        kv_heads: u32,
        head_size: u32,
        dtype: &str,
        block_tokens: u32,
        num_blocks: u32,
        base: u64,
        layer_offsets: Vec<u64>,
        strides: [u64; 4],
        device: Option<u32>,
    ) -> PyResult<()> {
        let dtype = Dtype::parse(dtype).ok_or_else(|| err(format!("dtype {dtype:?}")))?;
        let layers = u32::try_from(layer_offsets.len()).map_err(err)?;
        let g = Geometry::mha(layers, kv_heads, head_size, dtype, block_tokens).map_err(err)?;
        let layout = CacheLayout::from_element_strides(g, num_blocks, layer_offsets, strides)
            .map_err(err)?;
        py.detach(|| match device {
            // SAFETY: the adapter passes the data pointers of vLLM's KV cache tensors, which vLLM
            // keeps for the engine's lifetime (longer than this connector), and follows vLLM's
            // protocol of not reusing blocks until the connector reports them finished.
            None => unsafe { self.inner.register_cache(layout, base as *mut u8) },
            // SAFETY: as above, for device memory (whose extent the connector checks with the
            // driver); the adapter orders vLLM's streams before the connector's copies.
            Some(ordinal) => unsafe { self.inner.register_device_cache(layout, ordinal, base) },
        })
        .map_err(err)
    }

    /// Leading blocks of `hashes` cached in G2/G3.
    fn lookup(&self, py: Python<'_>, hashes_: Vec<Vec<u8>>) -> PyResult<usize> {
        let hs = hashes(hashes_)?;
        Ok(py.detach(|| self.inner.lookup(&hs)))
    }

    /// Drops blocks from the tiers; returns how many were dropped (blocks in use are kept).
    fn discard(&self, py: Python<'_>, hashes_: Vec<Vec<u8>>) -> PyResult<usize> {
        let hs = hashes(hashes_)?;
        py.detach(|| self.inner.discard(&hs)).map_err(err)
    }

    /// `notes`: none, or one per block (bytes, or None for none), kept with the block in G3
    /// (see `kvferry::Connector::save_noted`).
    #[pyo3(signature = (req, hashes_, blocks, notes = None))]
    fn save(
        &self,
        py: Python<'_>,
        req: &str,
        hashes_: Vec<Vec<u8>>,
        blocks: Vec<u32>,
        notes: Option<Vec<Option<Vec<u8>>>>,
    ) -> PyResult<()> {
        let items = pairs(hashes_, blocks)?;
        let notes = note_list(notes);
        py.detach(|| self.inner.save_noted(req, &items, notes))
            .map_err(err)
    }

    /// Saves now: returns once the blocks' bytes are out of the engine's cache (see
    /// `kvferry::Connector::save_now`), with how many were saved.
    #[pyo3(signature = (hashes_, blocks, timeout_s, notes = None))]
    fn save_now(
        &self,
        py: Python<'_>,
        hashes_: Vec<Vec<u8>>,
        blocks: Vec<u32>,
        timeout_s: f64,
        notes: Option<Vec<Option<Vec<u8>>>>,
    ) -> PyResult<usize> {
        let items = pairs(hashes_, blocks)?;
        let notes = note_list(notes);
        let timeout = Duration::try_from_secs_f64(timeout_s.max(0.0)).unwrap_or(Duration::ZERO);
        py.detach(|| self.inner.save_now(&items, notes, timeout))
            .map_err(err)
    }

    /// `(tier key, note)` of the blocks recovered from G3 at registration, once.
    fn take_recovered_notes<'py>(
        &self,
        py: Python<'py>,
    ) -> Vec<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let notes = py.detach(|| self.inner.take_recovered_notes());
        notes
            .into_iter()
            .map(|(h, n)| (PyBytes::new(py, h.as_bytes()), PyBytes::new(py, &n)))
            .collect()
    }

    fn load(
        &self,
        py: Python<'_>,
        req: &str,
        hashes_: Vec<Vec<u8>>,
        blocks: Vec<u32>,
    ) -> PyResult<()> {
        let items = pairs(hashes_, blocks)?;
        py.detach(|| self.inner.load(req, &items));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn pull(
        &self,
        py: Python<'_>,
        req: &str,
        remote_host: String,
        remote_port: u16,
        remote_request_id: String,
        remote_tp_size: u32,
        grant: u64,
        offer_blocks: u64,
        remote_blocks: Vec<u32>,
        local_blocks: Vec<u32>,
    ) {
        let spec = PullSpec {
            remote_host,
            remote_port,
            remote_request_id,
            remote_tp_size,
            grant,
            offer_blocks,
            remote_blocks,
            local_blocks,
        };
        py.detach(|| self.inner.pull(req, &spec));
    }

    /// Keeps a prefill engine's grant alive (the decode request still waits); does not wait.
    fn extend(&self, py: Python<'_>, target: TargetTuple) {
        let t = lease_target(target);
        py.detach(|| self.inner.extend(&t));
    }

    /// Tells a prefill engine its grant is no longer needed; does not wait.
    fn abort_remote(&self, py: Python<'_>, target: TargetTuple) {
        let t = lease_target(target);
        py.detach(|| self.inner.abort_remote(&t));
    }

    /// The engine finished `req`; `grant`: the generation of its offer to decoders, if any,
    /// and `blocks` the blocks it offers (the only ones decoders may read).
    #[pyo3(signature = (req, grant = None, blocks = Vec::new()))]
    fn finish(&self, py: Python<'_>, req: &str, grant: Option<u64>, blocks: Vec<u32>) {
        py.detach(|| {
            self.inner
                .finish(req, grant.map(|g| (g, blocks.as_slice())))
        });
    }

    /// `(finished_sending, finished_recving, failed_block_ids)` since the last call (offers
    /// fetched are kept for `take_offers`).
    fn poll(&self, py: Python<'_>) -> (Vec<String>, Vec<String>, Vec<u32>) {
        let f = py.detach(|| self.inner.poll());
        self.offers.lock().extend(f.offers);
        self.failed_recving.lock().extend(f.failed_recving);
        (f.sending, f.recving, f.load_errors)
    }

    /// Requests one of whose blocks did not load, polled since the last call (each also among
    /// the `finished_recving` of `poll`): vLLM's `failed_recving`.
    fn take_failed_recving(&self) -> Vec<String> {
        std::mem::take(&mut *self.failed_recving.lock())
    }

    /// Decode side, llm-d's `offloading` protocol: asks the prefill engine at `host:port` for
    /// the offer it posts under `key`, for up to `wait_s`; the answer comes from `take_offers`.
    fn ask(&self, py: Python<'_>, req: &str, key: String, host: String, port: u16, wait_s: f64) {
        let p = RemotePrefiller { key, host, port };
        let wait = Duration::try_from_secs_f64(wait_s.max(0.0)).unwrap_or(Duration::ZERO);
        py.detach(|| self.inner.ask(req, &p, wait));
    }

    /// Decode side: `req` went away; its ask stops.
    fn cancel_ask(&self, py: Python<'_>, req: &str) {
        py.detach(|| self.inner.cancel_ask(req));
    }

    /// `[(request, posted offer or None)]` fetched since the last call (see `poll`); the
    /// offers as `Scheduler.fetched` takes them.
    fn take_offers(&self) -> Vec<(String, Option<PostedTuple>)> {
        std::mem::take(&mut *self.offers.lock())
            .into_iter()
            .map(|(r, p)| (r, p.map(posted_tuple)))
            .collect()
    }

    /// Prefill side: posts the offer made for a decoder that asks by `key` (None: none will
    /// come).
    fn post(&self, py: Python<'_>, key: &str, offer: Option<PostedTuple>) {
        let p = offer.map(posted);
        py.detach(|| self.inner.post(key, p));
    }

    /// Waits (up to `timeout_s`) until nothing is in flight; returns what finished meanwhile.
    fn drain(&self, py: Python<'_>, timeout_s: f64) -> (Vec<String>, Vec<String>, Vec<u32>) {
        let t = Duration::from_secs_f64(timeout_s.max(0.0));
        let f = py.detach(|| self.inner.drain(t));
        self.offers.lock().extend(f.offers);
        self.failed_recving.lock().extend(f.failed_recving);
        (f.sending, f.recving, f.load_errors)
    }

    /// Empties G2 and G3 for good (new weights); returns the blocks dropped at once.
    fn reset_cache(&self, py: Python<'_>) -> PyResult<usize> {
        py.detach(|| self.inner.reset_cache()).map_err(err)
    }

    /// Requests finished since the last call whose save failed for some block.
    fn take_failed_saves(&self, py: Python<'_>) -> Vec<String> {
        py.detach(|| self.inner.take_failed_saves())
    }

    /// Drains in-flight work and writes G2 to G3 (when configured); returns blocks written.
    fn shutdown(&self, py: Python<'_>, timeout_s: f64) -> PyResult<usize> {
        let t = Duration::from_secs_f64(timeout_s.max(0.0));
        py.detach(|| self.inner.shutdown(t)).map_err(err)
    }

    fn flush(&self, py: Python<'_>, timeout_s: f64) -> PyResult<usize> {
        let t = Duration::from_secs_f64(timeout_s.max(0.0));
        py.detach(|| self.inner.flush(t)).map_err(err)
    }

    /// Counters of the connector and its tiers, as a flat dict of ints.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (counters, tiers) = py.detach(|| (self.inner.counters(), self.inner.tier_stats()));
        let d = PyDict::new(py);
        let ConnectorCounters {
            saved_blocks,
            save_failed_blocks,
            onboarded_blocks,
            onboard_failed_blocks,
            pulled_blocks,
            pulled_bytes,
            pull_failures,
            pulls_stale,
            pulls_served,
            pulls_aborted,
            lease_expired,
            lookups,
            lookup_hits,
            resets,
            offers_posted,
            offers_fetched,
            offers_missed,
        } = counters;
        for (k, v) in [
            ("saved_blocks", saved_blocks),
            ("save_failed_blocks", save_failed_blocks),
            ("onboarded_blocks", onboarded_blocks),
            ("onboard_failed_blocks", onboard_failed_blocks),
            ("pulled_blocks", pulled_blocks),
            ("pulled_bytes", pulled_bytes),
            ("pull_failures", pull_failures),
            ("pulls_stale", pulls_stale),
            ("pulls_served", pulls_served),
            ("pulls_aborted", pulls_aborted),
            ("lease_expired", lease_expired),
            ("lookups", lookups),
            ("lookup_hits", lookup_hits),
            ("resets", resets),
            ("offers_posted", offers_posted),
            ("offers_fetched", offers_fetched),
            ("offers_missed", offers_missed),
        ] {
            d.set_item(k, v)?;
        }
        if let Some(s) = tiers {
            for (tier, c) in [("dram", s.dram), ("nvme", s.nvme)] {
                d.set_item(format!("{tier}_blocks"), c.blocks)?;
                d.set_item(format!("{tier}_hits"), c.hits)?;
                d.set_item(format!("{tier}_bytes_in"), c.bytes_in)?;
                d.set_item(format!("{tier}_bytes_out"), c.bytes_out)?;
                d.set_item(format!("{tier}_evictions"), c.evictions)?;
                d.set_item(format!("{tier}_errors"), c.errors)?;
            }
            d.set_item("tier_misses", s.misses)?;
            d.set_item("nvme_admitted", s.admission.admitted)?;
            d.set_item("nvme_rejected", s.admission.rejected)?;
            d.set_item("nvme_write_dropped", s.admission.dropped)?;
            d.set_item("nvme_admitted_bytes", s.admission.bytes_admitted)?;
            d.set_item("nvme_recovered", s.recovered)?;
            if s.nvme.capacity > 0 {
                d.set_item("nvme_in_service", u64::from(s.nvme_in_service))?;
            }
            d.set_item("nvme_timeouts", s.nvme_timeouts)?;
        }
        Ok(d)
    }

    /// `(kind, hash, medium)` per stored/removed block since the last call; kind is "stored" or
    /// "removed", medium "CPU" (G2) or "STORAGE" (G3), vLLM's names.
    fn take_events<'py>(
        &self,
        py: Python<'py>,
    ) -> Vec<(&'static str, Bound<'py, PyBytes>, &'static str)> {
        let events = py.detach(|| self.inner.take_events());
        events.into_iter().map(|e| event_tuple(py, e)).collect()
    }
}

fn note_list(notes: Option<Vec<Option<Vec<u8>>>>) -> Vec<Vec<u8>> {
    notes
        .unwrap_or_default()
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect()
}

fn event_tuple<'py>(
    py: Python<'py>,
    e: TierEvent,
) -> (&'static str, Bound<'py, PyBytes>, &'static str) {
    let (kind, hash, tier) = match e {
        TierEvent::Stored { hash, tier } => ("stored", hash, tier),
        TierEvent::Removed { hash, tier } => ("removed", hash, tier),
        // G2 asks the scheduler to drop it (never reaches routers: the scheduler keeps it).
        TierEvent::Unwanted { hash } => ("unwanted", hash, Tier::Dram),
    };
    (kind, PyBytes::new(py, hash.as_bytes()), medium(tier))
}

/// `(host, port, request_id, engine_id, tp_size, block_ids per KV cache group, grant,
/// expires_unix, num_tokens)` from Python.
type RemoteTuple = (
    String,
    u16,
    String,
    String,
    u32,
    Vec<Vec<u32>>,
    u64,
    f64,
    u32,
);

fn remote(r: Option<RemoteTuple>) -> Option<RemoteParams> {
    r.map(remote_params)
}

fn remote_params(
    (host, port, request_id, engine_id, tp_size, block_ids, grant, expires_unix, num_tokens): RemoteTuple,
) -> RemoteParams {
    // Groups of unequal length, or too many, are no offer the scheduler can split: it refuses
    // the empty list (fewer blocks than the prompt needs).
    let even = block_ids.windows(2).all(|w| w[0].len() == w[1].len())
        && block_ids.len() <= MAX_GROUPS as usize;
    RemoteParams {
        host,
        port,
        request_id,
        engine_id,
        tp_size,
        groups: block_ids.len().max(1) as u32,
        block_ids: if even { block_ids.concat() } else { Vec::new() },
        grant,
        expires_unix,
        num_tokens,
    }
}

/// An offer's blocks, one list per KV cache group.
fn group_lists(r: &RemoteParams) -> Vec<Vec<u32>> {
    (0..r.groups.max(1) as usize)
        .map(|g| r.group(g).to_vec())
        .collect()
}

fn remote_tuple(r: RemoteParams) -> RemoteTuple {
    let groups = group_lists(&r);
    (
        r.host,
        r.port,
        r.request_id,
        r.engine_id,
        r.tp_size,
        groups,
        r.grant,
        r.expires_unix,
        r.num_tokens,
    )
}

/// A tier event with what describes its block (see `Scheduler.take_events`).
type DescribedEvent<'py> = (
    &'static str,
    Bound<'py, PyBytes>,
    &'static str,
    Option<Bound<'py, PyBytes>>,
    Vec<u32>,
    Option<String>,
    u32,
);

/// `(token ids, what else tells the KV of a prompt apart)`: what `prompt_digest` takes.
type PromptTuple = (Vec<u32>, Vec<u8>);

/// `(offer as RemoteTuple, prompt digest)`: an offer posted under a key.
type PostedTuple = (RemoteTuple, u64);

fn posted((r, prompt): PostedTuple) -> Posted {
    Posted {
        remote: remote_params(r),
        prompt,
    }
}

fn posted_tuple(p: Posted) -> PostedTuple {
    (remote_tuple(p.remote), p.prompt)
}

/// `(host, port, tp_size, request_id, grant)`: where a grant lives.
type TargetTuple = (String, u16, u32, String, u64);

fn lease_target(
    (remote_host, remote_port, remote_tp_size, remote_request_id, grant): TargetTuple,
) -> LeaseTarget {
    LeaseTarget {
        remote_host,
        remote_port,
        remote_tp_size,
        remote_request_id,
        grant,
    }
}

fn target_tuple(t: LeaseTarget) -> TargetTuple {
    (
        t.remote_host,
        t.remote_port,
        t.remote_tp_size,
        t.remote_request_id,
        t.grant,
    )
}

fn hash_list<'py>(py: Python<'py>, hs: &[BlockHash]) -> Vec<Bound<'py, PyBytes>> {
    hs.iter().map(|h| PyBytes::new(py, h.as_bytes())).collect()
}

/// The scheduler half: what to load, save, pull and offer, from vLLM's request state.
#[pyclass(frozen, module = "kvferry._native")]
struct Scheduler {
    inner: Mutex<SchedInner>,
}

#[pymethods]
impl Scheduler {
    #[new]
    #[pyo3(signature = (
        engine_id, *, block_size, offload, pd, host, port = None, tp_size = 1, lease_s = 30.0,
        capacity = None, eviction = None, offer_wait_s = 30.0, groups = None, notes = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        engine_id: String,
        block_size: u32,
        offload: bool,
        pd: bool,
        host: String,
        port: Option<u16>,
        tp_size: u32,
        lease_s: f64,
        capacity: Option<u64>,
        eviction: Option<String>,
        offer_wait_s: f64,
        groups: Option<Vec<(String, u32, u32)>>,
        notes: bool,
    ) -> PyResult<Scheduler> {
        // `(kind, sliding window in tokens, extra retained tokens)` per group; kind "full",
        // "window" or "state" (Mamba's, in vLLM's align mode).
        let groups: Vec<GroupKind> = groups
            .unwrap_or_default()
            .into_iter()
            .map(|(kind, window, retained)| match kind.as_str() {
                "full" => Ok(GroupKind::Full),
                "window" if window > 0 => Ok(GroupKind::Window { window, retained }),
                "state" => Ok(GroupKind::State),
                other => Err(err(format!(
                    "KV cache group kind {other:?} (window {window})"
                ))),
            })
            .collect::<PyResult<_>>()?;
        if groups.len() > MAX_GROUPS as usize {
            return Err(err(format!("{} KV cache groups", groups.len())));
        }
        let eviction = match eviction {
            Some(e) => e.parse::<kvferry::kvtier::PolicyKind>().map_err(err)?,
            None => kvferry::kvtier::PolicyKind::default(),
        };
        let lease = Duration::try_from_secs_f64(lease_s)
            .map_err(|_| err(format!("kv_lease_duration = {lease_s} seconds")))?;
        let offer_wait = Duration::try_from_secs_f64(offer_wait_s)
            .map_err(|_| err(format!("remote_prefill_wait_s = {offer_wait_s} seconds")))?;
        Ok(Scheduler {
            inner: Mutex::new(SchedInner::new(SchedulerConfig {
                engine_id,
                block_size,
                offload,
                pd,
                host,
                port,
                tp_size,
                lease,
                capacity,
                eviction,
                offer_wait,
                groups,
                notes,
            })),
        })
    }

    fn set_port(&self, port: u16) {
        self.inner.lock().set_port(port);
    }

    /// Descriptions restored from a worker's recovered notes (`(tier key, note)`), before the
    /// blocks' events are applied; returns how many were taken.
    fn noted(&self, notes: Vec<(Vec<u8>, Vec<u8>)>) -> PyResult<usize> {
        let mut parsed = Vec::with_capacity(notes.len());
        for (h, n) in notes {
            parsed.push((BlockHash::from_bytes(&h).map_err(err)?, n));
        }
        Ok(self.inner.lock().noted(&parsed))
    }

    /// The engine reset its prefix cache and the connector's.
    fn reset(&self) {
        self.inner.lock().reset();
    }

    /// vLLM reports `req`'s load over (`finished_recving`).
    fn loaded(&self, req: &str) {
        self.inner.lock().loaded(req);
    }

    /// How many resets the worker carried out in all.
    fn resets_done(&self, n: u64) {
        self.inner.lock().resets_done(n);
    }

    /// vLLM's `on_new_request`: a decode request with an offer starts its heartbeats.
    fn arrived(&self, req: &str, remote_: Option<RemoteTuple>, prompt_tokens: u32) {
        let r = remote(remote_);
        self.inner.lock().arrived(req, r.as_ref(), prompt_tokens);
    }

    /// vLLM's `on_new_request` for a decode request under llm-d's `offloading` protocol:
    /// `(key, host, port)` of its `remote_prefiller`, and its prompt's token ids.
    /// `prompt`: its token ids and what else tells its KV apart (see `finished`).
    fn expect(&self, req: &str, prefiller: (String, String, u16), prompt: PromptTuple) {
        let (key, host, port) = prefiller;
        let p = RemotePrefiller { key, host, port };
        let digest = prompt_digest(&prompt.0, &prompt.1);
        let n = u32::try_from(prompt.0.len()).unwrap_or(u32::MAX);
        self.inner.lock().expect(req, &p, digest, n);
    }

    /// `(host, disk, p2p)`: where the `tokens` vLLM counts as `req`'s external hit came from
    /// (right after its allocation; all zero for another request).
    fn hit_sources(&self, req: &str, tokens: u32) -> (u32, u32, u32) {
        let s = self.inner.lock().hit_sources(req, tokens);
        (s.host, s.disk, s.p2p)
    }

    /// The worker's answer to an ask (from `Connector.take_offers`).
    fn fetched(&self, req: &str, offer: Option<PostedTuple>) {
        self.inner.lock().fetched(req, offer.map(posted));
    }

    /// Applies TP rank `rank`'s worker's `(kind, hash, medium)` events to the mirror.
    #[pyo3(signature = (events, rank = 0))]
    fn apply(&self, events: Vec<(String, Vec<u8>, String)>, rank: u32) -> PyResult<()> {
        let mut out = Vec::with_capacity(events.len());
        for (kind, h, m) in events {
            let hash = BlockHash::from_bytes(&h).map_err(err)?;
            let tier = match m.as_str() {
                "CPU" => Tier::Dram,
                "STORAGE" | "DISK" => Tier::Nvme,
                other => return Err(err(format!("medium {other:?}"))),
            };
            out.push(match kind.as_str() {
                "stored" => TierEvent::Stored { hash, tier },
                "removed" => TierEvent::Removed { hash, tier },
                "unwanted" => TierEvent::Unwanted { hash },
                other => return Err(err(format!("event kind {other:?}"))),
            });
        }
        self.inner.lock().apply_from(rank, &out);
        Ok(())
    }

    /// `(kind, hash, medium, parent hash or None, token ids, LoRA name or None, KV cache
    /// group)` per block stored in / removed from the tiers since the last call, for routers.
    /// The description is empty for blocks this engine did not save (such as those recovered
    /// from G3); with more than one KV cache group such a block's group and hash are unknown
    /// (its tier key is all the tiers keep), and it is left out.
    fn take_events<'py>(&self, py: Python<'py>) -> Vec<DescribedEvent<'py>> {
        let mut inner = self.inner.lock();
        let hybrid = inner.group_count() > 1;
        inner
            .take_described_events()
            .into_iter()
            .filter_map(|(e, d)| {
                if hybrid && d.is_none() {
                    return None;
                }
                let (kind, key, medium) = event_tuple(py, e);
                Some(match d {
                    Some(d) => (
                        kind,
                        PyBytes::new(py, d.hash.as_bytes()),
                        medium,
                        d.parent.map(|p| PyBytes::new(py, p.as_bytes())),
                        // A removal names the block only, as vLLM's `BlockRemoved` does.
                        if kind == "stored" {
                            d.tokens
                        } else {
                            Vec::new()
                        },
                        d.lora,
                        d.group,
                    ),
                    None => (kind, key, medium, None, Vec::new(), None, 0),
                })
            })
            .collect()
    }

    /// Describes a finished request's blocks for routers' events (after `finished`): all its
    /// token ids and its LoRA adapter's name.
    #[pyo3(signature = (hashes_, tokens, lora = None))]
    fn describe(
        &self,
        hashes_: Vec<Vec<u8>>,
        tokens: Vec<u32>,
        lora: Option<String>,
    ) -> PyResult<()> {
        let hs = hashes(hashes_)?;
        self.inner.lock().describe(&hs, &tokens, lora.as_deref());
        Ok(())
    }

    fn lookup(&self, hashes_: Vec<Vec<u8>>) -> PyResult<usize> {
        Ok(self.inner.lock().lookup(&hashes(hashes_)?))
    }

    #[allow(clippy::too_many_arguments)]
    fn matched(
        &self,
        req: &str,
        remote_: Option<RemoteTuple>,
        prompt_tokens: u32,
        num_tokens: u32,
        hashes_: Vec<Vec<u8>>,
        computed: u32,
    ) -> PyResult<Option<u32>> {
        let hs = hashes(hashes_)?;
        let r = remote(remote_);
        Ok(self
            .inner
            .lock()
            .matched(req, r.as_ref(), prompt_tokens, num_tokens, &hs, computed))
    }

    /// `blocks`: the request's blocks in each KV cache group.
    fn allocated(
        &self,
        req: &str,
        remote_: Option<RemoteTuple>,
        blocks: Vec<Vec<u32>>,
        external: u32,
    ) {
        let r = remote(remote_);
        let lists: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
        self.inner
            .lock()
            .allocated_groups(req, r.as_ref(), &lists, external);
    }

    /// A running request's step (models with sliding-window groups, see `has_windows`):
    /// its block table per group as the step runs it, tokens computed before the step and
    /// scheduled in it. Returns whether blocks are saved this step (describe them).
    fn stepped(
        &self,
        req: &str,
        hashes_: Vec<Vec<u8>>,
        blocks: Vec<Vec<u32>>,
        computed: u32,
        scheduled: u32,
    ) -> PyResult<bool> {
        let hs = hashes(hashes_)?;
        let lists: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
        Ok(self
            .inner
            .lock()
            .stepped(req, &hs, &lists, computed, scheduled))
    }

    /// vLLM's boundary-state hand-offs for a running request this step, `(group, block,
    /// boundary tokens)` each (`kvferry::Scheduler::boundary_states`). Returns whether blocks
    /// are saved this step (describe them).
    fn boundary_states(
        &self,
        req: &str,
        hashes_: Vec<Vec<u8>>,
        states: Vec<(u32, u32, u32)>,
    ) -> PyResult<bool> {
        let hs = hashes(hashes_)?;
        Ok(self.inner.lock().boundary_states(req, &hs, &states))
    }

    /// Whether the engine must report its steps (`stepped`, `boundary_states`): offload with a
    /// sliding-window or state group.
    fn has_windows(&self) -> bool {
        self.inner.lock().has_windows()
    }

    /// `(delay_free, kv_transfer_params or None)`; the params are NixlConnector's protocol.
    /// `post`: `(key, (prompt token ids, what else tells its KV apart: LoRA, cache salt,
    /// multimodal hashes))` of a prefill under llm-d's `offloading` protocol, whose offer is
    /// posted under the key for the decoder to fetch.
    #[pyo3(signature = (req, ok, remote_decode, hashes_, blocks, computed_tokens, post = None))]
    #[allow(clippy::too_many_arguments)]
    fn finished<'py>(
        &self,
        py: Python<'py>,
        req: &str,
        ok: bool,
        remote_decode: bool,
        hashes_: Vec<Vec<u8>>,
        blocks: Vec<Vec<u32>>,
        computed_tokens: u32,
        post: Option<(String, PromptTuple)>,
    ) -> PyResult<(bool, Option<Bound<'py, PyDict>>)> {
        let hs = hashes(hashes_)?;
        let post = post.map(|(k, (tokens, extra))| (k, prompt_digest(&tokens, &extra)));
        let lists: Vec<&[u32]> = blocks.iter().map(Vec::as_slice).collect();
        let (delay, offer) = self.inner.lock().finished_groups(
            req,
            ok,
            remote_decode,
            &hs,
            &lists,
            computed_tokens,
            post.as_ref().map(|(k, d)| (k.as_str(), *d)),
        );
        let params = match offer {
            Some(o) => {
                let d = PyDict::new(py);
                let r = o.remote;
                d.set_item("do_remote_prefill", true)?;
                d.set_item("do_remote_decode", false)?;
                // One list per KV cache group, as NixlConnector 0.33 sends them (decoders take
                // the flat form too).
                d.set_item("remote_block_ids", group_lists(&r))?;
                d.set_item("remote_engine_id", r.engine_id)?;
                d.set_item("remote_request_id", r.request_id)?;
                d.set_item("remote_host", r.host)?;
                d.set_item("remote_port", r.port)?;
                d.set_item("tp_size", r.tp_size)?;
                d.set_item("pp_size", 1)?;
                d.set_item("remote_num_tokens", r.num_tokens)?;
                // NixlConnector's lease fields, and the grant a decoder must release.
                d.set_item("remote_blocks_expiry_time", o.expires_unix)?;
                d.set_item("kvferry_grant", format!("{:016x}", r.grant))?;
                Some(d)
            }
            None => None,
        };
        Ok((delay, params))
    }

    /// This step's plan as plain Python data (it crosses to the worker process pickled).
    fn take_step<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let step = self.inner.lock().take_step();
        let d = PyDict::new(py);
        for (key, items) in [
            ("saves", &step.saves),
            ("loads", &step.loads),
            ("window_saves", &step.window_saves),
        ] {
            let l = PyList::empty(py);
            for (req, hs, blocks) in items {
                l.append((req, hash_list(py, hs), blocks.clone()))?;
            }
            d.set_item(key, l)?;
        }
        let pulls = PyList::empty(py);
        for (req, s) in step.pulls {
            let p = PyDict::new(py);
            p.set_item("remote_host", s.remote_host)?;
            p.set_item("remote_port", s.remote_port)?;
            p.set_item("remote_request_id", s.remote_request_id)?;
            p.set_item("tp_size", s.remote_tp_size)?;
            p.set_item("grant", s.grant)?;
            p.set_item("offer_blocks", s.offer_blocks)?;
            p.set_item("remote_blocks", s.remote_blocks)?;
            p.set_item("local_blocks", s.local_blocks)?;
            pulls.append((req, p))?;
        }
        d.set_item("pulls", pulls)?;
        let finished: Vec<(String, Option<u64>, Vec<u32>)> = step
            .finished
            .into_iter()
            .map(|(req, g)| match g {
                Some((gen, blocks)) => (req, Some(gen), blocks),
                None => (req, None, Vec::new()),
            })
            .collect();
        d.set_item("finished", finished)?;
        let targets = |ts: Vec<LeaseTarget>| ts.into_iter().map(target_tuple).collect::<Vec<_>>();
        d.set_item("extends", targets(step.extends))?;
        d.set_item("aborts", targets(step.aborts))?;
        d.set_item("reset", step.reset)?;
        d.set_item("discards", hash_list(py, &step.discards))?;
        let notes = PyDict::new(py);
        for (h, n) in &step.notes {
            notes.set_item(PyBytes::new(py, h.as_bytes()), PyBytes::new(py, n))?;
        }
        d.set_item("notes", notes)?;
        let asks: Vec<(String, (String, String, u16))> = step
            .asks
            .into_iter()
            .map(|(req, p)| (req, (p.key, p.host, p.port)))
            .collect();
        d.set_item("asks", asks)?;
        let posts: Vec<(String, Option<PostedTuple>)> = step
            .posts
            .into_iter()
            .map(|(k, p)| (k, p.map(posted_tuple)))
            .collect();
        d.set_item("posts", posts)?;
        d.set_item("cancels", step.cancels)?;
        Ok(d)
    }
}

/// What a pull's release names an offer's blocks by (the same on both engines).
#[pyfunction]
fn blocks_digest(blocks: Vec<u32>) -> u64 {
    kvferry::lease::blocks_digest(&blocks)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust log records (a failed pull, an unlocked pool, a dropped G3 slot) go to Python's
    // `logging` under "kvferry.*"; another extension may have installed a logger first.
    let _ = pyo3_log::try_init();
    m.add_class::<Connector>()?;
    m.add_class::<Scheduler>()?;
    m.add_function(wrap_pyfunction!(blocks_digest, m)?)?;
    m.add("KvferryError", m.py().get_type::<KvferryError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
