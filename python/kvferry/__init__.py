"""kvferry: moves paged LLM KV-cache blocks between memory tiers and between nodes.

``kvferry.vllm.KVFerryConnector`` is vLLM's connector; ``kvferry.Connector`` is the Rust core it
drives (offload tiers by block hash, prefill->decode pulls), usable from any Python engine.
"""

from kvferry._native import Connector, KvferryError, __version__

__all__ = ["Connector", "KvferryError", "__version__"]
