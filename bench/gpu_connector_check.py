"""The connector's GPU path driven as vLLM drives it, on KV caches allocated the way vLLM 0.32
allocates them (one int8 allocation, a [B, H, N, C] view per layer under a stride order).

    python bench/gpu_connector_check.py --device cuda   # on a GPU machine (bench/gpu-check.sh)
    python bench/gpu_connector_check.py --device cpu    # the same checks on host tensors

For each geometry: offload G1 -> G2 -> G3 and onboard back, bit-exact against torch; P/D
between two connectors over TCP (staged: a device cache goes through pinned host copies) and,
where UCX loads, over UCX; one JSON row per check on stdout with GB/s beside one contiguous
torch copy of the same bytes measured in the same run. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from kvferry._native import Connector, blocks_digest

# name: (layers, kv heads per rank, channels (K|V, or the MLA latent), torch dtype, order)
GEOMETRIES = {
    "8b-bf16": (32, 8, 256, torch.bfloat16, "LBNHC"),
    "8b-fp8": (32, 8, 256, torch.uint8, "LBNHC"),
    "8b-hnd": (32, 8, 256, torch.bfloat16, "LBHNC"),
    "70b-tp8": (80, 1, 256, torch.bfloat16, "LBNHC"),
    "mla": (61, 1, 576, torch.bfloat16, "LBNHC"),
}
# Physical order of the logical [L, B, H, N, C] axes.
ORDERS = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4)}
TOKENS = 16


def allocate(name, blocks, device):
    """Per-layer [B, H, N, C] views of one allocation, as vLLM's allocate_kv_cache makes them."""
    layers, heads, chans, dtype, order = GEOMETRIES[name]
    logical = (layers, blocks, heads, TOKENS, chans)
    perm = ORDERS[order]
    physical = [logical[i] for i in perm]
    elem = torch.empty((), dtype=dtype).element_size()
    buf = torch.zeros(layers * blocks * heads * TOKENS * chans * elem, dtype=torch.int8, device=device)
    flat = buf.view(dtype).view(physical)
    # Back to logical axis order: a strided view, memory untouched.
    inv = [perm.index(i) for i in range(5)]
    full = flat.permute(*inv)
    buf.view(torch.uint8).random_(0, 256)
    return buf, [full[layer] for layer in range(layers)]


def register(conn, views, device):
    first = views[0]
    base = min(v.data_ptr() for v in views)
    blocks, heads, tokens, chans = first.shape
    dtype = "fp8" if first.dtype == torch.uint8 else str(first.dtype)
    conn.register_cache(
        kv_heads=heads,
        head_size=chans // 2,
        dtype=dtype,
        block_tokens=tokens,
        num_blocks=blocks,
        base=base,
        layer_offsets=[v.data_ptr() - base for v in views],
        strides=list(first.stride()),
        device=torch.device(device).index or 0 if device != "cpu" else None,
    )


def block_bytes(views, b):
    return torch.cat([v[b].contiguous().view(torch.uint8).flatten() for v in views])


def until(conn, pred, timeout=60.0):
    got = ([], [], [])
    deadline = time.time() + timeout
    while time.time() < deadline:
        s, r, e = conn.poll()
        got[0].extend(s), got[1].extend(r), got[2].extend(e)
        if pred(got):
            return got
        time.sleep(0.001)
    raise AssertionError(f"timed out: {got}")


def sync(device):
    if device != "cpu":
        torch.cuda.synchronize()


def torch_copy_gbps(views, blocks, device):
    """One contiguous copy of as many bytes as `blocks` blocks hold, to pinned host memory."""
    n = sum(int(block_bytes(views, 0).numel()) for _ in blocks)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty(n, dtype=torch.uint8, pin_memory=device != "cpu")
    dst.copy_(src, non_blocking=True)  # once to touch every page, then timed
    sync(device)
    t = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    sync(device)
    return n / (time.perf_counter() - t) / 1e9


def offload(name, device, blocks=64, moved=32):
    _, views = allocate(name, blocks, device)
    with tempfile.TemporaryDirectory() as d:
        c = Connector(f"gpu-offload-{name}", dram_blocks=moved // 4, nvme_dir=d, nvme_blocks=2 * moved)
        register(c, views, device)
        sync(device)
        src = list(range(moved))
        want = [block_bytes(views, b).cpu() for b in src]
        hashes = [bytes([i % 256, i // 256]) * 16 for i in src]
        t = time.perf_counter()
        c.save("s", hashes, src)
        c.finish("s")
        until(c, lambda g: "s" in g[0])
        save_s = time.perf_counter() - t
        assert c.lookup(hashes) == moved, f"{name}: {c.lookup(hashes)} of {moved} saved blocks found"
        dst = list(range(blocks - moved, blocks))
        for v in views:
            v[dst[0] :].zero_()
        sync(device)
        t = time.perf_counter()
        c.load("l", hashes, dst)
        _, _, errors = until(c, lambda g: "l" in g[1])
        load_s = time.perf_counter() - t
        assert errors == [], f"{name}: load errors {errors}"
        for b, w in zip(dst, want):
            assert torch.equal(block_bytes(views, b).cpu(), w), f"{name}: block {b} differs"
        nbytes = sum(int(w.numel()) for w in want)
        st = c.counters()
        c.shutdown(10.0)
    return {
        "check": "offload",
        "geometry": name,
        "device": device,
        "blocks": moved,
        "bytes": nbytes,
        "save_gbps": nbytes / save_s / 1e9,
        "load_gbps": nbytes / load_s / 1e9,
        "limit": "one contiguous torch copy to pinned host",
        "limit_gbps": torch_copy_gbps(views, src, device),
        "nvme_blocks": st.get("nvme_blocks"),
    }


def pd(name, device, transport, staged, blocks=64, moved=32):
    _, src_views = allocate(name, blocks, device)
    _, dst_views = allocate(name, blocks, device)
    prefill = Connector(f"gpu-prefill-{name}", pd=True, host="127.0.0.1", transport=transport, staged=staged)
    decode = Connector(f"gpu-decode-{name}", pd=True, host="127.0.0.1", transport=transport, staged=staged)
    register(prefill, src_views, device)
    register(decode, dst_views, device)
    sync(device)
    remote = list(range(moved))
    local = list(range(blocks - moved, blocks))
    grant = 0x1234_0000_0001
    t = time.perf_counter()
    prefill.finish("p", grant, remote)
    decode.pull("d", "127.0.0.1", prefill.listen_port(), "p", 1, grant, blocks_digest(remote), remote, local)
    _, _, errors = until(decode, lambda g: "d" in g[1])
    secs = time.perf_counter() - t
    assert errors == [], f"{name} {transport}: load errors {errors}"
    for r, l in zip(remote, local):
        assert torch.equal(block_bytes(src_views, r).cpu(), block_bytes(dst_views, l).cpu()), (
            f"{name} {transport}: block {r} -> {l} differs"
        )
    until(prefill, lambda g: "p" in g[0])
    nbytes = moved * int(block_bytes(src_views, 0).numel())
    return {
        "check": "pd",
        "geometry": name,
        "device": device,
        "transport": transport,
        "staged": staged,
        "blocks": moved,
        "bytes": nbytes,
        "gbps": nbytes / secs / 1e9,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--geometries", default=",".join(GEOMETRIES))
    ap.add_argument("--transports", default="tcp,ucx")
    args = ap.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        print("kvferry-check skipped: torch sees no CUDA device", file=sys.stderr)
        return 0
    failed = 0
    for name in args.geometries.split(","):
        checks = [lambda: offload(name, args.device)]
        for t in args.transports.split(","):
            for staged in (False, True):
                checks.append(lambda t=t, staged=staged: pd(name, args.device, t, staged))
        for check in checks:
            try:
                print(json.dumps(check()), flush=True)
            except Exception as e:  # noqa: BLE001 - every check runs and reports
                failed += 1
                print(json.dumps({"geometry": name, "error": str(e)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
