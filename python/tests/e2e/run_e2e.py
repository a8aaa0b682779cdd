"""End-to-end tests of kvferry in real vLLM (CPU build) with a tiny local model.

    python run_e2e.py MODEL_DIR [--only NAME,...]

Each scenario starts real vLLM engines in their own processes (engine.py) and compares greedy
token ids with one plain vLLM, token for token, and checks kvferry's counters so that a pass
means blocks really moved:

- pd-tcp: a prefill and a decode engine; the decode engine pulls the prompt's KV over TCP.
- pd-ucx: the same over UCX (skipped, with the reason, where no libucp loads).
- offload: prompts with a long shared prefix; vLLM's prefix cache is emptied between rounds, so
  the second round's prefix can only come from kvferry's G2 (DRAM).
- offload-g3: the same engine configuration with an NVMe directory, restarted between rounds:
  the prefix comes back from G3 files.
- prefill-killed: the prefill engine is killed (SIGKILL) after it prefilled and before the
  decode engine pulls: the pulls fail, the decode engine recomputes, outputs are identical.
- proxy, proxy-ucx: `vllm serve` prefill and decode servers (separate engine and worker processes, as in
  production) behind `kvferry.proxy`, the decode server also offloading: the README's demo
  (python/examples/vllm_demo.py), with its outputs checked against plain vLLM.
- offloading-spec: vLLM's own OffloadingConnector with kvferry.offload_spec as its
  out-of-tree spec (kvferry's G2 under vLLM's offloading scheduler), across a prefix-cache reset;
  -chunks with offloaded blocks of 2 GPU blocks (blocks_per_chunk 2), and hybrid.py's under the
  hybrid KV cache manager.
- prefill-down: the decode engine is pointed at a prefill engine that is not running; requests
  complete by recomputing (kv_load_failure_policy=recompute), with the failures counted.
- and failclosed.py's: late decoders with and without heartbeats, cut-down offers, aborts before
  the pull, model files replaced over the same nvme_dir, reset_prefix_cache with the connector,
  two engines on one nvme_dir.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BS = 32


class Engine:
    def __init__(
        self, model, name, connector=None, kv_connector="KVFerryConnector", netns=None, env=None, **opts
    ):
        """`opts`: engine.py's other settings (policy, max_num_seqs, block_size, kv_role);
        `netns`: a network namespace to run in; `env`: extra environment variables."""
        self.name = name
        cfg = json.dumps(
            {"name": name, "connector": connector, "kv_connector": kv_connector, **opts}
        )
        self.log = open(os.path.join(tempfile.gettempdir(), f"kvferry-e2e-{name}.log"), "w")
        cmd = [sys.executable, os.path.join(HERE, "engine.py"), model, cfg]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.p = subprocess.Popen(
            cmd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.ready = None

    def _read(self):
        for line in self.p.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"engine {self.name} exited; see {self.log.name}")

    def wait_ready(self):
        if self.ready is None:
            self.ready = self._read()
        return self.ready

    def call(self, **cmd):
        self.wait_ready()
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._read()

    def generate(self, prompts, max_tokens, params=None, logprobs=None):
        r = self.call(
            op="generate", prompts=prompts, max_tokens=max_tokens, kv_transfer_params=params, logprobs=logprobs
        )
        return r["outputs"], r["secs"]

    def stats(self):
        return self.call(op="stats")["counters"]

    def close(self):
        if self.p.poll() is None:
            try:
                self.call(op="quit")
            except Exception:  # noqa: BLE001
                pass
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.log.close()


def plain_outputs(model, name, ps, max_tokens, logprobs=None, **opts):
    """Greedy outputs of a vLLM without kvferry for prompts `ps`, what a scenario compares with;
    `logprobs`: with each token's best candidates, so that `check_same` can tell a tie."""
    base = Engine(model, name, **opts)
    try:
        return base.generate(ps, max_tokens, logprobs=logprobs)[0]
    finally:
        base.close()


def wait_released(pre, n, timeout=30):
    """Steps a prefill engine until `n` pulls were served (or `timeout` passes); its counters."""
    deadline = time.time() + timeout
    while True:
        s = pre.stats()
        if s["pulls_served"] >= n or time.time() > deadline:
            return s
        pre.call(op="settle", timeout_s=1)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def quiet_ports(n=1):
    """A base port with the n - 1 after it free too, below the kernel's ephemeral range: vLLM's
    own sockets (and every client's) take ephemeral ports, and one of them may take a port
    free_port() handed out before the server under test binds it."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - n)
        ok = True
        for p in range(base, base + n):
            s = socket.socket()
            try:
                s.bind(("0.0.0.0", p))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return base
    raise RuntimeError(f"no {n} free ports in a row")


def prompts(n=6, prefix_len=200, suffix_len=24, seed=7):
    rng = random.Random(seed)
    prefix = [rng.randrange(10, 1990) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(10, 1990) for _ in range(suffix_len)] for _ in range(n)]


# How close (in log probability) a candidate must be to plain vLLM's greedy token to count as a
# tie: three bfloat16 steps at the logprobs a tiny random model gives (|logprob| 2-8, step 1/32).
TIE = 0.1


def check_same(name, got, want):
    """Token for token against plain vLLM. Where `want` carries each token's candidates (a
    bfloat16 model's reference), the outputs may part at a tie: a token plain vLLM ranked within
    `TIE` of its own. A state computed in two pieces (P/D stops a token short; an onboard resumes
    after a block) differs from one computed in one pass in the last bits, and greedy decoding
    breaks an exact tie either way. Past the point they part nothing is compared (the contexts
    differ); a wrong block or state makes a token plain vLLM did not rank near the top."""
    for i, (g, w) in enumerate(zip(got, want)):
        for pos, (a, b) in enumerate(zip(g["token_ids"], w["token_ids"])):
            if a == b:
                continue
            cands = dict(w["top"][pos]) if w.get("top") else {}
            if a in cands and cands[a] >= max(cands.values()) - TIE:
                break
            raise AssertionError(
                f"{name}: prompt {i} differs from plain vLLM at token {pos} (not a tie):\n"
                f"  got  {g['token_ids']}\n  want {w['token_ids']}\n  plain vLLM's candidates there: "
                f"{w['top'][pos] if w.get('top') else 'not asked'}"
            )
        else:
            if len(g["token_ids"]) != len(w["token_ids"]):
                n, m = len(g["token_ids"]), len(w["token_ids"])
                raise AssertionError(f"{name}: prompt {i}: {n} tokens, plain vLLM's {m}")


def pd(model, plain, transport, staged=False):
    """P/D token for token against plain vLLM; `staged`: both engines serve and land through a
    host copy of the cache, the path a GPU cache takes without CUDA-capable UCX."""
    port = free_port()
    conn = {"pd": True, "transport": transport, "staged": staged}
    pre = Engine(model, f"prefill-{transport}", {**conn, "port": port})
    dec = Engine(model, f"decode-{transport}", conn)
    try:
        pre.wait_ready(), dec.wait_ready()
        ps = prompts()
        # The proxy's protocol: prefill with max_tokens=1 and do_remote_decode, then decode with
        # the kv_transfer_params the prefill engine returned.
        first, _ = pre.generate(ps, 1, [{"do_remote_decode": True}] * len(ps))
        pre.call(op="step")
        params = [o["kv_transfer_params"] for o in first]
        for p in params:
            assert p and p.get("do_remote_prefill") and p["remote_port"] == port, p
        out, secs = dec.generate(ps, 16, params)
        check_same(f"pd-{transport}{'-staged' if staged else ''}", out, plain)
        d = dec.stats()
        p = wait_released(pre, len(ps))
        blocks = sum(-(-len(x) // BS) for x in ps)
        assert d["pulled_blocks"] >= blocks - len(ps), d
        assert d["pull_failures"] == 0, d
        assert p["pulls_served"] == len(ps), p
        return f"{d['pulled_blocks']} blocks ({d['pulled_bytes']} bytes) pulled, {p['pulls_served']} requests released, decode {secs:.2f} s"
    finally:
        pre.close()
        dec.close()


def saved_round(e, name, ps, plain):
    """Round 1 of an offload scenario: outputs as plain vLLM's, blocks saved, vLLM's own prefix
    cache emptied so round 2 can only hit kvferry. Returns (counters, seconds)."""
    out, secs = e.generate(ps, 16)
    check_same(f"{name} round 1", out, plain)
    assert e.call(op="settle")["reset"], "vLLM's prefix cache did not empty"
    s = e.stats()
    assert s["saved_blocks"] > 0, s
    return s, secs


def offload(model, plain, nvme_dir=None):
    conn = {"pd": False, "dram_blocks": 256}
    if nvme_dir:
        conn.update(nvme_dir=nvme_dir, nvme_blocks=512)
    e = Engine(model, "offload-g3" if nvme_dir else "offload", conn)
    ps = prompts()
    try:
        s1, t1 = saved_round(e, "offload", ps, plain)
        if nvme_dir:
            # Restart: a new engine process finds the blocks in the G3 files.
            e.close()
            e = Engine(model, "offload-g3-restarted", conn)
        out2, t2 = e.generate(ps, 16)
        check_same("offload round 2", out2, plain)
        s2 = e.stats()
        assert s2["onboarded_blocks"] > 0 and s2["onboard_failed_blocks"] == 0, s2
        where = "G3 after a restart" if nvme_dir else "G2"
        return f"{s1['saved_blocks']} blocks saved, {s2['onboarded_blocks']} onboarded from {where}; round 1 {t1:.2f} s, round 2 {t2:.2f} s"
    finally:
        e.close()


def offload_admission(model, plain, nvme_dir):
    """A DRAM tier smaller than the prompts' blocks, NVMe admission on (only blocks read back are
    worth a write) and S3-FIFO eviction: blocks not written are dropped by the scheduler, never
    under a load; outputs stay plain vLLM's and no load fails."""
    conn = {
        "pd": False,
        "dram_blocks": 8,
        "nvme_dir": nvme_dir,
        "nvme_blocks": 64,
        "eviction": "s3fifo",
        "nvme_admission": "min-hits:1",
    }
    e = Engine(model, "offload-admission", conn)
    ps = prompts()
    try:
        s1, _ = saved_round(e, "offload-admission", ps, plain)
        for rnd in range(2):
            out, _ = e.generate(ps, 16)
            check_same(f"offload-admission round {rnd + 2}", out, plain)
            assert e.call(op="settle")["reset"]
        s = e.stats()
        assert s["nvme_rejected"] > 0, s
        assert s["onboard_failed_blocks"] == 0, s
        # The shared prefix (a chain's head) stays through the pressure: later rounds load it.
        assert s["onboarded_blocks"] > 0, s
        return (
            f"{s['saved_blocks']} blocks saved, {s['nvme_admitted']} written to G3, "
            f"{s['nvme_rejected']} judged not worth a write and dropped, "
            f"{s['onboarded_blocks']} onboarded, no load failed"
        )
    finally:
        e.close()


def recomputes(name, dec, ps, params, plain):
    """Decodes with pulls that must fail; the outputs must still equal plain vLLM's."""
    out, _ = dec.generate(ps, 16, params)
    check_same(name, out, plain)
    d = dec.stats()
    assert d["pull_failures"] >= 1 and d["pulled_blocks"] == 0, d
    return f"{d['pull_failures']} failed pulls, all requests recomputed and identical"


def prefill_killed(model, plain):
    port = free_port()
    pre = Engine(model, "prefill-killed", {"pd": True, "port": port})
    dec = Engine(model, "decode-orphaned", {"pd": True})
    try:
        pre.wait_ready(), dec.wait_ready()
        ps = prompts()
        first, _ = pre.generate(ps, 1, [{"do_remote_decode": True}] * len(ps))
        params = [o["kv_transfer_params"] for o in first]
        pre.p.kill()
        pre.p.wait(timeout=30)
        return "prefill engine killed; " + recomputes("prefill-killed", dec, ps, params, plain)
    finally:
        pre.close()
        dec.close()


def offloading_spec(model, plain, dram_blocks=256, nvme_dir=None, per_chunk=1, name=None, ps=None, **opts):
    """vLLM's own OffloadingConnector with kvferry's tiers as an out-of-tree spec; with a small
    capacity the manager evicts and kvferry drops the evicted blocks. With NVMe as small as DRAM
    the manager must not count DRAM and NVMe as separate room (an over-committed manager promised
    blocks the tiers had dropped, and vLLM's worker died on its `assert transfer_result.success`).
    `per_chunk`: vLLM's blocks_per_chunk (offloaded blocks of that many GPU blocks); `opts`: the
    engine's (a hybrid model's KV cache manager)."""
    conn = {
        "spec_name": "KVFerryOffloadingSpec",
        "spec_module_path": "kvferry.offload_spec",
        "dram_blocks": dram_blocks,
    }
    if per_chunk != 1:
        conn["blocks_per_chunk"] = per_chunk
    if nvme_dir:
        conn.update(nvme_dir=nvme_dir, nvme_blocks=dram_blocks)
    name = name or f"offloading-spec-{dram_blocks}" + ("-nvme" if nvme_dir else "")
    e = Engine(model, name, conn, kv_connector="OffloadingConnector", metrics=True, **opts)
    ps = ps or prompts()
    try:
        s1, _ = saved_round(e, "offloading-spec", ps, plain)
        for rnd in range(3 if nvme_dir else 1):
            out2, _ = e.generate(ps, 16)
            check_same(f"offloading-spec round {rnd + 2}", out2, plain)
            assert e.call(op="settle")["reset"]
        s2 = e.stats()
        assert s2["onboard_failed_blocks"] == 0, s2
        assert s2["onboarded_blocks"] > 0 or dram_blocks < 12, s2
        assert s2["dram_blocks"] <= dram_blocks, s2
        # vLLM's own transfer families count kvferry's jobs (their sizes and times).
        m = e.call(op="metrics")["metrics"]
        moved = {k: v for k, v in m.items() if "kv_offload_" in k and "bytes" in k}
        assert any("store" in k and v > 0 for k, v in moved.items()), moved
        assert any("load" in k and v > 0 for k, v in moved.items()) or s2["onboarded_blocks"] == 0, moved
        return (
            f"vLLM's OffloadingConnector on kvferry's G2 ({dram_blocks} blocks): "
            f"{s1['saved_blocks']} blocks saved, {s2['onboarded_blocks']} onboarded, "
            f"{s2['dram_blocks']} resident"
        )
    finally:
        e.close()


def prefill_down(model, plain):
    dec = Engine(model, "decode-alone", {"pd": True})
    try:
        ps = prompts()
        dead = free_port()
        params = [
            {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": list(range(1, 1 + -(-len(x) // BS))),
                "remote_engine_id": "nobody",
                "remote_request_id": f"gone-{i}",
                "remote_host": "127.0.0.1",
                "remote_port": dead,
                "tp_size": 1,
                # A well-formed offer (a grant, a lease not yet over) from an engine that is gone.
                "kvferry_grant": f"{0x1234 << 32 | i + 1:016x}",
                "remote_blocks_expiry_time": time.time() + 600,
            }
            for i, x in enumerate(ps)
        ]
        return recomputes("prefill-down", dec, ps, params, plain)
    finally:
        dec.close()


def proxy(model, transport="tcp", block_size=BS, policy="recompute", protocol="nixlv2"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples"))
    import vllm_demo

    # Plain outputs for the demo's prompts, from an engine without kvferry.
    base = Engine(model, "plain-proxy", block_size=block_size)
    try:
        want, _ = base.generate(vllm_demo.prompts(4, 300, seed=11), 16)
        want_long, _ = base.generate(vllm_demo.prompts(1, 1500, seed=12), 8)
    finally:
        base.close()
    # Both servers require an API key (the proxy forwards the client's).
    r = vllm_demo.run(
        model, transport, quiet=True, block_size=block_size, policy=policy, api_key="e2e-key",
        protocol=protocol,
    )
    result_note = f"{protocol} over {transport}, block size {block_size}, policy {policy or 'fail'}: "
    got = [{"token_ids": o} for o in r["pd_outputs"]]
    assert all(isinstance(o, list) for o in r["pd_outputs"]), "the server returned no token ids"
    check_same("proxy P/D", got, want)
    assert isinstance(r["min_tokens_pd"], list) and len(r["min_tokens_pd"]) >= 12, r["min_tokens_pd"]
    assert r["min_tokens_pd"] == r["min_tokens_direct"], (r["min_tokens_pd"], r["min_tokens_direct"])
    check_same("proxy offload (computed)", [{"token_ids": r["offload_cold"]}], want_long)
    check_same("proxy offload (from G2)", [{"token_ids": r["offload_warm"]}], want_long)
    d, p = r["pd"]["decode"], r["pd"]["prefill"]
    assert d.get("pulled_blocks", 0) > 0 and d.get("pull_failures", 0) == 0, d
    assert p.get("pulls_served", 0) == 4, p
    assert r["onboarded"] > 0, r
    # The same counters on vLLM's own /metrics (the connector's Prometheus hooks).
    md, mp = r["metrics"]["decode"], r["metrics"]["prefill"]
    assert md.get("vllm:kvferry_pulled_blocks_total", 0) > 0, md
    assert md.get("vllm:kvferry_onboarded_blocks_total", 0) > 0, md
    assert mp.get("vllm:kvferry_pulls_served_total", 0) > 0, mp
    assert "vllm:kvferry_dram_blocks" in md, md
    # vLLM's own offloading families, fed with the same bytes as kvferry's DRAM counters.
    assert md.get("vllm:kv_offload_load_bytes_total", 0) == md.get("vllm:kvferry_dram_bytes_out_total"), md
    assert md.get("vllm:kv_offload_store_bytes_total", 0) == md.get("vllm:kvferry_dram_bytes_in_total"), md
    assert md.get("vllm:kv_offload_load_bytes_total", 0) > 0, md
    # Capacity in tokens (1024 DRAM blocks on the decode server), and vLLM's own hit metrics
    # split by tier: pulled tokens as p2p, onboarded ones as host.
    assert md.get("vllm:kvferry_dram_capacity_tokens") == 1024 * block_size, md
    assert md.get("vllm:kvferry_dram_used_tokens", 0) > 0, md
    assert md.get("vllm:prompt_tokens_cached_by_source:p2p", 0) > 0, md
    assert md.get("vllm:prompt_tokens_cached_by_source:host", 0) > 0, md
    assert md.get("vllm:prompt_tokens_cached_by_source:external_unspecified", 0) == 0, md
    return result_note + (
        f"{d['pulled_blocks']} blocks pulled through the proxy; 1500-token prefix: TTFT "
        f"{r['ttft_cold'] * 1e3:.0f} ms computed, {r['ttft_warm'] * 1e3:.0f} ms from G2 ({r['onboarded']} blocks)"
    )


def main():
    model = sys.argv[1]
    only = None
    if "--only" in sys.argv:
        only = set(sys.argv[sys.argv.index("--only") + 1].split(","))
    t0 = time.time()
    base = Engine(model, "plain")
    plain, _ = base.generate(prompts(), 16)
    base.close()
    print(f"e2e: plain vLLM ready in {base.ready['start_s']} s", flush=True)
    results, failed = [], 0
    tmp = tempfile.mkdtemp(prefix="kvferry-e2e-g3-")
    scenarios = [
        ("pd-tcp", lambda: pd(model, plain, "tcp")),
        ("pd-ucx", lambda: pd(model, plain, "ucx")),
        # The staging path of GPU caches (a host copy between the cache and the transport).
        ("pd-staged", lambda: pd(model, plain, "tcp", staged=True)),
        ("pd-ucx-staged", lambda: pd(model, plain, "ucx", staged=True)),
        ("offload", lambda: offload(model, plain)),
        ("offload-g3", lambda: offload(model, plain, tmp)),
        ("offload-admission", lambda: offload_admission(model, plain, os.path.join(tmp, "adm"))),
        ("offloading-spec", lambda: offloading_spec(model, plain)),
        ("offloading-spec-evict", lambda: offloading_spec(model, plain, dram_blocks=8)),
        (
            "offloading-spec-chunks",
            lambda: offloading_spec(model, plain, per_chunk=2, name="offloading-spec-chunks"),
        ),
        (
            "offloading-spec-nvme",
            lambda: offloading_spec(model, plain, dram_blocks=8, nvme_dir=os.path.join(tmp, "spec")),
        ),
        ("prefill-down", lambda: prefill_down(model, plain)),
        ("prefill-killed", lambda: prefill_killed(model, plain)),
        ("proxy", lambda: proxy(model)),
        ("proxy-ucx", lambda: proxy(model, "ucx")),
        # llm-d's offloading protocol through `vllm serve` (both legs at once, vLLM's default
        # failure policy: a request whose offer is late must wait, not fail).
        ("proxy-offloading", lambda: proxy(model, "tcp", BS, None, "offloading")),
        # Another geometry (6 layers, 4 KV heads), block size 64, vLLM's default failure policy.
        ("proxy-geometry", lambda: proxy(second_model(tmp), "tcp", 64, None)),
    ]
    import failclosed
    import llmd
    import events
    import hybrid
    import multi
    import parallel

    scenarios += [(n, (lambda f: lambda: f(model, plain))(f)) for n, f in failclosed.SCENARIOS]
    scenarios += [(n, (lambda f: lambda: f(model, plain))(f)) for n, f in llmd.SCENARIOS]
    scenarios += [(n, (lambda f: lambda: f(model, plain))(f)) for n, f in multi.SCENARIOS]
    scenarios += [(n, (lambda f: lambda: f(model, plain))(f)) for n, f in parallel.SCENARIOS]
    scenarios += [(n, (lambda f: lambda: f(model, plain))(f)) for n, f in events.SCENARIOS]
    scenarios += [(n, (lambda f: lambda: f(model, plain))(f)) for n, f in hybrid.SCENARIOS]
    for name, run in scenarios:
        if only and name not in only:
            continue
        if name in ("pd-ucx", "pd-ucx-staged", "proxy-ucx") and not ucx_available():
            print(f"kvferry-test skipped e2e {name}: no libucp loads here", flush=True)
            results.append((name, "skipped"))
            continue
        t = time.time()
        try:
            msg = run()
            print(f"e2e {name}: ok in {time.time() - t:.0f} s: {msg}", flush=True)
            results.append((name, "ok"))
        except Exception as e:  # noqa: BLE001
            if type(e).__name__ == "Skip":
                print(f"kvferry-test skipped e2e {name}: {e}", flush=True)
                results.append((name, "skipped"))
                continue
            failed += 1
            print(f"e2e {name}: FAILED: {e}", flush=True)
            results.append((name, "failed"))
    shutil.rmtree(tmp, ignore_errors=True)
    ok = sum(1 for _, r in results if r == "ok")
    skipped = sum(1 for _, r in results if r == "skipped")
    print(f"e2e: {ok} passed, {failed} failed, {skipped} skipped in {time.time() - t0:.0f} s")
    sys.exit(1 if failed else 0)


def second_model(tmp):
    path = os.path.join(tmp, "model-6x4")
    if not os.path.isdir(path):
        subprocess.run(
            [sys.executable, os.path.join(HERE, "make_tiny_model.py"), path,
             "--layers", "6", "--kv-heads", "4"],
            check=True,
            capture_output=True,
        )
    return path


def ucx_available():
    try:
        from kvferry import Connector

        c = Connector("ucx-probe", pd=True, host="127.0.0.1", transport="ucx")
        del c
        return True
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    main()
