"""KV events as a router sees them: a ``vllm serve`` with kvferry offloading to DRAM and vLLM's
ZMQ event publisher on (``--kv-events-config``), and a subscriber that decodes the stream with
vLLM's own event classes, as llm-d's indexer does.

- kv-events: every block kvferry reports stored in ``CPU`` was announced on ``GPU`` by vLLM
  first under the same hash, in the same (converted) form, with the same parent and token ids;
  each once, not once per worker.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

from run_e2e import HERE, quiet_ports

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples"))


def _subscribe(endpoint, got, stop):
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.connect(endpoint)
    dec = msgspec.msgpack.Decoder(type=KVEventBatch)
    try:
        while not stop.is_set():
            try:
                _topic, _seq, payload = sub.recv_multipart()
            except zmq.Again:
                continue
            got.extend(dec.decode(payload).events)
    finally:
        sub.close(0)


def kv_events(model, plain_unused):
    for attempt in range(3):
        try:
            return _kv_events(model, quiet_ports())
        except RuntimeError as e:
            # A port taken between the check and vLLM's bind: another port, at most 3 times.
            if attempt == 2 or "Address already in use" not in _log_of(e):
                raise


def _log_of(e):
    path = str(e).rpartition("log: ")[2]
    try:
        return open(path).read()
    except OSError:
        return ""


def _kv_events(model, port):
    import vllm_demo
    from vllm.distributed.kv_events import BlockStored

    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        # vLLM offsets the port by the DP rank and binds what it is given; "*" is what it takes.
        "endpoint": f"tcp://*:{port}",
        "topic": "kv",
    }
    work = tempfile.mkdtemp(prefix="kvferry-e2e-events-")
    srv = vllm_demo.Server(
        model, "events", {"pd": False, "dram_blocks": 64}, work, args=["--kv-events-config", json.dumps(cfg)]
    )
    got, stop = [], threading.Event()
    t = threading.Thread(target=_subscribe, args=(f"tcp://127.0.0.1:{port}", got, stop), daemon=True)
    try:
        srv.wait(600)
        t.start()
        time.sleep(1.0)  # ZMQ's slow joiner: the subscription must be in place first
        for p in vllm_demo.prompts(3, 200, seed=31):
            vllm_demo.complete(srv.url, p, 4)
        deadline = time.time() + 30
        while time.time() < deadline:
            cpu = [e for e in got if isinstance(e, BlockStored) and e.medium == "CPU"]
            if len(cpu) >= 3 * (200 // 32):
                break
            time.sleep(0.5)
        gpu = {}
        for e in got:
            if isinstance(e, BlockStored) and e.medium in (None, "GPU"):
                for i, h in enumerate(e.block_hashes):
                    bs = e.block_size
                    gpu[h] = (
                        e.parent_block_hash if i == 0 else e.block_hashes[i - 1],
                        list(e.token_ids[i * bs : (i + 1) * bs]),
                    )
        cpu = [e for e in got if isinstance(e, BlockStored) and e.medium == "CPU"]
        assert len(cpu) >= 3 * (200 // 32), f"{len(cpu)} CPU BlockStored events of {len(got)}"
        seen = set()
        for e in cpu:
            (h,) = e.block_hashes
            assert h not in seen, f"block {h} announced twice"
            seen.add(h)
            assert h in gpu, f"kvferry's block {h!r} was never announced on GPU (hash form differs?)"
            parent, tokens = gpu[h]
            assert (e.parent_block_hash, list(e.token_ids)) == (parent, tokens), (e, gpu[h])
            assert e.block_size == 32 and len(e.token_ids) == 32, e
        return (
            f"{len(cpu)} CPU BlockStored events, each matching vLLM's GPU event for the same "
            f"{type(next(iter(seen))).__name__} hash (parent and token ids), none twice"
        )
    finally:
        stop.set()
        srv.stop()


SCENARIOS = [("kv-events", kv_events)]
