"""kvferry's Python package without vLLM: the extension loads from an installed wheel, two
connectors move real bytes between host buffers over loopback, the scheduler half plans, and
Rust errors arrive as KvferryError with the Rust message.

    python python/tests/test_native.py      # exits non-zero on the first failure
"""

import ctypes
import time

import kvferry
from kvferry import Connector, KvferryError
from kvferry._native import Scheduler

BLOCKS, HEADS, HEAD, TOKENS = 16, 2, 64, 32
# [blocks, heads, tokens, K|V channels] of float32, as vLLM's CPU engine lays out each layer.
ELEMS = BLOCKS * HEADS * TOKENS * 2 * HEAD
STRIDES = [HEADS * TOKENS * 2 * HEAD, TOKENS * 2 * HEAD, 2 * HEAD, 1]


def cache(seed):
    buf = (ctypes.c_float * (2 * ELEMS))()  # two layers
    for i in range(0, 2 * ELEMS, 97):
        buf[i] = float((i * seed) % 1000)
    return buf


def register(conn, buf):
    conn.register_cache(
        kv_heads=HEADS,
        head_size=HEAD,
        dtype="float32",
        block_tokens=TOKENS,
        num_blocks=BLOCKS,
        base=ctypes.addressof(buf),
        layer_offsets=[0, ELEMS * 4],
        strides=STRIDES,
    )


def block(buf, layer, b):
    start = layer * ELEMS + b * STRIDES[0]
    return list(buf[start : start + STRIDES[0]])


def until(conn, pred, timeout=20.0):
    got = ([], [], [])
    deadline = time.time() + timeout
    while time.time() < deadline:
        s, r, e = conn.poll()
        got[0].extend(s), got[1].extend(r), got[2].extend(e)
        if pred(got):
            return got
        time.sleep(0.01)
    raise AssertionError(f"timed out: {got}")


def test_pull_between_two_connectors():
    src, dst = cache(3), cache(5)
    prefill = Connector("py-prefill", pd=True, host="127.0.0.1")
    decode = Connector("py-decode", pd=True, host="127.0.0.1")
    register(prefill, src)
    register(decode, dst)
    grant = 0x1234_0000_0001  # the scheduler's offer generation (instance 0x1234, offer 1)
    prefill.finish("p", grant, [2, 7])
    from kvferry._native import blocks_digest

    decode.pull(
        "d", "127.0.0.1", prefill.listen_port(), "p", 1, grant, blocks_digest([2, 7]), [2, 7], [9, 4]
    )
    s, r, errors = until(decode, lambda g: "d" in g[1])
    assert errors == [], errors
    for layer in (0, 1):
        assert block(dst, layer, 9) == block(src, layer, 2)
        assert block(dst, layer, 4) == block(src, layer, 7)
    until(prefill, lambda g: "p" in g[0])
    assert decode.counters()["pulled_blocks"] == 2
    assert prefill.counters()["pulls_served"] == 1


def test_offload_round_trip_and_events():
    buf = cache(7)
    c = Connector("py-offload", dram_blocks=8)
    register(c, buf)
    hashes = [bytes([i]) * 32 for i in range(3)]
    before = [block(buf, 1, b) for b in (1, 2, 3)]
    c.save("s", hashes, [1, 2, 3])
    c.finish("s")
    until(c, lambda g: "s" in g[0])
    assert c.lookup(hashes) == 3
    events = c.take_events()
    assert {(k, m) for k, _, m in events} == {("stored", "CPU")}, events
    for b in (10, 11, 12):
        for layer in (0, 1):
            start = layer * ELEMS + b * STRIDES[0]
            for i in range(start, start + STRIDES[0]):
                buf[i] = 0.0
    c.load("l", hashes, [10, 11, 12])
    _, r, errors = until(c, lambda g: "l" in g[1])
    assert errors == []
    assert [block(buf, 1, b) for b in (10, 11, 12)] == before


def test_scheduler_plans_loads_from_the_mirror():
    s = Scheduler("py-sched", block_size=4, offload=True, pd=False, host="127.0.0.1", port=5000)
    hashes = [bytes([i]) * 32 for i in range(4)]
    s.apply([("stored", h, "CPU") for h in hashes[:3]])
    assert s.matched("r", None, 16, 16, hashes, 0) == 12
    s.allocated("r", None, [[5, 6, 7, 8]], 12)
    step = s.take_step()
    assert step["loads"] == [("r", hashes[:3], [5, 6, 7])], step


def test_rust_errors_are_python_exceptions():
    for bad, needle in [
        (lambda: Connector("x", pd=True, transport="carrier-pigeon"), "transport"),
        (lambda: Connector("x", dram_blocks=4).save("r", [b"h" * 32], [1]), "offload"),
        (lambda: Connector("x").lookup([b""]), "empty"),
    ]:
        try:
            bad()
        except KvferryError as e:
            assert needle in str(e).lower(), str(e)
        else:
            raise AssertionError(f"no error for {needle}")


def test_side_channel_addresses_follow_nixl_conventions():
    from kvferry.addressing import NIXL_DEFAULT_PORT, side_channel

    env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.1.2.3", "VLLM_NIXL_SIDE_CHANNEL_PORT": "7000"}
    # llm-d: the pod IP from the environment, every interface bound, the port from it too.
    a = side_channel({}, env)
    assert (a.advertise, a.bind, a.base_port) == ("10.1.2.3", "0.0.0.0", 7000), a
    # The extra config's keys win over the environment.
    a = side_channel({"host": "10.9.9.9", "port": 7100, "bind_host": "10.9.9.9"}, env)
    assert (a.advertise, a.bind, a.base_port) == ("10.9.9.9", "10.9.9.9", 7100), a
    # Rank-aware: base + data-parallel index x TP size (the core adds the TP rank).
    assert side_channel({}, env, tp_size=4, dp_index=2, dp_size=3).base_port == 7000 + 8
    # Loopback stays loopback; one rank needs no fixed port; several get NixlConnector's 5600.
    a = side_channel({}, {})
    assert (a.advertise, a.bind, a.base_port) == ("127.0.0.1", "127.0.0.1", None), a
    assert side_channel({}, {}, tp_size=2).base_port == NIXL_DEFAULT_PORT
    assert side_channel({}, {}, dp_index=1, dp_size=2).base_port == NIXL_DEFAULT_PORT + 1
    # An unspecified host is bound as given; what is advertised is an address a peer can dial.
    a = side_channel({}, {"VLLM_NIXL_SIDE_CHANNEL_HOST": "0.0.0.0", "VLLM_HOST_IP": "10.4.4.4"})
    assert (a.advertise, a.bind) == ("10.4.4.4", "0.0.0.0"), a
    # A decode-only engine: nothing reachable, no port needed, whatever the environment says.
    a = side_channel({}, env, kv_role="kv_consumer", tp_size=4)
    assert (a.advertise, a.bind, a.base_port) == ("127.0.0.1", "127.0.0.1", None), a
    try:
        side_channel({"port": 65534}, {}, tp_size=4)
    except ValueError as e:
        assert "out of range" in str(e)
    else:
        raise AssertionError("ports past 65535 are refused")


def test_proxy_behaves_as_llm_ds_sidecar():
    """The proxy against two fake OpenAI servers that record what they were sent."""
    import json
    import threading
    import time
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kvferry import proxy

    seen = {"prefill": [], "decode": []}
    fail_prefill = []
    offer = {"do_remote_prefill": True, "remote_host": "10.0.0.1", "remote_port": 5600}

    def fake(role):
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                return

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen[role].append((body, dict(self.headers)))
                if role == "prefill" and fail_prefill:
                    out, code = b'{"error": "boom"}', 500
                else:
                    reply = {"choices": [{"text": role}]}
                    if role == "prefill":
                        reply["kv_transfer_params"] = offer
                    out, code = json.dumps(reply).encode(), 200
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    pre, dec = fake("prefill"), fake("decode")
    url = lambda s: f"http://127.0.0.1:{s.server_port}"  # noqa: E731
    px = proxy.serve([url(pre)], [url(dec)], "127.0.0.1", 0, timeout=10)
    threading.Thread(target=px.serve_forever, daemon=True).start()

    def ask(headers, at=None):
        body = {
            "prompt": "hi",
            "max_tokens": 8,
            "min_tokens": 4,
            # A client naming another request's blocks: must reach no backend.
            "kv_transfer_params": {"do_remote_prefill": True, "remote_block_ids": [1, 2]},
        }
        req = urllib.request.Request(
            url(at or px) + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **headers},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    try:
        got = ask({"Authorization": "Bearer k", "X-Request-Id": "rid-1"})
        assert got["choices"][0]["text"] == "decode", got
        (pb, ph), (db, dh) = seen["prefill"][-1], seen["decode"][-1]
        assert pb["max_tokens"] == 1 and "min_tokens" not in pb and pb["stream"] is False, pb
        assert pb["kv_transfer_params"]["do_remote_decode"] is True, pb
        assert db["min_tokens"] == 4 and db["max_tokens"] == 8, db
        assert db["kv_transfer_params"] == offer, db
        for h in (ph, dh):
            assert h.get("Authorization") == "Bearer k" and h.get("X-Request-Id") == "rid-1", h
        # Without an id of the client's, both backends get the same fresh one.
        ask({})
        assert seen["prefill"][-1][1]["X-Request-Id"] == seen["decode"][-1][1]["X-Request-Id"]
        # A prefill server failing with 5xx: the decoder computes the prompt itself, without
        # any kv_transfer_params, and the client still gets its answer.
        fail_prefill.append(True)
        got = ask({})
        assert got["choices"][0]["text"] == "decode", got
        assert "kv_transfer_params" not in seen["decode"][-1][0], seen["decode"][-1][0]
        with urllib.request.urlopen(url(px) + "/healthcheck", timeout=10) as r:
            assert r.status == 200

        # llm-d's offloading protocol: both legs at once, role-keyed params under one key.
        fail_prefill.clear()
        po = proxy.serve(
            [url(pre)], [url(dec)], "127.0.0.1", 0, timeout=10, protocol="offloading", p2p_port=7777
        )
        threading.Thread(target=po.serve_forever, daemon=True).start()
        try:
            n = len(seen["prefill"])
            got = ask({"X-Request-Id": "rid-2"}, at=po)
            assert got["choices"][0]["text"] == "decode", got
            for _ in range(500):  # the prefill leg runs in the background
                if len(seen["prefill"]) > n:
                    break
                time.sleep(0.01)
            (pb, ph), (db, dh) = seen["prefill"][-1], seen["decode"][-1]
            rp = db["kv_transfer_params"]["remote_prefiller"]
            assert (rp["remote_host"], rp["remote_port"]) == ("127.0.0.1", 7777), rp
            assert pb["kv_transfer_params"] == {"remote_decoder": {"kv_request_id": rp["kv_request_id"]}}, pb
            assert pb["max_tokens"] == 1 and "min_tokens" not in pb and pb["stream"] is False, pb
            assert db["min_tokens"] == 4 and db["max_tokens"] == 8, db
            assert ph.get("X-Request-Id") == dh.get("X-Request-Id") == "rid-2", (ph, dh)
        finally:
            po.shutdown()
    finally:
        for s in (px, pre, dec):
            s.shutdown()


def test_offloading_keys_pair_with_gpu_blocks_per_group_and_chunk():
    from kvferry.chunks import chunk_block_keys

    # Two groups, chunks of 2 GPU blocks: group 0 loads blocks 3..11 (5 chunks, the first
    # entered at its second block), group 1 (a sliding window) blocks 9..11 (2 chunks).
    keys = [b"a3", b"a5", b"a7", b"a9", b"a11", b"b9", b"b11"]
    ids = list(range(100, 109)) + [200, 201, 202]
    got, blocks = chunk_block_keys(keys, ids, [9, 3], [3, 9], 2)
    assert blocks == ids
    # Each under its chunk's key, the chunk size and its place in the chunk.
    want = [b"a3\x02\x01", b"a5\x02\x00", b"a5\x02\x01", b"a7\x02\x00", b"a7\x02\x01"]
    want += [b"a9\x02\x00", b"a9\x02\x01", b"a11\x02\x00", b"a11\x02\x01"]
    want += [b"b9\x02\x01", b"b11\x02\x00", b"b11\x02\x01"]
    assert got == want, got
    # One block a chunk: the keys themselves (G3 files and events as before).
    assert chunk_block_keys(keys[:2], [7, 8], [2], [4], 1) == ([b"a3", b"a5"], [7, 8])
    for bad in ((keys, ids, [9, 2], [3, 9], 2), (keys[:6], ids, [9, 3], [3, 9], 2), (keys, ids, [9, 3], [3], 2)):
        try:
            chunk_block_keys(*bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


if __name__ == "__main__":
    print(f"kvferry {kvferry.__version__}")
    n = 0
    for name, fn in sorted(globals().items()):
        if name.startswith("test_") and callable(fn):
            fn()
            n += 1
            print(f"ok {name}")
    print(f"python: {n} passed, 0 failed")
