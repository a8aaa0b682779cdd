"""Hybrid models under vLLM's hybrid KV cache manager (kvferry is `SupportsHMA`): a tiny Llama
whose layers alternate sliding-window (window 64) and full attention, blocks of 32 tokens, so
vLLM makes two KV cache groups. Offload to G2 and G3 across a restart, P/D, and a killed prefill,
token for token against a plain vLLM with the same manager; the counters show that a
sliding-window group moves only its window (vLLM's one-block margin included).

vLLM frees the blocks a sliding window leaves behind as the request goes on (and before it
calls the connector at the request's end), so kvferry saves them at the end of the step that
last wrote them, while the request still holds them; a later prefix hit finds the window it
ends in.

With window 64 and blocks of 32, a sliding-window group holds the last cdiv(64 - 1, 32) = 2
blocks of a prefix (vLLM's `get_num_skipped_tokens`), the full-attention group all of them.

hybrid-gdn-offload: a Gated DeltaNet hybrid (tiny Qwen3-Next, bfloat16, 256-token blocks, vLLM's
Mamba "align" mode): its state group keeps one state per block boundary, which vLLM names to the
connector as it writes it; a hit loads the state at its end alone.
"""

import os
import subprocess
import sys
import tempfile

from run_e2e import BS, HERE, Engine, check_same, plain_outputs, prompts, quiet_ports, wait_released

WINDOW = 64
# Blocks a sliding-window group needs for a prefix: the window's, as vLLM holds them.
WINDOW_BLOCKS = -(-(WINDOW - 1) // BS)
HYBRID = {"hybrid": True}


def hybrid_model():
    path = os.path.join(tempfile.gettempdir(), "kvferry-e2e-hybrid-model")
    if not os.path.isdir(path):
        subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "make_tiny_model.py"),
                path,
                "--layers",
                "4",
                "--sliding",
                str(WINDOW),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return path


def two_groups(e):
    kinds = e.call(op="kv_groups")["groups"]
    assert kinds == ["SlidingWindowSpec", "FullAttentionSpec"], kinds
    return kinds


def reference(model, ps):
    return plain_outputs(model, "plain-hybrid", ps, 16, **HYBRID)


def offload(_model, _plain):
    model = hybrid_model()
    ps = prompts()
    plain = reference(model, ps)
    nvme = tempfile.mkdtemp(prefix="kvferry-e2e-hybrid-g3-")
    conn = {"pd": False, "dram_blocks": 256, "nvme_dir": nvme, "nvme_blocks": 512}
    e = Engine(model, "hybrid-offload", conn, **HYBRID)
    try:
        two_groups(e)
        out, _ = e.generate(ps, 16)
        check_same("hybrid offload round 1", out, plain)
        assert e.call(op="settle")["reset"], "vLLM's prefix cache did not empty"
        s1 = e.stats()
        # Every full block of both groups is in the tiers: the full-attention group's saved
        # with the request's end, the sliding group's as its window left them (at the end of
        # the step whose forward pass wrote them last, before vLLM frees them) and the window
        # left at the end. Per group: the 6 blocks the prompts share and each prompt's 7th
        # (the 16 tokens decoded after it fill no block).
        distinct = len({tuple(x[: 6 * BS]) for x in ps}) * 6 + len({tuple(x[: 7 * BS]) for x in ps})
        assert s1["dram_blocks"] == 2 * distinct, (2 * distinct, s1)
        # One prompt alone: its hit is the longest prefix whose blocks every group holds,
        # leaving a token to compute: floor((224 - 1) / 32) = 6 blocks of the full-attention
        # group and the window's 2 of the sliding one (12 if the sliding group moved them all).
        hit = (len(ps[0]) - 1) // BS
        out, _ = e.generate(ps[:1], 16)
        check_same("hybrid offload, one prompt", out, plain[:1])
        s2 = e.stats()
        moved = s2["onboarded_blocks"] - s1["onboarded_blocks"]
        assert moved == hit + WINDOW_BLOCKS, (moved, hit, s2)
        assert s2["onboard_failed_blocks"] == 0, s2
        assert e.call(op="settle")["reset"]
        out, _ = e.generate(ps, 16)
        check_same("hybrid offload round 2", out, plain)
        s2 = e.stats()
        assert s2["onboard_failed_blocks"] == 0, s2
        e.close()
        # A restart: the blocks come back from the G3 files, every group's.
        e = Engine(model, "hybrid-offload-restarted", conn, **HYBRID)
        out, _ = e.generate(ps, 16)
        check_same("hybrid offload after a restart", out, plain)
        s3 = e.stats()
        assert s3["onboarded_blocks"] > 0 and s3["onboard_failed_blocks"] == 0, s3
        return (
            f"2 KV cache groups; {s1['saved_blocks']} blocks saved; one prompt onboarded {moved} "
            f"blocks ({hit} full + {WINDOW_BLOCKS} in the window); {s3['onboarded_blocks']} "
            "onboarded from G3 after a restart"
        )
    finally:
        e.close()


def pd(_model, _plain):
    model = hybrid_model()
    ps = prompts()
    plain = reference(model, ps)
    base = quiet_ports(2)
    port, port2 = base, base + 1
    pre = Engine(model, "hybrid-prefill", {"pd": True, "port": port}, **HYBRID)
    dec = Engine(model, "hybrid-decode", {"pd": True}, **HYBRID)
    try:
        pre.wait_ready(), dec.wait_ready()
        two_groups(dec)
        first, _ = pre.generate(ps, 1, [{"do_remote_decode": True}] * len(ps))
        pre.call(op="step")
        params = [o["kv_transfer_params"] for o in first]
        for p in params:
            groups = p["remote_block_ids"]
            assert len(groups) == 2 and len(groups[0]) == len(groups[1]), p
        out, _ = dec.generate(ps, 16, params)
        check_same("hybrid pd", out, plain)
        d = dec.stats()
        released = wait_released(pre, len(ps))
        # The whole prompt: every block of the full-attention group, the window's blocks of
        # the sliding one (vLLM allocates no others there).
        want = sum(-(-len(x) // BS) + WINDOW_BLOCKS for x in ps)
        assert d["pulled_blocks"] == want and d["pull_failures"] == 0, (want, d)
        assert released["pulls_served"] == len(ps), released
        msg = f"{d['pulled_blocks']} blocks pulled (full group whole, sliding group its window)"
    finally:
        pre.close()
        dec.close()
    # A prefill killed before its decoder pulls: vLLM hears of the failure by request (its
    # block ids are per group) and recomputes.
    pre = Engine(model, "hybrid-prefill-killed", {"pd": True, "port": port2}, **HYBRID)
    dec = Engine(model, "hybrid-decode-orphaned", {"pd": True}, **HYBRID)
    try:
        pre.wait_ready(), dec.wait_ready()
        first, _ = pre.generate(ps, 1, [{"do_remote_decode": True}] * len(ps))
        params = [o["kv_transfer_params"] for o in first]
        pre.p.kill()
        pre.p.wait(timeout=30)
        out, _ = dec.generate(ps, 16, params)
        check_same("hybrid pd, prefill killed", out, plain)
        d = dec.stats()
        assert d["pull_failures"] >= 1 and d["pulled_blocks"] == 0, d
        return f"{msg}; prefill killed: {d['pull_failures']} failed pulls, all recomputed"
    finally:
        pre.close()
        dec.close()


def offloading_spec(_model, _plain):
    """vLLM's OffloadingConnector with kvferry's spec under the hybrid manager: its keys are per
    group, its GPU specs list each group's blocks in turn."""
    from run_e2e import offloading_spec as spec

    model = hybrid_model()
    return spec(model, reference(model, prompts()), name="hybrid-offloading-spec", **HYBRID)


GDN = {"hybrid": True, "dtype": "bfloat16", "block_size": None}
GDN_BLOCK = 256


def gdn_model():
    path = os.path.join(tempfile.gettempdir(), "kvferry-e2e-gdn-model")
    if not os.path.isdir(path):
        subprocess.run(
            [sys.executable, os.path.join(HERE, "make_tiny_model.py"), path, "--gdn", "--layers", "4"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return path


class Skip(Exception):
    pass


def gdn_reference(model, name, ps, max_tokens):
    """Plain vLLM's outputs for the GDN model; a machine whose vLLM CPU build cannot run the
    model at all (its CPU kernels) skips the scenario, with vLLM's reason."""
    try:
        return plain_outputs(model, name, ps, max_tokens, logprobs=5, **GDN)
    except RuntimeError as e:
        log = os.path.join(tempfile.gettempdir(), f"kvferry-e2e-{name}.log")
        why = [ln for ln in open(log, errors="replace").read().splitlines() if "Error" in ln]
        raise Skip(f"plain vLLM cannot run the GDN model here: {why[-1] if why else e}") from e


def gdn_offload(_model, _plain):
    """A Gated DeltaNet hybrid (a tiny Qwen3-Next: linear attention with a recurrent state, and
    full attention) in bfloat16 with vLLM's 256-token blocks: the state group moves only the
    states at block boundaries vLLM hands over as it writes them, a hit loads the last one
    alone; G2 and G3 across a restart, token for token against plain vLLM."""
    model = gdn_model()
    # Prompts of 3 blocks and 40 tokens, the first 2 blocks shared: a repeated prompt hits its
    # 3 blocks, loading 3 full-attention blocks and the state after block 3 alone.
    ps = prompts(4, prefix_len=2 * GDN_BLOCK + 40, suffix_len=GDN_BLOCK)
    plain = gdn_reference(model, "plain-gdn", ps, 8)
    nvme = tempfile.mkdtemp(prefix="kvferry-e2e-gdn-g3-")
    conn = {"pd": False, "dram_blocks": 64, "nvme_dir": nvme, "nvme_blocks": 128}
    e = Engine(model, "gdn-offload", conn, **GDN)
    try:
        kinds = e.call(op="kv_groups")["groups"]
        assert "MambaSpec" in kinds and "FullAttentionSpec" in kinds, kinds
        out, _ = e.generate(ps, 8)
        check_same("gdn offload round 1", out, plain)
        assert e.call(op="settle")["reset"], "vLLM's prefix cache did not empty"
        s1 = e.stats()
        assert s1["saved_blocks"] > 0, s1
        out2, _ = e.generate(ps, 8)
        check_same("gdn offload round 2 (from G2)", out2, plain)
        s2 = e.stats()
        loaded = s2["onboarded_blocks"]
        # 4 per prompt: 3 of the full-attention group, 1 of the state group (6 if the state
        # group moved every position).
        assert loaded == 4 * len(ps) and s2["onboard_failed_blocks"] == 0, s2
        e.close()
        e = Engine(model, "gdn-offload-restarted", conn, **GDN)
        out3, _ = e.generate(ps, 8)
        check_same("gdn offload after a restart (from G3)", out3, plain)
        s3 = e.stats()
        assert s3["onboarded_blocks"] == 4 * len(ps) and s3["onboard_failed_blocks"] == 0, s3
        return (
            f"groups {kinds}: {s1['saved_blocks']} blocks saved, {loaded} onboarded from G2, "
            f"{s3['onboarded_blocks']} from G3 after a restart (per prompt 3 full-attention "
            "blocks and one state); outputs as plain vLLM's"
        )
    finally:
        e.close()


def gdn_pd(_model, _plain):
    """P/D of the Gated DeltaNet hybrid: the prefill engine computes all but the last prompt
    token (a state cannot be wound back: the decoder goes on from the prefill's state after
    them and computes that token itself), the decoder pulls every full-attention block of those
    tokens and the one state block; token for token against plain vLLM. The prompts end on a
    block boundary and off it (the state after a whole block, and mid-block)."""
    model = gdn_model()
    ps = [x[: 2 * GDN_BLOCK + 1] if i == 0 else x for i, x in enumerate(prompts(3, prefix_len=300, suffix_len=60))]
    plain = gdn_reference(model, "plain-gdn-pd", ps, 8)
    port = quiet_ports(1)
    pre = Engine(model, "gdn-prefill", {"pd": True, "port": port}, **GDN)
    dec = Engine(model, "gdn-decode", {"pd": True}, **GDN)
    try:
        pre.wait_ready(), dec.wait_ready()
        first, _ = pre.generate(ps, 1, [{"do_remote_decode": True}] * len(ps))
        pre.call(op="step")
        params = [o["kv_transfer_params"] for o in first]
        out, _ = dec.generate(ps, 8, params)
        check_same("gdn pd", out, plain)
        d = dec.stats()
        released = wait_released(pre, len(ps))
        # Per prompt of P tokens: the full-attention blocks of P - 1 tokens, one state block.
        want = sum(-(-(len(x) - 1) // GDN_BLOCK) + 1 for x in ps)
        assert d["pulled_blocks"] == want and d["pull_failures"] == 0, (want, d)
        assert released["pulls_served"] == len(ps), released
        # An offer whose state is after the whole prompt (a prefill that did not stop short)
        # is refused, and the prompt computed here: the state cannot be wound back.
        again, _ = pre.generate(ps, 1, [{"do_remote_decode": True}] * len(ps))
        params = [dict(o["kv_transfer_params"], remote_num_tokens=len(x)) for o, x in zip(again, ps)]
        out, _ = dec.generate(ps, 8, params)
        check_same("gdn pd, offers a token on", out, plain)
        d2 = dec.stats()
        assert d2["pulled_blocks"] == d["pulled_blocks"] and d2["pull_failures"] == 0, d2
        return (
            f"{d['pulled_blocks']} blocks pulled (per prompt its full-attention blocks and one "
            "state); offers of a state a token on refused and computed here"
        )
    finally:
        pre.close()
        dec.close()


def gdn_offloading_spec(_model, _plain):
    """vLLM's OffloadingConnector with kvferry's spec on the Gated DeltaNet hybrid."""
    from run_e2e import offloading_spec as spec

    model = gdn_model()
    ps = prompts(4, prefix_len=2 * GDN_BLOCK + 40, suffix_len=GDN_BLOCK)
    plain = gdn_reference(model, "plain-gdn-spec", ps, 16)
    return spec(model, plain, name="gdn-offloading-spec", ps=ps, **GDN)


SCENARIOS = [
    ("hybrid-offload", offload),
    ("hybrid-gdn-offload", gdn_offload),
    ("hybrid-gdn-pd", gdn_pd),
    ("hybrid-gdn-offloading-spec", gdn_offloading_spec),
    ("hybrid-pd", pd),
    ("hybrid-offloading-spec", offloading_spec),
]
