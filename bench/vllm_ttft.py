"""Time to first token in real vLLM (CPU build) for a long shared prefix, recomputed vs onboarded
from kvferry's G2 vs from G3 after a restart; and the connector's own cost per scheduler step
with many requests in flight. Run with the Python of a vLLM environment that has kvferry:

    python bench/vllm_ttft.py MODEL_DIR [--prefix 1900] [--reps 5]

TTFT here is the wall time of one `generate` with max_tokens=1 for a single request (in-process
engine: no HTTP, no tokenizer, so the prefix handling is what is timed). Each figure is the
median of --reps runs; vLLM's own prefix cache is emptied before each, so the prefix is either
recomputed or comes from kvferry.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python", "tests", "e2e"))

from run_e2e import Engine  # noqa: E402


def prompt(n, seed=3):
    rng = random.Random(seed)
    return [rng.randrange(10, 1990) for _ in range(n)]


def ttft(model, prefix, reps):
    p = [prompt(prefix)]
    rows = {}

    plain = Engine(model, "ttft-plain")
    try:
        plain.generate(p, 1)  # warm-up
        times = []
        for _ in range(reps):
            assert plain.call(op="settle")["reset"]
            _, secs = plain.generate(p, 1)
            times.append(secs)
        rows["recomputed"] = (statistics.median(times), {})
    finally:
        plain.close()

    g2 = Engine(model, "ttft-g2", {"pd": False, "dram_blocks": 512})
    try:
        g2.generate(p, 1)  # computes and saves the prefix
        times = []
        for _ in range(reps):
            assert g2.call(op="settle")["reset"]
            _, secs = g2.generate(p, 1)
            times.append(secs)
        s = g2.stats()
        assert s["onboarded_blocks"] >= reps, s
        rows["G2 (DRAM)"] = (statistics.median(times), s)
    finally:
        g2.close()

    d = tempfile.mkdtemp(prefix="kvferry-ttft-g3-")
    conn = {"pd": False, "dram_blocks": 512, "nvme_dir": d, "nvme_blocks": 1024}
    first = Engine(model, "ttft-g3-fill", conn)
    first.generate(p, 1)
    first.call(op="settle")
    first.close()  # orderly shutdown: G2 is written to G3
    times, s = [], {}
    for i in range(reps):
        e = Engine(model, f"ttft-g3-{i}", conn)
        try:
            _, secs = e.generate(p, 1)
            s = e.stats()
            assert s["nvme_hits"] > 0 and s["onboarded_blocks"] > 0, s
            times.append(secs)
        finally:
            e.close()
    rows["G3 (NVMe files, after a restart)"] = (statistics.median(times), s)
    return rows


def overhead(model, requests, steps_tokens):
    """Runs many requests at once in one process with every connector method timed."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    import kvferry.vllm as kv

    spent = {}
    calls = {}
    names = [
        "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
        "request_finished", "update_connector_output", "start_load_kv", "get_finished",
        "build_connector_worker_meta", "get_block_ids_with_load_errors",
    ]
    for name in names:
        orig = getattr(kv.KVFerryConnector, name)

        def timed(self, *a, _orig=orig, _name=name, **k):
            t = time.perf_counter()
            try:
                return _orig(self, *a, **k)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t
                calls[_name] = calls.get(_name, 0) + 1

        setattr(kv.KVFerryConnector, name, timed)
    llm = LLM(
        model=model, dtype="float32", block_size=32, max_model_len=2048, enforce_eager=True,
        seed=0,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVFerryConnector", kv_connector_module_path="kvferry.vllm",
            kv_role="kv_both", engine_id="overhead",
            kv_connector_extra_config={"pd": True, "dram_blocks": 2048},
        ),
    )
    rng = random.Random(5)
    shared = [rng.randrange(10, 1990) for _ in range(96)]
    ps = [TokensPrompt(prompt_token_ids=shared + [rng.randrange(10, 1990) for _ in range(64)]) for _ in range(requests)]
    sp = SamplingParams(temperature=0.0, max_tokens=steps_tokens)
    t = time.perf_counter()
    llm.generate(ps, sp, use_tqdm=False)
    wall = time.perf_counter() - t
    steps = calls.get("build_connector_meta", 1)
    total = sum(spent.values())
    return {
        "requests": requests,
        "steps": steps,
        "wall_s": wall,
        "step_ms": wall / steps * 1e3,
        "connector_us_per_step": total / steps * 1e6,
        "share": total / wall,
        "per_method_us_per_call": {k: spent[k] / calls[k] * 1e6 for k in sorted(spent)},
        "counters": dict(kv.native("overhead").counters()),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prefix", type=int, default=1900)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--only", choices=["ttft", "overhead"])
    a = ap.parse_args()
    if a.only in (None, "ttft"):
        rows = ttft(a.model, a.prefix, a.reps)
        base = rows["recomputed"][0]
        print(f"TTFT, {a.prefix}-token prompt, median of {a.reps}:")
        for name, (secs, s) in rows.items():
            extra = ""
            if s:
                extra = f"  (onboarded {s['onboarded_blocks']} blocks; G3 hits {s.get('nvme_hits', 0)})"
            print(f"  {name:34} {secs * 1e3:8.1f} ms   {base / secs:5.2f}x recompute{extra}")
    if a.only in (None, "overhead"):
        r = overhead(a.model, a.requests, 32)
        print(json.dumps(r, indent=1))
        print(
            f"connector overhead: {r['connector_us_per_step']:.0f} us per scheduler step "
            f"({r['share'] * 100:.2f}% of {r['step_ms']:.1f} ms steps) with {r['requests']} requests in flight"
        )


if __name__ == "__main__":
    main()
