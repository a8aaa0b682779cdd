"""kvferry in vLLM on one machine, CPU only: a prefill and a decode vLLM server behind kvferry's
proxy, then offload and reuse of a long prefix. Prints what moved and how fast.

    bash python/examples/vllm_demo.sh         # sets up vLLM (CPU) and kvferry, then runs this

or, in a Python environment with vLLM and kvferry installed:

    python python/examples/vllm_demo.py [--model DIR]

Without --model a tiny random Llama is made first (python/tests/e2e/make_tiny_model.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def stats(path: str) -> dict[str, int]:
    out = {}
    try:
        for line in open(path):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0].removeprefix("kvferry_").removesuffix("_total")] = int(value)
    except OSError:
        pass
    return out


class Server:
    """One `vllm serve` with kvferry as its KV connector."""

    def __init__(
        self,
        model: str,
        name: str,
        extra: dict,
        workdir: str,
        block_size: int = 32,
        policy: str | None = "recompute",
        api_key: str | None = None,
        kv_config: dict | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        kv_role: str = "kv_both",
    ):
        """`kv_config`: the whole --kv-transfer-config instead of kvferry's (the tests compose
        kvferry with other connectors this way); `args`: more `vllm serve` arguments; `env`: more
        environment variables."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats_path = os.path.join(workdir, f"{name}.prom")
        extra = dict(extra, stats_path=self.stats_path)
        cfg = {
            "kv_connector": "KVFerryConnector",
            "kv_connector_module_path": "kvferry.vllm",
            "kv_role": kv_role,
            "engine_id": name,
            "kv_connector_extra_config": extra,
        }
        if kv_config is not None:
            cfg = kv_config
        if policy:  # None: vLLM's default ("fail")
            cfg["kv_load_failure_policy"] = policy
        env = dict(
            os.environ,
            VLLM_CPU_KVCACHE_SPACE="1",
            HF_HUB_OFFLINE="1",
            VLLM_SERVER_DEV_MODE="1",  # for POST /reset_prefix_cache
            TOKENIZERS_PARALLELISM="false",
            **(env or {}),
        )
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", model, "--port", str(self.port), "--host", "127.0.0.1",
                "--dtype", "float32", "--block-size", str(block_size), "--max-model-len", "2048",
                "--enforce-eager", "--seed", "0", "--served-model-name", "tiny",
                "--kv-transfer-config", json.dumps(cfg),
                *(["--api-key", api_key] if api_key else []),
                *(args or []),
            ],
            stdout=open(self.log_path, "w"),
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait(self, timeout: float = 300.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited; log: {self.log_path}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                return
            except Exception:  # noqa: BLE001
                time.sleep(0.5)
        raise TimeoutError(f"vLLM did not start in {timeout} s; log: {self.log_path}")

    def stats(self) -> dict[str, int]:
        return stats(self.stats_path)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def prom(url: str, api_key: str | None = None) -> dict[str, float]:
    """kvferry's series on a server's /metrics (vLLM's Prometheus endpoint), summed over labels,
    vLLM's offloading families kvferry feeds (``vllm:kv_offload_*``), and vLLM's cached prompt tokens by source as ``vllm:prompt_tokens_cached_by_source:<source>``."""
    req = urllib.request.Request(
        url + "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
    )
    out: dict[str, float] = {}
    with urllib.request.urlopen(req, timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(("vllm:kvferry_", "vllm:kv_offload_")):
                name, _, value = line.rpartition(" ")
                name = name.split("{")[0]
                out[name] = out.get(name, 0.0) + float(value)
            elif line.startswith("vllm:prompt_tokens_cached_by_source_total{"):
                name, _, value = line.rpartition(" ")
                m = re.search(r'source="([^"]+)"', name)
                key = f"vllm:prompt_tokens_cached_by_source:{m.group(1) if m else '?'}"
                out[key] = out.get(key, 0.0) + float(value)
    return out


def complete(
    url: str,
    prompt: list[int],
    max_tokens: int,
    stream: bool = False,
    api_key: str | None = None,
    **extra,
):
    """Returns (token ids or text, seconds to the first token, seconds in all). `extra`: more
    request fields (min_tokens, ...)."""
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
        "return_token_ids": True,
        **extra,
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers=headers)
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        if not stream:
            data = json.loads(r.read())
            first = time.perf_counter() - t0
            choice = data["choices"][0]
            return choice.get("token_ids") or choice["text"], first, first
        ids, text = [], ""
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter() - t0
            choice = json.loads(line[5:])["choices"][0]
            ids.extend(choice.get("token_ids") or [])
            text += choice.get("text", "")
        return ids or text, first or 0.0, time.perf_counter() - t0


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 1990) for _ in range(length)] for _ in range(n)]


def run(
    model: str,
    transport: str = "tcp",
    quiet: bool = False,
    block_size: int = 32,
    policy: str | None = "recompute",
    api_key: str | None = None,
    protocol: str = "nixlv2",
) -> dict:
    """`policy`: vLLM's kv_load_failure_policy for both servers (None: vLLM's default);
    `api_key`: both servers require it (the proxy forwards the client's); `protocol`: the
    proxy's, ``nixlv2`` or llm-d's ``offloading`` (prefill and decode at once, by key)."""
    from kvferry.proxy import serve

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    work = tempfile.mkdtemp(prefix="kvferry-demo-")
    opts = {"block_size": block_size, "policy": policy, "api_key": api_key}
    pre_extra = {"pd": True, "transport": transport}
    p2p_port = free_port()
    if protocol == "offloading":
        # The decoder is told where to ask by the proxy: the prefill's port must be known.
        pre_extra["port"] = p2p_port
    prefill = Server(model, "prefill", pre_extra, work, **opts)
    # The decode server also offloads: both roles in one connector.
    decode = Server(
        model, "decode", {"pd": True, "transport": transport, "dram_blocks": 1024}, work, **opts
    )
    proxy = serve(
        [prefill.url], [decode.url], "127.0.0.1", 0, protocol=protocol, p2p_port=p2p_port
    )
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    purl = f"http://127.0.0.1:{proxy.server_port}"
    result: dict = {"work": work}
    try:
        t = time.time()
        prefill.wait()
        decode.wait()
        say(f"prefill {prefill.url} and decode {decode.url} up in {time.time() - t:.0f} s; proxy {purl}")

        # 1. Prefill/decode through the proxy.
        ps = prompts(4, 300, seed=11)
        outs = []
        t = time.perf_counter()
        for p in ps:
            out, _, _ = complete(purl, p, 16, api_key=api_key)
            outs.append(out)
        pd_secs = time.perf_counter() - t
        time.sleep(1.2)  # the stats files are rewritten at most once a second
        d, p = decode.stats(), prefill.stats()
        result["pd_outputs"] = outs
        result["pd"] = {"decode": d, "prefill": p}
        say(
            f"P/D ({protocol}) over {transport}: {len(ps)} requests of 300 prompt tokens in {pd_secs:.2f} s; "
            f"decode pulled {d.get('pulled_blocks', 0)} blocks ({d.get('pulled_bytes', 0) / 1e6:.2f} MB), "
            f"prefill released {p.get('pulls_served', 0)} requests, {d.get('pull_failures', 0)} failures"
        )

        # A client of llm-d's kind: an API key and min_tokens (which the prefill leg cannot
        # hold with one token), through the proxy and straight from the decode server.
        mp = prompts(1, 300, seed=13)[0]
        result["min_tokens_pd"], _, _ = complete(purl, mp, 16, api_key=api_key, min_tokens=12)
        result["min_tokens_direct"], _, _ = complete(
            decode.url, mp, 16, api_key=api_key, min_tokens=12
        )

        # 2. A long prefix: computed, then (vLLM's own prefix cache emptied) onboarded from G2.
        long_prompt = prompts(1, 1500, seed=12)[0]
        cold, ttft_cold, _ = complete(decode.url, long_prompt, 8, stream=True, api_key=api_key)
        time.sleep(1.5)
        for _ in range(50):
            r = urllib.request.urlopen(
                urllib.request.Request(
                    decode.url + "/reset_prefix_cache",
                    method="POST",
                    headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                ),
                timeout=30,
            )
            r.read()
            if r.status == 200:
                break
            time.sleep(0.2)
        before = decode.stats()
        warm, ttft_warm, _ = complete(decode.url, long_prompt, 8, stream=True, api_key=api_key)
        time.sleep(1.2)
        after = decode.stats()
        onboarded = after.get("onboarded_blocks", 0) - before.get("onboarded_blocks", 0)
        result["metrics"] = {"decode": prom(decode.url, api_key), "prefill": prom(prefill.url, api_key)}
        result.update(
            offload_cold=cold, offload_warm=warm, ttft_cold=ttft_cold, ttft_warm=ttft_warm,
            onboarded=onboarded, saved=after.get("saved_blocks", 0),
        )
        say(
            f"offload: 1500-token prompt, time to first token {ttft_cold * 1e3:.0f} ms computed, "
            f"{ttft_warm * 1e3:.0f} ms with the prefix from G2 ({after.get('saved_blocks', 0)} blocks saved, "
            f"{onboarded} onboarded); same output: {cold == warm}"
        )
    finally:
        proxy.shutdown()
        prefill.stop()
        decode.stop()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: make a tiny one)")
    ap.add_argument("--transport", default="tcp", choices=["tcp", "ucx"])
    ap.add_argument("--protocol", default="nixlv2", choices=["nixlv2", "offloading"])
    a = ap.parse_args()
    model = a.model
    if not model:
        model = os.path.join(tempfile.mkdtemp(prefix="kvferry-model-"), "tiny")
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "python/tests/e2e/make_tiny_model.py"), model],
            check=True, capture_output=True,
        )
    run(model, a.transport, protocol=a.protocol)


if __name__ == "__main__":
    main()
