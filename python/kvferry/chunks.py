"""vLLM's offloading keys and GPU blocks, paired block by block (no vLLM import: tested alone)."""

from __future__ import annotations


def chunk_block_keys(keys: list[bytes], block_ids, group_sizes, block_indices, per_chunk: int):
    """The tier key of each GPU block of a transfer, and the blocks, in vLLM's order.

    `keys` are the manager's, group by group and chunk by chunk; the GPU blocks are listed group
    by group (`group_sizes`), the first of group g at block `block_indices[g]` of the request,
    so `block_indices[g] % per_chunk` blocks of its first chunk come before it. Block k of group
    g is then at place `p = skip + k` of the group's chunks: chunk `p // per_chunk`, sub-block
    `p % per_chunk` (as vLLM's own CPU worker maps them), stored under the chunk's key, the
    chunk size and the place (vLLM keys a chunk by its last block's hash, which the chunk of
    another size ending there shares: the size keeps a restart with another blocks_per_chunk
    over the same files from reading one place as another). One block a chunk: the chunk's
    key.
    """
    blocks = [int(b) for b in block_ids]
    sizes = list(group_sizes) if group_sizes is not None else [len(blocks)]
    firsts = list(block_indices) if block_indices is not None else [0] * len(sizes)
    if sum(sizes) != len(blocks) or len(firsts) != len(sizes):
        raise ValueError(f"groups of {sizes} blocks for {len(blocks)} blocks")
    out: list[bytes] = []
    k = 0
    for size, first in zip(sizes, firsts):
        skip = int(first) % per_chunk
        chunks = -(-(size + skip) // per_chunk)
        mine = keys[k : k + chunks]
        if len(mine) != chunks:
            raise ValueError(f"{len(keys)} keys for groups of {sizes} blocks")
        k += chunks
        for p in range(skip, skip + size):
            key = mine[p // per_chunk]
            out.append(sub_key(key, per_chunk, p % per_chunk))
    if k != len(keys):
        raise ValueError(f"{len(keys)} keys for groups of {sizes} blocks")
    return out, blocks


def sub_key(key: bytes, per_chunk: int, place: int) -> bytes:
    """The tier key of the GPU block at `place` of the chunk keyed `key`."""
    return key if per_chunk == 1 else key + bytes([per_chunk, place])
