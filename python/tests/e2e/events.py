"""KV events as a router sees them: a ``vllm serve`` with kvferry offloading and vLLM's ZMQ
event publisher on (``--kv-events-config``), and a subscriber that decodes the stream with
vLLM's own event classes, as llm-d's indexer does.

- kv-events: every block kvferry reports stored in ``CPU`` was announced on ``GPU`` by vLLM
  first under the same hash, in the same (converted) form, with the same parent and token ids;
  each once, not once per worker.
- kv-events-tp2: two TP workers (vLLM's CPU build runs TP 2 here with one core per worker):
  each block kvferry stores is announced once, not once per worker, described as vLLM's GPU
  event; the second round loads every rank's heads from G2 and answers as the first.
- kv-events-g3: a DRAM tier smaller than the prompts: blocks spill (``STORAGE`` stored, in full)
  and leave DRAM (``CPU`` removed). After a restart over the same G3 the recovered blocks are
  announced ``STORAGE`` stored with the parent and token ids vLLM announced for them before the
  restart (kept with each block in its G3 slot); a reset of the connector's cache is announced
  ``AllBlocksCleared``, beside vLLM's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request

from run_e2e import HERE, quiet_ports

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples"))

BLOCK = 32


def _subscribe(endpoint, got, stop, connected):
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.connect(endpoint)
    connected.set()
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


def _retrying(run):
    for attempt in range(3):
        try:
            return run(quiet_ports())
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


@contextlib.contextmanager
def _served(model, name, conn, port, work, args=(), env=None):
    """A server publishing its KV events on `port`, and the list its subscriber fills."""
    import vllm_demo

    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        # vLLM offsets the port by the DP rank and binds what it is given; "*" is what it takes.
        "endpoint": f"tcp://*:{port}",
        "topic": "kv",
    }
    srv = vllm_demo.Server(
        model, name, conn, work, args=["--kv-events-config", json.dumps(cfg), *args], env=env
    )
    got, stop, connected = [], threading.Event(), threading.Event()
    endpoint = f"tcp://127.0.0.1:{port}"
    t = threading.Thread(target=_subscribe, args=(endpoint, got, stop, connected), daemon=True)
    try:
        srv.wait(600)
        t.start()
        # Its first import of vLLM's modules can take seconds: events published before the
        # subscription is in place are lost (ZMQ's slow joiner).
        if not connected.wait(120):
            raise AssertionError("the subscriber did not connect")
        time.sleep(1.0)
        yield srv, got
    finally:
        stop.set()
        t.join(5)
        srv.stop()


def _until(what, ok, timeout=30):
    deadline = time.time() + timeout
    while not ok():
        if time.time() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.5)


def _stored(got, medium):
    from vllm.distributed.kv_events import BlockStored

    return [e for e in got if isinstance(e, BlockStored) and e.medium == medium]


def _gpu_blocks(got):
    """vLLM's own announcements: hash -> (parent, token ids)."""
    gpu = {}
    for e in got:
        if type(e).__name__ == "BlockStored" and e.medium in (None, "GPU"):
            for i, h in enumerate(e.block_hashes):
                bs = e.block_size
                gpu[h] = (
                    e.parent_block_hash if i == 0 else e.block_hashes[i - 1],
                    list(e.token_ids[i * bs : (i + 1) * bs]),
                )
    return gpu


def _check_described(events, gpu, where):
    """Each of kvferry's BlockStored names one block, once, described as vLLM described it."""
    seen = set()
    for e in events:
        (h,) = e.block_hashes
        assert h not in seen, f"{where}: block {h} announced twice"
        seen.add(h)
        assert h in gpu, f"{where}: kvferry's block {h!r} was never announced on GPU (hash form differs?)"
        assert (e.parent_block_hash, list(e.token_ids)) == gpu[h], (where, e, gpu[h])
        assert e.block_size == BLOCK and len(e.token_ids) == BLOCK, (where, e)
    return seen


def kv_events(model, plain_unused):
    return _retrying(lambda port: _kv_events(model, port))


def _kv_events(model, port):
    import vllm_demo

    work = tempfile.mkdtemp(prefix="kvferry-e2e-events-")
    with _served(model, "events", {"pd": False, "dram_blocks": 64}, port, work) as (srv, got):
        for p in vllm_demo.prompts(3, 200, seed=31):
            vllm_demo.complete(srv.url, p, 4)
        want = 3 * (200 // BLOCK)
        _until(
            f"{want} CPU BlockStored events (of {len(got)} events)",
            lambda: len(_stored(got, "CPU")) >= want,
        )
        seen = _check_described(_stored(got, "CPU"), _gpu_blocks(got), "CPU")
        return (
            f"{len(seen)} CPU BlockStored events, each matching vLLM's GPU event for the same "
            f"{type(next(iter(seen))).__name__} hash (parent and token ids), none twice"
        )


def _reset_prefix_cache(url, external):
    for _ in range(50):
        r = urllib.request.urlopen(
            urllib.request.Request(f"{url}/reset_prefix_cache?reset_external={external}", method="POST"),
            timeout=30,
        )
        if json.loads(r.read()).get("success"):
            return
        time.sleep(0.2)
    raise AssertionError("reset_prefix_cache never succeeded")


def kv_events_tp2(model, plain_unused):
    return _retrying(lambda port: _kv_events_tp2(model, port))


def _kv_events_tp2(model, port):
    import vllm_demo

    work = tempfile.mkdtemp(prefix="kvferry-e2e-events-tp2-")
    tp2 = ["--tensor-parallel-size", "2"]
    # One core per worker: vLLM's CPU build binds each worker's threads to cores of its own.
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with _served(model, "events-tp2", {"pd": False, "dram_blocks": 64}, port, work, tp2, env) as (srv, got):
        ps = vllm_demo.prompts(2, 200, seed=47)
        first = [vllm_demo.complete(srv.url, p, 4)[0] for p in ps]
        gpu = _gpu_blocks(got)
        _until("both workers' blocks", lambda: len(_stored(got, "CPU")) >= len(gpu) > 0, timeout=60)
        time.sleep(2.0)  # a second announcement of a block, if any, comes with the next steps
        cpu = _check_described(_stored(got, "CPU"), gpu, "CPU")
        _reset_prefix_cache(srv.url, "false")
        again = [vllm_demo.complete(srv.url, p, 4)[0] for p in ps]
        assert again == first, (first, again)
        # One counters file per worker (rewritten every second): each rank loaded its own heads.
        paths = [srv.stats_path.replace(".prom", f".events-tp2.rank{r}.prom") for r in (0, 1)]

        def ranks():
            return [vllm_demo.stats(p) for p in paths]

        _until("both ranks' loads", lambda: all(s.get("onboarded_blocks", 0) >= len(cpu) for s in ranks()))
        final = ranks()
        for s in final:
            assert s.get("onboard_failed_blocks", 0) == 0, s
        return (
            f"TP 2: {len(cpu)} blocks announced CPU stored once each (not per worker), as vLLM's "
            f"GPU events; round 2 loaded {[s['onboarded_blocks'] for s in final]} blocks (rank 0, 1) "
            "from G2 and answered as round 1"
        )


def kv_events_g3(model, plain_unused):
    work = tempfile.mkdtemp(prefix="kvferry-e2e-events-g3-")
    conn = {"pd": False, "dram_blocks": 8, "nvme_dir": os.path.join(work, "g3"), "nvme_blocks": 64}
    first = _retrying(lambda port: _events_spilled(model, conn, port, work))
    return _retrying(lambda port: _events_recovered(model, conn, port, work, *first))


def _events_spilled(model, conn, port, work):
    """18 blocks through 8 DRAM slots: spilled to G3, and removed from DRAM."""
    import vllm_demo
    from vllm.distributed.kv_events import BlockRemoved

    with _served(model, "events-g3", conn, port, work) as (srv, got):
        for p in vllm_demo.prompts(3, 200, seed=37):
            vllm_demo.complete(srv.url, p, 4)
        blocks = 3 * (200 // BLOCK)
        spilled = blocks - conn["dram_blocks"]

        def removed():
            return [e for e in got if isinstance(e, BlockRemoved) and e.medium == "CPU"]

        _until(
            "the spills' events",
            lambda: len(_stored(got, "CPU")) >= blocks
            and len(_stored(got, "STORAGE")) >= spilled
            and len(removed()) >= spilled,
        )
        gpu = _gpu_blocks(got)
        cpu = _check_described(_stored(got, "CPU"), gpu, "CPU")
        storage = _check_described(_stored(got, "STORAGE"), gpu, "STORAGE")
        gone = {h for e in removed() for h in e.block_hashes}
        assert gone <= cpu and storage <= cpu, "removed or spilled blocks never stored in CPU"
        return gpu, len(cpu), len(storage), len(gone)


def _events_recovered(model, conn, port, work, gpu, n_cpu, n_storage, n_gone):
    import vllm_demo
    from vllm.distributed.kv_events import AllBlocksCleared

    with _served(model, "events-g3-restarted", conn, port, work) as (srv, got):
        # A request steps the engine, which publishes the recovered blocks' events.
        vllm_demo.complete(srv.url, vllm_demo.prompts(1, 40, seed=41)[0], 2)
        _until(f"{n_storage} recovered blocks", lambda: len(_stored(got, "STORAGE")) >= n_storage)
        # Every one: the new prompt's block stays in DRAM, which the restart found empty.
        recovered = _check_described(list(_stored(got, "STORAGE")), gpu, "recovered")
        assert len(recovered) >= n_storage, (len(recovered), n_storage)

        def cleared():
            return sum(isinstance(e, AllBlocksCleared) for e in got)

        counts = []
        for external in ("false", "true"):
            before = cleared()
            _reset_prefix_cache(srv.url, external)
            vllm_demo.complete(srv.url, vllm_demo.prompts(1, 40, seed=43)[0], 2)
            _until("AllBlocksCleared", lambda b=before: cleared() > b)
            time.sleep(1.0)  # a second one, if any, is in the same or the next batch
            counts.append(cleared() - before)
        assert counts[1] == counts[0] + 1, f"AllBlocksCleared per reset: {counts} (vLLM's, then with the connector's)"
        return (
            f"{n_cpu} blocks announced CPU stored, {n_storage} STORAGE stored on spill, {n_gone} CPU "
            f"removed; after a restart {len(recovered)} recovered blocks announced STORAGE stored "
            f"with vLLM's parent and token ids; a connector reset announced AllBlocksCleared"
        )


SCENARIOS = [
    ("kv-events", kv_events),
    ("kv-events-g3", kv_events_g3),
    ("kv-events-tp2", kv_events_tp2),
]
