"""kvferry as llm-d runs NixlConnector: two hosts on one machine (two network namespaces joined
by a veth pair, each with its own address), a prefill engine and a decode engine configured
only through llm-d's environment (``VLLM_NIXL_SIDE_CHANNEL_HOST`` = the pod address,
``VLLM_NIXL_SIDE_CHANNEL_PORT``, the token as ``KVFERRY_TOKEN``; no ``host`` or ``port`` key),
``kv_role`` producer and consumer, driven the way llm-d's ``nixlv2`` sidecar drives NixlConnector
(prefill with ``max_tokens=1`` and ``do_remote_decode``, decode with the returned params
verbatim). Outputs must equal plain vLLM's token for token, and every prefill grant must be
released.

- llmd-two-hosts: the above.

Needs root (namespaces and a veth pair); skips with the reason otherwise.
"""

from __future__ import annotations

import secrets
import subprocess
import time

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


def two_hosts(model, plain):
    _two_hosts()
    token = secrets.token_hex(16)
    pre = dec = None
    try:
        pre = Engine(
            model,
            "prefill-llmd",
            {"pd": True},
            netns=NS[0],
            kv_role="kv_producer",
            env={
                "VLLM_NIXL_SIDE_CHANNEL_HOST": ADDR[0],
                "VLLM_NIXL_SIDE_CHANNEL_PORT": str(PORT),
                "KVFERRY_TOKEN": token,
            },
        )
        dec = Engine(
            model,
            "decode-llmd",
            {"pd": True},
            netns=NS[1],
            kv_role="kv_consumer",
            env={"VLLM_NIXL_SIDE_CHANNEL_HOST": ADDR[1], "KVFERRY_TOKEN": token},
        )
        pre.wait_ready(), dec.wait_ready()
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


SCENARIOS = [("llmd-two-hosts", two_hosts)]
