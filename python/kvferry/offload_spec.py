"""kvferry's tiers under vLLM's own offloading scheduler: an out-of-tree ``OffloadingSpec`` for
vLLM's ``OffloadingConnector``, for users who keep vLLM's offloading policy and eviction but
want kvferry's DRAM and NVMe tiers underneath::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"spec_name": "KVFerryOffloadingSpec",
                                      "spec_module_path": "kvferry.offload_spec",
                                      "dram_blocks": 4096,
                                      "nvme_dir": "/nvme/kvferry", "nvme_blocks": 65536}}'

The manager (scheduler side) owns the index and eviction, as vLLM's protocol requires: a block it
reports stored stays loadable until it evicts it, and its evictions reach the worker with the
next store, which drops them from kvferry's tiers. vLLM 0.32's connector asserts that every
transfer succeeds, so the manager admits only as many distinct blocks as the tiers hold without
evicting anything themselves: ``dram_blocks`` without NVMe; with NVMe, ``nvme_blocks`` (G3 is
the backing store, DRAM an inclusive cache in front of it, so DRAM adds no distinct capacity).
A transfer that fails anyway (a disk error) is reported as failed, never as success: vLLM then
stops the engine rather than compute from blocks that were not loaded.

Hybrid models (several KV cache groups, ``--no-disable-hybrid-kv-cache-manager``): vLLM's keys
are per group (the block hash and the group index), its GPU specs list each group's blocks in
turn; kvferry stores each GPU block under its chunk's key, so a sliding-window group moves only
the blocks vLLM asks it to.

``blocks_per_chunk`` > 1 (an offloaded block of several GPU blocks): each GPU block is stored as
its own tier block under its chunk's key and its place in the chunk, and the manager counts
chunks against the tiers' capacity divided by ``blocks_per_chunk``. Refused with several KV
cache groups: vLLM then stores chunks of a sliding window whose leading blocks it had already
freed, and a later load of those blocks would find nothing (kvferry fails the load, vLLM 0.32
stops the engine on any failed transfer; vLLM's CPU tier copies whatever its buffer held).

Scope of this version: host KV caches.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable
from typing import Any

from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    LookupResult,
    OffloadingEvent,
    OffloadingManager,
    OffloadingSpec,
    OffloadingWorker,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
    TransferResult,
)

from kvferry._native import Connector as _Native
from kvferry.chunks import chunk_block_keys, sub_key

log = logging.getLogger("vllm.kvferry")

_ids = itertools.count()


class KVFerrySpec(LoadStoreSpec):
    """Blocks by key in kvferry's tiers; a store also carries the keys the manager evicted."""

    def __init__(self, keys: list[bytes], evicted: list[bytes] | None = None):
        self.keys = list(keys)
        self.evicted = list(evicted or ())
        self.reset = False

    def __repr__(self) -> str:
        return f"KVFerrySpec({len(self.keys)} keys, {len(self.evicted)} evicted)"


class KVFerryManager(OffloadingManager):
    """LRU over `capacity` blocks; blocks being loaded or stored are never evicted."""

    def __init__(self, capacity: int, medium: Any, events: bool):
        self.capacity = capacity
        self.medium = medium
        self.stored: OrderedDict[bytes, int] = OrderedDict()  # key -> readers
        self.pending: set[bytes] = set()
        self.events: list[OffloadingEvent] = [] if events else None  # type: ignore[assignment]
        # Set by reset_cache: the next store tells the worker to empty the tiers first.
        self.reset_pending = False

    def reset_cache(self) -> None:
        # Nothing is loadable from here; the worker empties the tiers with the next store
        # (before it stores anything), retiring G3's slots for good.
        if self.events is not None and self.stored:
            self.events.append(
                OffloadingEvent(keys=list(self.stored), medium=self.medium, removed=True)
            )
        self.stored.clear()
        self.reset_pending = True

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        return LookupResult.HIT if key in self.stored else LookupResult.MISS

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        for k in keys:
            self.stored[k] = self.stored.get(k, 0) + 1
        return KVFerrySpec(list(keys))

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext):
        for k in keys:
            if k in self.stored:
                self.stored.move_to_end(k)

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext):
        for k in keys:
            if self.stored.get(k, 0) > 0:
                self.stored[k] -= 1

    def prepare_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> PrepareStoreOutput | None:
        new = [k for k in keys if k not in self.stored and k not in self.pending]
        need = len(self.stored) + len(self.pending) + len(new) - self.capacity
        evicted: list[bytes] = []
        if need > 0:
            for k, readers in list(self.stored.items()):
                if len(evicted) == need:
                    break
                if readers == 0:
                    evicted.append(k)
            if len(evicted) < need:
                return None
            for k in evicted:
                del self.stored[k]
            if self.events is not None:
                self.events.append(OffloadingEvent(keys=evicted, medium=self.medium, removed=True))
        self.pending.update(new)
        spec = KVFerrySpec(new, evicted)
        spec.reset, self.reset_pending = self.reset_pending, False
        return PrepareStoreOutput(keys_to_store=new, store_spec=spec, evicted_keys=evicted)

    def complete_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True
    ):
        done = [k for k in keys if k in self.pending]
        for k in done:
            self.pending.discard(k)
            if success:
                self.stored[k] = 0
        if success and done and self.events is not None:
            self.events.append(OffloadingEvent(keys=done, medium=self.medium, removed=False))

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self.events:
            out, self.events = self.events, []
            yield from out


class KVFerryWorker(OffloadingWorker):
    """Stores and loads through kvferry's Rust core, one request per job."""

    def __init__(self, native: _Native, per_chunk: int = 1, block_bytes: int = 0):
        self.native = native
        self.per_chunk = per_chunk
        # Bytes a GPU block moves (every layer's page), for vLLM's transfer metrics.
        self.block_bytes = block_bytes
        self.jobs: dict[str, int] = {}
        # A job's blocks and when it started: `transfer_size` and `transfer_time`, which vLLM's
        # kv_offload store/load families count.
        self.started: dict[str, tuple[int, float]] = {}
        # A load job's destination blocks, to attribute load errors to the job they belong to.
        self.load_blocks: dict[str, set[int]] = {}
        self.done: list[TransferResult] = []

    def _pairs(self, spec: GPULoadStoreSpec, keys: list[bytes]) -> tuple[list[bytes], list[int]]:
        return chunk_block_keys(
            keys,
            spec.block_ids,
            getattr(spec, "group_sizes", None),
            getattr(spec, "block_indices", None),
            self.per_chunk,
        )

    def _sub_keys(self, keys: list[bytes]) -> list[bytes]:
        return [sub_key(k, self.per_chunk, i) for k in keys for i in range(self.per_chunk)]

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        assert isinstance(dst_spec, KVFerrySpec)
        if getattr(dst_spec, "reset", False):
            self.native.reset_cache()
        if dst_spec.evicted:
            self.native.discard(self._sub_keys(dst_spec.evicted))
        name = f"store-{job_id}"
        self.jobs[name] = job_id
        try:
            keys, blocks = self._pairs(src_spec, dst_spec.keys)
            self.started[name] = (len(blocks), time.perf_counter())
            self.native.save(name, keys, blocks)
        except Exception as e:  # noqa: BLE001 - reported as the job's failure
            log.error("kvferry: store job %d did not start: %s", job_id, e)
            self.jobs.pop(name, None)
            self.started.pop(name, None)
            self.done.append(TransferResult(job_id=job_id, success=False))
            return True
        self.native.finish(name)
        return True

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        assert isinstance(src_spec, KVFerrySpec)
        name = f"load-{job_id}"
        self.jobs[name] = job_id
        try:
            keys, blocks = self._pairs(dst_spec, src_spec.keys)
        except ValueError as e:
            log.error("kvferry: load job %d: %s", job_id, e)
            self.jobs.pop(name, None)
            self.done.append(TransferResult(job_id=job_id, success=False))
            return True
        self.load_blocks[name] = set(blocks)
        self.started[name] = (len(blocks), time.perf_counter())
        self.native.load(name, keys, blocks)
        return True

    def _collect(self):
        sending, recving, errors = self.native.poll()
        failed_saves = set(self.native.take_failed_saves())
        # The manager keeps its own events; the core's would only pile up.
        self.native.take_events()
        errors = set(errors)
        if errors:
            log.error(
                "kvferry: %d blocks failed to load through vLLM's offloading connector",
                len(errors),
            )
        now = time.perf_counter()
        for name in list(sending) + list(recving):
            job = self.jobs.pop(name, None)
            blocks = self.load_blocks.pop(name, set())
            n, t0 = self.started.pop(name, (0, now))
            if job is None:
                continue
            ok = not (blocks & errors) and name not in failed_saves
            if not ok:
                log.error("kvferry: offloading job %s failed", name)
            size = n * self.block_bytes if ok and self.block_bytes else None
            self.done.append(
                TransferResult(
                    job_id=job,
                    success=ok,
                    transfer_size=size,
                    transfer_time=now - t0 if size else None,
                )
            )

    def get_finished(self) -> list[TransferResult]:
        self._collect()
        out, self.done = self.done, []
        return out

    def wait(self, job_ids: set[int]) -> None:
        while job_ids & set(self.jobs.values()):
            self._collect()
            time.sleep(0.001)

    def shutdown(self) -> None:
        self.native.shutdown(60.0)


def _slides() -> bool:
    """Whether the model being served has sliding-window layers (as far as its config says)."""
    try:
        from vllm.config import get_current_vllm_config

        hf = get_current_vllm_config().model_config.hf_text_config
    except Exception:  # noqa: BLE001 - no model config to read: nothing known to slide
        return False
    kinds = getattr(hf, "layer_types", None) or ()
    return bool(getattr(hf, "sliding_window", None)) and (
        not kinds or any("sliding" in str(k) for k in kinds)
    )


class KVFerryOffloadingSpec(OffloadingSpec):
    def __init__(self, config: Any):
        super().__init__(config)
        extra = self.extra_config
        self.dram_blocks = int(extra.get("dram_blocks", 0))
        if self.dram_blocks <= 0:
            raise ValueError("kvferry: set dram_blocks in kv_connector_extra_config")
        self.nvme_dir = extra.get("nvme_dir")
        self.nvme_blocks = int(extra.get("nvme_blocks", 0)) if self.nvme_dir else 0
        self.eviction = extra.get("eviction")
        if extra.get("nvme_admission") is not None or extra.get("nvme_write_mib_s") is not None:
            # vLLM's manager decides what is stored here and stops the engine on a failed load:
            # a block kvferry declined to write to NVMe would be one.
            raise ValueError(
                "kvferry: nvme_admission and nvme_write_mib_s need kvferry's own connector "
                "(KVFerryConnector); vLLM's OffloadingConnector owns what its tiers store"
            )
        self.per_chunk = int(self.blocks_per_chunk)
        if self.per_chunk > 1 and (len(self.tokens_per_block) > 1 or _slides()):
            raise NotImplementedError(
                "kvferry's offloading spec: blocks_per_chunk > 1 needs one KV cache group of "
                "full attention (vLLM stores a sliding window's chunks with blocks it already "
                "freed, which a later load would not find); use blocks_per_chunk 1 with this "
                "model"
            )
        if not 1 <= self.per_chunk <= 255:
            raise ValueError(f"kvferry: blocks_per_chunk {self.per_chunk} (1 to 255)")
        self._manager: KVFerryManager | None = None

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            from vllm.v1.kv_offload.base import Medium

            # Events name the tier blocks enter (G2, DRAM); G3 holds spills of the same blocks.
            # The tiers hold GPU blocks; the manager counts chunks of `per_chunk` of them.
            self._manager = KVFerryManager(
                (self.nvme_blocks if self.nvme_dir else self.dram_blocks) // self.per_chunk,
                Medium.CPU,
                self.kv_events_config.enable_kv_cache_events,
            )
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        tensors = [t.tensor for t in kv_caches.tensors]
        first = tensors[0]
        if first.device.type != "cpu":
            raise NotImplementedError("kvferry's offloading spec registers host KV caches")
        blocks, page = first.shape
        for t in tensors:
            if tuple(t.shape) != (blocks, page) or t.stride() != first.stride():
                raise ValueError("kvferry needs every canonical KV tensor in one shape")
        # Each block is an opaque page per layer: model it as one head of one token whose
        # K|V channels are the page's bytes (fp8 = one byte per channel).
        tokens = 1
        while page // tokens > 2 * 65536 or (page // tokens) % 2:
            tokens *= 2
            if page % tokens:
                raise ValueError(f"page of {page} bytes cannot be described")
        from kvferry.identity import kv_identity

        try:
            from vllm.config import get_current_vllm_config

            vllm_config = get_current_vllm_config()
        except Exception:  # noqa: BLE001 - the identity then names the model from our config
            vllm_config = None
        par = self.config.parallel
        identity = " ".join(
            [
                kv_identity(vllm_config, dict(self.extra_config)),
                f"offload_model={self.config.model.name} offload_dtype={self.config.model.dtype}",
                f"world_rank={par.rank}/{par.world_size} dp={par.data_parallel_index}",
            ]
        )
        native = _Native(
            f"{self.config.engine_id}-offload-{next(_ids)}",
            dram_blocks=self.dram_blocks,
            nvme_dir=self.nvme_dir,
            nvme_blocks=self.nvme_blocks,
            identity=identity,
            eviction=None if self.eviction is None else str(self.eviction),
            # Not `caller_evicts`: there a full tier refuses saves, and vLLM 0.32 stops the
            # engine on any failed transfer; the manager's capacity (G3's) keeps the tiers from
            # evicting on their own in normal operation.
        )
        base = min(t.data_ptr() for t in tensors)
        native.register_cache(
            kv_heads=1,
            head_size=page // tokens // 2,
            dtype="fp8",
            block_tokens=tokens,
            num_blocks=blocks,
            base=base,
            layer_offsets=[t.data_ptr() - base for t in tensors],
            strides=[first.stride(0), page, page // tokens, 1],
        )
        # vLLM's manager knows nothing of blocks recovered from G3 (it starts empty): their
        # notes are of no use here.
        native.take_recovered_notes()
        self._tensors = tensors  # vLLM keeps them alive; this documents the contract
        # Reachable like KVFerryConnector's core, for stats in tools and tests.
        from kvferry.vllm import _ENGINES

        _ENGINES[str(self.config.engine_id)] = native
        return KVFerryWorker(native, self.per_chunk, block_bytes=page * len(tensors))
