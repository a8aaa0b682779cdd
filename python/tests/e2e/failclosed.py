"""End-to-end scenarios for kvferry's first promise in real vLLM: KV reaches the engine
bit-identical or not at all, and then vLLM recomputes. Each one compares greedy outputs with a
plain vLLM token for token, and most run the decode engine with vLLM's default
kv_load_failure_policy ("fail"), so a load kvferry should have refused up front would fail the
request instead of passing by recomputation.

- lease-late: the decode request comes after the prefill's lease ran out and the prefill engine
  served other prompts meanwhile: the offer is refused up front and the prompt computed.
- lease-heartbeat: the decode request waits in the decode engine's queue for several leases;
  heartbeats keep the prefill's blocks, and they are pulled.
- cut-offer: a client cut remote_block_ids short: refused up front, the prefill told to free.
- abort-queued: decode requests aborted while queued: the prefill frees their blocks at once.
- model-replaced: the model's files are replaced in place over the same nvme_dir: nothing of the
  old weights' KV is loaded, outputs equal the new model's.
- reset-connector: reset_prefix_cache(reset_connector=True) empties G2: nothing old is loaded.
- shared-nvme: a second engine on the same nvme_dir and identity is refused at start.
- offload-pressure: G2 smaller than the working set, vLLM's default failure policy: no request
  fails (the scheduler owns eviction, so a block it promised is never dropped under it), every
  output equals plain vLLM's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from run_e2e import BS, Engine, check_same, free_port, prompts

HERE = os.path.dirname(os.path.abspath(__file__))


def _prefill(model, name, lease):
    port = free_port()
    return port, Engine(model, name, {"pd": True, "port": port, "kv_lease_duration": lease})


def _offers(pre, ps):
    first, _ = pre.generate(ps, 1, [{"do_remote_decode": True}] * len(ps))
    pre.call(op="step")
    params = [o["kv_transfer_params"] for o in first]
    for p in params:
        assert p and p.get("kvferry_grant") and p.get("remote_blocks_expiry_time"), p
    return params


def _until(engine, key, want, timeout=30):
    deadline = time.time() + timeout
    while True:
        s = engine.stats()
        if s.get(key, 0) >= want or time.time() > deadline:
            return s
        engine.call(op="settle", timeout_s=1)


def lease_late(model, plain):
    lease = 1.0
    port, pre = _prefill(model, "prefill-lease-late", lease)
    dec = Engine(model, "decode-lease-late", {"pd": True}, policy="fail")
    try:
        pre.wait_ready(), dec.wait_ready()
        ps = prompts()
        params = _offers(pre, ps)
        time.sleep(2 * lease)
        # The prefill engine moves on: its freed blocks go to other prompts.
        pre.generate(prompts(seed=99), 8)
        p = _until(pre, "lease_expired", len(ps))
        assert p["lease_expired"] == len(ps), p
        out, _ = dec.generate(ps, 16, params)
        check_same("lease-late", out, plain)
        d = dec.stats()
        assert d["pulled_blocks"] == 0 and d["pulls_stale"] == 0, d
        return f"{len(ps)} late requests refused up front and computed, policy 'fail'"
    finally:
        pre.close()
        dec.close()


def lease_heartbeat(model, plain):
    # Short enough that the queue outlasts several leases, long enough that a loaded machine
    # does not miss a heartbeat (one every third of it).
    lease = 0.6
    port, pre = _prefill(model, "prefill-heartbeat", lease)
    # One sequence at a time: the decode requests queue behind a long plain one.
    dec = Engine(model, "decode-heartbeat", {"pd": True}, policy="fail", max_num_seqs=1)
    try:
        pre.wait_ready(), dec.wait_ready()
        ps = prompts()
        params = _offers(pre, ps)
        busy = prompts(1, 50, 0, seed=5)
        t = time.time()
        r = dec.call(
            op="generate",
            prompts=busy + ps,
            max_tokens=[1500] + [16] * len(ps),
            kv_transfer_params=[None] + params,
            ignore_eos=[True] + [False] * len(ps),
        )
        out, secs = r["outputs"], r["secs"]
        check_same("lease-heartbeat", out[1:], plain)
        assert secs > 3 * lease, f"the queue only waited {secs:.2f} s; the lease is {lease} s"
        d = dec.stats()
        blocks = sum(-(-len(x) // BS) for x in ps)
        assert d["pulled_blocks"] >= blocks - len(ps) and d["pull_failures"] == 0, d
        assert d["pulls_stale"] == 0, d
        p = _until(pre, "pulls_served", len(ps))
        assert p["lease_expired"] == 0 and p["pulls_served"] == len(ps), p
        return (
            f"decode requests waited {time.time() - t:.1f} s behind a long one "
            f"({secs / lease:.0f} leases); {d['pulled_blocks']} blocks pulled, none expired"
        )
    finally:
        pre.close()
        dec.close()


def cut_offer(model, plain):
    port, pre = _prefill(model, "prefill-cut", 30.0)
    dec = Engine(model, "decode-cut", {"pd": True}, policy="fail")
    try:
        pre.wait_ready(), dec.wait_ready()
        ps = prompts()
        params = _offers(pre, ps)
        for p in params:
            p["remote_block_ids"] = p["remote_block_ids"][: len(p["remote_block_ids"]) // 2]
        out, _ = dec.generate(ps, 16, params)
        check_same("cut-offer", out, plain)
        d = dec.stats()
        assert d["pulled_blocks"] == 0 and d["pull_failures"] == 0, d
        p = _until(pre, "pulls_aborted", len(ps))
        assert p["pulls_aborted"] == len(ps) and p["lease_expired"] == 0, p
        return f"{len(ps)} cut-down offers refused, computed locally; the prefill freed them at once"
    finally:
        pre.close()
        dec.close()


def abort_queued(model, plain):
    port, pre = _prefill(model, "prefill-abort", 600.0)
    dec = Engine(model, "decode-abort", {"pd": True}, policy="fail", max_num_seqs=1)
    try:
        pre.wait_ready(), dec.wait_ready()
        ps = prompts()
        params = _offers(pre, ps)
        r = dec.call(
            op="abort_queued",
            prompts=ps,
            kv_transfer_params=params,
            busy=prompts(1, 50, 0, seed=6)[0],
            busy_tokens=200,
        )
        assert r["aborted"] == len(ps), r
        p = _until(pre, "pulls_aborted", len(ps))
        assert p["pulls_aborted"] == len(ps), p
        # Freed well inside the 600 s lease: vLLM's prefix cache can be emptied.
        assert pre.call(op="settle", timeout_s=10)["reset"], "the prefill still holds blocks"
        return f"{len(ps)} queued decode requests aborted; the prefill freed them within a step"
    finally:
        pre.close()
        dec.close()


def _model(dst, seed):
    subprocess.run(
        [sys.executable, os.path.join(HERE, "make_tiny_model.py"), dst, "--seed", str(seed)],
        check=True,
        capture_output=True,
    )


def model_replaced(model, plain):
    work = tempfile.mkdtemp(prefix="kvferry-e2e-replace-")
    try:
        path, new = os.path.join(work, "model"), os.path.join(work, "new")
        shutil.copytree(model, path)
        _model(new, 4321)
        want_new, _ = _plain(new, prompts())
        nvme = os.path.join(work, "nvme")
        conn = {"pd": False, "dram_blocks": 256, "nvme_dir": nvme, "nvme_blocks": 512}
        e = Engine(path, "replace-old", conn, policy="fail")
        try:
            out, _ = e.generate(prompts(), 16)
            check_same("model-replaced (old weights)", out, plain)
            assert e.call(op="settle")["reset"]
            s = e.stats()
            assert s["saved_blocks"] > 0, s
        finally:
            e.close()  # writes G2 to G3
        time.sleep(0.01)  # a new modification time for the files copied over
        for name in os.listdir(new):
            shutil.copy(os.path.join(new, name), os.path.join(path, name))
        e = Engine(path, "replace-new", conn, policy="fail")
        try:
            out, _ = e.generate(prompts(), 16)
            check_same("model-replaced (new weights)", out, want_new)
            s = e.stats()
            assert s["onboarded_blocks"] == 0 and s["nvme_recovered"] == 0, s
        finally:
            e.close()
        return "old weights' KV on the same nvme_dir never loaded; outputs equal the new model's"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _plain(model, ps):
    base = Engine(model, "plain-replaced")
    try:
        return base.generate(ps, 16)
    finally:
        base.close()


def reset_connector(model, plain):
    e = Engine(model, "reset-connector", {"pd": False, "dram_blocks": 256}, policy="fail")
    try:
        ps = prompts()
        out, _ = e.generate(ps, 16)
        check_same("reset-connector round 1", out, plain)
        assert e.call(op="settle")["reset"]
        assert e.call(op="reset_connector")["reset"]
        out, _ = e.generate(ps, 16)
        check_same("reset-connector round 2", out, plain)
        s = e.stats()
        # The worker emptied its tiers (not only the scheduler its mirror).
        assert s["onboarded_blocks"] == 0 and s["saved_blocks"] > 0 and s["resets"] == 1, s
        # New saves after the reset are served again.
        assert e.call(op="settle")["reset"]
        out, _ = e.generate(ps, 16)
        check_same("reset-connector round 3", out, plain)
        s = e.stats()
        assert s["onboarded_blocks"] > 0, s
        return f"nothing loaded after the reset; {s['onboarded_blocks']} blocks of new saves onboarded"
    finally:
        e.close()


def shared_nvme(model, plain):
    nvme = tempfile.mkdtemp(prefix="kvferry-e2e-shared-")
    conn = {"pd": False, "dram_blocks": 64, "nvme_dir": nvme, "nvme_blocks": 128}
    first = Engine(model, "shared-nvme-1", conn)
    try:
        first.wait_ready()
        second = Engine(model, "shared-nvme-2", conn)
        try:
            second.wait_ready()
            raise AssertionError("a second engine started on the same nvme_dir and identity")
        except RuntimeError:
            pass
        finally:
            second.close()
        log = open(second.log.name).read()
        assert "in use by another kvferry process" in log, log[-2000:]
        out, _ = first.generate(prompts(), 16)
        check_same("shared-nvme", out, plain)
        return "the second engine was refused with the reason; the first serves on"
    finally:
        first.close()
        shutil.rmtree(nvme, ignore_errors=True)


def offload_pressure(model, plain):
    # Six prompts of seven full blocks sharing six: twelve distinct blocks through eight slots,
    # so every round evicts, and refuses, while later rounds still find the shared prefix.
    e = Engine(model, "offload-pressure", {"pd": False, "dram_blocks": 8}, policy="fail")
    try:
        for rnd in range(3):
            out, _ = e.generate(prompts(), 16)
            check_same(f"offload-pressure round {rnd}", out, plain)
            assert e.call(op="settle")["reset"]
        s = e.stats()
        assert s["onboard_failed_blocks"] == 0, s
        assert s["onboarded_blocks"] > 0 and s["dram_blocks"] <= 8, s
        return (
            f"3 rounds of 12 distinct blocks through 8 DRAM blocks: {s['onboarded_blocks']} "
            f"onboarded, {s['save_failed_blocks']} saves refused for room, no load failed"
        )
    finally:
        e.close()


SCENARIOS = [
    ("lease-late", lease_late),
    ("lease-heartbeat", lease_heartbeat),
    ("cut-offer", cut_offer),
    ("abort-queued", abort_queued),
    ("model-replaced", model_replaced),
    ("reset-connector", reset_connector),
    ("shared-nvme", shared_nvme),
    ("offload-pressure", offload_pressure),
]
