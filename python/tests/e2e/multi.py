"""kvferry inside vLLM's MultiConnector next to NixlConnector, as llm-d's multi-tier guide
composes P/D and offload: ``vllm serve`` with ``[NixlConnector, KVFerryConnector]`` and with
``[KVFerryConnector, NixlConnector]``, stats logging on (vLLM's default for servers; this is
where MultiConnector asks every child for its Prometheus metrics). The server must start and
serve, outputs must equal plain vLLM's token for token, kvferry must offload and onboard a
prefix, and its counters must be on vLLM's /metrics.

- multi-connector: both orders, and ``[KVFerryConnector, OffloadingConnector]`` (vLLM's own
  offloading scheduler, on kvferry's spec): vLLM's ``vllm:kv_offload_*`` families are then the
  OffloadingConnector's, and kvferry does not register them a second time (which would stop
  the server at start).

The NixlConnector orders are left out, with the reason printed, when NIXL's Python package is
not importable in vLLM's environment.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.request

from run_e2e import check_same, plain_outputs

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples"))


def _children(order):
    nixl = {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_both",
        # The CPU build has no device buffers: NIXL stages through host memory.
        "kv_buffer_device": "cpu",
    }
    ferry = {
        "kv_connector": "KVFerryConnector",
        "kv_connector_module_path": "kvferry.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"pd": False, "dram_blocks": 256},
    }
    offloading = {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "KVFerryOffloadingSpec",
            "spec_module_path": "kvferry.offload_spec",
            "dram_blocks": 256,
        },
    }
    return {
        "nixl-first": [nixl, ferry],
        "kvferry-first": [ferry, nixl],
        "beside-offloading": [ferry, offloading],
    }[order]


def multi_connector(model, plain):
    import vllm_demo

    orders = ["beside-offloading"]
    try:
        import nixl  # noqa: F401

        orders = ["nixl-first", "kvferry-first", *orders]
    except Exception as e:  # noqa: BLE001
        print(f"multi-connector: NIXL is not importable here ({e}); its orders are skipped")
    prompts = vllm_demo.prompts(3, 300, seed=21)
    want = plain_outputs(model, "plain-multi", prompts, 16)
    notes = []
    for order in orders:
        work = tempfile.mkdtemp(prefix="kvferry-multi-")
        cfg = {
            "kv_connector": "MultiConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"connectors": _children(order)},
        }
        srv = vllm_demo.Server(model, f"multi-{order}", {}, work, kv_config=cfg, policy=None)
        try:
            srv.wait()
            got = []
            for p in prompts:
                out, _, _ = vllm_demo.complete(srv.url, p, 16)
                got.append({"token_ids": out})
            check_same(f"multi-connector {order}", got, want)
            # vLLM's own prefix cache emptied: the second pass can only hit kvferry's G2.
            time.sleep(1.5)
            for _ in range(50):
                r = urllib.request.urlopen(
                    urllib.request.Request(srv.url + "/reset_prefix_cache", method="POST"),
                    timeout=30,
                )
                r.read()
                if r.status == 200:
                    break
                time.sleep(0.2)
            again = [{"token_ids": vllm_demo.complete(srv.url, p, 16)[0]} for p in prompts]
            check_same(f"multi-connector {order}, from kvferry's G2", again, want)
            time.sleep(1.2)
            m = vllm_demo.prom(srv.url)
            assert m.get("vllm:kvferry_saved_blocks_total", 0) > 0, m
            assert m.get("vllm:kvferry_onboarded_blocks_total", 0) > 0, m
            assert srv.proc.poll() is None, f"the server died; log: {srv.log_path}"
            if order == "beside-offloading":
                # The OffloadingConnector's own families, fed by its jobs on kvferry's spec.
                assert m.get("vllm:kv_offload_store_bytes_total", 0) > 0, m
            notes.append(
                f"{order}: served, {int(m['vllm:kvferry_saved_blocks_total'])} blocks saved, "
                f"{int(m['vllm:kvferry_onboarded_blocks_total'])} onboarded (vLLM's /metrics)"
            )
        finally:
            srv.stop()
    return "; ".join(notes)


SCENARIOS = [("multi-connector", multi_connector)]
