"""What computed an engine's KV, as one string: kvferry keeps G3 (NVMe) blocks in a subdirectory
of ``nvme_dir`` per identity and folds it into every slot's fingerprint, so blocks saved by
another model, other weights, another dtype or another pipeline stage are never loaded (the TP
rank and size are added by the Rust core). vLLM's block hashes name tokens only: with the
default hash seed they are the same for every model.

The weights are identified by the files' names, sizes and modification times when the model is
a local directory (a new checkpoint copied over the old one changes them), or by the model name
and revision for a hub model. An operator who updates weights in place without touching the
files (an RL loop pushing weights into a running engine) sets ``kv_cache_identity`` (for example
to the weight version) and calls ``reset_prefix_cache(reset_connector=True)``.
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
    parts = [f"model={model}", f"revision={getattr(mc, 'revision', None)}"]
    if model and os.path.isdir(model):
        parts.append(f"weights={_weights_digest(model)}")
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
    user = extra.get("kv_cache_identity")
    if user:
        parts.append(f"user={user}")
    return " ".join(parts)
