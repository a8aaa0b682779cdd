"""kvferry as llm-d runs NixlConnector: two hosts on one machine (two network namespaces joined
by a veth pair, each with its own address), a prefill engine and a decode engine configured
only through llm-d's environment (``VLLM_NIXL_SIDE_CHANNEL_HOST`` = the pod address,
``VLLM_NIXL_SIDE_CHANNEL_PORT``, the token as ``KVFERRY_TOKEN``; no ``host`` or ``port`` key),
``kv_role`` producer and consumer, driven the way llm-d's ``nixlv2`` sidecar drives NixlConnector
(prefill with ``max_tokens=1`` and ``do_remote_decode``, decode with the returned params
verbatim). Outputs must equal plain vLLM's token for token, and every prefill grant must be
released.

- llmd-two-hosts: the above.
- llmd-offloading: the same two hosts under llm-d's ``offloading`` protocol (its RDMA-free P/D,
  ``--kv-connector=offloading`` on the sidecar): the decode request is sent first and the prefill
  after it, each with role-keyed params (``remote_prefiller{kv_request_id, remote_host,
  remote_port}`` for the decoder, ``remote_decoder{kv_request_id}`` for the prefill, port 7777
  as the sidecar's default); then a decoder whose key names another prompt's prefill and one whose
  key nobody posts. Every output equals plain vLLM's, and every grant ends.

Needs root (namespaces and a veth pair); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import uuid

from run_e2e import Engine, check_same, prompts, wait_released

NS = ("kvf-e2e-pre", "kvf-e2e-dec")
ADDR = ("10.231.7.1", "10.231.7.2")
PORT = 5600


class Skip(Exception):
    pass


def _ip(*args, ns=None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _teardown():
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _two_hosts():
    _teardown()
    try:
        for ns in NS:
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        _teardown()
        raise Skip(f"cannot create network namespaces here ({getattr(e, 'stderr', e)})".strip())
    _ip("link", "add", "kvf-e2e-p", "type", "veth", "peer", "name", "kvf-e2e-d")
    for ns, dev, addr in zip(NS, ("kvf-e2e-p", "kvf-e2e-d"), ADDR):
        _ip("link", "set", dev, "netns", ns)
        _ip("addr", "add", f"{addr}/24", "dev", dev, ns=ns)
        _ip("link", "set", dev, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)


def _engines(model, name, port, pre_role, dec_extra):
    """A prefill engine in the first namespace on `port` and a decode engine (``kv_consumer``)
    in the second, addressed only through llm-d's environment and sharing a fresh token; the
    caller closes both."""
    token = secrets.token_hex(16)
    pre = Engine(
        model,
        f"prefill-{name}",
        {"pd": True},
        netns=NS[0],
        kv_role=pre_role,
        env={
            "VLLM_NIXL_SIDE_CHANNEL_HOST": ADDR[0],
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(port),
            "KVFERRY_TOKEN": token,
        },
    )
    try:
        dec = Engine(
            model,
            f"decode-{name}",
            {"pd": True, **dec_extra},
            netns=NS[1],
            kv_role="kv_consumer",
            env={"VLLM_NIXL_SIDE_CHANNEL_HOST": ADDR[1], "KVFERRY_TOKEN": token},
        )
    except Exception:
        pre.close()
        raise
    pre.wait_ready(), dec.wait_ready()
    return pre, dec


def two_hosts(model, plain):
    _two_hosts()
    pre = dec = None
    try:
        pre, dec = _engines(model, "llmd", PORT, "kv_producer", {})
        ps = prompts()
        first, _ = pre.generate(ps, 1, [{"do_remote_decode": True}] * len(ps))
        pre.call(op="step")
        params = [o["kv_transfer_params"] for o in first]
        for p, x in zip(params, ps):
            # NixlConnector's fields, naming the prefill pod's address and the configured port.
            assert p and p.get("do_remote_prefill") and not p.get("do_remote_decode"), p
            assert p["remote_host"] == ADDR[0] and p["remote_port"] == PORT, p
            assert p["tp_size"] == 1 and p["pp_size"] == 1, p
            assert isinstance(p["remote_block_ids"][0], list), p
            assert 0 < p["remote_num_tokens"] <= len(x), p
            assert p["remote_blocks_expiry_time"] > time.time(), p
        out, secs = dec.generate(ps, 16, params)
        check_same("llmd-two-hosts", out, plain)
        d = dec.stats()
        s = wait_released(pre, len(ps))
        assert d["pull_failures"] == 0 and d["pulled_blocks"] > 0, d
        assert s["pulls_served"] == len(ps), s
        return (
            f"decode at {ADDR[1]} pulled {d['pulled_blocks']} blocks from {ADDR[0]}:{PORT} "
            f"(addresses from VLLM_NIXL_SIDE_CHANNEL_*), {s['pulls_served']} grants released, "
            f"decode {secs:.2f} s"
        )
    finally:
        for e in (pre, dec):
            if e is not None:
                e.close()
        _teardown()


P2P_PORT = 7777  # llm-d's --p2p-connector-port default


def _send(engine, **cmd):
    """Sends a command without waiting for its answer (read it with ``engine._read()``)."""
    engine.wait_ready()
    engine.p.stdin.write(json.dumps(cmd) + "\n")
    engine.p.stdin.flush()


def offloading(model, plain):
    _two_hosts()
    pre = dec = None
    try:
        # llm-d's offloading guide runs both pods as kv_both.
        pre, dec = _engines(model, "offloading", P2P_PORT, "kv_both", {"remote_prefill_wait_s": 4})
        ps = prompts()
        keys = [f"kv-{uuid.uuid4()}" for _ in ps]
        to_dec = [
            {"remote_prefiller": {"kv_request_id": k, "remote_host": ADDR[0], "remote_port": P2P_PORT}}
            for k in keys
        ]
        # As the sidecar: both at once, the decoder first (it must wait for the offers).
        _send(dec, op="generate", prompts=ps, max_tokens=16, kv_transfer_params=to_dec)
        time.sleep(0.5)
        pre.generate(ps, 1, [{"remote_decoder": {"kv_request_id": k}} for k in keys])
        pre.call(op="step")
        r = dec._read()
        check_same("llmd-offloading", r["outputs"], plain)
        d = dec.stats()
        s = wait_released(pre, len(ps))
        assert d["offers_fetched"] == len(ps) and d["offers_missed"] == 0, d
        assert d["pull_failures"] == 0 and d["pulled_blocks"] > 0, d
        assert s["offers_posted"] == len(ps) and s["pulls_served"] == len(ps), s
        first = f"{d['offers_fetched']} offers fetched by key, {d['pulled_blocks']} blocks pulled"
        dec.call(op="settle")

        # A key that names another prompt's prefill, and a key nobody posts: both computed on
        # the decoder (the first refused on its prompt digest, the second after the wait).
        wrong, nobody = f"kv-{uuid.uuid4()}", f"kv-{uuid.uuid4()}"
        to_dec = [
            {"remote_prefiller": {"kv_request_id": k, "remote_host": ADDR[0], "remote_port": P2P_PORT}}
            for k in (wrong, nobody)
        ]
        _send(dec, op="generate", prompts=ps[:2], max_tokens=16, kv_transfer_params=to_dec)
        time.sleep(0.5)
        pre.generate([ps[3]], 1, [{"remote_decoder": {"kv_request_id": wrong}}])
        pre.call(op="step")
        r = dec._read()
        check_same("llmd-offloading (wrong and missing keys)", r["outputs"], plain[:2])
        # The worker stops asking for the missing key at its own deadline, a step after the
        # scheduler stopped waiting for it.
        deadline = time.time() + 30
        while (d2 := dec.stats())["offers_missed"] < 1 and time.time() < deadline:
            dec.call(op="step", n=5)
            time.sleep(0.2)
        assert d2["pulled_blocks"] == d["pulled_blocks"], (d, d2)
        assert d2["offers_fetched"] == d["offers_fetched"] + 1, d2
        assert d2["offers_missed"] == 1, d2
        deadline = time.time() + 30
        while True:
            s2 = pre.stats()
            if s2["pulls_aborted"] >= 1 or time.time() > deadline:
                break
            pre.call(op="settle", timeout_s=1)
        assert s2["pulls_aborted"] == 1 and s2["lease_expired"] == 0, s2
        return (
            f"{first}; a key for another prompt refused and its grant aborted, a key nobody "
            f"posted computed after {r['secs']:.1f} s"
        )
    finally:
        for e in (pre, dec):
            if e is not None:
                e.close()
        _teardown()


SCENARIOS = [("llmd-two-hosts", two_hosts), ("llmd-offloading", offloading)]
