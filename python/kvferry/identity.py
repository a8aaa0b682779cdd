"""What computed an engine's KV, as one string: kvferry keeps G3 (NVMe) blocks in a subdirectory
of ``nvme_dir`` per identity and folds it into every slot's fingerprint, so blocks saved by
another model, other weights, another dtype or another pipeline stage are never loaded (the TP
rank and size are added by the Rust core). vLLM's block hashes name tokens only: with the
default hash seed they are the same for every model.

The weights are identified by the files' names, sizes and modification times when the model is
a local directory (a new checkpoint copied over the old one changes them); for a hub model, by
the commit its revision resolves to in the local Hugging Face cache, and that snapshot's files.
``kv_cache_identity`` (a weight version of the operator's) replaces the file scan: then copies
of the same weights keep their G3 blocks, and the operator changes it with the weights. An
operator who updates weights in a running engine (an RL loop) also calls
``reset_prefix_cache(reset_connector=True)``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz", ".json")


def _weights_digest(path: str) -> str:
    """Names, sizes and mtimes of a local model directory's weight and config files."""
    h = hashlib.sha256()
    n = 0
    for root, _dirs, files in os.walk(path):
        for name in sorted(files):
            if not name.endswith(_WEIGHT_SUFFIXES):
                continue
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            rel = os.path.relpath(full, path)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            n += 1
    return f"{n}:{h.hexdigest()[:32]}"


def _hub_snapshot(model: str, revision: str | None) -> tuple[str | None, str | None]:
    """The commit a hub model's revision points to in the local cache, and its snapshot dir."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except Exception:  # noqa: BLE001 - no hub client: the name and revision are all we have
        return None, None
    repo = os.path.join(HF_HUB_CACHE, "models--" + model.replace("/", "--"))
    ref = os.path.join(repo, "refs", revision or "main")
    try:
        with open(ref) as f:
            commit: str | None = f.read().strip()
    except OSError:
        # A revision given as a commit has no ref file, only its snapshot.
        pinned = revision and os.path.isdir(os.path.join(repo, "snapshots", revision))
        commit = revision if pinned else None
    snap = os.path.join(repo, "snapshots", commit) if commit else None
    return commit, snap if snap and os.path.isdir(snap) else None


def _pp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_pp_group

        return int(get_pp_group().rank_in_group)
    except Exception:  # noqa: BLE001 - no parallel state in some test set-ups
        return 0


def kv_identity(vllm_config: Any, extra: dict[str, Any]) -> str:
    """The identity string for this engine's KV (see the module's documentation)."""
    mc = getattr(vllm_config, "model_config", None)
    cc = getattr(vllm_config, "cache_config", None)
    model = str(getattr(mc, "model", "") or "")
    revision = getattr(mc, "revision", None)
    parts = [f"model={model}", f"revision={revision}"]
    user = extra.get("kv_cache_identity")
    if user:
        parts.append(f"user={user}")
    elif model and os.path.isdir(model):
        parts.append(f"weights={_weights_digest(model)}")
    elif model:
        commit, snap = _hub_snapshot(model, revision)
        parts.append(f"commit={commit}")
        if snap:
            parts.append(f"weights={_weights_digest(snap)}")
    parts += [
        f"dtype={getattr(mc, 'dtype', None)}",
        f"quantization={getattr(mc, 'quantization', None)}",
        f"kv_cache_dtype={getattr(cc, 'cache_dtype', None)}",
        f"block_size={getattr(cc, 'block_size', None)}",
        f"hash={getattr(cc, 'prefix_caching_hash_algo', None)}",
        # vLLM's hash seed: with PYTHONHASHSEED unset, xxhash-based hashes differ per process.
        f"hash_seed={os.environ.get('PYTHONHASHSEED', '')}",
        f"pp_rank={_pp_rank()}",
    ]
    return " ".join(parts)
