"""vLLM's KV connector backed by kvferry.

Start vLLM with::

    --kv-transfer-config '{"kv_connector": "KVFerryConnector",
                           "kv_connector_module_path": "kvferry.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {...}}'

Extra config (all optional):

- ``pd`` (default true): serve and pull prompt KV for prefill/decode disaggregation. The
  ``kv_transfer_params`` protocol is vLLM's NixlConnector's (``do_remote_decode``,
  ``do_remote_prefill``, ``remote_engine_id``, ``remote_request_id``, ``remote_block_ids``,
  ``remote_host``, ``remote_port``, ``tp_size``), so routers built for it drive kvferry unchanged.
  llm-d's ``offloading`` protocol works too (its sidecar's ``--kv-connector=offloading``: prefill
  and decode dispatched at once): a prefill request with ``remote_decoder{kv_request_id}`` posts
  its offer under that key; a decode request with ``remote_prefiller{kv_request_id,
  remote_host, remote_port}`` waits unscheduled while its worker asks that engine for it, then
  pulls it as above. An offer is taken only for the same prompt (a digest of the token ids,
  LoRA adapter, cache salt and multimodal inputs travels with it); none within ``remote_prefill_wait_s`` (default 30) and the prompt is
  computed here. The sidecar names port ``--p2p-connector-port`` + DP rank: set it to the
  prefill's side-channel port (with DP > 1 and TP > 1 on the prefill, kvferry's rank 0 of DP
  rank d is on base + d x TP, which the sidecar does not know; keep TP 1 or DP 1 there).
- ``host`` / ``port``: what this engine's offers advertise and where its agents listen, as
  NixlConnector does it: ``VLLM_NIXL_SIDE_CHANNEL_HOST`` / ``VLLM_NIXL_SIDE_CHANNEL_PORT`` when the
  keys are absent (llm-d's manifests set the host to the pod IP), TP rank r of data-parallel
  rank d on base + d x TP size + r, every interface bound for a non-loopback host
  (``bind_host`` overrides), and ``kv_role: kv_consumer`` engines need no port at all. Details
  in ``kvferry.addressing``. Pipeline parallelism is refused at start with a message. Prefill and decode may have different TP sizes: each decode
  rank reads its heads from the prefill ranks that hold them and tells every prefill rank, which
  frees the request's blocks once all decode ranks did. ``transport``: ``"tcp"`` (default) or
  ``"ucx"``. ``token`` (or the environment variable ``KVFERRY_TOKEN``): a shared secret both
  sides prove to each other; required when ``host`` is not a loopback address, unless
  ``"insecure": true`` (then anyone who reaches the port can read the exported KV). ``kv_lease_duration`` (seconds,
  default 30, NixlConnector's name; ``free_timeout_s`` is read as an alias): a prefill request's
  blocks are held under a grant for this long; a decode engine whose request still waits extends
  it every third of it, and releases it after reading. A decoder only reports blocks loaded once
  the prefill engine confirmed the grant was live throughout the reads; otherwise vLLM
  recomputes them.
- ``stats_path``: a file the worker rewrites (at most once a second, and at shutdown) with
  kvferry's counters in Prometheus' text format (``kvferry_pulled_blocks_total{engine=...}``),
  for node_exporter's textfile collector or a look by hand. With several TP or DP ranks each
  worker writes its own, ``<stats_path root>.<engine id>.rank<r><extension>``.
- ``dram_blocks`` (default 0: no offload): G2 capacity in KV blocks. ``nvme_dir`` and
  ``nvme_blocks``: G3, in a subdirectory of ``nvme_dir`` per model identity and TP rank (see
  ``kvferry.identity``; ``kv_cache_identity`` adds a weight version of your own), locked by the
  process using it: a second engine on the same subdirectory is refused at start.
  ``reset_prefix_cache(reset_connector=True)`` empties G2 and G3 for good. Full blocks of
  finished requests are saved by vLLM's block hash, and a new request's prefix beyond vLLM's own
  cache is loaded from G2/G3 asynchronously.
- ``eviction`` (``"lfu"``, the default; ``"lru"``, ``"s3fifo"``): which blocks the tiers keep
  when full. ``lfu`` is prefix-aware (a chain's tail goes before its head) with an aging period
  chosen online; ``kvferry-bench trace`` and ``bench/RESULTS.md`` have the hit ratios against
  the offline optimum. ``nvme_admission`` (``"always"``, the default; ``"frequency"`` or
  ``"frequency:N"``, TinyLFU against NVMe's coldest block; ``"min-hits:N"``, blocks read back N
  times): which blocks leaving DRAM are written to NVMe. ``nvme_write_mib_s``: at most this many
  MiB/s written to NVMe when making room in DRAM; writes over it are dropped, never queued. A
  block not written is asked to be dropped and the scheduler drops it once no load in flight
  needs it (the counters ``nvme_rejected`` and ``nvme_write_dropped`` say how many).
  ``nvme_timeout_s`` (default 5): every NVMe read and write finishes within it or fails (those
  blocks are recomputed). A disk that stalls past it once, or fails 3 I/Os in a row, is taken
  out of service until restart (an error in the log, ``nvme_in_service`` 0, ``nvme_timeouts``);
  the engine goes on from DRAM and recompute, and a stalled disk never holds vLLM's step.

Both at once work (a decode engine that also offloads). Loads that fail are reported through
``get_block_ids_with_load_errors``. Ordinary events never fail a load: the scheduler owns
eviction (the worker's tiers drop nothing on their own, and a block promised to a load in flight
is never evicted), and offers that are short, ungranted or past their lease are refused before
any token is claimed. What still fails a load is a genuine failure (a prefill engine that died
mid-pull, a disk error): with vLLM's default ``"kv_load_failure_policy": "fail"`` the request
fails; with ``"recompute"`` vLLM recomputes. python/README.md has the table.

The Rust core (``kvferry._native.Connector``: tiers, agent, every transfer) lives in the worker;
the scheduler side keeps a mirror of which block hashes the worker's tiers hold, fed by the
worker's stored/removed events through vLLM's worker metadata, and learns the worker's port from
vLLM's handshake metadata — so it works whether the two share a process or not.

Caches: host (the CPU engine) and CUDA tensors. On a GPU, G2 is CUDA pinned memory and blocks
move with kvferry's CUDA copy engine; for P/D the cache is exported as device memory when UCX
has CUDA, and staged through a pinned host copy otherwise (``"staged": true`` or
``"kv_buffer_device": "cpu"`` forces that, also on the CPU engine).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

try:  # vLLM's hybrid KV cache manager (several KV cache groups) and how failures reach it
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorTransferResults,
        SupportsHMA,
    )
except ImportError:  # an older vLLM: one group only

    class SupportsHMA:  # type: ignore[no-redef]
        pass

    KVConnectorTransferResults = None  # type: ignore[assignment,misc]

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvferry._native import Connector as _Native
from kvferry._native import Scheduler as _Scheduler
from kvferry.addressing import Addresses, side_channel

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# Under "vllm." so that vLLM's logging configuration shows our messages with its own.
log = logging.getLogger("vllm.kvferry")

# The worker-side Rust core of each engine in this process, by engine id (also read by
# `native()` for stats, and shared with kvferry.offload_spec's workers).
_ENGINES: dict[str, _Native] = {}
_LOCK = threading.Lock()

_PD_KEYS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")


def native(engine_id: str) -> _Native | None:
    """The running connector of an engine in this process (for stats in tests and tools)."""
    return _ENGINES.get(engine_id)


def _opt_str(extra: dict[str, Any], key: str) -> str | None:
    v = extra.get(key)
    return None if v is None else str(v)


def _opt_float(extra: dict[str, Any], key: str) -> float | None:
    v = extra.get(key)
    return None if v is None else float(v)


def _has_g3(extra: dict[str, Any]) -> bool:
    return bool(extra.get("nvme_dir")) and int(extra.get("nvme_blocks", 0)) > 0


def _capacity(extra: dict[str, Any]) -> int:
    if _has_g3(extra):
        return int(extra["nvme_blocks"])
    return int(extra.get("dram_blocks", 0))


def lease_seconds(extra: dict[str, Any]) -> float:
    return float(extra.get("kv_lease_duration", extra.get("free_timeout_s", 30.0)))


def _stats_path(path: str | None, engine_id: str, rank: int, tp_size: int, dp_size: int) -> str | None:
    """One file per worker: with several TP or DP ranks, ``stats_path`` gets ``.<engine>.rank<r>``
    before its extension, so that ranks do not overwrite each other's counters. vLLM names DP
    ranks' engines ``<engine_id>_dp<d>`` and, for models without experts, runs each as an
    independent engine whose own config says ``data_parallel_size`` 1: the name tells."""
    import re

    dp = dp_size > 1 or re.search(r"_dp\d+$", engine_id) is not None
    if not path or (tp_size <= 1 and not dp):
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{engine_id}.rank{rank}{ext}"


def _prompt_identity(request: "Request", cut: list[int] = ()) -> tuple[list[int], bytes]:
    """A prompt as both engines of the ``offloading`` protocol name it: its token ids, and what
    else makes the KV of the same tokens differ (the LoRA adapter, the cache salt, multimodal
    inputs' hashes and places). A decoder takes an offer only for the same."""
    lora = getattr(request, "lora_request", None)
    parts = [
        f"lora={getattr(lora, 'lora_name', '') if lora else ''}",
        f"salt={getattr(request, 'cache_salt', None) or ''}",
    ]
    for f in getattr(request, "mm_features", None) or ():
        pos = getattr(f, "mm_position", None)
        ident = getattr(f, "identifier", None) or getattr(f, "mm_hash", None)
        parts.append(f"mm={ident}@{getattr(pos, 'offset', '?')}+{getattr(pos, 'length', '?')}")
    # `cut`: the prompt tokens a prefill stopped short of (state groups): it names the whole
    # prompt, as its decoder does.
    return list(request.prompt_token_ids or ()) + list(cut), "\n".join(parts).encode()


def kv_groups(kv_cache_config: Any, block_size: int) -> list[tuple[str, int, int]] | None:
    """vLLM's KV cache groups as the scheduler takes them: ``(kind, sliding window in tokens,
    extra retained tokens)`` each, kind ``"full"``, ``"window"`` or ``"state"`` (Mamba / Gated
    DeltaNet under vLLM's "align" cache mode: a state per block boundary), in vLLM's order;
    None without a config (one group of full attention). A kind kvferry cannot move exactly
    (chunked local attention, Mamba in another cache mode, ...) stops the engine here, naming
    it: vLLM would otherwise run with a connector that hands it wrong blocks for it."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or ())
    if not groups:
        return None
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec

    try:
        from vllm.v1.kv_cache_interface import MambaSpec
    except ImportError:  # an older vLLM
        MambaSpec = ()  # noqa: N806 - matches no spec below

    if len(groups) == 1 and isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
        # One group of full attention (or a kind of it): what kvferry always moved.
        return None
    # A lone sliding-window group (a model whose every layer slides keeps vLLM's sliding-window
    # manager, whose null blocks must never be saved, loaded into or pulled) is a window group.

    out = []
    for i, g in enumerate(groups):
        spec = g.kv_cache_spec
        if int(getattr(spec, "block_size", block_size)) != block_size:
            raise ValueError(
                f"kvferry: KV cache group {i} has blocks of {spec.block_size} tokens, the engine "
                f"{block_size}; kvferry moves one block size"
            )
        if type(spec) in (FullAttentionSpec, MLAAttentionSpec):
            out.append(("full", 0, 0))
        elif type(spec) is SlidingWindowSpec:
            out.append(
                ("window", int(spec.sliding_window), int(getattr(spec, "extra_retained_tokens", 0)))
            )
        elif MambaSpec and type(spec) is MambaSpec and getattr(spec, "mamba_cache_mode", "") == "align":
            if int(getattr(spec, "num_speculative_blocks", 0) or 0):
                raise ValueError(
                    f"kvferry: KV cache group {i} ({type(spec).__name__}) keeps speculative "
                    "state blocks, which kvferry does not move yet; run without speculative "
                    "decoding"
                )
            out.append(("state", 0, 0))
        else:
            raise ValueError(
                f"kvferry: KV cache group {i} ({type(spec).__name__}, layers "
                f"{', '.join(g.layer_names[:3])}...) is of a kind kvferry does not move yet"
                + (
                    f" (Mamba state in cache mode {spec.mamba_cache_mode!r}; kvferry moves "
                    "'align')"
                    if MambaSpec and type(spec) is MambaSpec
                    else ""
                )
                + "; run with --disable-hybrid-kv-cache-manager (when it has other groups), "
                "or without kvferry"
            )
    return out


def staged(extra: dict[str, Any]) -> bool:
    """P/D through a host copy of the cache: ``"staged": true``, or NixlConnector's
    ``"kv_buffer_device": "cpu"``. A CUDA cache that the transport cannot export (TCP, or UCX
    without CUDA) is staged whatever this says."""
    return bool(extra.get("staged", False)) or str(extra.get("kv_buffer_device", "")) == "cpu"


def offer_wait_seconds(extra: dict[str, Any]) -> float:
    return float(extra.get("remote_prefill_wait_s", 30.0))


def _shared(
    engine_id: str,
    extra: dict[str, Any],
    addrs: Addresses,
    tp_size: int,
    tp_rank: int,
    total_kv_heads: int | None = None,
    identity: str = "",
) -> _Native:
    with _LOCK:
        n = _ENGINES.get(engine_id)
        if n is None:
            n = _Native(
                engine_id,
                dram_blocks=int(extra.get("dram_blocks", 0)),
                nvme_dir=extra.get("nvme_dir"),
                nvme_blocks=int(extra.get("nvme_blocks", 0)),
                pd=bool(extra.get("pd", True)),
                host=addrs.bind,
                port=addrs.base_port or 0,
                transport=str(extra.get("transport", "tcp")),
                # The shared secret: the extra config's, else the environment's (so it need not
                # be written into a command line or a manifest).
                token=extra.get("token") or os.environ.get("KVFERRY_TOKEN") or None,
                insecure=bool(extra.get("insecure", False)),
                lease_s=lease_seconds(extra),
                timeout_s=float(extra.get("timeout_s", 10.0)),
                tp_size=tp_size,
                tp_rank=tp_rank,
                total_kv_heads=total_kv_heads,
                identity=identity,
                # The scheduler owns eviction (see capacity in KVFerryConnector.__init__).
                caller_evicts=True,
                eviction=_opt_str(extra, "eviction"),
                nvme_admission=_opt_str(extra, "nvme_admission"),
                nvme_write_mib_s=_opt_float(extra, "nvme_write_mib_s"),
                staged=staged(extra),
                nvme_timeout_s=_opt_float(extra, "nvme_timeout_s"),
            )
            _ENGINES[engine_id] = n
        return n


# Counters that are levels (resident blocks now, capacities), not counts of events.
_LEVELS = (
    "dram_blocks",
    "nvme_blocks",
    "dram_capacity_tokens",
    "dram_used_tokens",
    "nvme_capacity_tokens",
    "nvme_used_tokens",
    "nvme_in_service",
)


@dataclass
class KVFerryStats(KVConnectorStats):
    """kvferry's counters since the last report: event counts as deltas (summed across workers
    and steps), resident block counts as levels (the latest; every TP rank holds the same
    blocks, each its own heads)."""

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in (other.data or {}).items():
            self.data[k] = v if k in _LEVELS else self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not self.data


class KVFerryPromMetrics(KVConnectorPromMetrics):
    """kvferry's counters on vLLM's /metrics: ``vllm:kvferry_<name>_total`` counters (blocks
    and bytes moved, per path and tier, failures by cause, lease expiries, NVMe admission) and
    ``vllm:kvferry_dram_blocks`` / ``vllm:kvferry_nvme_blocks`` gauges, with vLLM's
    ``model_name`` and ``engine`` labels. Made in the API server process; fed each engine step
    with the workers' deltas.

    vLLM's own offloading families beside them, where they mean the same:
    ``vllm:kv_offload_store_bytes`` (engine cache to the tiers) and ``vllm:kv_offload_load_bytes``
    (the tiers to the engine cache, G3's through G2), so dashboards made for vLLM's
    OffloadingConnector read kvferry too. Not when an OffloadingConnector runs beside kvferry
    (a MultiConnector): the family is that connector's."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        from vllm.v1.metrics.utils import create_metric_per_engine

        self._per_engine = create_metric_per_engine
        self._gauges = {}
        for k in _LEVELS:
            tier = k.split("_")[0].upper()
            what = {
                "blocks": f"blocks resident in {tier} now",
                "capacity_tokens": f"tokens of KV {tier} holds when full",
                "used_tokens": f"tokens of KV resident in {tier} now",
                "in_service": f"1 while {tier} is in service, 0 once errors or a stall took it out",
            }[k.split("_", 1)[1]]
            g = self._gauge_cls(
                name=f"vllm:kvferry_{k}",
                documentation=f"kvferry: {what}.",
                labelnames=labelnames,
                multiprocess_mode="mostrecent",
            )
            self._gauges[k] = create_metric_per_engine(g, per_engine_labelvalues)
        self._counters: dict[str, Any] = {}
        # kvferry's counter -> vLLM's family for the same bytes, made at the first bytes (see
        # _vllm_family); None: left to an OffloadingConnector beside kvferry.
        self._vllm_families: dict[str, Any] = {}

    def _counter(self, k: str):
        c = self._counters.get(k)
        if c is None:
            # Made on first sight: the set of counters grows with the Rust core's.
            metric = self._counter_cls(
                name=f"vllm:kvferry_{k}",
                documentation=f"kvferry: {k.replace('_', ' ')}.",
                labelnames=self._labelnames,
            )
            c = self._counters[k] = self._per_engine(metric, self.per_engine_labelvalues)
        return c

    _VLLM_FAMILIES = {
        "dram_bytes_in": ("vllm:kv_offload_store_bytes", "Total bytes stored from GPU to offload storage."),
        "dram_bytes_out": ("vllm:kv_offload_load_bytes", "Total bytes loaded from offload storage to GPU."),
    }

    def _vllm_family(self, k: str):
        """vLLM's family for kvferry's counter `k`, or None. Made at the first bytes, after
        every connector's metrics exist: an OffloadingConnector beside kvferry (a
        MultiConnector, which hands each child a config naming it alone) registers the same
        family when it is made, and a second registration fails; then the family is its."""
        if k not in self._VLLM_FAMILIES:
            return None
        if k not in self._vllm_families:
            name, doc = self._VLLM_FAMILIES[k]
            try:
                from prometheus_client import REGISTRY

                taken = name in getattr(REGISTRY, "_names_to_collectors", {}) or (
                    name + "_total" in getattr(REGISTRY, "_names_to_collectors", {})
                )
                family = None
                if not taken:
                    c = self._counter_cls(name=name, documentation=doc, labelnames=self._labelnames)
                    family = self._per_engine(c, self.per_engine_labelvalues)
            except ValueError:  # registered between the check and here
                family = None
            self._vllm_families[k] = family
        return self._vllm_families[k]

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for k, v in (transfer_stats_data or {}).items():
            if k in self._gauges:
                self._gauges[k][engine_idx].set(v)
            elif isinstance(v, (int, float)) and v > 0:
                self._counter(k)[engine_idx].inc(v)
                family = self._vllm_family(k)
                if family is not None:
                    family[engine_idx].inc(v)


@dataclass
class KVFerryHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler at start: where the worker's agent listens, and every block its tiers
    already hold (recovered from G3 after a restart), so the first requests can hit them."""

    port: int | None
    events: list[tuple[str, bytes, str]] = field(default_factory=list)
    # (tier key, note) of the recovered blocks that had one: their descriptions for routers.
    notes: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass
class KVFerryWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler each step: blocks stored in / removed from the tiers, by TP rank
    (a block loads only once every rank holds its heads)."""

    # TP rank -> [(kind, hash, medium)] with kind "stored" or "removed"
    events: dict[int, list[tuple[str, bytes, str]]] = field(default_factory=dict)
    # Resets this worker carried out in all (the scheduler ignores stores until it did).
    resets: int = 0
    # llm-d's offloading protocol: offers fetched for decode requests, (request, offer or None).
    offers: list[tuple[str, Any]] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVFerryWorkerMeta):
            self.offers.extend(other.offers)
            for rank, evs in other.events.items():
                self.events.setdefault(rank, []).extend(evs)
            # Every worker must have reset before stores count again.
            self.resets = min(self.resets, other.resets)
        return self


@dataclass
class KVFerryMetadata(KVConnectorMetadata):
    """What the scheduler asks the worker to do this step."""

    saves: dict[str, tuple[list[bytes], list[int]]] = field(default_factory=dict)
    loads: dict[str, tuple[list[bytes], list[int]]] = field(default_factory=dict)
    pulls: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (request id, generation of the grant decoders pull it under or None, blocks offered)
    finished: list[tuple[str, int | None, list[int]]] = field(default_factory=list)
    # (host, port, tp_size, request id, grant) of prefill grants to extend / to abort
    extends: list[tuple[str, int, int, str, int]] = field(default_factory=list)
    aborts: list[tuple[str, int, int, str, int]] = field(default_factory=list)
    # Empty the tiers before anything else this step.
    reset: bool = False
    # Blocks to drop from the tiers before this step's saves (the scheduler owns eviction).
    discards: list[bytes] = field(default_factory=list)
    # llm-d's offloading protocol: offers to ask prefill engines for, (request, (key, host,
    # port)), and offers to post under decoders' keys, (key, offer or None).
    asks: list[tuple[str, tuple[str, str, int]]] = field(default_factory=list)
    posts: list[tuple[str, Any]] = field(default_factory=list)
    # Asks to stop (their requests went away).
    cancels: list[str] = field(default_factory=list)
    # Sliding-window blocks to save when this step's forward pass is done (wait_for_save):
    # vLLM frees them when it schedules the next step.
    window_saves: list[tuple[str, list[bytes], list[int]]] = field(default_factory=list)
    # With G3: the saved blocks' descriptions, by tier key, kept with them in G3.
    notes: dict[bytes, bytes] = field(default_factory=dict)

    def notes_for(self, hashes: list[bytes]) -> list[bytes | None] | None:
        if not self.notes:
            return None
        return [self.notes.get(h) for h in hashes]


class KVFerryConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: Any = None,
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        tc = self._kv_transfer_config
        self.extra: dict[str, Any] = dict(tc.kv_connector_extra_config or {})
        self.engine_id: str = tc.engine_id or "kvferry"
        self.block_size: int = vllm_config.cache_config.block_size
        # Hybrid models: one KV cache group per attention kind (None: one group).
        self.groups = kv_groups(kv_cache_config, self.block_size)
        hash_bs = getattr(kv_cache_config, "hash_block_size", None)
        if hash_bs and int(hash_bs) != self.block_size:
            # kvferry keys block i by the request's hash i: hashes of another span (vLLM's
            # prefix_match_unit) would name other prefixes.
            raise ValueError(
                f"kvferry: vLLM hashes prefixes every {hash_bs} tokens and its blocks hold "
                f"{self.block_size}; kvferry needs one block per hash (leave prefix_match_unit "
                "unset)"
            )
        self._group_layers: list[list[str]] = [
            list(g.layer_names) for g in getattr(kv_cache_config, "kv_cache_groups", None) or ()
        ]
        self.tp_size: int = vllm_config.parallel_config.tensor_parallel_size
        self.offload = int(self.extra.get("dram_blocks", 0)) > 0
        self.pd = bool(self.extra.get("pd", True))
        # Mamba / Gated DeltaNet: a decoder goes on from the prefill's state after all but the
        # last prompt token (see on_new_request).
        self._states = any(k == "state" for k, _, _ in self.groups or ())
        pc = vllm_config.parallel_config
        if int(getattr(pc, "pipeline_parallel_size", 1) or 1) > 1:
            raise ValueError(
                "kvferry: pipeline parallelism is not supported yet (each stage would need its own "
                "agents and offers); run with --pipeline-parallel-size 1, or use NixlConnector for "
                "pipeline-parallel P/D"
            )
        dp_index = getattr(pc, "data_parallel_index", None)
        if dp_index is None:
            dp_index = getattr(pc, "data_parallel_rank", 0)
        dp_size = int(getattr(pc, "data_parallel_size", 1) or 1)
        self.addrs = side_channel(
            self.extra,
            os.environ,
            getattr(tc, "kv_role", None),
            self.tp_size,
            int(dp_index or 0),
            dp_size,
        )
        self.host = self.addrs.advertise
        # The Rust core runs in the worker only.
        self.native: _Native | None = None
        self._rank = 0
        if role == KVConnectorRole.WORKER:
            rank = 0
            try:
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

                rank = get_tensor_model_parallel_rank()
            except Exception:  # noqa: BLE001 - no parallel state in some test set-ups
                rank = 0
            self._rank = rank
            total_kv_heads = None
            try:
                total_kv_heads = int(vllm_config.model_config.get_total_num_kv_heads())
            except Exception:  # noqa: BLE001 - test set-ups without a model config
                total_kv_heads = None
            from kvferry.identity import kv_identity

            self.native = _shared(
                self.engine_id,
                self.extra,
                self.addrs,
                self.tp_size,
                rank,
                total_kv_heads,
                kv_identity(vllm_config, self.extra),
            )
        # Scheduler side: the decisions live in Rust.
        # Offers name TP rank 0's port; without a configured one, the worker's handshake tells it.
        port = self.addrs.base_port
        self.sched = _Scheduler(
            self.engine_id,
            block_size=self.block_size,
            offload=self.offload,
            pd=self.pd,
            host=self.host,
            port=port,
            tp_size=self.tp_size,
            lease_s=lease_seconds(self.extra),
            # The scheduler owns eviction over as many distinct blocks as the tiers hold (G3,
            # or G2 without it): a block it promises a load of is never dropped under it, so
            # vLLM's default kv_load_failure_policy ("fail") does not fail ordinary requests.
            capacity=_capacity(self.extra) if self.offload else None,
            eviction=_opt_str(self.extra, "eviction"),
            offer_wait_s=offer_wait_seconds(self.extra),
            groups=self.groups,
            # Saved blocks' descriptions go to G3 with them, so that after a restart the blocks
            # recovered from it are announced to routers as fully as new ones.
            notes=self.offload and _has_g3(self.extra),
        )
        # Offload with a sliding-window group: running requests' steps are reported, so the
        # blocks their windows leave behind are saved before vLLM frees them.
        self._windows = self.sched.has_windows()
        self._running: dict[str, "Request"] = {}
        self._tables: dict[str, list[list[int]]] = {}
        # Prefill requests that stopped one prompt token short (state groups): the token cut.
        # Kept here, not in the request's kv_transfer_params, which clients write.
        self._cut: dict[str, list[int]] = {}
        # Worker-side state.
        self._load_errors: set[int] = set()
        self._resets = 0
        self._cleared = False
        self._caches: list["torch.Tensor"] = []
        self._cuda = False
        self._reported: dict[str, int] = {}
        self._offers: list[tuple[str, Any]] = []
        self._stats_path: str | None = _stats_path(
            self.extra.get("stats_path"), self.engine_id, self._rank, self.tp_size, dp_size
        )
        self._stats_stop = threading.Event()
        if self._stats_path and self.native is not None:
            threading.Thread(target=self._stats_loop, name="kvferry-stats", daemon=True).start()

    # ---- worker side -------------------------------------------------------------------

    def _core(self) -> _Native:
        if self.native is None:
            raise RuntimeError("kvferry's core runs in the worker; this is the scheduler side")
        return self.native

    def _pages(self, kv_caches: dict[str, "torch.Tensor"]) -> list["torch.Tensor"]:
        """The distinct caches behind vLLM's per-layer views. Under the hybrid KV cache manager
        one layer of each group views the same memory, and a block id names one page of it,
        whichever group holds the block: moving block b of every distinct cache moves that
        group's KV of the block. That holds only when every group's layers view all the
        distinct caches once each (checked here), else the engine stops with why."""
        pages: dict[int, tuple[str, "torch.Tensor"]] = {}
        state_layers = {
            n
            for (kind, _, _), layers in zip(self.groups or (), self._group_layers)
            if kind == "state"
            for n in layers
        }
        states = {n: t for n, t in kv_caches.items() if n in state_layers}
        for name, t in kv_caches.items():
            if name in states:
                continue
            seen = pages.get(t.data_ptr())
            if seen is None:
                pages[t.data_ptr()] = (name, t)
            elif seen[1].shape != t.shape or seen[1].stride() != t.stride() or seen[1].dtype != t.dtype:
                raise ValueError(
                    f"kvferry: layers {seen[0]} and {name} share memory in different layouts "
                    f"({tuple(seen[1].shape)} and {tuple(t.shape)})"
                )
        # A state layer's page is bytes of its own (conv and recurrent state, then padding) in
        # the page an attention layer of another group views (vLLM pads state pages to the
        # attention page): moving that page by block id moves the state.
        stride = {p: t.stride(0) * t.element_size() for p, (_, t) in pages.items()}
        for name, t in states.items():
            if t.data_ptr() not in pages:
                raise ValueError(
                    f"kvferry: state layer {name}'s cache is not in memory an attention layer "
                    "views; kvferry moves pages of attention layouts"
                )
            if t.stride(0) * t.element_size() != stride[t.data_ptr()]:
                raise ValueError(
                    f"kvferry: state layer {name}'s pages ({t.stride(0) * t.element_size()} "
                    f"bytes) differ from the attention pages ({stride[t.data_ptr()]} bytes)"
                )
        if self.groups:
            for i, layers in enumerate(self._group_layers):
                ptrs = [kv_caches[n].data_ptr() for n in layers if n in kv_caches]
                if len(set(ptrs)) != len(ptrs) or set(ptrs) != set(pages):
                    raise ValueError(
                        f"kvferry: KV cache group {i}'s layers do not view the {len(pages)} "
                        "caches once each (a layout where block ids differ per group); run with "
                        "--disable-hybrid-kv-cache-manager"
                    )
        return [t for _, t in pages.values()]

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]):
        tensors = self._pages(kv_caches)
        if not tensors:
            return
        first = tensors[0]
        device: int | None = None
        if first.device.type == "cuda":
            import torch

            device = first.device.index if first.device.index is not None else torch.cuda.current_device()
        elif first.device.type != "cpu":
            raise NotImplementedError(
                f"kvferry registers host and CUDA KV caches; this engine's cache is on {first.device}"
            )
        if any(t.device != first.device for t in tensors):
            raise ValueError("kvferry needs every layer's KV cache on one device")
        self._cuda = device is not None
        if first.dim() != 4:
            raise ValueError(
                f"expected per-layer KV caches [blocks, kv_heads, block_size, K|V channels], "
                f"got shape {tuple(first.shape)}"
            )
        for t in tensors:
            if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype:
                raise ValueError("kvferry needs every layer's KV cache in one shape and dtype")
        blocks, heads, tokens, channels = first.shape
        if tokens != self.block_size or channels % 2:
            raise ValueError(
                f"KV cache shape {tuple(first.shape)} does not match block size {self.block_size}"
            )
        base = min(t.data_ptr() for t in tensors)
        self._caches = tensors  # vLLM keeps them alive; holding them documents the contract
        self._core().register_cache(
            kv_heads=heads,
            head_size=channels // 2,
            dtype=str(first.dtype),
            block_tokens=tokens,
            num_blocks=blocks,
            base=base,
            layer_offsets=[t.data_ptr() - base for t in tensors],
            strides=list(first.stride()),
            device=device,
        )
        log.info(
            "kvferry: registered %d layers (%d caches) x %d blocks (%s) for engine %s; offload %s, "
            "P/D %s",
            len(kv_caches),
            len(tensors),
            blocks,
            first.dtype,
            self.engine_id,
            "on" if self.offload else "off",
            f"on port {self.native.listen_port()}" if self.pd else "off",
        )

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        if self.native is None:
            return None
        events = list(self.native.take_events())
        # Only rank 0's events reach routers: only its notes are needed (the others are
        # taken all the same, or they would stay in memory).
        notes = list(self.native.take_recovered_notes())
        if self._rank != 0:
            notes = []
        if not events and (not self.pd or self.addrs.base_port is not None):
            # Nothing the scheduler does not know already (its port is configured, no block was
            # recovered from G3): no handshake object, so that beside another connector in a
            # MultiConnector (which forwards the first one it gets) theirs reaches them.
            return None
        return KVFerryHandshake(port=self.native.listen_port(), events=events, notes=notes)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self.native is None:
            return None
        events = self.native.take_events()
        offers, self._offers = self._offers, []
        if not events and not self._resets and not offers:
            return None
        return KVFerryWorkerMeta(
            events={self._rank: list(events)}, resets=self._resets, offers=offers
        )

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVFerryMetadata)
        if self.native is None:
            return
        if meta.reset:
            try:
                dropped = self.native.reset_cache()
                log.info("kvferry: reset: %d blocks dropped from G2/G3", dropped)
            except Exception as e:  # noqa: BLE001 - nothing is loaded anyway (the mirror is empty)
                log.error("kvferry: reset of the tiers failed: %s", e)
            self._resets += 1
        if meta.discards:
            self.native.discard(meta.discards)
        if self._cuda and (meta.loads or meta.pulls):
            # Loads and pulls write blocks vLLM just handed to requests; a kernel of a step
            # still running (async scheduling) may read what they held before (a preempted
            # request's). kvferry's copies are not on vLLM's stream: wait for what it queued.
            # Saves and finishes need no wait: they name full blocks of finished requests, whose
            # last writes ended before vLLM saw them finish (it sampled from that step), and
            # a step scheduled past the end writes only beyond the last full block.
            self._fence()
        for req, (hashes, blocks) in meta.saves.items():
            try:
                self.native.save(req, hashes, blocks, meta.notes_for(hashes))
            except Exception as e:  # noqa: BLE001 - a save that fails is a future miss
                log.warning("kvferry: saving %s failed: %s", req, e)
        for req, (hashes, blocks) in meta.loads.items():
            self.native.load(req, hashes, blocks)
        for req, p in meta.pulls.items():
            self.native.pull(
                req,
                p["remote_host"],
                int(p["remote_port"]),
                p["remote_request_id"],
                int(p.get("tp_size") or 1),
                int(p["grant"]),
                int(p["offer_blocks"]),
                p["remote_blocks"],
                p["local_blocks"],
            )
        for req, grant, blocks in meta.finished:
            self.native.finish(req, grant, blocks)
        for t in meta.extends:
            self.native.extend(t)
        for t in meta.aborts:
            self.native.abort_remote(t)
        if self._rank == 0:
            # The offloading protocol's router names one address per engine: TP rank 0's.
            for key, offer in meta.posts:
                self.native.post(key, offer)
            wait = offer_wait_seconds(self.extra)
            for req, (key, host, port) in meta.asks:
                self.native.ask(req, key, host, int(port), wait)
            for req in meta.cancels:
                self.native.cancel_ask(req)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any):
        return None

    def wait_for_save(self):
        """The step's forward pass is done: the blocks its sliding windows left behind are
        saved before the step ends (vLLM may hand them to another request in the next one);
        on a CPU cache a memcpy into G2."""
        if self.native is None:
            return None
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVFerryMetadata):
            return None
        timeout = float(self.extra.get("window_save_timeout_s", 10.0))
        if self._cuda and meta.window_saves:
            # This step's forward pass wrote these blocks, and is only queued on vLLM's stream.
            self._fence()
        for req, hashes, blocks in meta.window_saves:
            try:
                self.native.save_now(hashes, blocks, timeout, meta.notes_for(hashes))
            except Exception as e:  # noqa: BLE001 - a save that fails is a future miss
                log.warning("kvferry: saving %s's window failed: %s", req, e)
        return None

    @staticmethod
    def _fence() -> None:
        """Waits until the work queued on the current CUDA stream is done. (An event the copy
        streams wait on would keep the CPU free; kvferry's copy engine does not take one yet.)"""
        import torch

        torch.cuda.current_stream().synchronize()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.native is None:
            return None, None
        sending, recving, errors = self.native.poll()
        self._load_errors.update(errors)
        self._offers.extend(self.native.take_offers())
        return (set(sending) or None, set(recving) or None)

    def _stats_loop(self):
        # Its own thread: an idle engine makes no calls, and the file must still catch up.
        while not self._stats_stop.wait(1.0):
            self._write_stats()

    def _write_stats(self):
        lines = []
        for k, v in sorted(self._counters().items()):
            name = f"kvferry_{k}" if k in _LEVELS else f"kvferry_{k}_total"
            lines.append(f'{name}{{engine="{self.engine_id}"}} {v}')
        tmp = f"{self._stats_path}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, self._stats_path)
        except OSError as e:
            log.warning("kvferry: cannot write stats to %s: %s", self._stats_path, e)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        if self.groups:
            # Block ids are per group there: vLLM takes failures by request only
            # (get_transfer_results' failed_recving), and stops on block-level ones.
            return set()
        return out

    def get_transfer_results(self, finished_req_ids: set[str]):
        sending, recving = self.get_finished(finished_req_ids)
        failed = set(self.native.take_failed_recving()) if self.native is not None else set()
        if KVConnectorTransferResults is None:
            return sending, recving
        return KVConnectorTransferResults(
            finished_sending=set(sending or ()),
            finished_recving=set(recving or ()) | failed,
            # One group: the failed blocks say what to recompute (the rest of the prompt stays
            # loaded); several: the request is recomputed.
            failed_recving=failed if self.groups else set(),
        )

    def shutdown(self):
        if self.native is None:
            return
        self._stats_stop.set()
        try:
            written = self.native.shutdown(float(self.extra.get("shutdown_timeout_s", 60.0)))
            if written:
                log.info("kvferry: wrote %d blocks to G3 at shutdown", written)
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.warning("kvferry: shutdown: %s", e)
        if self._stats_path:
            self._write_stats()

    def _counters(self) -> dict[str, int]:
        """The Rust core's counters, plus each tier's capacity and use in tokens (what llm-d's
        tiered guide otherwise sets by hand as ``lruCapacityPerServer``)."""
        c = dict(self.native.counters())
        caps = {"dram": int(self.extra.get("dram_blocks", 0))}
        if self.extra.get("nvme_dir"):
            caps["nvme"] = int(self.extra.get("nvme_blocks", 0))
        for tier, blocks in caps.items():
            if blocks > 0:
                c[f"{tier}_capacity_tokens"] = blocks * self.block_size
                c[f"{tier}_used_tokens"] = int(c.get(f"{tier}_blocks", 0)) * self.block_size
        return c

    def get_kv_connector_stats(self) -> KVFerryStats | None:
        if self.native is None:
            return None
        now = self._counters()
        # Resident block counts are levels, reported when they change (to 0 too); everything
        # else is an event count, reported as the change since the last report — never
        # negative (Prometheus counters only go up): a count that went down restarted.
        data = {}
        for k, v in now.items():
            before = self._reported.get(k)
            if k in _LEVELS:
                if v != before:
                    data[k] = v
                continue
            d = v - (before or 0) if v >= (before or 0) else v
            if d > 0:
                data[k] = d
        self._reported = now
        return KVFerryStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVFerryStats(data=dict(data)) if data is not None else KVFerryStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        # vLLM's /metrics; also what MultiConnector requires of each child with stats on.
        return KVFerryPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ---- scheduler side: decisions in the Rust Scheduler; this translates vLLM's objects ----

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        # One handshake per TP rank: rank 0's port is the one offers name; every rank's
        # recovered blocks count (a block loads once all ranks hold it).
        for rank, md in sorted(metadata.items()):
            if not isinstance(md, KVFerryHandshake):
                continue
            if rank == 0 and md.port:
                self.sched.set_port(md.port)
            if rank == 0 and md.notes:
                n = self.sched.noted(md.notes)
                log.info("kvferry: %d of %d recovered blocks' descriptions restored", n, len(md.notes))
            self.sched.apply(md.events, int(rank))

    def update_connector_output(self, connector_output: Any):
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KVFerryWorkerMeta):
            for req, offer in meta.offers:
                self.sched.fetched(req, offer)
            self.sched.resets_done(meta.resets)
            for rank, events in sorted(meta.events.items()):
                self.sched.apply(events, rank)
        for req in getattr(connector_output, "finished_recving", None) or ():
            self.sched.loaded(req)

    def reset_cache(self) -> bool:
        """``reset_prefix_cache(reset_connector=True)``: from now on nothing in G2/G3 is loaded
        (the scheduler's mirror is emptied at once), and the worker empties the tiers at its next
        step, retiring G3's slots so that a restart does not bring them back either."""
        self.sched.reset()
        self._cleared = True
        return True

    def on_new_request(self, request: "Request") -> None:
        if self.pd and self._states:
            self._stop_short(request)
        # Heartbeats for the prefill engine's grant start here, however long the request waits.
        remote = self._remote(request)
        if remote is not None:
            self.sched.arrived(request.request_id, remote, len(request.prompt_token_ids or ()))
            return
        prefiller = self._prefiller(request)
        if prefiller is not None:
            # llm-d's offloading protocol: the prefill runs now, elsewhere; its offer is asked
            # for by key, and until it is here the request waits (see get_num_new_matched_tokens).
            self.sched.expect(request.request_id, prefiller, _prompt_identity(request))

    def _stop_short(self, request: "Request") -> None:
        """Prefill side, models with state groups: the prefill computes all but the last
        prompt token, so that its state is the one the decoder goes on from (the decoder
        computes that token itself: a state cannot be wound back), and samples one token, as
        NixlConnector's prefill does. Once: a preempted request that comes back is not cut
        again."""
        params = request.kv_transfer_params
        if request.request_id in self._cut or not isinstance(params, dict):
            return
        if not (params.get("do_remote_decode") or isinstance(params.get("remote_decoder"), dict)):
            return
        skip = getattr(request, "get_skip_reading_prefix_cache", None)
        if (
            request.num_prompt_tokens <= 1
            or request.prompt_token_ids is None
            or (skip and skip())
            or getattr(request, "resumable", False)
        ):
            # Nothing a decoder would load (it computes the whole prompt), or a session that
            # goes on after this turn.
            return
        last = int(request.prompt_token_ids[-1])
        del request.prompt_token_ids[-1:]
        del request._all_token_ids[-1:]
        request.num_prompt_tokens -= 1
        request.max_tokens = 1
        # A hash of the block the cut token ended would name it whole: dropped (vLLM hashes
        # the block again once it is full).
        del request.block_hashes[request.num_prompt_tokens // self.block_size :]
        self._cut[request.request_id] = [last]

    @staticmethod
    def _role_key(p: Any, role: str) -> dict[str, Any] | None:
        v = p.get(role) if isinstance(p, dict) else None
        if not isinstance(v, dict):
            return None
        key = v.get("kv_request_id")
        if not isinstance(key, str) or not 0 < len(key.encode()) <= 256:
            log.warning("kvferry: ignoring %s with a malformed kv_request_id: %r", role, v)
            return None
        return v

    def _prefiller(self, request: "Request") -> tuple[str, str, int] | None:
        """llm-d's offloading protocol, decode side: ``remote_prefiller{kv_request_id,
        remote_host, remote_port}``. Malformed params are None (the prompt is computed here)."""
        v = self._role_key(request.kv_transfer_params, "remote_prefiller") if self.pd else None
        if v is None:
            return None
        host, port = v.get("remote_host"), v.get("remote_port")
        try:
            port = int(port)
        except (TypeError, ValueError):
            port = 0
        if not isinstance(host, str) or not host or len(host) > 255 or not 0 < port < 65536:
            log.warning("kvferry: ignoring remote_prefiller without a usable address: %r", v)
            return None
        return (v["kv_request_id"], host, port)

    def _remote(self, request: "Request") -> tuple | None:
        """The prefill engine's offer in a decode request's kv_transfer_params, if well formed.
        Any API client can send these params: nothing in them may raise here (the scheduler
        would die); a malformed offer is None, and the prompt is computed locally.

        Only a kvferry prefill engine's offer (it carries ``kvferry_grant``) is ours, and only
        when this engine does P/D: another connector's offer (NixlConnector's, beside kvferry in
        a MultiConnector) is left alone, ``do_remote_prefill`` included."""
        p = request.kv_transfer_params or {}
        if not self.pd or not isinstance(p, dict) or not p.get("do_remote_prefill"):
            return None
        if "kvferry_grant" not in p:
            return None
        try:
            return KVFerryConnector._parse_offer(p)
        except (TypeError, ValueError, OverflowError, KeyError) as e:
            log.warning(
                "kvferry: malformed kv_transfer_params for %s (%s): %s", request.request_id, e, p
            )
            return None

    @staticmethod
    def _parse_offer(p: dict[str, Any]) -> tuple | None:
        if not all(k in p for k in _PD_KEYS):
            raise KeyError(f"missing one of {_PD_KEYS}")
        blocks = p.get("remote_block_ids") or []
        if not isinstance(blocks, (list, tuple)):
            raise TypeError("remote_block_ids is not a list")
        # One list per KV cache group, or one flat list (one group).
        if not blocks or not isinstance(blocks[0], (list, tuple)):
            blocks = [blocks]
        if len(blocks) > 16 or not all(isinstance(g, (list, tuple)) for g in blocks):
            raise ValueError("remote_block_ids is not one list per KV cache group")
        ids = [[int(b) for b in g] for g in blocks]
        if any(not 0 <= b < 2**32 for g in ids for b in g):
            raise ValueError("a block id out of range")
        try:
            grant = int(str(p.get("kvferry_grant") or "0"), 16)
        except ValueError:
            grant = 0  # refused by the scheduler: the prompt is computed here
        port, tp = int(p["remote_port"]), int(p.get("tp_size") or 1)
        if not (0 < port < 65536 and 0 < tp <= 4096):
            raise ValueError("port or tp_size out of range")
        expires = float(p.get("remote_blocks_expiry_time") or 0.0)
        if not math.isfinite(expires) or not 0.0 <= expires < 1e11:
            expires = 0.0
        num_tokens = int(p.get("remote_num_tokens") or 0)
        if not 0 <= num_tokens < 2**32:
            num_tokens = 0  # not said: refused where it matters (models with state groups)
        return (
            str(p["remote_host"]),
            port,
            str(p["remote_request_id"]),
            str(p["remote_engine_id"]),
            tp,
            ids,
            grant if 0 < grant < 2**64 else 0,
            expires,
            num_tokens,
        )

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        n = self.sched.matched(
            request.request_id,
            self._remote(request),
            len(request.prompt_token_ids or ()),
            request.num_tokens,
            list(request.block_hashes),
            num_computed_tokens,
        )
        if n is None:
            # Its offer is still asked for (offloading protocol): vLLM skips it this step.
            return None, False
        return n, n > 0

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ):
        remote = self._remote(request)
        if self._windows:
            self._running[request.request_id] = request
        if remote is not None:
            # One transfer per request, as NixlConnector does.
            request.kv_transfer_params["do_remote_prefill"] = False
        self.sched.allocated(
            request.request_id,
            remote,
            [list(g) for g in blocks.get_block_ids()],
            num_external_tokens,
        )

    def get_external_cache_hit_sources(self, request: "Request", num_external_tokens: int):
        """Splits vLLM's external prefix-cache hits by tier: G2 as ``HOST``, G3 as ``DISK``, pulls
        from a prefill engine as ``P2P`` (vLLM's ``CacheHitSource``)."""
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        if not num_external_tokens:
            return {}
        host, disk, p2p = self.sched.hit_sources(request.request_id, int(num_external_tokens))
        if host + disk + p2p != num_external_tokens:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        split = {CacheHitSource.HOST: host, CacheHitSource.DISK: disk, CacheHitSource.P2P: p2p}
        return {k: v for k, v in split.items() if v}

    def take_events(self):
        """Blocks stored in / removed from kvferry's tiers, for cache-aware routers, in vLLM's own
        form: the medium "CPU" for G2 and "STORAGE" for G3, block hashes converted as vLLM
        converts its own (``maybe_convert_block_hash``: a router matches kvferry's events with the
        GPU's), and each stored block described as vLLM describes it (parent hash, token ids,
        block size, LoRA name, KV cache group) when this engine saved it."""
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        try:
            from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as convert
        except ImportError:  # an older vLLM: raw hashes

            def convert(h):
                return h

        if self._cleared:
            self._cleared = False
            yield AllBlocksCleared()
        for kind, h, medium, parent, tokens, lora, group in self.sched.take_events():
            if kind == "stored":
                yield BlockStored(
                    block_hashes=[convert(h)],
                    parent_block_hash=convert(parent) if parent is not None else None,
                    token_ids=list(tokens),
                    block_size=self.block_size,
                    lora_id=None,
                    medium=medium,
                    lora_name=lora,
                    group_idx=group,
                )
            else:
                yield BlockRemoved(block_hashes=[convert(h)], medium=medium, group_idx=group)

    def _report_steps(self, out: "SchedulerOutput") -> None:
        """Tells the scheduler each running request's step under sliding-window offload: its
        block table per group (the full one for a new or resumed request, the new blocks
        otherwise) and its tokens, for the blocks its windows leave behind."""
        for nr in out.scheduled_new_reqs:
            self._tables[nr.req_id] = [list(g) for g in nr.block_ids]
        cached = out.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, req in enumerate(cached.req_ids):
            new = cached.new_block_ids[i]
            table = self._tables.get(req)
            if new is None:
                continue
            if req in resumed or table is None or len(table) != len(new):
                self._tables[req] = [list(g) for g in new]
            else:
                for g, ids in zip(table, new):
                    g.extend(ids)
        computed = {nr.req_id: nr.num_computed_tokens for nr in out.scheduled_new_reqs}
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        for req, n in out.num_scheduled_tokens.items():
            request, table = self._running.get(req), self._tables.get(req)
            if request is None or table is None or req not in computed:
                continue
            hashes = list(request.block_hashes)
            if self.sched.stepped(req, hashes, table, computed[req], int(n)):
                self._describe(request, hashes)
        # Mamba "align" groups: vLLM names the boundary states this step writes (a state
        # block's position says nothing until it is complete); they are saved after the
        # forward pass, before vLLM frees them two steps on.
        block_state = getattr(out, "kv_connector_block_state", None)
        for req, states in (getattr(block_state, "boundary_state_offloads", None) or {}).items():
            request = self._running.get(req)
            if request is None:
                continue
            hashes = list(request.block_hashes)
            entries = [(int(g), int(b), int(t)) for g, b, t in states]
            if self.sched.boundary_states(req, hashes, entries):
                self._describe(request, hashes)

    def _describe(self, request: "Request", hashes: list[bytes]) -> None:
        # Before the Stored events of the blocks being saved (those of a window or a state
        # group come before the request ends).
        lora = getattr(request, "lora_request", None)
        self.sched.describe(
            hashes,
            list(request.all_token_ids),
            getattr(lora, "lora_name", None) if lora else None,
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        if self._windows:
            self._report_steps(scheduler_output)
        step = self.sched.take_step()
        return KVFerryMetadata(
            saves={req: (hashes, blocks) for req, hashes, blocks in step["saves"]},
            loads={req: (hashes, blocks) for req, hashes, blocks in step["loads"]},
            pulls=dict(step["pulls"]),
            finished=list(step["finished"]),
            extends=list(step["extends"]),
            aborts=list(step["aborts"]),
            reset=bool(step["reset"]),
            discards=list(step["discards"]),
            asks=list(step["asks"]),
            posts=list(step["posts"]),
            cancels=list(step["cancels"]),
            window_saves=list(step["window_saves"]),
            notes=dict(step["notes"]),
        )

    def request_finished(
        self, request: "Request", block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if block_ids and isinstance(block_ids[0], (list, tuple)):
            return self.request_finished_all_groups(request, tuple(block_ids))
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(
        self, request: "Request", block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Each group's blocks are saved under that group's keys (a sliding-window group holds
        only its window's by now: vLLM gave the rest back as the window moved), and offered to a
        decoder one list per group, as NixlConnector offers them."""
        from vllm.v1.request import RequestStatus

        self._running.pop(request.request_id, None)
        self._tables.pop(request.request_id, None)
        cut = self._cut.pop(request.request_id, ())
        ok = request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        params = request.kv_transfer_params or {}
        # llm-d's offloading protocol, prefill side: the offer goes to the decoder by key.
        decoder = self._role_key(params, "remote_decoder") if self.pd else None
        post = None
        if decoder is not None:
            post = (decoder["kv_request_id"], _prompt_identity(request, cut))
        hashes = list(request.block_hashes)
        out = self.sched.finished(
            request.request_id,
            ok,
            bool(params.get("do_remote_decode")) or post is not None,
            hashes,
            [[int(b) for b in g] for g in block_ids],
            request.num_computed_tokens,
            post,
        )
        if ok and self.offload:
            # What routers' BlockStored events say of the blocks being saved.
            self._describe(request, hashes)
        return out


def _register_with_vllm() -> None:
    """Registers kvferry's connector by name in vLLM's factory. Loading by module path does not,
    and vLLM's MultiConnector looks its children up by name when it builds their stats (with
    stats logging on it fails for an unregistered child)."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

        if "KVFerryConnector" not in getattr(KVConnectorFactory, "_registry", {}):
            KVConnectorFactory.register_connector("KVFerryConnector", __name__, "KVFerryConnector")
    except Exception as e:  # noqa: BLE001 - another vLLM's factory: loading by path still works
        log.debug("kvferry: not registered in vLLM's connector factory: %s", e)


_register_with_vllm()
