"""One vLLM engine (CPU, the tiny model) in its own process, driven by JSON lines on stdin.

    python engine.py MODEL_DIR CONFIG_JSON

CONFIG_JSON: {"name": ..., "connector": null | {kv_connector_extra_config...},
"kv_connector": "KVFerryConnector" (default) | "OffloadingConnector", "kv_role" (default
"kv_both"), "policy": vLLM's
kv_load_failure_policy ("recompute" by default here; vLLM's own default is "fail"),
"max_num_seqs": N, "block_size": N or null (vLLM's choice), "dtype" (default "float32"), "hybrid":
true (vLLM's hybrid KV cache manager on)}. Commands, one JSON object per line; each answer is one
line starting with "@@ " (vLLM logs on stdout too):

    {"op": "generate", "prompts": [[token ids], ...], "max_tokens": N or [N, ...],
     "kv_transfer_params": [dict | null, ...], "ignore_eos": [bool, ...], "logprobs": K}
                        -> {"outputs": [{"token_ids", "kv_transfer_params", "top"}]}, "top":
                           per token its K best candidates [token, logprob] (K given)
    {"op": "abort_queued", "prompts": [...], "kv_transfer_params": [...], "busy": [token ids],
     "busy_tokens": N}  -> adds a long plain request, then the others behind it (max_num_seqs 1
                           keeps them queued), aborts those, and runs the first to its end
    {"op": "reset_connector"} -> {"reset": reset_prefix_cache(reset_connector=True)}
    {"op": "step", "n": N} -> N engine steps (as `vllm serve` runs after requests finish)
    {"op": "settle"}    -> steps the engine until no request holds blocks, then resets vLLM's
                           prefix cache (so the next prompt cannot hit it)
    {"op": "stats"}     -> kvferry's counters for this engine
    {"op": "kv_groups"} -> the kinds of vLLM's KV cache groups
    {"op": "metrics"}   -> vLLM's counters by name (config "metrics": true)
    {"op": "quit"}
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def answer(obj):
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    model, cfg = sys.argv[1], json.loads(sys.argv[2])
    kw = {}
    engine_id = cfg.get("name", "engine")
    if cfg.get("connector") is not None:
        name = cfg.get("kv_connector", "KVFerryConnector")
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector=name,
            kv_connector_module_path="kvferry.vllm" if name == "KVFerryConnector" else None,
            kv_role=cfg.get("kv_role", "kv_both"),
            engine_id=engine_id,
            kv_connector_extra_config=cfg["connector"],
            kv_load_failure_policy=cfg.get("policy", "recompute"),
        )
    if cfg.get("metrics"):
        kw["disable_log_stats"] = False
    if cfg.get("hybrid"):
        # As llm-d's gpt-oss manifests start vLLM: one KV cache group per attention kind.
        kw["disable_hybrid_kv_cache_manager"] = False
    if cfg.get("max_num_seqs"):
        kw["max_num_seqs"] = int(cfg["max_num_seqs"])
    t0 = time.time()
    llm = LLM(
        model=model,
        dtype=cfg.get("dtype", "float32"),
        # null: vLLM's choice (a Mamba hybrid's blocks are sized to its state pages).
        block_size=None if cfg.get("block_size", 32) is None else int(cfg.get("block_size", 32)),
        max_model_len=2048,
        enforce_eager=True,
        seed=0,
        **kw,
    )
    answer({"ready": True, "start_s": round(time.time() - t0, 1)})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "generate":
            params = cmd.get("kv_transfer_params") or [None] * len(cmd["prompts"])
            mt = cmd["max_tokens"]
            mts = mt if isinstance(mt, list) else [mt] * len(params)
            eos = cmd.get("ignore_eos") or [False] * len(params)
            sps = []
            for p, n, ie in zip(params, mts, eos):
                sp = SamplingParams(
                    temperature=0.0, max_tokens=n, ignore_eos=bool(ie), logprobs=cmd.get("logprobs")
                )
                if p is not None:
                    sp.extra_args = {"kv_transfer_params": p}
                sps.append(sp)
            t = time.time()
            outs = llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in cmd["prompts"]],
                sps,
                use_tqdm=False,
            )
            answer(
                {
                    "secs": time.time() - t,
                    "outputs": [
                        {
                            "token_ids": list(o.outputs[0].token_ids),
                            "kv_transfer_params": o.kv_transfer_params,
                            # Per token, the candidates vLLM ranked best (token, logprob).
                            "top": [
                                sorted(([k, x.logprob] for k, x in lp.items()), key=lambda t: -t[1])
                                for lp in (o.outputs[0].logprobs or [])
                            ],
                        }
                        for o in outs
                    ],
                }
            )
        elif op == "kv_groups":
            # The KV cache groups vLLM made: one per attention kind under the hybrid manager.
            sched = llm.llm_engine.engine_core.engine_core.scheduler
            groups = sched.kv_cache_config.kv_cache_groups
            answer({"groups": [type(g.kv_cache_spec).__name__ for g in groups]})
        elif op == "settle":
            # Finished requests whose saves or pulls are in flight still hold blocks; step the
            # engine until they are released, then empty vLLM's own prefix cache.
            deadline = time.time() + float(cmd.get("timeout_s", 60))
            ok = False
            while time.time() < deadline:
                engine = llm.llm_engine
                if engine.has_unfinished_requests():
                    engine.step()
                if llm.reset_prefix_cache():
                    ok = True
                    break
                engine.step()
                time.sleep(0.01)
            answer({"reset": ok})
        elif op == "abort_queued":
            engine = llm.llm_engine
            engine.add_request(
                "busy",
                TokensPrompt(prompt_token_ids=cmd["busy"]),
                SamplingParams(temperature=0.0, max_tokens=int(cmd["busy_tokens"]), ignore_eos=True),
            )
            ids = []
            for i, (ids_, p) in enumerate(zip(cmd["prompts"], cmd["kv_transfer_params"])):
                sp = SamplingParams(temperature=0.0, max_tokens=4)
                sp.extra_args = {"kv_transfer_params": p}
                engine.add_request(f"queued-{i}", TokensPrompt(prompt_token_ids=ids_), sp)
                ids.append(f"queued-{i}")
            for _ in range(5):
                engine.step()
            engine.abort_request(ids)
            while engine.has_unfinished_requests():
                engine.step()
            answer({"aborted": len(ids)})
        elif op == "step":
            # What `vllm serve`'s engine loop does after requests finished: one more step, in
            # which the worker learns of them (kvferry's prefill then holds their grants).
            for _ in range(int(cmd.get("n", 2))):
                llm.llm_engine.step()
            answer({"stepped": True})
        elif op == "reset_connector":
            answer({"reset": llm.reset_prefix_cache(reset_connector=True)})
        elif op == "metrics":
            # vLLM's own counters (with "metrics": true in the config), by name.
            out = {}
            for m in llm.get_metrics():
                v = getattr(m, "value", None)
                if isinstance(v, (int, float)):
                    out[m.name] = out.get(m.name, 0) + v
            answer({"metrics": out})
        elif op == "stats":
            from kvferry.vllm import native

            n = native(engine_id)
            answer({"counters": dict(n.counters()) if n is not None else None})
        elif op == "quit":
            # An orderly shutdown, as on SIGTERM: vLLM shuts its connector down (kvferry then
            # writes G2 to G3 when a directory is configured).
            llm.llm_engine.engine_core.shutdown()
            answer({"bye": True})
            break


if __name__ == "__main__":
    main()
